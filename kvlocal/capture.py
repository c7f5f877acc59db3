"""Capture post-RoPE queries with llama.cpp's eval callback while a session decodes.

Only the wanted layers' ``Qcur-<il>`` ROPE nodes are observed (each costs one graph split and
a copy of ``[n_tokens, n_head, d]``), scaled by ``ModelInfo.query_scale`` and stored as float16
or float32; nothing else of the graph is kept.
"""

from __future__ import annotations

import numpy as np

from .queryset import QuerySet


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

    def result(self) -> QuerySet:
        positions = np.concatenate(self._positions) if self._positions else np.zeros(0, np.int32)
        layers = {}
        for il, chunks in self._chunks.items():
            q = np.concatenate(chunks) if chunks else np.zeros((0, self.info.n_head, self.info.head_dim), self.dtype)
            if len(q) != len(positions):
                raise RuntimeError(f"layer {il}: captured {len(q)} query rows for {len(positions)} tokens")
            layers[il] = q
        return QuerySet(layers, positions, [self.source] if self.source else [])
