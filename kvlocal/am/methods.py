"""Methods by name: a method is a key selector, a beta fitter and a value fitter.

    am-highest        HighestAttnKeys (rms) + box NNLS (clamped LS + 2 PG steps, beta in [-3, 3]) + LS values
    am-highest-exact  the same with exact box NNLS (BVLS)
    am-omp            OMP (1 key per step, refit every step, beta <= 7, drop beta < -7) + LS values
    am-omp-fast       OMP (4 keys per step, refit every 2nd step) + LS values
    am-omp-prog       OMP with the progressive schedule (1/1 to 300 keys, 2/2 to 1500, then 4/2)
    am-facts          every sentence holding a number kept verbatim in every head (beta 0, original values),
                      up to the whole budget at ratios <= 5, up to 5/ratio of it beyond; the rest of each head:
                      HighestAttnKeys (rms), beta and values fitted around the facts (box NNLS, least squares
                      anchored to V[S])
    am-facts-kvzip    am-facts with KVzip's scores (chunked repeats) ranking the facts and each head's other keys
    am-facts-omp-near am-facts-omp keeping facts that do not all fit numbers first, then their
                      sentences outward from them, token by token (fact ranks, kvlocal.am.facts.fact_ranks)
                      instead of by attention, which does not find them (the default before am-facts-omp-names)
    am-facts-omp-names
                      am-facts-omp-near with names as facts too: a name mentioned at most twice (and never
                      written in lower case) is kept with its sentence, outward from it, after every number
                      and its sentence, and only while the facts hold less than half of a head's budget (the
                      numbers keep their whole share; the rest stays fitted) (the default before
                      am-facts-omp-whole)
    am-facts-omp-whole
                      am-facts-omp-names keeping whole numbers when the numbers do not all fit with their 3
                      nearest tokens: each number with those tokens, the most number tokens first, and none
                      in part (kvlocal.am.spans.whole_units) (the default before am-facts-omp-half)
    am-facts-omp-half
                      am-facts-omp-whole with the facts taking at most half of a head's budget:
                      half up to 10x (not the whole budget up to 5x), then 0.5 sqrt(10/ratio) of it (not
                      5/ratio), so that the fitted keys keep half at low ratios and a whole number still
                      fits at 50x (bench/results/fact_budget.md) (the default before am-facts-omp-balanced)
    am-facts-omp-balanced
                      am-facts-omp-half fitted on query rows half of which are the queries asked after the
                      document (self-study), half the repeat rows that read it (drawn alike from all rows, a
                      fifth were self-study); more retention on held-out articles at 10-20x, lower KL at 5-20x,
                      fewer name needles at 10x (bench/results/after_document.md) (the default before
                      am-facts-omp-cores-balanced; a chat's default, ONLINE_METHOD)
    am-facts-omp-balanced-loose
                      am-facts-omp-balanced with the default's AnchoredValues(0.1): ties it in chats that
                      compact themselves (bench/results/online_chats_loose.md); not adopted
    am-facts-omp-recent
                      am-facts-omp-half with a tenth of each head's budget on the region's last keys (after
                      the facts): more retention on the grid's articles, not on held-out ones (measured, not
                      adopted; bench/results/after_document.md)
    am-facts-omp-cores
                      am-facts-omp-half keeping every fact's core first: each number, then each rare name,
                      with its 3 nearest tokens, before the rest of any sentence (SharedSpans.fact_cores);
                      more names and a lower KL, less retention at 5x (bench/results/fact_cores.md)
    am-facts-omp-cores-balanced
                      am-facts-omp-cores fitted on am-facts-omp-balanced's query rows: the gist fitted to
                      what is asked after the document, every number's and rare name's core kept verbatim;
                      more names and numbers than am-facts-omp-balanced, as much retention over nine
                      articles (bench/results/after_document.md, cores_balanced_needles*.md) (the default
                      before am-facts-omp-cores-loose)
    am-facts-omp-cores-fixed
                      am-facts-omp-cores-balanced with the facts keeping below 10x as many keys as at
                      10x (SharedSpans.fact_fixed), the rest fitted; the same method from 10x on.  At
                      5x more retention and a lower KL, as many number needles, far fewer name needles
                      (bench/results/fixed_facts.md, fixed_facts_needles*.md)
    am-facts-omp-cores-fixed-tails
                      am-facts-omp-cores-balanced with every fact's core within the facts' share as before
                      and the rest of their sentences, below 10x, only up to what the facts hold at 10x
                      (at 5x about the default: the cores fill most of the share)
    am-facts-omp-cores-content
                      am-facts-omp-cores-balanced with a number's sentence ranked by content words from the
                      number (SharedSpans.fact_content): its core reaches 3 content steps - the nearest word
                      on each side whole, the function words next to it, then the next word ("number ...
                      teapot is 2215279.", where 3 tokens cut "teapot" in half).  As many number needles,
                      fewer name needles (3/1/0 against 6/2/0 at 5/10/20x), better answers in self-compacting
                      chats (bench/results/content_numbers_needles.md, online_chats.md); not adopted
    am-facts-omp-cores-loose
                      THE DEFAULT: am-facts-omp-cores-balanced with the fitted keys' values anchored a tenth
                      as hard to their own (AnchoredValues(0.1): lambda = 0.1 trace(X^T X) / t, not 1.0; the
                      facts stay verbatim, so the anchor only holds back the fit): the same keys and beta,
                      a lower held-out attention error, more retention at 10x and 20x on nine articles, as
                      many or more number needles, a lower KL at 10x-20x (bench/results/loose_values*.md)
    am-facts-omp-cores-looser
                      am-facts-omp-cores-loose with the fitted values anchored ten times less again
                      (AnchoredValues(0.01)): the same keys and beta; a lower held-out attention error, less
                      retention at 10x and 20x (bench/results/looser_values.md); not adopted
    am-facts-omp-cores-wide
                      am-facts-omp-cores-loose with beta and the values fitted on 3x the query rows the keys
                      are chosen on (Method.fit_rows: the selection's 4,096 per KV head and 8,192 more, as far
                      as the queries go, weighed to the selection's share of rows asked after the document): the
                      same keys, a held-out attention error 1-3 % lower for 41-66 % more fit time; not adopted
    am-facts-omp-cores-late
                      am-facts-omp-cores-loose fitted on every query row asked after the document (all of
                      self-study's, as far as the 4,096 per KV head go), the rest repeat rows (after=1.0):
                      at 5x more retention on all three article sets, as many needles, a lower KL; at 10x
                      less retention, a needle fewer, a higher KL (bench/results/late_queries.md)
    am-facts-omp-cores-late5
                      am-facts-omp-cores-late up to 5x, am-facts-omp-cores-loose beyond
                      (Method.late_until): better at 5x on SmolLM2, worse at 5x on gemma3
                      (late_queries-gemma3.md); not adopted
    am-facts-omp-cores-onpolicy
                      am-facts-omp-cores-loose with on-policy queries in 3 stages of layers (below): the
                      same query tokens (self-study's sampled ones replayed) through the compacted stages
    am-facts-omp-cores-quarter
                      am-facts-omp-cores-loose with the facts at most a quarter of each head's budget, not half
    am-facts-omp-cores-nobeta
                      am-facts-omp-cores-loose with beta 0 on every key (the values still fitted): what the
                      fitted beta adds on a model whose KV heads serve 7 query heads (Qwen2.5-0.5B)
    am-facts-omp-cores-kept
                      am-facts-omp-cores-loose's keys as they are (beta 0, C_v = V[S]): the selection alone
    am-facts-omp-cores-long
                      am-facts-omp-cores-loose on repeat + self-study-long queries: self-study answers
                      up to 512 tokens, 2,048 in all (not 160 and 768)
    am-facts-omp      am-facts with each head's other keys chosen by OMP (4 keys per step) on the mass the
                      facts leave; beta and values fitted around the facts as in am-facts; designed for
                      repeat + self-study queries (the default before am-facts-omp-near)
    am-facts-onpolicy, am-highest-onpolicy, am-facts-omp-onpolicy
                      on-policy queries in 3 stages of layers: each stage is fitted on queries taken with the
                      stages below it compacted, the same tokens as stage 0's (kvlocal.pipeline)
    am-facts-full     facts up to the whole budget at every ratio
    am-facts-half     facts capped at half of each head's budget
    am-facts-window   numbers +-6 tokens instead of their sentences (-half: capped at half the budget)
    am-facts-fitted   am-facts without the verbatim rule (the facts' beta and values are fitted too)
    am-spans*         one ranking per layer, max-pooled over 5 positions (+ LS / original / anchored values)
    am-recall*        half of each head's budget: spans the recall-probe queries attend to
    am-highest-anchored  am-highest with values anchored to V[S]
    truncate          keep the most recent keys            (beta = 0, C_v = V[S])
    streaming-llm     4 sink keys + the most recent        (beta = 0, C_v = V[S])
    h2o               mean attention of context queries    (beta = 0, C_v = V[S])
    snapkv            mean attention, max-pooled over 7    (beta = 0, C_v = V[S])
    kvzip             KVzip: max attention probability over chunked repeats (softmax over sink + chunk +
                      repeat), one threshold over every head (unequal heads, padded)   (beta = 0, C_v = V[S])
    kvzip-uniform     KVzip's scores, every head its own top-t       (beta = 0, C_v = V[S])
    repeat-max        max block-local attention of (subsampled) repeat queries: kvlocal's earlier stand-in
                      for KVzip, kept to show the difference        (beta = 0, C_v = V[S])
    am-kvzip          KVzip's per-head selection + box NNLS + values anchored to V[S]
    random            a seeded random subset               (beta = 0, C_v = V[S])

Each method also names the query source it was designed for (``queries``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..registry import Registry
from .fit import AnchoredValues, BoxNNLS, DirectValues, LeastSquaresValues, ValueFitter, ZeroBeta
from .kvzip import KVzipGlobal, KVzipKeys
from .omp import OMP, PROGRESSIVE_SCHEDULE
from .problem import HeadProblem, HeadResult
from .select import HighestAttnKeys, KeySelector, RandomKeys, Recent, Selection, SinksAndRecent
from .spans import GroupSelector, SharedSpans

METHODS = Registry("compaction method")
DEFAULT_METHOD = "am-facts-omp-cores-loose"  # what `kvlocal compact` and Compaction.compact use without --method
# what a chat that compacts itself uses (kvlocal.online.OnlineSettings): a conversation is compacted again and again, and
# a number's sentence whose far end gave way to the names' cores once ("The special magic number for" of "... teapot
# is 2215279.") is gone from every later compaction; without cores first the numbers' sentences come before any name
# (measured: bench/results/online_chats.md)
ONLINE_METHOD = "am-facts-omp-balanced"


@dataclass
class Method:
    selector: KeySelector
    beta: object | None  # a BetaFitter, or None: the selector's own weights (OMP)
    values: ValueFitter
    queries: tuple[str, ...] = ("repeat",)
    needs_queries: bool = True
    name: str = field(default="custom")
    verbatim_facts: bool = False  # kept fact keys stay exactly as they were: beta 0, original values
    stages: int = 1  # > 1: on-policy queries, re-collected through the compacted lower layers (kvlocal.pipeline)
    query_after: float | None = None  # this share of the fit's query rows from the queries asked after the
    #                                   document (QuerySet.subsample); None: drawn alike from every row
    late_until: float | None = None  # at ratios up to this, every query row asked after the document (share 1.0)
    fit_rows: float | None = None  # beta and values fitted on this many times the selection's query rows (its own
    #                                and more, weighed to its share of late rows: Compactor._balance), when the
    #                                queries hold more; None: on the selection's

    def after_share(self, ratio: float) -> float | None:
        """The share of the fit's query rows drawn from the queries asked after the document at ``ratio``."""
        return 1.0 if self.late_until is not None and ratio <= self.late_until else self.query_after

    @property
    def group_selector(self) -> GroupSelector | None:
        """The selector when it decides for a group of heads at once (the compactor asks it first)."""
        return self.selector if isinstance(self.selector, GroupSelector) else None

    def fact_ranks(self, pieces) -> np.ndarray | None:
        """Per token of the document (its text pieces): the fact rank the selector gives it (0 no
        fact, higher kept first; what ``Compactor.compact`` takes as ``facts``), or None when the
        method keeps no facts (the caller then need not detokenize anything)."""
        return self.group_selector.fact_ranks(pieces) if self.group_selector is not None else None

    def number_facts(self, ranks: np.ndarray) -> np.ndarray:
        """Of a document's fact ranks (``fact_ranks``): which are numbers' facts, kept before any
        lower tier (the names of a method that keeps them after every number)."""
        return self.group_selector.number_facts(ranks)

    def fact_mask(self, pieces) -> np.ndarray | None:
        """Per token of the document: is it a fact token this method keeps (None: it keeps none)?"""
        ranks = self.fact_ranks(pieces)
        return None if ranks is None else ranks > 0

    @property
    def uses_facts(self) -> bool:
        return bool(getattr(self.selector, "fact_share", 0))

    def fact_budget_share(self, n_keys: int, t: int) -> float:
        """The share of ``t`` keys out of ``n_keys`` this method gives facts (0 without facts)."""
        return float(self.selector.share_of_facts(n_keys, t)) if self.uses_facts else 0.0

    def with_fact_share(self, share: float) -> Method:
        """This method with facts taking ``share`` of every head's budget whatever the ratio (a
        streamed chunk: the share comes from one budget over the whole document)."""
        if not self.uses_facts:
            return self
        return replace(self, selector=replace(self.selector, fact_share=float(share), fact_until=None))

    @property
    def recent_share(self) -> float:
        """The share of each head's budget this method gives a block's last keys (0: none)."""
        return float(getattr(self.selector, "recent", 0.0))

    def with_recent(self, share: float) -> Method:
        """This method with ``share`` of each head's budget on the block's last keys (a streamed
        chunk that does not end the document: 0)."""
        if not self.recent_share and not share:
            return self
        return replace(self, selector=replace(self.selector, recent=float(share)))

    def fit(self, p: HeadProblem, selection: Selection | None = None, refit: HeadProblem | None = None) -> HeadResult:
        """Fit one head; ``selection``: the keys a group selector already chose for it; ``refit``: the
        same head with more query rows (``fit_rows``), on which beta and the values are fitted once
        the keys are chosen on ``p``."""
        if p.t >= p.T:  # nothing to compact: every key with the bias it has, C_v = V
            beta = np.zeros(p.T, np.float32) if p.bias is None else p.bias.copy()
            return HeadResult(np.arange(p.T), beta, p.values.copy(), {"identity": True})
        if p.t == 0:
            return HeadResult(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, p.d), np.float32))
        sel = self.selector.select(p) if selection is None else selection
        idx = np.asarray(sel.indices, np.int64)
        if refit is not None:
            p = refit
        notes: dict = {}
        fixed = None  # bool per kept key: kept verbatim (beta 0, original value)
        if self.beta is None:
            if sel.weights is None:
                raise ValueError(f"{type(self.selector).__name__} gives no weights: set a beta fitter")
            log_w = np.log(sel.weights)
        elif self.verbatim_facts and p.fact_mask is not None and p.fact_mask[idx].any():
            fixed = p.fact_mask[idx]
            # the fact keys keep their own mass (w = 1); the others match what is left of it
            left = np.maximum(p.stats().z - p.features(idx[fixed]).sum(axis=1), 0.0)
            log_w = np.zeros(len(idx))
            if (~fixed).any():
                log_w[~fixed], notes_b = self.beta.fit(p, idx[~fixed], target=left)
                notes.update(notes_b)
            notes["verbatim"] = "facts"
        else:
            log_w, notes_b = self.beta.fit(p, idx)
            notes.update(notes_b)
        beta = log_w + (p.bias[idx] if p.bias is not None else 0.0)
        beta = np.asarray(beta, np.float32)
        values, notes_v = self.values.fit(p, idx, beta, fixed=fixed)
        notes.update(notes_v)
        return HeadResult(idx, beta, np.asarray(values, np.float32), notes)


