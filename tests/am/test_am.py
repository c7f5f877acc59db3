"""Attention Matching core (numpy + numba, no engine): the spec's §12 checklist.

Random problems use peaked attention (keys and queries of norm ~2 sqrt(d)); real ones are the
K/V and context-prefill queries a tiny model and SmolLM2 extracted (fixtures below).
"""

from __future__ import annotations

from dataclasses import replace
import json
import math

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from conftest import TEXT, session_kwargs
from kvlocal.am import (
    METHODS, OMP, PROGRESSIVE_SCHEDULE, BoxNNLS, Compactor, HeadProblem, HighestAttnKeys, JsonBudget,
    LeastSquaresValues,
    SensitivityBudget, allocate, get_method, head_errors, swap_allocation,
)
from kvlocal.am import DEFAULT_METHOD, AnchoredValues, SharedSpans
from kvlocal.am.fit import compacted_attention, solve_least_squares
from kvlocal.errors import KvlocalError


def random_problem(T=96, n=256, d=16, t=12, seed=0, spread=2.0, **kw):
    rng = np.random.default_rng(seed)
    K = rng.normal(size=(T, d)) * spread
    Q = rng.normal(size=(n, d)) * spread
    V = rng.normal(size=(T, d))
    return HeadProblem(K, V, Q, t, **kw)


def attention(q, K, V, bias=None):
    s = q @ K.T / math.sqrt(K.shape[1]) + (0 if bias is None else bias)
    return softmax(s, axis=-1) @ V, logsumexp(s, axis=-1)


# ---------------------------------------------------------------------------------------------
# identities


def test_t_equals_T_gives_beta_zero_and_the_original_values():
    p = random_problem(T=40, n=300, t=40)
    idx = np.arange(p.T)
    for beta_fit in (BoxNNLS(), BoxNNLS(method="exact", lower=1e-6, upper=1e6)):
        log_w, _ = beta_fit.fit(p, idx)
        assert np.abs(log_w).max() < 1e-5
    C, notes = LeastSquaresValues().fit(p, idx, np.zeros(p.T, np.float32))
    assert np.abs(C - p.values).max() < 1e-4
    sel = OMP(drop_cutoff=None).select(random_problem(T=40, n=300, t=40))
    assert np.array_equal(sel.indices, idx) and np.abs(np.log(sel.weights)).max() < 1e-5
    # the method as a whole: attention reproduced for any query, with any bias the keys carry
    bias = np.random.default_rng(1).normal(size=p.T).astype(np.float32)
    q = np.random.default_rng(2).normal(size=(7, p.d)) * 3
    for name in ("am-highest", "am-omp"):
        res = get_method(name).fit(random_problem(T=40, n=300, t=40, bias=bias))
        out, lse = attention(q, p.keys[res.indices], res.values, res.beta)
        out0, lse0 = attention(q, p.keys, p.values, bias)
        assert np.abs(out - out0).max() < 1e-5 and np.abs(lse - lse0).max() < 1e-5


def test_concatenation_identity():
    rng = np.random.default_rng(3)
    K, V, Kf, Vf = (rng.normal(size=s) for s in [(30, 8), (30, 8), (11, 8), (11, 8)])
    q = rng.normal(size=(5, 8)) * 2
    full, _ = attention(q, np.vstack([K, Kf]), np.vstack([V, Vf]))
    o1, l1 = attention(q, K, V)
    o2, l2 = attention(q, Kf, Vf)
    w1 = 1 / (1 + np.exp(l2 - l1))
    assert np.abs(full - (w1[:, None] * o1 + (1 - w1)[:, None] * o2)).max() < 1e-12
    # so a block matching output and mass on q matches with any suffix: the t = T compaction
    p = random_problem(T=30, n=200, d=8, t=30)
    res = get_method("am-highest").fit(p)
    for _ in range(3):
        Kf, Vf = rng.normal(size=(rng.integers(1, 20), 8)), rng.normal(size=(1, 8))
        Vf = np.repeat(Vf, len(Kf), axis=0)
        a, _ = attention(q, np.vstack([p.keys[res.indices], Kf]), np.vstack([res.values, Vf]),
                         np.concatenate([res.beta, np.zeros(len(Kf))]))
        b, _ = attention(q, np.vstack([p.keys, Kf]), np.vstack([p.values, Vf]))
        assert np.abs(a - b).max() < 1e-5


def test_omp_mass_error_falls_with_t_and_vanishes_at_T():
    errs = []
    for t in (6, 12, 24, 48, 96):
        p = random_problem(T=96, n=400, t=t, seed=4)
        res = get_method("am-omp").fit(p)
        errs.append(head_errors(p, res)["mass_err"])
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-6 and errs[0] > 1e-3


