"""Which tokens of a name needle the default keeps, and in how many heads.

A name needle ("The keeper of the lantern is Iris Ivers.") is answered from the name and the
words that tie it to the question ("lantern").  For each needle of the name-needle haystacks
(bench/name_needles.py's, the grid's stories 0 and 1), this bench compacts with one method and
reports, per token of the needle's sentence, the share of (layer, KV head) pairs that keep it,
with whether the full cache and the compacted cache find the name.

    python bench/name_diagnosis.py [--method NAME] [--stories 0,1] [--ratios 5,10]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import machine, write_report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="am-facts-omp-cores-balanced")
    ap.add_argument("--stories", default="0,1")
    ap.add_argument("--ratios", default="5,10")
    ap.add_argument("--out", default="name_diagnosis")
    args = ap.parse_args()

    from kvlocal.am import Compactor
    from kvlocal.am.methods import get_method
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.data import squality_stories
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from models.smollm2 import ensure as ensure_model

    t0 = time.perf_counter()
    cfg = EvalConfig()
    ev = Evaluator(str(ensure_model()), cfg, "/tmp/kvlocal-name-needles", progress=False)
    method = get_method(args.method)
    texts = squality_stories()
    ratios = [int(r) for r in args.ratios.split(",")]
    sections, summary = [], {}
    for si in (int(s) for s in args.stories.split(",")):
        hay, _ = ev.haystack(texts[si], si, 3000, "name")
        doc = ev._open(hay.text)
        s, snap, lo, hi = doc.session, doc.snapshot, doc.layout.doc_start, doc.layout.doc_end
        n_head_kv = snap.keys[0].shape[1]
        pieces = s.token_texts(doc.layout.length)
        text = "".join(pieces)
        offsets = np.cumsum([0] + [len(p) for p in pieces])
        qs = doc.queries(method.queries)
        train = Compactor(method, max_queries_per_head=cfg.max_queries, holdout=0.1, seed=cfg.seed)._split(
            qs, n_head_kv)[0]
        ranks = method.fact_ranks(pieces)
        full = [bool(tasks.needle_found(s, key, name, kind="name")) for key, name in hay.needles]
        spans = []  # per needle: its sentence's tokens and which of them are the key noun and the name
        for key, name in hay.needles:
            a = text.index(f"The keeper of the {key} is {name}.")
            b = a + len(f"The keeper of the {key} is {name}.")
            first, last = np.searchsorted(offsets, a, side="right") - 1, np.searchsorted(offsets, b, side="left")
            toks = np.arange(first, last)
            k0 = text.index(key, a)
            n0 = text.index(name, a)
            over = lambda c0, c1: (offsets[toks] < c1) & (offsets[toks + 1] > c0)  # noqa: E731
            spans.append((toks, over(k0, k0 + len(key)), over(n0, n0 + len(name))))
        for r in ratios:
            doc.restore()
            cache, _ = Compactor(method, ratio=r, seed=cfg.seed).compact(snap, lo, hi, train, facts=ranks)
            s.inject(cache, snap)
            got = [bool(tasks.needle_found(s, key, name, kind="name")) for key, name in hay.needles]
            kept = np.zeros(len(pieces))
            for origin in cache.origin:
                for h in range(origin.shape[1]):
                    p = origin[:, h]
                    kept[p[p >= 0]] += 1
            kept /= len(cache.origin) * n_head_kv
            sections += [f"## Story {si}, {r}x", "",
                         "| needle | full cache | compacted | key noun kept | name kept (mean) | the sentence: token (share kept / fact rank) |",
                         "|---|---|---|---|---|---|"]
            for (key, name), f, g, (toks, noun, nm) in zip(hay.needles, full, got, spans, strict=True):
                cells = " ".join(f"`{pieces[i].strip() or repr(pieces[i])}` {kept[i]:.2f}/{ranks[i]}" for i in toks)
                sections.append(f"| {key}: {name} | {'found' if f else '-'} | {'found' if g else '-'} | "
                                f"{kept[toks[noun]].mean():.2f} | {kept[toks[nm]].mean():.2f} | {cells} |")
                row = summary.setdefault(r, {"found": 0, "full": 0, "noun": [], "name": []})
                row["found"] += g
                row["full"] += f
                row["noun"].append(kept[toks[noun]].mean())
                row["name"].append(kept[toks[nm]].mean())
            sections.append("")
        doc.close()

    lines = [
        "# Which tokens of a name needle are kept",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/name_diagnosis.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t0:.0f} s.",
        "",
        f"SmolLM2-135M-Instruct Q4_1; `{method.name}` fitted on its queries ({' + '.join(method.queries)}, at most "
        f"{cfg.max_queries} per KV head, 10 % held out), bench/name_needles.py's name-needle haystacks (SQuALITY dev "
        f"stories {args.stories} cut to 3,000 tokens, 8 needles each). Kept: the share of (layer, KV head) pairs "
        "whose compacted cache holds the token (verbatim or as a fitted key); fact rank: 127 a rare name's token, one "
        "less per token of distance from it in its sentence (124-126: the 3 nearest, the name's core, kept "
        "before any sentence's tail; `kvlocal.am.facts.fact_ranks`, `kvlocal.am.spans.core_tiers`).",
        "",
        "| ratio | names found (full cache) | key noun kept, mean | name kept, mean |",
        "|---|---|---|---|",
    ]
    for r, row in summary.items():
        lines.append(f"| {r}x | {row['found']} ({row['full']}) | {np.mean(row['noun']):.2f} | "
                     f"{np.mean(row['name']):.2f} |")
    lines += [""] + sections
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
