"""The binding layer: library check, model metadata, decoding errors, state round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ALL_MODELS, TEXT
from kvlocal.engine import binding
from kvlocal.errors import EngineError, ModelError
from kvlocal.kv.statecodec import StateFormatError, parse_seq_state

STOCK_LIB_SIMULATION = """
import llama_cpp.llama_cpp as ll

class StockLibrary:
    # the loaded library minus the patch's llama_kv_bias_* symbols
    def __init__(self, lib):
        self._lib, self._name = lib, lib._name
    def __getattr__(self, name):
        if name.startswith("llama_kv_bias"):
            raise AttributeError(name)
        return getattr(self._lib, name)

ll._lib = StockLibrary(ll._lib)
try:
    import kvlocal.engine.binding
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_stock_library_is_refused_with_a_clear_error():
    res = subprocess.run([sys.executable, "-c", STOCK_LIB_SIMULATION], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("NativeLibraryError")
    assert "lacks the llama_kv_bias_* functions" in res.stdout
    assert "make setup" in res.stdout


def test_native_manifest_names_the_build():
    info = binding.native_info()
    assert info["llama_cpp_python"] == "0.3.36"
    assert len(info["patch_hash"]) == 64
    assert "0001-kv-bias.patch" in info["patches"]
    json.dumps(info)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        binding.Model(tmp_path / "nope.gguf")


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelError, match="could not load"):
        binding.Model(bad)


@pytest.mark.parametrize("name,arch,n_head,n_head_kv,head_dim", [
    ("llama-gqa", "llama", 4, 2, 16),
    ("llama-mqa", "llama", 4, 1, 16),
    ("qwen2", "qwen2", 4, 2, 16),
    ("qwen3", "qwen3", 4, 2, 16),
    ("gemma3", "gemma3", 4, 1, 16),
    ("smollm2", "llama", 9, 3, 64),
    ("qwen25", "qwen2", 14, 2, 64),
])
def test_model_metadata(load_model, name, arch, n_head, n_head_kv, head_dim):
    m = load_model(name)
    assert (m.arch, m.n_head, m.n_head_kv, m.head_dim) == (arch, n_head, n_head_kv, head_dim)
    assert "<|im_start|>" in (m.chat_template() or "")
    assert m.detokenize(m.tokenize("the cat sat", add_special=False)).strip() == "the cat sat"


def test_decode_position_rule_is_a_clear_error(load_model):
    m = load_model("llama-gqa")
    with binding.Context(m, n_ctx=512, n_batch=64) as ctx:
        toks = m.tokenize(TEXT)
        ctx.decode(toks, pos=0, logits="none")
        with pytest.raises(EngineError, match="positions must continue"):
            ctx.decode([5], pos=len(toks) + 3)
        # the cache is untouched by the refused batch
        assert ctx.pos_max(0) == len(toks) - 1


def test_context_overflow_is_a_clear_error(load_model):
    m = load_model("llama-gqa")
    with binding.Context(m, n_ctx=256, n_batch=64) as ctx:
        with pytest.raises(EngineError, match="context is full"):
            ctx.decode(np.full(300, 10), pos=0, logits="none")


def test_tap_exception_aborts_decode_and_is_reraised(load_model):
    m = load_model("llama-gqa")
    tap = binding.TensorTap()

    def boom(name, op, arr):
        raise RuntimeError("sink failed")

    tap.select = lambda name, op: name == "Qcur-0" and op == "ROPE"
    tap.sink = boom
    with binding.Context(m, n_ctx=512, n_batch=64, tap=tap) as ctx:
        with pytest.raises(RuntimeError, match="sink failed"):
            ctx.decode(m.tokenize(TEXT), pos=0)
        tap.select = None  # observing nothing again: decoding works
        ctx.clear()
        assert ctx.decode(m.tokenize(TEXT), pos=0).shape == (1, m.n_vocab)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_state_blob_round_trip_is_byte_identical(load_model, name):
    m = load_model(name)
    with binding.Context(m, n_ctx=512, n_batch=128) as ctx:
        toks = m.tokenize(TEXT)
        ctx.decode(toks, pos=0, logits="none")
        blob = ctx.seq_state(0)
    state = parse_seq_state(blob, n_caches=2 if m.n_swa else 1)
    assert state.to_bytes() == blob
    base = state.caches[0].cells()
    assert base.n_cells == len(toks)
    assert np.array_equal(base.pos, np.arange(len(toks)))
    assert base.v_trans  # flash attention is off
    assert base.layers[0].k.shape == (len(toks), m.n_head_kv * m.head_dim)
    if m.n_swa:
        assert state.caches[1].cells().n_cells <= m.n_swa


