"""The binding layer's handles: a GGUF ``Model`` and a llama.cpp ``Context`` (decoding, state
blobs, sequences, the patch's KV bias, the eval-callback tap), each wrapping a native handle with
an explicit ``close()``.  ``native`` loads and checks the library; together they are the only
kvlocal code that touches ctypes and llama.cpp.  Everything above deals in numpy arrays, bytes and
Python objects.

Shapes use numpy order.  A KV bias of layer ``il`` is ``[n_cells, n_head_kv]`` float32 in
logit units, cells in the order of the sequence's state blob.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import EngineError, ModelError
from .native import (
    BIAS_ABI_VERSION, GGML_TYPE_F16, GGML_TYPE_F32, LIB_PATH, TensorTap, _engine_error, _lib, clear_log, last_log, ll,
    native_info, set_verbose,
)

# the engine's public face: the handles, and the library facts and switches callers reach through it
__all__ = ["BIAS_ABI_VERSION", "GGML_TYPE_F16", "GGML_TYPE_F32", "LIB_PATH", "Context", "Model", "TensorTap",
           "borrow_or_open", "last_log", "native_info", "set_verbose"]



class _Native:
    """Owner of one native handle (``self._h``), freed by ``close()``, ``with`` or collection."""

    _h = None

    def _free(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._h:
            self._free()
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    @property
    def handle(self):
        if not self._h:
            raise EngineError(f"{type(self).__name__.lower()} is closed")
        return self._h


# ---------------------------------------------------------------------------------------------
# model


class Model(_Native):
    """A loaded GGUF model (weights, vocabulary, metadata)."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, vocab_only: bool = False,
                 use_mmap: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        params = ll.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        params.use_mmap = use_mmap
        clear_log()
        handle = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            tail = last_log()
            raise ModelError(f"llama.cpp could not load {self.path}" + (f": {tail}" if tail else ""))
        self._h = handle
        self._vocab = ll.llama_model_get_vocab(handle)

    def _free(self) -> None:
        ll.llama_model_free(self._h)

    # metadata -------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            ll.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def metadata(self) -> dict[str, str]:
        out = {}
        key = ctypes.create_string_buffer(512)
        for i in range(ll.llama_model_meta_count(self.handle)):
            if ll.llama_model_meta_key_by_index(self.handle, i, key, len(key)) < 0:
                continue
            name = key.value.decode("utf-8", errors="replace")
            out[name] = self.meta(name) or ""
        return out

    @property
    def arch(self) -> str:
        return self.meta("general.architecture") or ""

    @property
    def n_layer(self) -> int:
        return ll.llama_model_n_layer(self.handle)

    @property
    def n_head(self) -> int:
        return ll.llama_model_n_head(self.handle)

    @property
    def n_head_kv(self) -> int:
        return ll.llama_model_n_head_kv(self.handle)

    @property
    def n_embd(self) -> int:
        return ll.llama_model_n_embd(self.handle)

    @property
    def head_dim(self) -> int:
        v = self.meta(f"{self.arch}.attention.key_length")
        return int(v) if v else self.n_embd // self.n_head

    @property
    def n_swa(self) -> int:
        return ll.llama_model_n_swa(self.handle)

    # llama.cpp's sliding-window pattern when the GGUF has none (the n_pattern of load_swa_pattern)
    _SWA_PATTERN_DEFAULT = {"gemma3": 6}

    def swa_layers(self) -> list[bool]:
        """Per layer: does it use the sliding window (its K/V live in the iSWA model's SWA cache)?"""
        n_layer = self.n_layer
        if self.n_swa == 0:
            return [False] * n_layer
        raw = self.meta(f"{self.arch}.attention.sliding_window_pattern")
        if raw and raw.startswith("["):
            flags = [v.strip() in ("true", "1") for v in raw[1:-1].split(",")]
            if len(flags) < n_layer:
                raise ModelError(f"sliding_window_pattern has {len(flags)} entries for {n_layer} layers")
            return flags[:n_layer]
        n = int(raw) if raw else self._SWA_PATTERN_DEFAULT.get(self.arch)
        if n is None:
            raise ModelError(f"unknown sliding-window layout for architecture {self.arch!r}")
        return [n == 0 or il % n < n - 1 for il in range(n_layer)]

    @property
    def n_ctx_train(self) -> int:
        return ll.llama_model_n_ctx_train(self.handle)

    @property
    def n_vocab(self) -> int:
        return ll.llama_vocab_n_tokens(self._vocab)

    def chat_template(self) -> str | None:
        t = ll.llama_model_chat_template(self.handle, None)
        return t.decode("utf-8", errors="replace") if t else None

    def apply_chat_template(self, messages: Sequence[dict], *, add_assistant: bool = True) -> str:
        """Format ``[{"role", "content"}, ...]`` with the GGUF's chat template (llama.cpp's
        built-in implementations, which cover ChatML and the other common templates)."""
        tmpl = self.chat_template()
        if tmpl is None:
            raise ModelError(f"{self.path.name} has no chat template")
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (ll.llama_chat_message * len(keep))(*[ll.llama_chat_message(r, c) for r, c in keep])
        cap = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        buf = ctypes.create_string_buffer(cap)
        n = ll.llama_chat_apply_template(tmpl.encode(), chat, len(keep), add_assistant, buf, cap)
        if n > cap:
            buf = ctypes.create_string_buffer(n)
            n = ll.llama_chat_apply_template(tmpl.encode(), chat, len(keep), add_assistant, buf, n)
        if n < 0:
            raise ModelError(f"llama.cpp does not implement the chat template of {self.path.name}")
        return buf.raw[:n].decode("utf-8", errors="replace")

    # vocabulary -----------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return ll.llama_vocab_bos(self._vocab)

    @property
    def eos(self) -> int:
        return ll.llama_vocab_eos(self._vocab)

    @property
    def add_bos(self) -> bool:
        return bool(ll.llama_vocab_get_add_bos(self._vocab))

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self._vocab, int(token)))

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        cap = len(data) + 16
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError("tokenization failed")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", errors="replace")


