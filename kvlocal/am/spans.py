"""Selection shared across heads, in spans: keep what any head of the layer (or of the model)
needs, in every head, together with its neighbours.

Per-head top-t selection cuts facts apart: a seven-digit number is read by different heads at
different digits, and with many repeated digits the copy attention is spread over every
occurrence, so no digit scores high in any one head and each head keeps another few.  Truncation
keeps whole spans in every head and finds more needles.  ``SharedSpans`` scores every key by the
largest attention any head of its scope (a layer, or the whole model) pays it, widens each score
over ``span`` neighbouring positions (max-pooling), and lets every head keep its top keys from
that one ranking; ``own`` of each head's budget may still go to the head's own best keys.

This is a layer-level selector: the compactor first builds every head problem of the scope,
asks ``head_scores`` of each, combines them with ``select_group`` and only then fits beta and the
values head by head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import maximum_filter1d

from . import facts
from ..kv.queryset import QuerySet
from .problem import HeadProblem
from .select import HighestAttnKeys, KeySelector, Selection, top_t


class GroupSelector(KeySelector):
    """A selector that decides for a group of heads at once (see the module docstring)."""

    scope: str = "layer"  # "layer": the KV heads of one layer; "model": every head of every layer

    def fact_ranks(self, pieces) -> np.ndarray | None:
        """Fact ranks of a document's tokens from their texts (kvlocal.am.facts.fact_ranks: 0 no
        fact, higher kept first), if this selector keeps facts."""
        return None

    def score_queries(self, queries: QuerySet | None) -> QuerySet | None:
        """The query rows ``head_scores`` sees (all of them unless a subclass says otherwise)."""
        return queries

    def head_scores(self, p: HeadProblem) -> np.ndarray:
        raise NotImplementedError

    def rank_group(self, problems: list[HeadProblem], scores: list[np.ndarray]):
        """What the group's heads share (e.g. one ranking), for ``fill`` to choose each head's keys
        from; None if the group must be decided as a whole by ``select_group``."""
        return None

    def fill(self, p: HeadProblem, shared) -> Selection:
        raise NotImplementedError

    def select_group(self, problems: list[HeadProblem], scores: list[np.ndarray]) -> list[Selection]:
        if not problems:
            return []
        shared = self.rank_group(problems, scores)
        return [self.fill(p, shared) for p in problems]

    def select(self, p: HeadProblem) -> Selection:  # a group of one head
        return self.select_group([p], [self.head_scores(p)])[0]


def whole_units(ranks: np.ndarray, depth: int, top: int = facts.TOP_RANK) -> list[np.ndarray]:
    """The numbers of a document with their ``depth`` nearest tokens (fact ranks of the numbers' tier:
    ``TOP_RANK`` down to ``TOP_RANK - depth``), one unit per run of such tokens, in the order a budget
    too small for all of them keeps them: the most number tokens first (a seven-digit number before a
    year, a year before "2"; a number kept in part says nothing), then the shorter, then the earlier.
    ``top`` ``NAME_RANK``: the names' units alike (a full name before a first name)."""
    r = ranks.astype(np.int64)
    core = np.concatenate([[False], (r >= top - depth) & (r <= top), [False]])
    edges = np.flatnonzero(core[1:] != core[:-1])
    spans = list(zip(edges[::2], edges[1::2], strict=True))
    key = [(-int((r[a:b] == top).sum()), b - a, a) for a, b in spans]
    return [np.arange(a, b) for (_, _, a), (a, b) in sorted(zip(key, spans, strict=True))]


@dataclass
class Ranking:
    """What ``SharedSpans.rank_group`` shares among a group's heads: the keys' shared ranking
    (``scores``) and, when the selector keeps facts, the order its fact keys are kept in
    (``fact_order``: higher first, -inf no fact), which keys are numbers' facts, the numbers' whole
    units and, with ``fact_name_whole``, the names' whole units."""

    scores: np.ndarray
    fact_order: np.ndarray | None = None
    numbers: np.ndarray | None = None
    units: list = field(default_factory=list)
    names: list = field(default_factory=list)


