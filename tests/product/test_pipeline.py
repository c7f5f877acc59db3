"""On-policy compaction: stages of layers, each fitted on queries taken through the ones below."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TEXT, session_kwargs
from kvlocal.am import Compactor, get_method
from kvlocal.errors import KvlocalError
from kvlocal.kv.cache import identity_compaction
from kvlocal.pipeline import compact_on_policy, stage_layers
from kvlocal.engine.queries import collect_queries
from kvlocal.engine.session import Session


def test_stage_layers_are_consecutive_and_cover_every_layer():
    assert stage_layers(30, 3) == [list(range(10)), list(range(10, 20)), list(range(20, 30))]
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_layers(2, 5) == [[0], [1]]
    with pytest.raises(ValueError):
        stage_layers(4, 0)


@pytest.fixture(scope="module")
def doc(load_model):
    s = Session(load_model("qwen2"), n_ctx=1024, capture=True, **session_kwargs("qwen2"))
    layout = s.ingest_document(TEXT, capture_queries=True)
    yield s, layout, s.snapshot(), s.state()
    s.close()


def test_whole_layers_keep_every_key_and_given_results_are_reused(doc):
    s, layout, snap, blob = doc
    s.restore(blob)
    qs = collect_queries(s, layout, ["repeat"])
    n = len(snap.keys)
    everything = Compactor("am-highest", ratio=4).compact(snap, layout.doc_start, layout.doc_end, qs,
                                                          whole_layers=range(n))[0]
    ident = identity_compaction(snap, layout.doc_start, layout.doc_end)
    assert everything.n_cells == ident.n_cells
    for li in range(n):  # every layer whole: the identity compaction, bit for bit
        assert np.array_equal(everything.keys[li], ident.keys[li])
        assert np.array_equal(everything.values[li], ident.values[li])
        assert not everything.bias[li].any()
    full, report = Compactor("am-highest", ratio=4).compact(snap, layout.doc_start, layout.doc_end, qs)
    upper = list(range(1, n))
    mixed, mixed_report = Compactor("am-highest", ratio=4).compact(snap, layout.doc_start, layout.doc_end, qs,
                                                                   whole_layers=upper)
    assert mixed.n_cells == ident.n_cells  # the whole layers set the length; layer 0 is padded
    t = full.n_cells - (ident.n_cells - layout.n_doc)
    d0 = slice(layout.doc_start, layout.doc_start + t)
    assert np.array_equal(mixed.keys[0][d0], full.keys[0][d0]) and np.array_equal(mixed.bias[0][d0], full.bias[0][d0])
    assert np.isneginf(mixed.bias[0][layout.doc_start + t: layout.doc_end]).all()
    assert {k[1] for k in mixed_report.results} == {0}
    # given results are used as they are, whatever the queries say
    other = collect_queries(s, layout, ["context"])
    again, _ = Compactor("am-highest", ratio=4).compact(snap, layout.doc_start, layout.doc_end, other,
                                                        given=report.results)
    assert all(np.array_equal(a, b) for a, b in zip(again.keys + again.values + again.bias,
                                                    full.keys + full.values + full.bias, strict=True))
    with pytest.raises(KvlocalError, match="whole_layers"):
        Compactor("am-highest", ratio=4).compact(snap, layout.doc_start, layout.doc_end, qs, whole_layers=[n])


def test_on_policy_stages_fit_upper_layers_on_queries_through_compacted_lower_ones(doc):
    s, layout, snap, blob = doc
    s.restore(blob)
    qs = collect_queries(s, layout, ["repeat"])
    off, _ = Compactor("am-highest", ratio=4).compact(snap, layout.doc_start, layout.doc_end, qs)
    method = get_method("am-highest-onpolicy")
    assert method.stages == 3
    n = len(snap.keys)
    runs = []
    for _ in range(2):
        s.restore(blob)
        cache, report, query_s = compact_on_policy(s, layout, snap, Compactor(method, ratio=4), ["repeat"],
                                                   stages=n, first=qs)
        runs.append(cache)
        s.inject(cache, snap)  # as the API and the evaluation do with the returned cache
        assert query_s > 0 and report.notes["on-policy stages"] == n
        assert cache.n_cells == off.n_cells and s.compacted and s.n_past == layout.length
    # the bottom layer saw the same queries as off-policy; the ones above saw other queries
    assert np.array_equal(runs[0].keys[0], off.keys[0]) and np.array_equal(runs[0].bias[0], off.bias[0])
    assert any(not np.array_equal(runs[0].values[li], off.values[li]) for li in range(1, n))
    # deterministic, and the session holds the final cache: it decodes
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].values, runs[1].values, strict=True))
    s.decode(s.chat_tokens([{"role": "user", "content": "What is the magic number?"}]))
    s.restore(blob)


def test_on_policy_default_composition_keeps_facts_verbatim_in_every_stage(doc):
    """am-facts-omp-onpolicy: the default's selection and fits, staged; the bottom stage is the
    default off-policy, and every stage keeps the number sentence's cells verbatim."""
    s, layout, snap, blob = doc
    s.restore(blob)
    qs = collect_queries(s, layout, ["repeat"])
    method = get_method("am-facts-omp-onpolicy")
    assert method.stages == 3 and method.verbatim_facts and method.queries == get_method("am-facts-omp").queries
    facts = method.fact_mask(s.token_texts(layout.length))
    facts[: layout.doc_start] = False
    assert facts.sum() >= 5  # "The special magic number for the lighthouse is 4817263."
    off, _ = Compactor("am-facts-omp", ratio=4).compact(snap, layout.doc_start, layout.doc_end, qs, facts=facts)
    n = len(snap.keys)
    cache, report, _ = compact_on_policy(s, layout, snap, Compactor(method, ratio=4), ["repeat"], stages=n,
                                         first=qs, facts=facts)
    s.inject(cache, snap)
    assert np.array_equal(cache.keys[0], off.keys[0]) and np.array_equal(cache.values[0], off.values[0])
    assert any(not np.array_equal(cache.values[li], off.values[li]) for li in range(1, n))
    assert {k[0] for k in report.results} == {0}  # one chunk: indices count from the document's first cell
    for (_, li, h), res in report.results.items():
        kept = facts[layout.doc_start: layout.doc_end][res.indices]
        assert kept.any(), f"layer {li} head {h} kept no fact"
        assert np.all(res.beta[kept] == 0)
        orig = snap.values[li][layout.doc_start + res.indices[kept], h].astype(np.float32)
        assert np.array_equal(res.values[kept], orig)
    s.restore(blob)


