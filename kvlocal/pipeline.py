"""One compaction pipeline, for the API and the evaluation alike.

    doc = IngestedDocument.ingest(model, text)           # ingest (context-prefill queries captured)
    run = doc.compact(CompactionSettings(ratio=10))      # reference queries (cached per source),
                                                         # facts, on-policy stages, fit, inject

``CompactionSettings`` are checked when they are made, before any ingestion or query pass.  One
context-size rule (``context_size``) leaves room for the document twice (repeat-prefill) and the
prompts around it.

On-policy reference queries (Attention Matching, Zweiger et al. 2026, §"on-policy"): a layer's
queries are taken with the layers below it already compacted, so every layer is fitted to the
queries it will actually see after compaction.  The paper re-extracts queries once per layer.
That is one query pass per layer (30 on SmolLM2), so kvlocal does it in ``stages`` groups of
consecutive layers: stage 0 is fitted on queries of the original cache; before stage s, the cache
holding stages 0..s-1 compacted and the other layers whole (``Compactor.compact(whole_layers=...)``)
is injected and the query sources run again through it: repeat-prefill as before, the sampling
sources (self-study) on the very tokens they sampled for stage 0, teacher-forced
(``QuerySource.replay``), as the paper's code prefills its stored self-study sequences again.
Each stage costs one more prefill of the query sources' tokens, not a new generation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .am import DEFAULT_METHOD, Compactor, CompactionReport, JsonBudget, get_method
from .engine import binding
from .engine.queries import QUERY_SOURCES, collect_queries
from .engine.session import DocumentError, DocumentLayout, Session
from .errors import KvlocalError
from .kv.cache import CompactedCache, KVSnapshot
from .kv.queryset import QuerySet

# tokens beside the document twice: template, system prompt, repeat prompt, self-study and questions
REPEAT_MARGIN = 1400


def pad(n: int, to: int = 256) -> int:
    return -(-n // to) * to


def context_size(model: binding.Model, n_doc: int) -> int:
    """The context a document of ``n_doc`` tokens is ingested into: room for a repeat-prefill of it
    and the prompts around it, within the model's training context."""
    return min(model.n_ctx_train, pad(2 * n_doc + REPEAT_MARGIN))


def budget_policy(spec: str):
    """A head-budget policy from its CLI/API spelling: a policy name or a JSON file."""
    if spec in ("uniform", "sensitivity"):
        return spec
    if Path(spec).is_file():
        return JsonBudget(spec)
    raise KvlocalError(f"budgets must be 'uniform', 'sensitivity' or a JSON file, not {spec!r}")