@pytest.mark.parametrize("method", ["am-highest", "am-omp", "am-omp-fast"])
def test_value_fit_is_least_squares_optimal_and_beats_direct_values(method):
    p = random_problem(T=128, n=512, t=16, seed=5)
    res = get_method(method).fit(p)
    X = compacted_attention(p, res.indices, res.beta)
    Y = p.stats().outputs
    C = res.values.astype(np.float64)
    grad = X.T @ (X @ C - Y)
    assert np.abs(grad).max() < 1e-4 * max(1.0, np.abs(X.T @ Y).max())
    direct = p.values[res.indices].astype(np.float64)
    assert np.linalg.norm(X @ C - Y) <= np.linalg.norm(X @ direct - Y) + 1e-9


def test_row_weighted_nnls_matches_the_reference_and_not_the_unshifted_fit():
    p = random_problem(T=64, n=300, t=10, seed=6, spread=2.5)
    idx = np.sort(np.random.default_rng(0).choice(64, 10, replace=False))
    fitter = BoxNNLS(seed=11)
    log_w, _ = fitter.fit(p, idx)
    # the reference's steps in plain numpy: lstsq + clamp, then 2 PGD steps with 1/sigma^2 from
    # 3 power iterations started at the same seeded vector
    M, y = p.features(idx), p.stats().z
    w = np.clip(np.linalg.lstsq(M, y, rcond=None)[0], fitter.lower, fitter.upper)
    G, b = M.T @ M, M.T @ y
    v = np.random.default_rng([11, p.seed]).standard_normal(10)
    v /= np.linalg.norm(v)
    for _ in range(3):
        u = G @ v
        lam = np.linalg.norm(u)
        v = u / lam
    for _ in range(2):
        w = np.clip(w - (G @ w - b) / lam, fitter.lower, fitter.upper)
    assert np.abs(np.exp(log_w) - w).max() < 1e-6 * w.max()
    # without the per-query max shift the problem is a different one
    S = p.logits().astype(np.float64)
    w_plain = np.clip(np.linalg.lstsq(np.exp(S[:, idx]), np.exp(S).sum(1), rcond=None)[0], fitter.lower, fitter.upper)
    assert np.abs(w_plain - w).max() > 0.05 * w.max()


def test_exact_nnls_fits_mass_at_least_as_well_as_projected_gradient():
    p = random_problem(T=80, n=300, t=12, seed=7)
    idx = get_method("am-highest").fit(p).indices
    M, y = p.features(idx), p.stats().z
    res = {}
    for method in ("pg", "exact"):
        log_w, _ = BoxNNLS(method=method).fit(p, idx)
        w = np.exp(log_w)
        assert np.all(w >= BoxNNLS().lower * (1 - 1e-9)) and np.all(w <= BoxNNLS().upper * (1 + 1e-9))
        res[method] = np.linalg.norm(M @ w - y)
    assert res["exact"] <= res["pg"] + 1e-9


# ---------------------------------------------------------------------------------------------
# OMP bookkeeping


def test_omp_numba_refits_match_the_plain_lstsq_reference():
    for seed in range(3):
        a = OMP().select(random_problem(T=120, n=300, t=20, seed=seed))
        b = OMP().select(random_problem(T=120, n=300, t=20, seed=seed, backend="numpy"))
        assert np.array_equal(a.indices, b.indices)
        assert np.abs(np.log(a.weights) - np.log(b.weights)).max() < 1e-5


def test_omp_bookkeeping():
    p = random_problem(T=200, n=300, t=40, seed=8)
    for omp in (OMP(), OMP(k_choice=4, refit_interval=2), OMP(k_choice=3, refit_interval=3, drop_cutoff=None)):
        sel = omp.select(p)
        assert len(sel.indices) <= p.t and len(set(sel.indices.tolist())) == len(sel.indices)
        assert np.all(np.diff(sel.indices) > 0) and np.all(sel.weights >= omp.lower)
        assert np.all(sel.weights > omp.lower * 10), "lazily added keys must be refit before returning"
    # the schedule switches at 300 and 1500 keys
    omp = OMP(schedule=PROGRESSIVE_SCHEDULE)
    assert [omp.step(n) for n in (0, 299, 300, 1499, 1500, 9999)] == [(1, 1), (1, 1), (2, 2), (2, 2), (4, 2), (4, 2)]


