"""What a question after the document attends to: ways to fit it better, on held-out articles.

A question (or the next turn) comes after the document.  The default fits each head on repeat +
self-study queries, drawn alike from every row: about 3,000 repeat rows (the document read again)
and 700-900 self-study rows (the model's own questions and answers after it), so a fifth of the
fit is about what is asked after the document.  Two variants, each a named method:

  am-facts-omp-recent    a tenth of each head's budget on the region's last keys, which every
                         eviction baseline keeps (SharedSpans.recent; after the facts, before OMP)
  am-facts-omp-balanced  half of the fit's query rows from the queries asked after the document
                         (QuerySet.subsample's ``after``), the rest from the repeat rows; the
                         Attention Matching paper's own mix is about 5k self-study and 7k repeat
                         query tokens per QuALITY context (spec §2.2)

Both are am-facts-omp-half otherwise.  Beside them am-facts-omp-cores (every number's and rare name's
core before the rest of any sentence) on both query mixes: am-facts-omp-cores-balanced is
am-facts-omp-balanced with cores first, and am-facts-omp-cores-loose is that with its fitted values
anchored a tenth as hard to the kept keys' own.  Compared side by side with the eviction baselines:

  grid      the evaluation grid's QuALITY articles (8, 1, 2) and number-needle stories (0, 1)
  held-out  three other QuALITY articles (0, 7, 5; cut at a sentence end like the grid's, so that
            repeat-prefill fits the context), retention only, and the number needles of
            facts_heldout.py (stories 5 and 9, needle seed 7); nothing was tuned on these; and a
            second set of three (3, 4, 6), run after the first set had been read, for the rows a
            default was chosen among

    python bench/after_document.py [--cache DIR] [--heldout-cache DIR] [-m MODEL.gguf --out NAME]
                                   [--rows METHOD,...] [--parts grid,held-out,second,needles]

Cells are cached like the grid's (``kvlocal eval --cache``); the held-out needles use
facts_heldout.py's cache.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from common import grid_tables, machine, write_report

OWN = ("repeat", "self-study")
ROWS = (  # (method, queries, what it is)
    ("am-facts-omp-half", OWN, "the default before am-facts-omp-balanced: query rows drawn alike from every row"),
    ("am-facts-omp-recent", OWN, "a tenth of each head's budget on the region's last keys"),
    ("am-facts-omp-balanced", OWN, "the default before am-facts-omp-cores-balanced: half of the query rows from the "
                                   "queries asked after the document"),
    ("am-facts-omp-cores", OWN, "names' cores before numbers' sentence tails, query rows drawn alike"),
    ("am-facts-omp-cores-balanced", OWN, "the default before am-facts-omp-cores-loose: am-facts-omp-cores on "
                                         "am-facts-omp-balanced's query rows"),
    ("am-facts-omp-cores-loose", OWN, "the default: am-facts-omp-cores-balanced with the fitted values anchored a "
                                      "tenth as hard to the kept keys' own"),
    ("truncate", (), "baseline"),
    ("h2o", ("context",), "baseline"),
    ("snapkv", ("self-study",), "baseline"),
)
NEEDLE_ROWS = ("am-facts-omp-half", "am-facts-omp-balanced", "am-facts-omp-cores", "am-facts-omp-cores-balanced",
               "am-facts-omp-cores-loose", "truncate", "h2o", "snapkv")
RATIOS, HELD_OUT_RATIOS = (5, 10, 20, 50), (5, 10, 20)
GRID_ARTICLES, HELD_OUT_ARTICLES = (8, 1, 2), (0, 7, 5)
# a second held-out set, run after the first had been read (the next unused articles in index order), for
# the rows a default was chosen among
SECOND_ARTICLES = (3, 4, 6)
SECOND_ROWS = ("am-facts-omp-half", "am-facts-omp-balanced", "am-facts-omp-cores-balanced", "am-facts-omp-cores-loose",
               "truncate", "h2o", "snapkv")
HELD_OUT_STORIES, HELD_OUT_SEED = (5, 9), 7  # facts_heldout.py's haystacks
PARTS = ("grid", "held-out", "second", "needles")  # the grid, the two held-out article sets, the held-out needles
METRICS = (("R", "retention R", "{:.3f}"), ("niah", "number needles (of 16)", None),
           ("kl", "next-token KL", "{:.3f}"), ("top1", "next-token top-1", "{:.3f}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval"))
    ap.add_argument("--heldout-cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval-heldout"))
    ap.add_argument("-m", "--model", default=None, help="a GGUF (default: SmolLM2-135M-Instruct, installed if needed)")
    ap.add_argument("--out", default="after_document", help="the report's name in bench/results")
    ap.add_argument("--rows", default=None, help="comma-separated methods of the rows to run (default: every row)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts to run and report (default: all of {', '.join(PARTS)})")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS) or "grid" not in parts:
        ap.error(f"parts are among {', '.join(PARTS)} and include grid, not {args.parts!r}")
    table = ROWS if args.rows is None else tuple(r for r in ROWS if r[0] in args.rows.split(","))
    unknown = set(args.rows.split(",")) - {r[0] for r in ROWS} if args.rows else set()
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(r[0] for r in ROWS)}")

    from kvlocal.engine import binding
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from kvlocal.evaluation.report import collect, label
    from models.smollm2 import ensure as ensure_model

    t0 = time.perf_counter()
    model = binding.Model(args.model or str(ensure_model()))
    rows = [(label(m, q), what) for m, q, what in table]
    grid = replace(EvalConfig(), methods=tuple((m, q) for m, q, _ in table), ratios=RATIOS, articles=GRID_ARTICLES)
    held = replace(grid, ratios=HELD_OUT_RATIOS, articles=HELD_OUT_ARTICLES)
    needles = replace(held, methods=tuple((m, q) for m, q, _ in table if m in NEEDLE_ROWS),
                      haystack_stories=HELD_OUT_STORIES, seed=HELD_OUT_SEED)
    ev = Evaluator(model, grid, args.cache, progress=False)
    ev.run(("quality", "niah"))
    got = collect(ev)
    second = replace(held, methods=tuple((m, q) for m, q, _ in table if m in SECOND_ROWS), articles=SECOND_ARTICLES)
    got_held = got_second = got_needles = None
    if "held-out" in parts:
        ev = Evaluator(model, held, args.cache, progress=False)
        ev.run(("quality",))
        got_held = collect(ev)
    if "second" in parts:
        ev = Evaluator(model, second, args.cache, progress=False)
        ev.run(("quality",))
        got_second = collect(ev)
    if "needles" in parts:
        ev = Evaluator(model, needles, args.heldout_cache, progress=False)
        ev.run(("niah",))
        got_needles = collect(ev)
    shown = GRID_ARTICLES + (HELD_OUT_ARTICLES if "held-out" in parts else ())
    per_article = {a: collect(Evaluator(model, replace(grid, articles=(a,)), args.cache, progress=False))["rows"]
                   for a in shown}
    n_needles = grid.needles * len(grid.haystack_stories)
    cache = Evaluator(model, grid, args.cache, progress=False).cache  # the articles' lengths, as the grid cut them
    docs = {a: cache.get(f"quality{a}", "doc")
            for a in shown + (SECOND_ARTICLES if "second" in parts else ())}
    lengths = ", ".join(f"{a}: {d['doc_tokens']:,}{' (cut)' if d['cut'] else ''}" for a, d in docs.items())

    lines = [
        "# What a question after the document attends to",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/after_document.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t0:.0f} s (cells already in the cache are not recomputed).",
        "",
        f"{model.path.stem}, the evaluation grid's scoring (`kvlocal eval`): retention R on QuALITY "
        "articles (8 questions each, the model's own greedy answers with the full cache as references; "
        "articles too long for repeat-prefill to fit the model's training context are cut at a sentence end; "
        f"document tokens {lengths}), "
        "number needles (exact match of 7 digits) and next-token KL / top-1 over the next 96 tokens on "
        "SQuALITY dev stories cut to 3,000 tokens with 8 needles each (the full cache finds "
        f"{round(got['refs']['full']['niah'] * n_needles)} of {n_needles} on the grid's stories 0 and 1"
        + ("" if got_needles is None else f", {round(got_needles['refs']['full']['niah'] * n_needles)} of "
           f"{n_needles} on the held-out stories {HELD_OUT_STORIES[0]} and {HELD_OUT_STORIES[1]}")
        + "). AM rows fitted on repeat + self-study queries, at most "
        "4,096 per KV head, 10 % held out; every row keeps the same number of keys per head (the recent keys "
        "are part of it)." + ("" if parts == set(PARTS) else
                              f" Parts run: {', '.join(p for p in PARTS if p in parts)} (of {', '.join(PARTS)})."),
        "",
        f"Grid: QuALITY articles {', '.join(map(str, GRID_ARTICLES))} and needle stories 0 and 1 (the tables "
        "without 'held out').",
        "",
    ]
    lines += grid_tables(rows, got["rows"], RATIOS, METRICS, n_needles)
    articles = ", ".join(map(str, HELD_OUT_ARTICLES))
    stories = f"stories {HELD_OUT_STORIES[0]} and {HELD_OUT_STORIES[1]}, needle seed {HELD_OUT_SEED}"
    if got_held is not None:
        lines += grid_tables(rows, got_held["rows"], HELD_OUT_RATIOS,
                             (("R", f"Held out: retention R, QuALITY articles {articles}", "{:.3f}"),), legend=False)
    if got_second is not None:
        second_rows = [r for r, (m, _, _) in zip(rows, table, strict=True) if m in SECOND_ROWS]
        lines += grid_tables(second_rows, got_second["rows"], HELD_OUT_RATIOS,
                             (("R", "Held out, a second set (run after the first was read): retention R, QuALITY "
                               "articles " + ", ".join(map(str, SECOND_ARTICLES)), "{:.3f}"),), legend=False)
    if got_needles is not None:
        needle_rows = [r for r, (m, _, _) in zip(rows, table, strict=True) if m in NEEDLE_ROWS]
        lines += grid_tables(needle_rows, got_needles["rows"], HELD_OUT_RATIOS,
                             (("niah", f"Held out: number needles (of {n_needles}), {stories}", None),
                              ("kl", f"Held out: next-token KL, {stories}", "{:.3f}")), n_needles, legend=False)
    lines += ["", "## Retention R per article at 10x", "",
              "| row | " + " | ".join(f"article {a}" for a in per_article) + " |", "|---|" + "---|" * len(per_article)]
    for name, _ in rows:
        cells = [per_article[a].get((name, 10), {}).get("R") for a in per_article]
        lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |")
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
