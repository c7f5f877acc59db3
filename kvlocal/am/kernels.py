"""Numba kernels for the hot loops, each with a plain numpy reference of the same contract.

Conventions: logits are ``s_ij = q_i . k_j / sqrt(d) + bias_j`` in float32; the mass features of
a query row are ``E_ij = exp(s_ij - m_i)`` with ``m_i = max_j s_ij`` and ``z_i = sum_j E_ij``
(Attention Matching spec §3-4: the per-row shift is part of the method, not only a guard).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# ---------------------------------------------------------------------------------------------
# exp-score rows: numpy's vectorised float32 exp (AVX-512 here) beats a numba loop of scalar
# exps by about 4x, so both backends use it


def softmax_rows_inplace(S: np.ndarray, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Turn logits ``S [n, T]`` (float32) into mass features E in place; returns (m, z)."""
    if bias is not None:
        S += bias
    m = S.max(axis=1)
    S -= m[:, None]
    np.exp(S, out=S)
    return m, S.sum(axis=1, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# per-key aggregates of the block-local attention A = E / z


_STAT_CHUNKS = 8


@njit(parallel=True, cache=True, nogil=True)
def _column_stats(E, z, n_chunks):
    n, T = E.shape
    s1 = np.zeros((n_chunks, T))
    s2 = np.zeros((n_chunks, T))
    mx = np.zeros((n_chunks, T))
    step = (n + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        for i in range(c * step, min(n, (c + 1) * step)):
            inv = 1.0 / z[i]
            for j in range(T):
                a = E[i, j] * inv
                s1[c, j] += a
                s2[c, j] += a * a
                if a > mx[c, j]:
                    mx[c, j] = a
    return s1, s2, mx


def column_stats(E: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum_i A_ij, sum_i A_ij^2, max_i A_ij) with A = E / z[:, None]."""
    # a fixed number of partial sums, not one per thread: the bits do not depend on how many
    # threads numba runs (the parallel head solver runs each head on one)
    chunks = max(1, min(len(E), _STAT_CHUNKS))
    s1, s2, mx = _column_stats(E, z.astype(np.float64), chunks)
    return s1.sum(axis=0), s2.sum(axis=0), mx.max(axis=0)


def column_stats_numpy(E: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain reference of ``column_stats``: materialises A = E / z."""
    A = E / z[:, None]
    return A.sum(axis=0, dtype=np.float64), (A.astype(np.float64) ** 2).sum(axis=0), A.max(axis=0).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Cholesky of a growing Gram matrix (OMP refits) and projected gradient (box NNLS)


@njit(cache=True, nogil=True)
def chol_append(L, n, g, g_nn, eps):
    """Extend the Cholesky factor ``L[:n, :n]`` of G by one column: g = G[:n, n], g_nn = G[n, n].

    A column (nearly) in the span of the others gets a pivot of sqrt(eps * g_nn) instead of 0."""
    acc = 0.0
    for i in range(n):
        s = g[i]
        for k in range(i):
            s -= L[i, k] * L[n, k]
        L[n, i] = s / L[i, i]
        acc += L[n, i] * L[n, i]
    d2 = g_nn - acc
    floor = eps * g_nn if g_nn > 0 else eps
    L[n, n] = np.sqrt(d2 if d2 > floor else floor)
    for i in range(n + 1, L.shape[1]):
        L[n, i] = 0.0


@njit(cache=True, nogil=True)
def chol_solve(L, n, b):
    """Solve (L L^T) x = b for the leading n x n block."""
    y = np.empty(n)
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= L[i, k] * y[k]
        y[i] = s / L[i, i]
    x = np.empty(n)
    for i in range(n - 1, -1, -1):
        s = y[i]
        for k in range(i + 1, n):
            s -= L[k, i] * x[k]
        x[i] = s / L[i, i]
    return x


@njit(cache=True, nogil=True)
def projected_gradient(G, b, w, lower, upper, iters, eta):
    """``iters`` steps of w <- clip(w - eta (G w - b), lower, upper): box NNLS in normal form."""
    t = len(w)
    for _ in range(iters):
        grad = G @ w - b
        for j in range(t):
            v = w[j] - eta * grad[j]
            w[j] = lower if v < lower else (upper if v > upper else v)
    return w


def projected_gradient_numpy(G, b, w, lower, upper, iters, eta):
    for _ in range(iters):
        w = np.clip(w - eta * (G @ w - b), lower, upper)
    return w


@njit(cache=True, nogil=True)
def power_sigma2(G, v, iters):
    """Estimate (from below) of the largest eigenvalue of the PSD matrix G: ``iters`` power steps from v."""
    lam = 0.0
    for _ in range(iters):
        u = G @ v
        lam = np.sqrt((u * u).sum())
        if lam == 0.0:
            return 1.0
        v = u / lam
    return lam
