"""Fact tokens (numbers, proper names) from token texts, and selectors that keep them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvlocal.am import BoxNNLS, Compactor, HeadProblem, HighestAttnKeys, SharedSpans
from kvlocal.am.facts import (NAME_RANK, TOP_RANK, as_fact_ranks, fact_mask, fact_ranks, fact_spans, name_spans,
                              number_word_spans)

TEXT = ("It was late. The special magic number for cathedral is 6088743. Margaret met the crew of NASA in "
        "Paris at 12:30 on 2026-11-24, and she left. She slept.")


def pieces_of(text, width):
    return [text[i:i + width] for i in range(0, len(text), width)]


def marked(text, width=3, **kw):
    pieces = pieces_of(text, width)
    return "".join(p if m else "_" * len(p) for p, m in zip(pieces, fact_mask(pieces, **kw), strict=True))


def test_fact_spans_find_numbers_and_names_not_sentence_starts():
    found = [TEXT[a:b] for a, b in fact_spans(TEXT)]
    assert found == ["6088743", "NASA", "Paris", "12:30", "2026-11-24"]  # "Margaret" only starts sentences
    longer = TEXT + " They asked Margaret."
    again = [longer[a:b] for a, b in fact_spans(longer)]
    assert again.count("Margaret") == 2  # once seen mid-sentence, every occurrence is a name
    assert fact_spans("no facts here at all.") == []


@pytest.mark.parametrize("width", [1, 2, 5, 11])
def test_fact_mask_marks_every_token_that_overlaps_a_fact(width):
    pieces = pieces_of(TEXT, width)
    mask = fact_mask(pieces, names=False)
    ends = np.cumsum([len(p) for p in pieces])
    for a, b in [(m.start(), m.end()) for m in __import__("re").finditer(r"\d+(?:[.,:/-]\d+)*", TEXT)]:
        first, last = np.searchsorted(ends, a, side="right"), np.searchsorted(ends, b - 1, side="right")
        assert mask[first:last + 1].all()
    assert mask.sum() < len(pieces) / 2
    assert not fact_mask(pieces_of("no facts here.", width)).any()
    assert fact_mask([]).shape == (0,)


def test_fact_mask_sentences_keep_what_the_number_is_of():
    s = marked(TEXT, 3, names=False, sentences=True)
    assert "special magic number for cathedral is 6088743" in s
    assert "It was late" not in s and "She slept" not in s


def test_fact_ranks_put_numbers_first_then_their_sentence_outward():
    words = ["It", " was", " late", ".", " The", " code", " for", " cathedral", " is", " ", "6", "0", "8", ".",
             " Then", " they", " left", " at", " 9", " sharp", ".", " She", " slept", "."]
    ranks = fact_ranks(words, names=False, sentences=True)
    assert np.array_equal(ranks > 0, fact_mask(words, names=False, sentences=True))
    got = dict(zip(range(len(words)), ranks.tolist(), strict=True))
    assert [got[i] for i in (10, 11, 12, 18)] == [TOP_RANK] * 4  # the numbers' own tokens
    assert [got[i] for i in (9, 8, 7, 6, 5, 4)] == [TOP_RANK - k for k in range(1, 7)]  # outward, token by token
    assert got[13] == TOP_RANK - 1  # the full stop after the number
    # the next sentence is ranked from its own number, not from the one just before it
    assert [got[i] for i in (14, 15, 16, 17, 19, 20)] == [TOP_RANK - k for k in (4, 3, 2, 1, 1, 2)]
    assert not ranks[:4].any() and not ranks[21:].any()
    assert np.array_equal(fact_ranks(words, names=False) > 0, ranks == TOP_RANK)  # no sentences: the numbers
    assert fact_ranks(["x"] * 600 + [" 7", "."], names=False, sentences=True)[0] == 1  # far away: rank 1, still a fact
    assert fact_ranks([]).shape == (0,)


def test_rare_names_are_the_names_a_document_mentions_at_most_that_often():
    text = ("Anna met Bob. Later Anna saw Bob again, and Anna waved. The keeper of the lantern is Clara Marlowe. "
            "Bob left.")
    names = [text[a:b] for a, b in name_spans(text)]
    assert names.count("Anna") == 3 and names.count("Bob") == 3 and "Clara" in names and "Marlowe" in names
    assert [text[a:b] for a, b in name_spans(text, rare=1)] == ["Clara", "Marlowe"]
    assert sorted(text[a:b] for a, b in name_spans(text, rare=3)) == sorted(names)  # 3 mentions: rare at 3


NAMED = ["The", " keeper", " is", " Clara", " Mar", "lowe", ".", " It", " cost", " 4", "2", " coins", ".",
         " Then", " Bob", " ran", ".", " Bob", " hid", "."]  # a rare name, a number, a name said twice


def test_rare_names_rank_like_numbers_with_their_sentences():
    words = NAMED
    ranks = fact_ranks(words, names=True, sentences=True, rare=1)
    assert [ranks[i] for i in (3, 4, 5, 9, 10)] == [TOP_RANK] * 5
    assert [ranks[i] for i in (2, 1, 0, 6)] == [TOP_RANK - k for k in (1, 2, 3, 1)]
    assert not ranks[13:].any()  # "Bob" twice (a name: once in mid-sentence): not rare at 1
    assert np.array_equal(fact_ranks(words, names=True, sentences=True, rare=2) > 0, np.ones(len(words), bool))
    assert not fact_ranks(words, names=False, sentences=True)[:7].any()  # numbers only
    with pytest.raises(ValueError, match="shared-spans"):
        SharedSpans(fact_share=1.0, fact_names=True, fact_rare=0)


def test_names_below_rank_every_name_under_every_number():
    words = NAMED
    same = fact_ranks(words, names=True, sentences=True, rare=1)
    below = fact_ranks(words, names=True, sentences=True, rare=1, names_below=True)
    assert np.array_equal(below > 0, same > 0)  # the same facts, ranked apart
    assert [below[i] for i in (9, 10)] == [TOP_RANK] * 2 and below[8] == TOP_RANK - 1
    assert [below[i] for i in (3, 4, 5)] == [NAME_RANK] * 3
    assert [below[i] for i in (2, 1, 0)] == [NAME_RANK - k for k in (1, 2, 3)]
    assert below[7:13].min() > NAME_RANK >= below[:7].max()  # the number's sentence above the name's
    assert fact_ranks(["x"] * 600 + [" 7", "."], names=True, sentences=True, names_below=True)[0] == NAME_RANK + 1
    for kw in ({}, {"sentences": True}):  # without names, names_below changes nothing
        assert np.array_equal(fact_ranks(["x"] * 600 + [" 7", "."], names=False, names_below=True, **kw),
                              fact_ranks(["x"] * 600 + [" 7", "."], names=False, **kw))


def blind_heads(facts, t, blind, seed, d=8):
    """Two heads that never attend to the keys ``blind``: only the facts step can keep them."""
    rng, u = np.random.default_rng(seed), np.eye(d)[0]
    k = rng.normal(size=(len(facts), d))
    k[blind] -= 8 * u
    return [HeadProblem(k, rng.normal(size=(len(facts), d)), 2 * u + rng.normal(size=(50, d)) * 0.3, t, facts=facts)
            for _ in range(2)]


def test_names_join_the_facts_only_up_to_their_share_of_the_budget():
    T = 60

    def heads(facts):  # the heads never attend to the name keys 30..49
        return blind_heads(facts, 12, slice(30, 50), seed=1)

    ranks = np.zeros(T, np.uint8)
    ranks[[10, 11, 12]] = TOP_RANK  # a number: 3 keys
    ranks[30:50] = NAME_RANK  # names: 20 keys, more than the whole budget
    sel = SharedSpans(own=1.0, fact_share=1.0, fact_names=True, fact_names_below=True, fact_names_upto=0.5)
    for c in sel.select_group(heads(ranks), [sel.head_scores(p) for p in heads(ranks)]):
        kept = set(c.indices.tolist())
        assert len(c.indices) == 12 and {10, 11, 12} <= kept
        assert len(kept & set(range(30, 50))) == 3  # facts up to half of 12: the number's 3, then 3 names
    many = ranks.copy()
    many[0:9] = TOP_RANK  # numbers alone over half the budget keep their whole share; no name joins
    for c in sel.select_group(heads(many), [sel.head_scores(p) for p in heads(many)]):
        assert set(c.indices.tolist()) == set(range(9)) | {10, 11, 12}
    uncapped = replace(sel, fact_names_upto=1.0)
    for c in uncapped.select_group(heads(ranks), [uncapped.head_scores(p) for p in heads(ranks)]):
        assert len(set(c.indices.tolist()) & set(range(30, 50))) == 9  # every key left is a name
    with pytest.raises(ValueError, match="shared-spans"):
        SharedSpans(fact_share=1.0, fact_names_upto=1.5)


def test_the_default_keeps_rare_names_below_numbers_and_not_the_names_a_story_repeats():
    from kvlocal.am import DEFAULT_METHOD, get_method

    text = ("Then Anna left. Later Anna slept. The keeper of the lantern is Clara Marlowe. The deck was wet. "
            "It cost 42 coins. Then Anna came back to the Deck.")
    pieces = pieces_of(text, 2)
    ranks = get_method(DEFAULT_METHOD).fact_ranks(pieces)
    kept = "".join(p if r else "_" * len(p) for p, r in zip(pieces, ranks, strict=True))
    assert "keeper of the lantern is Clara Marlowe" in kept and "cost 42 coins" in kept
    assert "Anna" not in kept and "Deck" not in kept  # three mentions; a word also in lower case
    at = {w: ranks[text.index(w) // 2] for w in ("42", "Clara", "keeper")}
    assert at["42"] == TOP_RANK and at["42"] > NAME_RANK >= at["Clara"] > at["keeper"] > 0
    assert get_method("am-facts-omp-near").fact_ranks(pieces)[text.index("Clara") // 2] == 0


def test_numbers_in_words_are_found_as_one_span_each_and_one_alone_is_not():
    text = ("No one came. One day one hundred and twelve men, Forty-two women and a dozen boys often camped in a "
            "tent; twenty minutes past four, one of them left.")
    assert [text[a:b] for a, b in number_word_spans(text)] == [
        "one hundred and twelve", "Forty-two", "dozen", "twenty", "four"]
    assert number_word_spans("Someone bought tenets and seventeens; nothing else.") == []


WORDED = ["The", " keeper", " is", " Clara", " Mar", "lowe", ".", " It", " cost", " 4", "2", " coins", ".",
          " Then", " forty", " men", " ran", ".", " At", " 9", " Iris", " Vane", " sang", "."]


def test_numbers_in_words_join_the_names_tier_and_names_with_a_number_rank_with_it():
    base = fact_ranks(WORDED, names=True, sentences=True, rare=1, names_below=True)
    words = fact_ranks(WORDED, names=True, sentences=True, rare=1, names_below=True, number_words=True)
    assert not base[13:18].any()  # "forty men ran": no fact without number words
    assert words[14] == NAME_RANK and words[13:18].max() == NAME_RANK  # in the names' tier, under every number
    assert np.array_equal(words[:13], base[:13]) and np.array_equal(words[18:], base[18:])
    # a rare name in a number's sentence: below the number by its distance ...
    assert base[19] == TOP_RANK and base[20] == TOP_RANK - 1 and base[21] == TOP_RANK - 2
    both = fact_ranks(WORDED, names=True, sentences=True, rare=1, names_below=True, names_with_numbers=True)
    assert both[20] == both[21] == both[19] == TOP_RANK  # ... or, with names_with_numbers, beside it
    assert both[22] == TOP_RANK - 1 and both[18] == TOP_RANK - 1  # and the sentence outward from either
    assert np.array_equal(both[:19], base[:19])  # a name without a number in its sentence stays below
    alone = fact_ranks(WORDED, names=False, sentences=True, number_words=True)  # no names tier: with the numbers
    assert alone[14] == TOP_RANK and not alone[:7].any()


def test_shared_spans_pass_numbers_in_words_and_names_beside_numbers_to_the_ranks():
    from kvlocal.am import get_method

    text = ("Then Anna left. The tower was finished in 1889 by a mason named Tobias Grell, who was kind and "
            "quiet and old and very slow. It has one hundred and twelve steps. Anna came back, then Anna slept.")
    pieces = pieces_of(text, 2)
    names = get_method("am-facts-omp-names").selector
    words = replace(names, fact_number_words=True, fact_names_with_numbers=True).fact_ranks(pieces)
    names = names.fact_ranks(pieces)
    at = {w: text.index(w) // 2 for w in ("1889", "Tobias", "hundred", "steps", "Anna")}
    assert words[at["Tobias"]] == words[at["1889"]] == TOP_RANK > names[at["Tobias"]]
    assert NAME_RANK >= words[at["hundred"]] > words[at["steps"]] > 0 == names[at["hundred"]]
    assert words[at["Anna"]] == 0


def test_fact_ranks_accept_masks_and_reject_what_is_no_rank():
    assert np.array_equal(as_fact_ranks(np.array([True, False])), [TOP_RANK, 0])
    assert as_fact_ranks(np.array([3, 0], np.int64)).dtype == np.uint8
    for bad in (np.array([0.5, 1.0]), np.array([-1, 2]), np.array([256, 0])):
        with pytest.raises(ValueError, match="fact ranks"):
            as_fact_ranks(bad)
    p = HeadProblem(np.zeros((3, 2)), np.zeros((3, 2)), np.ones((1, 2)), 2, facts=np.array([0, 7, 255]))
    assert np.array_equal(p.fact_mask, [False, True, True]) and np.array_equal(p.fact_ranks, [0, 7, 255])


def group(T=60, d=8, n=50, t=12, facts=None, seed=0):
    rng = np.random.default_rng(seed)
    return [HeadProblem(rng.normal(size=(T, d)), rng.normal(size=(T, d)), rng.normal(size=(n, d)), t, facts=facts)
            for _ in range(2)]


def test_shared_spans_keep_facts_first_within_their_share():
    facts = np.zeros(60, bool)
    facts[[5, 30, 31]] = True
    sel = SharedSpans(own=1.0, fact_share=0.5, fact_span=3)  # facts +-1: 4..6, 29..32 = 7 keys
    heads = group(facts=facts)
    chosen = sel.select_group(heads, [sel.head_scores(p) for p in heads])
    for c in chosen:
        assert len(c.indices) == 12 and {5, 30, 31} <= set(c.indices.tolist())
        assert len(set(c.indices.tolist()) & {4, 5, 6, 29, 30, 31, 32}) == 6  # the share: round(0.5 * 12)
    everything = SharedSpans(own=1.0, fact_share=1.0, fact_span=3).select_group(heads, [sel.head_scores(p)
                                                                                      for p in heads])
    assert all({4, 5, 6, 29, 30, 31, 32} <= set(c.indices.tolist()) for c in everything)
    # no facts: the fact share keeps nothing and the head's own ranking fills the budget
    plain = group()
    got = sel.select_group(plain, [sel.head_scores(p) for p in plain])
    assert all(np.array_equal(c.indices, HighestAttnKeys().select(p).indices) for c, p in zip(got, plain, strict=True))
    with pytest.raises(ValueError, match="facts must be"):
        HeadProblem(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros((1, 2)), 2, facts=np.zeros(3, bool))


def test_the_recent_share_keeps_the_blocks_last_keys_after_the_facts_within_the_budget():
    facts = np.zeros(60, bool)
    facts[[5, 58]] = True  # one fact inside the recent window
    heads = group(facts=facts, t=20)
    base = SharedSpans(own=1.0, fact_share=0.5)
    sel = replace(base, recent=0.2)  # round(0.2 * 20) = 4: keys 56..59
    got = sel.select_group(heads, [sel.head_scores(p) for p in heads])
    for c in got:
        kept = set(c.indices.tolist())
        assert len(c.indices) == 20 and {5, 58} <= kept and {56, 57, 58, 59} <= kept
    # without facts the same last keys, and the rest as the head's own ranking would choose
    plain = group(t=20)
    for c, p in zip(sel.select_group(plain, [sel.head_scores(p) for p in plain]), plain, strict=True):
        rest = set(c.indices.tolist()) - {56, 57, 58, 59}
        assert {56, 57, 58, 59} <= set(c.indices.tolist()) and len(rest) == 16
        own = HighestAttnKeys("rms").scores(p)
        own[56:] = -np.inf
        assert rest == set(np.argsort(-own, kind="stable")[:16].tolist())
    # facts that fill the budget leave the recent keys nothing: never more keys than the budget
    full = np.zeros(60, bool)
    full[:30] = True
    crowded = group(facts=full, t=20)
    greedy = SharedSpans(own=1.0, fact_share=1.0, recent=0.5)
    for c in greedy.select_group(crowded, [greedy.head_scores(p) for p in crowded]):
        assert len(c.indices) == 20 and full[c.indices].all()
    # recent = 0 is the selector as it was; a share outside [0, 1] is refused
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(
        replace(base, recent=0.0).select_group(heads, [base.head_scores(p) for p in heads]),
        base.select_group(heads, [base.head_scores(p) for p in heads]), strict=True))
    with pytest.raises(ValueError, match="invalid shared-spans"):
        SharedSpans(recent=1.5)


def test_whole_units_are_numbers_with_their_nearest_tokens_the_most_number_tokens_first():
    from kvlocal.am.spans import whole_units

    ranks = np.zeros(40, np.uint8)
    ranks[2:6] = [TOP_RANK - 1, TOP_RANK, TOP_RANK, TOP_RANK - 1]  # a short number and its neighbours
    ranks[10:19] = [TOP_RANK - 2, TOP_RANK - 1] + [TOP_RANK] * 6 + [TOP_RANK - 1]  # a long one
    ranks[25:29] = [TOP_RANK - 1, TOP_RANK, TOP_RANK, TOP_RANK - 1]  # as short, later
    ranks[30:33] = [NAME_RANK, NAME_RANK, 1]  # a name: no unit
    units = whole_units(ranks, 1)
    assert [u.tolist() for u in units] == [list(range(11, 19)), [2, 3, 4, 5], [25, 26, 27, 28]]
    assert [len(u) for u in whole_units(ranks, 2)] == [9, 4, 4]
    assert [len(u) for u in whole_units(ranks, 0)] == [6, 2, 2]
    assert whole_units(np.zeros(5, np.uint8), 3) == []


def test_numbers_that_do_not_all_fit_are_kept_whole_and_none_in_part():
    ranks = np.zeros(60, np.uint8)
    ranks[10:19] = [TOP_RANK - 2, TOP_RANK - 1] + [TOP_RANK] * 6 + [TOP_RANK - 1]  # 8 keys at depth 1
    ranks[30:34] = [TOP_RANK - 1, TOP_RANK, TOP_RANK, TOP_RANK - 1]  # 4 keys
    ranks[45:49] = [TOP_RANK - 1, TOP_RANK, TOP_RANK, TOP_RANK - 1]  # 4 keys
    ranks[50:53] = NAME_RANK
    heads = blind_heads(ranks, 20, ranks > 0, seed=3)  # the heads never attend to a fact key
    base = SharedSpans(own=1.0, fact_share=0.5, fact_order="nearest", fact_names=True, fact_names_below=True,
                       fact_names_upto=0.5)  # 10 fact keys of 20: the 16 at depth 1 do not fit
    whole = replace(base, fact_whole=1)
    for c in whole.select_group(heads, [whole.head_scores(p) for p in heads]):
        kept = set(c.indices.tolist())
        assert set(range(11, 19)) <= kept  # the long number whole ...
        assert len(kept & set(range(30, 34))) == 0 and len(kept & set(range(45, 49))) == 0  # ... no other in part
        assert len(kept & set(range(50, 53))) == 2  # what is left of the share: names
    for c in base.select_group(heads, [base.head_scores(p) for p in heads]):  # by rank: every number in part
        kept = set(c.indices.tolist())
        assert {13, 31, 46} <= kept and not set(range(11, 19)) <= kept
    roomy = [replace(p, t=40) for p in heads]  # everything fits: the same choice as without whole units
    for a, b in zip(whole.select_group(roomy, [whole.head_scores(p) for p in roomy]),
                    base.select_group(roomy, [base.head_scores(p) for p in roomy]), strict=True):
        assert np.array_equal(a.indices, b.indices)
    for bad in ({"fact_whole": -1}, {"fact_whole": 2, "fact_order": "attention"}):
        with pytest.raises(ValueError, match="shared-spans"):
            SharedSpans(fact_share=1.0, **{"fact_order": "nearest", **bad})


def test_core_tiers_put_every_facts_core_above_every_sentence_tail():
    from kvlocal.am.spans import core_tiers

    ranks = np.array([0, TOP_RANK, TOP_RANK - 1, TOP_RANK - 2, NAME_RANK + 1, NAME_RANK, NAME_RANK - 2,
                      NAME_RANK - 3, 1], np.uint8)
    assert core_tiers(ranks, 2).tolist() == [0, 3, 3, 3, 1, 2, 2, 0, 0]
    assert core_tiers(ranks, 0).tolist() == [0, 3, 1, 1, 1, 2, 0, 0, 0]


def sentence_ranks(T, number=(), name=()):
    """Fact ranks of a number's sentence (number at ``number[1]``, from ``number[0]`` to ``number[2]``)
    and a name's (the same for ``name``), one less per token of distance, as fact_ranks gives them."""
    ranks = np.zeros(T, np.uint8)
    for span, top in ((number, TOP_RANK), (name, NAME_RANK)):
        a, at, b = span or (0, 0, 0)
        for i in range(a, b):
            ranks[i] = top - abs(i - at)
    return ranks


