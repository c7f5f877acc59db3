"""Why compacted caches lose the needles: key selection vs value refitting, side by side.

The evaluation grid (`kvlocal eval`) finds every method at or near 0 needles on SmolLM2 while the
full cache finds 10 of 16.  This bench separates the two suspects on the same haystacks (the
grid's: SQuALITY dev stories 0 and 1 cut to 3,000 tokens, 8 needles each, seeds 0 and 1), with
repeat-prefill queries, all of them (no subsampling):

  am-highest          the method as shipped (rms attention selection, NNLS beta, LS values)
  kvzip-uniform       max attention selection, original values, no beta
  random              a seeded random subset, original values, no beta
  needles kept + AM   oracle: every needle sentence token forced into every head's selection,
                      the rest by rms attention; NNLS beta and LS values as in am-highest
  needles kept        the same oracle selection with the original values and no beta

and reports, for am-highest, the share of (layer, KV head) pairs that keep each needle's
number tokens.  Diagnostic only: the oracle knows where the needles are.

    python bench/niah_diagnosis.py [--ratios 2,5,10]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from common import RESULTS, machine, write_report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="2,5,10")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    ratios = [float(x) for x in args.ratios.split(",")]

    from kvlocal.am import BoxNNLS, Compactor, DirectValues, HighestAttnKeys, LeastSquaresValues, ZeroBeta
    from kvlocal.am.methods import Method
    from kvlocal.am.select import KeySelector, Selection, top_t
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.data import make_haystack, squality_stories
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from models.smollm2 import ensure as ensure_model

    @dataclass
    class NeedlesFirst(KeySelector):
        """rms attention scores, with the given original positions always kept (the oracle)."""

        forced: np.ndarray

        def select(self, p):
            score = HighestAttnKeys("rms").scores(p).copy()
            score[np.isin(p.positions, self.forced)] = np.inf
            return Selection(top_t(score, p.t))

    cfg = EvalConfig()
    ev = Evaluator(str(ensure_model()), cfg, "/tmp/kvlocal-niah-diagnosis", progress=False, threads=args.threads)
    model = ev.model
    stories = squality_stories()
    hits: dict[tuple[str, float], int] = {}
    full_hits, n_needles, coverage = 0, 0, {}
    t_start = time.perf_counter()
    for si in cfg.haystack_stories:
        hay = make_haystack(stories[si], 3000, lambda t: len(model.tokenize(t, add_special=False)),
                            k=cfg.needles, seed=cfg.seed * 1000 + si)
        doc = ev._open(hay.text)
        s = doc.session
        sentence_pos, number_pos = _needle_positions(model, s.tokens, hay.needles)
        queries = doc.queries(("repeat",))
        s.restore(doc.blob)
        full_hits += sum(tasks.needle_found(s, k, n) for k, n in hay.needles)
        n_needles += len(hay.needles)
        variants = {
            "am-highest": "am-highest",
            "kvzip-uniform": "kvzip-uniform",
            "random": "random",
            "needles kept + AM": Method(NeedlesFirst(sentence_pos), BoxNNLS(), LeastSquaresValues()),
            "needles kept": Method(NeedlesFirst(sentence_pos), ZeroBeta(), DirectValues()),
        }
        for r in ratios:
            for name, method in variants.items():
                s.restore(doc.blob)
                cache, _ = Compactor(method, ratio=r, max_queries_per_head=None, holdout=0.0, seed=cfg.seed).compact(
                    doc.snapshot, doc.layout.doc_start, doc.layout.doc_end, queries)
                s.inject(cache, doc.snapshot)
                hits[(name, r)] = hits.get((name, r), 0) + sum(tasks.needle_found(s, k, n) for k, n in hay.needles)
                if name == "am-highest":
                    kept = [np.mean([np.isin(ps, org[:, h]).mean() for org in cache.origin
                                     for h in range(org.shape[1])]) for ps in number_pos]
                    coverage.setdefault(r, []).extend(kept)
                print(f"story {si} {r:g}x {name}: {hits[(name, r)]}", flush=True)
        s.close()

    names = list(dict.fromkeys(n for n, _ in hits))
    lines = [
        "# Needles: key selection vs value refitting",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/niah_diagnosis.py` on {machine(args.threads)}; "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        f"SmolLM2-135M-Instruct Q4_1; the evaluation grid's haystacks (SQuALITY dev stories "
        f"{list(cfg.haystack_stories)} cut to 3,000 tokens, {cfg.needles} needles each); repeat-prefill queries, all "
        "of them (no subsampling); uniform budgets. Needles found (exact 7-digit match) out of "
        f"{n_needles}; the full cache finds {full_hits}.",
        "",
        "| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    lines += [f"| {n} | " + " | ".join(str(hits[(n, r)]) for r in ratios) + " |" for n in names]
    lines += ["", "Share of (layer, KV head) pairs whose am-highest selection keeps a needle's number tokens "
              "(mean over needles and digits; the selection keeps 1/ratio of the keys):", "",
              "| ratio | kept share | share of keys kept |", "|---|---|---|"]
    lines += [f"| {r:g}x | {np.mean(coverage[r]):.2f} | {1 / r:.2f} |" for r in ratios]
    write_report("niah_diagnosis", lines)
    (RESULTS / "niah_diagnosis.json").write_text(json.dumps(
        {"full": full_hits, "needles": n_needles, "hits": {f"{n}@{r:g}": v for (n, r), v in hits.items()},
         "coverage": {f"{r:g}": float(np.mean(v)) for r, v in coverage.items()}}, indent=1))
    return 0


def _needle_positions(model, tokens, needles) -> tuple[np.ndarray, list[np.ndarray]]:
    """Positions of every needle sentence's tokens, and of each needle's number tokens."""
    toks = list(tokens)
    text_upto = [0]
    pieces = [model.detokenize([t]) for t in toks]
    for p in pieces:
        text_upto.append(text_upto[-1] + len(p))
    text = "".join(pieces)
    sentence, numbers = [], []
    for key, number in needles:
        sent = f"The special magic number for {key} is {number}."
        a = text.index(sent)
        b, na = a + len(sent), text.index(number, a)
        span = [i for i in range(len(toks)) if text_upto[i + 1] > a and text_upto[i] < b]
        num = [i for i in range(len(toks)) if text_upto[i + 1] > na and text_upto[i] < na + len(number)]
        sentence += span
        numbers.append(np.asarray(num))
    return np.asarray(sorted(sentence)), numbers


if __name__ == "__main__":
    raise SystemExit(main())
