"""Compacted sessions on disk: a GGUF container written and read with the ``gguf`` package.

Any GGUF tool can list a session file.  Metadata (all under ``kvlocal.``): format version,
kvlocal version, the llama.cpp build (llama-cpp-python version, patch hash, bias ABI), the model
fingerprint, the logical length T, the document layout and its protected tokens, the chat so
far, and how it was compacted (method, ratio, query sources, budgets, timings, quality).
Tensors, the compacted layers stacked in the order of ``kvlocal.cache.layers`` (one tensor per
kind keeps the reader fast: the gguf package spends ~0.1 ms per tensor): ``cache.positions``
[N] int32; ``cache.k``/``cache.v`` [layers, N, H_kv, d] F16; ``cache.beta`` [layers, N, H_kv]
F32 and ``cache.origin`` [layers, N, H_kv] int32 (the original position of the key each slot
holds, -1 for padding); ``swa.state`` (iSWA models: the sliding-window section of the
llama.cpp state, as bytes).

Session files are untrusted input: nothing is unpickled or evaluated, every field is checked
for presence, type, shape and range, and a SHA-256 over all tensor bytes catches corrupted
data.  Any defect raises ``SessionFileError``.  Writes go to a temporary file in the same
directory, are flushed to disk, then renamed over the target: an interrupted save leaves the
previous file intact.
"""

from .container import read_info, read_session, save_session, write_session
from .schema import (
    FIELDS, FORMAT_VERSION, SessionData, SessionFileError, build_meta, check_compatible, check_meta, describe,
)

__all__ = ["FIELDS", "FORMAT_VERSION", "SessionData", "SessionFileError", "build_meta", "check_compatible",
           "check_meta", "describe", "read_info", "read_session", "save_session", "write_session"]