def test_cores_first_keep_a_names_core_before_the_tail_of_a_numbers_sentence():
    """A number in a long sentence (18 keys) and a name; 10 fact keys of 20.  Numbers first keeps
    10 keys of the number's sentence and no name; cores first keeps the number and the name with
    their nearest token each (3 + 3), then the nearest four of the number's tail; a name's tail comes
    last."""
    ranks = sentence_ranks(60, (2, 10, 20), (36, 40, 45))
    heads = blind_heads(ranks, 20, ranks > 0, seed=4)
    base = SharedSpans(own=1.0, fact_share=0.5, fact_order="nearest", fact_names=True, fact_names_below=True,
                       fact_names_upto=0.5, fact_whole=1)
    cores = replace(base, fact_cores=True)
    for c in base.select_group(heads, [base.head_scores(p) for p in heads]):
        assert not set(c.indices.tolist()) & set(range(36, 45))
    for c in cores.select_group(heads, [cores.head_scores(p) for p in heads]):
        kept = set(c.indices.tolist())
        assert {9, 10, 11, 39, 40, 41} <= kept and len(c.indices) == 20
        assert len(kept & set(range(2, 20))) == 7 and kept & set(range(2, 20)) == set(range(7, 14))
        assert not kept & {36, 37, 38, 42, 43, 44}
    roomy = [replace(p, t=56) for p in heads]  # every fact fits: the same keys either way
    for a, b in zip(cores.select_group(roomy, [cores.head_scores(p) for p in roomy]),
                    base.select_group(roomy, [base.head_scores(p) for p in roomy]), strict=True):
        assert np.array_equal(a.indices, b.indices)
    for bad in ({"fact_whole": None}, {"fact_names_below": False}):
        with pytest.raises(ValueError, match="shared-spans"):
            replace(cores, **bad)