# ---------------------------------------------------------------------------------------------
# one pipeline for the API and the evaluation


def test_settings_are_checked_when_made():
    from kvlocal.pipeline import CompactionSettings

    for kw, message in (({"method": "nope"}, "unknown compaction method"), ({"queries": "telepathy"},
                        "unknown query source"), ({"ratio": 1.0}, "must be > 1"),
                        ({"budgets": "/no/such.json"}, "budgets must be"), ({"holdout": 1.5}, "holdout"),
                        ({"queries": "repeat,self-study,repeat-prefill"}, "repeat-prefill named twice")):
        with pytest.raises(KvlocalError, match=message):
            CompactionSettings(**kw)
    s = CompactionSettings(ratio=8, method="am-highest", queries="repeat,self-study")
    assert s.queries == ("repeat", "self-study") and s.sources == s.queries
    assert CompactionSettings(method="am-facts-omp").sources == get_method("am-facts-omp").queries
    assert CompactionSettings(method="truncate", queries=()).sources == ()


def test_context_size_is_one_rule(load_model):
    from kvlocal.pipeline import REPEAT_MARGIN, context_size, pad

    model = load_model("llama-gqa")
    assert context_size(model, 100) == pad(200 + REPEAT_MARGIN) and pad(257) == 512
    assert context_size(model, 10_000) == model.n_ctx_train


@pytest.mark.parametrize("method,queries", [("am-highest", ("repeat",)), ("truncate", ()),
                                            ("am-facts-omp-onpolicy", ("repeat",))])
def test_api_and_evaluation_compact_alike(load_model, tmp_path, method, queries):
    """The API and the evaluation grid run the same pipeline: same document, same settings, the
    same cache bit for bit and the same summary."""
    from kvlocal.api import Compaction
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.harness import EvalConfig, Evaluator

    model = load_model("llama-gqa")
    ev = Evaluator(model, EvalConfig.smoke(), tmp_path / "cache", progress=False)
    doc = ev._open(TEXT)
    cell = ev._compact(doc, method, queries, 4)
    with Compaction(model, progress=False) as kv:
        kv.ingest(TEXT, system=tasks.SYSTEM)
        assert kv.session.n_ctx == doc.session.n_ctx
        summary = kv.compact(ratio=4, method=method, queries=queries, max_queries_per_head=ev.cfg.max_queries,
                             seed=ev.cfg.seed)
        a, b = kv.cache, doc.session.snapshot()
        api_snap = kv.session.snapshot()
    for x, y in zip(api_snap.keys + api_snap.values, b.keys + b.values, strict=True):
        assert np.array_equal(x, y)
    assert a.n_cells == cell["cells"] == summary.cells_after and summary.tokens_before == cell["tokens"]
    assert summary.heldout_output_rel_l2 == cell["attn_rel_l2"] and summary.layer_errors == cell["layer_errors"]
    doc.close()


