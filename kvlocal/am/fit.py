"""Fitting beta (mass matching, spec §4) and C_v (output matching, spec §5) for chosen keys.

Both solve least squares through the normal equations (Cholesky) when they are well
conditioned, and fall back to a QR/SVD least squares, then to a ridge solution; the value fit
finally falls back to the original values V[S] if all else fails or does worse.  The fallback
that ran is reported in the notes.  Nothing here returns NaN or inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.optimize import lsq_linear

from . import kernels
from .problem import HeadProblem


_MAX_COND = 1e10  # beyond this the normal equations lose too many digits: use QR instead
_RIDGE = 1e-6  # the reference's fallback ridge (fixed, unscaled)
_F16_MAX = 65504.0  # the KV cache holds values as F16


def gram(X: np.ndarray) -> np.ndarray:
    """X^T X in float64, computed in float32 as the reference solvers work (sgemm: twice dgemm's speed)."""
    X32 = np.asarray(X, np.float32)
    return (X32.T @ X32).astype(np.float64)


def solve_least_squares(X: np.ndarray, Y: np.ndarray, ridge: float = _RIDGE,
                        G: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """min ||X C - Y|| for X [n, t]; returns (C, which solver ran): normal, lstsq or ridge.
    ``G``: X^T X when the caller has it already."""
    n, t = X.shape
    if n >= t:
        G = gram(X) if G is None else G
        try:
            c, low = scipy.linalg.cho_factor(G, check_finite=False)
            diag = np.abs(np.diag(c))
            if diag.min() > 0 and (diag.max() / diag.min()) ** 2 < _MAX_COND:
                XtY = (np.asarray(X, np.float32).T @ np.asarray(Y, np.float32)).astype(np.float64)
                C = scipy.linalg.cho_solve((c, low), XtY, check_finite=False)
                if np.isfinite(C).all():
                    return C, "normal"
        except (np.linalg.LinAlgError, ValueError):
            pass
        try:
            C = scipy.linalg.lstsq(X, Y, lapack_driver="gelsd", check_finite=False)[0]
            if np.isfinite(C).all():
                return C, "lstsq"
        except (np.linalg.LinAlgError, ValueError):
            pass
    # underdetermined (n < t) or failed: ridge, in dual form when that is the smaller system
    if n < t:
        K = X @ X.T
        K[np.diag_indices_from(K)] += ridge
        try:
            C = X.T @ scipy.linalg.solve(K, Y, assume_a="pos", check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            C = np.full((t,) + Y.shape[1:], np.nan)
    else:
        G = X.T @ X
        G[np.diag_indices_from(G)] += ridge
        try:
            C = scipy.linalg.solve(G, X.T @ Y, assume_a="pos", check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            C = np.full((t,) + Y.shape[1:], np.nan)
    if not np.isfinite(C).all():
        C = np.zeros((t,) + Y.shape[1:])
        return C, "zero"
    return C, "ridge"


# ---------------------------------------------------------------------------------------------
# beta


class BetaFitter:
    def fit(self, p: HeadProblem, idx: np.ndarray, target: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """log-weights ``log w`` [t] for the keys ``idx`` (on top of any bias they carry), matching
        the block's mass z per query, or ``target`` instead (the mass left to the keys ``idx``)."""
        raise NotImplementedError


@dataclass
class ZeroBeta(BetaFitter):
    def fit(self, p, idx, target=None):
        return np.zeros(len(idx)), {}


@dataclass
class BoxNNLS(BetaFitter):
    """Box-constrained NNLS on the row-shifted mass features: min ||E[:, S] w - z||, lower <= w <= upper.

    ``method="pg"`` (the reference): clamped least squares, then ``iters`` projected-gradient
    steps with step 1/sigma^2, sigma^2 from ``power_iters`` power iterations from a seeded random
    start.  ``method="exact"``: bounded-variable least squares (scipy's BVLS), the exact optimum."""

    method: str = "pg"
    iters: int = 2
    lower: float = math.exp(-3)
    upper: float = math.exp(3)
    power_iters: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("pg", "exact") or self.iters < 0 or not 0 < self.lower < self.upper:
            raise ValueError(f"invalid NNLS settings {self}")

    def fit(self, p, idx, target=None):
        if len(idx) == 0:
            return np.zeros(0), {}
        M, y = p.weigh(p.features(idx), p.stats().z if target is None else target)
        if self.method == "exact":
            res = lsq_linear(M, y, bounds=(self.lower, self.upper), method="bvls")
            return np.log(np.clip(res.x, self.lower, self.upper)), {"beta": "bvls"}
        G = gram(M)
        w, how = solve_least_squares(M, y, G=G)
        w = np.clip(w, self.lower, self.upper)
        if self.iters:
            b = M.T @ y
            v = np.random.default_rng([self.seed, p.seed]).standard_normal(len(idx))
            sigma2 = kernels.power_sigma2(G, v / np.linalg.norm(v), self.power_iters)
            pg = kernels.projected_gradient if p.backend == "numba" else kernels.projected_gradient_numpy
            w = pg(G, b, w, self.lower, self.upper, self.iters, 1.0 / sigma2)
        return np.log(w), {"beta": how}


# ---------------------------------------------------------------------------------------------
# values


def compacted_attention(p: HeadProblem, idx: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """X [n, t]: softmax over the kept keys of q . k / sqrt(d) + beta, with beta rounded to float32
    exactly as the native bias holds it."""
    S = p.logits(keys=idx).astype(np.float64) + beta.astype(np.float32).astype(np.float64)
    S -= S.max(axis=1, keepdims=True)
    np.exp(S, out=S)
    S /= S.sum(axis=1, keepdims=True)
    return S


class ValueFitter:
    def fit(self, p: HeadProblem, idx: np.ndarray, beta: np.ndarray,
            fixed: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """C_v [t, d] for the keys ``idx`` with bias ``beta``; ``fixed`` (bool [t]): keys whose
        values stay the original ones, the others are fitted around them."""
        raise NotImplementedError


def _value_bound(p: HeadProblem, scale: float) -> float:
    """Largest |C_v| a value fit may return: ``scale`` times the block's largest |V| (beyond that the
    fit is overfit), never more than the F16 cache holds."""
    return min(scale * max(float(np.abs(p.values).max()), 1e-3), _F16_MAX)


def _around_fixed(fit_free, p: HeadProblem, idx: np.ndarray, beta: np.ndarray, fixed: np.ndarray | None):
    """Solve ``fit_free(X, Y, V) -> (C, how)`` for the free keys only, with the fixed keys'
    original values' share of the output taken out of the target; returns (C [t, d], how)."""
    X, Y = p.weigh(compacted_attention(p, idx, beta), p.stats().outputs)
    V = p.values[idx].astype(np.float64)
    if fixed is None or not fixed.any():
        return fit_free(X, Y, V)
    C = V.copy()
    free = ~fixed
    if free.any():
        C[free], how = fit_free(X[:, free], Y - X[:, fixed] @ V[fixed], V[free])
        return C, how
    return C, "fixed"


@dataclass
class DirectValues(ValueFitter):
    """C_v = V[S]: the kept keys' own values (the eviction baselines)."""

    def fit(self, p, idx, beta, fixed=None):
        return p.values[idx].astype(np.float64), {}


@dataclass
class LeastSquaresValues(ValueFitter):
    """C_v = argmin ||X C_v - Y||: X the compacted attention, Y the block's original outputs."""

    ridge: float = _RIDGE
    max_scale: float = 64.0  # fitted values beyond this multiple of the block's largest |V| are overfit

    def fit(self, p, idx, beta, fixed=None):
        if len(idx) == 0:
            return np.zeros((0, p.d)), {}
        bound = _value_bound(p, self.max_scale)

        def solve(X, Y, direct):
            C, how = solve_least_squares(X, Y, self.ridge)
            if np.abs(C).max() > bound:
                # nearly collinear attention columns: the exact fit cancels huge values; a ridge scaled
                # to the problem trades a little fit for values the F16 cache can hold
                G = gram(X)
                lam = 1e-3 * np.trace(G) / X.shape[1]
                G[np.diag_indices_from(G)] += lam
                C = scipy.linalg.solve(G, X.T @ Y, assume_a="pos", check_finite=False)
                how = "ridge-scaled"
            if not np.isfinite(C).all() or np.abs(C).max() > bound:
                return direct, f"{how}->direct"
            if how.startswith("ridge") or how == "zero":  # never do worse than copying the original values
                if np.linalg.norm(X @ C - Y) > np.linalg.norm(X @ direct - Y):
                    return direct, f"{how}->direct"
            return C, how

        C, how = _around_fixed(solve, p, idx, beta, fixed)
        return C, {"values": how}


@dataclass
class AnchoredValues(ValueFitter):
    """C_v = argmin ||X C - Y||^2 + lam ||C - V[S]||^2: least squares pulled toward the kept keys'
    own values, so that a value the queries say little about stays what it was instead of being
    blurred into its neighbours.  lam = ``rel`` * trace(X^T X) / t (scale-free); ``rel`` = 0 is
    plain least squares, ``rel`` -> inf the original values.  ``rel="auto"`` picks it from
    ``grid`` on held-out query rows (every ``holdout_every``-th), then refits on all rows."""

    rel: float | str = 1.0
    grid: tuple = (0.0, 0.01, 0.1, 1.0, 10.0)
    holdout_every: int = 5

    def __post_init__(self):
        if self.rel != "auto" and not (isinstance(self.rel, int | float) and self.rel >= 0):
            raise ValueError(f"rel must be >= 0 or 'auto', not {self.rel!r}")

    @staticmethod
    def _solve(X: np.ndarray, Y: np.ndarray, V: np.ndarray, rel: float) -> np.ndarray:
        G = gram(X)
        lam = rel * np.trace(G) / len(V)
        if lam <= 0:
            return solve_least_squares(X, Y, G=G)[0]
        XtY = (np.asarray(X, np.float32).T @ np.asarray(Y, np.float32)).astype(np.float64)
        G[np.diag_indices_from(G)] += lam
        return scipy.linalg.solve(G, XtY + lam * V, assume_a="pos", check_finite=False)

    def fit(self, p, idx, beta, fixed=None):
        if len(idx) == 0:
            return np.zeros((0, p.d)), {}
        bound = _value_bound(p, 64.0)

        def solve(X, Y, V):
            rel = self.rel
            if rel == "auto":
                held = np.zeros(len(X), bool)
                held[:: self.holdout_every] = True
                if held.all() or not held.any():
                    rel = self.grid[-1]
                else:
                    errs = [np.linalg.norm(X[held] @ self._solve(X[~held], Y[~held], V, r) - Y[held])
                            for r in self.grid]
                    rel = self.grid[int(np.argmin(errs))]
            try:
                C = self._solve(X, Y, V, float(rel))
            except (np.linalg.LinAlgError, ValueError):
                return V, "anchored->direct"
            if not np.isfinite(C).all() or np.abs(C).max() > bound:
                return V, "anchored->direct"
            return C, f"anchored-{rel:g}"

        C, how = _around_fixed(solve, p, idx, beta, fixed)
        return C, {"values": how}
