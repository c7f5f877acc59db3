"""`make demo`: the end-to-end loop on SmolLM2, as far as it is built.

Today: ingest a sample document into a llama.cpp session (progress bar), answer a question
about it with the full KV cache, and show the patched native op (the per-cell, per-KV-head
attention bias) executing its exactness identities on the live cache.  Compaction, session
files and reload arrive with the next issues; the demo says so where they will run.

    python -m kvlocal.demo -m MODEL.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources

import numpy as np
from tqdm import tqdm

from . import binding
from .errors import KvlocalError

QUESTION = "What did Maren Holt catch in the bay, and what did she do with the money?"


def ingest(ctx: binding.Context, tokens: np.ndarray, chunk: int = 128) -> float:
    """Decode ``tokens`` from position 0 with a progress bar; returns seconds."""
    t0 = time.perf_counter()
    with tqdm(total=len(tokens), desc="ingest", unit="tok", unit_scale=True) as bar:
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            ctx.decode(part, pos=start, logits="none")
            bar.update(len(part))
    return time.perf_counter() - t0


def answer(ctx: binding.Context, prompt: np.ndarray, max_tokens: int = 64) -> str:
    """Greedy answer to ``prompt`` appended after the cached context."""
    model = ctx.model
    logits = ctx.decode(prompt)[-1]
    out = []
    for _ in range(max_tokens):
        tok = int(np.argmax(logits))
        if model.is_eog(tok):
            break
        out.append(tok)
        logits = ctx.decode([tok])[-1]
    return model.detokenize(out).strip()


def bias_identities(ctx: binding.Context, blob: bytes, T: int, probe: int) -> tuple[bool, bool]:
    """(zero bias == no bias, bias -inf on a cell == the cell masked out), both bit for bit,
    on the document's cache ``blob`` of ``T`` cells."""
    n_cells = T

    def logits_after(setup) -> np.ndarray:
        ctx.clear()
        ctx.set_seq_state(blob)
        setup()
        return ctx.decode([probe], pos=T)[-1]

    ctx.bias_enable(False)
    plain = logits_after(lambda: None)
    ctx.bias_enable(True)
    zero = logits_after(lambda: None)
    j = n_cells // 2

    def neg_inf():
        for il in range(ctx.model.n_layer):
            b = np.zeros((n_cells, ctx.model.n_head_kv), np.float32)
            b[j] = -np.inf
            ctx.bias_set(il, b)

    def mask_out():
        ctx.seq_cp(0, 1, j, j + 1)  # sequence 1 keeps the cell, so the probe does not reuse it
        ctx.seq_rm(0, j, j + 1)

    biased = logits_after(neg_inf)
    masked = logits_after(mask_out)
    ctx.seq_rm(1)
    return bool(np.array_equal(plain, zero)), bool(np.array_equal(biased, masked))


def run(model_path: str, n_threads: int | None) -> None:
    info = binding.native_info()
    print(f"llama.cpp: llama-cpp-python {info.get('llama_cpp_python')}, kvlocal patch "
          f"{info.get('patch_hash', '?')[:12]} ({info.get('library')})")
    model = binding.Model(model_path)
    print(f"model: {model.path.name} ({model.arch}, {model.n_layer} layers, {model.n_head} query / "
          f"{model.n_head_kv} KV heads, head dim {model.head_dim})")
    document = resources.files("kvlocal.data").joinpath("sample_document.txt").read_text()
    doc_prompt = model.apply_chat_template(
        [{"role": "system", "content": "You answer questions about the document the user shares."},
         {"role": "user", "content": "Here is a document.\n\n" + document}], add_assistant=False)
    doc_tokens = model.tokenize(doc_prompt, parse_special=True)
    question = model.apply_chat_template([{"role": "user", "content": QUESTION}])
    q_tokens = model.tokenize(question, add_special=False, parse_special=True)

    with binding.Context(model, n_ctx=2048, n_batch=256, n_threads=n_threads, n_seq_max=2) as ctx:
        seconds = ingest(ctx, doc_tokens)
        T = len(doc_tokens)
        kv_bytes = len(ctx.seq_state(0))
        print(f"ingested {T} tokens in {seconds:.1f} s ({T / seconds:.0f} tok/s); KV cache of the document: "
              f"{kv_bytes / 2**20:.2f} MiB")
        blob = ctx.seq_state(0)
        print(f"\nQ: {QUESTION}")
        t0 = time.perf_counter()
        print(f"A (full cache, {T} cells): {answer(ctx, q_tokens)}   [{time.perf_counter() - t0:.1f} s]")

        zero_ok, inf_ok = bias_identities(ctx, blob, T, int(q_tokens[0]))
        print("\nnative KV bias (patched llama.cpp):")
        print(f"  bias on, all zero   == bias off           : {'bit-identical' if zero_ok else 'MISMATCH'}")
        print(f"  bias -inf on a cell == cell masked out    : {'bit-identical' if inf_ok else 'MISMATCH'}")
        if not (zero_ok and inf_ok):
            raise KvlocalError("the native KV bias identities failed")

    print("\nnot yet: compaction with Attention Matching (10x), saving the compacted session, reloading it "
          "in a fresh process and answering from it -- these steps arrive with the KV-bridge, "
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
