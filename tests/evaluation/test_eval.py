"""The evaluation harness: data, needles, and a smoke run of the whole grid on a tiny model.

The harness's own logic runs on small generated data (tests/evaldata.py) in any clone; only the
check of the real LEval/SQuALITY files needs ../shared/data and skips, with its reason, without it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import evaldata
from kvlocal.am import DEFAULT_METHOD
from kvlocal.errors import KvlocalError
from kvlocal.evaluation.data import (
    DEFAULT_DATA, cut_to_tokens, data_dir, make_haystack, quality_articles, squality_stories,
)
from kvlocal.evaluation.harness import EvalConfig, Evaluator, cell_id
from kvlocal.evaluation.report import collect, write


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory):
    return str(evaldata.write(tmp_path_factory.mktemp("evaldata")))


def real_data() -> str:
    try:
        return str(data_dir())
    except KvlocalError:
        pytest.skip(f"the evaluation data (LEval-QuALITY, SQuALITY) is not in {DEFAULT_DATA}: "
                    "clone beside the project's shared/ folder to run this test")


def test_real_quality_articles_parse():
    arts = quality_articles(real_data())
    assert len(arts) == 15 and sum(len(a.questions) for a in arts) >= 190
    q = arts[8].questions[0]
    assert "(A)" in q.text and 0 <= q.answer < 4
    assert len(squality_stories(real_data())) >= 2


def test_generated_articles_parse_like_the_real_ones(gen_data):
    arts = quality_articles(gen_data)
    assert len(arts) == 9 and all(len(a.questions) == 4 for a in arts)
    for q in arts[3].questions:
        assert "(A)" in q.text and "(D)" in q.text and 0 <= q.answer < 4 and q.stem.endswith("?")


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(KvlocalError, match="evaluation data not found in .*--data") as e:
        quality_articles(tmp_path)
    assert "\n" not in str(e.value)


def test_cut_to_tokens_keeps_whole_sentences_within_budget(gen_data):
    text = quality_articles(gen_data)[2].text

    def count(t):
        return len(t.split())

    cut, was_cut = cut_to_tokens(text, 500, count)
    assert was_cut and count(cut) <= 500 and text.startswith(cut) and cut.rstrip("\"')]")[-1] in ".!?"
    nxt = text[len(cut):].lstrip()
    assert count(cut + " " + nxt.split(". ")[0] + ".") > 500  # the next sentence would not fit
    assert cut_to_tokens(cut, 500, count) == (cut, False)


def test_haystack_holds_every_needle_within_budget(gen_data):
    story = squality_stories(gen_data)[0]

    def count(text):  # a crude word-piece count is enough for the generator's contract
        return len(text.split()) * 4 // 3

    hay = make_haystack(story, 800, count, k=5, seed=3)
    assert count(hay.text) <= 800 and len(hay.needles) == 5 and hay.continuation
    for key, number in hay.needles:
        assert f"The special magic number for {key} is {number}." in hay.text and re.fullmatch(r"\d{7}", number)
    assert make_haystack(story, 800, count, k=5, seed=3) == hay


def test_name_haystack_holds_distinct_names_at_the_number_needles_depths(gen_data):
    story = squality_stories(gen_data)[0]

    def count(text):
        return len(text.split()) * 4 // 3

    numbers, names = (make_haystack(story, 800, count, k=5, seed=3, kind=kind) for kind in ("number", "name"))
    assert [k for k, _ in names.needles] == [k for k, _ in numbers.needles]  # the same keys
    people = [n for _, n in names.needles]
    assert len(set(people)) == 5 and len({p.split()[0] for p in people}) == 5 == len({p.split()[1] for p in people})
    for key, person in names.needles:
        assert f"The keeper of the {key} is {person}." in names.text and re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", person)
    assert count(names.text) <= 800 and make_haystack(story, 800, count, k=5, seed=3, kind="name") == names
    with pytest.raises(ValueError, match="needle kind"):
        make_haystack(story, 800, count, k=5, seed=3, kind="date")


def test_numbers_in_words_are_written_as_a_story_writes_them_and_found_either_way(gen_data):
    from kvlocal.evaluation.data import NEEDLE_KINDS, in_words

    assert [in_words(n) for n in (7, 13, 40, 42, 100, 101, 642, 990)] == [
        "seven", "thirteen", "forty", "forty-two", "one hundred", "one hundred and one",
        "six hundred and forty-two", "nine hundred and ninety"]
    assert len({in_words(n) for n in range(1, 1000)}) == 999
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="1..999"):
            in_words(bad)
    words = NEEDLE_KINDS["words"]
    for answer in ("Six hundred and forty-two.", "six hundred and forty two", "It is 642.", "642"):
        assert words.found("six hundred and forty-two", answer)
    for answer in ("six hundred and forty", "6420", "1,642", "six hundred and forty-three"):
        assert not words.found("six hundred and forty-two", answer)
    assert not NEEDLE_KINDS["number"].found("4213987", "four million")  # digits stay exact

    story = squality_stories(gen_data)[0]
    hay = make_haystack(story, 800, lambda t: len(t.split()) * 4 // 3, k=5, seed=3, kind="words")
    numbers = [n for _, n in hay.needles]
    assert len(set(numbers)) == 5
    for key, number in hay.needles:
        assert f"The special magic number for {key} is {number}." in hay.text
        assert re.fullmatch(r"[a-z]+ hundred and [a-z-]+", number)


def test_smoke_grid_runs_resumes_and_reports(load_model, tmp_path, gen_data):
    model = load_model("llama-gqa")
    cfg = EvalConfig.smoke(data=gen_data)
    ev = Evaluator(model, cfg, tmp_path / "cache", progress=False)
    ev.run(("quality", "niah"))
    files = sorted(p.name for p in ev.cache.root.rglob("*.json"))
    cells = [cell_id(m, tuple(q), r) for m, q in cfg.methods for r in cfg.ratios]
    assert all(f"{c}.json" in files for c in cells)
    res = collect(ev)
    row = res["rows"][("am-highest (context)", 4)]
    assert row["done"] == res["expected"] == 2 and row["effective_ratio"] > 2
    assert 0 <= row["niah"] <= 1 and row["kl"] >= 0 and row["attn"] > 0
    # a second run finds every cell cached and redoes nothing
    before = {p: p.stat().st_mtime_ns for p in ev.cache.root.rglob("*.json")}
    Evaluator(model, cfg, tmp_path / "cache", progress=False).run(("quality", "niah"))
    assert before == {p: p.stat().st_mtime_ns for p in ev.cache.root.rglob("*.json")}
    report = write(ev, tmp_path / "out", notes="Why: a tiny random model.").read_text()
    for section in ("## Analysis", "Why: a tiny random model.", "Retention R", "Needle exact match", "Next-token KL", "top-1", "multiple-choice",
                    "attention output error", "Compaction time", "query generation", "Per layer", "Targets"):
        assert section in report
    assert (tmp_path / "out" / "eval-tiny-llama-gqa-s0-R.png").is_file()


def test_a_base_model_is_asked_in_completion_style(load_model, tmp_path, gen_data, monkeypatch):
    """A model without a chat template (gemma3-270m is a base model) gets completion prompts that
    its answer continues, and the grid (incl. the no-context reference) runs on it."""
    from kvlocal.engine import binding
    from kvlocal.evaluation import tasks
    from kvlocal.engine.session import Session

    model = load_model("llama-gqa")
    with Session(model, n_ctx=512) as s:
        chat = s.model.detokenize(tasks.needle_prompt(s, "the lighthouse"))
        assert "assistant" in chat  # the ChatML turn (detokenize drops the special tokens)
    monkeypatch.setattr(binding.Model, "chat_template", lambda self: None)
    with Session(model, n_ctx=512) as s:
        assert tasks.completion_style(s)
        text = s.model.detokenize(tasks.needle_prompt(s, "the lighthouse"))
        assert text.endswith("Answer: The special magic number for the lighthouse is") and "assistant" not in text
        name = s.model.detokenize(tasks.needle_prompt(s, "lantern", "name"))
        assert name.endswith("Question: Who is the keeper of the lantern?\nAnswer: The keeper of the lantern is")
    cfg = EvalConfig.smoke(data=gen_data, ratios=(4,), methods=(("truncate", ()),))
    ev = Evaluator(model, cfg, tmp_path / "cache", progress=False)
    ev.run(("quality", "niah"))
    assert collect(ev)["rows"][("truncate", 4)]["done"] == 2


def test_cost_measures_children_not_the_parent(load_model, gen_data):
    """Decode timing and file sizes per ratio, and peak RSS of fresh processes: a child started
    from a big parent must report its own peak (ru_maxrss would report the parent's)."""
    import numpy as np

    from kvlocal.evaluation import cost

    ballast = np.ones(600 * 2**20 // 8)  # 600 MiB resident in this process
    out = cost.measure(load_model("llama-gqa"), (4, 8), tokens=300, decode_tokens=4, rounds=1,
                       data=gen_data)
    assert ballast.sum() > 0
    assert out["cells_full"] > out["ratios"]["4"]["cells"] > out["ratios"]["8"]["cells"]
    assert 0 < out["ratios"]["8"]["file_bytes"] and out["ratios"]["4"]["speedup"] > 0
    for k, v in out["rss"].items():
        assert "error" not in v, (k, v)
        assert 0 < v["peak_rss_mib"] < 500 and v["ready_s"] > 0


def test_eval_cli_refuses_a_missing_notes_file_before_any_work(load_model, tmp_path, capsys):
    from kvlocal.cli import main

    model = load_model("llama-gqa")
    rc = main(["eval", "-m", str(model.path), "--smoke", "--cache", str(tmp_path / "c"), "--out",
               str(tmp_path / "o"), "-q", "--notes", str(tmp_path / "missing.md")])
    assert rc != 0 and "cannot read the notes file" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_eval_cli_parses_methods_and_keeps_query_budgets_apart(load_model, tmp_path):
    import pytest

    from kvlocal.cli import _parse_methods
    from kvlocal.errors import KvlocalError

    assert _parse_methods("am-highest:repeat+self-study, truncate") == (
        ("am-highest", ("repeat", "self-study")), ("truncate", ()))
    with pytest.raises(KvlocalError, match="unknown compaction method .am-best."):
        _parse_methods("am-best:repeat")
    with pytest.raises(KvlocalError, match="unknown query source"):
        _parse_methods("am-highest:psychic")
    model = load_model("llama-gqa")
    roots = {Evaluator(model, EvalConfig(max_queries=q), tmp_path, progress=False).cache.root for q in (4096, None, 512)}
    assert len(roots) == 3


def test_eval_cli_without_data_says_where_to_get_it(load_model, tmp_path, capsys):
    from kvlocal.cli import main

    rc = main(["eval", "-m", str(load_model("llama-gqa").path), "--smoke", "--data", str(tmp_path / "none"),
               "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "evaluation data not found" in err and "--data" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def evaldata_dir(tmp_path) -> str:
    return str(evaldata.write(tmp_path / "data"))


def test_eval_cli_refuses_an_unknown_part_before_any_work(tmp_path, capsys):
    from kvlocal.cli import main

    rc = main(["eval", "-m", str(tmp_path / "no-model.gguf"), "--smoke", "--parts", "quality,summaries",
               "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "unknown summaries" in err and "summary" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()
    rc = main(["eval", "-m", str(tmp_path / "no-model.gguf"), "--smoke", "--parts", "summary", "--summary-no-repeat",
               "1", "--data", evaldata_dir(tmp_path), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "no_repeat_ngram" in err and len(err.splitlines()) == 1


def test_targets_compare_only_baselines_at_their_nominal_memory():
    from types import SimpleNamespace

    from kvlocal.evaluation.report import _memory_table, _target_lines

    def row(v, pad=0.0):
        return {"R": v, "niah": v, "kl": 1 - v, "top1": v, "padding": pad}

    cfg = SimpleNamespace(ratios=(10,))
    rows = {("am-x (repeat)", 10): row(0.6), ("truncate", 10): row(0.5), ("kvzip (kvzip)", 10): row(0.9, pad=0.89)}
    labels = [lbl for lbl, _ in rows]
    refs = {"full": {"niah": 0.5}}
    lines = "\n".join(_target_lines(rows, refs, cfg, labels, ["am-x (repeat)"], "the default"))
    assert "retention): met" in lines and "truncate at 10x" in lines and "not compared" in lines and "kvzip" in lines
    table = "\n".join(_memory_table(rows, labels, cfg))
    assert "| kvzip (kvzip) | 1.1 |" in table and "truncate" not in table
    rows[("kvzip (kvzip)", 10)]["padding"] = 0.0  # at its nominal memory it counts, and wins
    lines = "\n".join(_target_lines(rows, refs, cfg, labels, ["am-x (repeat)"], "the default"))
    assert "missed: kvzip (kvzip) at 10x" in lines and "not compared" not in lines
    assert _memory_table(rows, labels, cfg) == []


def test_summary_part_scores_every_variant_side_by_side(load_model, tmp_path, gen_data):
    """Summarize-then-compact in the evaluation: the summary alone, the summary compacted to each
    overall ratio and the default method alone at it, scored on both kinds of document, refusals
    recorded with their reason, resumed from the cache and reported (table + plot points)."""
    from kvlocal.evaluation.summaries import cached, variants

    model = load_model("llama-gqa")
    cfg = EvalConfig.smoke(data=gen_data, article_words=260, summary_ratios=(2, 16), ratios=(4,),
                           methods=(("truncate", ()),))
    ev = Evaluator(model, cfg, tmp_path / "cache", progress=False)
    ev.run(("summary",))
    keys = ["quality8", "niah0-600"]
    cells = {k: {v: cached(ev.cache, cfg, k, v) for v in variants(cfg.summary_ratios)} for k in keys}
    for k in keys:
        c = cells[k]
        n_doc, n_sum = c["summary"]["doc_tokens"], c["summary"]["summary_tokens"]
        assert n_doc >= 128 and n_doc / n_sum > 2  # premise: the summary alone is past 2x
        assert "already" in c["summary+am@2"]["refused"]  # so summary + AM to 2x is refused, with the reason
        assert c["summary"]["overall_ratio"] == pytest.approx(n_doc / n_sum)
        # AM on the summary to 16x overall: its keys are the document's tokens / 16, as AM alone's are
        for v in ("summary+am@16", "am@16"):
            assert c[v]["overall_ratio"] == pytest.approx(16, rel=0.25)
        assert c["summary+am@16"]["am_ratio"] == pytest.approx(n_sum * 16 / n_doc)
        assert c["summary+am@16"]["time_s"] > c["summary"]["time_s"] > 0
        assert c["am@2"]["overall_ratio"] == pytest.approx(2, rel=0.25)
    assert {"nll", "mc"} <= set(cells["quality8"]["summary+am@16"])
    assert {"hits", "kl", "top1"} <= set(cells["niah0-600"]["summary+am@16"])
    assert cells["niah0-600"]["summary"]["kl"] > 0
    before = {p: p.stat().st_mtime_ns for p in ev.cache.root.rglob("*.json")}
    Evaluator(model, cfg, tmp_path / "cache", progress=False).run(("summary",))
    assert before == {p: p.stat().st_mtime_ns for p in ev.cache.root.rglob("*.json")}
    res = collect(ev)
    rows = res["summarized"]
    assert rows["summary+am@16"]["done"] == 2 and rows["summary+am@2"]["refused"]
    assert res["refs"]["summary"]["R"] == rows["summary"]["R"]  # the reference line is the same summary
    report = write(ev, tmp_path / "out").read_text()
    assert "Summarize, then compact" in report and f"summary + {DEFAULT_METHOD} to 16x" in report
    assert f"{DEFAULT_METHOD} alone at 2x" in report and f"refused, summary + {DEFAULT_METHOD} to 2x" in report
    assert (tmp_path / "out" / "eval-tiny-llama-gqa-s0-pareto.png").is_file()
    # summaries written another way are not mistaken for these: the n-gram guard has its own cells
    other = Evaluator(model, EvalConfig.smoke(**{**cfg.__dict__, "summary_no_repeat": 0}), tmp_path / "cache",
                      progress=False)
    assert all(cached(other.cache, other.cfg, k, "summary") is None for k in keys)
    # a compacted cell made with another method (an earlier default) is not this default's
    for v in ("summary+am@16", "am@16"):
        stale = ev.cache.get("quality8", "summarize", v)
        ev.cache.put({**stale, "method": "am-highest"}, "quality8", "summarize", v)
        assert cached(ev.cache, cfg, "quality8", v) is None
    assert cached(ev.cache, cfg, "quality8", "summary") is not None  # the summary itself does not depend on it
    with pytest.raises(KvlocalError, match="unknown evaluation part"):
        ev.run(("quality", "sumary"))


def test_needle_nll_is_the_numbers_nll_after_its_question(load_model):
    from kvlocal.engine.session import Session
    from kvlocal.evaluation import tasks

    with Session(load_model("llama-gqa"), n_ctx=512) as s:
        s.ingest_document("The special magic number for the lighthouse is 4213987. The sea was calm.")
        n = s.n_past
        got = tasks.needle_nll(s, "the lighthouse", "4213987")
        assert s.n_past == n  # the session is left as it was
        want = tasks.answer_nll(s, tasks.needle_prompt(s, "the lighthouse"),
                                [int(t) for t in s.tokenize("4213987", special=False)])
        assert got == want and got != tasks.needle_nll(s, "the lighthouse", "9999999")


def test_needle_nll_of_a_name_is_taken_after_the_answers_own_words(load_model):
    from kvlocal.engine.session import Session
    from kvlocal.evaluation import tasks

    with Session(load_model("llama-gqa"), n_ctx=512) as s:
        s.ingest_document("The keeper of the lantern is Clara Marlowe. The sea was calm.")
        got = tasks.needle_nll(s, "lantern", "Clara Marlowe", kind="name")
        prompt = np.concatenate([tasks.needle_prompt(s, "lantern", "name"),
                                 s.tokenize("The keeper of the lantern is", special=False)])
        assert "Who is the keeper of the lantern?" in s.model.detokenize(prompt)
        want = tasks.answer_nll(s, prompt, [int(t) for t in s.tokenize(" Clara Marlowe", special=False)])
        assert got == want and got != tasks.needle_nll(s, "lantern", "Edith Varro", kind="name")
        spelled = tasks.needle_nll(s, "lantern", "six hundred and forty-two", kind="words")  # after its lead too
        prompt = np.concatenate([tasks.needle_prompt(s, "lantern", "words"),
                                 s.tokenize("The special magic number for lantern is", special=False)])
        assert spelled == tasks.answer_nll(s, prompt, [int(t) for t in s.tokenize(" six hundred and forty-two",
                                                                                   special=False)])