class _FixedMass(HeadProblem):
    """A head whose mass features are given outright (OMP sees only E and z)."""

    def __init__(self, E, z, t):
        super().__init__(np.zeros((E.shape[1], 2)), np.zeros((E.shape[1], 2)), np.zeros((1, 2)), t)
        self._E, self._z = np.asarray(E, np.float32), np.asarray(z, np.float64)

    def mass_features(self):
        return self._E.copy(), self._z.copy()


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_omp_drops_keys_below_the_cutoff(backend):
    """Built so that a picked key's exact least-squares weight is 0, not by round-off.

    Columns: m = (1, 1, 0.1, 0) explains most of z = (1, 1, 0, 1) alone and is picked first;
    d = e4, a = e1, b = e2 follow.  With all four, z = a + b + d exactly and the third row forces
    w_m = 0, so m's clipped weight is ``lower`` (log = -27.6, far below -7 whatever the rounding):
    it is dropped, OMP resumes, finds no key left and returns 3 < t keys that reproduce z."""
    E = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0.1, 0, 0, 0], [0, 0, 0, 1]], np.float64)
    z = np.array([1.0, 1.0, 0.0, 1.0])
    p = _FixedMass(E, z, 4)
    p.backend = backend
    sel = OMP().select(p)
    assert sel.indices.tolist() == [1, 2, 3]
    assert np.all(np.log(sel.weights) >= -7) and np.allclose(sel.weights, 1, atol=1e-6)
    no_drop = OMP(drop_cutoff=None).select(p)
    assert no_drop.indices.tolist() == [0, 1, 2, 3]
    assert np.log(no_drop.weights[0]) < -20 and np.allclose(no_drop.weights[1:], 1, atol=1e-6)
    # a tighter cutoff than any weight here drops nothing
    assert OMP(drop_cutoff=-30.0).select(p).indices.tolist() == [0, 1, 2, 3]


def test_omp_returns_many_copies_of_few_keys_finite():
    rng = np.random.default_rng(9)
    K = np.repeat(rng.normal(size=(4, 16)) * 2, 25, axis=0)
    p = HeadProblem(K, rng.normal(size=(100, 16)), rng.normal(size=(200, 16)) * 2, 20)
    sel = OMP().select(p)
    assert len(sel.indices) <= 20 and np.all(np.isfinite(sel.weights)) and np.all(np.log(sel.weights) >= -7)


# ---------------------------------------------------------------------------------------------
# budgets


def test_allocate_sums_exactly_with_floors_and_caps():
    rng = np.random.default_rng(10)
    for _ in range(50):
        shape = (int(rng.integers(1, 6)), int(rng.integers(1, 5)))
        p = rng.dirichlet(np.full(np.prod(shape), 0.3)).reshape(shape)
        n_keys = int(rng.integers(20, 400))
        floor = int(rng.integers(0, 3))
        cap = max(floor, int(0.75 * n_keys))
        total = int(rng.integers(floor * p.size, cap * p.size + 1))
        b = allocate(total, p, cap, floor)
        assert b.shape == shape and b.sum() == total and b.min() >= floor and b.max() <= cap
    b = allocate(100, np.array([0.97, 0.01, 0.01, 0.01]), cap=40)  # water-filling past the cap
    assert b.tolist()[0] == 40 and b.sum() == 100
    with pytest.raises(KvlocalError):
        allocate(1000, np.ones(4), cap=100)


def test_swap_solver_moves_budget_to_the_heads_that_need_it():
    from kvlocal.am.budgets import interpolate_curves

    grid = np.array([0.02, 0.05, 0.1, 0.2, 0.4])
    sensitive = 1 - 2 * grid  # every extra key helps a lot
    flat = 0.1 * (1 - grid)  # extra keys barely help
    curves = np.array([sensitive, flat, sensitive, flat])
    targets = (0.05, 0.1)
    p = swap_allocation(curves, grid, targets=targets)
    assert abs(p.sum() - 1) < 1e-12
    assert p[0] > 0.25 > p[1] and p[2] > 0.25 > p[3]

    def total(q):
        return np.mean([interpolate_curves(curves, grid, q * 4 * tau).sum() for tau in targets])

    assert total(p) < total(np.full(4, 0.25))


# ---------------------------------------------------------------------------------------------
# adversarial inputs


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("case", ["duplicate keys", "zero keys", "huge norms", "n < t", "one query"])
def test_adversarial_inputs_give_finite_results(method, case):
    rng = np.random.default_rng(12)
    T, d = 60, 16
    K, V, Q, t = rng.normal(size=(T, d)), rng.normal(size=(T, d)), rng.normal(size=(100, d)), 12
    if case == "duplicate keys":
        K[:, :] = K[0]
    elif case == "zero keys":
        K[:] = 0
    elif case == "huge norms":
        K *= 1e3
        Q *= 1e3
    elif case == "n < t":
        Q, t = Q[:5], 30
    elif case == "one query":
        Q = Q[:1]
    scores = np.full(T, 0.5) if case == "duplicate keys" else rng.random(T)  # KVzip's, for the methods using them
    res = get_method(method).fit(HeadProblem(K, V, Q, t, key_scores=scores))
    assert 0 < res.t <= t and np.isfinite(res.values).all()
    assert np.abs(res.values).max() <= 64 * np.abs(V).max()  # what an F16 cache can hold, and not overfit
    assert not np.isnan(res.beta).any() and not np.isposinf(res.beta).any() and np.isfinite(res.beta).any()


def test_least_squares_fallbacks_never_return_nan():
    X = np.ones((3, 8))  # n < t and rank 1
    C, how = solve_least_squares(X, np.arange(6.0).reshape(3, 2))
    assert how == "ridge" and np.isfinite(C).all()
    C, how = solve_least_squares(np.vstack([np.ones(8)] * 20), np.ones((20, 2)))  # singular normal equations
    assert how in ("lstsq", "ridge") and np.isfinite(C).all()