def test_state_blob_rejects_malformed_input(load_model):
    m = load_model("llama-gqa")
    with binding.Context(m, n_ctx=512, n_batch=64) as ctx:
        ctx.decode(m.tokenize(TEXT), pos=0, logits="none")
        blob = ctx.seq_state(0)
    with pytest.raises(StateFormatError, match="magic"):
        parse_seq_state(b"\0" * len(blob))
    for cut in (3, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(StateFormatError, match="truncated"):
            parse_seq_state(blob[:cut])
    with pytest.raises(StateFormatError, match="unexpected bytes"):
        parse_seq_state(blob + b"\0", n_caches=1)
    huge_count = bytearray(blob)
    huge_count[12:16] = (0xFFFFFFF0).to_bytes(4, "little")  # cell_count of the first stream
    with pytest.raises(StateFormatError, match="truncated"):
        parse_seq_state(bytes(huge_count))


@pytest.mark.parametrize("name", ["llama-gqa", "smollm2"])
def test_chatml_template_from_the_gguf(load_model, name):
    m = load_model(name)
    text = m.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    toks = m.tokenize(text, add_special=False, parse_special=True)
    start = m.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(start) == 1 and toks[0] == start[0]  # a control token, not its spelling


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3"])
def test_state_blob_round_trip_with_untransposed_v(load_model, name):
    """A flash-attention context stores V untransposed (v_trans = 0): that layout round-trips too."""
    m = load_model(name)
    with binding.Context(m, n_ctx=512, n_batch=128, flash_attn=True) as ctx:
        toks = m.tokenize(TEXT)
        ctx.decode(toks, pos=0, logits="none")
        blob = ctx.seq_state(0)
    state = parse_seq_state(blob, n_caches=2 if m.n_swa else 1)
    assert not state.caches[0].cells().v_trans
    assert state.to_bytes() == blob
    with binding.Context(m, n_ctx=512, n_batch=128) as ctx:  # transposed V: same values, other layout
        ctx.decode(toks, pos=0, logits="none")
        other = parse_seq_state(ctx.seq_state(0), n_caches=2 if m.n_swa else 1)
    # the first cached layer's K/V come straight from the embeddings: equal in both layouts
    a, b = state.caches[-1].cells().layers[0], other.caches[-1].cells().layers[0]
    assert np.array_equal(a.k, b.k) and np.array_equal(a.v, b.v)


def test_state_blob_with_cell_extensions_round_trips():
    """M-RoPE/PLE caches add 12 bytes (x, y, tok) per cell: parsed and written back exactly."""
    from kvlocal.kv.statecodec import CacheState, LayerKV, SeqState, StreamState

    rng = np.random.default_rng(0)
    n = 5
    stream = StreamState(pos=np.arange(n, dtype=np.int32), seq_ids=[np.array([0], np.int32)] * n,
                         ext=rng.integers(-5, 5, (n, 3)).astype(np.int32), v_trans=True,
                         layers=[LayerKV(1, rng.normal(size=(n, 8)).astype(np.float16), 0,
                                         rng.normal(size=(n, 8)).astype(np.float32))])
    blob = SeqState(0, [CacheState([stream])]).to_bytes()
    back = parse_seq_state(blob, cell_ext=True)
    s = back.caches[0].cells()
    assert np.array_equal(s.ext, stream.ext) and np.array_equal(s.layers[0].v, stream.layers[0].v)
    assert back.to_bytes() == blob
    with pytest.raises(StateFormatError):
        parse_seq_state(blob, cell_ext=False)  # read without the extension the layout does not add up
