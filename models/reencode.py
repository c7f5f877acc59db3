"""Re-encode a GGUF to F32 or F16 weights with the ``gguf`` package (metadata copied as is).

Used by the exactness tests: llama.cpp quantizes the activations that meet Q4/Q8 weights
(to Q8_1/Q8_0 blocks), which makes the network a step function of its input: a 1e-7
change in an attention output (from summing the same cells in another order) now and then
flips one int8 rounding and moves the logits by ~0.5.  With F32 weights the activations stay
F32 and identities that hold up to float rounding hold to ~1e-6 in the logits.

    python -m models.reencode SRC DST [F32|F16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def reencode(src: str | Path, dst: str | Path, target: str = "F32") -> Path:
    import gguf

    if target not in ("F32", "F16"):
        raise ValueError(f"target must be F32 or F16, not {target!r}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field("general.architecture").contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    ftype = gguf.LlamaFileType.ALL_F32 if target == "F32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(ftype)
    out_dtype = np.float32 if target == "F32" else np.float16
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        # norms and other 1-D tensors stay F32, as llama.cpp's converter keeps them
        data = data.astype(np.float32 if data.ndim == 1 else out_dtype)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    print(reencode(sys.argv[1], sys.argv[2], *(sys.argv[3:4] or ["F32"])))