def _baseline(selector: KeySelector, queries: tuple[str, ...] = (), needs_queries: bool = False) -> Method:
    return Method(selector, ZeroBeta(), DirectValues(), queries, needs_queries)


def _recall(own: float = 0.5) -> SharedSpans:
    """Half of every head's budget: spans that recall probes attend to, shared by the layer's heads;
    the other half: the head's own HighestAttnKeys choice."""
    return SharedSpans(agg="max", span=5, own=own, queries="recall")


def _facts(share: float = 1.0, window: int | None = None, until: float | None = None, falloff: float = 1.0,
           score: str = "attention", omp: OMP | None = None, order: str = "attention",
           rare_names: int | None = None, whole: int | None = None, cores: bool = False,
           recent: float = 0.0, fixed: str = "none", content: int | None = None) -> SharedSpans:
    """Every sentence with a number (or, with ``window``, the ``window`` positions around each
    number token) kept in every head, up to ``share`` of the budget (if they do not fit: ranked by
    rms attention, or with ``order`` "nearest" the numbers first and then their sentences outward
    from them); the rest of each head's budget: its own HighestAttnKeys (or ``omp``) choice.  With
    ``rare_names``, the names mentioned at most that often count as facts too, after the numbers and
    only while the facts hold less than half of a head's budget; with ``whole``, numbers that do not
    all fit with their ``whole`` nearest tokens are kept whole, the most number tokens first; with
    ``cores``, every number's and name's core (with its ``whole`` nearest tokens) before the rest of
    any sentence; with ``recent``, that share of each head's budget on the block's last keys, after
    the facts; with ``fixed`` "all", below ``until`` the facts keep as many keys as at ``until`` ("tails":
    the sentences' tails alone, the cores keep the share); with ``content``, a number's sentence ranks by
    content words from it and its core reaches that content distance (kvlocal.am.facts.content_distance)."""
    if window is None:
        names = rare_names is not None
        return SharedSpans(agg="rms", own=1.0, fact_share=share, fact_until=until, fact_falloff=falloff, score=score,
                           own_omp=omp, fact_order=order, fact_names=names, fact_rare=rare_names,
                           fact_names_below=names, fact_names_upto=0.5 if names else 1.0, fact_whole=whole,
                           fact_cores=cores, recent=recent, fact_fixed=fixed, fact_content=content)
    return SharedSpans(agg="rms", own=1.0, fact_share=share, fact_until=until, fact_sentences=False, fact_span=window)


