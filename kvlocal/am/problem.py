"""One Attention Matching problem: a (layer, KV head) block of keys, its values and its queries.

Logit convention (the one the native bias executes): ``s_ij = q_i . k_j / sqrt(d) + bias_j``;
a compacted block answers with ``q . C_k / sqrt(d) + beta`` (beta not scaled).  Statistics over
all T keys are computed once, in blocks of queries (the n x T score matrix is never held whole,
except by OMP, one head at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .facts import as_fact_ranks

BACKENDS = ("numba", "numpy")


@dataclass
class BlockStats:
    """Per query: row max m and mass z over the block; block-local outputs Y = softmax(s) V;
    per key: sum, sum of squares and max over queries of the block-local attention A = E / z."""

    m: np.ndarray  # float32 [n]
    z: np.ndarray  # float64 [n]
    outputs: np.ndarray  # float64 [n, d]
    a_sum: np.ndarray  # float64 [T]
    a_sq: np.ndarray
    a_max: np.ndarray


@dataclass
class HeadProblem:
    keys: np.ndarray  # [T, d]
    values: np.ndarray  # [T, d]
    queries: np.ndarray  # [n, d], pooled over the GQA group
    t: int  # keys to keep
    bias: np.ndarray | None = None  # [T] logit bias the keys already carry (re-compaction)
    positions: np.ndarray | None = None  # [T] original positions (recency baselines)
    # [T] bool: the key is a fact token (numbers, names; kvlocal.am.facts), or uint8 fact ranks
    # (kvlocal.am.facts.fact_ranks: 0 no fact, higher kept first); either becomes uint8 ranks (so
    # dataclasses.replace keeps them), ``fact_ranks`` names them and ``fact_mask`` gives the bool
    facts: np.ndarray | None = None
    key_scores: np.ndarray | None = None  # [T] importance measured by the engine (KVzip), if any
    # [n] positive weight of each query row in the beta and value fits (None: all 1); the selection and
    # the error metrics count every row alike
    row_weights: np.ndarray | None = None
    backend: str = "numba"
    block: int = 2048
    seed: int = 0
    _stats: BlockStats | None = field(default=None, repr=False)
    _qs: np.ndarray | None = field(default=None, repr=False)

    @property
    def fact_ranks(self) -> np.ndarray | None:
        """uint8 fact rank per key (``facts`` as validated), None without facts."""
        return self.facts

    @property
    def fact_mask(self) -> np.ndarray | None:
        """bool per key: is it a fact token (fact rank above 0)?  None without facts."""
        return None if self.fact_ranks is None else self.fact_ranks > 0

    def __post_init__(self):
        self.keys = np.ascontiguousarray(self.keys, np.float32)
        self.values = np.ascontiguousarray(self.values, np.float32)
        self.queries = np.ascontiguousarray(self.queries, np.float32)
        T, d = self.keys.shape
        if T < 1 or self.values.shape != (T, d) or self.queries.ndim != 2 or self.queries.shape[1] != d:
            raise ValueError(f"shapes K {self.keys.shape}, V {self.values.shape}, Q {self.queries.shape} "
                             "must be [T, d], [T, d], [n, d] with T >= 1")
        if len(self.queries) < 1:
            raise ValueError("a head needs at least one reference query")
        if not (np.isfinite(self.keys).all() and np.isfinite(self.values).all() and np.isfinite(self.queries).all()):
            raise ValueError("keys, values and queries must be finite")
        if not 0 <= self.t:
            raise ValueError(f"target size must be >= 0, got {self.t}")
        if self.bias is not None:
            self.bias = np.asarray(self.bias, np.float32)
            if self.bias.shape != (T,) or np.isnan(self.bias).any() or np.isposinf(self.bias).any():
                raise ValueError("bias must be [T] without NaN or +inf")
        if self.positions is None:
            self.positions = np.arange(T)
        if self.facts is not None:
            self.facts = as_fact_ranks(self.facts)
            if self.facts.shape != (T,):
                raise ValueError(f"facts must be [T] booleans or fact ranks, got shape {self.facts.shape}")
        if self.key_scores is not None:
            self.key_scores = np.asarray(self.key_scores, np.float32)
            if self.key_scores.shape != (T,) or not np.isfinite(self.key_scores).all():
                raise ValueError(f"key_scores must be [T] finite floats, got shape {self.key_scores.shape}")
        if self.row_weights is not None:
            self.row_weights = np.asarray(self.row_weights, np.float64)
            if self.row_weights.shape != (len(self.queries),) or not (np.isfinite(self.row_weights).all()
                                                                     and (self.row_weights > 0).all()):
                raise ValueError(f"row_weights must be [n] finite positive floats, got shape {self.row_weights.shape}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")

    @property
    def T(self) -> int:
        return self.keys.shape[0]

    @property
    def n(self) -> int:
        return self.queries.shape[0]

    @property
    def d(self) -> int:
        return self.keys.shape[1]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.d)

    @property
    def scaled_queries(self) -> np.ndarray:
        """Q / sqrt(d), float32 (scaling the n x d queries is cheaper than the n x T logits)."""
        if self._qs is None:
            self._qs = self.queries * np.float32(self.scale)
        return self._qs

    def weigh(self, *rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each array's rows (one per query) times sqrt(row weight): a least squares over the
        weighed rows is the weighted one (the arrays themselves without weights)."""
        if self.row_weights is None:
            return rows
        s = np.sqrt(self.row_weights)
        return tuple(a * (s if a.ndim == 1 else s[:, None]) for a in rows)

    def kvzip_scores(self) -> np.ndarray:
        """The engine-measured key scores as float64, or a clear error if the queries carried none."""
        if self.key_scores is None:
            raise ValueError("no KVzip key scores on this head: collect queries with the 'kvzip' source")
        return self.key_scores.astype(np.float64)

    def logits(self, rows: slice | np.ndarray = slice(None), keys: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``q . k / sqrt(d)`` (no bias) for query rows x keys (all keys if None)."""
        k = self.keys if keys is None else self.keys[keys]
        q = self.scaled_queries[rows]
        if out is None:
            return q @ k.T
        return np.dot(q, k.T, out=out)

    def stats(self) -> BlockStats:
        """One blocked pass over the queries (memory: block x T floats)."""
        if self._stats is None:
            col = kernels.column_stats if self.backend == "numba" else kernels.column_stats_numpy
            m = np.empty(self.n, np.float32)
            z = np.empty(self.n, np.float64)
            out = np.empty((self.n, self.d), np.float64)
            a_sum, a_sq, a_max = np.zeros(self.T), np.zeros(self.T), np.zeros(self.T)
            buf = np.empty((min(self.block, self.n), self.T), np.float32)
            for lo in range(0, self.n, self.block):
                rows = slice(lo, min(self.n, lo + self.block))
                E = self.logits(rows, out=buf[: rows.stop - lo])
                m[rows], z[rows] = kernels.softmax_rows_inplace(E, self.bias)
                out[rows] = (E @ self.values) / z[rows, None]
                s1, s2, mx = col(E, z[rows])
                a_sum += s1
                a_sq += s2
                np.maximum(a_max, mx, out=a_max)
            self._stats = BlockStats(m, z, out, a_sum, a_sq, a_max)
        return self._stats

    def mass_features(self) -> tuple[np.ndarray, np.ndarray]:
        """The full mass-feature matrix E [n, T] (float32) and z [n]: OMP's working set."""
        E = self.logits()
        _, z = kernels.softmax_rows_inplace(E, self.bias)
        return E, z

    def features(self, keys: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """Mass features of chosen keys against the block's row max: ``exp(s[:, keys] + bias - m)``
        as float64 [n, len(keys)].  ``bias`` defaults to the keys' existing bias."""
        st = self.stats()
        S = self.logits(keys=keys).astype(np.float64)
        b = self.bias[keys] if (bias is None and self.bias is not None) else bias
        if b is not None:
            S += b
        return np.exp(S - st.m[:, None])


@dataclass
class HeadResult:
    """Kept original keys (ascending indices), their beta [t'] and fitted values [t', d]."""

    indices: np.ndarray
    beta: np.ndarray
    values: np.ndarray
    notes: dict = field(default_factory=dict)

    @property
    def t(self) -> int:
        return len(self.indices)
