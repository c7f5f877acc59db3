"""`make demo`: compact a document with SmolLM2, save it, reload it in a fresh process, ask it.

    python -m kvlocal.demo -m MODEL.gguf [-o demo.kvs]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from .errors import KvlocalError

QUESTION = "Who built the clock tower?"
SYSTEM = "You answer questions about the document the user shares."


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(model_path: str, out: str, threads: int | None) -> None:
    from . import api
    from .engine import binding

    info = binding.native_info()
    print(f"llama.cpp: llama-cpp-python {info.get('llama_cpp_python')}, kvlocal patch "
          f"{str(info.get('patch_hash', '?'))[:12]}")
    doc_file = resources.files("kvlocal.data").joinpath("sample_document.txt")
    document = doc_file.read_text()
    with api.Compaction(model_path, threads=threads) as kv:
        layout = kv.ingest(document, system=SYSTEM, name=doc_file.name)
        print(f"model: {kv.model.path.name}; document: {doc_file.name}, {layout.n_doc} tokens "
              f"({layout.length} with the chat template), ingested in {kv.timings['ingest_s']:.1f} s")
        print(f"\nQ: {QUESTION}\nA (full KV cache, {layout.length} cells): {kv.ask(QUESTION, max_tokens=48)}")
        r = kv.compact(ratio=10)  # the default method on its own queries (repeat + self-study)
        size = kv.save(out)
        t = kv.timings
    print(f"\ncompacted 10x with {r.method} on {'+'.join(r.queries)} queries: {r.tokens_before} tokens -> "
          f"{r.cells_after} KV cells")
    print(f"  KV cache {_mib(r.kv_bytes_before)} -> {_mib(r.kv_bytes_after)}; session file {_mib(size)} ({out})")
    print(f"  queries {t['queries_s']:.1f} s, fit {t['fit_s']:.1f} s, save {t['save_s']:.2f} s; held-out attention "
          f"error {r.heldout_output_rel_l2:.3f}")

    print("\nreloading the session in a fresh process: kvlocal ask ...")
    cmd = [sys.executable, "-m", "kvlocal", "ask", out, "-m", model_path, QUESTION, "-n", "48"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise KvlocalError(f"the reload failed: {res.stderr.strip()}")
    print(f"A (compacted, {r.cells_after} cells, new process, {seconds:.1f} s including Python and model start):"
          f" {res.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kvlocal demo")
    ap.add_argument("-m", "--model", required=True, help="GGUF model (SmolLM2-135M-Instruct in `make demo`)")
    ap.add_argument("-o", "--output", default="demo.kvs", help="where to save the compacted session")
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        run(args.model, args.output, args.threads)
    except KvlocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