def test_cores_first_keep_no_numbers_tail_when_the_numbers_do_not_all_fit():
    """Two numbers whose cores (5 keys each) do not both fit in 6 fact keys: one whole, then the
    name's core; no key of either number's tail."""
    ranks = sentence_ranks(60, (2, 10, 18), (36, 40, 45))
    ranks = np.maximum(ranks, sentence_ranks(60, (20, 26, 31)))
    heads = blind_heads(ranks, 20, ranks > 0, seed=5)
    cores = SharedSpans(own=1.0, fact_share=0.3, fact_order="nearest", fact_names=True, fact_names_below=True,
                        fact_names_upto=0.5, fact_whole=2, fact_cores=True)
    for c in cores.select_group(heads, [cores.head_scores(p) for p in heads]):
        kept = set(c.indices.tolist())
        first = set(range(8, 13)) <= kept
        assert first != (set(range(24, 29)) <= kept)  # one number whole
        assert not kept & (set(range(2, 8)) | set(range(13, 18)) | set(range(20, 24)) | set(range(29, 31)))
        assert 40 in kept and len(kept & set(range(36, 45))) == 1  # what is left: the name's best key


def test_names_whose_cores_do_not_all_fit_are_kept_whole_the_full_names_first():
    """Three names, each with its nearest token on either side: a full name (2 name keys, 4 with
    its neighbours) and two single ones (3 keys each); 6 fact keys.  By rank every name keeps its own
    keys and none of the words around it; whole names keep the full name whole and no other in part."""
    from kvlocal.am.spans import whole_units

    ranks = np.maximum(sentence_ranks(60, name=(8, 10, 13)), sentence_ranks(60, name=(28, 30, 33)))
    ranks = np.maximum(ranks, sentence_ranks(60, name=(44, 46, 49)))
    ranks[11] = NAME_RANK  # the full name: keys 10 and 11
    ranks[12] = NAME_RANK - 1
    assert [u.tolist() for u in whole_units(ranks, 1, NAME_RANK)] == [[9, 10, 11, 12], [29, 30, 31], [45, 46, 47]]
    heads = blind_heads(ranks, 20, ranks > 0, seed=6)
    cores = SharedSpans(own=1.0, fact_share=0.3, fact_order="nearest", fact_names=True, fact_names_below=True,
                        fact_names_upto=0.5, fact_whole=1, fact_cores=True)
    whole = replace(cores, fact_name_whole=True)
    for c in cores.select_group(heads, [cores.head_scores(p) for p in heads]):
        kept = set(c.indices.tolist())
        assert {10, 11, 30, 46} <= kept and len(kept & set(np.flatnonzero(ranks))) == 6
    for c in whole.select_group(heads, [whole.head_scores(p) for p in heads]):
        assert set(c.indices.tolist()) & set(np.flatnonzero(ranks)) == {9, 10, 11, 12}  # no name in part:
        assert len(c.indices) == 20  # the 2 keys left would hold part of a single name; they are fitted
    with pytest.raises(ValueError, match="shared-spans"):
        SharedSpans(fact_share=0.5, fact_order="nearest", fact_whole=1, fact_name_whole=True)  # needs cores