def test_a_model_given_as_a_path_object_is_opened(load_model, tmp_path):
    from pathlib import Path

    from kvlocal.engine import binding
    from kvlocal.evaluation.harness import EvalConfig, Evaluator

    path = Path(load_model("llama-gqa").path)
    ev = Evaluator(path, EvalConfig.smoke(), tmp_path, progress=False)
    assert isinstance(ev.model, binding.Model) and ev.model.path == path
    with pytest.raises(KvlocalError, match="GGUF path or a loaded"):
        binding.borrow_or_open(42)


# ---------------------------------------------------------------------------------------------
# on-policy stages take the sampled sources' own tokens again (QuerySource.replay)


def _rel(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("source", ["self-study", "recall"])
def test_sampled_sources_keep_their_tokens_and_replay_them(doc, source):
    """Self-study and recall probes keep the streams they decoded; replayed through the same cache,
    teacher-forced in one batch, they give the same rows (positions, anchors) and the same queries
    up to the engine's batch-shape noise: far closer than the next token's queries are (a replay
    off by one row, the planted error)."""
    from kvlocal.engine.queries import QUERY_SOURCES

    s, layout, snap, blob = doc
    s.restore(blob)
    src = QUERY_SOURCES.create(source)
    if source == "self-study":
        src.budget, src.max_new_tokens = 48, 20
    else:
        src.max_new_tokens = 12
    first = src.collect(s, layout)
    streams = first.streams[src.name]
    assert len(streams) >= 1 and sum(len(t) for t in streams) == first.n_tokens
    again = src.replay(s, layout, first)
    assert np.array_equal(again.positions, first.positions) and np.array_equal(again.anchors, first.anchors)
    assert again.streams == {src.name: streams}
    for il, q in first.layers.items():
        same = _rel(q, again.layers[il])
        shifted = _rel(q[1:], again.layers[il][:-1])
        assert same < 0.1 * shifted, (il, same, shifted)
    with pytest.raises(KvlocalError, match="no decoded streams"):
        src.replay(s, layout, collect_queries(s, layout, ["repeat"]))


def test_on_policy_stages_replay_self_study_instead_of_sampling_again(doc, monkeypatch):
    """Stage 0 samples self-study once; the later stages decode the same tokens (no generation),
    so every stage's rows are the same tokens at the same positions."""
    from kvlocal.engine import queries as qmod
    from kvlocal.engine.queries import QUERY_SOURCES

    s, layout, snap, blob = doc
    s.restore(blob)
    src = QUERY_SOURCES.create("self-study")
    src.budget, src.max_new_tokens = 48, 20
    first = collect_queries(s, layout, ["repeat", src])
    assert set(first.streams) == {"self-study"}
    seen = []
    real = qmod.collect_queries

    def spy(session, lay, sources, **kw):
        got = real(session, lay, sources, **kw)
        seen.append(got)
        return got

    monkeypatch.setattr(qmod.Session, "generate", lambda *a, **k: pytest.fail("a later stage sampled again"))
    monkeypatch.setattr("kvlocal.pipeline.collect_queries", spy)
    n = len(snap.keys)
    cache, report, _ = compact_on_policy(s, layout, snap, Compactor(get_method("am-highest-onpolicy"), ratio=4),
                                         ["repeat", src], stages=n, first=first)
    assert len(seen) == n - 1 and report.notes["on-policy stages"] == n
    for got in seen:
        assert np.array_equal(got.positions, first.positions) and np.array_equal(got.anchors, first.anchors)
    # the top layer's queries went through compacted layers below: not the stage-0 queries
    top = n - 1
    il = sorted(first.layers)[top]
    assert _rel(first.layers[il], seen[-1].layers[il]) > 0
    s.restore(blob)
