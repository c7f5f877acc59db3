"""The native library: llama-cpp-python's low-level bindings (``llama_cpp.llama_cpp``), checked
to be kvlocal's patched build, the patch's ``llama_kv_bias_*`` declarations, ggml-base for
reading graph tensors, llama.cpp's log, and the eval-callback tap (a ctypes mirror of
``struct ggml_tensor``).  With ``binding`` (the handles: models and contexts) it is the binding
layer, the only kvlocal code that touches ctypes and llama.cpp.
"""

from __future__ import annotations

import collections
import ctypes
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import EngineError, NativeLibraryError

BIAS_ABI_VERSION = 1

try:
    import llama_cpp.llama_cpp as ll
except (ImportError, OSError, RuntimeError) as _exc:  # the package or its shared library is missing
    raise NativeLibraryError(
        f"cannot load llama.cpp through llama-cpp-python ({_exc}); kvlocal needs its patched build: "
        "run `make setup` (or `python native/build.py`) in the kvlocal checkout") from _exc

_lib = ll._lib
LIB_PATH = Path(_lib._name)

if not hasattr(_lib, "llama_kv_bias_abi_version"):
    raise NativeLibraryError(
        f"{LIB_PATH} is a stock llama.cpp: it lacks the llama_kv_bias_* functions of kvlocal's patch. "
        "Run `make setup` (or `python native/build.py`) in the kvlocal checkout to install the patched build")

_lib.llama_kv_bias_abi_version.argtypes = []
_lib.llama_kv_bias_abi_version.restype = ctypes.c_int32
_lib.llama_kv_bias_enable.argtypes = [ll.llama_context_p_ctypes, ctypes.c_bool]
_lib.llama_kv_bias_enable.restype = ctypes.c_bool
for _fn in (_lib.llama_kv_bias_set, _lib.llama_kv_bias_get):
    _fn.argtypes = [ll.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int32,
                    ctypes.POINTER(ctypes.c_float), ctypes.c_int32]
    _fn.restype = ctypes.c_int32

if _lib.llama_kv_bias_abi_version() != BIAS_ABI_VERSION:
    raise NativeLibraryError(
        f"{LIB_PATH} implements KV-bias ABI {_lib.llama_kv_bias_abi_version()}, kvlocal needs {BIAS_ABI_VERSION}; "
        "rebuild with `make setup`")

# ggml-base (ops, tensor reads) from the same directory; its RUNPATH is $ORIGIN
_ggml = ctypes.CDLL(str(LIB_PATH.parent / "libggml-base.so"))
_ggml.ggml_op_name.argtypes = [ctypes.c_int]
_ggml.ggml_op_name.restype = ctypes.c_char_p
_ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml.ggml_nbytes.restype = ctypes.c_size_t
_ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
_ggml.ggml_is_contiguous.restype = ctypes.c_bool
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_get.restype = None

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


def native_info() -> dict:
    """The build manifest written next to the patched library (version, patch hash, flags)."""
    try:
        info = json.loads((LIB_PATH.parent / "kvlocal-native.json").read_text())
    except (OSError, ValueError):
        info = {}
    info["library"] = str(LIB_PATH)
    info["bias_abi"] = BIAS_ABI_VERSION
    return info


# ---------------------------------------------------------------------------------------------
# logging: llama.cpp's log goes to a ring buffer (quoted in errors), to stderr only if verbose

_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=40)
_VERBOSE = [False]


@ll.llama_log_callback
def _log_callback(level, text, user_data):  # noqa: ARG001
    msg = text.decode("utf-8", errors="replace") if text else ""
    if level == 5 and _LOG_TAIL:  # GGML_LOG_LEVEL_CONT
        _LOG_TAIL[-1] += msg.rstrip("\n")
    elif level >= 3:  # WARN, ERROR
        _LOG_TAIL.append(msg.rstrip("\n"))
    if _VERBOSE[0]:
        sys.stderr.write(msg)


ll.llama_log_set(_log_callback, ctypes.c_void_p())
ll.llama_backend_init()


def set_verbose(on: bool) -> None:
    """Echo llama.cpp's own log to stderr."""
    _VERBOSE[0] = bool(on)


def clear_log() -> None:
    """Forget what llama.cpp logged so far (before a call whose failure quotes the log)."""
    _LOG_TAIL.clear()


def last_log(n: int = 5) -> str:
    """The last warnings/errors llama.cpp logged, for error messages."""
    lines = [line for line in list(_LOG_TAIL)[-n:] if line.strip()]
    return " | ".join(lines)


def _engine_error(what: str) -> EngineError:
    tail = last_log()
    return EngineError(f"{what}" + (f" (llama.cpp: {tail})" if tail else ""))


# ---------------------------------------------------------------------------------------------
# eval callback: ggml_tensor mirror and a tap that hands chosen graph nodes to Python


class GgmlTensor(ctypes.Structure):
    """Mirror of ``struct ggml_tensor`` (ggml/include/ggml.h, 336 bytes)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


assert ctypes.sizeof(GgmlTensor) == 336 and GgmlTensor.data.offset == 248 and GgmlTensor.name.offset == 256

_OP_NAMES: dict[int, str] = {}


def _op_name(op: int) -> str:
    name = _OP_NAMES.get(op)
    if name is None:
        name = _OP_NAMES[op] = (_ggml.ggml_op_name(op) or b"").decode()
    return name


def _read_tensor(ptr: int, t: GgmlTensor) -> np.ndarray:
    """Copy a contiguous F32/F16 graph tensor to numpy, shape (ne3, ne2, ne1, ne0)."""
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}.get(t.type)
    if dtype is None or not _ggml.ggml_is_contiguous(ptr):
        raise EngineError(f"cannot read tensor {t.name.decode()}: type {t.type}, contiguous={_ggml.ggml_is_contiguous(ptr)}")
    nbytes = _ggml.ggml_nbytes(ptr)
    out = np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
    _ggml.ggml_backend_tensor_get(ptr, out.ctypes.data, 0, nbytes)
    return out.reshape(tuple(int(x) for x in reversed(t.ne)))


class TensorTap:
    """The eval callback of a context.

    ``select(name, op) -> bool`` picks graph nodes by name and op name (e.g. ``"Qcur-3"``,
    ``"ROPE"``); ``sink(name, op, array)`` receives each picked node's data once computed,
    as a numpy copy of shape ``(ne3, ne2, ne1, ne0)``.  With ``select = None`` (the default)
    nothing is observed and the graph runs unsplit.  An exception raised by either function
    aborts the decode and is re-raised by ``Context.decode``.
    """

    def __init__(self):
        self.select: Callable[[str, str], bool] | None = None
        self.sink: Callable[[str, str, np.ndarray], None] | None = None
        self.error: BaseException | None = None
        self._c_fn = ll.ggml_backend_sched_eval_callback(self._callback)

    def _callback(self, ptr, ask, user_data):  # noqa: ARG002
        select = self.select
        if select is None:
            return not ask
        try:
            t = GgmlTensor.from_address(ptr)
            name = t.name.decode("utf-8", errors="replace")
            op = _op_name(t.op)
            if ask:
                return bool(select(name, op))
            if self.sink is not None:
                self.sink(name, op, _read_tensor(ptr, t))
            return True
        except BaseException as exc:  # noqa: BLE001 - must not unwind through C
            self.error = exc
            return False