@dataclass(frozen=True)
class CompactionSettings:
    """How to compact, checked once when made (unknown method, query source or budget policy, a
    ratio <= 1, ... raise ``KvlocalError`` before any work)."""

    ratio: float = 10.0
    method: str = DEFAULT_METHOD
    queries: tuple[str, ...] | None = None  # None: the sources the method was designed for
    budgets: str = "uniform"
    recent_window: int = 0
    chunk_size: int | None = None
    max_queries_per_head: int | None = 4096
    holdout: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.queries, str):
            object.__setattr__(self, "queries", tuple(x for x in self.queries.split(",") if x))
        elif self.queries is not None:
            object.__setattr__(self, "queries", tuple(self.queries))
        self.compactor()  # the compactor checks method, ratio, budgets, windows and hold-out
        names = [QUERY_SOURCES.get(src).name for src in self.sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise KvlocalError(f"query source {', '.join(twice)} named twice in {','.join(self.sources)}")

    @property
    def sources(self) -> tuple[str, ...]:
        return self.queries if self.queries is not None else tuple(get_method(self.method).queries)

    @property
    def fit_sources(self) -> tuple[str, ...]:
        """The sources the fit runs: none for a method that needs no queries."""
        return self.sources if get_method(self.method).needs_queries else ()

    def compactor(self) -> Compactor:
        return Compactor(self.method, ratio=self.ratio, budgets=budget_policy(self.budgets),
                         recent_window=self.recent_window, chunk_size=self.chunk_size,
                         max_queries_per_head=self.max_queries_per_head, holdout=self.holdout, seed=self.seed)


@dataclass
class CompactionRun:
    """What one compaction produced (the cache is in the session already)."""

    cache: CompactedCache
    report: CompactionReport
    settings: CompactionSettings
    sources: tuple[str, ...]  # the query sources the fit used (none for methods that need none)
    queries_s: float  # collecting those sources (when first collected) plus on-policy passes
    fit_s: float


@dataclass
class CompactionSummary:
    """What ``Compaction.compact`` did (also saved, with the timings, in the session file)."""

    method: str
    ratio: float
    queries: list[str]
    budgets: str
    tokens_before: int
    cells_after: int
    document_tokens: int
    effective_ratio: float
    padding_fraction: float
    kv_bytes_before: int
    kv_bytes_after: int
    fallbacks: dict
    chunks: int
    heldout_output_rel_l2: float | None
    heldout_mass_err: float | None
    layer_errors: dict
    streamed_chunks: int = 0  # > 0: ingested and compacted in this many chunks (longer than the context)

    @classmethod
    def of(cls, run: CompactionRun, doc: IngestedDocument) -> CompactionSummary:
        """The summary of ``run`` on ``doc`` (the bytes after compaction count cells, padding included)."""
        report, per_cell = run.report, doc.kv_bytes_per_cell
        return cls(report.method, float(report.ratio), list(run.settings.sources), str(run.settings.budgets),
                   doc.layout.length, report.n_cells, report.n_document, report.effective_ratio,
                   report.padding_fraction, doc.full_kv_bytes, per_cell * report.n_cells, dict(report.notes),
                   report.chunks, report.mean_error("output_rel_l2"), report.mean_error("mass_err"),
                   {str(k): v for k, v in report.layer_errors.items()}, doc.streamed_chunks)


@dataclass
class IngestedDocument:
    """A document ingested into its own session, with its full cache kept to compact from."""

    session: Session
    layout: DocumentLayout
    snapshot: KVSnapshot
    blob: bytes  # the full cache's state: every compaction starts from it
    ingest_s: float
    _queries: dict = field(default_factory=dict)  # canonical source name -> QuerySet
    query_s: dict = field(default_factory=dict)  # canonical source name -> seconds to collect

    @classmethod
    def ingest(cls, model: binding.Model, text: str, *, system: str | None = None, n_ctx: int | None = None,
               threads: int | None = None, progress: bool = True) -> IngestedDocument:
        if not text or not text.strip():
            raise DocumentError("the document is empty")
        n_doc = len(model.tokenize(text, add_special=False))
        if n_doc + 64 > model.n_ctx_train:
            raise DocumentError(f"the document has {n_doc} tokens but {model.path.name} works with at most "
                                f"{model.n_ctx_train}: split the document and compact the parts as separate sessions")
        s = Session(model, n_ctx=n_ctx or context_size(model, n_doc), n_threads=threads, capture=True,
                    progress=progress)
        try:
            t0 = time.perf_counter()
            layout = s.ingest_document(text, system=system, capture_queries=True)
            ingest_s = time.perf_counter() - t0
            doc = cls(s, layout, s.snapshot(), s.state(), ingest_s)
        except BaseException:
            s.close()
            raise
        doc._queries["context-prefill"], doc.query_s["context-prefill"] = s.context_queries, 0.0
        return doc

    @property
    def full_kv_bytes(self) -> int:
        return self.snapshot.kv_bytes

    @property
    def kv_bytes_per_cell(self) -> int:
        return self.full_kv_bytes // max(self.snapshot.n_cells, 1)

    streamed_chunks = 0  # ingested whole

    def restore(self) -> None:
        """Back to the full cache (the conversation on top of a compaction is dropped)."""
        self.session.restore(self.blob)

    def queries(self, sources: Sequence[str]) -> QuerySet | None:
        """Reference queries of ``sources`` from the full cache, each source collected once."""
        names = [QUERY_SOURCES.get(src).name for src in sources]
        missing = {name: src for src, name in zip(sources, names, strict=True) if name not in self._queries}
        if missing:  # query sources leave the cache as they find it: one restore serves them all
            self.restore()
        for name, src in missing.items():
            t0 = time.perf_counter()
            self._queries[name] = collect_queries(self.session, self.layout, [src])
            self.query_s[name] = time.perf_counter() - t0
        return QuerySet.concat([self._queries[n] for n in names]) if names else None

    def compact(self, settings: CompactionSettings, progress=None) -> CompactionRun:
        """Compact the full cache as ``settings`` say and inject the result into the session."""
        compactor = settings.compactor()
        method = compactor.method
        n_doc = min(self.layout.doc_end, self.layout.length - settings.recent_window) - self.layout.doc_start
        if n_doc / settings.ratio < 1:
            raise KvlocalError(f"ratio {settings.ratio} leaves less than one key per head of a {n_doc}-token document")
        # methods without queries ignore them for selection; context-prefill queries still score
        # the held-out attention error
        sources = settings.fit_sources
        qs = self.queries(sources or ("context-prefill",))
        query_s = sum(self.query_s[QUERY_SOURCES.get(src).name] for src in sources)
        s = self.session
        facts = method.fact_ranks(s.token_texts(self.layout.length)) if method.uses_facts else None
        if method.stages > 1 and sources:  # on-policy: the sources run again through each compacted stage
            cache, report, more_s = compact_on_policy(s, self.layout, self.snapshot, compactor, sources,
                                                      method.stages, first=qs, facts=facts)
            query_s += more_s
        else:
            cache, report = compactor.compact(self.snapshot, self.layout.doc_start, self.layout.doc_end, qs,
                                              progress=progress, facts=facts)
        s.inject(cache, self.snapshot)
        return CompactionRun(cache, report, settings, tuple(sources), query_s, report.seconds)

    def close(self) -> None:
        self.session.close()


def stage_layers(n_layers: int, stages: int) -> list[list[int]]:
    """Consecutive groups of base-layer indices, as equal as can be, bottom first."""
    if stages < 1:
        raise ValueError("on-policy compaction needs at least one stage")
    return [g.tolist() for g in np.array_split(np.arange(n_layers), min(stages, n_layers))]


def compact_on_policy(session: Session, layout: DocumentLayout, snap: KVSnapshot, compactor: Compactor,
                      sources: Sequence[str], stages: int, first: QuerySet | None = None,
                      facts: np.ndarray | None = None,
                      bias: list[np.ndarray] | None = None) -> tuple[CompactedCache, object, float]:
    """Compact ``snap`` (the session's uncompacted document) in ``stages`` on-policy stages.

    ``first``: queries of the original cache if the caller has them already.  Returns the final
    cache (to inject, as after ``Compactor.compact``; the session holds the last stage's mixed
    cache until then), the report of the last stage (kept keys, budgets and the held-out errors of
    every layer) and the seconds spent collecting queries.  ``bias``: what the cells carry already
    (a document streamed in chunks: the compacted chunks before this one)."""
    groups = stage_layers(len(snap.keys), stages)
    given: dict = {}
    errors: dict = {}
    query_s, fit_s = 0.0, 0.0
    cache = report = None
    for i, group in enumerate(groups):
        t0 = time.perf_counter()
        if i == 0:
            queries = first if first is not None else collect_queries(session, layout, sources)
            first = queries
        else:  # the same tokens again, through the stages below: row i stays the same token
            queries = collect_queries(session, layout, sources, replay=first)
        query_s += time.perf_counter() - t0
        later = [li for g in groups[i + 1:] for li in g]
        cache, report = compactor.compact(snap, layout.doc_start, layout.doc_end, queries, bias=bias, facts=facts,
                                          whole_layers=later, given=given)
        fit_s += report.seconds
        given.update(report.results)
        errors.update({il: e for il, e in report.layer_errors.items()
                       if snap.layer_ids.index(il) in group})
        if later:  # the next stage's queries are taken through this one
            session.inject(cache, snap)
    report.layer_errors = dict(sorted(errors.items()))
    report.seconds = fit_s
    report.notes["on-policy stages"] = len(groups)
    return cache, report, query_s