# ---------------------------------------------------------------------------------------------
# the driver on real extracted K/V: every method x every wrapper


@pytest.fixture(scope="module")
def tiny_doc(load_model):
    from kvlocal.engine.session import Session

    from kvlocal.engine.queries import collect_queries

    with Session(load_model("llama-gqa"), n_ctx=1024, capture=True, **session_kwargs("llama-gqa")) as s:
        layout = s.ingest_document(TEXT, capture_queries=True)
        # context queries, plus the kvzip pass for the methods that rank keys by its scores
        return s.snapshot(), layout, collect_queries(s, layout, ["context", "kvzip"]), s.info


WRAPPERS = {
    "uniform": dict(),
    "json budgets": dict(budgets="json-fixture"),
    "sensitivity budgets": dict(budgets=SensitivityBudget(grid=(0.05, 0.2, 0.5), targets=(0.1, 0.2))),
    "chunked": dict(chunk_size=90),
    "recent window": dict(recent_window=40),
    "floor and holdout": dict(floor=2, holdout=0.2, max_queries_per_head=400),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_with_every_wrapper(tiny_doc, method, wrapper):
    snap, layout, queries, info = tiny_doc
    kw = dict(WRAPPERS[wrapper])
    if kw.get("budgets") == "json-fixture":
        table = {f"L{il}H{h}": float(1 + il + 2 * h) for il in info.base_layers for h in range(info.n_head_kv)}
        table["L0H1"] = 0.0  # a zero-budget head
        kw["budgets"] = JsonBudget(table)
    compactor = Compactor(method=method, ratio=8, **kw)
    cache, report = compactor.compact(snap, layout.doc_start, layout.doc_end, queries)
    cache.validate(info)
    assert cache.logical_length == layout.length
    assert report.n_cells < snap.n_cells and report.kept_keys > 0
    keep = np.asarray(report.budgets).sum(axis=(1, 2))  # per chunk, over heads
    window = kw.get("recent_window", 0)
    n_doc = min(layout.doc_end, layout.length - window) - layout.doc_start
    assert report.n_document == n_doc
    assert abs(keep.sum() - n_doc * report.heads / 8) <= report.heads * report.chunks
    # the protected cells come through untouched
    n_tail = layout.length - (layout.doc_start + n_doc)
    assert np.array_equal(cache.keys[0][: layout.doc_start], snap.keys[0][: layout.doc_start])
    assert np.array_equal(cache.keys[1][-n_tail:], snap.keys[1][-n_tail:])
    assert not cache.bias[1][-n_tail:].any() and not cache.bias[0][: layout.doc_start].any()
    if wrapper == "json budgets":
        zero_head = cache.bias[0][layout.doc_start: cache.n_cells - n_tail, 1]
        assert np.isneginf(zero_head).all()  # a zero-budget head is all padding
    if wrapper == "floor and holdout" and get_method(method).needs_queries:
        assert set(report.layer_errors) == set(info.base_layers)


def test_the_recent_share_goes_to_the_last_chunk_only(tiny_doc):
    """am-facts-omp-recent is am-facts-omp-half with a tenth of each head's budget on the region's
    last keys: in a chunked compaction every chunk but the last is the default's, and the last
    keeps its last keys in every head."""
    snap, layout, queries, _ = tiny_doc
    recent, half = get_method("am-facts-omp-recent"), get_method("am-facts-omp-half")
    assert recent.recent_share == 0.1 and half.recent_share == 0.0 and half.with_recent(0.0) is half
    assert recent.with_recent(0.0).selector == half.selector
    runs = {m: Compactor(method=m, ratio=4, chunk_size=90).compact(snap, layout.doc_start, layout.doc_end, queries)[1]
            for m in ("am-facts-omp-recent", "am-facts-omp-half")}
    got, base = runs["am-facts-omp-recent"].results, runs["am-facts-omp-half"].results
    last = max(ci for ci, _, _ in got)
    assert last >= 1 and got.keys() == base.keys()
    for (ci, li, h), res in got.items():
        if ci < last:
            assert np.array_equal(res.indices, base[(ci, li, h)].indices)
        else:
            T = layout.doc_end - layout.doc_start - 90 * last  # the last chunk's keys
            n = int(round(0.1 * runs["am-facts-omp-recent"].budgets[last][li][h]))
            assert n >= 1 and set(range(T - n, T)) <= set(res.indices.tolist())
    assert any(not np.array_equal(res.indices, base[k].indices) for k, res in got.items() if k[0] == last)


def test_the_compactor_draws_the_methods_share_of_late_queries(tiny_doc, monkeypatch):
    from kvlocal.kv.queryset import QuerySet

    snap, layout, queries, _ = tiny_doc
    seen = []
    real = QuerySet.subsample_rows

    def spy(self, per_kv_head, n_rep, seed=0, after=None, among=None):
        seen.append(after)
        return real(self, per_kv_head, n_rep, seed, after, among)

    monkeypatch.setattr(QuerySet, "subsample_rows", spy)
    assert get_method("am-facts-omp-balanced").query_after == 0.5
    # the default is cores first (am-facts-omp-cores) on the balanced rows with its values anchored less
    # (AnchoredValues(0.1), not 1.0), every other part alike; am-facts-omp-cores-late5 takes every row
    # asked after the document up to 5x
    default, cores = get_method(DEFAULT_METHOD), get_method("am-facts-omp-cores")
    assert default.query_after == 0.5 and default.selector.fact_cores and default.values.rel == 0.1
    assert default.late_until is None
    assert default != replace(cores, name=default.name)
    assert replace(default, query_after=None, values=cores.values, name=cores.name) == cores
    late5 = "am-facts-omp-cores-late5"
    for method, ratio, share in (("am-facts-omp-balanced", 8, 0.5), ("am-facts-omp-half", 8, None),
                                 (DEFAULT_METHOD, 5, 0.5), (late5, 8, 0.5), (late5, 5, 1.0), (late5, 4, 1.0)):
        Compactor(method=method, ratio=ratio, max_queries_per_head=64).compact(snap, layout.doc_start,
                                                                                layout.doc_end, queries)
        assert seen.pop() == share


def test_a_wide_fit_keeps_the_keys_and_fits_beta_and_values_on_more_rows(tiny_doc):
    """Method.fit_rows: the keys are chosen on the selection's rows as without it; beta and the
    values are fitted on those rows and more of the rows the budget left out, never the held-out ones."""
    from kvlocal.am.metrics import head_errors

    snap, layout, queries, _ = tiny_doc
    n_head_kv = snap.keys[0].shape[1]
    base, wide = get_method(DEFAULT_METHOD), get_method("am-facts-omp-cores-wide")
    assert replace(wide, fit_rows=None, name=base.name) == base and wide.fit_rows == 3.0
    looser = get_method("am-facts-omp-cores-looser")  # the default with its values anchored by 0.01, not 0.1
    assert replace(looser, values=base.values, name=base.name) == base and looser.values.rel == 0.01
    kw = dict(ratio=6, seed=3, holdout=0.2, max_queries_per_head=64)
    train, test, refit = Compactor(wide, **kw)._split(queries, n_head_kv)
    train0, test0, refit0 = Compactor(base, **kw)._split(queries, n_head_kv)
    assert refit0 is None and train.n_tokens == train0.n_tokens and test.n_tokens == test0.n_tokens

    def row_ids(qs):  # each row's identity: its position, anchor and first layer's queries
        il = min(qs.layers)
        return [(int(p), int(a), qs.layers[il][i].tobytes()) for i, (p, a) in enumerate(zip(qs.positions, qs.anchors))]

    def rows(qs):
        return set(row_ids(qs))

    n_rep = queries.layers[min(queries.layers)].shape[1] // n_head_kv
    assert rows(train) == rows(train0) and rows(test) == rows(test0)
    assert rows(train) < rows(refit) and not rows(refit) & rows(test)
    # 64 queries per KV head more on top of the selection's 64 as 2 x 64 more, as far as the rows go
    assert refit.n_tokens - train.n_tokens == min(-(-128 // n_rep), queries.n_tokens - train.n_tokens - test.n_tokens)

    done = {}
    for method in (base, wide):
        _, done[method.name] = Compactor(method, **kw).compact(snap, layout.doc_start, layout.doc_end, queries)
    a, b = done[base.name].results, done[wide.name].results
    assert a.keys() == b.keys() and all(np.array_equal(a[k].indices, b[k].indices) for k in a)
    # on the rows only the wide fit saw, it answers better (the planted error: the narrow fit
    # would have to do as well on rows it never saw)
    problem = Compactor()._problems(snap, np.flatnonzero((snap.positions >= layout.doc_start)
                                                         & (snap.positions < layout.doc_end)), None)
    seen = rows(train)
    only = refit.take([i for i, r in enumerate(row_ids(refit)) if r not in seen])
    err = {name: np.mean([head_errors(problem(li, h, 1, only), res[(0, li, h)])["output_rel_l2"]
                          for li in range(len(snap.keys)) for h in range(n_head_kv)])
           for name, res in ((base.name, a), (wide.name, b))}
    assert err[wide.name] < err[base.name], err


def test_compactor_rejects_bad_settings(tiny_doc):
    snap, layout, queries, _ = tiny_doc
    for bad in (dict(ratio=1.0), dict(ratio=0.5), dict(cap=0), dict(chunk_size=1), dict(holdout=1.0)):
        with pytest.raises(KvlocalError):
            Compactor(**bad)
    with pytest.raises(KvlocalError, match="needs reference queries"):
        Compactor(method="am-highest").compact(snap, layout.doc_start, layout.doc_end, None)
    with pytest.raises(KvlocalError, match="nothing to compact"):
        Compactor(recent_window=10_000).compact(snap, layout.doc_start, layout.doc_end, queries)


def test_json_budgets_from_a_file(tmp_path, tiny_doc):
    _, _, _, info = tiny_doc
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({f"L{il}H{h}": 1.0 for il in info.base_layers for h in range(info.n_head_kv)}))
    p = JsonBudget(path).proportions(info.base_layers, info.n_head_kv)
    assert np.allclose(p, 1 / p.size)
    path.write_text(json.dumps({"L0H0": 1.0}))
    with pytest.raises(KvlocalError, match="L0H1"):
        JsonBudget(path).proportions(info.base_layers, info.n_head_kv)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_attention_matching_beats_eviction_on_held_out_queries(load_model, name):
    """Real K/V and queries: at 8x, AM reconstructs held-out attention better than every baseline,
    and the compacted cache runs in the engine."""
    from kvlocal.engine.session import Session

    with Session(load_model(name), n_ctx=1024, capture=True, **session_kwargs(name)) as s:
        layout = s.ingest_document(TEXT, capture_queries=True)
        snap = s.snapshot()
        err = {}
        for method in ("am-highest", "am-omp-fast", "truncate", "streaming-llm", "h2o", "random"):
            cache, report = Compactor(method=method, ratio=8, holdout=0.25, seed=1).compact(
                snap, layout.doc_start, layout.doc_end, s.context_queries)
            err[method] = np.mean([e["output_rel_l2"] for e in report.layer_errors.values()])
            if method == "am-highest":
                s.inject(cache, snap)
                assert s.n_past == layout.length
                assert np.isfinite(s.decode(s.chat_tokens([{"role": "user", "content": "Hi"}]))).all()
                s.restore(snap.state.to_bytes())
        best_baseline = min(err[m] for m in ("truncate", "streaming-llm", "h2o", "random"))
        assert err["am-highest"] < best_baseline and err["am-omp-fast"] < best_baseline, err


def test_results_are_deterministic_for_a_seed(tiny_doc):
    """The promise (README): the same inputs, seed, machine and library versions give the same
    bits whatever the number of workers or numba threads.  Across CPUs only closeness holds
    (another SIMD path, another BLAS kernel), so no test compares bits with stored numbers."""
    import numba

    snap, layout, queries, _ = tiny_doc

    def run(method, workers, threads):
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            c, _ = Compactor(method, ratio=6, seed=3, holdout=0.2, workers=workers).compact(
                snap, layout.doc_start, layout.doc_end, queries)
        finally:
            numba.set_num_threads(before)
        return c.keys + c.bias + c.values

    for method in ("am-highest", "am-omp-fast", "random"):
        runs = [run(method, w, t) for w, t in ((2, numba.config.NUMBA_NUM_THREADS), (1, 1),
                                               (1, numba.config.NUMBA_NUM_THREADS), (3, 1))]
        for other in runs[1:]:
            assert all(np.array_equal(x, y) for x, y in zip(runs[0], other, strict=True)), method
    # another seed is another result (the test above could not pass by returning constants)
    a = run("random", 1, 1)
    b, _ = Compactor("random", ratio=6, seed=4, holdout=0.2).compact(snap, layout.doc_start, layout.doc_end, queries)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b.keys + b.bias + b.values, strict=True))


