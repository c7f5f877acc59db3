"""Cores first (am-facts-omp-cores): every fact's core (a number or a rare name with its 3
nearest tokens) before the far end of any sentence, against am-facts-omp-half (the default then: every
number and its sentence before any name), on the grid's QuALITY retention with the eviction
baselines in the same run.  The needles (names and numbers) of the same two methods are in
name_needles.py's report ``fact_cores_needles``.

    python bench/fact_cores.py [--cache DIR] [--rows am-facts-omp-cores,...]

Cells are cached like the grid's (``kvlocal eval --cache``; the default is the grid's own).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from common import grid_tables, machine, write_report

HALF = "am-facts-omp-half"
OWN = ("repeat", "self-study")
ROWS = {  # name: (queries, what it is)
    HALF: (OWN, "the default: numbers and their sentences first, then rare names"),
    "am-facts-omp-cores": (OWN, "cores first: numbers' cores, names' cores, numbers' sentences, names' sentences"),
    "truncate": ((), "baseline"),
    "h2o": (("context",), "baseline"),
    "snapkv": (("self-study",), "baseline"),
}
RATIOS = (5, 10, 20, 50)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval"))
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    args = ap.parse_args()
    rows = args.rows.split(",")
    if any(r not in ROWS for r in rows):
        ap.error(f"rows must come from {', '.join(ROWS)}")

    from kvlocal.engine import binding
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from kvlocal.evaluation.report import collect, label
    from models.smollm2 import ensure as ensure_model

    t0 = time.perf_counter()
    model = binding.Model(str(ensure_model()))
    grid = EvalConfig()
    ev = Evaluator(model, replace(grid, methods=tuple((m, ROWS[m][0]) for m in rows), ratios=RATIOS), args.cache,
                   progress=False)
    ev.run(("quality",))
    res = collect(ev)
    lines = [
        "# Cores first: retention",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/fact_cores.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t0:.0f} s (cells already in the cache are not recomputed).",
        "",
        "SmolLM2-135M-Instruct Q4_1; the evaluation grid's QuALITY part (`kvlocal eval`): retention R on 3 "
        "QuALITY articles (2,957-3,394 tokens, 8 questions each, the model's own greedy answers with the full "
        "cache as references). AM rows fitted on their queries, at most 4,096 per KV head, 10 % held out. "
        "Needles for the same rows: `fact_cores_needles.md`.",
        "",
    ]
    lines += grid_tables([(label(m, ROWS[m][0]), ROWS[m][1]) for m in rows], res["rows"], RATIOS,
                         (("R", "Retention R", "{:.3f}"),))
    write_report("fact_cores", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
