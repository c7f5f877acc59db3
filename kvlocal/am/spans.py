"""Selection shared across heads, in spans: keep what any head of the layer (or of the model)
needs, in every head, together with its neighbours.

Per-head top-t selection cuts facts apart: a seven-digit number is read by different heads at
different digits, and with many repeated digits the copy attention is spread over every
occurrence, so no digit scores high in any one head and each head keeps another few.  Truncation
keeps whole spans in every head and finds more needles.  ``SharedSpans`` scores every key by the
largest attention any head of its scope (a layer, or the whole model) pays it, widens each score
over ``span`` neighbouring positions (max-pooling), and lets every head keep its top keys from
that one ranking; ``own`` of each head's budget may still go to the head's own best keys.

This is a layer-level selector: the compactor first builds every head problem of the scope,
asks ``head_scores`` of each, combines them with ``select_group`` and only then fits beta and the
values head by head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d

from .problem import HeadProblem
from .select import SELECTORS, HighestAttnKeys, KeySelector, Selection, top_t


class GroupSelector(KeySelector):
    """A selector that decides for a group of heads at once (see the module docstring)."""

    scope: str = "layer"  # "layer": the KV heads of one layer; "model": every head of every layer

    def head_scores(self, p: HeadProblem) -> np.ndarray:
        raise NotImplementedError

    def select_group(self, problems: list[HeadProblem], scores: list[np.ndarray]) -> list[Selection]:
        raise NotImplementedError

    def select(self, p: HeadProblem) -> Selection:  # a group of one head
        return self.select_group([p], [self.head_scores(p)])[0]


@SELECTORS.register("shared-spans")
@dataclass
class SharedSpans(GroupSelector):
    """Keys ranked by the largest ``agg`` attention any head of the scope pays them, max-pooled
    over ``span`` positions; every head keeps its top keys from that ranking (``own`` of its budget
    from its own ranking instead)."""

    agg: str = "rms"
    span: int = 5
    own: float = 0.0
    scope: str = "layer"

    def __post_init__(self):
        HighestAttnKeys(self.agg)  # validates agg
        if self.span < 1 or not 0 <= self.own <= 1 or self.scope not in ("layer", "model"):
            raise ValueError(f"invalid shared-spans settings span={self.span} own={self.own} scope={self.scope!r}")

    def head_scores(self, p: HeadProblem) -> np.ndarray:
        return HighestAttnKeys(self.agg).scores(p)

    def select_group(self, problems, scores):
        if not problems:
            return []
        T = problems[0].T
        if any(p.T != T for p in problems) or any(len(s) != T for s in scores):
            raise ValueError("a group's heads must share their key positions")
        shared = np.max(np.stack(scores), axis=0)
        if self.span > 1:
            shared = maximum_filter1d(shared, self.span, mode="nearest")
        out = []
        for p, own_score in zip(problems, scores, strict=True):
            n_own = int(round(self.own * p.t))
            picked = top_t(shared, p.t - n_own)
            if n_own:
                rest = np.array(own_score, np.float64)
                rest[picked] = -np.inf
                picked = np.sort(np.concatenate([picked, top_t(rest, n_own)]))
            out.append(Selection(picked))
        return out