def _facts_omp(share: float = 1.0, until: float = 5.0, stages: int = 1, query_after: float | None = None,
               late_until: float | None = None, fit_rows: float | None = None,
               anchor: float = 1.0, queries: tuple[str, ...] = ("repeat", "self-study"),
               beta: object | None = None, values: ValueFitter | None = None, **facts) -> Method:
    """am-facts-omp and the methods built on it: ``_facts`` with each head's other keys chosen by OMP
    (4 keys per step, refit every 2nd), the facts verbatim, the rest fitted around them (box NNLS,
    values anchored to V[S] with AnchoredValues' ``anchor``; ``beta`` / ``values``: other fitters);
    ``queries``: repeat + self-study."""
    return Method(_facts(share, until=until, omp=OMP(k_choice=4, refit_interval=2), **facts),
                  BoxNNLS() if beta is None else beta,
                  AnchoredValues(anchor) if values is None else values, queries, verbatim_facts=True, stages=stages,
                  query_after=query_after, late_until=late_until, fit_rows=fit_rows)


def _half(**changes) -> Method:
    """am-facts-omp-half (facts up to half of a head's budget up to 10x, 0.5 sqrt(10/ratio) beyond;
    numbers nearest first, whole when not all fit; rare names after them) with ``changes`` to its
    ``_facts_omp`` settings: the methods built on it say only what they change."""
    return _facts_omp(**{**dict(share=0.5, until=10.0, falloff=0.5, order="nearest", rare_names=2, whole=3), **changes})