def test_head_curves_fall_with_more_keys(tiny_doc):
    snap, layout, queries, info = tiny_doc
    curves = Compactor(holdout=0.2).head_curves(snap, layout.doc_start, layout.doc_end, queries,
                                                grid=(0.05, 0.2, 0.6))
    assert curves.shape == (len(info.base_layers), info.n_head_kv, 3)
    assert np.all(curves[..., -1] <= curves[..., 0] + 1e-9)


def test_committed_smollm2_budgets_fit_the_model(load_model):
    from importlib import resources

    from kvlocal.engine.modelinfo import ModelInfo

    info = ModelInfo.from_model(load_model("smollm2"))
    path = resources.files("kvlocal.data").joinpath("budgets/SmolLM2-135M-Instruct.json")
    p = JsonBudget(str(path)).proportions(info.base_layers, info.n_head_kv)
    assert p.shape == (30, 3) and abs(p.sum() - 1) < 1e-9 and p.min() >= 0
    b = allocate(90 * 100, p, cap=750)
    assert b.sum() == 9000 and b.max() <= 750


# ---------------------------------------------------------------------------------------------
# shared spans (a layer's heads keep one ranking, pooled over neighbours) and anchored values


def head_group(n_heads=3, T=80, n=200, d=16, t=10, seed=0):
    rng = np.random.default_rng(seed)
    return [HeadProblem(rng.normal(size=(T, d)) * 2, rng.normal(size=(T, d)), rng.normal(size=(n, d)) * 2, t)
            for _ in range(n_heads)]


