"""Model provisioning that needs no download: joining chunk packages and the hash check."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from models import gemma3, qwen25
from models.smollm2 import ModelProvisionError


def test_chunks_join_in_order_and_a_wrong_hash_is_refused(tmp_path):
    parts = []
    for i, data in enumerate((b"GGUF-part-0", b"-part-1", b"-part-2")):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    joined = b"GGUF-part-0-part-1-part-2"
    model = dataclasses.replace(gemma3.MODEL, sha256=hashlib.sha256(joined).hexdigest())
    dst = tmp_path / "out" / model.filename
    model.assemble(parts, dst)
    assert dst.read_bytes() == joined
    wrong = dataclasses.replace(model, sha256="0" * 64)  # chunks that do not hash to the published file
    bad = tmp_path / "bad" / model.filename
    with pytest.raises(ModelProvisionError, match="sha256"):
        wrong.assemble(parts, bad)
    assert not bad.exists() and not bad.with_suffix(".part").exists()  # nothing half-written is left


@pytest.mark.parametrize("model", [gemma3.MODEL, qwen25.MODEL], ids=["gemma3", "qwen25"])
def test_targets_are_outside_the_repository_and_named_by_hash(monkeypatch, tmp_path, model):
    monkeypatch.setenv("KVLOCAL_CACHE", str(tmp_path))
    t = model.target()
    assert t.name == model.filename and model.sha256[:12] in t.parent.name and t.is_relative_to(tmp_path)
    assert model.locate() is None  # nothing joined there yet


def test_a_missing_chunk_is_no_model():
    model = dataclasses.replace(qwen25.MODEL, chunks=(("kvlocal_no_such_chunk_module", "part01.bin"),))
    assert model.chunk_paths() is None