def borrow_or_open(model: str | os.PathLike | Model) -> tuple[Model, bool]:
    """``(model, owned)``: a loaded ``Model`` as it is (``owned`` False: its owner closes it), or a
    GGUF path opened here (``owned`` True: the caller closes it)."""
    if isinstance(model, Model):
        return model, False
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"a model is a GGUF path or a loaded kvlocal Model, not {type(model).__name__}")
    return Model(os.fspath(model)), True



# ---------------------------------------------------------------------------------------------
# context

_DECODE_ERRORS = {
    1: "no KV slot for the batch: the context is full (increase n_ctx)",
    2: "decode aborted",
    -1: "invalid batch (positions must continue at the sequence's max position + 1)",
}


class Context(_Native):
    """A llama.cpp context: KV cache, decoding, sequence state and the KV bias."""

    def __init__(self, model: Model, *, n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int | None = None,
                 n_threads: int | None = None, n_seq_max: int = 1, flash_attn: bool = False,
                 type_k: int = GGML_TYPE_F16, type_v: int = GGML_TYPE_F16, swa_full: bool = True,
                 kv_unified: bool = True, tap: TensorTap | None = None, kv_bias: bool = False):
        self.model = model
        threads = n_threads or os.cpu_count() or 1
        p = ll.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch or n_batch
        p.n_seq_max = n_seq_max
        p.n_threads = threads
        p.n_threads_batch = threads
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = type_k
        p.type_v = type_v
        p.swa_full = swa_full
        p.kv_unified = kv_unified  # one stream: sequences share cells and state blobs hold one stream
        p.no_perf = True
        self.tap = tap
        if tap is not None:
            p.cb_eval = tap._c_fn
            p.cb_eval_user_data = None
        clear_log()
        handle = ll.llama_init_from_model(model.handle, p)
        if not handle:
            raise _engine_error(f"llama.cpp could not create a context (n_ctx={n_ctx})")
        self._h = handle
        self._mem = ll.llama_get_memory(handle)
        self.n_batch = n_batch
        self._batch = ll.llama_batch_init(n_batch, 0, n_seq_max)
        self._batch_live = True
        if kv_bias:
            self.bias_enable(True)

    def _free(self) -> None:
        if getattr(self, "_batch_live", False):
            ll.llama_batch_free(self._batch)
            self._batch_live = False
        ll.llama_free(self._h)

    @property
    def n_ctx(self) -> int:
        return ll.llama_n_ctx(self.handle)

    # decoding -------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], *, pos: int | Sequence[int] | None = None, seq_id: int = 0,
               logits: str = "last") -> np.ndarray:
        """Decode tokens into sequence ``seq_id``, in chunks of ``n_batch``.

        ``pos``: first position (int), one position per token, or None to continue after the
        sequence's max position.  ``logits``: "last", "all" or "none".  Returns float32 logits
        ``[n_out, n_vocab]`` (n_out = 1, len(tokens) or 0).
        """
        toks = np.asarray(tokens, dtype=np.int32).reshape(-1)
        n = len(toks)
        if n == 0:
            raise EngineError("decode needs at least one token")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', not {logits!r}")
        if pos is None:
            pos = self.pos_max(seq_id) + 1
        positions = (np.arange(n, dtype=np.int32) + int(pos)) if np.isscalar(pos) else np.asarray(pos, np.int32)
        if positions.shape != (n,):
            raise EngineError(f"{len(positions)} positions for {n} tokens")
        n_vocab = self.model.n_vocab
        out = []
        b = self._batch
        for start in range(0, n, self.n_batch):
            m = min(self.n_batch, n - start)
            for i in range(m):
                b.token[i] = int(toks[start + i])
                b.pos[i] = int(positions[start + i])
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                want = logits == "all" or (logits == "last" and start + i == n - 1)
                b.logits[i] = 1 if want else 0
            b.n_tokens = m
            if self.tap is not None:
                self.tap.error = None
            rc = ll.llama_decode(self.handle, b)
            if self.tap is not None and self.tap.error is not None:
                err, self.tap.error = self.tap.error, None
                raise err
            if rc != 0:
                raise _engine_error(f"llama_decode failed with code {rc}: {_DECODE_ERRORS.get(rc, 'fatal error')}")
            for i in range(m):
                if b.logits[i]:
                    ptr = ll.llama_get_logits_ith(self.handle, i)
                    out.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy())
        return np.stack(out) if out else np.zeros((0, n_vocab), np.float32)

    # memory ---------------------------------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        ll.llama_memory_clear(self._mem, data)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(ll.llama_memory_seq_rm(self._mem, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        ll.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def pos_max(self, seq_id: int = 0) -> int:
        return int(ll.llama_memory_seq_pos_max(self._mem, seq_id))

    def pos_min(self, seq_id: int = 0) -> int:
        return int(ll.llama_memory_seq_pos_min(self._mem, seq_id))

    # sequence state -------------------------------------------------------------------------
    def seq_state(self, seq_id: int = 0, flags: int = 0) -> bytes:
        """``llama_state_seq_get_data_ext``: the sequence's KV cells as a state blob."""
        size = ll.llama_state_seq_get_size_ext(self.handle, seq_id, flags)
        buf = (ctypes.c_uint8 * size)()
        n = ll.llama_state_seq_get_data_ext(self.handle, buf, size, seq_id, flags)
        if n != size:
            raise _engine_error(f"llama_state_seq_get_data_ext wrote {n} of {size} bytes")
        return bytes(buf)

    def set_seq_state(self, blob: bytes | bytearray, seq_id: int = 0, flags: int = 0) -> int:
        """Restore a state blob into ``seq_id`` (replacing its cells); returns bytes read."""
        kind = ctypes.c_uint8 * len(blob)
        buf = kind.from_buffer(blob) if isinstance(blob, bytearray) else kind.from_buffer_copy(blob)
        clear_log()
        n = ll.llama_state_seq_set_data_ext(self.handle, buf, len(blob), seq_id, flags)
        if n == 0:
            raise _engine_error("llama.cpp rejected the sequence state")
        return int(n)

    # kv bias --------------------------------------------------------------------------------
    def bias_enable(self, on: bool = True) -> None:
        if not _lib.llama_kv_bias_enable(self.handle, bool(on)) and on:
            raise EngineError(f"the KV bias is not supported by this model's memory ({self.model.arch})")

    def bias_cells(self, il: int, seq_id: int = 0) -> int:
        """Cell count of ``seq_id`` in layer ``il``'s cache; -1 if the bias is off or il has no cache."""
        return int(_lib.llama_kv_bias_get(self.handle, seq_id, il, None, 0))

    def bias_get(self, il: int, seq_id: int = 0) -> np.ndarray:
        n = self.bias_cells(il, seq_id)
        if n < 0:
            raise EngineError(f"no KV bias for layer {il} (bias disabled or no KV cache in that layer)")
        out = np.zeros((n, self.model.n_head_kv), np.float32)
        ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if _lib.llama_kv_bias_get(self.handle, seq_id, il, ptr, n) != n:
            raise EngineError(f"KV bias of layer {il} changed while reading it")
        return out

    def bias_set(self, il: int, bias: np.ndarray, seq_id: int = 0) -> None:
        """Set layer ``il``'s bias of every cell of ``seq_id``: ``bias`` is [n_cells, n_head_kv]."""
        arr = np.ascontiguousarray(bias, dtype=np.float32)
        n = self.bias_cells(il, seq_id)
        if n < 0:
            raise EngineError(f"no KV bias for layer {il} (bias disabled or no KV cache in that layer)")
        if arr.shape != (n, self.model.n_head_kv):
            raise EngineError(f"bias for layer {il} must be [{n}, {self.model.n_head_kv}], got {list(arr.shape)}")
        ptr = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if _lib.llama_kv_bias_set(self.handle, seq_id, il, ptr, n) != n:
            raise EngineError(f"KV bias of layer {il} changed while writing it")
