"""QuerySet: group-major KV-head view, seeded subsampling, concatenation (numpy only)."""

import numpy as np
import pytest

from kvlocal.kv.queryset import QuerySet


def make(n=10, n_head=6, d=4, layers=(0, 3), seed=0):
    rng = np.random.default_rng(seed)
    return QuerySet({il: rng.normal(size=(n, n_head, d)).astype(np.float32) for il in layers},
                    np.arange(100, 100 + n, dtype=np.int32), ["context-prefill"])


def test_kv_heads_are_group_major():
    qs = make()
    kv = qs.kv_heads(3, n_head_kv=2)  # n_rep = 3
    assert kv.shape == (2, 30, 4)
    q = qs.layers[3]
    for g in range(2):
        for r in range(3):
            # rows [r*n, (r+1)*n) of KV head g are query head g*n_rep + r, all tokens in order
            assert np.array_equal(kv[g, r * 10:(r + 1) * 10], q[:, g * 3 + r])
    with pytest.raises(ValueError):
        qs.kv_heads(0, n_head_kv=4)


def test_subsample_is_seeded_and_shared_by_layers():
    qs = make(n=50)
    a, b = qs.subsample(30, n_rep=3, seed=7), qs.subsample(30, n_rep=3, seed=7)
    assert a.n_tokens == 10  # ceil(30 / 3) token rows give 30 queries per KV head
    assert np.array_equal(a.positions, b.positions)
    assert np.all(np.diff(a.positions) > 0)
    rows = a.positions - 100
    for il in qs.layers:
        assert np.array_equal(a.layers[il], qs.layers[il][rows])
    assert not np.array_equal(qs.subsample(30, n_rep=3, seed=8).positions, a.positions)
    assert qs.subsample(1000, n_rep=3) is qs


def test_subsample_can_give_the_queries_asked_after_the_document_a_share():
    qs = make(n=60)
    qs.anchors[:] = -1
    qs.anchors[:45] = np.arange(45)  # 45 rows read the document, 15 come after it (anchor < 0)
    qs.anchors[50:] = -2  # recall probes are asked after it too
    late = lambda q: int((q.anchors < 0).sum())  # noqa: E731
    a = qs.subsample(60, n_rep=3, seed=1, after=0.5)  # 20 rows: 10 of each
    assert a.n_tokens == 20 and late(a) == 10 and np.all(np.diff(a.positions) > 0)
    for il in qs.layers:
        assert np.array_equal(a.layers[il], qs.layers[il][a.positions - 100])
    assert late(qs.subsample(60, n_rep=3, seed=1, after=1.0)) == 15  # every late row, the rest reads the document
    assert late(qs.subsample(60, n_rep=3, seed=1, after=0.0)) == 0
    qs.anchors[:] = -1  # no row reads the document: every row is a late one
    assert qs.subsample(60, n_rep=3, seed=1, after=0.2).n_tokens == 20
    # None draws alike from every row, as before the share existed
    b = make(n=60)
    assert np.array_equal(b.subsample(60, n_rep=3, seed=1).positions - 100,
                          np.sort(np.random.default_rng(1).choice(60, 20, replace=False)))
    with pytest.raises(ValueError, match="share"):
        qs.subsample(60, n_rep=3, after=1.5)


def test_concat_keeps_order_and_sources():
    a, b = make(n=3), make(n=4, seed=1)
    b.sources = ["repeat-prefill"]
    c = QuerySet.concat([a, b])
    assert c.n_tokens == 7 and c.sources == ["context-prefill", "repeat-prefill"]
    assert np.array_equal(c.layers[0][3:], b.layers[0])
    with pytest.raises(ValueError):
        QuerySet.concat([a, make(layers=(1,))])


def test_decoded_streams_travel_with_taking_subsampling_and_concatenation():
    a, b = make(n=30), make(n=4, seed=1)
    s1 = (np.arange(5, dtype=np.int32), np.arange(7, dtype=np.int32))
    a.streams = {"self-study": s1}
    for got in (a.take([0, 2]), a.subsample(6, n_rep=3), QuerySet.concat([b, a])):
        assert got.streams["self-study"] is s1
    assert QuerySet.concat([a, a]).streams == {"self-study": s1}  # the same source twice: equal streams
    other = make(n=2)
    other.streams = {"self-study": (np.arange(6, dtype=np.int32),)}
    with pytest.raises(ValueError, match="different decoded streams"):
        QuerySet.concat([a, other])
    assert b.streams == {} and QuerySet.concat([b, b]).streams == {}
