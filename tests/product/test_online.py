"""Chats that compact themselves when the context fills (kvlocal.online)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import TEXT
from kvlocal.am import ONLINE_METHOD, Compactor
from kvlocal.api import CompactedSession, Compaction
from kvlocal.engine.session import DocumentError
from kvlocal.errors import KvlocalError
from kvlocal.kv.cache import CompactedCache
from kvlocal.online import OnlineSettings, cell_facts
from kvlocal.sessionfile import describe
from models import tiny

QUESTION = "What is the magic number for the lighthouse?"
ONLINE = OnlineSettings(max_context=384, ratio=4, keep_recent=64, method="am-highest")


@pytest.fixture
def saved(load_model, tmp_path):
    path = tmp_path / "doc.kvs"
    with Compaction(load_model("llama-gqa"), progress=False) as kv:
        kv.ingest(TEXT)
        kv.compact(ratio=4, method="am-highest", queries="context")
        kv.save(str(path))
    return path


def _talk(s, turns=8, tokens=60, strict=True):
    for i in range(turns):
        s.chat(f"Tell me more, part {i}.", max_tokens=tokens)
        if strict and s.online is not None:
            assert s.session.cells[0] <= s.online.limit(s.session)


def test_a_chat_runs_past_its_context(load_model, saved):
    model = load_model("llama-gqa")
    with CompactedSession(str(saved), model, chat_budget=256, online=None) as s:  # without: it stops
        with pytest.raises(DocumentError, match="larger n_ctx"):
            _talk(s)
    with CompactedSession(str(saved), model, chat_budget=256, online=ONLINE) as s:
        doc_cells = s.session.cells[0]
        before = s.session.snapshot()
        bias_before = s.session.bias()
        _talk(s)
        records = s.online_records
        assert len(records) >= 2 and s.session.n_past > 2 * ONLINE.max_context
        for r in records:
            assert r.cells_after < r.cells_before <= ONLINE.max_context and r.method == "am-highest"
            assert r.region[0] == s.meta["doc.end"] + len(s.meta["doc.suffix_tokens"])
            assert r.heldout_output_rel_l2 is not None and np.isfinite(r.heldout_output_rel_l2)
        after = s.session.snapshot()
        bias_after = s.session.bias()
        for il in range(len(before.keys)):  # the document's cells are never touched
            assert np.array_equal(after.keys[il][:doc_cells], before.keys[il][:doc_cells])
            assert np.array_equal(after.values[il][:doc_cells], before.values[il][:doc_cells])
            assert np.array_equal(bias_after[il][:doc_cells], bias_before[il][:doc_cells])
        recent = np.arange(s.session.n_past - ONLINE.keep_recent, s.session.n_past)
        assert np.isin(recent, after.positions).all()  # the last tokens stay whole
        assert s.ask(QUESTION, max_tokens=6) is not None


def test_save_and_reload_after_online_compaction(load_model, saved, tmp_path):
    model = load_model("llama-gqa")
    out = tmp_path / "chat.kvs"
    with CompactedSession(str(saved), model, chat_budget=256, online=ONLINE) as s:
        _talk(s, turns=6)
        assert s.online_records
        n_past, messages = s.session.n_past, list(s.messages)
        s.save(str(out))
        prompt = s.session.chat_tokens([{"role": "user", "content": QUESTION}])
        logits = s.session.decode(prompt)[-1].copy()
    with CompactedSession(str(out), model) as r:
        assert r.session.n_past == n_past and r.messages == messages
        assert len(r.meta["compaction.report"]["online"]) == len(s.online_records)
        assert f"compacted {len(s.online_records)} times while it ran" in "\n".join(describe(r.meta, out))
        assert np.array_equal(r.session.decode(prompt)[-1], logits)
    with CompactedSession(str(out), model, chat_budget=256, online=ONLINE) as r:  # and it goes on compacting
        _talk(r, turns=4, strict=False)  # max_context may be passed until this conversation has queries
        assert r.online_records and r.session.cells[0] <= ONLINE.max_context
        r.save(str(out))
        more = len(r.online_records)
    with CompactedSession(str(out), model) as r:  # the records of both conversations, in order
        assert len(r.meta["compaction.report"]["online"]) == len(s.online_records) + more
        assert r.ask(QUESTION, max_tokens=4) is not None


def test_recompacting_a_compacted_region_keeps_its_bias(load_model):
    """Bias on top of bias: the cells of an earlier compaction, compacted again with every key
    kept (ratio ~1: the identity fit), must come back with the bias they carried - the logits stay
    bit for bit.  Dropping that bias (a planted bug) moves them."""
    model = load_model("llama-gqa")
    with Compaction(model, progress=False) as kv:
        kv.ingest(TEXT)
        kv.compact(ratio=4, method="am-highest", queries="context")
        s = kv.session
        kv.chat("hello there", max_tokens=12)
        assert kv.cache.has_bias
        probe = s.chat_tokens([{"role": "user", "content": QUESTION}])
        start = s.n_past
        snap, bias = s.snapshot(), s.bias()
        assert any(b[: kv.cache.n_cells].any() for b in bias) and not any(b[kv.cache.n_cells:].any() for b in bias)

        def logits(cache):
            s.inject(cache, snap)
            out = s.decode(probe)[-1].copy()
            s.rewind(start)
            return out

        ref = logits(CompactedCache(snap.positions.copy(), snap.keys, snap.values, bias, snap.logical_length))

        def recompact(given):
            return Compactor("am-highest", ratio=1.0001).compact(snap, kv.layout.doc_start, s.n_past,
                                                                  s.context_queries, bias=given)[0]

        cache = recompact(bias)
        for il in range(len(bias)):  # every cell kept, in order, with the bias it had
            assert np.array_equal(cache.bias[il], bias[il])
        assert np.array_equal(logits(cache), ref)
        wrong = logits(recompact(None))  # planted: the region's bias forgotten
        assert np.abs(wrong - ref).max() > 1e-2


def test_online_settings_are_checked(load_model, saved):
    with pytest.raises(KvlocalError, match="twice keep_recent"):
        OnlineSettings(max_context=100, keep_recent=64)
    with pytest.raises(KvlocalError, match="must be > 1"):
        OnlineSettings(ratio=1)
    with pytest.raises(KvlocalError, match="unknown compaction method"):
        OnlineSettings(method="nope")
    with CompactedSession(str(saved), load_model("llama-gqa"), chat_budget=256,
                          online=OnlineSettings(max_context=260, keep_recent=128, method="am-highest")) as s:
        with pytest.raises(KvlocalError, match="would not make room"):
            _talk(s, turns=4)


def test_cli_chat_compacts_and_saves(tiny_dir, saved, tmp_path):
    model = tiny.ensure_tiny(tiny_dir, "llama-gqa")
    out = tmp_path / "after.kvs"
    lines = "".join(f"Tell me more, part {i}.\n" for i in range(8)) + "\n"
    res = subprocess.run([sys.executable, "-m", "kvlocal", "chat", str(saved), "-m", str(model), "-n", "60",
                          "--max-context", "384", "--keep-recent", "64", "--save", str(out)],
                         input=lines, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "[compacted the conversation:" in res.stderr and out.is_file()
    assert f"{ONLINE_METHOD} at 2x" in res.stderr
    res = subprocess.run([sys.executable, "-m", "kvlocal", "chat", str(saved), "-m", str(model), "-n", "60",
                          "--max-context", "384", "--keep-recent", "64", "--online-method", "am-highest"],
                         input=lines, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "am-highest at 2x" in res.stderr and ONLINE_METHOD not in res.stderr


def test_a_reloaded_session_compacts_by_default_and_keeps_its_queries_bounded(load_model, saved):
    model = load_model("llama-gqa")
    settings = OnlineSettings(keep_recent=64, keep_queries=200, method="am-highest")
    with CompactedSession(str(saved), model, chat_budget=256) as s:  # the default: compact when full
        assert s.online is not None and s.online.settings == OnlineSettings()
        assert s.online.settings.method == ONLINE_METHOD  # a chat keeps numbers' sentences before names' cores
    with CompactedSession(str(saved), model, chat_budget=256, online=settings) as s:
        _talk(s, turns=8)
        assert s.online_records and s.session.cells[0] <= s.session.n_ctx
        held = s.online.queries().n_tokens
        assert held <= 200 + 8 * 80  # kept after the last compaction + what came since
        for r in s.online_records[1:]:
            assert r.cells_before <= s.session.n_ctx


def test_facts_of_a_recompaction_follow_origin_not_cell_positions():
    """A whole cell holds its own token; a compacted cell holds a fact only when it holds the same
    original key in every layer and head (a verbatim fact); mixed heads and padding are no facts."""
    lo = 10
    mask = np.zeros(30, bool)
    mask[[5, 7, 12]] = True  # positions 15, 17, 22 are fact tokens
    positions = np.array([2, 11, 13, 15, 30, 31, 32])  # 2: before the region; 11, 13, 15: compacted; 30..: whole
    layer = np.array([[2, 2], [15, 15], [17, 22], [-1, -1], [30, 30], [31, 31], [32, 32]])
    other = layer.copy()
    other[1] = [15, 15]
    facts = cell_facts(mask, lo, positions, [layer, other], 40)
    assert facts[11] and not facts[13] and not facts[15]  # verbatim fact / mixed heads / padding
    assert not facts[[2, 30, 31, 32]].any()
    other[1] = [15, 16]  # one head of one layer holds another key: not a verbatim fact
    assert not cell_facts(mask, lo, positions, [layer, other], 40)[11]
    mask[20] = True  # position 30 is a fact token and cell 30 holds itself
    assert cell_facts(mask, lo, positions, [layer, other], 40)[30]
    ranks = mask.astype(np.uint8) * 200
    ranks[5] = 255  # fact ranks come through as they are
    got = cell_facts(ranks, lo, positions, [layer, layer], 40)
    assert got.dtype == np.uint8 and got[11] == 255 and got[30] == 200 and not got[[2, 13, 15, 31, 32]].any()


def test_a_fact_stays_verbatim_through_repeated_online_compactions(load_model, saved):
    """The default method keeps a number sentence whole; the compactions after the first must
    still see it as a fact (it takes the same slot in every head, found by origin)."""
    model = load_model("llama-gqa")
    settings = OnlineSettings(max_context=384, ratio=2, keep_recent=64)  # the default method: facts
    filler = "and then the quiet boat went slowly along the river past the old mill and the green fields"
    with CompactedSession(str(saved), model, chat_budget=256, online=settings) as s:
        s.append([{"role": "user", "content": "note this"},
                  {"role": "assistant", "content": "the special magic number for the harbor is 5550123."},
                  {"role": "user", "content": filler}])
        n = s.session.n_past
        digits = [p for p in range(s._doc_length, n)
                  if s.model.detokenize([s.session.tokens[p - n]]).strip().isdigit()]
        assert len(digits) == 7
        for _ in range(8):
            s.append([{"role": "user", "content": filler}, {"role": "assistant", "content": filler}])
        assert len(s.online_records) >= 4
        for o in s._origin:  # every digit still held by every head of every layer
            for p in digits:
                assert (o == p).any(axis=0).all(), p
