"""Reloading a compacted session vs re-ingesting its document, side by side in one run.

SmolLM2-135M-Instruct Q4_1, a 4,000-token SQuALITY story compacted 10x with AM-HighestAttnKeys
(repeat-prefill queries) and saved.  Then, alternating over rounds, with the model loaded once
and shared (as a chat application keeps it):

  re-ingest   create a context and ingest the document again (what you do without kvlocal)
  reload      read and verify the session file, create a context sized to its cells plus a
              1024-token chat budget, write the cells and their bias into llama.cpp

Both end ready to answer; the time to the first answer token is measured after each.

    python bench/reload.py [--tokens 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, document_text, machine, write_report

QUESTION = "What is the story about?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4000, help="document tokens (repeat-prefill needs 2x within 8k)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    from kvlocal.engine import binding
    from kvlocal.api import CompactedSession, Compaction
    from kvlocal.engine.modelinfo import model_fingerprint
    from kvlocal.engine.session import Session
    from kvlocal.sessionfile import read_session
    from models import smollm2

    t0 = time.perf_counter()
    model = binding.Model(smollm2.ensure())
    model_fingerprint(model)  # computed once per loaded model, like the model load itself
    load_model_s = time.perf_counter() - t0
    story, source = document_text()
    text = model.detokenize(model.tokenize(story, add_special=False)[: args.tokens])
    path = Path(tempfile.mkdtemp()) / "story.kvs"
    with Compaction(model, threads=args.threads, progress=False) as kv:
        layout = kv.ingest(text)
        report = kv.compact(ratio=10, method="am-highest", queries="repeat")
        size = kv.save(str(path))
        full_bytes = report.kv_bytes_before

    def first_token(s: Session) -> float:
        t = time.perf_counter()
        s.decode(s.chat_tokens([{"role": "user", "content": QUESTION}]))
        return time.perf_counter() - t

    warm = CompactedSession(str(path), model, threads=args.threads)  # a context a chat app already has
    runs = {"re-ingest": [], "reload": [], "reload into an open context": [],
            "of which: read and verify the file": [], "re-ingest first token": [], "reload first token": []}
    for r in range(args.rounds):
        for kind in (("re-ingest", "reload") if r % 2 == 0 else ("reload", "re-ingest")):
            t = time.perf_counter()
            if kind == "reload":
                with CompactedSession(str(path), model, threads=args.threads) as c:
                    runs[kind].append(time.perf_counter() - t)
                    runs[kind + " first token"].append(first_token(c.session))
                t = time.perf_counter()
                warm.switch(str(path))
                runs["reload into an open context"].append(time.perf_counter() - t)
                t = time.perf_counter()
                read_session(str(path))
                runs["of which: read and verify the file"].append(time.perf_counter() - t)
            else:
                with Session(model, n_ctx=layout.length + 1024, n_threads=args.threads, progress=False) as s:
                    s.ingest_document(text)
                    runs[kind].append(time.perf_counter() - t)
                    runs[kind + " first token"].append(first_token(s))
            print(f"round {r + 1} {kind:9s} {runs[kind][-1]:8.3f} s", flush=True)
    warm.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    speedup = med["re-ingest"] / med["reload"]
    speedup_warm = med["re-ingest"] / med["reload into an open context"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reload.json").write_text(json.dumps({"runs": runs, "median": med, "speedup": speedup,
                                                     "speedup_open_context": speedup_warm,
                                                     "file_bytes": size, "full_kv_bytes": full_bytes}, indent=1))
    lines = [
        "# Reload a compacted session vs re-ingest the document",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `bench/reload.py` on {machine(args.threads)}.",
        "",
        f"- model: SmolLM2-135M-Instruct Q4_1 (loaded once, {load_model_s:.2f} s with its fingerprint, shared by all runs)",
        f"- document: {layout.n_doc} tokens of {source} ({layout.length} with the chat template); compacted 10x "
        f"with am-highest on repeat-prefill queries to {report.cells_after} cells",
        f"- session file {size / 2**20:.2f} MiB; full KV cache of the document {full_bytes / 2**20:.1f} MiB",
        f"- {args.rounds} rounds, order alternating; both paths include creating the llama.cpp context",
        "",
        "| path | median seconds | runs |",
        "|---|---|---|",
    ] + [f"| {k} | {med[k]:.4f} | {', '.join(f'{x:.4f}' for x in runs[k])} |" for k in runs] + [
        "",
        f"Reload is **{speedup:.0f}x** faster than re-ingesting, **{speedup_warm:.0f}x** when the session goes into "
        "a context that is already open (`CompactedSession.switch`). Target >= 1000x: "
        + ("met." if speedup >= 1000 else
           (f"met only into an open context; the two paths differ by "
            f"~{1000 * (med['reload'] - med['reload into an open context']):.0f} ms, mostly creating the llama.cpp "
            "context." if speedup_warm >= 1000
            else f"missed by a factor {1000 / speedup_warm:.1f} even into an open context.")),
        f"The first answer token then comes after the same prompt decode, over {report.cells_after} cells "
        f"instead of {layout.length}.",
    ]
    write_report("reload", lines)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
