"""`make demo`: the end-to-end loop on SmolLM2, as far as it is built.

Today: ingest a sample document into a llama.cpp session (progress bar) while capturing its
queries, answer a question from the full KV cache, gather repeat-prefill queries, extract the
KV cache as arrays and inject it back through the per-head packing path (the answer must come
out identical), and run the patched native attention bias's identities on the live cache.
Fitting the compacted cache, session files and reload arrive with the next issues; the demo
says so where they will run.

    python -m kvlocal.demo -m MODEL.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources

import numpy as np

from . import binding
from .errors import KvlocalError
from .kvcache import identity_compaction
from .queries import collect_queries
from .session import Session

QUESTION = "What did Maren Holt catch in the bay, and what did she do with the money?"


def bias_identities(s: Session, blob: bytes, T: int, probe: int) -> tuple[bool, bool]:
    """(zero bias == no bias, bias -inf on a cell == the cell masked out), both bit for bit."""
    ctx, j = s.ctx, T // 2

    def logits_after(setup, bias: bool) -> np.ndarray:
        s.restore(blob)
        ctx.bias_enable(bias)
        setup()
        return ctx.decode([probe], pos=T)[-1]

    def neg_inf():
        for il in s.info.base_layers:
            b = np.zeros((T, s.info.n_head_kv), np.float32)
            b[j] = -np.inf
            ctx.bias_set(il, b)

    def mask_out():
        ctx.seq_cp(0, 1, j, j + 1)  # sequence 1 keeps the cell, so the probe does not reuse it
        ctx.seq_rm(0, j, j + 1)

    plain = logits_after(lambda: None, False)
    zero = logits_after(lambda: None, True)
    biased = logits_after(neg_inf, True)
    masked = logits_after(mask_out, False)
    ctx.seq_rm(1)
    return bool(np.array_equal(plain, zero)), bool(np.array_equal(biased, masked))


def answer(s: Session) -> str:
    return s.model.detokenize(s.generate(s.chat_tokens([{"role": "user", "content": QUESTION}]),
                                         max_tokens=64)).strip()


def run(model_path: str, n_threads: int | None) -> None:
    info = binding.native_info()
    print(f"llama.cpp: llama-cpp-python {info.get('llama_cpp_python')}, kvlocal patch "
          f"{info.get('patch_hash', '?')[:12]} ({info.get('library')})")
    document = resources.files("kvlocal.data").joinpath("sample_document.txt").read_text()
    with Session(model_path, n_ctx=2048, n_threads=n_threads, capture=True) as s:
        m = s.info
        print(f"model: {s.model.path.name} ({m.arch}, {m.n_layer} layers, {m.n_head} query / {m.n_head_kv} KV heads, "
              f"head dim {m.head_dim})")
        layout = s.ingest_document(document, system="You answer questions about the document the user shares.",
                                   capture_queries=True)
        T = layout.length
        blob = s.state()
        print(f"ingested {T} tokens ({layout.n_doc} of document) in {s.ingest_seconds:.1f} s "
              f"({T / s.ingest_seconds:.0f} tok/s); KV cache: {len(blob) / 2**20:.2f} MiB")
        t0 = time.perf_counter()
        queries = collect_queries(s, layout, ["context", "repeat"])
        print(f"reference queries: {queries.n_tokens} tokens x {len(queries.layers)} layers "
              f"({', '.join(queries.sources)}) in {time.perf_counter() - t0:.1f} s, "
              f"{queries.nbytes() / 2**20:.1f} MiB")

        print(f"\nQ: {QUESTION}")
        t0 = time.perf_counter()
        full = answer(s)
        print(f"A (full cache, {T} cells): {full}   [{time.perf_counter() - t0:.1f} s]")
        s.restore(blob)
        snap = s.snapshot()
        s.inject(identity_compaction(snap, layout.doc_start, layout.doc_end), snap)
        same = answer(s)
        print(f"KV bridge: extracted {snap.n_cells} cells x {len(snap.keys)} layers as arrays, re-injected through "
              f"the per-head packing path: answer {'identical' if same == full else 'DIFFERENT'}")

        zero_ok, inf_ok = bias_identities(s, blob, T, int(s.chat_tokens([{"role": "user", "content": "x"}])[0]))
        print("\nnative KV bias (patched llama.cpp):")
        print(f"  bias on, all zero   == bias off        : {'bit-identical' if zero_ok else 'MISMATCH'}")
        print(f"  bias -inf on a cell == cell masked out : {'bit-identical' if inf_ok else 'MISMATCH'}")
        if not (zero_ok and inf_ok and same == full):
            raise KvlocalError("a bridge or native-bias identity failed")

    print("\nnot yet: fitting the compacted cache with Attention Matching (10x), saving the compacted session, "
          "reloading it in a fresh process and answering from it -- these steps arrive with the "
          "Attention-Matching-core and Product issues.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kvlocal demo")
    ap.add_argument("-m", "--model", required=True, help="GGUF model (SmolLM2-135M-Instruct in `make demo`)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        run(args.model, args.threads)
    except KvlocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
