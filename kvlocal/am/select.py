"""Key selection (C_k = K[S]): HighestAttnKeys and the eviction baselines, one class each.

A selector returns ascending original indices and, when it fits them itself (OMP), the mass
weights w = exp(beta).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d, uniform_filter1d

from .problem import HeadProblem



@dataclass
class Selection:
    indices: np.ndarray  # ascending
    weights: np.ndarray | None = None  # w = exp(beta), aligned with indices


def top_t(score: np.ndarray, t: int) -> np.ndarray:
    """Indices of the t largest scores (ties to the earlier key), ascending."""
    order = np.argsort(-score, kind="stable")[:t]
    return np.sort(order)


class KeySelector:
    def select(self, p: HeadProblem) -> Selection:
        raise NotImplementedError


@dataclass
class HighestAttnKeys(KeySelector):
    """Top-t keys by an aggregate over queries of their block-local attention (spec §3.1).

    ``agg``: "rms" (AM default), "mean" or "max"; ``pool``: 1-D pooling of the scores over
    positions ("max" or "avg", kernel ``pool_kernel``), as the SnapKV baseline does."""

    agg: str = "rms"
    pool: str | None = None
    pool_kernel: int = 7

    def __post_init__(self):
        if self.agg not in ("rms", "mean", "max"):
            raise ValueError(f"agg must be rms, mean or max, not {self.agg!r}")
        if self.pool not in (None, "max", "avg") or self.pool_kernel < 1:
            raise ValueError(f"invalid pooling {self.pool!r}/{self.pool_kernel}")

    def scores(self, p: HeadProblem) -> np.ndarray:
        st = p.stats()
        score = {"rms": np.sqrt(st.a_sq / p.n), "mean": st.a_sum / p.n, "max": st.a_max}[self.agg]
        if self.pool == "max":
            score = maximum_filter1d(score, self.pool_kernel, mode="nearest")
        elif self.pool == "avg":
            score = uniform_filter1d(score, self.pool_kernel, mode="nearest")
        return score

    def select(self, p: HeadProblem) -> Selection:
        return Selection(top_t(self.scores(p), p.t))


@dataclass
class Recent(KeySelector):
    """Keep the t most recent keys (truncation of the old part)."""

    def select(self, p: HeadProblem) -> Selection:
        return Selection(top_t(p.positions.astype(np.float64), p.t))


@dataclass
class SinksAndRecent(KeySelector):
    """StreamingLLM: the first ``sinks`` keys (attention sinks) and the most recent rest."""

    sinks: int = 4

    def select(self, p: HeadProblem) -> Selection:
        n_sink = min(self.sinks, p.t)
        order = np.argsort(p.positions, kind="stable")
        keep = np.concatenate([order[:n_sink], order[n_sink:][::-1][: p.t - n_sink]])
        return Selection(np.sort(keep))


@dataclass
class RandomKeys(KeySelector):
    seed: int = 0

    def select(self, p: HeadProblem) -> Selection:
        rng = np.random.default_rng([self.seed, p.seed])
        return Selection(np.sort(rng.choice(p.T, p.t, replace=False)))
