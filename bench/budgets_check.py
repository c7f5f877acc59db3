"""Do SmolLM2's computed head budgets beat uniform budgets?  Held-out attention error, one run.

SmolLM2-135M-Instruct, SQuALITY dev story 3 cut to 2048 tokens (not one of the calibration
stories), context-prefill + repeat-prefill queries (4096 per KV head, 20 % of the query tokens
held out), AM-HighestAttnKeys at 10x and 20x, uniform vs kvlocal/data/budgets/SmolLM2-135M-Instruct.json.

    python bench/budgets_check.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from common import ROOT, machine, write_report


def main() -> int:
    from kvlocal.engine import binding
    from kvlocal.am import Compactor, JsonBudget
    from kvlocal.engine.queries import collect_queries
    from kvlocal.engine.session import Session
    from models import smollm2

    model = binding.Model(smollm2.ensure())
    with open(ROOT.parent / "shared" / "data" / "squality-dev.jsonl") as fh:
        story = json.loads(fh.readlines()[2])["document"]
    text = model.detokenize(model.tokenize(story, add_special=False)[:2048])
    with Session(model, n_ctx=5000, capture=True, progress=False) as s:
        layout = s.ingest_document(text, capture_queries=True)
        queries = collect_queries(s, layout, ["context", "repeat"])
        snap = s.snapshot()
    path = ROOT / "kvlocal" / "data" / "budgets" / "SmolLM2-135M-Instruct.json"
    rows = []
    for ratio in (10, 20):
        for name, budgets in (("uniform", "uniform"), ("computed (json)", JsonBudget(path))):
            cache, r = Compactor("am-highest", ratio=ratio, budgets=budgets, holdout=0.2,
                                 max_queries_per_head=4096).compact(snap, layout.doc_start, layout.doc_end, queries)
            rows.append((ratio, name, np.mean([e["output_rel_l2"] for e in r.layer_errors.values()]),
                         np.mean([e["mass_err"] for e in r.layer_errors.values()]), r.padding_fraction, cache.n_cells))
            print(rows[-1], flush=True)
    lines = [
        "# Computed head budgets vs uniform (SmolLM2)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `bench/budgets_check.py` on {machine(os.cpu_count() or 2)}.",
        "",
        f"SmolLM2-135M-Instruct Q4_1; SQuALITY dev story 3, {layout.n_doc} document tokens; context-prefill + "
        "repeat-prefill queries, at most 4096 per KV head, 20 % of the query tokens held out; AM-HighestAttnKeys.",
        "",
        "| ratio | budgets | held-out output rel. L2 | held-out mass error | padding | cells |",
        "|---|---|---|---|---|---|",
    ] + [f"| {r}x | {n} | {e:.3f} | {m:.3f} | {100 * p:.0f} % | {c} |" for r, n, e, m, p, c in rows]
    write_report("budgets_check", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
