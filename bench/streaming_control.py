"""Why does a streamed compaction lose more of a long document's first third than a one-shot one?

One SQuALITY dev story cut to 7,000 tokens with 12 needles (as in ``long_document.py``), the
default method on repeat-prefill queries only (so per-chunk self-study is out of the picture),
10x; the right number's answer NLL by third of the document, for
  streamed      ingested and compacted chunk by chunk in a 2,048-cell context;
  one-shot      compacted in one piece (one selection over the whole document per head);
  one-shot, chunked   compacted in one piece but with the streamed run's chunk length
                (``Compactor(chunk_size=...)``: the same keys per chunk, the original K/V and queries).

    python bench/streaming_control.py [--story 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

from common import machine, write_report
from long_document import needles_by_third, squality


def main(argv: list[str] | None = None) -> int:
    from kvlocal.api import Compaction
    from kvlocal.am import DEFAULT_METHOD
    from kvlocal.engine import binding
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.data import make_haystack
    from models import smollm2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--story", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    binding.set_verbose(False)
    path = smollm2.locate() or smollm2.ensure()
    model = binding.Model(path)
    count = lambda t: len(model.tokenize(t, add_special=False))  # noqa: E731
    hay = make_haystack(squality(args.story + 1)[args.story], 7000, count, k=12, seed=args.story)
    thirds = needles_by_third(hay.text, hay.needles)
    rows, chunk = [], None
    for name, n_ctx in (("streamed", 2048), ("one-shot", 15616), ("one-shot, chunked", 15616)):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Compaction(model, n_ctx=n_ctx, threads=args.threads, progress=False) as kv:
                kv.ingest(hay.text, system=tasks.SYSTEM)
                kv.compact(ratio=10, queries="repeat", chunk_size=chunk if name == "one-shot, chunked" else None)
                if name == "streamed":
                    chunk = int(np.ceil(kv.layout.n_doc / kv.report.streamed_chunks))
                s = kv.session
                nll = [tasks.needle_nll(s, k, n) for k, n in hay.needles]
                chunks = kv.report.chunks
        by = [np.mean([x for x, t in zip(nll, thirds, strict=True) if t == k]) for k in range(3)]
        rows.append((name, chunks, by, time.perf_counter() - t0))
        print(name, np.round(by, 2), flush=True)
    lines = ["# Streamed vs one-shot compaction: where the first third goes", "",
             f"Written by `python bench/streaming_control.py` on {machine(args.threads or os.cpu_count())}; model {path.name}; "
             f"SQuALITY dev story {args.story} cut to 7,000 tokens, 12 needles ({thirds.count(0)} / {thirds.count(1)} / "
             f"{thirds.count(2)} by third); {DEFAULT_METHOD} (the default) on repeat-prefill queries only, 10x.", "",
             "| condition | chunks fitted | answer NLL first third | middle | last third | time s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {c} | " + " | ".join(f"{x:.2f}" for x in by) + f" | {t:.0f} |" for n, c, by, t in rows]
    lines += ["", "Answer NLL: mean negative log-likelihood per token of the right number as the answer to its "
              "question (teacher-forced); lower is better."]
    write_report("streaming_control", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
