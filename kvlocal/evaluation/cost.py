"""Speed and memory: decode speed with the full vs compacted caches, file sizes, peak RSS of a reload.

One long document (a SQuALITY story cut to ``tokens``), compacted at each ratio with
AM-HighestAttnKeys on context-prefill queries; decoding alternates between the full cache and
the compacted ones in the same process.  Peak RSS is measured in fresh processes: ingesting the
full document vs reloading the compacted session file, each followed by one answer (the reload
is the user's path: ``kvlocal.load`` in the measured process).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataclasses import asdict

from ..engine import binding
from ..pipeline import CompactionSettings, CompactionSummary, IngestedDocument
from ..sessionfile import save_session
from .data import squality_stories

QUESTION = "What happens at the end of the story?"

_RSS_SCRIPT = r"""
import json, sys, time
from kvlocal.engine import binding
mode, model, arg = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "full":
    from kvlocal.engine.session import Session
    text = open(arg).read()
    m = binding.Model(model)
    n = len(m.tokenize(text, add_special=False))
    s = Session(m, n_ctx=-(-(n + 1100) // 256) * 256, progress=False)
    s.ingest_document(text)
else:
    from kvlocal.api import CompactedSession
    c = CompactedSession(arg, model)
    s = c.session
ready = time.perf_counter() - t0
s.generate(s.chat_tokens([{"role": "user", "content": "Who is the story about?"}]), max_tokens=8)
# VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child started from a big parent reports the parent's peak
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": int(hwm.split()[1]) / 1024, "ready_s": ready}))
"""


def _decode_ms(s, n: int) -> float:
    """Median ms per generated token of one greedy answer (the session is rewound after)."""
    start = s.n_past
    logits = s.decode(s.chat_tokens([{"role": "user", "content": QUESTION}]))[-1]
    times = []
    tok = int(logits.argmax())
    for _ in range(n):
        t0 = time.perf_counter()
        logits = s.decode([tok])[-1]
        times.append(1000 * (time.perf_counter() - t0))
        tok = int(logits.argmax())
    s.rewind(start)
    return statistics.median(times)


def measure(model: binding.Model, ratios, tokens: int = 4000, decode_tokens: int = 48, rounds: int = 2,
            data=None, threads: int | None = None) -> dict:
    story = squality_stories(data)[0]
    text = model.detokenize(model.tokenize(story, add_special=False)[:tokens])
    out = {"tokens": tokens, "ratios": {}}
    work = Path(tempfile.mkdtemp())
    doc = IngestedDocument.ingest(model, text, threads=threads, progress=False)
    try:
        layout = doc.layout
        out["ingest_s"] = doc.ingest_s
        out["full_kv_bytes"] = doc.full_kv_bytes
        out["cells_full"] = layout.length
        files = {}
        for r in ratios:
            run = doc.compact(CompactionSettings(ratio=r, method="am-highest", queries=("context",)))
            summary = CompactionSummary.of(run, doc)
            files[r] = work / f"r{r:g}.kvs"
            size = save_session(files[r], model, doc.snapshot, run.cache, layout, doc.session.tokens, layout.length,
                                [], asdict(summary))
            out["ratios"][str(r)] = {"cells": summary.cells_after, "file_bytes": size,
                                     "kv_bytes": summary.kv_bytes_after, "fit_s": run.fit_s, "decode_ms": []}
        full_ms = []
        for _ in range(rounds):  # alternate full and compacted caches in one process
            doc.restore()
            full_ms.append(_decode_ms(doc.session, decode_tokens))
            for r in ratios:
                doc.compact(CompactionSettings(ratio=r, method="am-highest", queries=("context",)))
                out["ratios"][str(r)]["decode_ms"].append(_decode_ms(doc.session, decode_tokens))
        out["full_decode_ms"] = statistics.median(full_ms)
        for r in ratios:
            d = out["ratios"][str(r)]
            d["decode_ms"] = statistics.median(d["decode_ms"])
            d["speedup"] = out["full_decode_ms"] / d["decode_ms"]
    finally:
        doc.close()
    doc_path = work / "doc.txt"
    doc_path.write_text(text)
    r_mid = sorted(ratios)[len(ratios) // 2]
    out["rss"] = {"full": _rss("full", model.path, doc_path), f"reload {r_mid:g}x": _rss("reload", model.path, files[r_mid])}
    return out


def _rss(mode: str, model_path: Path, arg: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode, str(model_path), str(arg)], capture_output=True,
                         text=True, timeout=900)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])
