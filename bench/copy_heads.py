"""Copy heads: where the needles go at 20x, and whether keeping facts by head helps.

At 20x the default (am-facts-omp-near) gives facts a quarter of each head's budget, too little for
the grid's eight needle sentences, and finds none.  This bench asks whether facts could be spent
where they are read.  On the grid's haystacks (SQuALITY dev stories 0 and 1 cut to 3,000 tokens,
8 needles each, seeds 0 and 1) it measures, per (layer, KV head):

  copy score   repeat-prefill: the attention a head pays to the token after the one its row copies
               (an induction head's signature, Olsson et al. 2022), largest over the group's query
               heads.  Known at compaction time, from the queries the default collects anyway.
  needle read  the attention mass on a needle's digits while the model writes that number after
               its question, on the full cache (averaged over needles and digits).  An oracle:
               it knows the questions.

and then compacts with the default's queries (repeat + self-study, at most 4,096 per KV head, the
grid's sampling and hold-out) and counts needles and next-token KL for

  am-facts-omp-near      the default
  copy heads only        facts (up to the whole budget) in heads with copy score >= 0.05, none elsewhere
  copy heads all facts   facts up to the whole budget in those heads, the default's share elsewhere
  whole numbers first    the default, with the numbers taken whole, fewest tokens first, the
                         same in every head (only digits fit at 20x: are digits alone enough?)

    python bench/copy_heads.py [--stories 0,1] [--ratios 5,10,20]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, fields, replace

import numpy as np
from common import machine, write_report

COPY = 0.05  # a head is a copy head at this copy score (uniform attention would be 1 / 3,000)


def copy_score(p, anchors: np.ndarray, n_rep: int) -> float:
    """Mean attention of the rows anchored at position a on the key at a + 1, largest over the
    group's query heads (rows are group-major: ``anchors`` tiled ``n_rep`` times)."""
    nxt = anchors + 1
    at = np.minimum(np.searchsorted(p.positions, nxt), p.T - 1)
    ok = (anchors >= 0) & (p.positions[at] == nxt)
    rows = np.flatnonzero(ok)
    if not len(rows):
        return 0.0
    E = p.logits(rows).astype(np.float64)
    E = np.exp(E - E.max(axis=1, keepdims=True))
    got = E[np.arange(len(rows)), at[rows]] / E.sum(axis=1)
    head = rows // (p.n // n_rep)
    return float(max(got[head == r].mean() for r in np.unique(head)))


