"""Summarize, then compact (kvlocal.summarize): the mode end to end on a tiny model, and bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import TEXT
from kvlocal.api import CompactedSession, Compaction
from kvlocal.cli import main as cli
from kvlocal.engine.sampling import NoRepeatNgram, Sampler
from kvlocal.engine.session import DocumentError
from kvlocal.errors import KvlocalError
from kvlocal.sessionfile import read_info
from kvlocal.sessionfile.schema import _valid_summary
from kvlocal.summarize import INSTRUCTION, MIN_DOCUMENT, SUMMARY_HEADER, SummarySettings
from models import tiny

DOC = TEXT * 2
QUICK = dict(method="am-highest", queries="repeat")


def test_summarize_then_compact_round_trips_with_its_record(load_model, tmp_path):
    model = load_model("llama-gqa")
    path = tmp_path / "s.kvs"
    with Compaction(model, progress=False) as kv:
        layout = kv.ingest(DOC, name="doc.txt")
        n_doc = layout.n_doc
        r = kv.compact(ratio=40, summarize=SummarySettings(max_tokens=64, seed=3), **QUICK)
        rec = kv.summary
        assert rec.document_tokens == n_doc and rec.overall_ratio == 40 and rec.am_ratio > 1
        assert rec.summary_tokens == r.document_tokens == len(model.tokenize(SUMMARY_HEADER + rec.text,
                                                                               add_special=False))
        assert rec.am_ratio == pytest.approx(rec.summary_tokens * 40 / n_doc)
        assert r.cells_after < n_doc / 40 + layout.length - n_doc + 1  # the document's budget, template aside
        with pytest.raises(KvlocalError, match="holds a summary"):
            kv.compact(ratio=40, **QUICK)  # the document is gone: no silent compaction of the summary
        kv.save(str(path))
    meta = read_info(path)
    summ = meta["compaction.report"]["summary"]
    assert summ["text"] == rec.text and summ["overall_ratio"] == 40 and summ["document_tokens"] == n_doc
    assert meta["compaction.report"]["timings"]["summary_s"] > 0
    assert summ["settings"] == {"max_tokens": 64, "temperature": 0.0, "seed": 3, "instruction": INSTRUCTION,
                                "no_repeat_ngram": 4}
    with CompactedSession(str(path), model) as s:
        assert s.ask("What is the magic number?", max_tokens=4) is not None


def test_the_summary_is_seeded(load_model):
    model = load_model("llama-gqa")
    texts = []
    for seed in (1, 1, 2):
        with Compaction(model, progress=False) as kv:
            kv.ingest(DOC)
            kv.compact(ratio=40, summarize=SummarySettings(max_tokens=32, temperature=0.8, seed=seed), **QUICK)
            texts.append(kv.summary.text)
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize("text,ratio,match", [
    ("A short note about the lighthouse.", 20, "too short to summarize"),
    (DOC, 1000, "at most"),
    (DOC, 1.5, "already"),  # a 64-token summary is shorter than 1/1.5 of the document
])
def test_what_summarizing_cannot_do_is_refused_and_loses_nothing(load_model, text, ratio, match):
    model = load_model("llama-gqa")
    with Compaction(model, progress=False) as kv:
        kv.ingest(text)
        with pytest.raises(DocumentError, match=match):
            kv.compact(ratio=ratio, summarize=SummarySettings(max_tokens=64), **QUICK)
        assert kv.summary is None
        r = kv.compact(ratio=2, **QUICK)  # the document is still there
        assert r.document_tokens == kv.layout.n_doc


def test_a_summary_the_context_cannot_hold_is_refused_before_it_is_written(load_model):
    model = load_model("llama-gqa")
    n = len(model.tokenize(DOC, add_special=False))
    with Compaction(model, n_ctx=n + 96, progress=False) as kv:  # the document fits, a long summary not
        kv.ingest(DOC)
        assert not kv.streamed  # premise: ingested whole
        with pytest.raises(DocumentError, match="leaves room for") as e:
            kv.compact(ratio=20, summarize=SummarySettings(max_tokens=200), **QUICK)
        assert "not 200" in str(e.value) and kv.summary is None
        kv.compact(ratio=20, summarize=SummarySettings(max_tokens=24), **QUICK)  # a short one fits
        assert kv.summary is not None


def test_summary_records_are_checked():
    good = {"text": "x", "document_tokens": 500, "summary_tokens": 50, "seconds": 1.0, "am_ratio": 5.0,
            "overall_ratio": 50.0, "summary_ratio": 10.0}
    assert _valid_summary(good)
    for k, v in (("text", ""), ("document_tokens", 0), ("summary_tokens", 2.5), ("am_ratio", 0.5),
                 ("overall_ratio", float("nan")), ("seconds", -1), ("document_tokens", True)):
        assert not _valid_summary({**good, k: v}), k
    assert not _valid_summary("text") and not _valid_summary({})
    st = {"max_tokens": 320, "temperature": 0.0, "seed": 0, "instruction": "Summarize.", "no_repeat_ngram": 4}
    assert _valid_summary({**good, "settings": st})  # and without it (files written before it was recorded)
    for k, v in (("max_tokens", 0), ("temperature", -1), ("seed", 1.5), ("no_repeat_ngram", 1), ("instruction", " "),
                 ("temperature", True)):
        assert not _valid_summary({**good, "settings": {**st, k: v}}), k
    assert not _valid_summary({**good, "settings": "greedy"})
    with pytest.raises(KvlocalError):
        SummarySettings(max_tokens=4)
    for n in (1, -2):
        with pytest.raises(KvlocalError, match="no_repeat_ngram"):
            SummarySettings(no_repeat_ngram=n)
    assert MIN_DOCUMENT > 0


def test_cli_compact_summarize_and_info(tiny_dir, tmp_path, capsys):
    model = str(tiny.ensure_tiny(tiny_dir, "llama-gqa"))
    doc = tmp_path / "story.txt"
    doc.write_text(DOC)
    out = tmp_path / "story.kvs"
    assert cli(["compact", str(doc), "-m", model, "--ratio", "40", "--summarize", "--summary-tokens", "48",
                "--summary-no-repeat", "3", "--method", "am-highest", "--queries", "repeat", "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "summarized story.txt" in printed and "not kept" in printed and "overall" in printed
    # the overall line counts the summary text's cells, not the template's (kept whole)
    overall = re.search(r"-> (\d+) cells for the summary's text \((\d+)x; (\d+) cells with the template", printed)
    assert overall and int(overall[1]) < int(overall[3]) and int(overall[2]) == pytest.approx(40, rel=0.15)
    assert cli(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "summary    the model's summary" in info and "was not kept" in info and "= 40x overall" in info
    assert "written greedy, at most 48 tokens, no 3-gram twice" in info


def _looping_logits(vocab: int = 12, period: int = 3):
    """Logits a greedy decoder follows round a loop: token t is followed by (t + 1) % period, the
    other tokens a little less likely in a fixed order."""
    def logits(prev: int) -> np.ndarray:
        x = -np.arange(vocab, dtype=np.float64) * 0.01
        x[(prev + 1) % period] = 1.0
        return x
    return logits


def _decode(sampler, steps: int) -> list[int]:
    logits, out, prev = _looping_logits(), [], 0
    for _ in range(steps):
        prev = sampler(logits(prev))
        out.append(prev)
    return out


def test_the_ngram_guard_breaks_greedy_loops():
    plain = _decode(Sampler(), 30)
    assert plain[:6] == [1, 2, 0, 1, 2, 0]  # premise: greedy loops
    for n in (2, 3, 4):
        out = _decode(NoRepeatNgram(Sampler(), n), 30)
        grams = [tuple(out[i:i + n]) for i in range(len(out) - n + 1)]
        assert len(grams) == len(set(grams)), n  # no n-gram twice
        assert out[:n] == plain[:n]  # the guard changes nothing before a repeat is possible
    assert _decode(NoRepeatNgram(Sampler(), 40), 30) == plain  # no 39-gram completes in 30 tokens
    with pytest.raises(ValueError):
        NoRepeatNgram(Sampler(), 1)


def test_summary_settings_pick_the_guard():
    assert isinstance(SummarySettings().sampler(), NoRepeatNgram)
    assert SummarySettings().sampler().n == 4
    assert isinstance(SummarySettings(no_repeat_ngram=0).sampler(), Sampler)


def test_a_base_model_is_asked_for_its_summary_in_completion_style(load_model, monkeypatch):
    from kvlocal.engine import binding
    from kvlocal.engine.session import Session
    from kvlocal.summarize import INSTRUCTION, summary_prompt

    model = load_model("llama-gqa")
    with Session(model, n_ctx=256) as s:
        assert INSTRUCTION in model.detokenize(summary_prompt(s, INSTRUCTION))
        monkeypatch.setattr(binding.Model, "chat_template", lambda self: None)
        text = model.detokenize(summary_prompt(s, INSTRUCTION))
        assert text.rstrip().endswith("every name, number and place:") and INSTRUCTION not in text
