"""The KV bridge: sessions, query capture, extraction and injection of the KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ALL_MODELS, SMOOTH_MODELS, TEXT, TINY_VARIANTS, session_kwargs
from kvlocal.engine.capture import QueryCapture
from kvlocal.errors import KvlocalError
from kvlocal.kv.cache import HeadBlock, assemble, identity_compaction, per_head_segment, shared_segment
from kvlocal.engine.session import DocumentError, Session
from tolerance import assert_identity, reorder_noise, tolerance

QUESTION = [{"role": "user", "content": "What is the magic number for the lighthouse?"}]


def open_session(load_model, name, **kw):
    return Session(load_model(name), **{"n_ctx": 1024, "n_batch": 512, **session_kwargs(name), **kw})


def greedy_after(session, n=32):
    """First logits and n greedy tokens answering QUESTION after the cached context."""
    prompt = session.chat_tokens(QUESTION)
    first = session.decode(prompt)[-1].copy()
    toks = [int(np.argmax(first))]
    for _ in range(n - 1):
        toks.append(int(np.argmax(session.decode(toks[-1:])[-1])))
    return first, toks


def first_logits(session):
    """blob -> the first answer logits after restoring it (for reorder_noise)."""
    def run(blob: bytes) -> np.ndarray:
        session.restore(blob)
        return greedy_after(session, n=1)[0]
    return run


def n_caches(session) -> int:
    return 2 if session.info.is_iswa else 1


def doc_cells(snap, layout):
    return np.arange(layout.doc_start, layout.doc_end)


class WithSoftmax(QueryCapture):
    """Queries of every layer plus the engine's own attention weights (kq_soft_max)."""

    def __init__(self, info):
        super().__init__(info, layers=range(info.n_layer), dtype=np.float32)
        self.softmax = {}

    def select(self, name, op):
        return super().select(name, op) or name.startswith("kq_soft_max-")

    def sink(self, name, op, arr):
        if name.startswith("kq_soft_max-"):
            self.softmax[int(name.rsplit("-", 1)[1])] = arr[0]  # [n_head, n_tokens, n_kv]
        else:
            super().sink(name, op, arr)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa", "qwen2", "qwen3", "gemma3", "smollm2", "qwen25"])
def test_captured_queries_reproduce_the_engine_attention(load_model, name):
    with open_session(load_model, name, capture=True) as s:
        info = s.info
        tokens = s.tokenize(TEXT, bos=True)[:120]
        cap = WithSoftmax(info)
        with s.capturing(cap):
            s.decode(tokens, logits="none")
        snap = s.snapshot()
        queries = cap.result()
    T, d, n_rep = len(tokens), info.head_dim, info.n_rep
    assert np.array_equal(queries.positions, np.arange(T))
    state_swa = snap.state.caches[1].cells() if info.is_iswa else None
    swa_index = 0
    for il in range(info.n_layer):
        q = queries.layers[il].astype(np.float64)  # [T, n_head, d]
        if info.swa_layers[il]:  # the SWA section keeps only the last window: check the last token
            keys = state_swa.layers[swa_index].k.reshape(-1, info.n_head_kv, d).astype(np.float64)
            swa_index += 1
            cols, rows = state_swa.pos, [T - 1]
        else:
            keys = snap.keys[info.base_layers.index(il)].astype(np.float64)
            cols, rows = np.arange(T), range(T)
        for h in range(info.n_head):
            for i in rows:
                visible = cols <= i
                logit = keys[visible, h // n_rep] @ q[i, h] / np.sqrt(d)
                p = np.exp(logit - logit.max())
                p /= p.sum()
                engine = cap.softmax[il][h, i, cols[visible]]  # fresh cache: cell index == position
                assert np.abs(engine - p).max() < 2e-3, (il, h, i)
                assert abs(cap.softmax[il][h, i].sum() - 1) < 1e-4


@pytest.mark.parametrize("name", ALL_MODELS)
def test_extract_then_inject_unchanged_is_bit_identical(load_model, name):
    with open_session(load_model, name) as s:
        layout = s.ingest_document(TEXT)
        blob = s.state()
        snap = s.snapshot()
        ref_logits, ref_tokens = greedy_after(s)

        cache = assemble([shared_segment(snap, np.arange(snap.n_cells))], snap.logical_length)
        assert cache.to_state(snap).to_bytes() == blob
        s.inject(cache, snap)
        assert s.n_past == layout.length
        logits, tokens = greedy_after(s)
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens


@pytest.mark.parametrize("name", ALL_MODELS)
def test_identity_compaction_reproduces_greedy_decoding(load_model, name):
    """Keep every key in every head (beta 0, C_v = V) through the per-head packing path."""
    with open_session(load_model, name) as s:
        layout = s.ingest_document(TEXT)
        snap = s.snapshot()
        ref_logits, ref_tokens = greedy_after(s)
        cache = identity_compaction(snap, layout.doc_start, layout.doc_end)
        assert cache.padding_fraction == 0 and not cache.has_bias
        s.inject(cache, snap)
        logits, tokens = greedy_after(s)
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits)


