"""On-policy reference queries (Attention Matching, Zweiger et al. 2026, §"on-policy"): a layer's
queries are taken with the layers below it already compacted, so every layer is fitted to the
queries it will actually see after compaction.

The paper re-extracts queries once per layer.  That is one query pass per layer (30 on
SmolLM2), so kvlocal does it in ``stages`` groups of consecutive layers: stage 0 is fitted on
queries of the original cache; before stage s, the cache holding stages 0..s-1 compacted and the
other layers whole (``Compactor.compact(whole_layers=...)``) is injected and the query sources run
again through it.  Each stage costs one more pass of the query sources.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .am import Compactor
from .kvcache import CompactedCache, KVSnapshot
from .queries import collect_queries
from .queryset import QuerySet
from .session import DocumentLayout, Session


def stage_layers(n_layers: int, stages: int) -> list[list[int]]:
    """Consecutive groups of base-layer indices, as equal as can be, bottom first."""
    if stages < 1:
        raise ValueError("on-policy compaction needs at least one stage")
    return [g.tolist() for g in np.array_split(np.arange(n_layers), min(stages, n_layers))]


def compact_on_policy(session: Session, layout: DocumentLayout, snap: KVSnapshot, compactor: Compactor,
                      sources: Sequence[str], stages: int, first: QuerySet | None = None,
                      facts: np.ndarray | None = None) -> tuple[CompactedCache, object, float]:
    """Compact ``snap`` (the session's uncompacted document) in ``stages`` on-policy stages.

    ``first``: queries of the original cache if the caller has them already.  Returns the final
    cache (to inject, as after ``Compactor.compact``; the session holds the last stage's mixed
    cache until then), the report of the last stage (kept keys, budgets and the held-out errors of
    every layer) and the seconds spent collecting queries."""
    groups = stage_layers(len(snap.keys), stages)
    given: dict = {}
    errors: dict = {}
    query_s, fit_s = 0.0, 0.0
    cache = report = None
    for i, group in enumerate(groups):
        t0 = time.perf_counter()
        queries = first if (i == 0 and first is not None) else collect_queries(session, layout, sources)
        query_s += time.perf_counter() - t0
        later = [li for g in groups[i + 1:] for li in g]
        cache, report = compactor.compact(snap, layout.doc_start, layout.doc_end, queries, facts=facts,
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
