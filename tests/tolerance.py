"""Tolerances of the engine's exactness identities, measured from the engine's own noise.

Two decodes that are equal in exact arithmetic (a cell duplicated vs bias log 2 on it, a cell
removed vs bias -inf, a per-head packed cache vs the full cache under -inf masks) differ only in
the order of their float sums, and that order depends on the CPU: ggml is built natively, so
another machine runs another SIMD path.  A fixed tolerance tuned on one CPU fails on the next
(1.6e-4 against 1e-4 on logits of magnitude 55 was seen on another EPYC).

So each identity measures the noise on its own inputs: the same state restored with its cells
in other orders (reversed, shuffled) is the same cache mathematically, and its logits differ
from the original's by exactly this kind of round-off.  The tolerance is NOISE_FACTOR times the
largest such difference, floored at FLOOR_ULPS float32 ulps of the logits' magnitude for a CPU
on which the reorders happen to agree to the bit.  Measured on an AMD EPYC (AVX-512): reorder
noise 1e-6 to 1.3e-5, identity errors 0 to 2e-5, so the identities hold with room on machines
whose noise is ten times larger.

Every identity also plants real bugs (the bias on the neighbouring cell, no bias, the wrong KV
head) and asserts each misses by more than PLANTED_MARGIN times the tolerance: a tolerance loose
enough to let a real bug through fails the test instead of passing it.
"""

from __future__ import annotations

import numpy as np

from kvlocal.kv.statecodec import parse_seq_state

EPS32 = float(np.finfo(np.float32).eps)
NOISE_FACTOR = 10.0
FLOOR_ULPS = 64
PLANTED_MARGIN = 300.0


def take_base_cells(blob: bytes, idx, n_caches: int) -> bytes:
    """The state blob with the base (global) cache's cells replaced by cells ``idx`` (any order,
    repeats allowed); an iSWA model's SWA section is left as it is."""
    state = parse_seq_state(blob, n_caches=n_caches)
    base = state.caches[0]
    i = next(k for k, s in enumerate(base.streams) if s is not None)
    base.streams[i] = base.streams[i].take(np.asarray(idx))
    return state.to_bytes()


def reorders(n_cells: int, seed: int = 0) -> list[np.ndarray]:
    """Cell orders that leave the cache the same set of (key, value, position): reversed and two
    shuffles."""
    rng = np.random.default_rng(seed)
    return [np.arange(n_cells)[::-1], rng.permutation(n_cells), rng.permutation(n_cells)]


def reorder_noise(decode_blob, blob: bytes, n_cells: int, n_caches: int) -> tuple[float, np.ndarray]:
    """(largest |logit difference| between ``decode_blob(blob)`` and the same state in other cell
    orders, the logits of ``blob`` itself)."""
    ref = decode_blob(blob)
    noise = max(float(np.abs(decode_blob(take_base_cells(blob, order, n_caches)) - ref).max())
                for order in reorders(n_cells))
    return noise, ref


def tolerance(noise: float, reference: np.ndarray) -> float:
    return max(NOISE_FACTOR * noise, FLOOR_ULPS * EPS32 * float(np.abs(reference).max()))


def assert_identity(got: np.ndarray, want: np.ndarray, tol: float, planted: dict[str, np.ndarray],
                    what: str = "") -> None:
    """``got`` equals ``want`` within ``tol``, and every planted bug is caught with margin."""
    assert np.isfinite(got).all(), what
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{what}: max |diff| {err:.3g} > tolerance {tol:.3g}"
    for name, wrong in planted.items():
        miss = float(np.abs(wrong - want).max())
        assert miss > PLANTED_MARGIN * tol, (
            f"{what}: the planted bug '{name}' moves the logits by only {miss:.3g}, "
            f"not {PLANTED_MARGIN:g} x the tolerance {tol:.3g}: the identity could not tell it apart")
