"""The session file's container: a GGUF file written and read with the ``gguf`` package,
checked against the schema (``schema.FIELDS``) and its checksums before anything is used."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from ..kv.cache import all_finite
from .schema import ARCH, FIELDS, FORMAT_VERSION, SessionData, SessionFileError, check_meta, meta_checksum

_P = "kvlocal."

_ORDER = ("cache.positions", "cache.k", "cache.v", "cache.beta", "cache.origin")


def _tensor_order(has_swa: bool) -> list[str]:
    return list(_ORDER) + (["swa.state"] if has_swa else [])


def _tensors(data: SessionData) -> dict[str, np.ndarray]:
    out = {"cache.positions": np.ascontiguousarray(data.positions, np.int32),
           "cache.k": np.stack([np.asarray(k, np.float16) for k in data.keys]),
           "cache.v": np.stack([np.asarray(v, np.float16) for v in data.values]),
           "cache.beta": np.stack([np.asarray(b, np.float32) for b in data.bias]),
           "cache.origin": np.stack([np.asarray(o, np.int32) for o in data.origin])}
    if data.swa_state is not None:
        out["swa.state"] = np.frombuffer(data.swa_state, np.int8)
    return out


def _checksum(tensors: dict[str, np.ndarray], order: list[str]) -> str:
    h = hashlib.sha256()
    for name in order:
        h.update(name.encode() + b"\0")
        h.update(memoryview(np.ascontiguousarray(tensors[name])).cast("B"))
    return h.hexdigest()


def save_session(path: str | os.PathLike, model, snapshot, cache, layout, tokens: list[int], base: int,
                 messages: list, report: dict) -> int:
    """Write a compacted session (``schema.build_meta`` + the cache's arrays) atomically; returns
    the file size in bytes."""
    from .schema import build_meta

    meta = build_meta(model, snapshot, cache, layout, tokens, base, messages, report)
    data = SessionData(meta, cache.positions, cache.keys, cache.values, cache.bias, cache.origin,
                       snapshot.swa_section())
    return write_session(path, data)


def write_session(path: str | os.PathLike, data: SessionData) -> int:
    """Write ``data`` atomically; returns the file size in bytes."""
    import gguf

    path = Path(path)
    tensors = _tensors(data)
    order = _tensor_order(data.swa_state is not None)
    meta = dict(data.meta, **{"checksum.sha256": _checksum(tensors, order), "format_version": FORMAT_VERSION})
    meta["doc.n_prefix"], meta["doc.n_suffix"] = len(data.prefix_tokens), len(data.suffix_tokens)
    meta["chat.n_tokens"] = len(meta.get("chat.tokens") or [])
    meta["checksum.meta"] = meta_checksum(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        for key, kind in FIELDS.items():
            value = meta.get(key)
            if value is None:
                if kind.endswith("?"):
                    continue
                raise SessionFileError(f"missing session field {key}")
            name = _P + key
            if kind == "str":
                w.add_string(name, str(value))
            elif kind == "u32":
                w.add_uint32(name, int(value))
            elif kind == "f32":
                w.add_float32(name, float(value))
            elif kind == "bool":
                w.add_bool(name, bool(value))
            elif kind == "json":
                w.add_string(name, json.dumps(value))
            elif kind.startswith("i32s"):
                if len(value) or not kind.endswith("?"):
                    w.add_array(name, [int(v) for v in value])
        for name in order:
            w.add_tensor(name, tensors[name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# reading


def _field(reader, key: str, kind: str):
    import gguf

    f = reader.fields.get(_P + key)
    if f is None:
        if kind.endswith("?"):
            return None
        raise SessionFileError(f"missing field {_P + key}")
    t = f.types
    want = {"str": [gguf.GGUFValueType.STRING], "u32": [gguf.GGUFValueType.UINT32],
            "f32": [gguf.GGUFValueType.FLOAT32], "bool": [gguf.GGUFValueType.BOOL],
            "json": [gguf.GGUFValueType.STRING]}.get(kind.rstrip("?"))
    if kind.startswith("i32s"):
        if t != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]:
            raise SessionFileError(f"field {_P + key} must be an int32 array")
        return [int(v) for v in f.contents()]
    if t != want:
        raise SessionFileError(f"field {_P + key} has type {[x.name for x in t]}, expected {kind}")
    value = f.contents()
    if kind == "json":
        try:
            value = json.loads(value)
        except (TypeError, ValueError) as exc:
            raise SessionFileError(f"field {_P + key} is not valid JSON") from exc
    elif kind == "f32" and not math.isfinite(value):
        raise SessionFileError(f"field {_P + key} is not finite")
    return value


# GGUF value types: size of a scalar (8 = string, 9 = array), from the GGUF specification
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_KV, _MAX_TENSORS, _MAX_NAME = 256, 64, 1024
_TENSOR_ITEM = {0: 4, 1: 2, 24: 1, 25: 2, 26: 4, 27: 8, 28: 8}  # F32, F16, I8, I16, I32, I64, F64


def _prescan(data: memoryview, file_size: int, path) -> None:
    """Walk the GGUF header with every count bounded by the bytes that remain, before the gguf
    package reads it: its reader trusts counts, and a forged count makes it exhaust memory."""
    import struct

    size, off = len(data), 0

    def take(fmt: str):
        nonlocal off
        n = struct.calcsize(fmt)
        if off + n > size:
            raise SessionFileError(f"{path}: truncated GGUF header")
        v = struct.unpack_from(fmt, data, off)
        off += n
        return v if len(v) > 1 else v[0]

    def string(limit: int) -> None:
        nonlocal off
        n = take("<Q")
        if n > limit or off + n > size:
            raise SessionFileError(f"{path}: a GGUF string of {n} bytes does not fit")
        off += n

    magic, version, n_tensors, n_kv = take("<4sIQQ")
    if magic != b"GGUF" or version != 3 or n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
        raise SessionFileError(f"{path}: not a GGUF v3 file of a plausible size")
    for _ in range(n_kv):
        string(_MAX_NAME)
        vtype = take("<I")
        if vtype == 8:
            string(size)
        elif vtype == 9:
            sub, count = take("<IQ")
            if sub == 8:
                if count > (size - off) // 8:
                    raise SessionFileError(f"{path}: a GGUF array of {count} strings does not fit")
                for _ in range(count):
                    string(size)
            elif sub in _GGUF_SCALAR and count * _GGUF_SCALAR[sub] <= size - off:
                off += count * _GGUF_SCALAR[sub]
            else:
                raise SessionFileError(f"{path}: a GGUF array (type {sub}, {count} items) does not fit")
        elif vtype in _GGUF_SCALAR:
            off += _GGUF_SCALAR[vtype]
        else:
            raise SessionFileError(f"{path}: unknown GGUF value type {vtype}")
    for _ in range(n_tensors):
        string(_MAX_NAME)
        n_dims = take("<I")
        if not 1 <= n_dims <= 4:
            raise SessionFileError(f"{path}: a tensor with {n_dims} dimensions")
        dims = [take("<Q") for _ in range(n_dims)]
        ttype, t_off = take("<IQ")
        n_bytes = _TENSOR_ITEM.get(ttype, 0) * int(np.prod(np.array(dims, dtype=np.float64)))
        if ttype not in _TENSOR_ITEM or n_bytes > file_size or t_off > file_size:
            raise SessionFileError(f"{path}: a tensor of type {ttype} and shape {dims} does not fit the file")


def _open(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SessionFileError(f"session file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:  # the header is small; 64 MiB bounds what a forged one can make us read
        _prescan(memoryview(fh.read(min(size, 64 << 20))), size, path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # noqa: BLE001 - the gguf reader raises many types on corrupt input
        raise SessionFileError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    arch = reader.fields.get("general.architecture")
    try:
        arch_name = arch.contents() if arch is not None else None
    except Exception:  # noqa: BLE001
        arch_name = None
    if arch_name != ARCH:
        raise SessionFileError(f"{path} is a GGUF file but not a kvlocal session (architecture {arch_name!r})")
    return reader


def _meta(reader, path) -> dict:
    try:
        version = _field(reader, "format_version", "u32")
        if version != FORMAT_VERSION:
            raise SessionFileError(f"{path} uses session format {version}; this kvlocal reads format {FORMAT_VERSION}")
        meta = {}
        for key, kind in FIELDS.items():
            value = _field(reader, key, kind)
            if value is not None:
                meta[key] = value
    except SessionFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed values make the gguf package raise anything
        raise SessionFileError(f"{path}: unreadable metadata ({type(exc).__name__}: {exc})") from exc
    if meta_checksum(meta) != meta["checksum.meta"]:
        raise SessionFileError(f"{path}: the metadata does not match its checksum (the file is corrupt)")
    check_meta(meta, path)
    return meta


def read_info(path: str | os.PathLike) -> dict:
    """Every metadata field, after checking it (no model needed, tensor data not read)."""
    reader = _open(path)
    return _meta(reader, path)


def read_session(path: str | os.PathLike) -> SessionData:
    """Read and check a session file; tensors are memory-mapped views, verified by checksum."""
    reader = _open(path)
    m = _meta(reader, path)
    n, h, d = m["cache.n_cells"], m["model.n_head_kv"], m["model.head_dim"]
    n_l = len(m["cache.layers"])
    order = _tensor_order(m["cache.has_swa"])
    spec = {"cache.positions": ((n,), np.int32), "cache.k": ((n_l, n, h, d), np.float16),
            "cache.v": ((n_l, n, h, d), np.float16), "cache.beta": ((n_l, n, h), np.float32),
            "cache.origin": ((n_l, n, h), np.int32)}
    try:
        ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
        align = int(getattr(reader, "alignment", 32) or 32)
        tensors = {}
        for t in reader.tensors:
            if t.name in tensors:
                raise SessionFileError(f"{path}: tensor {t.name} appears twice")
            tensors[t.name] = t.data
    except SessionFileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SessionFileError(f"{path}: unreadable tensor table ({type(exc).__name__}: {exc})") from exc
    expected = -(-max(ends, default=0) // align) * align
    if Path(path).stat().st_size != expected:
        raise SessionFileError(f"{path}: {Path(path).stat().st_size} bytes where the tensors end at {expected}: "
                               "the file is truncated or has trailing data")
    if set(tensors) != set(order):
        raise SessionFileError(f"{path}: tensors {sorted(set(order) ^ set(tensors))[:4]} missing or unexpected")
    for name, (shape, dtype) in spec.items():
        a = tensors[name]
        if a.dtype != dtype or tuple(a.shape) != shape:
            raise SessionFileError(f"{path}: tensor {name} is {a.dtype} {tuple(a.shape)}, expected {np.dtype(dtype)} {shape}")
    if m["cache.has_swa"] and (tensors["swa.state"].dtype != np.int8 or tensors["swa.state"].ndim != 1):
        raise SessionFileError(f"{path}: swa.state must be a byte vector")
    if _checksum(tensors, order) != m["checksum.sha256"]:
        raise SessionFileError(f"{path}: tensor data does not match its checksum (the file is corrupt)")
    _check_arrays(tensors, m["cache.logical_length"], path)
    return SessionData(
        meta=m, positions=tensors["cache.positions"], keys=list(tensors["cache.k"]), values=list(tensors["cache.v"]),
        bias=list(tensors["cache.beta"]), origin=list(tensors["cache.origin"]),
        swa_state=tensors["swa.state"].tobytes() if m["cache.has_swa"] else None)


def _check_arrays(t: dict[str, np.ndarray], T: int, path) -> None:
    """Values a checksum cannot vouch for (it only proves the file is what was written)."""
    pos, b, o = t["cache.positions"], t["cache.beta"], t["cache.origin"]
    if pos.min() < 0 or pos.max() != T - 1:
        raise SessionFileError(f"{path}: cell positions must lie in [0, T-1] with T-1 = {T - 1} present")
    if not (all_finite(t["cache.k"]) and all_finite(t["cache.v"])):
        raise SessionFileError(f"{path}: K/V hold NaN or inf")
    if np.isnan(b).any() or np.isposinf(b).any() or np.isneginf(b).all(axis=1).any():
        raise SessionFileError(f"{path}: the bias is NaN, +inf, or -inf for a whole head")
    if o.min() < -1 or o.max() >= T:
        raise SessionFileError(f"{path}: origin positions out of range")
