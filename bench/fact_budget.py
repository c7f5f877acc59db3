"""How much of each head's budget the facts may take, ratio by ratio: the default before
(am-facts-omp-whole: the whole budget up to 5x, then 5/ratio of it), am-facts-omp-half (the default then,
before am-facts-omp-balanced: half of it up to 10x, then 0.5 sqrt(10/ratio) of it) and three variants measured
beside them, on the evaluation grid (QuALITY retention, number needles, next-token KL and top-1),
with the eviction baselines in the same run.

    python bench/fact_budget.py [--cache DIR]

Cells come from the grid's cache (``kvlocal eval --cache``; the default is the grid's own), so a
rerun after the grid only writes the report.  The variants exist here only:

    x-half-const    half of each head's budget at every ratio (the default's share with no fall-off)
    x-half-floor    half of it up to 10x, then 5/ratio (as the default before), but at least the first
                    whole number with its nearest tokens while that is at most half of the budget
    (+context)      the default with the document's own queries (context-prefill) beside its own
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from common import grid_tables, machine, write_report

WHOLE, HALF = "am-facts-omp-whole", "am-facts-omp-half"
OWN = ("repeat", "self-study")
ROWS = (  # (method, queries, ratios, what it is)
    (WHOLE, OWN, (5, 10, 20, 50), "the default before: facts up to the whole budget to 5x, then 5/ratio of it"),
    (HALF, OWN, (5, 10, 20, 50), "the default: half of the budget to 10x, then 0.5 sqrt(10/ratio)"),
    ("x-half-const", OWN, (20, 50), "half of the budget at every ratio (equal to the default up to 10x)"),
    ("x-half-floor", OWN, (20, 50), "half of the budget to 10x, then 5/ratio, at least one whole number "
                                    "(equal to the default up to 10x)"),
    (HALF, (*OWN, "context"), (5, 10), "the default with context-prefill queries beside its own"),
    ("truncate", (), (5, 10, 20, 50), "baseline"),
    ("h2o", ("context",), (5, 10, 20, 50), "baseline"),
    ("snapkv", ("self-study",), (5, 10, 20, 50), "baseline"),
)
RATIOS = (5, 10, 20, 50)
METRICS = (("R", "retention R", "{:.3f}"), ("niah", "needles (of 16)", None), ("kl", "next-token KL", "{:.3f}"),
           ("top1", "next-token top-1", "{:.3f}"))


def register_variants() -> None:
    from kvlocal.am.methods import METHODS, get_method

    def variant(name, **changes):
        def make():
            m = get_method(HALF)
            return replace(m, selector=replace(m.selector, **changes), name=name)

        if name not in METHODS.names():
            METHODS.register(name)(make)

    variant("x-half-const", fact_until=None)
    variant("x-half-floor", fact_falloff=1.0, fact_one_whole=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval"))
    args = ap.parse_args()

    from kvlocal.engine import binding
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from kvlocal.evaluation.report import collect, label
    from models.smollm2 import ensure as ensure_model

    register_variants()
    t0 = time.perf_counter()
    model = binding.Model(str(ensure_model()))
    grid = EvalConfig()
    n_needles = grid.needles * len(grid.haystack_stories)
    got = {}
    for method, queries, ratios, _ in ROWS:  # one evaluator per row: the rows run at different ratios
        ev = Evaluator(model, replace(grid, methods=((method, queries),), ratios=ratios), args.cache, progress=False)
        ev.run(("quality", "niah"))
        res = collect(ev)
        for (_, ratio), row in res["rows"].items():
            got[(label(method, queries), ratio)] = row
    full = res["refs"]["full"]["niah"]  # the same documents in every row
    lines = [
        "# The facts' share of each head's budget",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/fact_budget.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t0:.0f} s (cells cached by the evaluation grid are not recomputed).",
        "",
        "SmolLM2-135M-Instruct Q4_1; the evaluation grid's documents and scoring (`kvlocal eval`): retention R "
        "on 3 QuALITY articles (~3,000 tokens, 8 questions each), number needles and next-token KL / top-1 "
        "on SQuALITY dev stories 0 and 1 cut to 3,000 tokens with 8 needles each "
        f"(the full cache finds {round(full * n_needles)} of {n_needles}). AM rows fitted on their queries, "
        "at most 4,096 per KV head, 10 % held out.",
        "",
    ]
    lines += grid_tables([(label(m, q), what) for m, q, _, what in ROWS], got, RATIOS, METRICS, n_needles)
    write_report("fact_budget", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
