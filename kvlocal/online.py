"""Chats that compact themselves when the context fills (issue 12).

A conversation on a (compacted) document grows one cell per token.  With ``OnlineSettings`` a
conversation (``Compaction`` after ``compact``, or a ``CompactedSession``) captures the queries
of every token it decodes, and when the next token would not fit ``max_context`` cells, it
compacts the older part of itself: the cells between the end of the document and the last
``keep_recent`` tokens, with the queries it captured, at ``ratio`` - cells compacted before
included, their bias under the new fit (re-compaction).  Queries are not saved with a session:
after a reload the first tokens go into the context's spare cells (``chat_budget``) until this
conversation has queries to fit against, so ``max_context`` may be passed by that much once.  The document and the recent tokens stay
as they are; generation goes on where it was, mid-answer if need be (the paper halves the cache
of one AIME solution up to six times this way).  Each compaction leaves an ``OnlineRecord``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .am import ONLINE_METHOD, Compactor, get_method
from .am.facts import as_fact_ranks
from .engine.capture import QueryCapture
from .engine.session import Session
from .errors import ContextFullError, KvlocalError
from .kv.cache import CompactedCache, extend_origin, trace_origin
from .kv.queryset import QuerySet


@dataclass(frozen=True)
class OnlineSettings:
    """When and how a conversation compacts itself."""

    max_context: int | None = None  # cells the conversation may hold (None: the session's context)
    ratio: float = 2.0  # of the compacted region: each compaction halves the older conversation, as in the paper
    method: str = ONLINE_METHOD  # not the document's default: see kvlocal.am.methods.ONLINE_METHOD
    keep_recent: int = 256  # last tokens never compacted
    max_queries_per_head: int | None = 4096
    keep_queries: int = 4096  # tokens whose queries are kept for the next compaction (memory bound)
    seed: int = 0

    def __post_init__(self):
        if self.max_context is not None and self.max_context < 2 * self.keep_recent:
            raise KvlocalError(f"max_context ({self.max_context}) must hold at least twice keep_recent "
                               f"({self.keep_recent})")
        if self.keep_recent < 1 or self.keep_queries < 1:
            raise KvlocalError("keep_recent and keep_queries must be at least 1")
        self.compactor()  # method and ratio checked now

    def compactor(self) -> Compactor:
        return Compactor(self.method, ratio=self.ratio, max_queries_per_head=self.max_queries_per_head,
                         holdout=0.1, seed=self.seed)


@dataclass
class OnlineRecord:
    """One compaction of a conversation."""

    at_position: int  # the logical length when it ran
    region: tuple[int, int]  # positions compacted
    cells_before: int
    cells_after: int
    method: str
    ratio: float
    heldout_output_rel_l2: float | None
    heldout_mass_err: float | None
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChatCompactor:
    """The online compaction of one conversation; ``start``: the first position it may compact
    (the end of the document)."""

    settings: OnlineSettings
    start: int
    records: list[OnlineRecord] = field(default_factory=list)
    _capture: QueryCapture | None = None

    def limit(self, session: Session) -> int:
        n = self.settings.max_context or session.n_ctx
        if n > session.n_ctx:
            raise KvlocalError(f"max_context {n} is larger than the session's context ({session.n_ctx} cells)")
        return n

    def capture(self, session: Session) -> QueryCapture:
        """The capture that records the conversation's queries (use with ``session.capturing``)."""
        if session.tap is None:
            raise KvlocalError("online compaction needs a session opened with capture=True")
        if self._capture is None:
            self._capture = QueryCapture(session.info, source="context-prefill")
        return self._capture

    def queries(self) -> QuerySet | None:
        """Every query captured so far (the capture keeps running)."""
        if self._capture is None:
            return None
        q = self._capture.result()
        return q if q.n_tokens else None

    def ensure(self, session: Session, n: int, token_texts, origin: list[np.ndarray] | None):
        """Make room for ``n`` more cells, compacting if needed.  ``token_texts(lo)``: the text of
        each token from position ``lo`` on; ``origin``: what the session's first cells hold (the
        last injected cache's origin; cells after it are whole).  Returns the origin of the cells
        after a compaction, None when there was room."""
        limit = self.limit(session)
        if session.cells[0] + n <= limit:
            return None
        st = self.settings
        method = get_method(st.method)
        queries = self.queries()
        if method.needs_queries and queries is None:
            # the first tokens after a reload: nothing of this conversation has been decoded yet to
            # fit against, so they go into the context's spare cells and compaction waits for them
            if session.cells[0] + n <= session.n_ctx:
                return None
            raise ContextFullError(f"online compaction with {method.name} needs queries of the conversation and "
                               f"none were decoded yet; the context ({session.n_ctx} cells) is full")
        lo, hi = self.start, session.n_past - st.keep_recent
        snap = session.snapshot()
        region = int(((snap.positions >= lo) & (snap.positions < hi)).sum())
        after = snap.n_cells - region + max(1, int(round(region / st.ratio)))
        if region < 2 or after + n > limit:
            raise ContextFullError(
                f"the conversation fills the context ({session.cells[0]} of {limit} cells) and compacting its "
                f"older part ({region} cells at {st.ratio:g}x) would not make room for {n} more: raise "
                f"max_context, lower keep_recent ({st.keep_recent}) or raise the ratio")
        t0 = time.perf_counter()
        bias = session.bias()
        held = extend_origin(origin, snap.positions)
        facts = None
        if method.uses_facts:
            facts = cell_facts(method.fact_ranks(token_texts(lo)), lo, snap.positions, held, session.n_past)
        cache, report = st.compactor().compact(snap, lo, hi, queries, bias=bias, facts=facts)
        cache.origin = trace_origin(cache.origin, snap.positions, held)
        session.inject(cache, snap)
        if self._capture is not None:
            self._capture.keep_last(st.keep_queries)
        self.records.append(OnlineRecord(int(snap.logical_length), (lo, hi), snap.n_cells, cache.n_cells,
                                         method.name, st.ratio, report.mean_error("output_rel_l2"),
                                         report.mean_error("mass_err"), time.perf_counter() - t0))
        return cache.origin


def cell_facts(mask: np.ndarray, lo: int, positions: np.ndarray, held: list[np.ndarray], n_past: int) -> np.ndarray:
    """Per position (as the compactor reads it: by each cell's position), the fact rank of the
    cell (0: no fact).  ``mask``: the fact ranks (or a bool mask) of the conversation's tokens from
    position ``lo`` on.  A whole cell holds its own token; a cell of an earlier compaction holds a
    fact only if it was kept verbatim as one - the same original key in every layer and head (a
    fitted cell mixes heads) - and that key is a fact token; its position, spread over the
    compacted range, says nothing."""
    ranks = as_fact_ranks(mask)
    facts = np.zeros(n_past, np.uint8)
    o = np.stack(held)  # [layers, cells, heads]
    src = o[0, :, 0]
    same = (o == src[None, :, None]).all(axis=(0, 2)) & (src >= lo) & (src < lo + len(mask))
    facts[positions[same]] = ranks[src[same] - lo]
    return facts


def current_cache(session: Session, origin: list[np.ndarray]):
    """The session's sequence 0 as a compacted cache and the snapshot it came from (to save a
    conversation that compacted itself)."""
    snap = session.snapshot()
    return CompactedCache(snap.positions.copy(), [k.copy() for k in snap.keys], [v.copy() for v in snap.values],
                          session.bias(), snap.logical_length, origin=extend_origin(origin, snap.positions)), snap