def fact_groups(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token the number it belongs to (-1 none; a run of top ranks is one number, a token of
    rank r lies TOP_RANK - r tokens from it) and per number its place: fewest tokens first."""
    from kvlocal.am.facts import TOP_RANK

    r = ranks.astype(np.int64)
    top = r == TOP_RANK
    starts = top & ~np.concatenate([[False], top[:-1]])
    run = np.cumsum(starts) - 1
    group = np.where(top, run, -1)
    i, dist = np.arange(len(r)), TOP_RANK - r
    for j in (i - dist, i + dist):
        jj = np.clip(j, 0, len(r) - 1)
        ok = (r > 0) & (group < 0) & (j == jj) & top[jj]
        group[ok] = run[jj[ok]]
    n = int(starts.sum())
    length = np.bincount(run[top], minlength=n)
    order = np.empty(n, np.int64)
    order[np.lexsort((np.arange(n), length))] = np.arange(n)
    return group, order


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", default="0,1")
    ap.add_argument("--ratios", default="5,10,20")
    args = ap.parse_args()
    stories, ratios = [int(x) for x in args.stories.split(",")], [int(x) for x in args.ratios.split(",")]

    from facts_diagnosis import _attention
    from niah_diagnosis import _needle_positions

    from kvlocal.am import Compactor
    from kvlocal.am.methods import DEFAULT_METHOD, get_method
    from kvlocal.am.spans import SharedSpans
    from kvlocal.engine.capture import QueryCapture
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.data import make_haystack, squality_stories
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from models.smollm2 import ensure as ensure_model

    @dataclass
    class ByCopyHead(SharedSpans):
        """The default's selection with each head's fact share set by its copy score."""

        anchors: np.ndarray | None = None
        n_rep: int = 1
        others: bool = True  # heads below COPY keep the default's share (False: no facts)
        whole: bool = False  # no copy heads: the numbers whole, fewest tokens first, everywhere

        def rank_group(self, problems, scores):
            ranked = super().rank_group(problems, scores)
            shared, order = ranked.scores, ranked.fact_order
            if self.whole and order is not None:
                ranks = problems[0].fact_ranks
                group, place_of = fact_groups(ranks)
                place = np.empty(len(shared))
                place[np.argsort(-shared, kind="stable")] = np.arange(len(shared)) / len(shared)
                g = np.where(group >= 0, place_of[np.maximum(group, 0)], len(place_of))
                order = np.where(ranks > 0, ranks - (g + place) / (len(place_of) + 1), -np.inf)
            return replace(ranked, fact_order=order)

        def fill(self, p, shared):
            if self.whole:
                return super().fill(p, shared)
            if copy_score(p, self.anchors, self.n_rep) >= COPY:
                share = 1.0
            else:
                share = self.share_of_facts(p.T, min(p.t, p.T)) if self.others else 0.0
            return SharedSpans.fill(replace(self, fact_share=share, fact_until=None), p, shared)

    base = get_method(DEFAULT_METHOD)
    variants = {DEFAULT_METHOD: {}, "copy heads only": {"others": False}, "copy heads all facts": {},
                "whole numbers first": {"whole": True}}
    cfg = EvalConfig()
    ev = Evaluator(str(ensure_model()), cfg, "/tmp/kvlocal-copy-heads", progress=False)
    model = ev.model
    t_start = time.perf_counter()
    copy_tab, read_tab, results, full = [], [], {}, 0
    for si in stories:
        hay = make_haystack(squality_stories()[si], 3000, lambda t: len(model.tokenize(t, add_special=False)),
                            k=cfg.needles, seed=cfg.seed * 1000 + si)
        cont = model.tokenize(" " + hay.continuation, add_special=False)[: cfg.continuation_tokens]
        doc = ev._open(hay.text)
        s, snap, lo, hi = doc.session, doc.snapshot, doc.layout.doc_start, doc.layout.doc_end
        ref, ref_lp = ev._score_niah(s, hay, cont, None)
        full += sum(ref["hits"])
        n_head_kv, n_rep = snap.keys[0].shape[1], s.info.n_rep
        cells = np.flatnonzero((snap.positions >= lo) & (snap.positions < hi))
        problem = Compactor(max_queries_per_head=None)._problems(snap, cells, None)
        # the copy score from every repeat row, and the oracle's needle read
        rep = doc.queries(("repeat",))
        rep_anchors = np.tile(rep.anchors, n_rep)
        _, numbers = _needle_positions(model, s.tokens, hay.needles)
        answers = []
        for (key, number), at in zip(hay.needles, numbers, strict=True):
            prompt, ans = tasks.needle_prompt(s, key), s.tokenize(number, special=False)
            cap = QueryCapture(s.info, source="needle")
            with s.fork() as seq, s.capturing(cap):
                s.ingest(np.concatenate([prompt, ans]).astype(np.int32), seq_id=seq, desc="needle")
            answers.append((cap.result().take(np.arange(len(prompt) - 1, len(prompt) - 1 + len(ans))), at - lo))
        copy, read = np.zeros((len(snap.keys), n_head_kv)), np.zeros((len(snap.keys), n_head_kv))
        for li in range(len(snap.keys)):
            for h in range(n_head_kv):
                copy[li, h] = copy_score(problem(li, h, 1, rep), rep_anchors, n_rep)
                mass = []
                for q, at in answers:
                    A = _attention(problem(li, h, 1, q))[0][:, at].sum(axis=1).reshape(n_rep, -1)
                    mass.append(A.mean(axis=1).max())
                read[li, h] = np.mean(mass)
        copy_tab.append(copy)
        read_tab.append(read)
        # compactions, with the grid's query sampling and hold-out
        qs = doc.queries(base.queries)
        train = Compactor(base, max_queries_per_head=cfg.max_queries, holdout=0.1, seed=cfg.seed)._split(
            qs, n_head_kv)[0]
        facts = base.fact_ranks(s.token_texts(doc.layout.length))
        for name, kw in variants.items():
            sel = base.selector if name == DEFAULT_METHOD else ByCopyHead(
                **{f.name: getattr(base.selector, f.name) for f in fields(SharedSpans)},
                anchors=np.tile(train.anchors, n_rep), n_rep=n_rep, **kw)
            method = replace(base, selector=sel, name=name)
            for r in ratios:
                doc.restore()
                cache, _ = Compactor(method, ratio=r, seed=cfg.seed).compact(snap, lo, hi, train, facts=facts)
                s.inject(cache, snap)
                res, _ = ev._score_niah(s, hay, cont, ref_lp)
                got = results.setdefault((name, r), {"hits": 0, "kl": []})
                got["hits"] += sum(res["hits"])
                got["kl"].append(res["kl"])
                print(f"story {si} {r}x {name}: {sum(res['hits'])} needles, KL {res['kl']:.3f}", flush=True)
        doc.close()

    copy, read = np.mean(copy_tab, axis=0), np.mean(read_tab, axis=0)
    n_copy = int((copy >= COPY).sum())
    order = np.argsort(-read.ravel())
    from scipy.stats import spearmanr

    rho = spearmanr(copy.ravel(), read.ravel()).statistic
    top_read = order[:n_copy]
    lines = [
        "# Copy heads: where the needles are read, and facts by head",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/copy_heads.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        f"SmolLM2-135M-Instruct Q4_1 ({len(snap.keys)} layers x {n_head_kv} KV heads); SQuALITY dev stories "
        f"{stories} cut to 3,000 tokens, {cfg.needles} needles each (the grid's seeds); compactions fitted on "
        f"repeat + self-study queries, at most {cfg.max_queries} per KV head (the grid's sampling and 10 % "
        f"hold-out); exact match of the 7-digit number; next-token KL over the next {cfg.continuation_tokens} "
        f"story tokens. The full cache finds {full} of {cfg.needles * len(stories)}.",
        "",
        "## Which heads read a needle",
        "",
        f"Copy score (repeat-prefill, known at compaction time) against needle read (the oracle), mean over "
        f"the stories. Spearman correlation over the {copy.size} heads: {rho:.2f}. {n_copy} heads have a copy "
        f"score >= {COPY}; of the {n_copy} heads that read the needles most, {len(set(top_read) & set(np.flatnonzero(copy.ravel() >= COPY)))} "
        "are among them.",
        "",
        "| head (layer.KV head) | copy score | needle read |",
        "|---|---|---|",
    ]
    shown = list(dict.fromkeys(list(order[:12]) + list(np.argsort(-copy.ravel())[:n_copy])))
    for k in sorted(shown, key=lambda k: -read.ravel()[k]):
        lines.append(f"| {k // n_head_kv}.{k % n_head_kv} | {copy.ravel()[k]:.3f} | {read.ravel()[k]:.3f} |")
    lines += ["", "## Facts by head", "",
              "| selection | " + " | ".join(f"{r}x needles" for r in ratios) + " | "
              + " | ".join(f"{r}x KL" for r in ratios) + " |",
              "|---|" + "---|" * (2 * len(ratios))]
    for name in variants:
        cells = [results[(name, r)] for r in ratios]
        lines.append(f"| {name} | " + " | ".join(f"{c['hits']} of {cfg.needles * len(stories)}" for c in cells)
                     + " | " + " | ".join(f"{np.mean(c['kl']):.3f}" for c in cells) + " |")
    write_report("copy_heads", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
