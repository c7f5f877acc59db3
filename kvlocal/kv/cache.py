"""A sequence's KV cache as arrays, and the layout of a compacted cache (numpy only).

Shapes (numpy order): K and V of a layer are ``[n_cells, n_head_kv, head_dim]``, the bias of a
layer ``[n_cells, n_head_kv]`` float32 in logit units, positions ``[n_cells]`` int32.  Only the
base (global) cache is exposed: for iSWA models the sliding-window section of the state blob is
carried along untouched.

Cells are shared by all layers and heads (llama.cpp has one cell array per cache), but a cell's
K/V content is per layer and per head.  So each KV head of each layer may keep its own subset of
the original keys: a per-head segment holds, for every (layer, head), its kept keys in its first
cells and padding (zero K/V, bias -inf) in the rest, and is as long as the longest (layer, head).
The memory this padding wastes is ``CompactedCache.padding_fraction``: 0 with equal budgets,
``1 - mean(t) / max(t)`` over (layer, head) budgets otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import KvlocalError
from .statecodec import GGML_F16, CacheState, LayerKV, SeqState, StreamState, parse_seq_state


class InjectError(KvlocalError):
    """A compacted cache does not fit the model or breaks llama.cpp's position rules."""


def all_finite(a: np.ndarray) -> bool:
    """No NaN or inf; for float16 by the exponent bits (numpy's float16 isfinite is slow)."""
    a = np.asarray(a)
    if a.dtype == np.float16:
        return not bool(((a.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(a).all())


def _live_index(cache) -> int:
    live = [i for i, s in enumerate(cache.streams) if s is not None]
    if len(live) != 1:
        raise InjectError(f"expected the sequence in exactly one stream, found {len(live)}")
    return live[0]


@dataclass
class KVSnapshot:
    """The cells of one sequence, extracted from ``llama_state_seq_get_data``."""

    state: SeqState  # the parsed blob: SWA section and cell metadata kept for writing back
    layer_ids: tuple[int, ...]  # model layer of each base-cache layer
    positions: np.ndarray  # int32 [N]
    keys: list[np.ndarray]  # per base layer [N, H_kv, d], dtype as stored (F16 by default)
    values: list[np.ndarray]

    @classmethod
    def from_blob(cls, blob: bytes, info) -> KVSnapshot:
        state = parse_seq_state(blob, n_caches=info.n_caches)
        base = state.caches[0].streams[_live_index(state.caches[0])]
        if len(base.layers) != len(info.base_layers):
            raise InjectError(f"state has {len(base.layers)} base layers, the model {len(info.base_layers)}")
        shape = (base.n_cells, info.n_head_kv, info.head_dim)
        keys, values = [], []
        for layer in base.layers:
            if layer.k.shape[1] != shape[1] * shape[2] or layer.v.shape[1] != shape[1] * shape[2]:
                raise InjectError(f"K/V rows of {layer.k.shape[1]} elements do not match {shape[1]}x{shape[2]}")
            keys.append(layer.k.reshape(shape))
            values.append(layer.v.reshape(shape))
        return cls(state, info.base_layers, base.pos.copy(), keys, values)

    @classmethod
    def from_arrays(cls, positions: np.ndarray, keys: list[np.ndarray], values: list[np.ndarray],
                    layer_ids, swa_section: bytes | None = None) -> KVSnapshot:
        """A snapshot from stored arrays (F16, transposed V as flash-attention-off contexts hold it);
        ``swa_section``: the SWA cache section written by ``swa_section()``."""
        n = len(positions)
        layers = [LayerKV(GGML_F16, np.ascontiguousarray(k, np.float16).reshape(n, -1), GGML_F16,
                          np.ascontiguousarray(v, np.float16).reshape(n, -1)) for k, v in zip(keys, values, strict=True)]
        base = StreamState(np.asarray(positions, np.int32), [np.zeros(1, np.int32) for _ in range(n)], None, True, layers)
        caches = [CacheState([base])]
        if swa_section is not None:
            caches.append(parse_seq_state(swa_section, n_caches=1).caches[0])
        return cls(SeqState(0, caches), tuple(layer_ids), base.pos.copy(),
                   [np.asarray(k, np.float16) for k in keys], [np.asarray(v, np.float16) for v in values])

    def swa_section(self) -> bytes | None:
        """The SWA cache section (iSWA models) as a one-section state blob, or None."""
        if len(self.state.caches) < 2:
            return None
        return SeqState(self.state.seq_id, [self.state.caches[1]]).to_bytes()

    @property
    def n_cells(self) -> int:
        return len(self.positions)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the base layers' K and V as stored."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))

    @property
    def logical_length(self) -> int:
        """T: the position the next token takes (max position + 1 over all sections)."""
        top = [int(s.pos.max()) for c in self.state.caches for s in c.streams if s is not None and s.n_cells]
        return max(top) + 1 if top else 0

    @property
    def dtype(self) -> np.dtype:
        return self.keys[0].dtype


@dataclass
class Segment:
    """A run of cells: positions, and per base layer K/V ``[n, H_kv, d]`` and bias ``[n, H_kv]``."""

    positions: np.ndarray
    keys: list[np.ndarray]
    values: list[np.ndarray]
    bias: list[np.ndarray]
    origin: list[np.ndarray]  # per layer [n, H_kv]: original position of the key each slot holds, -1 padding

    @property
    def n_cells(self) -> int:
        return len(self.positions)


def shared_segment(snap: KVSnapshot, cells, bias: list[np.ndarray] | None = None) -> Segment:
    """Original cells kept whole (all heads): protected prefix, recent window, or all of it.
    ``bias``: the bias these cells already carry, per layer ``[N, H_kv]`` over all cells (default 0)."""
    idx = np.asarray(cells, dtype=np.intp).reshape(-1)
    n, h = len(idx), snap.keys[0].shape[1]
    b = [np.zeros((n, h), np.float32) for _ in snap.keys] if bias is None else [np.asarray(x, np.float32)[idx] for x in bias]
    pos = snap.positions[idx].astype(np.int32)
    origin = [np.repeat(pos[:, None], h, axis=1) for _ in snap.keys]
    return Segment(pos, [k[idx] for k in snap.keys], [v[idx] for v in snap.values], b, origin)


@dataclass
class HeadBlock:
    """The compacted keys of one (layer, KV head): K, V ``[t, d]`` and bias ``[t]``."""

    keys: np.ndarray
    values: np.ndarray
    bias: np.ndarray
    positions: np.ndarray | None = None  # [t] original positions of the kept keys (-1 if unknown)


def per_head_segment(blocks: list[list[HeadBlock]], pos_lo: int, pos_hi: int, dtype=np.float16) -> Segment:
    """Pack per-(layer, head) blocks into shared cells, padding short heads with bias -inf.

    ``blocks[l][h]``; the segment spans positions ``[pos_lo, pos_hi)`` (its cells get increasing
    positions spread over that range: positions only drive masking, and every later query sees
    them all).
    """
    if not blocks or not blocks[0]:
        raise InjectError("no layers or heads to pack")
    n_head = len(blocks[0])
    d = blocks[0][0].keys.shape[1]
    n = max(b.keys.shape[0] for layer in blocks for b in layer)
    if n == 0:
        raise InjectError("every head is empty")
    if pos_hi - pos_lo < 1:
        raise InjectError(f"empty position range [{pos_lo}, {pos_hi})")
    keys, values, bias, origin = [], [], [], []
    for il, layer in enumerate(blocks):
        if len(layer) != n_head:
            raise InjectError(f"layer {il} has {len(layer)} heads, layer 0 {n_head}")
        k = np.zeros((n, n_head, d), dtype)
        v = np.zeros((n, n_head, d), dtype)
        b = np.full((n, n_head), -np.inf, np.float32)
        o = np.full((n, n_head), -1, np.int32)
        for h, blk in enumerate(layer):
            t = blk.keys.shape[0]
            if blk.keys.shape != (t, d) or blk.values.shape != (t, d) or blk.bias.shape != (t,):
                raise InjectError(f"layer {il} head {h}: K {blk.keys.shape}, V {blk.values.shape}, "
                                  f"bias {blk.bias.shape} do not agree on [t, {d}]")
            k[:t, h] = blk.keys
            v[:t, h] = blk.values
            b[:t, h] = blk.bias
            if blk.positions is not None:
                o[:t, h] = blk.positions
        keys.append(k)
        values.append(v)
        bias.append(b)
        origin.append(o)
    positions = (pos_lo + (np.arange(n) * (pos_hi - pos_lo)) // n).astype(np.int32)
    return Segment(positions, keys, values, bias, origin)


@dataclass
class CompactedCache:
    """What ``Session.inject`` writes: cells, per-layer K/V and bias, and the logical length T."""

    positions: np.ndarray
    keys: list[np.ndarray]
    values: list[np.ndarray]
    bias: list[np.ndarray]
    logical_length: int
    meta: dict = field(default_factory=dict)
    origin: list[np.ndarray] | None = None  # per layer [N, H_kv] original positions, -1 padding

    @property
    def n_cells(self) -> int:
        return len(self.positions)

    @property
    def padding_fraction(self) -> float:
        """Share of (cell, layer, head) slots that hold padding (bias -inf)."""
        total = sum(b.size for b in self.bias)
        return float(sum(np.isneginf(b).sum() for b in self.bias) / total) if total else 0.0

    @property
    def has_bias(self) -> bool:
        return any(np.any(b != 0) for b in self.bias)

    def validate(self, info) -> None:
        """Check shapes and llama.cpp's position rules before anything reaches the engine."""
        n, h, d = self.n_cells, info.n_head_kv, info.head_dim
        T = int(self.logical_length)
        if n < 1:
            raise InjectError("a compacted cache needs at least one cell")
        pos = np.asarray(self.positions)
        if pos.shape != (n,) or not np.issubdtype(pos.dtype, np.integer):
            raise InjectError(f"positions must be {n} integers, got {pos.dtype} {pos.shape}")
        if len(self.keys) != len(info.base_layers) or len(self.values) != len(self.keys) \
                or len(self.bias) != len(self.keys):
            raise InjectError(f"need K, V and bias for {len(info.base_layers)} layers, got "
                              f"{len(self.keys)}/{len(self.values)}/{len(self.bias)}")
        for il, (k, v, b) in enumerate(zip(self.keys, self.values, self.bias, strict=True)):
            if k.shape != (n, h, d) or v.shape != (n, h, d) or b.shape != (n, h):
                raise InjectError(f"layer {il}: K {k.shape}, V {v.shape}, bias {b.shape}; expected "
                                  f"[{n}, {h}, {d}] and [{n}, {h}]")
            if not (all_finite(k) and all_finite(v)):
                raise InjectError(f"layer {il}: K/V hold NaN or inf")
            if np.isnan(b).any() or np.isposinf(b).any():
                raise InjectError(f"layer {il}: bias holds NaN or +inf")
            if np.isneginf(b).all(axis=0).any():
                raise InjectError(f"layer {il}: a head has no cell with a finite bias")
        if pos.min() < 0 or pos.max() > T - 1:
            raise InjectError(f"cell positions must lie in [0, T-1] = [0, {T - 1}], got [{pos.min()}, {pos.max()}]")
        if pos.max() != T - 1:
            raise InjectError(f"the last position must be T-1 = {T - 1} so that decoding continues at T; "
                              f"got {pos.max()}")

    def to_state(self, snap: KVSnapshot, seq_id: int = 0) -> SeqState:
        """A state blob with this cache as the base section and ``snap``'s SWA section."""
        caches = [type(c)(list(c.streams)) for c in snap.state.caches]
        base = caches[0]
        i = _live_index(base)
        old = base.streams[i]
        dt = snap.dtype
        layers = [LayerKV(src.k_type, np.ascontiguousarray(k, dt).reshape(self.n_cells, -1), src.v_type,
                          np.ascontiguousarray(v, dt).reshape(self.n_cells, -1))
                  for src, k, v in zip(old.layers, self.keys, self.values, strict=True)]
        base.streams[i] = StreamState(
            pos=np.asarray(self.positions, np.int32),
            seq_ids=[np.array([seq_id], np.int32) for _ in range(self.n_cells)],
            ext=None if old.ext is None else np.zeros((self.n_cells, 3), np.int32),
            v_trans=old.v_trans, layers=layers)
        return SeqState(seq_id, caches)


def assemble(segments: list[Segment], logical_length: int) -> CompactedCache:
    """Concatenate segments into a cache; the last cell takes position T-1 if none has it yet."""
    if not segments:
        raise InjectError("nothing to assemble")
    n_layers = len(segments[0].keys)
    if any(len(s.keys) != n_layers for s in segments):
        raise InjectError("segments disagree on the number of layers")
    positions = np.concatenate([s.positions for s in segments]).astype(np.int32)
    if positions.max() < logical_length - 1:
        positions[-1] = logical_length - 1
    cat = [np.concatenate([s.keys[il] for s in segments]) for il in range(n_layers)]
    vat = [np.concatenate([s.values[il] for s in segments]) for il in range(n_layers)]
    bat = [np.concatenate([s.bias[il] for s in segments]).astype(np.float32) for il in range(n_layers)]
    oat = [np.concatenate([s.origin[il] for s in segments]).astype(np.int32) for il in range(n_layers)]
    return CompactedCache(positions, cat, vat, bat, int(logical_length), origin=oat)


def identity_compaction(snap: KVSnapshot, doc_start: int, doc_end: int) -> CompactedCache:
    """The t = T compaction through the per-head path: cells before ``doc_start`` and from
    ``doc_end`` on kept whole, every head keeping every document key with bias 0 and its own values.
    Injected, it must reproduce the original cache's logits exactly."""
    doc = np.arange(doc_start, doc_end)
    blocks = [[HeadBlock(k[doc, h], v[doc, h], np.zeros(len(doc), np.float32), snap.positions[doc])
               for h in range(k.shape[1])] for k, v in zip(snap.keys, snap.values, strict=True)]
    return assemble([shared_segment(snap, np.arange(doc_start)),
                     per_head_segment(blocks, doc_start, doc_end, snap.dtype),
                     shared_segment(snap, np.arange(doc_end, snap.n_cells))], snap.logical_length)


def trace_origin(cell_origin: list[np.ndarray], positions: np.ndarray, origin: list[np.ndarray]) -> list[np.ndarray]:
    """Re-compaction's bookkeeping: a compaction names the source of each slot by the position of
    the *cell* it came from (``Compactor.compact`` output); when those cells held compacted keys
    themselves, the original position is the one they recorded.  ``positions``: the compacted
    cells' positions (strictly increasing, as a snapshot of an injected cache holds them);
    ``origin``: per layer ``[n, H_kv]`` what each of them holds.  Returns per layer ``[N, H_kv]``
    original positions, -1 for padding."""
    positions = np.asarray(positions)
    if len(positions) > 1 and not (np.diff(positions) > 0).all():
        raise InjectError("cell positions must increase strictly to trace where keys came from")
    out = []
    for co, o in zip(cell_origin, origin, strict=True):
        co = np.asarray(co)
        idx = np.clip(np.searchsorted(positions, np.maximum(co, 0)), 0, len(positions) - 1)
        real = co >= 0
        if not np.array_equal(positions[idx][real], co[real]):
            raise InjectError("a compacted slot names a cell the compacted cache did not have")
        heads = np.broadcast_to(np.arange(co.shape[1]), co.shape)
        out.append(np.where(real, np.asarray(o)[idx, heads], -1).astype(np.int32))
    return out


def extend_origin(origin: list[np.ndarray], positions: np.ndarray) -> list[np.ndarray]:
    """Per layer ``[len(positions), H_kv]``: ``origin`` (what the first cells hold, as the last
    injected cache recorded it) followed by the cells decoded since, which hold their own keys."""
    n = len(origin[0])
    if n > len(positions):
        raise InjectError("the session holds fewer cells than its last compaction wrote")
    fresh = np.asarray(positions[n:], np.int32)
    return [np.concatenate([o, np.repeat(fresh[:, None], o.shape[1], axis=1)]).astype(np.int32) for o in origin]