def test_name_units_give_their_neighbours_a_name_at_a_time_after_every_names_own_keys():
    """The three names of the test above, 6 fact keys: every name keeps its own keys (4), and the 2
    left go to one name's neighbours, the full name's (first in ``whole_units`` order), in every
    head alike, where by rank alone each layer gives them to the neighbours its attention prefers."""
    ranks = np.maximum(sentence_ranks(60, name=(8, 10, 13)), sentence_ranks(60, name=(28, 30, 33)))
    ranks = np.maximum(ranks, sentence_ranks(60, name=(44, 46, 49)))
    ranks[11] = NAME_RANK
    ranks[12] = NAME_RANK - 1
    cores = SharedSpans(own=1.0, fact_share=0.3, fact_order="nearest", fact_names=True, fact_names_below=True,
                        fact_names_upto=0.5, fact_whole=1, fact_cores=True)
    units = replace(cores, fact_name_units=True)
    facts_kept = []
    for seed in (6, 7, 8):
        heads = blind_heads(ranks, 20, ranks > 0, seed=seed)
        for c in units.select_group(heads, [units.head_scores(p) for p in heads]):
            assert set(c.indices.tolist()) & set(np.flatnonzero(ranks)) == {9, 10, 11, 12, 30, 46}
            assert len(c.indices) == 20
        facts_kept += [frozenset(set(c.indices.tolist()) & set(np.flatnonzero(ranks)))
                       for c in cores.select_group(heads, [cores.head_scores(p) for p in heads])]
    assert len(set(facts_kept)) > 1  # by rank, which neighbours are kept depends on the attention
    with pytest.raises(ValueError, match="shared-spans"):
        SharedSpans(fact_share=0.5, fact_order="nearest", fact_whole=1, fact_name_units=True)  # needs cores


NEEDLE = [" The", " keeper", " of", " the", " lan", "tern", " is", " Iris", " I", "vers", ".",
          " The", " code", " is", " 4", "82", "91", ".", " Iris", " left", "."]


def test_name_words_rank_a_names_sentence_by_content_words_not_tokens():
    """"The keeper of the lantern is Iris Ivers.": by tokens "is" and "." are the name's nearest
    keys and "lantern" comes next; by content words "lantern" (both of its tokens) comes first, then
    "is" and ".", then "keeper", then "of the", "The" last.  A number's sentence ranks as before."""
    kw = dict(names=True, sentences=True, rare=2, names_below=True)
    tokens, words = fact_ranks(NEEDLE, **kw), fact_ranks(NEEDLE, name_words=True, **kw)
    rank = dict(zip(range(len(NEEDLE)), words.tolist()))
    assert tokens[6] > tokens[4] and tokens[10] > tokens[4]  # by tokens: "is", "." before "lantern"
    assert rank[4] == rank[5] == NAME_RANK - 1 and rank[6] == rank[10] == NAME_RANK - 2
    assert rank[1] == NAME_RANK - 3 and rank[2] == rank[3] == NAME_RANK - 4 and rank[0] < rank[2]
    assert rank[7] == rank[8] == rank[9] == NAME_RANK
    assert np.array_equal(words[11:18], tokens[11:18]) and (words[11:18] > NAME_RANK).all()  # the number's
    assert rank[19] == NAME_RANK - 1 and rank[20] == NAME_RANK - 4  # the second mention: "left", then "." past it
    assert np.array_equal(fact_ranks(NEEDLE, name_words=True, names=True, rare=2, names_below=True),
                          fact_ranks(NEEDLE, names=True, rare=2, names_below=True))  # no sentences: names only


def test_shared_spans_pass_name_words_to_the_ranks_and_need_names_below():
    base = SharedSpans(own=1.0, fact_share=0.5, fact_order="nearest", fact_names=True, fact_rare=2,
                       fact_names_below=True, fact_names_upto=0.5, fact_whole=3, fact_cores=True)
    words = replace(base, fact_name_words=True)
    assert np.array_equal(words.fact_ranks(NEEDLE), fact_ranks(NEEDLE, names=True, sentences=True, rare=2,
                                                               names_below=True, name_words=True))
    assert not np.array_equal(words.fact_ranks(NEEDLE), base.fact_ranks(NEEDLE))
    with pytest.raises(ValueError, match="shared-spans"):
        replace(words, fact_names_below=False)


def test_a_share_too_small_for_the_first_whole_number_grows_to_it():
    """Two numbers as above with a share of 5 keys: the long one (8 keys with its neighbours, first in
    the keep order) does not fit and whole units keep the short one (4); with fact_one_whole the share
    grows to the long one, kept whole, and the short one no longer fits; a unit over half of the
    budget is not forced in."""
    ranks = np.zeros(60, np.uint8)
    ranks[10:19] = [TOP_RANK - 2, TOP_RANK - 1] + [TOP_RANK] * 6 + [TOP_RANK - 1]
    ranks[30:34] = [TOP_RANK - 1, TOP_RANK, TOP_RANK, TOP_RANK - 1]
    heads = blind_heads(ranks, 20, ranks > 0, seed=3)
    small = SharedSpans(own=1.0, fact_share=0.25, fact_order="nearest", fact_whole=1)  # 5 fact keys of 20
    one = replace(small, fact_one_whole=True)
    for c in small.select_group(heads, [small.head_scores(p) for p in heads]):
        kept = set(c.indices.tolist())
        assert not kept & set(range(10, 19)) and set(range(30, 34)) <= kept
    for c in one.select_group(heads, [one.head_scores(p) for p in heads]):
        kept = set(c.indices.tolist())
        assert set(range(11, 19)) <= kept and not kept & set(range(30, 34)) and len(c.indices) == 20
    tight = [replace(p, t=14) for p in heads]  # the 8-key unit is over half of 14 keys: not forced in
    for c in one.select_group(tight, [one.head_scores(p) for p in tight]):
        assert not set(c.indices.tolist()) & set(range(11, 19))
    with pytest.raises(ValueError, match="shared-spans"):
        SharedSpans(fact_share=0.5, fact_one_whole=True)  # needs whole units


def test_nearest_order_keeps_the_numbers_and_their_neighbours_when_facts_do_not_fit():
    """Attention does not find the digits of a number (bench/results/facts_diagnosis.md): with a
    fact budget smaller than the facts, fact ranks (fact_order "nearest") keep the numbers and the
    tokens next to them in every head, where a bool mask (fact_order "attention") keeps whatever of
    the sentences the heads attend to."""
    T, d = 80, 8
    ranks = np.zeros(T, np.uint8)
    for number in (20, 50):  # two 15-token sentences, a 3-token number in the middle of each
        at = np.arange(number - 6, number + 9)
        ranks[at] = TOP_RANK - np.abs(at - np.clip(at, number, number + 2))
    ends = [14, 15, 16, 26, 27, 28, 44, 45, 46, 56, 57, 58]  # the far ends of the two sentences

    def heads(facts):
        rng = np.random.default_rng(3)
        u = np.eye(d)[0]
        out = []
        for _ in range(2):  # the heads attend to the sentences' far ends, never to the numbers
            k = rng.normal(size=(T, d)) * 0.3
            k[ends] += 4 * u
            k[[20, 21, 22, 50, 51, 52]] -= 4 * u
            q = 2 * u + rng.normal(size=(40, d)) * 0.1
            out.append(HeadProblem(k, rng.normal(size=(T, d)), q, 16, facts=facts))
        return out

    sel = SharedSpans(own=1.0, fact_share=0.75)  # 12 fact keys of 16
    want = {19, 20, 21, 22, 23, 49, 50, 51, 52, 53}  # the numbers +-1
    ranked = heads(ranks)
    for c in sel.select_group(ranked, [sel.head_scores(p) for p in ranked]):
        assert want <= set(c.indices.tolist()) and len(c.indices) == 16
    masked = heads(ranks > 0)  # a bool mask: every fact alike, the attention order alone
    for c in sel.select_group(masked, [sel.head_scores(p) for p in masked]):
        assert not set(c.indices.tolist()) & {20, 21, 22, 50, 51, 52}
    # which of the two the selector asks for from a document's text
    words = ["A", " b", " c", " d", " 7", "."]
    near = SharedSpans(fact_share=1.0, fact_order="nearest").fact_ranks(words)
    assert near.tolist() == [251, 252, 253, 254, 255, 254]
    assert SharedSpans(fact_share=1.0).fact_ranks(words).tolist() == [TOP_RANK] * 6
    assert SharedSpans().fact_ranks(words) is None  # keeps no facts
    with pytest.raises(ValueError):
        SharedSpans(fact_order="alphabetical")