@pytest.mark.parametrize("name", SMOOTH_MODELS)
def test_dropping_cells_equals_engine_seq_rm(load_model, name):
    with open_session(load_model, name) as s:
        layout = s.ingest_document(TEXT)
        blob = s.state()
        snap = s.snapshot()
        # seq_rm also empties the SWA cache of an iSWA model, inject only rewrites the base cache:
        # drop cells that new tokens no longer see through the window
        drop = np.arange(layout.doc_start + 1, layout.length - s.info.n_swa, 3)
        for p in drop:
            assert s.ctx.seq_rm(0, int(p), int(p) + 1)
        removed, _ = greedy_after(s, n=1)

        s.restore(blob)
        keep = np.setdiff1d(np.arange(snap.n_cells), drop)
        s.inject(assemble([shared_segment(snap, keep)], snap.logical_length), snap)
        injected, _ = greedy_after(s, n=1)
        s.restore(blob)
        noise, full = reorder_noise(first_logits(s), blob, snap.n_cells, n_caches(s))
        s.inject(assemble([shared_segment(snap, np.setdiff1d(np.arange(snap.n_cells), drop + 1))],
                          snap.logical_length), snap)
        off_by_one, _ = greedy_after(s, n=1)
    assert_identity(injected, removed, tolerance(noise, full),
                    {"nothing dropped": full, "the neighbouring cells dropped": off_by_one}, "seq_rm")


