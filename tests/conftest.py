"""Shared fixtures: tiny random GGUF models (generated per session), SmolLM2, and the optional
Qwen2.5-Coder-0.5B (its tests skip where it is not provisioned)."""

from __future__ import annotations

import numpy as np
import pytest

from models import qwen25, smollm2, tiny

TINY_VARIANTS = list(tiny.VARIANTS)  # llama-gqa, llama-mqa, qwen2, qwen3, gemma3
# "smollm2": the real Q4_1 file with an F16 KV cache (what users run);
# "smollm2-f32": its weights dequantized to F32, with an F32 KV cache.  llama.cpp rounds the
# activations that meet Q4/Q8 weights to int8 blocks, and Q and the attention weights to F16
# against an F16 cache, so on a 30-layer model a 1e-7 difference in summation order can move
# the logits by 1e-3 (F16 rounding flips) to 0.5 (an int8 flip).  Identities that hold up to
# float rounding are therefore checked on smollm2-f32, identities that hold bit for bit on both.
# "qwen25": a real qwen2 model (Q4_K_M, 7 query heads per KV head), optional: never installed by
# `make test`; its variants of the bit-identical tests run where `python -m models.qwen25` was run.
ALL_MODELS = TINY_VARIANTS + ["smollm2", "smollm2-f32", "qwen25"]
SMOOTH_MODELS = TINY_VARIANTS + ["smollm2-f32"]

TEXT = (
    "The special magic number for the lighthouse is 4817263. Margaret kept the lamp burning every night "
    "of the long winter, and the ships that passed the point saw it and were glad. In the spring a letter "
    "came from the mainland asking whether she would stay another year, and she wrote back that she would."
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def smollm2_path():
    path = smollm2.locate()
    if path is None:
        pytest.fail("SmolLM2 is not installed: run `make setup` (or `python -m models.smollm2`)")
    smollm2.verify(path)
    return path


_MODELS: dict = {}


@pytest.fixture(scope="session")
def load_model(tiny_dir, request):
    """load_model(name) -> binding.Model, cached for the session (tiny variants, "smollm2", "qwen25")."""
    from kvlocal.engine import binding

    def load(name: str):
        if name not in _MODELS:
            if name == "smollm2":
                path = request.getfixturevalue("smollm2_path")
            elif name == "smollm2-f32":
                request.getfixturevalue("smollm2_path")
                path = smollm2.ensure_f32()
            elif name == "qwen25":
                if qwen25.MODEL.locate() is None:
                    pytest.skip("optional model Qwen2.5-Coder-0.5B not provisioned (python -m models.qwen25)")
                path = qwen25.MODEL.ensure()  # checks the hash
            else:
                path = tiny.ensure_tiny(tiny_dir, name)
            _MODELS[name] = binding.Model(path)
        return _MODELS[name]

    yield load
    for m in _MODELS.values():
        m.close()
    _MODELS.clear()


def ctx_kwargs(name: str) -> dict:
    """Context settings per test model: F32 KV cache for smollm2-f32 (see ALL_MODELS)."""
    from kvlocal.engine import binding

    if name == "smollm2-f32":
        return {"type_k": binding.GGML_TYPE_F32, "type_v": binding.GGML_TYPE_F32}
    return {}


def session_kwargs(name: str) -> dict:
    """Session settings per test model (F32 KV cache for smollm2-f32), quiet progress bars."""
    return {"progress": False, **({"kv_type": "f32"} if name == "smollm2-f32" else {})}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
