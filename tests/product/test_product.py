"""What a user touches: the Python API, session files, the CLI, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEXT, TINY_VARIANTS
from kvlocal.engine import binding
from kvlocal.am import DEFAULT_METHOD
from kvlocal.api import CompactedSession, Compaction
from kvlocal.cli import main as cli
from kvlocal.errors import KvlocalError, ModelError
from kvlocal.engine.session import DocumentError
from kvlocal.sessionfile import SessionFileError, read_info, read_session, write_session
from kvlocal.streaming import LongContextWarning
from models import tiny

QUESTION = "What is the magic number for the lighthouse?"


def compact_and_save(model, path, ratio=4.0, **kw):
    with Compaction(model, progress=False) as kv:
        kv.ingest(TEXT)
        kv.compact(ratio=ratio, queries="context", **kw)
        prompt = kv.session.chat_tokens([{"role": "user", "content": QUESTION}])
        start = kv.session.n_past
        logits = kv.session.decode(prompt)[-1].copy()
        kv.session.rewind(start)
        answer = kv.ask(QUESTION, max_tokens=12)
        kv.save(str(path))
    return logits, answer


@pytest.mark.parametrize("name", TINY_VARIANTS + ["smollm2"])
def test_save_then_load_gives_the_same_logits(load_model, name, tmp_path):
    model = load_model(name)
    path = tmp_path / "doc.kvs"
    logits, answer = compact_and_save(model, path)
    with CompactedSession(str(path), model) as s:
        assert s.session.n_ctx < 2048  # sized to the compacted cells plus the chat budget, not to T
        prompt = s.session.chat_tokens([{"role": "user", "content": QUESTION}])
        start = s.session.n_past
        assert np.array_equal(s.session.decode(prompt)[-1], logits)
        s.session.rewind(start)
        assert s.ask(QUESTION, max_tokens=12) == answer


def test_streaming_chat_and_the_saved_conversation(load_model, tmp_path):
    model = load_model("llama-gqa")
    path = tmp_path / "chat.kvs"
    with Compaction(model, progress=False) as kv:
        kv.ingest(TEXT)
        kv.compact(ratio=4, queries="context")
        whole = kv.ask(QUESTION, max_tokens=10)
        assert "".join(kv.ask(QUESTION, max_tokens=10, stream=True)).strip() == whole
        T = kv.session.n_past
        reply = kv.chat("Hello there", max_tokens=8)
        assert kv.session.n_past > T and kv.messages[-1] == {"role": "assistant", "content": reply}
        after_chat = kv.session.n_past
        kv.save(str(path))
    assert [m["role"] for m in read_info(path)["chat.messages"]] == ["user", "assistant"]
    with CompactedSession(str(path), model) as s:
        assert s.messages[0]["content"] == "Hello there"
        assert s.session.n_past == after_chat  # the conversation replayed token for token
        s.reset()
        assert s.session.n_past == T and s.messages == []


def test_info_needs_no_model_and_no_llama_cpp(load_model, tmp_path):
    path = tmp_path / "doc.kvs"
    compact_and_save(load_model("llama-gqa"), path)
    code = ("import sys; sys.modules['llama_cpp'] = None\n"
            "import kvlocal; m = kvlocal.info(sys.argv[1]); print(m['cache.n_cells'], m['compaction.method'])\n"
            "assert 'kvlocal.engine.binding' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[1] == DEFAULT_METHOD


# ---------------------------------------------------------------------------------------------
# bad session files


@pytest.fixture(scope="module")
def saved(load_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "doc.kvs"
    compact_and_save(load_model("llama-gqa"), path)
    return path


def test_wrong_model_is_refused(load_model, saved, tiny_dir):
    for other in (load_model("llama-mqa"), binding.Model(tiny.ensure_tiny(tiny_dir, "llama-gqa", seed=1))):
        with pytest.raises(SessionFileError, match="was compacted with .* reload it with the model it was made with"):
            CompactedSession(str(saved), other)


def rewrite(src, dst, **changes):
    data = read_session(src)
    data.meta.update(changes)
    write_session(dst, data)
    return dst


def test_other_patch_build_is_refused(load_model, saved, tmp_path):
    path = rewrite(saved, tmp_path / "p.kvs", **{"native.patch_hash": "0" * 64})
    with pytest.raises(SessionFileError, match="made with kvlocal patch 000000000000"):
        CompactedSession(str(path), load_model("llama-gqa"))


def test_unknown_format_version_is_refused(saved, tmp_path, monkeypatch):
    from kvlocal.sessionfile import container

    data = read_session(saved)
    monkeypatch.setattr(container, "FORMAT_VERSION", 7)
    path = tmp_path / "v7.kvs"
    write_session(path, data)
    monkeypatch.undo()
    with pytest.raises(SessionFileError, match="format 7; this kvlocal reads format 1"):
        read_info(path)


def test_truncated_and_corrupt_files_are_refused(saved, tmp_path):
    blob = saved.read_bytes()
    for cut in (0, 3, 40, 300, len(blob) // 2, len(blob) - 1):
        p = tmp_path / f"cut{cut}.kvs"
        p.write_bytes(blob[:cut])
        with pytest.raises(SessionFileError):
            read_session(p)
    data = bytearray(blob)
    data[-100] ^= 0x55  # tensor data
    (tmp_path / "flip.kvs").write_bytes(bytes(data))
    with pytest.raises(SessionFileError, match="checksum"):
        read_session(tmp_path / "flip.kvs")
    with pytest.raises(SessionFileError, match="not found"):
        read_info(tmp_path / "missing.kvs")


def test_a_model_file_is_not_a_session(tiny_dir):
    with pytest.raises(SessionFileError, match="not a kvlocal session"):
        read_info(tiny.ensure_tiny(tiny_dir, "llama-gqa"))


def test_values_a_checksum_cannot_vouch_for(saved, tmp_path):
    data = read_session(saved)
    data.keys[0] = np.array(data.keys[0])
    data.keys[0][0, 0, 0] = np.nan
    write_session(tmp_path / "nan.kvs", data)  # a consistent checksum over bad values
    with pytest.raises(SessionFileError, match="NaN"):
        read_session(tmp_path / "nan.kvs")
    for field, value, message in (("cache.logical_length", 3, "more cells than the logical length"),
                                  ("compaction.ratio", 0.5, "ratio"),
                                  ("chat.messages", [{"role": "robot", "content": "x"}], "chat.messages"),
                                  ("doc.prefix_tokens", [10 ** 6] * 0 + [1, 2], "prefix")):
        path = rewrite(saved, tmp_path / f"{field}.kvs", **{field: value})
        with pytest.raises(SessionFileError, match=message):
            read_info(path)


MUTABLE = {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_session_files_fail_cleanly_or_load_intact(saved, data):
    """Mutated files raise SessionFileError, or load exactly what was saved; never anything else."""
    blob = MUTABLE.setdefault("blob", saved.read_bytes())
    original = MUTABLE.setdefault("data", read_session(saved))
    b = bytearray(blob)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "zero"]))
    pos = data.draw(st.integers(0, len(b) - 1))
    if kind == "flip":
        b[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        b = b[:pos]
    elif kind == "splice":
        b[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        b[pos:pos + 8] = bytes(min(8, len(b) - pos))
    path = saved.parent / "fuzz.kvs"
    path.write_bytes(bytes(b))
    try:
        got = read_session(path)
    except SessionFileError:
        return
    assert got.meta == original.meta
    for a, c in zip(got.keys + got.values + got.bias, original.keys + original.values + original.bias, strict=True):
        assert np.array_equal(a, c)


def test_interrupted_save_keeps_the_previous_file(load_model, saved, tmp_path, monkeypatch):
    import gguf

    target = tmp_path / "keep.kvs"
    target.write_bytes(saved.read_bytes())
    before = target.read_bytes()

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_session(target, read_session(saved))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.kvs"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------
# bad documents, settings and models


def test_bad_documents_and_settings(load_model):
    model = load_model("llama-gqa")
    with Compaction(model, progress=False) as kv:
        with pytest.raises(DocumentError, match="empty"):
            kv.ingest("  \n ")
        with pytest.raises(KvlocalError, match="ingest a document first"):
            kv.compact()
    with Compaction(model, progress=False) as kv, pytest.warns(LongContextWarning, match="beyond the 2048"):
        kv.ingest(TEXT * 12)  # beyond the tiny model's 2048-token context: streamed, with a warning
        assert kv.streamed
    with Compaction(model, progress=False, n_ctx=256) as kv:
        kv.ingest(TEXT)  # longer than the context: planned when the ratio is known
        with pytest.raises(DocumentError, match="does not fit a 256-cell context at ratio 10 .* use a context of at least"):
            kv.compact()
    with Compaction(model, progress=False) as kv:
        kv.ingest(TEXT)
        with pytest.raises(KvlocalError, match="compact the document before saving"):
            kv.save("/nonexistent/x.kvs")
        for ratio, message in ((1.0, "must be > 1"), (0.5, "must be > 1"), (10_000, "less than one key")):
            with pytest.raises(KvlocalError, match=message):
                kv.compact(ratio=ratio, queries="context")
        with pytest.raises(KvlocalError, match="unknown query source"):
            kv.compact(ratio=4, queries="telepathy")


def test_unsupported_architecture_and_missing_model(tmp_path):
    path = tiny.write_tiny(tmp_path / "m3.gguf", "llama-gqa", arch="mistral3")
    with Compaction(str(path), progress=False) as kv:
        with pytest.raises(ModelError, match="unsupported architecture 'mistral3'"):
            kv.ingest(TEXT)
    with pytest.raises(ModelError, match="not found"):
        Compaction(str(tmp_path / "nope.gguf"))


# ---------------------------------------------------------------------------------------------
# the CLI


def run_cli(args, capsys):
    rc = cli([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_end_to_end(tiny_dir, tmp_path, capsys):
    model = tiny.ensure_tiny(tiny_dir, "llama-gqa")
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    out = tmp_path / "doc.kvs"
    rc, text, err = run_cli(["compact", doc, "-m", model, "--ratio", "5", "--queries", "context,repeat", "-o", out,
                             "-q", "-t", "2"], capsys)
    assert rc == 0, err
    assert "cells" in text and "KV cache" in text and "held-out attention error" in text and out.is_file()
    rc, text, _ = run_cli(["info", out], capsys)
    assert rc == 0 and f"{DEFAULT_METHOD} at 5x" in text and "context,repeat" in text
    rc, text, _ = run_cli(["info", out, "--json"], capsys)
    assert json.loads(text)["cache.logical_length"] > 0
    rc, text, err = run_cli(["ask", out, "-m", model, QUESTION, "-n", "6"], capsys)
    assert rc == 0, err
    assert text.endswith("\n")


def test_cli_chat_in_a_real_process(tiny_dir, tmp_path, load_model):
    model = tiny.ensure_tiny(tiny_dir, "llama-gqa")
    path = tmp_path / "doc.kvs"
    compact_and_save(load_model("llama-gqa"), path)
    res = subprocess.run([sys.executable, "-m", "kvlocal", "chat", str(path), "-m", str(model), "-n", "5"],
                         input="hello\n/reset\nhi again\n\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("> ") >= 3 and "loaded in" in res.stdout


def test_cli_bad_input_exits_nonzero_and_writes_nothing(tiny_dir, tmp_path, capsys):
    model = tiny.ensure_tiny(tiny_dir, "llama-gqa")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    out = tmp_path / "out.kvs"
    out.write_bytes(b"previous")
    cases = [
        (["compact", empty, "-m", model, "-o", out], "empty"),
        (["compact", doc, "-m", model, "-o", out, "--ratio", "1"], "must be > 1"),
        (["compact", doc, "-m", model, "-o", out, "-c", "200"], "-cell context at ratio 10"),
        (["compact", doc, "-m", tmp_path / "none.gguf", "-o", out], "model file not found"),
        (["compact", tmp_path / "nodoc.txt", "-m", model, "-o", out], "document not found"),
        (["compact", doc, "-m", model, "-o", tmp_path / "no" / "dir.kvs"], "does not exist"),
        (["ask", tmp_path / "none.kvs", "-m", model, "q"], "not found"),
        (["info", doc], "not a GGUF v3 file"),
    ]
    for args, message in cases:
        rc, _, err = run_cli(args, capsys)
        assert rc == 1, args
        assert message in err and err.startswith("kvlocal: error:") and err.count("\n") == 1, err
    assert out.read_bytes() == b"previous"
    with pytest.raises(SystemExit) as exc:
        cli(["compact", str(doc)])  # missing -m / -o: usage error
    assert exc.value.code == 2


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "kvlocal"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60,
                         env={**os.environ})
    assert res.returncode == 0 and res.stdout.startswith("kvlocal ")
