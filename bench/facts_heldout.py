"""Needles on haystacks the method was not developed on: other stories, other needle seeds.

am-facts, am-facts-omp and the defaults built on them (am-facts-omp-near, -names, -whole, -half)
were developed on the evaluation grid's haystacks (SQuALITY dev stories 0 and 1, seeds 0 and 1).
This bench builds 3,000-token haystacks from dev stories 5 and 9 with needle seed 7 and compares
them against am-highest, truncate and SnapKV at 5x, 10x and 20x (and the two newest defaults,
truncate and SnapKV at 50x), through the same harness (cells cached under --cache, so a rerun only
writes the report).

    python bench/facts_heldout.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import time

from common import machine, write_report

METHODS = (("am-facts-omp-half", ("repeat", "self-study")), ("am-facts-omp-whole", ("repeat", "self-study")),
           ("am-facts-omp-near", ("repeat", "self-study")), ("am-facts-omp-names", ("repeat", "self-study")),
           ("am-facts-omp", ("repeat", "self-study")),
           ("am-facts", ("repeat",)), ("am-highest", ("repeat",)),
           ("truncate", ()), ("snapkv", ("self-study",)))
STORIES, SEED, RATIOS = (5, 9), 7, (5, 10, 20)
FAR, FAR_METHODS = 50, ("am-facts-omp-half", "am-facts-omp-whole", "truncate", "snapkv")  # 50x: these rows only


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/kvlocal/eval-heldout"))
    args = ap.parse_args()

    from kvlocal.evaluation.harness import EvalConfig, Evaluator, cell_id
    from models.smollm2 import ensure as ensure_model

    cfg = EvalConfig(methods=METHODS, ratios=RATIOS, haystack_stories=STORIES, seed=SEED)
    t0 = time.perf_counter()
    ev = Evaluator(str(ensure_model()), cfg, args.cache, progress=False)
    ev.run(("niah",))
    far = [(m, q) for m, q in METHODS if m in FAR_METHODS]
    Evaluator(ev.model, EvalConfig(methods=far, ratios=(FAR,), haystack_stories=STORIES, seed=SEED), args.cache,
              progress=False).run(("niah",))
    keys = [f"niah{s}-{cfg.haystack_tokens[0]}" for s in STORIES]
    full = [sum(ev.cache.get(k, "full")["hits"]) for k in keys]
    n = cfg.needles * len(keys)
    lines = [
        "# Needles on held-out haystacks",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/facts_heldout.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t0:.0f} s (cached cells are not recomputed).",
        "",
        f"SmolLM2-135M-Instruct Q4_1; SQuALITY dev stories {list(STORIES)} cut to 3,000 tokens with "
        f"{cfg.needles} needles each (needle seed {SEED}: other numbers, keys and depths than the grid's); "
        "at most 4,096 queries per KV head; exact match of the 7-digit number. "
        f"The full cache finds {sum(full)} of {n} ({' + '.join(map(str, full))}).",
        "",
        "| method | " + " | ".join(f"{r}x needles (per story)" for r in (*RATIOS, FAR)) + " | "
        + " | ".join(f"{r}x next-token KL" for r in (*RATIOS, FAR)) + " |",
        "|---|" + "---|" * (2 * len(RATIOS) + 2),
    ]
    for method, queries in METHODS:
        cells = [[ev.cache.get(k, cell_id(method, queries, r)) for k in keys] for r in (*RATIOS, FAR)]
        hits = [f"{sum(sum(c['hits']) for c in cs)} ({' + '.join(str(sum(c['hits'])) for c in cs)})"
                if None not in cs else "–" for cs in cells]
        kl = [f"{sum(c['kl'] for c in cs) / len(cs):.3f}" if None not in cs else "–" for cs in cells]
        lines.append(f"| {method} ({'+'.join(queries) or 'none'}) | " + " | ".join(hits + kl) + " |")
    lines += ["", f"{FAR}x: only {', '.join(FAR_METHODS)}."]
    write_report("facts_heldout", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