def test_compactor_keeps_the_fact_sentences_in_every_head(tiny_doc_facts):
    snap, layout, queries, info, facts, _ = tiny_doc_facts
    cache, _ = Compactor("am-facts", ratio=3, seed=0).compact(snap, layout.doc_start, layout.doc_end, queries,
                                                              facts=facts)
    want = set(np.flatnonzero(facts).tolist())
    assert want
    for li in range(len(snap.keys)):
        for h in range(info.n_head_kv):
            kept = set(cache.origin[li][:, h][cache.origin[li][:, h] >= 0].tolist())
            assert want <= kept, (li, h)
    plain, _ = Compactor("am-highest", ratio=3, seed=0).compact(snap, layout.doc_start, layout.doc_end, queries)
    assert any(not want <= set(plain.origin[li][:, h].tolist()) for li in range(len(snap.keys))
               for h in range(info.n_head_kv))
    with pytest.raises(Exception, match="one bool or fact rank per position"):
        Compactor("am-facts", ratio=3).compact(snap, layout.doc_start, layout.doc_end, queries, facts=facts[:5])


@pytest.fixture(scope="module")
def tiny_doc_facts(load_model):
    from conftest import TEXT as DOC
    from conftest import session_kwargs
    from kvlocal.am import get_method
    from kvlocal.engine.session import Session

    with Session(load_model("llama-gqa"), n_ctx=1024, capture=True, **session_kwargs("llama-gqa")) as s:
        layout = s.ingest_document(DOC, capture_queries=True)
        facts = get_method("am-facts").fact_mask(s.token_texts(layout.length))
        facts[: layout.doc_start] = False
        return s.snapshot(), layout, s.context_queries, s.info, facts, s.token_texts(layout.length)


def test_the_nearest_order_keeps_the_number_first_when_its_sentence_does_not_fit(tiny_doc_facts):
    """At 10x am-facts-omp-names's fact keys (half of each head's budget) are fewer than the number
    sentence's tokens: every head keeps the number's own tokens first, verbatim."""
    from kvlocal.am import get_method

    snap, layout, queries, info, _, pieces = tiny_doc_facts
    method = get_method("am-facts-omp-names")
    ranks = method.fact_ranks(pieces)
    ranks[: layout.doc_start] = 0
    number = set(np.flatnonzero(ranks == TOP_RANK).tolist())
    n_doc, ratio = layout.doc_end - layout.doc_start, 10
    cache, report = Compactor(method, ratio=ratio, seed=0).compact(snap, layout.doc_start, layout.doc_end,
                                                                 queries, facts=ranks)
    for (_, li, h), res in report.results.items():
        k = int(round(method.fact_budget_share(n_doc, res.t) * res.t))
        assert 0 < k < (ranks > 0).sum()  # the sentence does not fit
        kept = set((layout.doc_start + res.indices).tolist())
        assert len(number & kept) >= min(k, len(number)), (li, h)
        verbatim = np.isin(layout.doc_start + res.indices, sorted(number))
        assert np.all(res.beta[verbatim] == 0)
        assert np.array_equal(res.values[verbatim], snap.values[li][layout.doc_start + res.indices[verbatim], h])


def test_a_fact_every_head_keeps_takes_the_same_slot_in_every_head_and_layer(tiny_doc_facts):
    """Heads keep different fact tokens beside the ones all of them keep (a name one head's fitted
    keys happen to take); the facts all of them keep come first, in the same slots everywhere, so
    that a re-compaction still finds them as facts (kvlocal.online.cell_facts).  Ordering every
    kept fact first instead shifts a common fact by the extra facts a head keeps before it."""
    from kvlocal.am import DEFAULT_METHOD, get_method
    from kvlocal.online import cell_facts

    snap, layout, queries, info, _, pieces = tiny_doc_facts
    method = get_method(DEFAULT_METHOD)
    ranks = method.fact_ranks(pieces)
    ranks[: layout.doc_start] = 0
    cache, _ = Compactor(method, ratio=3, seed=0).compact(snap, layout.doc_start, layout.doc_end, queries,
                                                         facts=ranks)
    fact_pos = set(np.flatnonzero(ranks).tolist())
    kept = [frozenset(o[:, h].tolist()) & fact_pos for o in cache.origin for h in range(info.n_head_kv)]
    common = frozenset.intersection(*kept)
    assert common and len(set(kept)) > 1  # the premise: some heads keep facts the others do not
    for p in common:
        assert len({int(np.flatnonzero(o[:, h] == p)[0]) for o in cache.origin for h in range(info.n_head_kv)}) == 1
    found = cell_facts(ranks[layout.doc_start:], layout.doc_start, cache.positions, cache.origin,
                       int(cache.positions.max()) + 1)
    assert np.count_nonzero(found) == len(common)


TWO_NUMBERS = ("The special magic number for the lighthouse is 4817263. Margaret kept the lamp burning every "
               "night of the long winter, and the ships saw it. The tower was built in 1889 by a mason, who was "
               "glad of the work, and the town paid him well for it over many years of his long life.")


def test_the_whole_method_keeps_the_longer_number_whole_when_both_do_not_fit(load_model):
    """Two numbers with their nearest tokens do not fit the facts' share: through the Compactor, every
    head keeps the seven-digit number whole with its 3 nearest tokens on either side, verbatim (which
    keys the selection takes, and that it takes no number in part, is pinned above on planted heads:
    here the fitted keys may add any token)."""
    from conftest import session_kwargs
    from kvlocal.am import DEFAULT_METHOD, get_method
    from kvlocal.am.spans import whole_units
    from kvlocal.engine.session import Session

    with Session(load_model("llama-gqa"), n_ctx=1024, capture=True, **session_kwargs("llama-gqa")) as s:
        layout = s.ingest_document(TWO_NUMBERS, capture_queries=True)
        snap, queries, pieces = s.snapshot(), s.context_queries, s.token_texts(layout.length)
    method = get_method(DEFAULT_METHOD)
    ranks = method.fact_ranks(pieces)
    ranks[: layout.doc_start] = 0
    units = whole_units(ranks, method.selector.fact_whole)
    assert len(units) == 2 and (ranks[units[0]] == TOP_RANK).sum() > (ranks[units[1]] == TOP_RANK).sum()
    n_doc = layout.doc_end - layout.doc_start

    def holds_one(t):  # the facts' share of t keys holds the long number, not both
        return len(units[0]) <= round(method.fact_budget_share(n_doc, t) * t) < len(units[0]) + len(units[1])

    ratio = next(r for r in np.arange(2.0, 12.0, 0.25)  # whichever way the compactor rounds the budget
                 if holds_one(int(n_doc / r)) and holds_one(int(n_doc / r) + 1))
    cache, report = Compactor(method, ratio=ratio, seed=0).compact(snap, layout.doc_start, layout.doc_end, queries,
                                                                  facts=ranks)
    checked = 0
    for (_, li, h), res in report.results.items():
        k = int(round(method.fact_budget_share(n_doc, res.t) * res.t))
        if not len(units[0]) <= k < len(units[0]) + len(units[1]):
            continue
        checked += 1
        at = layout.doc_start + res.indices
        assert set(units[0].tolist()) <= set(at.tolist()), (li, h)
        whole = np.isin(at, units[0])
        assert np.all(res.beta[whole] == 0)
        assert np.array_equal(res.values[whole], snap.values[li][at[whole], h])
    assert checked == len(report.results)