def test_shared_spans_on_one_head_without_pooling_is_highest_attn():
    p = random_problem(seed=3)
    assert np.array_equal(SharedSpans(span=1).select(p).indices, HighestAttnKeys("rms").select(p).indices)
    assert np.array_equal(SharedSpans(span=1, own=1.0).select(p).indices, HighestAttnKeys("rms").select(p).indices)


def test_shared_spans_keep_what_any_head_needs_in_every_head():
    heads = head_group()
    # head 0 alone pays heavy attention to keys 40..42: its queries align with them
    rng = np.random.default_rng(1)
    u = np.zeros(16)
    u[0] = 4.0
    K0, Q0 = heads[0].keys.copy(), u + rng.normal(size=heads[0].queries.shape) * 0.5
    K0[40:43] = u * 2  # logit ~8 above the rest for every query of head 0
    heads[0] = HeadProblem(K0, heads[0].values, Q0, 10)
    sel = SharedSpans(span=1)
    scores = [sel.head_scores(p) for p in heads]
    chosen = sel.select_group(heads, scores)
    assert all(np.array_equal(c.indices, chosen[0].indices) for c in chosen)  # one set for the layer
    assert {40, 41, 42} <= set(chosen[2].indices.tolist())  # head 2 keeps what head 0 needs
    assert not {40, 41, 42} <= set(HighestAttnKeys("rms").select(heads[2]).indices.tolist())
    # pooling keeps the neighbours of a high key: the span 39..43 around 40..42
    pooled = sel.__class__(span=3).select_group([p for p in heads], scores)
    assert {39, 43} <= set(pooled[1].indices.tolist()) and all(len(c.indices) == 10 for c in pooled)
    # own=0.5: half of each head's budget from its own ranking, never twice the same key
    half = SharedSpans(span=1, own=0.5).select_group(heads, scores)
    for p, c, s in zip(heads, half, scores, strict=True):
        assert len(np.unique(c.indices)) == p.t and np.all(np.diff(c.indices) > 0)
        assert set(top_k(s, 5)) <= set(c.indices.tolist()) | set(chosen[0].indices.tolist())


