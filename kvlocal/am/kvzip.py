"""KVzip's key selection (Kim et al. 2025, "KVzip: query-agnostic KV cache compression with
context reconstruction"; snu-mllab/KVzip), on scores the engine measured.

The scores come with the ``kvzip`` query source (``QuerySet.key_scores`` -> ``HeadProblem.key_scores``):
per key, the largest attention probability any query head of its group and any token of a chunked
repeat of the document pays it, with the softmax over sink + chunk + repeat tokens.

* ``KVzipKeys``: every head keeps its own top-t keys by that score (KVzip's ``pair-uniform`` level).
* ``KVzipGlobal``: one threshold over every (layer, KV head, key) score, so heads keep unequal
  numbers of keys (KVzip's default ``pair`` level).  llama.cpp's cells are shared by all heads and
  layers, so a compacted segment is as long as its longest head: the others are padded (-inf bias)
  and the padding is memory the ratio does not count; the compaction report gives its share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import HeadProblem
from .select import KeySelector, Selection, top_t
from .spans import GroupSelector


@dataclass
class KVzipKeys(KeySelector):
    """Each head's top-t keys by its KVzip score."""

    def select(self, p: HeadProblem) -> Selection:
        return Selection(top_t(p.kvzip_scores(), p.t))


@dataclass
class KVzipGlobal(GroupSelector):
    """One threshold over all heads of the model: the sum of the heads' budgets goes to the highest
    scores wherever they are, each head keeping at least ``floor`` keys and at most ``max_share``
    of its block (a head whose budget is 0 keeps nothing).  Ties go to the earlier head and key."""

    floor: int = 1
    max_share: float = 1.0
    scope: str = "model"

    def __post_init__(self):
        if self.floor < 0 or not 0 < self.max_share <= 1 or self.scope not in ("layer", "model"):
            raise ValueError(f"invalid KVzip settings {self}")

    def head_scores(self, p: HeadProblem) -> np.ndarray:
        return p.kvzip_scores()

    def select_group(self, problems, scores):
        if not problems:
            return []
        total = sum(min(p.t, p.T) for p in problems)
        # a head given no budget stays empty (e.g. a zero entry of a JSON budget table)
        caps = [max(1, int(self.max_share * p.T)) if p.t > 0 else 0 for p in problems]
        floors = [min(self.floor, min(p.t, p.T), c) for p, c in zip(problems, caps, strict=True)]
        chosen = [top_t(s, f) for s, f in zip(scores, floors, strict=True)]
        left = total - sum(floors)
        # the rest by one ranking of every (head, key) not yet taken, capped per head
        flat = np.concatenate([np.where(_taken(len(s), c), -np.inf, s) for s, c in zip(scores, chosen, strict=True)])
        head_of = np.repeat(np.arange(len(problems)), [len(s) for s in scores])
        offset = np.concatenate([[0], np.cumsum([len(s) for s in scores])[:-1]])
        room = np.array([c - len(k) for c, k in zip(caps, chosen, strict=True)])
        extra = [[] for _ in problems]
        for j in np.argsort(-flat, kind="stable"):
            if left <= 0 or not np.isfinite(flat[j]):
                break
            h = head_of[j]
            if room[h] > 0:
                extra[h].append(j - offset[h])
                room[h] -= 1
                left -= 1
        return [Selection(np.sort(np.concatenate([k, np.asarray(e, np.int64)])).astype(np.int64))
                for k, e in zip(chosen, extra, strict=True)]


def _taken(n: int, idx: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[idx] = True
    return mask