def test_recall_probes_tag_their_rows(load_model):
    from conftest import TEXT as DOC
    from conftest import session_kwargs
    from kvlocal.engine.queries import RecallProbes, collect_queries
    from kvlocal.kv.queryset import RECALL, QuerySet
    from kvlocal.engine.session import Session

    with Session(load_model("llama-gqa"), n_ctx=1024, capture=True, **session_kwargs("llama-gqa")) as s:
        layout = s.ingest_document(DOC, capture_queries=True)
        before = s.state()
        q = RecallProbes(max_new_tokens=8).collect(s, layout)
        assert s.state() == before  # the probes ran in the scratch sequence
        assert q.n_tokens > 8 * 3 and np.all(q.anchors == RECALL)
        both = QuerySet.concat([collect_queries(s, layout, ["context"]), q])
        assert both.recall_rows().n_tokens == q.n_tokens
        assert s.context_queries.recall_rows() is None
        sel = SharedSpans(queries="recall")
        assert sel.score_queries(both).n_tokens == q.n_tokens and sel.score_queries(s.context_queries) is \
            s.context_queries
    assert BoxNNLS  # imported for the compositions above


def fact_problem(T, n, t, at, seed, d=12):
    """One head of T random keys (d = 12) and n queries, keeping t, with facts at the positions ``at``."""
    rng = np.random.default_rng(seed)
    facts = np.zeros(T, bool)
    facts[at] = True
    return HeadProblem(rng.normal(size=(T, d)) * 2, rng.normal(size=(T, d)), rng.normal(size=(n, d)) * 2, t,
                       facts=facts)


def test_verbatim_facts_keep_their_keys_exactly_and_fit_the_rest_around_them():
    from kvlocal.am import AnchoredValues, LeastSquaresValues, get_method
    from kvlocal.am.fit import compacted_attention
    from kvlocal.am.methods import Method

    p = fact_problem(T=90, n=300, t=20, at=[10, 11, 12, 50], seed=4)
    T, facts = p.T, p.fact_mask
    for values in (AnchoredValues(), LeastSquaresValues()):
        verbatim = Method(SharedSpans(own=1.0, fact_share=1.0), BoxNNLS(), values, verbatim_facts=True).fit(p)
        fitted = Method(SharedSpans(own=1.0, fact_share=1.0), BoxNNLS(), values).fit(p)
        assert np.array_equal(verbatim.indices, fitted.indices)
        fixed = facts[verbatim.indices]
        assert fixed.sum() == 4 and verbatim.notes["verbatim"] == "facts"
        assert np.all(verbatim.beta[fixed] == 0)
        assert np.array_equal(verbatim.values[fixed], p.values[verbatim.indices[fixed]])
        assert not np.array_equal(fitted.values[fixed], p.values[fitted.indices[fixed]])  # would be refitted
        # the free keys are fitted around the fixed ones: the output error stays close to the free fit's
        X = compacted_attention(p, verbatim.indices, verbatim.beta)
        err_v = np.linalg.norm(X @ verbatim.values - p.stats().outputs)
        X0 = compacted_attention(p, fitted.indices, fitted.beta)
        err_f = np.linalg.norm(X0 @ fitted.values - p.stats().outputs)
        direct = np.linalg.norm(X @ p.values[verbatim.indices] - p.stats().outputs)
        assert err_v < direct and err_v < 2 * err_f
    # every kept key a fact: nothing is fitted, the head is plain eviction
    all_facts = HeadProblem(p.keys, p.values, p.queries, 20, facts=np.ones(T, bool))
    res = get_method("am-facts").fit(all_facts)
    assert np.all(res.beta == 0) and np.array_equal(res.values, p.values[res.indices])
    # no facts on the problem: am-facts is its fitted twin
    plain = HeadProblem(p.keys, p.values, p.queries, 20)
    a, b = get_method("am-facts").fit(plain), get_method("am-facts-fitted").fit(plain)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.values, b.values) and "verbatim" not in a.notes