def top_k(score, k):
    return np.argsort(-score, kind="stable")[:k].tolist()


def test_shared_spans_reject_bad_groups_and_settings():
    a, b = random_problem(T=50), random_problem(T=60)
    sel = SharedSpans()
    with pytest.raises(ValueError, match="share their key positions"):
        sel.select_group([a, b], [sel.head_scores(a), sel.head_scores(b)])
    for bad in (dict(span=0), dict(own=1.5), dict(scope="head"), dict(agg="median")):
        with pytest.raises(ValueError):
            SharedSpans(**bad)
    assert sel.select_group([], []) == []


def test_group_methods_keep_one_set_per_layer_in_the_compactor(tiny_doc):
    snap, layout, queries, info = tiny_doc
    cache, report = Compactor("am-spans", ratio=4, seed=1).compact(snap, layout.doc_start, layout.doc_end, queries)
    cache.validate(info)
    def kept(c, li, h):  # original positions head h of layer li kept
        return frozenset(c.origin[li][:, h][c.origin[li][:, h] >= 0].tolist())

    layer_sets = []
    for li in range(len(snap.keys)):
        keep = [kept(cache, li, h) for h in range(info.n_head_kv)]
        assert all(k == keep[0] for k in keep), f"layer {li}: heads keep different cells"
        layer_sets.append(keep[0])
    assert len(set(layer_sets)) > 1  # layers choose for themselves
    per_head, _ = Compactor("am-highest", ratio=4, seed=1).compact(snap, layout.doc_start, layout.doc_end, queries)
    assert any(kept(per_head, li, 0) != kept(per_head, li, 1) for li in range(len(snap.keys)))
    model_wide, _ = Compactor("am-spans-model", ratio=4, seed=1).compact(snap, layout.doc_start, layout.doc_end,
                                                                          queries)
    assert len({kept(model_wide, li, h) for li in range(len(snap.keys)) for h in range(info.n_head_kv)}) == 1


def test_a_row_weighed_twice_fits_as_that_row_given_twice():
    """HeadProblem.row_weights: beta (box NNLS) and the values (anchored and plain least squares) fitted
    with weight 2 on some rows equal the unweighted fits with those rows duplicated.  The gram matrices
    are summed in float32 in another order (relative error ~1e-6 here); 1e-4 leaves room for another
    BLAS kernel, and the planted error (the weight on other rows) is 0.08-0.14."""
    p = random_problem(T=120, n=400, t=15, seed=5)
    K, V, Q = p.keys, p.values, p.queries
    dup = HeadProblem(K, V, np.concatenate([Q, Q[:40]]), p.t)
    idx = HighestAttnKeys().select(p).indices

    def gap(rows):
        w = np.ones(len(Q))
        w[rows] = 2.0
        weighed = HeadProblem(K, V, Q, p.t, row_weights=w)
        bw, bd = BoxNNLS().fit(weighed, idx)[0], BoxNNLS().fit(dup, idx)[0]
        out = [np.abs(bw - bd).max() / np.abs(bd).max()]
        for fitter in (AnchoredValues(0.1), LeastSquaresValues()):
            cw, cd = fitter.fit(weighed, idx, bd)[0], fitter.fit(dup, idx, bd)[0]
            out.append(np.abs(cw - cd).max() / np.abs(cd).max())
        return np.array(out)

    assert (gap(slice(0, 40)) < 1e-4).all()
    assert (gap(slice(40, 80)) > 1e-2).all()  # planted: the weight on rows that were not duplicated
    for bad in (np.ones(5), np.zeros(400), np.full(400, np.nan), -np.ones(400)):
        with pytest.raises(ValueError, match="row_weights"):
            HeadProblem(K, V, Q, p.t, row_weights=bad)


