"""Documents longer than the context: compact while ingesting (issue 12).

    doc = StreamedDocument.plan(model, text, settings, n_ctx=2048)   # tokenized, chunks planned
    run = doc.compact()                                             # ingest a chunk, compact it, ...

A chunk of the document is ingested on top of the cells that hold the chunks before it, already
compacted; its reference queries are taken (its own context-prefill queries, and the second-pass
sources - repeat-prefill, self-study, ... - run on the chunk alone in the room the context has
left), the chunk's cells are fitted at the settings' ratio against those queries, and the
compacted cache is written back before the next chunk comes.  The cells of earlier chunks keep
the bias they were fitted with (``Compactor.compact(bias=...)``); positions keep counting, so
the cache stands for every token of the document while holding only the context's worth of cells.
This is the paper's chunked compaction done online: each chunk is fitted with queries that see
the compacted past, not the original one.

Every chunk keeps its share of one budget over the whole document (``DocumentFacts``,
``kvlocal.am.budgets.chunk_budgets``): a method that keeps facts gives each chunk its own fact
keys and the rest by length, as a one-shot compaction would, instead of ``n / ratio`` per chunk,
which cut the facts of a chunk where they cluster (measured: bench/results/streaming_control.md).

``plan_chunks`` decides, before any decoding, how many chunks the document needs so that at
every step the compacted past + the chunk + the room its query passes need fit the context, and
refuses a ratio that cannot fit with the smallest ratio (and the smallest context) that would.
Positions past the model's training context are allowed with a ``LongContextWarning``: llama.cpp
applies RoPE there as everywhere, without scaling, and what the model does with them is its own
limit.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from tqdm import tqdm

from .am import DEFAULT_METHOD, CompactionReport, get_method
from .am.budgets import chunk_budgets
from .engine import binding
from .engine.capture import QueryCapture
from .engine.queries import QUERY_SOURCES, RecallProbes, SelfStudy, SelfStudyLong, collect_queries, prompt_room
from .engine.session import DocumentError, DocumentLayout, Session
from .errors import KvlocalError
from .kv.cache import CompactedCache, KVSnapshot, extend_origin, trace_origin
from .kv.queryset import QuerySet
from .pipeline import CompactionRun, CompactionSettings, IngestedDocument, compact_on_policy

MIN_CHUNK = 64  # document tokens per chunk, at the least
TEMPLATE_ROOM = 64  # a second pass's prompt around the chunk (chat template, instruction)
STREAM_CONTEXT = 8192  # the context a long document streams into when none is given (or the training one if smaller)

# cells a query source needs beyond the cache while it runs (in the scratch sequence), for a chunk of n tokens
# and turns of at most t cells (the longest user turn the sources write, templated: ``prompt_room``; a
# model whose tokenizer or template makes them longer than TEMPLATE_ROOM gets its own t)
SOURCE_ROOM = {
    "context-prefill": lambda n, t: 0,
    "repeat-prefill": lambda n, t: n + t,
    "kvzip": lambda n, t: min(n, 2000) + t + 16,
    "self-study": lambda n, t: 2 * (SelfStudy.max_new_tokens + t),  # a two-turn conversation
    "self-study-long": lambda n, t: 2 * (SelfStudyLong.max_new_tokens + t),
    "recall": lambda n, t: RecallProbes.max_new_tokens + t,
}


class LongContextWarning(UserWarning):
    """The document takes positions beyond the model's training context."""


def source_room(sources, n: int, turn: int = TEMPLATE_ROOM) -> int:
    """Scratch cells the query ``sources`` need for a chunk of ``n`` tokens (they run one after
    another), their user turns taking at most ``turn`` cells each."""
    return max([0] + [SOURCE_ROOM[QUERY_SOURCES.get(src).name](n, turn) for src in sources])


def turn_room(session: Session, sources) -> int:
    """The cells a plan leaves per user turn of ``sources`` in ``session``: TEMPLATE_ROOM, or more
    where this model's template and tokenizer make a turn longer."""
    return max(TEMPLATE_ROOM, prompt_room(session, sources))


def kept_cells(n: int, ratio: float) -> int:
    """Cells a chunk of ``n`` document tokens keeps at ``ratio`` with uniform budgets (``Compactor._budgets``)."""
    return max(1, int(round(n / ratio)))