def test_fact_share_falls_beyond_fact_until():
    s = SharedSpans(own=1.0, fact_share=1.0, fact_until=5.0)
    assert [round(s.share_of_facts(3000, 3000 // r), 3) for r in (2, 5, 10, 20, 50)] == [1.0, 1.0, 0.5, 0.25, 0.1]
    assert SharedSpans(fact_share=0.5).share_of_facts(3000, 30) == 0.5  # no schedule: the share as set
    with pytest.raises(ValueError):
        SharedSpans(fact_share=1.0, fact_until=0.0)
    facts = np.zeros(200, bool)
    facts[::2] = True  # facts everywhere: the schedule bounds what they take
    heads = group(T=200, t=20, facts=facts)
    scores = [s.head_scores(p) for p in heads]
    full = SharedSpans(own=1.0, fact_share=1.0).select_group(heads, scores)
    assert all(facts[c.indices].all() for c in full)  # no schedule: facts take the whole budget
    got = s.select_group(heads, scores)  # ratio 10: facts take half, rms ranking fills the rest
    for c, p in zip(got, heads, strict=True):
        assert 10 <= facts[c.indices].sum() < 20 and len(c.indices) == 20
        own = HighestAttnKeys("rms").scores(p)
        non_fact = np.flatnonzero(~facts)
        assert set(non_fact[np.argsort(-own[non_fact], kind="stable")[:1]]) <= set(c.indices.tolist())


def test_fact_share_can_fall_slower_than_the_ratio():
    s = SharedSpans(own=1.0, fact_share=0.5, fact_until=10.0, fact_falloff=0.5)
    assert [round(s.share_of_facts(3000, 3000 // r), 3) for r in (2, 5, 10, 20, 50)] == [0.5, 0.5, 0.5, 0.354, 0.224]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="shared-spans"):
            SharedSpans(fact_share=0.5, fact_until=10.0, fact_falloff=bad)


def test_fixed_facts_keep_below_fact_until_the_keys_they_keep_at_it_and_the_schedule_from_it_on():
    """Half the budget up to 10x, 0.5 sqrt(10/ratio) beyond: fixed, the facts keep at 2x and 5x the
    keys they keep at 10x, and from 10x on every budget gives them what the schedule does, to the
    key (the same method there), whatever the document's length rounds to."""
    from kvlocal.am.methods import get_method

    sched = SharedSpans(own=1.0, fact_share=0.5, fact_until=10.0, fact_falloff=0.5)
    fixed = replace(sched, fact_fixed="all")

    def keys(sel, n, t):
        return int(round(sel.share_of_facts(n, t) * t))

    for n in (2957, 2965, 2975, 2985, 3000, 3394):
        t10 = round(n / 10)
        assert [keys(fixed, n, round(n / r)) for r in (2, 3, 5, 8)] == [keys(sched, n, t10)] * 4
        assert all(keys(fixed, n, t) == keys(sched, n, t) for t in range(1, t10 + 1))
        assert keys(sched, n, round(n / 5)) > keys(sched, n, t10)  # unfixed, 5x gives the facts more
    default, method = get_method("am-facts-omp-cores-balanced"), get_method("am-facts-omp-cores-fixed")
    assert method.selector == replace(default.selector, fact_fixed="all")
    assert method.query_after == default.query_after and method.queries == default.queries
    facts = np.zeros(200, bool)
    facts[:100:2] = True
    heads = blind_heads(facts, 40, facts, seed=9)  # 5x, no attention on the facts: the facts step alone keeps them
    for sel, n_facts in ((fixed, 10), (sched, 20)):  # fixed: what 10x gives them (half of 20 keys); else half of 40
        for c in sel.select_group(heads, [sel.head_scores(p) for p in heads]):
            assert len(c.indices) == 40 and facts[c.indices].sum() == n_facts
    for bad in (dict(fact_fixed="all"), dict(fact_fixed="yes", fact_until=10.0),
                dict(fact_fixed="tails", fact_until=10.0)):  # needs fact_until; a known mode; tails need cores
        with pytest.raises(ValueError, match="shared-spans"):
            SharedSpans(fact_share=0.5, **bad)


def test_a_problem_copied_with_replace_keeps_its_fact_ranks():
    ranks = sentence_ranks(60, (2, 10, 20), (36, 40, 45))
    p = blind_heads(ranks, 12, ranks > 0, seed=4)[0]
    q = replace(p, t=30)  # the ranks, not a flat mask (every fact TOP_RANK) made of them
    assert np.array_equal(q.fact_ranks, ranks) and np.array_equal(q.fact_mask, ranks > 0) and q.t == 30
    assert HeadProblem(p.keys, p.values, p.queries, 5).fact_mask is None


def test_fixed_tails_keep_every_core_within_the_share_and_no_more_tail_than_at_fact_until():
    """A number's sentence (18 keys) and a name's (9); 5x of 60 keys: 12 kept, half of them facts
    (6), while 10x's budget (6 keys) gives the facts 3.  Fixed "all": 3 fact keys, the number's
    core only in part; fixed "tails": both cores whole (3 + 3 = 6 > 3), and no tail key."""
    ranks = sentence_ranks(60, (2, 10, 20), (36, 40, 45))
    heads = blind_heads(ranks, 12, ranks > 0, seed=4)
    cores = SharedSpans(own=1.0, fact_share=0.5, fact_until=10.0, fact_falloff=0.5, fact_order="nearest",
                        fact_names=True, fact_names_below=True, fact_names_upto=0.5, fact_whole=1, fact_cores=True)
    every, tails = replace(cores, fact_fixed="all"), replace(cores, fact_fixed="tails")
    facts = set(np.flatnonzero(ranks).tolist())
    for c in every.select_group(heads, [every.head_scores(p) for p in heads]):
        assert len(set(c.indices.tolist()) & facts) == 3 and len(c.indices) == 12
    for c in tails.select_group(heads, [tails.head_scores(p) for p in heads]):
        assert set(c.indices.tolist()) & facts == {9, 10, 11, 39, 40, 41} and len(c.indices) == 12
    roomy = [replace(p, t=30) for p in heads]  # 2x: the cores fit with room; the tails hold 10x's 3 keys at most
    for a, b in zip(tails.select_group(roomy, [tails.head_scores(p) for p in roomy]),
                    cores.select_group(roomy, [cores.head_scores(p) for p in roomy]), strict=True):
        kept_a, kept_b = set(a.indices.tolist()) & facts, set(b.indices.tolist()) & facts
        assert kept_a == {9, 10, 11, 39, 40, 41} and len(kept_b) == 15
    for t in (6, 4, 3):  # 10x and beyond: the same keys as without, in every head
        tight = [replace(p, t=t) for p in heads]
        for a, b in zip(tails.select_group(tight, [tails.head_scores(p) for p in tight]),
                        cores.select_group(tight, [cores.head_scores(p) for p in tight]), strict=True):
            assert np.array_equal(a.indices, b.indices)
    from kvlocal.am.methods import get_method

    assert get_method("am-facts-omp-cores-fixed-tails").selector == replace(
        get_method("am-facts-omp-cores-balanced").selector, fact_fixed="tails")

def test_the_default_gives_facts_at_most_half_of_a_heads_budget():
    """Eight one-token numbers on heads that never attend to them: at 5x (12 keys of 60) the default
    keeps six of them and fits the other half of the budget; the default before it (facts up to the
    whole budget at 5x) keeps all eight.  At 10x both keep three.  (The rest of the budget is chosen by
    attention here, not by OMP and not pooled, so that it cannot reach a blind key.)"""
    from kvlocal.am import DEFAULT_METHOD, get_method

    ranks = np.zeros(60, np.uint8)
    ranks[20:52:4] = TOP_RANK
    numbers = set(np.flatnonzero(ranks).tolist())
    for t, method, kept in ((12, DEFAULT_METHOD, 6), (12, "am-facts-omp-whole", 8), (6, DEFAULT_METHOD, 3),
                            (6, "am-facts-omp-whole", 3)):
        sel = replace(get_method(method).selector, span=1, own_omp=None)
        heads = blind_heads(ranks, t, ranks > 0, seed=5)
        for c in sel.select_group(heads, [sel.head_scores(p) for p in heads]):
            assert len(c.indices) == t and len(numbers & set(c.indices.tolist())) == kept, (t, method)


def test_shared_spans_can_rank_by_kvzip_scores():
    facts = np.zeros(60, bool)
    facts[[5, 30]] = True
    heads = group(facts=facts)
    rng = np.random.default_rng(7)
    for p in heads:
        p.key_scores = rng.random(60).astype(np.float32)
    sel = SharedSpans(own=1.0, fact_share=0.5, fact_span=1, score="kvzip")
    chosen = sel.select_group(heads, [sel.head_scores(p) for p in heads])
    for c, p in zip(chosen, heads, strict=True):
        rest = sorted(set(c.indices.tolist()) - {5, 30})
        others = np.setdiff1d(np.arange(60), [5, 30])
        best = others[np.argsort(-p.key_scores[others], kind="stable")[:10]]
        assert {5, 30} <= set(c.indices.tolist()) and rest == sorted(best.tolist())  # each head's own KVzip best
    attention = SharedSpans(own=1.0, fact_share=0.5, fact_span=1)
    assert any(not np.array_equal(a.indices, b.indices) for a, b in zip(
        chosen, attention.select_group(heads, [attention.head_scores(p) for p in heads]), strict=True))
    heads[0].key_scores = None
    with pytest.raises(ValueError, match="'kvzip' source"):
        sel.head_scores(heads[0])
    with pytest.raises(ValueError, match="score must be"):
        SharedSpans(score="max")


# ---------------------------------------------------------------------------------------------
# one budget over a document compacted in blocks (streaming)

def test_chunk_budgets_without_facts_are_each_blocks_own_ratio():
    from kvlocal.am.budgets import chunk_budgets
    keys, shares = chunk_budgets([640, 640, 333], [0, 0, 0], 10, 0.5)
    assert keys == [64, 64, 33] and shares is None
    assert chunk_budgets([640, 640], [50, 0], 10, 0.0) == ([64, 64], None)  # a method without facts


def test_chunk_budgets_give_a_block_its_facts_and_the_rest_by_length():
    from kvlocal.am.budgets import chunk_budgets
    sizes, facts = [600, 600, 600, 600], [100, 0, 20, 0]
    keys, shares = chunk_budgets(sizes, facts, 10, 0.5)
    assert sum(keys) == 240  # the whole document's budget, as one compaction would keep
    fact_keys = [k * s for k, s in zip(keys, shares, strict=True)]
    assert np.allclose(fact_keys, facts, atol=0.5)  # every fact: 120 < half the budget
    other = [k - f for k, f in zip(keys, fact_keys, strict=True)]
    assert np.allclose(other, 30, atol=1)  # the rest split by length
    assert keys[0] > keys[2] > keys[1]


def test_chunk_budgets_scale_facts_alike_when_they_exceed_their_share():
    from kvlocal.am.budgets import chunk_budgets
    keys, shares = chunk_budgets([500, 500, 500, 500], [200, 100, 0, 100], 20, 0.25)  # 100 keys, 25 for facts
    assert sum(keys) == 100
    fact_keys = np.array([k * s for k, s in zip(keys, shares, strict=True)])
    assert np.allclose(fact_keys, [12.5, 6.25, 0, 6.25], atol=0.5)
    keys, _ = chunk_budgets([100, 100], [100, 0], 2.5, 1.0)
    assert keys == [75, 5]  # never above the compactor's cap of a block: the rest goes to the other
    with pytest.raises(ValueError):
        chunk_budgets([100, 100], [101, 0], 10, 0.5)


def test_chunk_budgets_give_names_only_what_the_numbers_leave_of_the_facts_part():
    """A method that keeps names after every number (the default): a block with a number's 40 fact
    tokens keeps them all, and the blocks full of names share the 10 fact keys left of the 50; counted
    as facts of one tier, the names would take four fifths of the facts' part from the number."""
    from kvlocal.am.budgets import chunk_budgets
    sizes, numbers, names = [500, 500, 500, 500], [40, 0, 0, 0], [0, 0, 100, 100]
    keys, shares = chunk_budgets(sizes, numbers, 20, 0.5, lesser=names)  # 100 keys, 50 for facts
    assert sum(keys) == 100
    fact_keys = np.array([k * s for k, s in zip(keys, shares, strict=True)])
    assert np.allclose(fact_keys, [40, 0, 5, 5], atol=0.5)
    one_tier, one_shares = chunk_budgets(sizes, [40, 0, 100, 100], 20, 0.5)
    assert one_tier[0] * one_shares[0] < 10
    few = chunk_budgets(sizes, [0, 0, 0, 0], 20, 0.5, lesser=names)[1]  # no numbers: names take the part
    assert np.allclose(np.array(chunk_budgets(sizes, [0, 0, 0, 0], 20, 0.5, lesser=names)[0]) * few,
                       [0, 0, 25, 25], atol=0.5)
    with pytest.raises(ValueError):
        chunk_budgets(sizes, [400, 0, 0, 0], 20, 0.5, lesser=[101, 0, 0, 0])  # more facts than tokens


DESCRIBED = [" The", " special", " magic", " number", " for", " te", "ap", "ot", " is", " ", "2", "2", "1", "5", ".",
             " Iris", " left", "."]


def test_content_ranks_a_numbers_sentence_by_content_words_and_its_core_reaches_whole_words():
    """"The special magic number for teapot is 2215.": by tokens the core (3 nearest) cuts "teapot" in
    half ("ot" in, "te ap" out); by content words "teapot" is one step away, whole, and with a
    content core of 3 "number" joins it ("for", a function word beyond "teapot", ranks after it); a
    name's sentence ranks as before."""
    from kvlocal.am.spans import core_tiers

    kw = dict(names=True, sentences=True, rare=2, names_below=True)
    tokens, content = fact_ranks(DESCRIBED, **kw), fact_ranks(DESCRIBED, content=True, **kw)
    assert (core_tiers(tokens, 3)[[5, 6, 7]] == [1, 1, 3]).all()  # "te", "ap" tails, "ot" core
    for depth, core in ((2, range(5, 15)), (3, [3, *range(5, 15)])):
        tiers = core_tiers(content, 3, number_depth=depth)
        assert set(np.flatnonzero(tiers == 3).tolist()) == set(core)
    assert content[5] == content[6] == content[7] == TOP_RANK - 1 and content[4] < content[3] < content[5]
    assert content[0] < content[1] < content[2] < content[3]
    assert np.array_equal(content[15:], tokens[15:])  # the name's sentence


def test_shared_spans_fact_content_keeps_whole_described_numbers_and_needs_sentences():
    """With fact_content the selector's ranks are the content ranks, and the numbers' whole units (kept
    when not all fit) reach ``fact_content`` content steps: "teapot is 2215." whole, with 3 "number" too
    (a unit of its own: "for" between them is a step further)."""
    base = SharedSpans(own=1.0, fact_share=0.5, fact_order="nearest", fact_names=True, fact_rare=2,
                       fact_names_below=True, fact_names_upto=0.5, fact_whole=3, fact_cores=True)
    for depth in (2, 3):
        content = replace(base, fact_content=depth)
        ranks = content.fact_ranks(DESCRIBED)
        assert np.array_equal(ranks, fact_ranks(DESCRIBED, names=True, sentences=True, rare=2, names_below=True,
                                                content=True))
        assert content.number_depth == depth and base.number_depth == 3
        heads = blind_heads(ranks, 9, ranks > 0, seed=1)
        shared = content.rank_group(heads, [content.head_scores(p) for p in heads])
        assert [u.tolist() for u in shared.units] == ([list(range(5, 15))] if depth == 2 else
                                                      [list(range(5, 15)), [3]])  # the digits' unit first
    with pytest.raises(ValueError, match="shared-spans"):
        replace(base, fact_content=2, fact_sentences=False)
    with pytest.raises(ValueError, match="shared-spans"):
        replace(base, fact_content=-1)


def test_the_online_method_keeps_a_numbers_whole_sentence_before_any_names_core():
    """A chat is compacted again and again, and what one compaction drops is gone: the online method
    (kvlocal.am.ONLINE_METHOD) keeps "The special magic number for" before the core of a rare name,
    where the document's default (cores first) keeps the name's core first."""
    from kvlocal.am import DEFAULT_METHOD, ONLINE_METHOD, get_method

    text = DESCRIBED[:15] + [" Later", " Iris", " Ivers", " sailed", " home", "."]
    number_tail, name_core = [0, 1, 2, 3, 4], [16, 17, 18, 19]
    for name, tail_first in ((ONLINE_METHOD, True), (DEFAULT_METHOD, False)):
        sel = get_method(name).selector
        ranks = sel.fact_ranks(text)
        assert (ranks[number_tail] > 0).all() and (ranks[name_core] > 0).all()
        heads = blind_heads(ranks, 10, ranks > 0, seed=2)
        order = sel.rank_group(heads, [sel.head_scores(p) for p in heads]).fact_order
        assert (order[number_tail].min() > order[name_core].max()) == tail_first, name


def test_loose_anchoring_fits_the_free_values_closer_and_leaves_the_rest_alone():
    """am-facts-omp-cores-loose (the default) is am-facts-omp-cores-balanced (the default before) but for
    the anchor of its fitted values (0.1, not 1):
    the same keys and beta, the same verbatim facts, the free values nearer least squares (a lower
    fit error on the queries, farther from V[S]); am-facts-omp-cores-long is it on longer self-study."""
    from kvlocal.am import DEFAULT_METHOD, get_method
    from kvlocal.am.fit import compacted_attention

    p = fact_problem(T=120, n=400, t=24, at=[5, 6, 7, 70], seed=9)
    facts = p.fact_mask
    assert DEFAULT_METHOD == "am-facts-omp-cores-loose"
    before, loose = get_method("am-facts-omp-cores-balanced"), get_method(DEFAULT_METHOD)
    assert (before.values.rel, loose.values.rel) == (1.0, 0.1)
    a, b = before.fit(p), loose.fit(p)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.beta, b.beta)
    fixed = facts[a.indices]
    assert fixed.sum() == 4
    for res in (a, b):
        assert np.array_equal(res.values[fixed], p.values[res.indices[fixed]])
    X = compacted_attention(p, a.indices, a.beta)
    Y, V = p.stats().outputs, p.values[a.indices]
    assert np.linalg.norm(X @ b.values - Y) < np.linalg.norm(X @ a.values - Y)
    assert np.linalg.norm(b.values[~fixed] - V[~fixed]) > np.linalg.norm(a.values[~fixed] - V[~fixed])
    long = get_method("am-facts-omp-cores-long")
    assert long.queries == ("repeat", "self-study-long") and before.queries == ("repeat", "self-study")
    assert long.selector == loose.selector and long.values == loose.values and long.query_after == 0.5
    onpolicy = get_method("am-facts-omp-cores-onpolicy")  # the default, staged on-policy
    assert (onpolicy.stages, loose.stages) == (3, 1) and onpolicy.queries == loose.queries
    assert onpolicy.selector == loose.selector and onpolicy.values == loose.values and onpolicy.query_after == 0.5
    chat = get_method("am-facts-omp-balanced-loose")  # the chat default with the document default's anchor
    base = get_method("am-facts-omp-balanced")
    assert chat.selector == base.selector and (base.values.rel, chat.values.rel) == (1.0, 0.1)
    late = get_method("am-facts-omp-cores-late")  # the default fitted on every row asked after the document
    assert late.query_after == 1.0 and late.selector == loose.selector and late.values == loose.values



def test_late5_is_late_up_to_5x_and_loose_beyond():
    """am-facts-omp-cores-late5 is am-facts-omp-cores-late up to 5x and am-facts-omp-cores-loose
    (the default) beyond, to the query row: the same selection rules, values and sources, and the
    share of rows asked after the document that each of them draws."""
    from dataclasses import replace

    from kvlocal.am import Compactor, get_method
    from kvlocal.kv.queryset import QuerySet

    default, late, loose = (get_method(m) for m in ("am-facts-omp-cores-late5", "am-facts-omp-cores-late",
                                                      "am-facts-omp-cores-loose"))
    for other in (late, loose):
        assert replace(default, name=other.name, query_after=other.query_after, late_until=None) == other
    for ratio, like in ((2.0, late), (5.0, late), (5.01, loose), (10.0, loose), (50.0, loose)):
        assert default.after_share(ratio) == like.after_share(ratio) == like.query_after
    rng = np.random.default_rng(3)
    n = 5000
    qs = QuerySet({0: rng.normal(size=(n, 3, 4)).astype(np.float32)}, np.arange(n, dtype=np.int32))
    qs.anchors[:4000] = np.arange(4000)  # 4,000 rows read the document, 1,000 come after it
    for ratio, like in ((5.0, late), (10.0, loose)):
        rows = [Compactor(m, ratio=ratio, holdout=0.0, max_queries_per_head=4096)._split(qs, 1)[0].positions for m in (default, like)]
        assert np.array_equal(rows[0], rows[1])
    fives = [Compactor(m, ratio=5.0, holdout=0.0, max_queries_per_head=4096)._split(qs, 1)[0] for m in (default, loose)]
    assert (fives[0].anchors < 0).sum() == 1000 > (fives[1].anchors < 0).sum()  # every late row, at 5x only