def test_a_wide_fit_keeps_the_share_of_late_rows_the_keys_were_chosen_on(tiny_doc):
    """The rows a wide fit adds are mostly rows that read the document (the late ones run out
    first); weighed, the late rows keep the share they had among the selection's rows."""
    from kvlocal.kv.queryset import QuerySet

    snap, layout, queries, _ = tiny_doc
    late = np.random.default_rng(0).random(queries.n_tokens) < 0.03  # a few rows asked after the document
    qs = QuerySet(queries.layers, queries.positions, list(queries.sources),
                  np.where(late, -1, np.maximum(queries.anchors, 0)).astype(np.int32), queries.key_scores)
    c = Compactor("am-facts-omp-cores-wide", ratio=6, seed=3, holdout=0.2, max_queries_per_head=64)
    train, _, refit = c._split(qs, snap.keys[0].shape[1])
    w = c._balance(refit, train)
    share, refit_late = np.mean(train.anchors < 0), refit.anchors < 0
    assert 0.3 < share <= 0.5 and refit_late.mean() < share - 0.1  # balanced selection, late rows ran out
    assert w.mean() == pytest.approx(1.0) and w[refit_late].sum() / w.sum() == pytest.approx(share)
    assert c._balance(refit, None) is None
    assert Compactor("am-facts-omp-half", ratio=6)._balance(refit, train) is None  # rows drawn alike: no weights


def test_anchored_values_interpolate_between_least_squares_and_the_original_values():
    p = random_problem(T=120, n=400, t=15, seed=5)
    idx = HighestAttnKeys().select(p).indices
    beta, _ = BoxNNLS().fit(p, idx)
    X = compacted_attention(p, idx, beta)
    Y = p.stats().outputs
    V = p.values[idx].astype(np.float64)
    lsq, _ = LeastSquaresValues().fit(p, idx, beta)
    fits = [AnchoredValues(rel=r).fit(p, idx, beta)[0] for r in (0.0, 0.01, 1.0, 100.0, 1e8)]
    assert np.abs(fits[0] - lsq).max() < 1e-6 * max(1.0, np.abs(lsq).max())
    fit_err = [np.linalg.norm(X @ C - Y) for C in fits]
    dist = [np.linalg.norm(C - V) for C in fits]
    assert all(a <= b + 1e-9 for a, b in zip(fit_err, fit_err[1:]))  # more anchoring, worse fit...
    assert all(a >= b - 1e-9 for a, b in zip(dist, dist[1:]))  # ...and closer to V[S]
    assert dist[-1] < 1e-4 * dist[0]
    C, notes = AnchoredValues(rel="auto").fit(p, idx, beta)
    assert notes["values"].startswith("anchored-") and C.shape == V.shape and np.isfinite(C).all()
    with pytest.raises(ValueError):
        AnchoredValues(rel=-1.0)
    assert AnchoredValues().fit(p, idx[:0], beta[:0])[0].shape == (0, p.d)


def test_the_default_without_beta_keeps_its_keys_and_fits_only_what_it_says(tiny_doc):
    """am-facts-omp-cores-nobeta and -kept choose the default's keys; -nobeta fits the values with
    beta 0, -kept keeps the keys' own values (the selection alone)."""
    snap, layout, queries, _ = tiny_doc
    kw = dict(ratio=6, seed=3, max_queries_per_head=64)
    done = {name: Compactor(name, **kw).compact(snap, layout.doc_start, layout.doc_end, queries)[1].results
            for name in (DEFAULT_METHOD, "am-facts-omp-cores-nobeta", "am-facts-omp-cores-kept")}
    base, nobeta, kept = done.values()
    assert base.keys() == nobeta.keys() == kept.keys()
    fitted_beta = fitted_values = False
    for k, res in base.items():
        li, h = k[1], k[2]
        assert np.array_equal(res.indices, nobeta[k].indices) and np.array_equal(res.indices, kept[k].indices)
        assert not nobeta[k].beta.any() and not kept[k].beta.any()
        doc_values = snap.values[li][layout.doc_start:layout.doc_end, h]
        assert np.array_equal(kept[k].values, doc_values[res.indices].astype(np.float32))
        fitted_beta |= bool(res.beta.any())
        fitted_values |= not np.allclose(nobeta[k].values, kept[k].values)
    assert fitted_beta and fitted_values  # the default fits a beta, -nobeta still fits the values