@dataclass(frozen=True)
class ChunkPlan:
    """How a document of ``n_doc`` tokens streams through a context of ``n_ctx`` cells."""

    n_ctx: int
    bounds: tuple[tuple[int, int], ...]  # [lo, hi) offsets into the document, per chunk
    peak: int  # the most cells held at once (cache + chunk + a query pass's room)
    cells_after: int  # cells of the compacted document (template and recent window included)
    keys: tuple[int, ...] = ()  # keys per head each chunk keeps (its recent window aside)
    fact_shares: tuple[float, ...] | None = None  # the share of each chunk's keys facts take (None: no facts)

    @property
    def n_chunks(self) -> int:
        return len(self.bounds)


def _try(n_prefix: int, n_doc: int, n_suffix: int, n_ctx: int, ratio: float, sources, m: int,
         recent_window: int, facts: DocumentFacts | None = None, turn: int = TEMPLATE_ROOM) -> ChunkPlan | None:
    edges = np.linspace(0, n_doc, m + 1).round().astype(int)
    bounds = tuple((int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True))
    if any(hi - lo < min(MIN_CHUNK, n_doc) for lo, hi in bounds):
        return None
    whole = min(recent_window, bounds[-1][1] - bounds[-1][0])  # the last chunk's recent window stays whole
    fitted = [(lo, hi - (whole if i == m - 1 else 0)) for i, (lo, hi) in enumerate(bounds)]
    if facts is None:
        keys, shares = [kept_cells(hi - lo, ratio) for lo, hi in fitted], None
    else:
        keys, shares = facts.budgets(fitted, ratio)
    held, peak = n_prefix, 0
    for i, ((lo, hi), k) in enumerate(zip(bounds, keys, strict=True)):
        last = i == m - 1
        fresh = hi - lo + (n_suffix if last else 0)
        peak = max(peak, held + fresh + source_room(sources, hi - lo, turn))
        held += k + (whole if last else 0)
    if peak > n_ctx:
        return None
    return ChunkPlan(n_ctx, bounds, peak, held + n_suffix, tuple(keys), None if shares is None else tuple(shares))


@dataclass(frozen=True)
class DocumentFacts:
    """Where a document's facts are, and the share of the whole budget its method gives them: a
    streamed chunk's keys come from one budget over the document (``kvlocal.am.budgets.chunk_budgets``),
    so a chunk dense with facts keeps as many of them as a one-shot compaction would."""

    cumulative: np.ndarray  # fact tokens among the first i document tokens, i = 0..n_doc
    share: Callable[[int, int], float]  # (document keys, kept keys) -> the share facts may take
    lesser: np.ndarray | None = None  # the same for facts of a lower tier (names kept after every number)

    def budgets(self, fitted, ratio: float):
        sizes = [max(1, hi - lo) for lo, hi in fitted]

        def counts(cumulative):
            return [int(cumulative[hi] - cumulative[lo]) for lo, hi in fitted]

        first = [min(n, c) for n, c in zip(sizes, counts(self.cumulative), strict=True)]
        lesser = None if self.lesser is None else \
            [min(n - c, x) for n, c, x in zip(sizes, first, counts(self.lesser), strict=True)]
        n = sum(sizes)
        return chunk_budgets(sizes, first, ratio, self.share(n, kept_cells(n, ratio)), lesser=lesser)


def plan_chunks(n_prefix: int, n_doc: int, n_suffix: int, n_ctx: int, ratio: float, sources=(),
                recent_window: int = 0, facts: DocumentFacts | None = None, turn: int = TEMPLATE_ROOM) -> ChunkPlan:
    """The fewest equal chunks that stream the document through ``n_ctx`` cells at ``ratio``, or a
    ``DocumentError`` naming the smallest ratio (and context) that would work.  ``turn``: the
    cells one user turn of the query sources takes (``turn_room``)."""
    if n_doc < 1:
        raise DocumentError("the document is empty")

    def fewest(c, r):
        return _fewest(n_prefix, n_doc, n_suffix, c, r, sources, recent_window, facts, turn)

    plan = fewest(n_ctx, ratio)
    if plan is not None:
        return plan
    # what would work: the smallest ratio in this context, the smallest context at this ratio
    need_ratio = _smallest(lambda r: fewest(n_ctx, r) is not None, ratio, float(n_doc))
    need_ctx = _smallest(lambda c: fewest(int(c), ratio) is not None, n_ctx,
                         float(n_prefix + n_doc + n_suffix + source_room(sources, n_doc, turn) + 1))
    # the hint names a value that works: what fits is not monotone in the ratio (chunk counts and keys
    # per chunk are whole numbers), so the rounded value is checked, and the next ones tried
    if need_ratio is not None:
        need_ratio = _nice(lambda r: fewest(n_ctx, r) is not None, need_ratio, 10)
    if need_ctx is not None:
        need_ctx = _nice(lambda c: fewest(int(c), ratio) is not None, need_ctx, 1)
    hint = [f"a ratio of at least {_exact(need_ratio)}" if need_ratio is not None else None,
            f"a context of at least {int(need_ctx)} cells" if need_ctx is not None else None]
    raise DocumentError(f"a {n_doc}-token document does not fit a {n_ctx}-cell context at ratio {ratio:g} "
                        f"(the compacted chunks, the next chunk and its query passes "
                        f"({', '.join(sources) or 'none'}) must fit together); use "
                        + " or ".join(h for h in hint if h))


