"""OMP on attention mass (spec §3.2): greedily pick keys whose mass features best explain the
residual mass, refit their weights by clamped least squares, drop keys whose weight falls below
exp(-7) and resume (at most ``max_rounds`` times; keys still below the cutoff after that are
dropped without resuming, so fewer than t keys may come back).

    r = z; S = {}
    while |S| < t:
        corr = E^T r  (raw, signed)            pick the top k_choice keys not in S and not dropped
        every refit_interval-th step: w = clip(lstsq(E[:, S], z), lower, upper)
        otherwise: the new keys get w = lower
        r = z - E[:, S] w

``backend="numba"`` refits through an incrementally grown Cholesky factor of E[:, S]^T E[:, S]
(one O(n|S|) Gram column and an O(|S|^2) update per key); ``backend="numpy"`` is the plain
reference that solves ``lstsq(E[:, S], z)`` from scratch at every refit.  Both give the same
keys on well-conditioned problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import kernels
from .problem import HeadProblem
from .select import KeySelector, Selection

# (keys below which this step applies or None, keys per step, refit every n-th step)
PROGRESSIVE_SCHEDULE = ((300, 1, 1), (1500, 2, 2), (None, 4, 2))
_EPS_PIVOT = 1e-10


class _CholeskyRefit:
    """Weights of the selected columns by normal equations on a growing Cholesky factor."""

    def __init__(self, E: np.ndarray, z: np.ndarray, t_max: int):
        self.E, self.z = E, z
        self.cols = np.empty((E.shape[0], t_max), np.float64, order="F")
        self.L = np.zeros((t_max, t_max))
        self.b = np.zeros(t_max)
        self.n = 0

    def add(self, j: int) -> None:
        k = self.n
        col = self.E[:, j].astype(np.float64)
        self.cols[:, k] = col
        g = self.cols[:, :k].T @ col
        kernels.chol_append(self.L, k, g, float(col @ col), _EPS_PIVOT)
        self.b[k] = col @ self.z
        self.n += 1

    def solve(self) -> np.ndarray:
        return kernels.chol_solve(self.L, self.n, self.b[: self.n])

    def rebuild(self, keys: list[int]) -> None:
        self.n = 0
        for j in keys:
            self.add(j)

    def current(self, w: np.ndarray) -> np.ndarray:
        return self.cols[:, : self.n] @ w


class _LstsqRefit:
    """The plain reference: lstsq on E[:, S] from scratch at every refit."""

    def __init__(self, E: np.ndarray, z: np.ndarray, t_max: int):  # noqa: ARG002
        self.E, self.z, self.keys = E, z, []

    def add(self, j: int) -> None:
        self.keys.append(j)

    @property
    def n(self) -> int:
        return len(self.keys)

    def solve(self) -> np.ndarray:
        M = self.E[:, self.keys].astype(np.float64)
        return np.linalg.lstsq(M, self.z, rcond=None)[0]

    def rebuild(self, keys: list[int]) -> None:
        self.keys = list(keys)

    def current(self, w: np.ndarray) -> np.ndarray:
        return self.E[:, self.keys].astype(np.float64) @ w


@dataclass
class OMP(KeySelector):
    k_choice: int = 1
    refit_interval: int = 1
    schedule: tuple | None = None  # e.g. PROGRESSIVE_SCHEDULE; overrides k_choice/refit_interval
    lower: float = 1e-12
    upper: float = math.exp(7)
    drop_cutoff: float | None = -7.0  # drop keys with log w below this, then resume
    max_rounds: int = 3

    def __post_init__(self):
        if self.k_choice < 1 or self.refit_interval < 1 or self.max_rounds < 0:
            raise ValueError("k_choice and refit_interval must be >= 1, max_rounds >= 0")
        if not 0 < self.lower < self.upper:
            raise ValueError("need 0 < lower < upper")

    def step(self, n_selected: int) -> tuple[int, int]:
        """(keys per step, refit interval) at the current selection size."""
        if self.schedule is None:
            return self.k_choice, self.refit_interval
        for limit, k, interval in self.schedule:
            if limit is None or n_selected < limit:
                return k, interval
        return self.k_choice, self.refit_interval

    def select(self, p: HeadProblem) -> Selection:
        E, z = p.mass_features()
        return self._run(E, z, p.t, np.zeros(p.T, bool), p.backend)

    def select_around(self, p: HeadProblem, fixed: np.ndarray, t: int) -> Selection:
        """``t`` more keys next to the ``fixed`` ones (indices), which keep their own mass (w = 1):
        OMP explains the mass they leave, ``max(z - sum of their features, 0)``, from the other keys."""
        E, z = p.mass_features()
        fixed = np.asarray(fixed, np.int64)
        target = np.maximum(z - E[:, fixed].sum(axis=1, dtype=np.float64), 0.0) if len(fixed) else z
        excluded = np.zeros(p.T, bool)
        excluded[fixed] = True
        return self._run(E, target, min(t, p.T - len(fixed)), excluded, p.backend)

    def _run(self, E: np.ndarray, z: np.ndarray, t: int, excluded: np.ndarray, backend: str) -> Selection:
        T = E.shape[1]
        if t <= 0:
            return Selection(np.zeros(0, np.int64), np.zeros(0))
        refit = (_CholeskyRefit if backend == "numba" else _LstsqRefit)(E, z, t)
        S: list[int] = []
        w = np.zeros(0)
        excluded = excluded.copy()
        r = z.copy()
        it = rounds = 0
        stale = False  # keys added since the last refit hold w = lower
        while True:
            while len(S) < t:
                k, interval = self.step(len(S))
                corr = (r.astype(np.float32) @ E).astype(np.float64)
                corr[S] = -np.inf
                corr[excluded] = -np.inf
                k = min(k, t - len(S))
                pick = np.argsort(-corr, kind="stable")[:k]
                pick = [int(j) for j in pick if np.isfinite(corr[j])]
                if not pick:  # every key is selected or dropped
                    break
                for j in pick:
                    refit.add(j)
                    S.append(j)
                if it % interval == 0:
                    w = np.clip(refit.solve(), self.lower, self.upper)
                    stale = False
                else:
                    w = np.concatenate([w, np.full(len(pick), self.lower)])
                    stale = True
                r = z - refit.current(w)
                it += 1
            if self.drop_cutoff is None:
                if stale:  # unlike the reference, never return lazily added keys unfitted
                    w = np.clip(refit.solve(), self.lower, self.upper)
                break
            if not S:
                break
            w = np.clip(refit.solve(), self.lower, self.upper)
            drop = np.log(w) < self.drop_cutoff
            if not drop.any():
                break
            rounds += 1
            excluded[np.asarray(S)[drop]] = True
            S = [j for j, dropped in zip(S, drop, strict=True) if not dropped]
            w = w[~drop]
            refit.rebuild(S)
            r = z - refit.current(w)
            # after the last round, or with no key left to try, return what stays (fewer than t keys)
            if rounds > self.max_rounds or excluded.sum() + len(S) >= T or not S:
                if S:
                    w = np.clip(refit.solve(), self.lower, self.upper)
                break
        order = np.argsort(S)
        return Selection(np.asarray(S, dtype=np.int64)[order], w[order] if len(S) else np.zeros(0))
