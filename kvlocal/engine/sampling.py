"""Token sampling on logits with numpy: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sampler:
    """``temperature == 0`` is greedy; otherwise top-k, then top-p (nucleus), then a seeded draw."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampler settings {self}")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.temperature == 0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if self.top_k:
            order = order[: self.top_k]
        z = logits[order] / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            p = p[:keep] / p[:keep].sum()
            order = order[:keep]
        return int(order[self._rng.choice(len(p), p=p)])


@dataclass
class NoRepeatNgram:
    """``inner`` with every token ruled out that would repeat an ``n``-gram this sampler already
    produced (the guard against the loops greedy decoding falls into on small models)."""

    inner: Sampler
    n: int = 4
    _seen: dict = field(default_factory=dict, repr=False)  # (n-1)-gram -> tokens that followed it
    _out: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.n < 2:
            raise ValueError("an n-gram guard needs n >= 2")

    def __call__(self, logits: np.ndarray) -> int:
        key = tuple(self._out[-(self.n - 1):]) if len(self._out) >= self.n - 1 else None
        banned = self._seen.get(key)
        if banned:
            logits = np.array(logits, dtype=np.float64).reshape(-1)
            logits[list(banned)] = -np.inf
        tok = self.inner(logits)
        if key is not None:
            self._seen.setdefault(key, set()).add(tok)
        self._out.append(tok)
        return tok


GREEDY = Sampler()
