"""What kvlocal needs to know about a model: its attention, whether kvlocal supports it, and the
fingerprint a session file is checked against."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from ..errors import ModelError
from . import binding

# architectures whose attention kvlocal has tested: post-RoPE Q is the `Qcur-<il>` ROPE node,
# the KV cache is a plain (or iSWA) llama_kv_cache and cells carry no extension data
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_swa: int
    swa_layers: tuple[bool, ...]
    query_scale: float  # q_ref = query_scale * Qcur, so that logits = q_ref . k / sqrt(head_dim)
    n_ctx_train: int
    n_vocab: int

    @property
    def n_rep(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def is_iswa(self) -> bool:
        return any(self.swa_layers)

    @property
    def base_layers(self) -> tuple[int, ...]:
        """Layers whose K/V live in the base (global) cache: those kvlocal compacts."""
        return tuple(il for il, swa in enumerate(self.swa_layers) if not swa)

    @property
    def n_caches(self) -> int:
        """Cache sections of a state blob: base, then SWA for iSWA models."""
        return 2 if self.is_iswa else 1

    @classmethod
    def from_model(cls, model) -> ModelInfo:
        """From a loaded ``binding.Model``; raises ModelError for unsupported architectures."""
        arch = model.arch
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(f"unsupported architecture {arch!r} ({model.path.name}); kvlocal supports "
                             + ", ".join(SUPPORTED_ARCHS))
        n_head, n_head_kv, d = model.n_head, model.n_head_kv, model.head_dim
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelError(f"{model.path.name}: {n_head} query heads do not split into {n_head_kv} KV groups")
        return cls(arch=arch, n_layer=model.n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=d,
                   n_swa=model.n_swa, swa_layers=tuple(model.swa_layers()), query_scale=query_scale(model),
                   n_ctx_train=model.n_ctx_train, n_vocab=model.n_vocab)


def query_scale(model) -> float:
    """Factor from the captured ``Qcur`` to a query whose logits are ``q . k / sqrt(d)``.

    llama, qwen2 and qwen3 attend with kq_scale = 1/sqrt(d) on Qcur: factor 1.  gemma3 multiplies
    Qcur by f_attention_scale after the node and uses kq_scale = 1: factor f * sqrt(d), with
    f = 1/sqrt(d), or 1/sqrt(n_embd/n_head) for the 62-layer 27B (src/models/gemma3.cpp).
    """
    d = model.head_dim
    if model.arch == "gemma3":
        f = 1.0 / math.sqrt(model.n_embd / model.n_head) if model.n_layer == 62 else 1.0 / math.sqrt(d)
        return f * math.sqrt(d)
    return 1.0


def model_fingerprint(model: binding.Model) -> dict:
    """What must match between the model a session was made with and the one reloading it
    (computed once per loaded model)."""
    cached = getattr(model, "_kvlocal_fingerprint", None)
    if cached is None:
        cached = model._kvlocal_fingerprint = _fingerprint(model)
    return dict(cached)


def _fingerprint(model: binding.Model) -> dict:
    path = model.path
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:  # the header (metadata, vocabulary, tensor table) and a tail of weights
        h.update(fh.read(8 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read())
    tok = hashlib.sha256()
    for i in range(model.n_vocab):
        tok.update(model.token_bytes(i, special=True) + b"\0")
    arch = model.arch
    rope = {k: model.meta(f"{arch}.rope.{k}") for k in ("freq_base", "dimension_count", "scaling.type",
                                                          "scaling.factor")}
    return {"model.name": path.name, "model.arch": arch, "model.n_layer": model.n_layer, "model.n_head": model.n_head,
            "model.n_head_kv": model.n_head_kv, "model.head_dim": model.head_dim, "model.n_embd": model.n_embd,
            "model.n_vocab": model.n_vocab, "model.n_ctx_train": model.n_ctx_train,
            "model.rope": json.dumps({k: v for k, v in rope.items() if v is not None}, sort_keys=True),
            "model.file_sha256": h.hexdigest(), "model.tokenizer_sha256": tok.hexdigest()}
