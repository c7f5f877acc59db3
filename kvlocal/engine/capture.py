"""Capture post-RoPE queries with llama.cpp's eval callback while a session decodes.

Only the wanted layers' ``Qcur-<il>`` ROPE nodes are observed (each costs one graph split and
a copy of ``[n_tokens, n_head, d]``), scaled by ``ModelInfo.query_scale`` and stored as float16
or float32; nothing else of the graph is kept.
"""

from __future__ import annotations

import numpy as np

from ..kv.queryset import QuerySet


class QueryCapture:
    """Collects queries of ``layers`` (default: the base layers) for every decoded token."""

    def __init__(self, info, layers=None, dtype=np.float16, source: str = ""):
        self.info = info
        self.layers = tuple(info.base_layers if layers is None else layers)
        bad = [il for il in self.layers if not 0 <= il < info.n_layer]
        if bad:
            raise ValueError(f"no layers {bad} in a {info.n_layer}-layer model")
        self.dtype = np.dtype(dtype)
        self.source = source
        self._names = {f"Qcur-{il}": il for il in self.layers}
        self._chunks: dict[int, list[np.ndarray]] = {il: [] for il in self.layers}
        self._positions: list[np.ndarray] = []

    # the TensorTap interface
    def select(self, name: str, op: str) -> bool:
        return op == "ROPE" and name in self._names

    def sink(self, name: str, op: str, arr: np.ndarray) -> None:  # noqa: ARG002
        q = arr[0]  # (ne3, ne2, ne1, ne0) = (1, n_tokens, n_head, d)
        if self.info.query_scale != 1.0:
            q = q * np.float32(self.info.query_scale)
        self._chunks[self._names[name]].append(q.astype(self.dtype, copy=False))

    def add_positions(self, positions: np.ndarray) -> None:
        """The session reports the positions of every batch it decodes while capturing."""
        self._positions.append(np.asarray(positions, np.int32))

    def keep_last(self, n_tokens: int) -> None:
        """Forget all but the last ``n_tokens`` captured tokens (a long capture stays bounded)."""
        positions = np.concatenate(self._positions) if self._positions else np.zeros(0, np.int32)
        if len(positions) <= n_tokens:
            return
        self._positions = [positions[len(positions) - n_tokens:].copy()]
        for il, chunks in self._chunks.items():
            q = np.concatenate(chunks)
            self._chunks[il] = [q[len(q) - n_tokens:].copy()]

    def result(self) -> QuerySet:
        positions = np.concatenate(self._positions) if self._positions else np.zeros(0, np.int32)
        layers = {}
        for il, chunks in self._chunks.items():
            q = np.concatenate(chunks) if chunks else np.zeros((0, self.info.n_head, self.info.head_dim), self.dtype)
            if len(q) != len(positions):
                raise RuntimeError(f"layer {il}: captured {len(q)} query rows for {len(positions)} tokens")
            layers[il] = q
        return QuerySet(layers, positions, [self.source] if self.source else [])


class KVzipCapture(QueryCapture):
    """Queries, and KVzip's key importance read from the engine's own attention probabilities.

    While a repeat prompt for the document chunk ``[lo, hi)`` (cell index = position, as after a
    fresh ingest or restore) decodes in a scratch sequence, every observed layer's ``kq_soft_max``
    ``[n_kv, n_tokens, n_head]`` is renormalised over the cells KVzip attends within (the sink
    ``[0, sink)``, the chunk, and the repeat tokens' own cells ``[own, n_kv)``): a softmax over a
    subset R of the columns is ``p_j / sum_R p``, so this is exact.  The score of a chunk key is the
    largest renormalised probability any query head of its group and any repeat token gives it
    (KVzip, Kim et al. 2025, Alg. 1: max over GQA group and repeat positions).  ``scores[il]`` is
    ``[n_head_kv, n_positions]`` float32; positions never scored stay 0."""

    def __init__(self, info, n_positions: int, layers=None, dtype=np.float16, source: str = "kvzip"):
        super().__init__(info, layers, dtype, source)
        self._attn = {f"kq_soft_max-{il}": il for il in self.layers}
        self.scores = {il: np.zeros((info.n_head_kv, n_positions), np.float32) for il in self.layers}
        self.window: tuple[int, int, int, int] | None = None  # (sink, lo, hi, own)

    def select(self, name: str, op: str) -> bool:
        return super().select(name, op) or (op == "SOFT_MAX" and name in self._attn)

    def sink(self, name: str, op: str, arr: np.ndarray) -> None:
        if op != "SOFT_MAX":
            return super().sink(name, op, arr)
        if self.window is None:
            raise RuntimeError("KVzipCapture: no chunk window set")
        sink, lo, hi, own = self.window
        p = arr[0]  # (n_head, n_tokens, n_kv)
        if p.shape[-1] < own or p.shape[0] != self.info.n_head:
            raise RuntimeError(f"{name}: attention over {p.shape[-1]} cells, expected at least {own}")
        mass = p[..., :sink].sum(-1) + p[..., lo:hi].sum(-1) + p[..., own:].sum(-1)  # (n_head, n_tokens)
        best = (p[..., lo:hi] / np.maximum(mass, np.float32(1e-30))[..., None]).max(axis=1)  # (n_head, chunk)
        n_rep = self.info.n_head // self.info.n_head_kv
        best = best.reshape(self.info.n_head_kv, n_rep, hi - lo).max(axis=1)
        out = self.scores[self._attn[name]]
        np.maximum(out[:, lo:hi], best, out=out[:, lo:hi])
