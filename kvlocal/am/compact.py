"""The driver: compact a sequence's document range, layer by layer and KV head by KV head.

What stays whole (bias 0): the cells before the document (BOS, system prompt, template), the
cells after it (end of turn) and a configurable recent window at the end of the sequence.  The
document range in between is compacted, optionally chunk by chunk (KV-based chunking: fixed
token chunks of the one prefill, each compacted at the same ratio with its own queries).  Every
(layer, KV head) gets its own budget and keeps its own keys; the result is packed into a
``CompactedCache`` (numpy only, nothing here touches the engine).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import KvlocalError
from ..kv.cache import CompactedCache, HeadBlock, KVSnapshot, Segment, assemble, per_head_segment, shared_segment
from ..kv.queryset import QuerySet
from .budgets import BUDGETS, BudgetPolicy, allocate
from .facts import as_fact_ranks
from .methods import Method, get_method
from .metrics import head_errors
from .problem import HeadProblem, HeadResult


@dataclass
class CompactionReport:
    method: str
    ratio: float
    n_document: int  # document cells compacted (protected cells excluded)
    n_cells: int  # cells of the compacted cache (all segments)
    kept_keys: int  # real (non-padding) keys over all compacted (layer, head) blocks
    heads: int  # (layer, KV head) blocks per chunk
    chunks: int
    padding_fraction: float
    seconds: float
    notes: dict = field(default_factory=dict)  # fallback -> count
    layer_errors: dict = field(default_factory=dict)  # il -> {"output_rel_l2", "mass_err"} on held-out queries
    budgets: list = field(default_factory=list)  # per chunk [n_layers][n_head_kv]
    results: dict = field(default_factory=dict, repr=False)  # (chunk, li, h) -> HeadResult, to reuse

    @property
    def effective_ratio(self) -> float:
        """Document keys per kept key, averaged over heads."""
        return self.n_document * self.heads / max(self.kept_keys, 1)

    def mean_error(self, key: str) -> float | None:
        """The held-out error ``key`` ("output_rel_l2" or "mass_err") averaged over layers, or None
        when no query was held out."""
        errors = self.layer_errors
        return float(np.mean([e[key] for e in errors.values()])) if errors else None


def _facts_first(is_fact: np.ndarray) -> np.ndarray:
    """A stable order that puts the fact keys first."""
    return np.concatenate([np.flatnonzero(is_fact), np.flatnonzero(~is_fact)])


def _kept_everywhere(kept: list[np.ndarray]) -> np.ndarray:
    """The cells every one of ``kept`` (per head: the cells it keeps) holds."""
    common = kept[0]
    for k in kept[1:]:
        common = np.intersect1d(common, k, assume_unique=True)
    return common


def _whole(snap: KVSnapshot, cells: np.ndarray, li: int, h: int, bias) -> HeadResult:
    """A head kept as it is: every key with the bias it carries and its own value."""
    b = np.zeros(len(cells), np.float32) if bias is None else np.asarray(bias[li], np.float32)[cells, h]
    return HeadResult(np.arange(len(cells)), b.copy(), snap.values[li][cells, h].astype(np.float32),
                      {"whole": True})


class _Calibration:
    """Head error curves (held-out output error when kept at each grid ratio), for sensitivity budgets."""

    def __init__(self, compactor: Compactor, problem: Callable, train: QuerySet | None, test: QuerySet | None,
                 n_layers: int, n_head_kv: int, n_keys: int):
        self.c, self.problem, self.train = compactor, problem, train
        self.test = test if test is not None and test.n_tokens else train
        self.shape, self.n_keys = (n_layers, n_head_kv), n_keys

    def head_curves(self, method: str, grid) -> np.ndarray:
        fit = get_method(method)

        def curve(li, h):
            out = []
            for ratio in grid:
                t = max(1, int(round(ratio * self.n_keys)))
                res = fit.fit(self.problem(li, h, t, self.train))
                out.append(head_errors(self.problem(li, h, t, self.test), res)["output_rel_l2"])
            return out

        curves = np.zeros(self.shape + (len(grid),))
        heads = [(li, h) for li in range(self.shape[0]) for h in range(self.shape[1])]
        for (li, h), c in self.c._map(curve, heads):
            curves[li, h] = c
        return curves


@dataclass
class Compactor:
    method: str | Method = "am-highest"
    ratio: float = 10.0  # document keys per kept key
    budgets: str | BudgetPolicy = "uniform"
    cap: float = 0.75  # at most this share of a block's keys per head
    floor: int = 0  # at least this many keys per head
    recent_window: int = 0  # last positions of the sequence kept whole
    chunk_size: int | None = None  # compact the document in chunks of this many tokens
    chunk_queries: str = "own"  # "own": queries anchored in the chunk (+ unanchored); "all"
    max_queries_per_head: int | None = None
    holdout: float = 0.0  # share of query tokens kept aside to measure the result
    backend: str = "numba"
    seed: int = 0
    workers: int | None = None  # threads solving heads in parallel (default: one per core)

    def __post_init__(self):
        if not self.ratio > 1:
            raise KvlocalError(f"the compaction ratio must be > 1 (kept keys = document / ratio), got {self.ratio}")
        if not 0 < self.cap <= 1 or self.floor < 0 or self.recent_window < 0:
            raise KvlocalError("need 0 < cap <= 1, floor >= 0 and recent_window >= 0")
        if self.chunk_size is not None and self.chunk_size < 2:
            raise KvlocalError("chunk_size must be at least 2 tokens")
        if self.chunk_queries not in ("own", "all") or not 0 <= self.holdout < 1:
            raise KvlocalError("chunk_queries must be 'own' or 'all' and holdout in [0, 1)")
        self.method = get_method(self.method)
        if isinstance(self.budgets, str):
            self.budgets = BUDGETS.create(self.budgets)

    def compact(self, snap: KVSnapshot, doc_start: int, doc_end: int, queries: QuerySet | None = None,
                bias: list[np.ndarray] | None = None,
                progress: Callable[[int, int], None] | None = None,
                facts: np.ndarray | None = None, whole_layers=(),
                given: dict | None = None) -> tuple[CompactedCache, CompactionReport]:
        """Compact the cells of ``snap`` whose positions lie in [doc_start, doc_end) (minus the
        recent window).  ``queries``: reference queries of every base layer; ``bias``: the bias the
        cells already carry (re-compaction), per layer ``[N, H_kv]``; ``progress(done, total)``;
        ``facts``: per position, a bool (``kvlocal.am.facts.fact_mask``) or a fact rank (``Method.fact_ranks``:
        0 no fact, higher kept first), for selectors that keep facts.

        On-policy stages (``kvlocal.pipeline``): the layers (indices into ``snap.keys``) in
        ``whole_layers`` keep every document key, so the cache mixes compacted and original
        layers; ``given``: results of an earlier call (``report.results``) used as they are."""
        t0 = time.perf_counter()
        method = self.method
        T = snap.logical_length
        pos = snap.positions
        hi = min(doc_end, T - self.recent_window)
        region = np.flatnonzero((pos >= doc_start) & (pos < hi))
        if len(region) < 2:
            raise KvlocalError(f"nothing to compact: {len(region)} document cells outside the protected ranges")
        if method.needs_queries and (queries is None or queries.n_tokens == 0):
            raise KvlocalError(f"method {method.name!r} needs reference queries ({', '.join(method.queries)})")
        n_layers, n_head_kv = len(snap.keys), snap.keys[0].shape[1]
        missing = [il for il in snap.layer_ids if queries is not None and il not in queries.layers]
        if missing:
            raise KvlocalError(f"the queries do not cover layers {missing}")
        train, test, refit = self._split(queries, n_head_kv)
        if facts is not None:
            try:
                facts = as_fact_ranks(facts)
            except ValueError as e:
                raise KvlocalError(str(e)) from None
            if facts.ndim != 1 or len(facts) < int(pos.max()) + 1:
                raise KvlocalError(f"facts must be one bool or fact rank per position (>= {int(pos.max()) + 1}), "
                                   f"got {facts.shape}")
        chunks = [region] if self.chunk_size is None else \
            [region[i:i + self.chunk_size] for i in range(0, len(region), self.chunk_size)]
        if len(chunks) > 1 and len(chunks[-1]) < 2:  # a 1-token tail joins the previous chunk
            chunks[-2] = np.concatenate([chunks[-2], chunks.pop()])

        segments: list[Segment] = [shared_segment(snap, np.flatnonzero(pos < doc_start), bias)]
        notes: Counter = Counter()
        errors: dict = {}
        all_budgets = []
        kept = 0
        steps, done = n_layers * len(chunks), 0
        whole = {int(li) for li in whole_layers}
        given = given or {}
        if any(not 0 <= li < n_layers for li in whole):
            raise KvlocalError(f"whole_layers must index the {n_layers} base layers, got {sorted(whole)}")
        results: dict = {}
        for ci, cells in enumerate(chunks):
            # a method's recent share belongs to the sequence's end, which only the last chunk holds
            method = self.method if ci == len(chunks) - 1 else self.method.with_recent(0.0)
            lo_pos, hi_pos = int(pos[cells[0]]), int(pos[cells[-1]]) + 1
            q_train = self._chunk_queries(train, lo_pos, hi_pos)
            q_test = self._chunk_queries(test, lo_pos, hi_pos) if test is not None else None
            q_refit = self._chunk_queries(refit, lo_pos, hi_pos) if refit is not None else None
            w_refit = self._balance(q_refit, q_train)
            problem = self._problems(snap, cells, bias, facts)
            calibration = _Calibration(self, problem, q_train, q_test, n_layers, n_head_kv, len(cells))
            budgets = self._budgets(snap, len(cells), calibration)
            for li in whole:
                budgets[li, :] = len(cells)
            all_budgets.append(budgets.tolist())
            todo = [(li, h) for li in range(n_layers) if li not in whole for h in range(n_head_kv)
                    if (ci, li, h) not in given]

            pre, chosen = ({}, {}) if method.group_selector is None or not todo else \
                self._group_select(method.group_selector, problem, budgets, q_train, todo)

            def solve(li, h, problem=problem, budgets=budgets, q_train=q_train, q_test=q_test, pre=pre,
                      chosen=chosen, ci=ci, q_refit=q_refit, w_refit=w_refit):
                if (ci, li, h) in given:
                    return given[(ci, li, h)], None
                if li in whole:  # every key as it is (the identity fit needs no statistics)
                    return _whole(snap, cells, li, h, bias), None
                p = pre.pop((li, h), None) or problem(li, h, int(budgets[li, h]), q_train)
                refit = None if q_refit is None else problem(li, h, p.t, q_refit, w_refit)
                res = method.fit(p, chosen.get((li, h)), refit)
                err = head_errors(problem(li, h, p.t, q_test), res) if q_test is not None and q_test.n_tokens else None
                return res, err

            solved = {}  # (li, h): (result, the chunk's cells it keeps)
            left = [n_head_kv] * n_layers
            for (li, h), (res, err) in self._map(solve, [(li, h) for li in range(n_layers) for h in range(n_head_kv)]):
                if li not in whole:
                    results[(ci, li, h)] = res
                for k, v in res.notes.items():
                    notes[f"{k}={v}"] += 1
                if err is not None:
                    acc = errors.setdefault(snap.layer_ids[li], {"output_rel_l2": 0.0, "mass_err": 0.0, "n": 0})
                    acc["output_rel_l2"] += err["output_rel_l2"]
                    acc["mass_err"] += err["mass_err"]
                    acc["n"] += 1
                kept += res.t
                solved[(li, h)] = res, cells[res.indices]
                left[li] -= 1
                if not left[li]:
                    done += 1
                    if progress is not None:
                        progress(done, steps)
            # the verbatim facts every head keeps first, in position order: such a fact takes the same
            # slot in every head and layer, so a later re-compaction can still tell it is one
            common = _kept_everywhere([kc[facts[pos[kc]] > 0] for _, kc in solved.values()]) \
                if facts is not None and method.verbatim_facts else None
            blocks = [[None] * n_head_kv for _ in range(n_layers)]
            for (li, h), (res, kept_cells) in solved.items():
                if common is None:
                    order = slice(None)
                else:
                    by_pos = np.argsort(kept_cells, kind="stable")
                    order = by_pos[_facts_first(np.isin(kept_cells[by_pos], common))]
                kept_cells = kept_cells[order]
                blocks[li][h] = HeadBlock(snap.keys[li][kept_cells, h], res.values[order], res.beta[order],
                                          pos[kept_cells])
            segments.append(per_head_segment(blocks, lo_pos, hi_pos, snap.dtype))
        segments.append(shared_segment(snap, np.flatnonzero(pos >= hi), bias))
        cache = assemble([s for s in segments if s.n_cells], T)
        for e in errors.values():
            n = e.pop("n")
            e["output_rel_l2"] /= n
            e["mass_err"] /= n
        report = CompactionReport(method.name, self.ratio, len(region), cache.n_cells, kept, n_layers * n_head_kv,
                                  len(chunks), cache.padding_fraction, time.perf_counter() - t0, dict(notes), errors,
                                  all_budgets, results)
        cache.meta = {"method": method.name, "ratio": self.ratio}
        return cache, report

    def head_curves(self, snap: KVSnapshot, doc_start: int, doc_end: int, queries: QuerySet,
                    method: str = "am-highest", grid=(0.02, 0.05, 0.1, 0.2, 0.4)) -> np.ndarray:
        """Per (layer, KV head) held-out output error when that head alone keeps each ``grid``
        share of the document's keys: ``[n_layers, n_head_kv, len(grid)]`` (for budgets)."""
        pos = snap.positions
        cells = np.flatnonzero((pos >= doc_start) & (pos < doc_end))
        train, test, _ = self._split(queries, snap.keys[0].shape[1])
        problem = self._problems(snap, cells, None)
        return _Calibration(self, problem, train, test, len(snap.keys), snap.keys[0].shape[1],
                            len(cells)).head_curves(method, grid)

    # helpers ----------------------------------------------------------------------------------
    def _problems(self, snap: KVSnapshot, cells: np.ndarray, bias: list[np.ndarray] | None,
                  facts: np.ndarray | None = None) -> Callable:
        """problem(li, h, t, queries) -> the HeadProblem of layer li, KV head h over ``cells``."""
        views: dict = {}  # (il, id(queries)) -> [n_head_kv, n_rep * n, d], built once per layer
        n_head_kv = snap.keys[0].shape[1]

        def problem(li: int, h: int, t: int, qs: QuerySet | None, weights: np.ndarray | None = None) -> HeadProblem:
            il = snap.layer_ids[li]
            if qs is None:
                q = np.zeros((1, snap.keys[li].shape[2]), np.float32)
            else:
                key = (il, id(qs))
                if key not in views:
                    views[key] = qs.kv_heads(il, n_head_kv)
                q = views[key][h]
            b = None if bias is None else np.asarray(bias[li], np.float32)[cells, h]
            at = snap.positions[cells]
            scores = None
            if qs is not None and qs.key_scores is not None and il in qs.key_scores:
                s = qs.key_scores[il]
                if s.shape[0] != n_head_kv or s.shape[1] <= int(at.max()):
                    raise KvlocalError(f"layer {il}: key scores {s.shape} do not cover {n_head_kv} KV heads "
                                       f"and positions up to {int(at.max())}")
                scores = s[h, at]
            return HeadProblem(snap.keys[li][cells, h], snap.values[li][cells, h], q, t, bias=b,
                               positions=at, backend=self.backend,
                               facts=None if facts is None else facts[at], key_scores=scores,
                               row_weights=None if weights is None else np.tile(weights, len(q) // len(weights)),
                               seed=self.seed * 100003 + li * 101 + h)

        return problem

    def _group_select(self, selector, problem: Callable, budgets: np.ndarray, queries: QuerySet | None,
                      heads: list | None = None):
        """A group selector's choice for every head (of ``heads``, default all): score each head (in
        parallel), then let the selector decide per group (a layer's KV heads, or every head).
        Returns the problems it built (their statistics are reused by the fits) and
        {(li, h): Selection}."""
        n_layers, n_head_kv = budgets.shape
        if heads is None:
            heads = [(li, h) for li in range(n_layers) for h in range(n_head_kv)]

        scoring = selector.score_queries(queries)

        def score(li, h):
            p = problem(li, h, int(budgets[li, h]), queries)
            ps = p if scoring is queries else problem(li, h, int(budgets[li, h]), scoring)
            return p, selector.head_scores(ps)

        problems, scores = {}, {}
        for key, (p, sc) in self._map(score, heads):
            problems[key], scores[key] = p, sc
        groups = [heads] if selector.scope == "model" else \
            [g for g in ([(li, h) for h in range(n_head_kv) if (li, h) in problems] for li in range(n_layers)) if g]
        chosen, shared = {}, {}
        for group in groups:
            ranked = selector.rank_group([problems[k] for k in group], [scores[k] for k in group])
            if ranked is None:  # decided as a whole
                sels = selector.select_group([problems[k] for k in group], [scores[k] for k in group])
                chosen.update(zip(group, sels, strict=True))
            else:
                shared.update((k, ranked) for k in group)
        # heads that choose from their group's ranking do so in parallel (OMP around facts is costly)
        for key, sel in self._map(lambda li, h: selector.fill(problems[(li, h)], shared[(li, h)]), list(shared)):
            chosen[key] = sel
        return problems, chosen

    def _map(self, fn, tasks):
        """Yield (task, fn(*task)) in completion order, on ``workers`` threads.

        Heads are independent: each worker solves whole heads with single-threaded BLAS and numba
        (both release the GIL), which on 2 cores is ~2.5x faster than multithreaded BLAS per head."""
        workers = self.workers or os.cpu_count() or 1
        if workers == 1 or len(tasks) == 1:
            # the same single-threaded BLAS as the workers, so any worker count gives the same bits
            with threadpool_limits(1, user_api="blas"):
                for task in tasks:
                    yield task, fn(*task)
            return

        def run(task):
            numba.set_num_threads(1)  # thread-local
            return task, fn(*task)

        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(run, task) for task in tasks]
            for future in as_completed(futures):
                yield future.result()

    def _split(self, queries: QuerySet | None, n_head_kv: int) -> tuple[QuerySet | None, QuerySet | None,
                                                                         QuerySet | None]:
        """Subsample to the per-head query budget, then set ``holdout`` of the tokens aside.  Returns
        (train, test, refit): the selection's rows, the held-out ones (or None) and, for a method with
        ``fit_rows``, the rows beta and the values are fitted on (train's and more drawn from the
        rows left out, alike; None when there are none)."""
        if queries is None:
            return None, None, None
        rows = np.arange(queries.n_tokens)
        extra = rows[:0]
        if self.max_queries_per_head is not None:
            n_rep = next(iter(queries.layers.values())).shape[1] // n_head_kv
            after = self.method.after_share(self.ratio)
            rows = queries.subsample_rows(self.max_queries_per_head, n_rep, self.seed, after=after)
            more = self.method.fit_rows
            if more is not None and more > 1 and len(rows) < queries.n_tokens:
                rest = np.setdiff1d(np.arange(queries.n_tokens), rows, assume_unique=True)
                n_more = int(round((more - 1) * self.max_queries_per_head))
                extra = queries.subsample_rows(max(n_more, 1), n_rep, self.seed + 2, after=after, among=rest)
        test = None
        n_test = int(round(self.holdout * len(rows)))
        if self.holdout and 1 <= n_test < len(rows):
            held = np.zeros(len(rows), bool)
            held[np.random.default_rng(self.seed + 1).choice(len(rows), n_test, replace=False)] = True
            rows, test = rows[~held], queries.take(rows[held])
        train = queries if len(rows) == queries.n_tokens else queries.take(rows)
        return train, test, queries.take(np.sort(np.concatenate([rows, extra]))) if len(extra) else None

    def _balance(self, qs: QuerySet | None, chosen_on: QuerySet | None) -> np.ndarray | None:
        """Per token row of ``qs``: the weight that gives its rows asked after the document the share
        they have among the rows the keys were chosen on (``chosen_on``: the method's
        ``after_share``, as far as there were such rows), whatever their number in ``qs`` (mean
        weight 1); None when the method draws every row alike or either set holds one kind only."""
        if qs is None or chosen_on is None or self.method.after_share(self.ratio) is None:
            return None
        share = float(np.mean(chosen_on.anchors < 0))
        late = qs.anchors < 0
        n, n_late = qs.n_tokens, int(late.sum())
        if not 0 < share < 1 or not 0 < n_late < n:
            return None
        return np.where(late, share * n / n_late, (1 - share) * n / (n - n_late))

    def _chunk_queries(self, queries: QuerySet | None, lo: int, hi: int) -> QuerySet | None:
        if queries is None or self.chunk_size is None or self.chunk_queries == "all":
            return queries
        own = queries.for_range(lo, hi)
        return own if own.n_tokens else queries

    def _budgets(self, snap: KVSnapshot, n_keys: int, calibration) -> np.ndarray:
        n_layers, n_head_kv = len(snap.keys), snap.keys[0].shape[1]
        heads = n_layers * n_head_kv
        per_head = max(1, int(round(n_keys / self.ratio)))
        total = per_head * heads
        cap = max(int(self.cap * n_keys), per_head, self.floor)
        props = self.budgets.proportions(snap.layer_ids, n_head_kv, calibration)
        return allocate(total, props, min(cap, n_keys), min(self.floor, per_head))
