"""Compute a model's nonuniform head budgets once, from calibration documents.

For each calibration document (SQuALITY training stories, cut to ``--tokens``): ingest it,
capture context-prefill and repeat-prefill queries, and measure for every (layer, KV head) its
held-out attention-output error when that head keeps 2/5/10/20/40 % of the document's keys
(AM-HighestAttnKeys).  The curves are averaged over documents and the spec's ratio-agnostic swap
solver turns them into proportions (targets 50x, 20x, 10x, 5x), written as
``{"L{layer}H{kv_head}": proportion}`` for ``--budgets <file>`` / JsonBudget.

    python -m models.head_budgets -m MODEL.gguf -o kvlocal/data/budgets/NAME.json [--docs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GRID = (0.02, 0.05, 0.1, 0.2, 0.4)
TARGETS = (0.02, 0.05, 0.1, 0.2)


def calibration_texts(n: int) -> list[str]:
    path = ROOT.parent / "shared" / "data" / "squality-train.jsonl"
    with open(path) as fh:
        return [json.loads(line)["document"] for _, line in zip(range(n), fh, strict=False)]


def main(argv: list[str] | None = None) -> int:
    from kvlocal.engine import binding
    from kvlocal.am import Compactor, swap_allocation
    from kvlocal.am.budgets import to_json
    from kvlocal.engine.queries import collect_queries
    from kvlocal.engine.session import Session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args(argv)

    model = binding.Model(args.model)
    t0 = time.perf_counter()
    curves = []
    for i, story in enumerate(calibration_texts(args.docs)):
        text = model.detokenize(model.tokenize(story, add_special=False)[: args.tokens])
        with Session(model, n_ctx=2 * args.tokens + 512, capture=True) as s:
            layout = s.ingest_document(text, capture_queries=True)
            queries = collect_queries(s, layout, ["context", "repeat"])
            snap, info = s.snapshot(), s.info
        c = Compactor(holdout=0.2, max_queries_per_head=4096, seed=i).head_curves(
            snap, layout.doc_start, layout.doc_end, queries, "am-highest", GRID)
        curves.append(c)
        print(f"document {i + 1}: {layout.n_doc} tokens, curves measured ({time.perf_counter() - t0:.0f} s)", flush=True)
    mean = np.mean(curves, axis=0)  # [n_layers, n_head_kv, G]
    p = swap_allocation(mean.reshape(-1, len(GRID)), np.asarray(GRID), TARGETS).reshape(mean.shape[:2])
    table = to_json(p, info.base_layers)
    table["_meta"] = {"model": Path(args.model).name, "method": "am-highest held-out output error, swap solver",
                      "grid": GRID, "targets": TARGETS, "documents": args.docs, "tokens": args.tokens,
                      "max_over_uniform": float(p.max() * p.size), "min_over_uniform": float(p.min() * p.size),
                      "first_half_share": float(p[: len(p) // 2].sum())}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps(table["_meta"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
