"""Model provisioning that needs no download: gemma3-270m's chunk joining and its hash check."""

from __future__ import annotations

import hashlib

import pytest

from models import gemma3
from models.smollm2 import ModelProvisionError


def test_gemma3_chunks_join_in_order_and_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    parts = []
    for i, data in enumerate((b"GGUF-part-0", b"-part-1", b"-part-2")):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    joined = b"GGUF-part-0-part-1-part-2"
    monkeypatch.setattr(gemma3, "SHA256", hashlib.sha256(joined).hexdigest())
    dst = tmp_path / "out" / gemma3.FILENAME
    gemma3.assemble(parts, dst)
    assert dst.read_bytes() == joined
    monkeypatch.setattr(gemma3, "SHA256", "0" * 64)  # chunks that do not hash to the published file
    bad = tmp_path / "bad" / gemma3.FILENAME
    with pytest.raises(ModelProvisionError, match="sha256"):
        gemma3.assemble(parts, bad)
    assert not bad.exists() and not bad.with_suffix(".part").exists()  # nothing half-written is left


def test_gemma3_target_is_outside_the_repository_and_named_by_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLOCAL_CACHE", str(tmp_path))
    t = gemma3.target()
    assert t.name == gemma3.FILENAME and gemma3.SHA256[:12] in t.parent.name and t.is_relative_to(tmp_path)
