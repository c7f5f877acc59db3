"""Per-(layer, KV head) key budgets (spec §6.3).

A policy gives proportions ``[n_layers, n_head_kv]`` (layers = the compacted base layers);
``allocate`` turns them into integer budgets that sum exactly to the requested total, with a
floor per head and a cap (by default 75 % of the block) filled by water-filling: what a capped
head cannot take goes to the others in proportion.

Policies: ``uniform``; ``json`` (a file ``{"L{layer}H{kv_head}": proportion}``, the reference
format, over model layer ids; keys starting with "_" carry metadata); ``sensitivity`` (computed: per-head reconstruction-error curves
on a calibration document, then the spec's ratio-agnostic swap solver).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import KvlocalError
from ..registry import Registry

BUDGETS = Registry("head budget policy")


def allocate(total: int, proportions: np.ndarray, cap: int, floor: int = 0) -> np.ndarray:
    """Integer budgets of the same shape as ``proportions``, summing to ``total``, each in
    [floor, cap], as close to ``total * proportions / sum`` as the bounds allow."""
    p = np.asarray(proportions, np.float64)
    shape, p = p.shape, p.reshape(-1)
    h = len(p)
    if h == 0 or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise KvlocalError("head proportions must be finite, non-negative and not all zero")
    floor, cap = int(floor), int(cap)
    if floor > cap:
        raise KvlocalError(f"floor {floor} exceeds cap {cap}")
    if not floor * h <= total <= cap * h:
        raise KvlocalError(f"{total} keys cannot be spread over {h} heads with {floor} <= keys <= {cap} each")
    # water-filling of the continuous shares above the floor
    x = np.full(h, float(floor))
    free = np.ones(h, bool)
    left = float(total - floor * h)
    while left > 1e-9 and free.any():
        share = p * free
        if share.sum() <= 0:  # only zero-proportion heads are left: spread evenly
            share = free.astype(np.float64)
        add = left * share / share.sum()
        room = cap - x
        over = free & (add >= room)
        if not over.any():
            x += add
            break
        left -= room[over].sum()
        x[over] = cap
        free &= ~over
    # integers: floors, then the largest remainders, never above the cap
    out = np.floor(x + 1e-9).astype(np.int64)
    rest = int(total - out.sum())
    order = np.argsort(-(x - out), kind="stable")
    for i in order:
        if rest <= 0:
            break
        if out[i] < cap:
            out[i] += 1
            rest -= 1
    for i in np.argsort(-p, kind="stable"):  # rounding could not place everything: use free room
        if rest <= 0:
            break
        add = min(rest, cap - out[i])
        out[i] += add
        rest -= add
    return out.reshape(shape)


class BudgetPolicy:
    def proportions(self, layer_ids: tuple[int, ...], n_head_kv: int, context=None) -> np.ndarray:
        raise NotImplementedError


@BUDGETS.register("uniform")
@dataclass
class UniformBudget(BudgetPolicy):
    def proportions(self, layer_ids, n_head_kv, context=None):
        return np.full((len(layer_ids), n_head_kv), 1.0 / (len(layer_ids) * n_head_kv))


@BUDGETS.register("json")
@dataclass
class JsonBudget(BudgetPolicy):
    """Proportions from ``{"L{layer}H{kv_head}": p}`` (a path or the dict itself)."""

    source: str | Path | dict = field(default_factory=dict)

    def table(self) -> dict:
        if isinstance(self.source, dict):
            return self.source
        try:
            data = json.loads(Path(self.source).read_text())
        except (OSError, ValueError) as exc:
            raise KvlocalError(f"cannot read head budgets from {self.source}: {exc}") from exc
        if not isinstance(data, dict):
            raise KvlocalError(f"{self.source}: expected an object of \"L<layer>H<head>\": proportion")
        return data

    def proportions(self, layer_ids, n_head_kv, context=None):
        table = self.table()
        out = np.zeros((len(layer_ids), n_head_kv))
        for li, il in enumerate(layer_ids):
            for h in range(n_head_kv):
                key = f"L{il}H{h}"
                v = table.get(key)
                if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                    raise KvlocalError(f"head budgets: {key} must be a non-negative number, got {v!r}")
                out[li, h] = v
        extra = {k for k in table if not k.startswith("_")} - {f"L{il}H{h}" for il in layer_ids for h in range(n_head_kv)}
        if extra:
            raise KvlocalError(f"head budgets name heads this model does not compact: {sorted(extra)[:5]}")
        if out.sum() <= 0:
            raise KvlocalError("head budgets are all zero")
        return out / out.sum()


def to_json(proportions: np.ndarray, layer_ids: tuple[int, ...]) -> dict:
    return {f"L{il}H{h}": float(proportions[li, h]) for li, il in enumerate(layer_ids)
            for h in range(proportions.shape[1])}


# ---------------------------------------------------------------------------------------------
# computed allocation: error curves per head and the ratio-agnostic swap solver


def interpolate_curves(curves: np.ndarray, grid: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """Error of each head at its own keep-ratio (linear in the grid, clamped at its ends)."""
    return np.array([np.interp(r, grid, c) for c, r in zip(curves, ratios, strict=True)])


def swap_allocation(curves: np.ndarray, grid: np.ndarray, targets=(0.01, 0.02, 0.05, 0.1), step: float = 0.001,
                    patience: int = 10, max_steps: int = 100_000) -> np.ndarray:
    """Proportions over heads minimising the mean over target keep-ratios of the summed head errors.

    ``curves [H, G]``: error of each head kept at ``grid`` keep-ratios (fractions of its keys).  At
    target ratio tau a head with proportion p keeps ``p * H * tau`` of its keys.  From uniform
    proportions, repeatedly move ``step`` from the head where losing it costs least to the head
    where gaining it helps most; stop after ``patience`` consecutive moves that do not help."""
    curves = np.asarray(curves, np.float64)
    h = len(curves)
    targets = np.asarray(targets, np.float64)
    p = np.full(h, 1.0 / h)

    def per_head(q):
        return np.mean([interpolate_curves(curves, grid, q * h * tau) for tau in targets], axis=0)

    for _ in range(max_steps):
        cur = per_head(p)
        gain = cur - per_head(p + step)  # what one more step buys each head
        loss = np.where(p >= step, per_head(np.maximum(p - step, 0)) - cur, np.inf)  # what one less costs
        attempts, moved = 0, False
        for i in np.argsort(-gain, kind="stable"):
            for j in np.argsort(loss, kind="stable"):
                if i == j:
                    continue
                if gain[i] > loss[j] + 1e-15:
                    p[i] += step
                    p[j] -= step
                    moved = True
                    break
                attempts += 1
                if attempts >= patience:
                    break
            if moved or attempts >= patience:
                break
        if not moved:
            break
    return p / p.sum()


@BUDGETS.register("sensitivity")
@dataclass
class SensitivityBudget(BudgetPolicy):
    """Computed per document (or per model, saved with ``to_json``): each head's attention-output
    error when kept at the ``grid`` ratios by ``method``, then ``swap_allocation``."""

    method: str = "am-highest"
    grid: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.4)
    targets: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)

    def proportions(self, layer_ids, n_head_kv, context=None):
        if context is None:
            raise KvlocalError("the sensitivity budget needs the document's keys, values and queries")
        curves = context.head_curves(self.method, self.grid)  # [n_layers, n_head_kv, G]
        p = swap_allocation(curves.reshape(-1, len(self.grid)), np.asarray(self.grid), self.targets)
        return p.reshape(len(layer_ids), n_head_kv)


def chunk_budgets(sizes, fact_counts, ratio: float, fact_share: float = 0.0, cap: float = 0.75, lesser=None):
    """Keys per head for blocks compacted one after another (a streamed document's chunks), so that
    together they keep what one compaction of the whole would: the whole budget ``B = N / ratio``
    over the ``sizes`` (``N = sum``), of which facts may take ``fact_share``.  Each block gets its
    own fact keys (all of them, or every block's scaled alike when the document's facts exceed
    ``fact_share * B``) and the rest of ``B`` in proportion to its length; a block where facts
    cluster thus keeps more keys than one without.  ``lesser``: per block, facts of a lower tier (a
    method's names, kept only after every number): they share only what ``fact_counts`` leave of
    the facts' part, as in one compaction of the whole.  Returns ``(keys, shares)``: keys per block
    (rounded cumulatively, so they sum to ``B``, each in [1, cap * size]: what a block cannot take
    goes to the others) and the share of each
    block's keys that facts take (None when no facts)."""
    n = np.asarray(sizes, np.float64)
    f = np.asarray(fact_counts, np.float64)
    g = np.zeros_like(f) if lesser is None else np.asarray(lesser, np.float64)
    if n.ndim != 1 or f.shape != n.shape or g.shape != n.shape or (n < 1).any() or (f < 0).any() \
            or (g < 0).any() or (f + g > n).any() or not ratio > 0:
        raise ValueError("need one size >= 1 and fact counts in [0, size] per block, and ratio > 0")
    if not fact_share or not (f.sum() + g.sum()):
        return [max(1, int(round(x / ratio))) for x in n], None
    total = max(1.0, round(n.sum() / ratio))
    if f.sum():
        f = f * min(1.0, fact_share * total / f.sum())
    if g.sum():  # the lower tier: what the first leaves of the facts' part
        f = f + g * min(1.0, max(0.0, fact_share * total - f.sum()) / g.sum())
    target = f + (total - f.sum()) * n / n.sum()
    top = np.maximum(1, np.floor(cap * n))
    for _ in range(len(n)):  # a block over the cap passes what it cannot take to the others, by length
        over = target > top
        free = ~over & (target < top)
        if not over.any() or not free.any():
            break
        excess = float((target[over] - top[over]).sum())
        target[over] = top[over]
        target[free] += excess * n[free] / n[free].sum()
    edges = np.round(np.concatenate([[0.0], np.cumsum(target)]))
    keys = np.clip(np.diff(edges), 1, top).astype(int)
    return [int(k) for k in keys], [float(min(1.0, x / k)) for x, k in zip(f, keys, strict=True)]
