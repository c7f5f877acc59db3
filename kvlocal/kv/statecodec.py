"""Parse and write llama.cpp sequence-state blobs (``llama_state_seq_get_data``) with numpy.

No ctypes and no engine here: a blob is bytes in, arrays out, and back to identical bytes.

Layout (llama.cpp in llama-cpp-python 0.3.36, src/llama-kv-cache.cpp ``state_write``)::

    u32 magic 0xaf143cd8, i32 seq_id
    per KV cache (one, or two for iSWA models: base then SWA):
      u32 n_stream
      per stream:
        u32 cell_count                               (0: nothing else for this stream)
        per cell: i32 pos, u32 n_seq_id, [i32 x, i32 y, i32 tok if cell_ext], n_seq_id * i32 seq_id
        u32 v_trans, u32 n_layer
        per layer: i32 k_type, u64 k_row_bytes, cell_count K rows
        v_trans == 0, per layer: i32 v_type, u64 v_row_bytes, cell_count V rows
        v_trans == 1, per layer: i32 v_type, u32 elem_bytes, u32 n_embd_v_gqa, V^T (n_embd_v_gqa runs of cell_count)

Arrays use numpy order: K and V of a layer are ``[n_cells, row_elems]`` (a row is
``[n_head_kv * head_dim]``, head-major) whatever ``v_trans`` is; F16/F32 rows are typed,
other (quantized) types are kept as raw ``uint8`` rows.  Every count is checked against
the bytes left before anything is allocated; malformed input raises ``StateFormatError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import KvlocalError

SEQ_MAGIC = 0xAF143CD8
GGML_F32, GGML_F16 = 0, 1
_DTYPES = {GGML_F32: np.dtype("<f4"), GGML_F16: np.dtype("<f2")}
_MAX_TYPE = 64  # ggml types are small enums


class StateFormatError(KvlocalError):
    """A state blob is malformed, truncated, or does not fit the arrays given."""


class _Reader:
    def __init__(self, data: bytes | memoryview):
        self.buf = memoryview(data).cast("B")
        self.off = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > len(self.buf):
            raise StateFormatError(f"truncated state blob: {what} needs {n} bytes at offset {self.off}, "
                                   f"{len(self.buf) - self.off} left")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += size
        return v

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        nbytes = count * dtype.itemsize
        self.need(nbytes, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.off).copy()
        self.off += nbytes
        return out


@dataclass
class LayerKV:
    """One layer of one stream: K ``[n_cells, k_row]`` and V ``[n_cells, v_row]``."""

    k_type: int
    k: np.ndarray
    v_type: int
    v: np.ndarray

    def take(self, idx: np.ndarray) -> LayerKV:
        return replace(self, k=self.k[idx], v=self.v[idx])


@dataclass
class StreamState:
    """The cells of one stream of one cache, in blob order."""

    pos: np.ndarray  # int32 [n_cells]
    seq_ids: list[np.ndarray]  # per cell, int32 [n_seq_id]
    ext: np.ndarray | None  # int32 [n_cells, 3] (x, y, tok) when the cache has cell extensions
    v_trans: bool
    layers: list[LayerKV] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return len(self.pos)

    def take(self, idx) -> StreamState:
        """A stream with the cells ``idx`` (indices into this stream, repeats allowed)."""
        idx = np.asarray(idx, dtype=np.intp).reshape(-1)
        return StreamState(
            pos=self.pos[idx].copy(),
            seq_ids=[self.seq_ids[i].copy() for i in idx],
            ext=None if self.ext is None else self.ext[idx].copy(),
            v_trans=self.v_trans,
            layers=[layer.take(idx) for layer in self.layers],
        )


@dataclass
class CacheState:
    """One KV cache section (plain cache, or the base/SWA half of an iSWA cache)."""

    streams: list[StreamState | None]  # None: a stream with no cells

    def cells(self) -> StreamState:
        """The only non-empty stream (sequence blobs of unified caches have exactly one)."""
        live = [s for s in self.streams if s is not None]
        if len(live) != 1:
            raise StateFormatError(f"expected one non-empty stream, found {len(live)}")
        return live[0]


@dataclass
class SeqState:
    seq_id: int
    caches: list[CacheState]

    def to_bytes(self) -> bytes:
        return write_seq_state(self)


def _row_dtype(type_: int) -> np.dtype:
    return _DTYPES.get(type_, np.dtype("u1"))


def _parse_stream(r: _Reader, n_cells: int, cell_ext: bool) -> StreamState:
    # every cell takes at least 8 bytes of metadata: bound the count before allocating
    r.need(n_cells * 8, f"metadata of {n_cells} cells")
    pos = np.empty(n_cells, np.int32)
    seq_ids = []
    ext = np.empty((n_cells, 3), np.int32) if cell_ext else None
    for i in range(n_cells):
        pos[i] = r.scalar("<i", "cell pos")
        n_seq = r.scalar("<I", "cell n_seq_id")
        if cell_ext:
            ext[i] = r.array(np.dtype("<i4"), 3, "cell ext")
        seq_ids.append(r.array(np.dtype("<i4"), n_seq, "cell seq ids"))
    v_trans = r.scalar("<I", "v_trans")
    if v_trans not in (0, 1):
        raise StateFormatError(f"v_trans must be 0 or 1, got {v_trans}")
    n_layer = r.scalar("<I", "n_layer")
    # each layer takes at least 2 x 12 bytes of headers
    r.need(n_layer * 24, f"headers of {n_layer} layers")
    ks = []
    for _ in range(n_layer):
        k_type = r.scalar("<i", "k_type")
        row_bytes = r.scalar("<Q", "k_row_bytes")
        if not 0 <= k_type < _MAX_TYPE:
            raise StateFormatError(f"invalid K type {k_type}")
        dt = _row_dtype(k_type)
        if row_bytes % dt.itemsize:
            raise StateFormatError(f"K row of {row_bytes} bytes is not a whole number of elements")
        r.need(row_bytes * n_cells, "K rows")
        k = r.array(dt, n_cells * row_bytes // dt.itemsize, "K rows").reshape(n_cells, row_bytes // dt.itemsize)
        ks.append((k_type, k))
    layers = []
    for k_type, k in ks:
        v_type = r.scalar("<i", "v_type")
        if not 0 <= v_type < _MAX_TYPE:
            raise StateFormatError(f"invalid V type {v_type}")
        dt = _row_dtype(v_type)
        if not v_trans:
            row_bytes = r.scalar("<Q", "v_row_bytes")
            if row_bytes % dt.itemsize:
                raise StateFormatError(f"V row of {row_bytes} bytes is not a whole number of elements")
            r.need(row_bytes * n_cells, "V rows")
            v = r.array(dt, n_cells * row_bytes // dt.itemsize, "V rows").reshape(n_cells, row_bytes // dt.itemsize)
            layers.append(LayerKV(k_type, k, v_type, v))
        else:
            elem = r.scalar("<I", "v elem_bytes")
            n_embd_v = r.scalar("<I", "n_embd_v_gqa")
            if v_type not in _DTYPES or elem != _DTYPES[v_type].itemsize:
                raise StateFormatError(f"transposed V needs F16/F32 elements, got type {v_type} of {elem} bytes")
            r.need(elem * n_embd_v * n_cells, "transposed V")
            vt = r.array(dt, n_embd_v * n_cells, "transposed V").reshape(n_embd_v, n_cells)
            layers.append(LayerKV(k_type, k, v_type, np.ascontiguousarray(vt.T)))
    return StreamState(pos, seq_ids, ext, bool(v_trans), layers)


def cells_in_state(blob: bytes) -> int:
    """Cells of the first cache section of a sequence blob, from its header alone."""
    r = _Reader(blob)
    if r.scalar("<I", "magic") != SEQ_MAGIC:
        raise StateFormatError("not a llama.cpp sequence state")
    r.scalar("<i", "seq_id")
    n_stream = r.scalar("<I", "n_stream")
    return sum(r.scalar("<I", "cell_count") for _ in range(min(n_stream, 1)))


def parse_seq_state(blob: bytes | memoryview, *, cell_ext: bool = False, n_caches: int | None = None) -> SeqState:
    """Parse a ``llama_state_seq_get_data`` blob.

    ``cell_ext``: the model's caches store cell extensions (M-RoPE or PLE models);
    ``n_caches``: expected cache sections (1 plain, 2 iSWA); None reads until the end.
    """
    r = _Reader(blob)
    magic = r.scalar("<I", "magic")
    if magic != SEQ_MAGIC:
        raise StateFormatError(f"not a llama.cpp sequence state (magic {magic:#x})")
    seq_id = r.scalar("<i", "seq_id")
    caches = []
    while r.off < len(r.buf) and (n_caches is None or len(caches) < n_caches):
        n_stream = r.scalar("<I", "n_stream")
        r.need(n_stream * 4, f"{n_stream} streams")
        streams = []
        for _ in range(n_stream):
            n_cells = r.scalar("<I", "cell_count")
            streams.append(_parse_stream(r, n_cells, cell_ext) if n_cells else None)
        caches.append(CacheState(streams))
    if n_caches is not None and len(caches) != n_caches:
        raise StateFormatError(f"expected {n_caches} cache sections, found {len(caches)}")
    if r.off != len(r.buf):
        raise StateFormatError(f"{len(r.buf) - r.off} unexpected bytes after the state")
    return SeqState(seq_id, caches)


def _check_stream(s: StreamState) -> None:
    n = s.n_cells
    if s.pos.shape != (n,) or len(s.seq_ids) != n or (s.ext is not None and s.ext.shape != (n, 3)):
        raise StateFormatError("cell metadata arrays disagree on the cell count")
    for layer in s.layers:
        if layer.k.shape[0] != n or layer.v.shape[0] != n:
            raise StateFormatError("K/V rows disagree with the cell count")
        for t, a, what in ((layer.k_type, layer.k, "K"), (layer.v_type, layer.v, "V")):
            if a.ndim != 2 or a.dtype != _row_dtype(t):
                raise StateFormatError(f"{what} must be a 2-D {_row_dtype(t)} array for type {t}, got {a.dtype} {a.shape}")


def _cell_metadata(s: StreamState) -> bytes:
    if s.ext is None and all(len(x) == 1 for x in s.seq_ids):  # the usual case, vectorised
        rec = np.empty(s.n_cells, dtype=[("pos", "<i4"), ("n", "<u4"), ("seq", "<i4")])
        rec["pos"], rec["n"] = s.pos, 1
        rec["seq"] = [x[0] for x in s.seq_ids]
        return rec.tobytes()
    parts = []
    for i in range(s.n_cells):
        parts.append(struct.pack("<iI", int(s.pos[i]), len(s.seq_ids[i])))
        if s.ext is not None:
            parts.append(s.ext[i].astype("<i4").tobytes())
        parts.append(np.asarray(s.seq_ids[i], "<i4").tobytes())
    return b"".join(parts)


def write_seq_state(state: SeqState) -> bytearray:
    """Serialize ``state`` to the exact bytes llama.cpp writes (and reads back)."""
    parts: list = [struct.pack("<Ii", SEQ_MAGIC, state.seq_id)]
    for cache in state.caches:
        parts.append(struct.pack("<I", len(cache.streams)))
        for s in cache.streams:
            if s is None or s.n_cells == 0:
                parts.append(struct.pack("<I", 0))
                continue
            _check_stream(s)
            parts += [struct.pack("<I", s.n_cells), _cell_metadata(s), struct.pack("<II", int(s.v_trans), len(s.layers))]
            for layer in s.layers:
                parts.append(struct.pack("<iQ", layer.k_type, layer.k.shape[1] * layer.k.dtype.itemsize))
                parts.append(memoryview(np.ascontiguousarray(layer.k)).cast("B"))
            for layer in s.layers:
                if not s.v_trans:
                    parts.append(struct.pack("<iQ", layer.v_type, layer.v.shape[1] * layer.v.dtype.itemsize))
                    parts.append(memoryview(np.ascontiguousarray(layer.v)).cast("B"))
                else:
                    parts.append(struct.pack("<iII", layer.v_type, layer.v.dtype.itemsize, layer.v.shape[1]))
                    parts.append(memoryview(np.ascontiguousarray(layer.v.T)).cast("B"))
    return bytearray().join(parts)
