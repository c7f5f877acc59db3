"""KVzip scoring (engine side) and selection (numpy side)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TEXT, session_kwargs
from kvlocal.am import Compactor, HeadProblem
from kvlocal.am.kvzip import KVzipGlobal, KVzipKeys
from kvlocal.engine.capture import QueryCapture
from kvlocal.errors import KvlocalError
from kvlocal.kv.queryset import QuerySet
from kvlocal.engine.session import Session

LONG = TEXT


def _expected_scores(s: Session, layout, blob: bytes, source, whole: bool = False) -> dict[int, np.ndarray]:
    """KVzip's definition, recomputed in float64 from the queries and keys of each chunk's repeat
    decoded in sequence 0 (same positions and cells as the scratch sequence gets).  ``whole``: the
    planted error of a softmax over the whole context instead of sink + chunk + repeat."""
    info = s.info
    d, n_rep = info.head_dim, info.n_rep
    out = {il: np.zeros((info.n_head_kv, layout.doc_end)) for il in info.base_layers}
    n = s.n_past
    for lo, hi, tokens, _ in source.chunks(s, layout):
        s.restore(blob)
        cap = QueryCapture(info, dtype=np.float32)
        with s.capturing(cap):
            s.decode(tokens, logits="none")
        q_all, snap = cap.result(), s.snapshot()
        a, b = layout.doc_start + lo, layout.doc_start + hi
        for li, il in enumerate(info.base_layers):
            keys = snap.keys[li].astype(np.float64)  # cell index == position
            q = q_all.layers[il].astype(np.float64)
            for h in range(info.n_head):
                for i in range(len(tokens)):
                    doc = np.arange(layout.doc_start, n) if whole else np.arange(a, b)
                    cols = np.concatenate([np.arange(layout.doc_start), doc, np.arange(n, n + i + 1)])
                    logit = keys[cols, h // n_rep] @ q[i, h] / np.sqrt(d)
                    p = np.exp(logit - logit.max())
                    p /= p.sum()
                    first = layout.doc_start + (a - doc[0])
                    chunk = p[first:first + b - a]
                    g = h // n_rep
                    out[il][g, a:b] = np.maximum(out[il][g, a:b], chunk)
    s.restore(blob)
    return out


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "gemma3"])
def test_kvzip_scores_follow_their_definition(load_model, name):
    from kvlocal.engine.queries import KVzipRepeat

    with Session(load_model(name), n_ctx=1024, capture=True, **session_kwargs(name)) as s:
        layout = s.ingest_document(LONG)
        blob = s.state()
        source = KVzipRepeat(chunk=100, overlap=4)
        qs = source.collect(s, layout)
        assert s.state() == blob  # the document's cells are untouched
        assert len(source.chunks(s, layout)) == -(-layout.n_doc // 100) >= 2
        expected = _expected_scores(s, layout, blob, source)
        planted = _expected_scores(s, layout, blob, source, whole=True)
    assert set(qs.key_scores) == set(s.info.base_layers)
    copied = qs.anchors[qs.anchors >= 0]
    assert np.array_equal(copied, np.arange(layout.doc_start, layout.doc_end))
    for il, got in qs.key_scores.items():
        assert got.shape == (s.info.n_head_kv, layout.doc_end)
        assert (got[:, : layout.doc_start] == 0).all()  # the sink is kept whole, never scored
        assert (got[:, layout.doc_start:] > 0).all() and (got <= 1).all()
        # engine (F16 cache, F16/F32 softmax) vs float64: probabilities agree to ~1e-3
        assert np.abs(got - expected[il]).max() < 2e-3, il
    # a planted error is caught: normalising over the whole context instead of sink + chunk + repeat
    # moves the scores far beyond that tolerance
    assert min(np.abs(qs.key_scores[il] - planted[il]).max() for il in qs.key_scores) > 10 * 2e-3


def test_kvzip_needs_a_fresh_document(load_model):
    from kvlocal.kv.cache import identity_compaction
    from kvlocal.engine.queries import KVzipRepeat

    with Session(load_model("llama-gqa"), n_ctx=512, capture=True, progress=False) as s:
        layout = s.ingest_document(TEXT)
        with pytest.raises(KvlocalError, match="n_ctx >="):
            KVzipRepeat(chunk=1000).collect(s, layout)
        with pytest.raises(KvlocalError, match="chunk size"):
            KVzipRepeat(chunk=0).collect(s, layout)
        snap = s.snapshot()
        s.inject(identity_compaction(snap, layout.doc_start, layout.doc_end), snap)
        with pytest.raises(KvlocalError, match="uncompacted"):
            KVzipRepeat(chunk=100).collect(s, layout)


def _problem(rng, T=40, t=8, scores=True):
    x = rng.normal(size=(T, 8)).astype(np.float32)
    return HeadProblem(x, x, rng.normal(size=(16, 8)), t, key_scores=rng.random(T) if scores else None)


def test_kvzip_keys_keep_each_heads_best(rng):
    p = _problem(rng)
    sel = KVzipKeys().select(p)
    assert np.array_equal(sel.indices, np.sort(np.argsort(-p.key_scores)[: p.t]))
    with pytest.raises(ValueError, match="'kvzip' source"):
        KVzipKeys().select(_problem(rng, scores=False))


def test_kvzip_global_is_one_threshold(rng):
    problems = [_problem(rng, t=8) for _ in range(5)]
    for i, p in enumerate(problems):  # heads that matter more, by far
        p.key_scores = (p.key_scores * 10.0 ** (i - 2)).astype(np.float32)
    sel = KVzipGlobal(floor=1).select_group(problems, [p.key_scores for p in problems])
    sizes = [len(s.indices) for s in sel]
    assert sum(sizes) == 5 * 8 and min(sizes) >= 1 and sizes[-1] > 8 > sizes[0]
    kept = np.concatenate([p.key_scores[s.indices] for p, s in zip(problems, sel)])
    dropped = np.concatenate([np.delete(p.key_scores, s.indices) for p, s in zip(problems, sel)])
    floor_only = [i for i, n in enumerate(sizes) if n == 1]
    above = np.concatenate([p.key_scores[s.indices] for i, (p, s) in enumerate(zip(problems, sel))
                            if i not in floor_only])
    assert above.min() >= dropped.max()  # one threshold, apart from the floor
    assert len(np.unique(kept)) == len(kept)
    capped = KVzipGlobal(max_share=0.5).select_group(problems, [p.key_scores for p in problems])
    assert max(len(s.indices) for s in capped) <= 20 and sum(len(s.indices) for s in capped) == 40
    again = KVzipGlobal(floor=1).select_group(problems, [p.key_scores for p in problems])
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(sel, again))
    with pytest.raises(ValueError):
        KVzipGlobal(max_share=0)


def test_key_scores_travel_with_query_rows(rng):
    def qs(n, scores):
        return QuerySet({0: rng.normal(size=(n, 2, 4)).astype(np.float32)}, np.arange(n, dtype=np.int32),
                        key_scores=scores)

    a = qs(6, {0: np.array([[0.1, 0.5, 0.2]], np.float32)})
    b = qs(4, {0: np.array([[0.3, 0.1, 0.2, 0.9]], np.float32)})
    both = QuerySet.concat([a, qs(3, None), b])
    assert np.allclose(both.key_scores[0], [[0.3, 0.5, 0.2, 0.9]])
    assert both.take([0, 1]).key_scores is both.key_scores and both.subsample(2, 2).key_scores is not None
    assert QuerySet.concat([qs(2, None)]).key_scores is None
    with pytest.raises(ValueError, match="KV heads"):
        QuerySet.concat([a, qs(2, {0: np.zeros((2, 3), np.float32)})])


@pytest.mark.parametrize("method", ["kvzip", "kvzip-uniform", "am-kvzip"])
def test_kvzip_methods_compact_and_decode(load_model, method):
    from kvlocal.engine.queries import collect_queries

    with Session(load_model("llama-gqa"), n_ctx=1024, capture=True, progress=False) as s:
        layout = s.ingest_document(LONG)
        snap = s.snapshot()
        qs = collect_queries(s, layout, ["kvzip"])
        cache, report = Compactor(method, ratio=4).compact(snap, layout.doc_start, layout.doc_end, qs)
        heads = len(snap.keys) * snap.keys[0].shape[1]
        per_head = round(layout.n_doc / 4)
        assert report.kept_keys == heads * per_head
        if method == "kvzip":  # unequal heads: the longest sets the cells, the rest is padding
            assert report.padding_fraction > 0
        s.inject(cache, snap)
        s.decode(s.chat_tokens([{"role": "user", "content": "What is the magic number?"}]))
    with pytest.raises(KvlocalError, match="kvzip"):
        Compactor(method, ratio=4).compact(snap, layout.doc_start, layout.doc_end, None)