def _fewest(n_prefix, n_doc, n_suffix, n_ctx, ratio, sources, recent_window, facts=None,
            turn: int = TEMPLATE_ROOM) -> ChunkPlan | None:
    """The plan with the fewest chunks that fits, searched by doubling then bisection over the
    chunk count (fewer, larger chunks need more room at once), O(m log m) for m chunks."""
    def attempt(m):
        return _try(n_prefix, n_doc, n_suffix, n_ctx, ratio, sources, m, recent_window, facts, turn)

    m_max = max(1, n_doc // MIN_CHUNK)
    lo, hi = 0, 1  # attempt(lo) does not fit (0: none tried), attempt(hi) is the candidate
    plan = attempt(hi)
    while plan is None:
        if hi >= m_max:
            return None
        lo, hi = hi, min(2 * hi, m_max)
        plan = attempt(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p = attempt(mid)
        lo, hi, plan = (lo, mid, p) if p is not None else (mid, hi, plan)
    return plan


def _nice(ok, x: float, per_unit: int, tries: int = 200) -> float:
    """``x`` (for which ``ok`` holds) rounded up to 1 / ``per_unit``, or the next such value up for
    which ``ok`` holds; ``x`` itself if none of ``tries`` does."""
    k = math.ceil(x * per_unit - 1e-9)
    for i in range(tries):
        v = (k + i) / per_unit
        if ok(v):
            return v
    return x


def _exact(x: float) -> str:
    """``x`` written short, unless only its full spelling reads back as the same number."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def _smallest(ok, lo: float, hi: float) -> float | None:
    """The smallest x in (lo, hi] with ok(x) (ok monotone), to 1 % or 1 unit; None if ok(hi) fails."""
    if not ok(hi):
        return None
    for _ in range(40):
        if hi - lo <= max(1.0, 0.01 * hi):
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def streams(model: binding.Model, n_doc: int, n_ctx: int | None) -> bool:
    """Must a document of ``n_doc`` tokens be compacted while it is ingested?  With ``n_ctx``
    given: when it does not fit it once; otherwise when the training context cannot hold it beside
    the query passes of the default method (a method needing more room streams when it compacts:
    ``one_shot_fits``)."""
    if n_ctx is not None:
        return n_doc + TEMPLATE_ROOM > n_ctx
    return n_doc + TEMPLATE_ROOM + source_room(get_method(DEFAULT_METHOD).queries, n_doc) > model.n_ctx_train


def one_shot_fits(doc: IngestedDocument, settings: CompactionSettings) -> bool:
    """Do the query passes ``settings`` need fit beside the document ingested whole?"""
    sources = settings.fit_sources
    return doc.layout.length + source_room(sources, doc.layout.n_doc, turn_room(doc.session, sources)) \
        <= doc.session.n_ctx


def stream_context(model: binding.Model, n_ctx: int | None) -> int:
    return n_ctx if n_ctx is not None else min(model.n_ctx_train, STREAM_CONTEXT)


@dataclass
class StreamedDocument:
    """A document compacted chunk by chunk while it is ingested, in a context smaller than it."""

    session: Session
    layout: DocumentLayout  # logical positions of the whole document
    tokens: tuple  # (prefix, doc, suffix) token arrays
    snapshot: KVSnapshot | None = None  # the cells after the last chunk was ingested, before it was compacted
    ingest_s: float = 0.0
    per_cell_bytes: int = 0
    reports: list = field(default_factory=list)
    _facts: dict = field(default_factory=dict, repr=False)  # a method's selector (repr) -> its fact ranks

    @classmethod
    def open(cls, model: binding.Model, text: str, *, system: str | None = None, n_ctx: int | None = None,
             threads: int | None = None, progress: bool = True) -> StreamedDocument:
        """Tokenize ``text`` into a session of ``n_ctx`` cells (default ``STREAM_CONTEXT`` or the
        training context if smaller); nothing is decoded until ``compact``."""
        s = Session(model, n_ctx=stream_context(model, n_ctx), n_threads=threads, capture=True, progress=progress)
        try:
            prefix, doc, suffix = s.document_tokens(text, system)
        except BaseException:
            s.close()
            raise
        n = len(prefix) + len(doc)
        layout = DocumentLayout(len(prefix), n, n + len(suffix))
        if layout.length > model.n_ctx_train:
            warnings.warn(f"the document takes positions up to {layout.length}, beyond the {model.n_ctx_train} "
                          f"{model.path.name} was trained for: llama.cpp applies RoPE there unscaled, and "
                          "what the model makes of it is its own limit", LongContextWarning, stacklevel=2)
        return cls(s, layout, (prefix, doc, suffix))

    def plan(self, settings: CompactionSettings) -> ChunkPlan:
        """The chunks ``settings`` need in this context; every refusal comes here, before decoding."""
        if settings.budgets != "uniform":
            raise KvlocalError("a document longer than the context compacts with uniform budgets only "
                               "(unequal heads would need cells the plan cannot promise)")
        if "kvzip" in [QUERY_SOURCES.get(src).name for src in settings.sources]:
            raise KvlocalError("kvzip scoring needs the uncompacted document: it cannot run on a document "
                               "longer than the context (choose another query source or method)")
        prefix, doc, suffix = self.tokens
        method = get_method(settings.method)
        facts = None
        if method.uses_facts:
            ranks = self.fact_ranks(method)[len(prefix):len(prefix) + len(doc)]
            numbers = method.number_facts(ranks)  # the rest (names) only after every number
            facts = DocumentFacts(np.concatenate([[0], np.cumsum(numbers)]), method.fact_budget_share,
                                  np.concatenate([[0], np.cumsum((ranks > 0) & ~numbers)]))
        return plan_chunks(len(prefix), len(doc), len(suffix), self.session.n_ctx, settings.ratio,
                           settings.fit_sources, settings.recent_window, facts,
                           turn_room(self.session, settings.fit_sources))

    def fact_ranks(self, method) -> np.ndarray:
        """The method's fact ranks over every position (prefix, document, suffix), computed once."""
        key = repr(method.selector)
        if key not in self._facts:
            pieces = [self.session.model.detokenize([int(t)]) for t in np.concatenate(self.tokens)]
            self._facts[key] = method.fact_ranks(pieces)
        return self._facts[key]

    @property
    def full_kv_bytes(self) -> int:
        """What the whole document's cache would take (it is never held)."""
        return self.per_cell_bytes * self.layout.length

    @property
    def kv_bytes_per_cell(self) -> int:
        return self.per_cell_bytes

    @property
    def streamed_chunks(self) -> int:
        return len(self.reports)

    def compact(self, st: CompactionSettings, progress=None) -> CompactionRun:  # noqa: ARG002 (tokens, not layers)
        """Ingest and compact chunk by chunk; the session ends holding the compacted document.
        Compacting again starts over from the text (the whole cache was never held)."""
        plan = self.plan(st)
        s = self.session
        s.clear()
        self.reports, self.ingest_s = [], 0.0
        method = get_method(st.method)
        sources = st.fit_sources
        prefix, doc, suffix = self.tokens
        facts = self.fact_ranks(method) if method.uses_facts else None
        queries_s = fit_s = 0.0
        notes: Counter = Counter()
        cache = previous = None
        t_ingest = time.perf_counter()
        if len(prefix):
            s.ingest(prefix, desc="ingest")
        self.ingest_s += time.perf_counter() - t_ingest
        d0 = self.layout.doc_start
        bar = tqdm(total=len(doc), desc="ingest+compact", unit="tok", unit_scale=True, disable=not s.progress)
        with bar:
            for i, (lo, hi) in enumerate(plan.bounds):
                last = i == plan.n_chunks - 1
                fresh = np.concatenate([doc[lo:hi], suffix]) if last else doc[lo:hi]
                t0 = time.perf_counter()
                capture = QueryCapture(s.info, source="context-prefill")
                quiet, s.progress = s.progress, False
                try:
                    with s.capturing(capture):
                        s.ingest(fresh, desc="ingest")
                finally:
                    s.progress = quiet
                self.ingest_s += time.perf_counter() - t0
                own = capture.result()
                own.anchors[: hi - lo] = own.positions[: hi - lo]
                chunk = DocumentLayout(d0 + lo, d0 + hi, s.n_past)
                snap = s.snapshot()
                if not self.per_cell_bytes:
                    self.per_cell_bytes = snap.kv_bytes // snap.n_cells
                bias = s.bias() if cache is not None else None
                t0 = time.perf_counter()
                qs = self._queries(chunk, sources, own)
                queries_s += time.perf_counter() - t0
                c = _chunk_compactor(st, hi - lo, plan.keys[i], None if plan.fact_shares is None else plan.fact_shares[i],
                                     last)
                if method.stages > 1 and sources:
                    cache, report, more_s = compact_on_policy(s, chunk, snap, c, sources, method.stages, first=qs,
                                                              facts=facts, bias=bias)
                    queries_s += more_s
                else:
                    cache, report = c.compact(snap, chunk.doc_start, chunk.doc_end, qs, bias=bias, facts=facts)
                if bias is not None:  # earlier chunks passed through as protected cells: keep their origin
                    cache.origin = trace_origin(cache.origin, snap.positions,
                                                extend_origin(previous.origin, snap.positions))
                previous = cache
                fit_s += report.seconds
                notes.update(report.notes)
                report.results = {}  # not kept: a long document's fits would pile up
                self.reports.append(report)
                s.inject(cache, snap)
                self.snapshot = snap
                bar.update(hi - lo)
                bar.set_postfix(chunk=f"{i + 1}/{plan.n_chunks}", cells=cache.n_cells)
        return CompactionRun(cache, self._merged(cache, notes, st.ratio), st, tuple(sources), queries_s, fit_s)

    def _queries(self, chunk: DocumentLayout, sources, own: QuerySet) -> QuerySet:
        """The chunk's reference queries: its own context-prefill ones (captured while it was
        ingested) and the second-pass sources run on it."""
        names = [QUERY_SOURCES.get(src).name for src in sources]
        if not names:
            return own  # methods without queries: they score the held-out error
        parts = [own if n == "context-prefill" else collect_queries(self.session, chunk, [n]) for n in names]
        return QuerySet.concat(parts)

    def _merged(self, cache: CompactedCache, notes: Counter, ratio: float) -> CompactionReport:
        """One report for all chunks: document cells and kept keys summed, per-layer held-out errors
        averaged over the chunks."""
        rs = self.reports
        errors: dict = {}
        for r in rs:
            for il, e in r.layer_errors.items():
                acc = errors.setdefault(il, {"output_rel_l2": 0.0, "mass_err": 0.0, "n": 0})
                acc["output_rel_l2"] += e["output_rel_l2"]
                acc["mass_err"] += e["mass_err"]
                acc["n"] += 1
        for e in errors.values():
            n = e.pop("n")
            e["output_rel_l2"] /= n
            e["mass_err"] /= n
        out = CompactionReport(rs[-1].method, ratio, sum(r.n_document for r in rs), cache.n_cells,
                               sum(r.kept_keys for r in rs), rs[-1].heads, sum(r.chunks for r in rs),
                               cache.padding_fraction, sum(r.seconds for r in rs), dict(notes),
                               dict(sorted(errors.items())), [b for r in rs for b in r.budgets])
        return out

    def close(self) -> None:
        self.session.close()


def _chunk_compactor(settings: CompactionSettings, n: int, keys: int, fact_share: float | None, last: bool):
    """The compactor of one chunk of ``n`` tokens keeping ``keys`` per head (the plan's share of the
    document's budget) with facts taking ``fact_share`` of them; the recent window is the end of
    the document, so only the last chunk keeps it (and the method's recent share, if it has one)."""
    window = settings.recent_window if last else 0
    fitted = n - min(window, n)
    ratio = settings.ratio if fitted < 2 or keys == kept_cells(fitted, settings.ratio) else fitted / keys
    c = replace(settings, ratio=ratio, recent_window=window).compactor()
    if fact_share is not None:
        c.method = c.method.with_fact_share(fact_share)
    if not last:  # the document's last keys are in the last chunk; an earlier chunk's end is not recent
        c.method = c.method.with_recent(0.0)
    return c
