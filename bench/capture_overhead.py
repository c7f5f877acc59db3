"""Cost of capturing reference queries during ingestion (context-prefill), side by side.

SmolLM2-135M-Instruct Q4_1, a 2k-token document of real text ingested with kvlocal's Session
(512-token batches, flash attention off, F16 KV cache), three ways, interleaved over rounds
(order reversed every other round) in one process sharing one loaded model:

  no callback    the context has no eval callback
  callback idle  the eval callback is installed but observes nothing (asked ~36 times a layer)
  capture        post-RoPE Q of all 30 layers captured as float16 (context-prefill queries)

    python bench/capture_overhead.py [--tokens 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from common import RESULTS, document_text, machine, pyplot, save_figure, write_report

CONFIGS = ["no callback", "callback idle", "capture"]


def run_once(model, text: str, cfg: str, n_ctx: int, threads: int) -> tuple[float, int, int]:
    from kvlocal.engine.session import Session

    with Session(model, n_ctx=n_ctx, n_threads=threads, capture=cfg != "no callback", progress=False) as s:
        layout = s.ingest_document(text, capture_queries=cfg == "capture")
        n_bytes = s.context_queries.nbytes() if s.context_queries is not None else 0
        return s.ingest_seconds, layout.length, n_bytes


def plot(summary: dict, title: str, path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar(CONFIGS, [summary[c]["tok_s"] for c in CONFIGS], color=["#999999", "#4c72b0", "#dd8452"])
    ax.set_ylabel("ingestion tokens/s (median)")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="document length in tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from kvlocal.engine import binding
    from models import smollm2

    path = args.model or str(smollm2.ensure())
    model = binding.Model(path)
    full, source = document_text()
    toks = model.tokenize(full, add_special=False)[: args.tokens]
    text = model.detokenize(toks)
    runs = {c: [] for c in CONFIGS}
    length = n_bytes = 0
    for r in range(args.rounds):
        for cfg in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
            seconds, length, nb = run_once(model, text, cfg, args.tokens + 256, args.threads)
            runs[cfg].append(seconds)
            n_bytes = max(n_bytes, nb)
            print(f"round {r + 1} {cfg:13s} {length / seconds:6.1f} tok/s", flush=True)

    summary = {c: {"seconds": statistics.median(runs[c]), "tok_s": length / statistics.median(runs[c])}
               for c in CONFIGS}
    where = machine(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "capture_overhead.json").write_text(json.dumps(
        {"summary": summary, "runs": runs, "tokens": length, "query_bytes": n_bytes,
         "date": time.strftime("%Y-%m-%d")}, indent=1))
    name = os.path.basename(path)
    has_plot = plot(summary, f"{name}, {length}-token ingestion, {where}", RESULTS / "capture_overhead.png")
    base = summary["no callback"]["seconds"]
    lines = [
        "# Query capture during ingestion: overhead",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `bench/capture_overhead.py` (`make bench`).",
        "",
        f"- machine: {where}",
        f"- model: {name}, llama-cpp-python 0.3.36 (kvlocal patch), flash attention off, F16 KV cache, "
        "512-token batches",
        f"- document: {length} tokens (chat template + {source}, cut to {args.tokens} tokens); "
        f"{args.rounds} rounds, configurations interleaved, one process, one loaded model",
        "",
        "| configuration | ingestion s (median) | tokens/s | overhead vs no callback |",
        "|---|---|---|---|",
    ]
    for c in CONFIGS:
        s = summary[c]
        lines.append(f"| {c} | {s['seconds']:.2f} | {s['tok_s']:.1f} | {100 * (s['seconds'] / base - 1):+.1f} % |")
    over = 100 * (summary["capture"]["seconds"] / base - 1)
    lines += [
        "",
        f"Captured: {n_bytes / 2**20:.1f} MiB of float16 queries ({model.n_layer} layers x "
        f"{n_bytes // (2 * model.n_layer * model.n_head * model.head_dim)} tokens x {model.n_head} heads x "
        f"{model.head_dim}); nothing else of the graph is kept.",
        "",
        f"Target: at most 10 % overhead for capture. Measured {over:+.1f} % -- "
        + ("met." if over <= 10 else f"missed by {over - 10:.1f} points."),
        "Each observed node splits the graph once per layer and batch and copies its tensor to numpy; "
        "the idle callback costs one Python call per graph node.",
    ]
    if has_plot:
        lines += ["", "![capture overhead](capture_overhead.png)"]
    write_report("capture_overhead", lines)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