_FACTORIES = {
    "am-highest": lambda: Method(HighestAttnKeys("rms"), BoxNNLS(), LeastSquaresValues()),
    "am-highest-exact": lambda: Method(HighestAttnKeys("rms"), BoxNNLS(method="exact"), LeastSquaresValues()),
    "am-omp": lambda: Method(OMP(k_choice=1, refit_interval=1), None, LeastSquaresValues()),
    "am-omp-fast": lambda: Method(OMP(k_choice=4, refit_interval=2), None, LeastSquaresValues()),
    "am-omp-prog": lambda: Method(OMP(schedule=PROGRESSIVE_SCHEDULE), None, LeastSquaresValues()),
    # facts (issue 10): one ranking shared by a layer's heads, pooled into spans; values anchored
    "am-spans": lambda: Method(SharedSpans(), BoxNNLS(), LeastSquaresValues()),
    "am-spans-direct": lambda: Method(SharedSpans(), BoxNNLS(), DirectValues()),
    "am-spans-anchored": lambda: Method(SharedSpans(), BoxNNLS(), AnchoredValues()),
    "am-spans-model": lambda: Method(SharedSpans(scope="model"), BoxNNLS(), AnchoredValues()),
    "am-spans-half": lambda: Method(SharedSpans(own=0.5), BoxNNLS(), AnchoredValues()),
    "am-highest-anchored": lambda: Method(HighestAttnKeys("rms"), BoxNNLS(), AnchoredValues()),
    "am-facts": lambda: Method(_facts(until=5.0), BoxNNLS(), AnchoredValues(), verbatim_facts=True),
    "am-facts-kvzip": lambda: Method(_facts(until=5.0, score="kvzip"), BoxNNLS(), AnchoredValues(), ("kvzip",),
                                     verbatim_facts=True),
    "am-facts-omp-near": lambda: _facts_omp(order="nearest"),
    "am-facts-omp-names": lambda: _facts_omp(order="nearest", rare_names=2),
    "am-facts-omp-whole": lambda: _facts_omp(order="nearest", rare_names=2, whole=3),
    "am-facts-omp-half": lambda: _half(),
    "am-facts-omp-recent": lambda: _half(recent=0.1),
    "am-facts-omp-balanced": lambda: _half(query_after=0.5),
    "am-facts-omp-balanced-loose": lambda: _half(query_after=0.5, anchor=0.1),
    "am-facts-omp-cores": lambda: _half(cores=True),
    "am-facts-omp-cores-balanced": lambda: _half(cores=True, query_after=0.5),
    "am-facts-omp-cores-fixed": lambda: _half(cores=True, query_after=0.5, fixed="all"),
    "am-facts-omp-cores-fixed-tails": lambda: _half(cores=True, query_after=0.5, fixed="tails"),
    "am-facts-omp-cores-content": lambda: _half(cores=True, query_after=0.5, content=3),
    "am-facts-omp-cores-loose": lambda: _half(cores=True, query_after=0.5, anchor=0.1),
    "am-facts-omp-cores-looser": lambda: _half(cores=True, query_after=0.5, anchor=0.01),
    "am-facts-omp-cores-wide": lambda: _half(cores=True, query_after=0.5, anchor=0.1, fit_rows=3.0),
    "am-facts-omp-cores-quarter": lambda: _half(cores=True, query_after=0.5, anchor=0.1, share=0.25),
    "am-facts-omp-cores-nobeta": lambda: _half(cores=True, query_after=0.5, anchor=0.1, beta=ZeroBeta()),
    "am-facts-omp-cores-kept": lambda: _half(cores=True, query_after=0.5, beta=ZeroBeta(), values=DirectValues()),
    "am-facts-omp-cores-late": lambda: _half(cores=True, query_after=1.0, anchor=0.1),
    "am-facts-omp-cores-late5": lambda: _half(cores=True, query_after=0.5, anchor=0.1, late_until=5.0),
    "am-facts-omp-cores-onpolicy": lambda: _half(cores=True, query_after=0.5, anchor=0.1, stages=3),
    "am-facts-omp-cores-long": lambda: _half(cores=True, query_after=0.5, anchor=0.1,
                                             queries=("repeat", "self-study-long")),
    "am-facts-omp": lambda: _facts_omp(),
    "am-facts-omp-onpolicy": lambda: _facts_omp(stages=3),
    "am-facts-onpolicy": lambda: Method(_facts(until=5.0), BoxNNLS(), AnchoredValues(), verbatim_facts=True,
                                        stages=3),
    "am-highest-onpolicy": lambda: Method(HighestAttnKeys("rms"), BoxNNLS(), LeastSquaresValues(), stages=3),
    "am-facts-full": lambda: Method(_facts(), BoxNNLS(), AnchoredValues(), verbatim_facts=True),
    "am-facts-fitted": lambda: Method(_facts(), BoxNNLS(), AnchoredValues()),
    "am-facts-half": lambda: Method(_facts(0.5), BoxNNLS(), AnchoredValues(), verbatim_facts=True),
    "am-facts-window": lambda: Method(_facts(1.0, window=13), BoxNNLS(), AnchoredValues(), verbatim_facts=True),
    "am-facts-window-half": lambda: Method(_facts(0.5, window=13), BoxNNLS(), AnchoredValues(),
                                           verbatim_facts=True),
    "am-recall": lambda: Method(_recall(), BoxNNLS(), LeastSquaresValues(), ("repeat", "recall")),
    "am-recall-anchored": lambda: Method(_recall(), BoxNNLS(), AnchoredValues(), ("repeat", "recall")),
    "am-recall-direct": lambda: Method(_recall(), BoxNNLS(), DirectValues(), ("repeat", "recall")),
    "truncate": lambda: _baseline(Recent()),
    "streaming-llm": lambda: _baseline(SinksAndRecent(sinks=4)),
    "h2o": lambda: _baseline(HighestAttnKeys("mean"), ("context",), True),
    "snapkv": lambda: _baseline(HighestAttnKeys("mean", pool="max", pool_kernel=7), ("self-study",), True),
    "kvzip": lambda: _baseline(KVzipGlobal(), ("kvzip",), True),
    "kvzip-uniform": lambda: _baseline(KVzipKeys(), ("kvzip",), True),
    "repeat-max": lambda: _baseline(HighestAttnKeys("max"), ("repeat",), True),
    "am-kvzip": lambda: Method(KVzipKeys(), BoxNNLS(), AnchoredValues(), ("kvzip",)),
    "random": lambda: _baseline(RandomKeys()),
}


def _register(name: str, factory) -> None:
    def make() -> Method:
        method = factory()
        method.name = name
        return method

    METHODS.register(name)(make)


for _name, _factory in _FACTORIES.items():
    _register(_name, _factory)


def get_method(method: str | Method) -> Method:
    return METHODS.create(method) if isinstance(method, str) else method