@pytest.mark.parametrize("name", TINY_VARIANTS + ["smollm2-f32"])
def test_per_head_selection_equals_per_head_neg_inf_bias(load_model, name, rng):
    """Each (layer, KV head) keeps its own subset, padded with bias -inf, versus the full cache
    with bias -inf on every (cell, head) a head dropped."""
    with open_session(load_model, name) as s:
        info = s.info
        layout = s.ingest_document(TEXT)
        blob = s.state()
        snap = s.snapshot()
        doc = doc_cells(snap, layout)
        blocks, masks = [], []
        for k, v in zip(snap.keys, snap.values, strict=True):
            layer, mask = [], np.zeros((snap.n_cells, info.n_head_kv), np.float32)
            for h in range(info.n_head_kv):
                n_keep = int(rng.integers(len(doc) // 4, len(doc)))
                kept = np.sort(rng.choice(doc, n_keep, replace=False))
                beta = rng.normal(0, 0.5, n_keep).astype(np.float32)
                layer.append(HeadBlock(k[kept, h], v[kept, h], beta))
                mask[doc, h] = -np.inf
                mask[kept, h] = beta
            blocks.append(layer)
            masks.append(mask)
        cache = assemble([shared_segment(snap, np.arange(layout.doc_start)),
                          per_head_segment(blocks, layout.doc_start, layout.doc_end, snap.dtype),
                          shared_segment(snap, np.arange(layout.doc_end, layout.length))], layout.length)
        assert cache.padding_fraction > 0
        s.inject(cache, snap)
        packed, _ = greedy_after(s, n=1)

        def biased(masks):
            s.restore(blob)
            s.ctx.bias_enable(True)
            for il, mask in zip(info.base_layers, masks, strict=True):
                s.ctx.bias_set(il, mask)
            return greedy_after(s, n=1)[0]

        want = biased(masks)
        planted = {"masks one cell off": biased([np.roll(m, 1, axis=0) for m in masks]),
                   "no masks": biased([np.zeros_like(m) for m in masks])}
        if info.n_head_kv > 1:
            planted["masks on the wrong KV head"] = biased([np.roll(m, 1, axis=1) for m in masks])
        s.ctx.bias_enable(False)
        noise, full = reorder_noise(first_logits(s), blob, snap.n_cells, n_caches(s))
    assert_identity(packed, want, tolerance(noise, full), planted, "per-head packing")


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3"])
def test_malformed_positions_are_refused_before_the_engine(load_model, name):
    with open_session(load_model, name) as s:
        layout = s.ingest_document(TEXT)
        snap = s.snapshot()
        blob = s.state()
        T = layout.length
        good = assemble([shared_segment(snap, np.arange(snap.n_cells))], T)

        def broken(**change):
            c = assemble([shared_segment(snap, np.arange(snap.n_cells))], T)
            for key, value in change.items():
                setattr(c, key, value)
            return c

        cases = {
            "lie in": broken(positions=np.where(np.arange(T) == 5, T + 3, good.positions)),
            "last position must be": broken(positions=np.minimum(good.positions, T - 2)),
            "integers": broken(positions=good.positions.astype(np.float32)),
            r"K \(\d+, \d+, \d+\), V .* expected": broken(positions=good.positions[:-1]),
            "continues at": broken(positions=np.maximum(good.positions - 1, 0), logical_length=T - 1),
        }
        bad_k = broken()
        bad_k.keys[0] = bad_k.keys[0].copy()
        bad_k.keys[0][3, 0, 0] = np.nan
        cases["NaN"] = bad_k
        dead = broken()
        dead.bias[0] = np.full_like(dead.bias[0], -np.inf)
        cases["no cell with a finite bias"] = dead
        for message, cache in cases.items():
            with pytest.raises(KvlocalError, match=message):
                s.inject(cache, snap)
            assert s.state() == blob, f"a refused inject ({message}) changed the cache"
        s.inject(good, snap)  # continuing at T works
        assert s.n_past == T
        s.decode(s.chat_tokens(QUESTION))


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3", "smollm2"])
def test_query_sources_leave_the_document_cache_alone(load_model, name):
    from kvlocal.engine.queries import QUERY_SOURCES, SelfStudy, collect_queries

    with open_session(load_model, name, capture=True, n_ctx=2048) as s:
        layout = s.ingest_document(TEXT, capture_queries=True)
        blob = s.state()
        context = QUERY_SOURCES.create("context").collect(s, layout)
        assert np.array_equal(context.positions, np.arange(layout.doc_start, layout.length))
        doc_rows = np.arange(layout.n_doc)
        assert np.array_equal(context.anchors[doc_rows], np.arange(layout.doc_start, layout.doc_end))
        assert (context.anchors[layout.n_doc:] == -1).all()  # end-of-turn tokens read no document token
        repeat = QUERY_SOURCES.create("repeat").collect(s, layout)
        assert s.state() == blob
        copied = repeat.anchors[repeat.anchors >= 0]
        assert np.array_equal(copied, np.arange(layout.doc_start, layout.doc_end))
        chunk = repeat.for_range(layout.doc_start, layout.doc_start + 10)
        assert (chunk.anchors < layout.doc_start + 10).all() and (chunk.anchors >= 0).sum() == 10
        assert repeat.positions[0] == layout.length and repeat.n_tokens > layout.n_doc
        assert np.array_equal(repeat.positions, np.arange(layout.length, layout.length + repeat.n_tokens))
        study = SelfStudy(budget=40, max_new_tokens=16, seed=3)
        a = study.collect(s, layout)
        assert s.state() == blob
        b = SelfStudy(budget=40, max_new_tokens=16, seed=3).collect(s, layout)
        assert a.n_tokens == b.n_tokens and all(np.array_equal(a.layers[il], b.layers[il]) for il in a.layers)
        prompts = sum(len(s.chat_tokens([{"role": "user", "content": t}])) + 8 for c in study.prompts for t in c)
        assert a.n_tokens <= prompts + study.budget
        assert set(a.layers) == set(s.info.base_layers) and a.layers[s.info.base_layers[0]].dtype == np.float16
        both = collect_queries(s, layout, ["context", "repeat"], max_per_kv_head=64, seed=1)
        assert both.n_tokens == -(-64 // s.info.n_rep)
        assert both.sources == ["context-prefill", "repeat-prefill"]


def test_repeat_prefill_needs_room(load_model):
    from kvlocal.engine.queries import QUERY_SOURCES

    with open_session(load_model, "llama-gqa", capture=True, n_ctx=512) as s:
        layout = s.ingest_document(TEXT)
        with pytest.raises(KvlocalError, match="n_ctx >="):
            QUERY_SOURCES.create("repeat").collect(s, layout)


def test_documents_that_cannot_be_ingested(load_model):
    with open_session(load_model, "llama-gqa", n_ctx=256) as s:
        with pytest.raises(DocumentError, match="empty"):
            s.ingest_document("   \n")
        with pytest.raises(DocumentError, match="n_ctx >= .* or compact the document in chunks"):
            s.ingest_document(TEXT * 3)
        assert s.n_past == 0  # nothing was ingested
        s.ingest_document("The cat sat.")
        with pytest.raises(DocumentError, match="already holds"):
            s.ingest_document("Another one.")


def test_unsupported_architecture_is_a_clear_error():
    from kvlocal.errors import ModelError
    from kvlocal.engine.modelinfo import ModelInfo

    class Fake:
        arch, path = "mamba", type("P", (), {"name": "mamba.gguf"})()

    with pytest.raises(ModelError, match="unsupported architecture 'mamba'.*llama, qwen2, qwen3, gemma3"):
        ModelInfo.from_model(Fake())


def test_ingest_text_or_tokens(load_model):
    with open_session(load_model, "llama-gqa") as a, open_session(load_model, "llama-gqa") as b:
        la = a.ingest("The cat sat on the mat.")
        lb = b.ingest(b.tokenize("The cat sat on the mat.", bos=True))
        assert a.tokens == b.tokens and a.tokens[0] == a.model.bos
        assert np.array_equal(la, lb)
        more = a.ingest(" And then it slept.")  # continuing: no second BOS
        assert a.n_past == len(a.tokens) and a.model.bos not in a.tokens[1:] and more.shape == la.shape
