"""Reference queries: captured post-RoPE Q per layer, and their KV-head view (numpy only).

A ``QuerySet`` holds, for each captured layer, ``[n_tokens, n_head, d]`` queries scaled so
that attention logits are ``q . k / sqrt(d)`` (see ModelInfo.query_scale), together with the
absolute position of each token row and its anchor: the document position the token reads or
copies (its own position for context-prefill, the copied token's for repeat-prefill), -1 for
tokens about the whole document, ``RECALL`` (-2) for recall probes: tokens written while the model
recalls specific content (numbers, names) from anywhere in it.  Rows are the same tokens in every
layer.  A source that measures key importance in the engine itself (KVzip) adds ``key_scores``:
per layer ``[n_head_kv, n_positions]``, one score per KV head and document position; they travel
with the rows (taking rows keeps them, concatenating takes the larger score).  A source that samples
what it says (self-study, recall probes) keeps the token streams it decoded in ``streams`` (per
source name, one stream per scratch conversation), so that on-policy stages can decode the same
tokens again through a compacted cache and row i stays the same token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

RECALL = -2  # anchor of recall-probe rows (see the module docstring)


@dataclass
class QuerySet:
    layers: dict[int, np.ndarray]  # il -> [n_tokens, n_head, d]
    positions: np.ndarray  # int32 [n_tokens]
    sources: list[str] = field(default_factory=list)
    anchors: np.ndarray | None = None  # int32 [n_tokens], -1: no particular document position
    key_scores: dict[int, np.ndarray] | None = None  # il -> float32 [n_head_kv, n_positions]
    streams: dict[str, tuple[np.ndarray, ...]] = field(default_factory=dict)  # source -> decoded token streams

    def __post_init__(self):
        if self.anchors is None:
            self.anchors = np.full(len(self.positions), -1, np.int32)

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    def kv_heads(self, il: int, n_head_kv: int) -> np.ndarray:
        """Layer ``il``'s queries per KV head, group-major: ``[n_head_kv, n_rep * n_tokens, d]``.

        Query head h belongs to KV head h // n_rep; a KV head's rows are its group's heads one
        after the other (all tokens of its first head, then of its second, ...)."""
        q = self.layers[il]
        n, n_head, d = q.shape
        if n_head % n_head_kv:
            raise ValueError(f"{n_head} query heads do not split into {n_head_kv} groups")
        n_rep = n_head // n_head_kv
        return np.ascontiguousarray(q.reshape(n, n_head_kv, n_rep, d).transpose(1, 2, 0, 3)).reshape(
            n_head_kv, n_rep * n, d)

    def take(self, rows) -> QuerySet:
        rows = np.asarray(rows, dtype=np.intp)
        return QuerySet({il: q[rows] for il, q in self.layers.items()}, self.positions[rows], list(self.sources),
                        self.anchors[rows], self.key_scores, dict(self.streams))

    def recall_rows(self) -> QuerySet | None:
        """The recall-probe rows, or None if there are none."""
        rows = np.flatnonzero(self.anchors == RECALL)
        return self.take(rows) if len(rows) else None

    def for_range(self, lo: int, hi: int) -> QuerySet:
        """Rows anchored in document positions [lo, hi) plus the unanchored rows."""
        return self.take(np.flatnonzero(((self.anchors >= lo) & (self.anchors < hi)) | (self.anchors < 0)))

    def subsample(self, per_kv_head: int, n_rep: int, seed: int = 0, after: float | None = None) -> QuerySet:
        """At most ``per_kv_head`` queries per KV head: ceil(per_kv_head / n_rep) token rows, drawn
        with ``seed``, the same rows for every layer and head (kept in token order).

        ``after``: that share of the rows (as far as there are such rows) from the queries asked
        after the document (no anchor in it: self-study, recall probes), the rest from the rows
        that read it (repeat- and context-prefill); None: drawn alike from all rows."""
        rows = self.subsample_rows(per_kv_head, n_rep, seed, after)
        return self if len(rows) == self.n_tokens else self.take(rows)

    def subsample_rows(self, per_kv_head: int, n_rep: int, seed: int = 0, after: float | None = None,
                       among: np.ndarray | None = None) -> np.ndarray:
        """The rows ``subsample`` takes (ascending indices), drawn from the rows ``among`` (default:
        every row); all of them when they are no more than the budget."""
        if per_kv_head < 1:
            raise ValueError("per_kv_head must be at least 1")
        if after is not None and not 0 <= after <= 1:
            raise ValueError(f"after must be a share in [0, 1], got {after}")
        pool = np.arange(self.n_tokens) if among is None else np.asarray(among, np.intp)
        n_rows = math.ceil(per_kv_head / n_rep)
        if n_rows >= len(pool):
            return pool
        rng = np.random.default_rng(seed)
        if after is None:
            return np.sort(rng.choice(pool, n_rows, replace=False))
        late, reading = pool[self.anchors[pool] < 0], pool[self.anchors[pool] >= 0]
        n_late = max(min(len(late), int(round(after * n_rows))), n_rows - len(reading))
        return np.sort(np.concatenate([rng.choice(late, n_late, replace=False),
                                       rng.choice(reading, n_rows - n_late, replace=False)]))

    @staticmethod
    def concat(parts: list[QuerySet]) -> QuerySet:
        parts = [p for p in parts if p.n_tokens]
        if not parts:
            raise ValueError("no queries to concatenate")
        layers = set(parts[0].layers)
        if any(set(p.layers) != layers for p in parts):
            raise ValueError("query sets cover different layers")
        return QuerySet({il: np.concatenate([p.layers[il] for p in parts]) for il in sorted(layers)},
                        np.concatenate([p.positions for p in parts]), [s for p in parts for s in p.sources],
                        np.concatenate([p.anchors for p in parts]), _merge_scores(parts), _merge_streams(parts))

    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.layers.values())


def _merge_streams(parts: list[QuerySet]) -> dict[str, tuple[np.ndarray, ...]]:
    """The decoded streams of several sets; one source's streams may come twice only if equal."""
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for p in parts:
        for name, streams in p.streams.items():
            if name in out and not (len(out[name]) == len(streams)
                                    and all(np.array_equal(a, b) for a, b in zip(out[name], streams))):
                raise ValueError(f"two query sets carry different decoded streams of {name!r}")
            out[name] = streams
    return out


def _merge_scores(parts: list[QuerySet]) -> dict[int, np.ndarray] | None:
    """Key scores of several sets: the larger score per (layer, KV head, position)."""
    have = [p.key_scores for p in parts if p.key_scores is not None]
    if not have:
        return None
    out: dict[int, np.ndarray] = {}
    for scores in have:
        for il, s in scores.items():
            if il not in out:
                out[il] = s.copy()
                continue
            if s.shape[0] != out[il].shape[0]:
                raise ValueError(f"layer {il}: key scores for {s.shape[0]} and {out[il].shape[0]} KV heads")
            n = max(s.shape[1], out[il].shape[1])
            merged = np.zeros((s.shape[0], n), np.float32)
            merged[:, : out[il].shape[1]] = out[il]
            np.maximum(merged[:, : s.shape[1]], s, out=merged[:, : s.shape[1]])
            out[il] = merged
    return out