def core_tiers(ranks: np.ndarray, depth: int, number_depth: int | None = None) -> np.ndarray:
    """Per key with fact ranks ``ranks`` (numbers above names, kvlocal.am.facts.fact_ranks with
    ``names_below``): the tier a core-first selector keeps it in, highest first: 3 a number's core
    (the number and its ``depth`` nearest tokens), 2 a name's core, 1 the rest of a number's
    sentence, 0 the rest of a name's sentence (and every key that is no fact).  A name with the
    words before it says who did what; the far end of a number's sentence says less than either.
    ``number_depth``: a number's core reaches that far instead (ranks in content words)."""
    r = ranks.astype(np.int64)
    reach = depth if number_depth is None else number_depth
    return np.select([r >= facts.TOP_RANK - reach, (r <= facts.NAME_RANK) & (r >= facts.NAME_RANK - depth),
                      r > facts.NAME_RANK], [3, 2, 1], 0)


TIER_STEP = facts.TOP_RANK + 1  # a fact's order is its rank (1..TOP_RANK, less a fraction) + TIER_STEP * its tier:
#                                 above 2 * TIER_STEP, a core (tier 2 or 3)


@dataclass
class SharedSpans(GroupSelector):
    """Keys ranked by the largest ``agg`` attention any head of the scope pays them, max-pooled
    over ``span`` positions; every head keeps its top keys from that ranking.

    Each head's budget is filled in order: up to ``fact_share`` of it with fact tokens (and the
    ``fact_span`` positions around each, see kvlocal.am.facts), by their fact rank and, within a
    rank, by the shared ranking; then ``own`` of what is left by the head's own rms ranking over
    all its queries; the rest by the shared ranking.  ``fact_order`` "attention" gives every fact
    one rank (the shared ranking alone orders them); "nearest" ranks the numbers first, then
    each sentence's tokens by their distance to its nearest number.  With ``fact_whole``, numbers
    that do not all fit with their ``fact_whole`` nearest tokens are kept as whole units
    (``whole_units``) and none in part; with ``fact_one_whole`` the share grows to hold the first
    unit in that order when it is smaller (and that unit is at most half of the budget).  With
    ``fact_cores``, every fact's core (``core_tiers``) comes before the rest of any sentence, and with
    ``fact_name_whole`` names whose cores do not all fit are kept as whole units too; with
    ``fact_name_units`` every name's own keys come first and then the names' neighbours one name at a
    time, so that the names that do get their neighbours get all of them, in every layer; with
    ``fact_content`` a number's sentence ranks by content words and its core (and whole unit) reaches
    ``fact_content`` content steps (``number_depth``), so no word next to a number is cut in half.  Without
    facts (no ``facts`` on the problems) the first step keeps nothing."""

    agg: str = "rms"
    span: int = 5
    own: float = 0.0
    scope: str = "layer"
    queries: str = "all"  # "recall": rank by the recall-probe rows only (all rows if there are none)
    fact_share: float = 0.0
    fact_until: float | None = None  # facts' share falls as (fact_until / ratio) ** fact_falloff beyond this ratio
    fact_falloff: float = 1.0
    fact_fixed: str = "none"  # with fact_until, "all": below it the facts keep as many keys as at fact_until, not a
    #                           share; "tails" (with fact_cores): the cores keep the share, the sentences' tails do not
    #                           add to what the facts hold at fact_until
    fact_one_whole: bool = False  # with fact_whole: the share holds at least the first whole unit, while that is
    #                               at most half of the head's budget (measured, used by no method)
    fact_span: int = 1
    fact_names: bool = False  # proper names count as facts too (numbers always do)
    fact_rare: int | None = None  # with fact_names: only names mentioned at most this many times
    fact_names_below: bool = False  # with fact_names: names and their sentences rank below every number's
    fact_number_words: bool = False  # numbers written in words are facts too (in the names' tier if below)
    fact_names_with_numbers: bool = False  # with fact_names_below: a name in a number's sentence ranks with it
    fact_names_upto: float = 1.0  # with fact_names_below: names join only while the facts hold less than
    #                               this share of a head's budget (numbers keep their whole share)
    fact_whole: int | None = None  # numbers that do not all fit with their fact_whole nearest tokens: whole
    #                                ones first (see ``whole_units``), none in part
    fact_cores: bool = False  # with fact_whole and fact_names_below: every fact's core (a number's or a name's
    #                           fact_whole nearest tokens) before any sentence's tail (``core_tiers``)
    fact_name_whole: bool = False  # with fact_cores: names whose cores do not all fit are kept whole, none in part
    fact_name_units: bool = False  # with fact_cores: every name's own keys first, then each name's neighbours a
    #                                name at a time (``whole_units`` order, the same in every layer), not every
    #                                name's nearest neighbour before any name's next
    fact_name_words: bool = False  # with fact_names_below: a name's sentence ranks by content words from the name,
    #                                not tokens (kvlocal.am.facts.content_distance): "lantern" before "is"
    fact_content: int | None = None  # with fact_sentences: a number's sentence ranks by content words from the number,
    #                                  not tokens (kvlocal.am.facts.content_distance), and its core (whole unit) is the
    #                                  tokens within this content distance (2: the nearest word on each side, whole)
    fact_sentences: bool = True  # a number keeps its whole sentence
    fact_order: str = "attention"  # "nearest": numbers first, then their sentences outward from them
    score: str = "attention"  # "attention": agg over the queries; "kvzip": the engine-measured key scores
    own_omp: object | None = None  # an OMP: the head's own keys chosen by OMP around the facts instead
    recent: float = 0.0  # this share of each head's budget: the block's last keys (after the facts)

    def __post_init__(self):
        HighestAttnKeys(self.agg)  # validates agg
        if self.score not in ("attention", "kvzip"):
            raise ValueError(f"score must be 'attention' or 'kvzip', not {self.score!r}")
        if self.span < 1 or self.fact_span < 1 or not 0 <= self.own <= 1 or not 0 <= self.fact_share <= 1 \
                or (self.fact_until is not None and not self.fact_until > 0) or not self.fact_falloff > 0 \
                or self.fact_fixed not in ("none", "all", "tails") \
                or (self.fact_fixed != "none" and self.fact_until is None) \
                or (self.fact_fixed == "tails" and not self.fact_cores) \
                or self.scope not in ("layer", "model") or self.queries not in ("all", "recall") \
                or self.fact_order not in ("attention", "nearest") \
                or (self.fact_rare is not None and self.fact_rare < 1) or not 0 <= self.fact_names_upto <= 1 \
                or (self.fact_whole is not None and (self.fact_whole < 0 or self.fact_order != "nearest")) \
                or (self.fact_one_whole and self.fact_whole is None) \
                or (self.fact_cores and (self.fact_whole is None or not self.fact_names_below)) \
                or ((self.fact_name_whole or self.fact_name_units) and not self.fact_cores) \
                or (self.fact_name_words and not (self.fact_names_below and self.fact_sentences)) \
                or (self.fact_content is not None and (self.fact_content < 0 or not self.fact_sentences)) \
                or not 0 <= self.recent <= 1:
            raise ValueError(f"invalid shared-spans settings {self}")

    def fact_ranks(self, pieces) -> np.ndarray | None:
        if not self.fact_share:
            return None
        ranks = facts.fact_ranks(pieces, names=self.fact_names, sentences=self.fact_sentences, rare=self.fact_rare,
                                 names_below=self.fact_names_below,
                                 names_with_numbers=self.fact_names_with_numbers,
                                 number_words=self.fact_number_words, name_words=self.fact_name_words,
                                 content=self.fact_content is not None)
        return ranks if self.fact_order == "nearest" else facts.as_fact_ranks(ranks > 0)

    @property
    def number_depth(self) -> int | None:
        """How far a number's core (and whole unit) reaches: ``fact_content`` (content words) if set,
        else ``fact_whole`` (tokens)."""
        return self.fact_whole if self.fact_content is None else self.fact_content

    def number_facts(self, ranks: np.ndarray) -> np.ndarray:
        """bool per key with fact ranks ``ranks``: is it a number's fact (a number or its sentence)?
        With ``fact_names_below`` names rank below every number and are not; else every fact is."""
        return ranks > facts.NAME_RANK if self.fact_names_below else ranks > 0

    def score_queries(self, queries):
        if self.queries == "recall" and queries is not None:
            return queries.recall_rows() or queries
        return queries

    def head_scores(self, p: HeadProblem) -> np.ndarray:
        return self._own_scores(p, self.agg)

    def _own_scores(self, p: HeadProblem, agg: str) -> np.ndarray:
        return p.kvzip_scores() if self.score == "kvzip" else HighestAttnKeys(agg).scores(p)

    def rank_group(self, problems, scores):
        T = problems[0].T
        if any(p.T != T for p in problems) or any(len(s) != T for s in scores):
            raise ValueError("a group's heads must share their key positions")
        shared = np.max(np.stack(scores), axis=0).astype(np.float64)
        if self.span > 1:
            shared = maximum_filter1d(shared, self.span, mode="nearest")
        ranks = problems[0].fact_ranks
        out = Ranking(shared)
        if self.fact_share > 0 and ranks is not None and ranks.any():
            ranks = maximum_filter1d(ranks, self.fact_span, mode="constant")  # a fact's neighbours share its rank
            place = np.empty(T)
            place[np.argsort(-shared, kind="stable")] = np.arange(T) / T  # 0 for the best, in [0, 1)
            order = ranks.astype(np.float64) - place
            names = whole_units(ranks, self.fact_whole, facts.NAME_RANK) \
                if self.fact_name_whole or self.fact_name_units else []
            if self.fact_cores:
                if self.fact_name_units:  # a name's neighbours by its unit, then by distance, in every layer alike:
                    for j, u in enumerate(names):  # in (NAME_RANK - 101, NAME_RANK - 1), below every name's own keys
                        near = u[ranks[u] < facts.NAME_RANK]
                        order[near] = facts.NAME_RANK - 1 - 100 * (j + (facts.NAME_RANK - ranks[near]) / (
                            self.fact_whole + 1)) / len(names)
                order += TIER_STEP * core_tiers(ranks, self.fact_whole, self.number_depth)
            out.fact_order = np.where(ranks > 0, order, -np.inf)
            out.numbers = self.number_facts(ranks)
            if self.fact_whole is not None:
                out.units = whole_units(ranks, self.number_depth)
            if self.fact_name_whole:
                out.names = names
        return out

    def share_of_facts(self, n_keys: int, t: int) -> float:
        """The share of a head's budget facts may take: ``fact_share``, scaled down by
        ``(fact_until / ratio) ** fact_falloff`` once the block's ratio n_keys / t passes
        ``fact_until``.  Verbatim facts cost one key each at any ratio; at high ratios the fitted keys
        are worth more (measured: bench/results/facts-quality/), but a share that falls as fast as
        the budget (fall-off 1) soon holds no whole number (bench/results/fact_budget.md).  With
        ``fact_fixed`` "all", a budget larger than ``fact_until``'s (round(n_keys / fact_until) keys)
        gives the facts no more keys than that budget does: a document's facts are as many at 5x as
        at 10x, and the keys a lower ratio adds go to the fit.  From ``fact_until`` on the share is
        the schedule's, to the key.  (``fact_fixed`` "tails" bounds the sentences' tails alone, in
        ``fill``; the share is the schedule's.)"""
        return self.fixed_share(n_keys, t) if self.fact_fixed == "all" else self._scheduled_share(n_keys, t)

    def fixed_share(self, n_keys: int, t: int) -> float:
        """What the facts hold at ``fact_until``'s budget, as a share of a budget of ``t`` keys (the
        schedule's share where ``t`` is no larger)."""
        share = self._scheduled_share(n_keys, t)
        if t > 0:
            t_until = max(1, round(n_keys / self.fact_until))
            if t > t_until:
                share = min(share, round(self._scheduled_share(n_keys, t_until) * t_until) / t)
        return share

    def _scheduled_share(self, n_keys: int, t: int) -> float:
        if self.fact_until is None or t <= 0:
            return self.fact_share
        return self.fact_share * min(1.0, self.fact_until * t / n_keys) ** self.fact_falloff

    def fill(self, p: HeadProblem, shared: Ranking) -> Selection:
        fact_order, units = shared.fact_order, shared.units
        taken = np.zeros(p.T, bool)
        t = min(p.t, p.T)

        def take(score: np.ndarray, k: int) -> None:
            if k <= 0:
                return
            s = np.where(taken, -np.inf, score)
            idx = top_t(s, k)
            taken[idx[np.isfinite(s[idx])]] = True

        def keep_whole(units: list, k: int) -> None:  # each unit in order while it fits in k keys
            for u in units:
                if int(taken.sum()) + len(u) <= k:
                    taken[u] = True

        if fact_order is not None:
            n_facts = int(round(self.share_of_facts(p.T, t) * t))
            if self.fact_one_whole and units and n_facts < len(units[0]) <= t // 2:
                n_facts = len(units[0])  # the number kept first, whole, rather than only lesser ones or none
            capped = (self.fact_names or self.fact_number_words) and self.fact_names_below and self.fact_names_upto < 1
            if sum(len(u) for u in units) > n_facts:  # not every number fits with its nearest tokens: whole ones
                keep_whole(units, n_facts)
                fact_order = np.where(shared.numbers, -np.inf, fact_order)  # no number in part; names may follow
            elif self.fact_cores:
                for u in units:  # every number's core, then the rest in core_tiers' order
                    taken[u] = True
            elif capped:
                take(np.where(shared.numbers, fact_order, -np.inf), n_facts)  # the numbers first
            if capped:
                n_facts = max(int(taken.sum()), min(n_facts, int(round(self.fact_names_upto * t))))
            if shared.names and int(taken.sum()) + sum(len(u) for u in shared.names) > n_facts:  # names whole
                keep_whole(shared.names, n_facts)
                fact_order = np.where(shared.numbers, fact_order, -np.inf)  # no name in part; numbers' tails may follow
            if self.fact_fixed == "tails":  # the cores within the share, the tails only up to fact_until's keys
                take(np.where(fact_order > 2 * TIER_STEP, fact_order, -np.inf), n_facts - int(taken.sum()))
                n_facts = min(n_facts, int(round(self.fixed_share(p.T, t) * t)))
            take(fact_order, n_facts - int(taken.sum()))
        n_recent = min(int(round(self.recent * t)), t - int(taken.sum()))
        if n_recent > 0:  # the block's last keys not yet kept, up to n_recent of them (never past the budget)
            free = np.flatnonzero(~taken[p.T - n_recent:]) + p.T - n_recent
            taken[free] = True
        n_own = int(round(self.own * (t - taken.sum())))
        if n_own and self.own_omp is not None:  # OMP explains the mass the facts leave
            taken[self.own_omp.select_around(p, np.flatnonzero(taken), n_own).indices] = True
        elif n_own:  # the head's own best keys (rms attention over all its queries, or its KVzip score)
            take(self._own_scores(p, "rms"), n_own)
        take(shared.scores, t - int(taken.sum()))
        return Selection(np.flatnonzero(taken))
