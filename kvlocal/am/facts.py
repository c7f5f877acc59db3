"""Fact tokens: the numbers and proper names of a document, from its token texts (no engine).

Attention statistics do not find them.  Measured on SmolLM2-135M with 3,000-token needle
haystacks (bench/results/facts_diagnosis.md): a needle's digits rank, on average over layers, at
the 42nd-59th percentile of every key score we tried — repeat-prefill RMS or max attention,
attention times value displacement, recall-probe attention — and of the model's own surprisal.
A seven-digit number is as "important" as any other token until somebody asks about it, so a
generic score keeps it whole in almost no layer.  Numbers are what users ask about, so
``SharedSpans`` (``fact_share``) keeps the sentences holding them in every head, and am-facts keeps
those keys verbatim and fits everything else around them.  Proper names are found too
(``names=True``), but a story names its people on every page; the ones at risk are those it
names once or twice (``rare``), and am-facts-omp-names and the methods built on it (the default,
am-facts-omp-half) keep those after the numbers, while room is left.  When the facts do not all
fit, ``fact_ranks`` says which go first: the numbers, then their sentences outward from them
(am-facts-omp-near and the methods built on it), since attention cannot tell; am-facts-omp-whole
and the default keep whole numbers with their nearest tokens when not all of them fit
(``kvlocal.am.spans.whole_units``).  Numbers written in words (``number_words``) and names ranked
with the number of their sentence (``names_with_numbers``) were measured and are not used by any
method (bench/results/word_numbers.md, bench/results/whole_numbers.md).

A token is a fact token when it overlaps
  * a number: a digit run, with inner separators (3.5, 1,200, 12:30, 2026-11-24);
  * a proper name: a capitalised word that also appears capitalised in mid-sentence somewhere in
    the document (so "Margaret" counts at the start of a sentence too, "The" does not), or a word
    in capitals of two or more letters (NASA).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SENTENCE_START = re.compile(r"(?:^|[.!?]['\")\]]*\s+|\n\s*|[\"'(\[]\s*)$")


def name_spans(text: str, rare: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the proper names of ``text``; with ``rare``, only of the names mentioned at
    most ``rare`` times (a name the document repeats is held by its other mentions too), and only of
    words that are names wherever they occur (never in lower case: "Deck" in a heading is no name
    when the story says "deck")."""
    words = list(_WORD.finditer(text))
    mid_caps = set()
    for m in words:
        w = m.group()
        if w[0].isupper() and not _SENTENCE_START.search(text[max(0, m.start() - 4):m.start()]):
            mid_caps.add(w)
    found = [m for m in words if m.group() in mid_caps or (len(m.group()) >= 2 and m.group().isupper())]
    if rare is not None:  # and only names: no single letters, no "I'll", no word also written in lower case
        lower = {m.group() for m in words if m.group()[0].islower()}
        found = [m for m in found if len(m.group()) >= 2 and not m.group().startswith("I'")
                 and m.group().lower() not in lower]
        mentions = Counter(m.group() for m in words)
        found = [m for m in found if mentions[m.group()] <= rare]
    return [m.span() for m in found]


_NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
                 "hundred thousand million billion dozen").split()
_NUMBER_WORD = re.compile(r"\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_NUMBER_JOIN = re.compile(r"(?:[ -]|\s+and\s+)", re.IGNORECASE)  # "forty-two", "one hundred and twelve"


def number_word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the numbers ``text`` writes in words ("forty silver crowns", "one hundred
    and twelve steps", "a dozen"), one span per number; "one" alone is left out ("no one", "one
    of them", "One day")."""
    runs: list[list[int]] = []
    for m in _NUMBER_WORD.finditer(text):
        if runs and _NUMBER_JOIN.fullmatch(text, runs[-1][1], m.start()):
            runs[-1][1] = m.end()
        else:
            runs.append([m.start(), m.end()])
    return [(a, b) for a, b in runs if text[a:b].lower() != "one"]


def fact_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the numbers and proper names of ``text``."""
    return sorted([m.span() for m in _NUMBER.finditer(text)] + name_spans(text))


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n")


def fact_mask(pieces: Sequence[str], names: bool = True, sentences: bool = False) -> np.ndarray:
    """bool per token: does token i (its text ``pieces[i]``) overlap a number (or, with ``names``,
    a proper name)?  With ``sentences``, every token of a sentence holding one counts: a number
    is only a fact together with what it is the number of."""
    return fact_ranks(pieces, names, sentences) > 0


TOP_RANK = 255  # the rank of a number (or name) token itself


def as_fact_ranks(facts) -> np.ndarray:
    """``facts`` as uint8 fact ranks: a bool mask gives every fact ``TOP_RANK`` (all alike), integer
    ranks must lie in 0..TOP_RANK."""
    a = np.asarray(facts)
    if a.dtype == bool:
        return np.where(a, TOP_RANK, 0).astype(np.uint8)
    if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > TOP_RANK)):
        raise ValueError(f"facts must be booleans or fact ranks 0..{TOP_RANK}, got {a.dtype}"
                         + (f" from {a.min()} to {a.max()}" if a.size and a.dtype.kind in "iuf" else ""))
    return a.astype(np.uint8)


def fact_ranks(pieces: Sequence[str], names: bool = True, sentences: bool = False,
               rare: int | None = None, names_below: bool = False, names_with_numbers: bool = False,
               number_words: bool = False, name_words: bool = False, content: bool = False) -> np.ndarray:
    """uint8 per token: 0 for a token that is no fact (``fact_mask`` is False), else its rank,
    highest first: ``TOP_RANK`` for a token overlapping a number (or name), one less per token of
    distance from the nearest one in its sentence (at least 1).  A selector that cannot keep
    every fact keeps the numbers and what is next to them before the far end of their sentences.
    ``rare``: only names mentioned at most ``rare`` times count (see ``name_spans``).
    ``names_below``: the names and their sentences rank below every number and its sentence
    (numbers from ``TOP_RANK`` down to ``NAME_RANK + 1``, names from ``NAME_RANK`` down to 1).
    ``names_with_numbers`` (with ``names_below`` and ``sentences``): a name in the sentence of a
    number ranks with the number ("finished in 1889 by Tobias Grell": both are what the sentence
    is about), and that sentence's tokens rank by their distance to the nearer of the two.
    ``number_words``: numbers written in words (``number_word_spans``) are facts too, in the names'
    tier when ``names_below`` (a story writes most of its numbers in words, and many of them are
    incidental: "two men"), else with the numbers.
    ``name_words`` (with ``names_below`` and ``sentences``): a name's sentence ranks by content words
    (``content_distance``), not tokens: "The keeper of the lantern is Iris Ivers." keeps "lantern"
    before "is" and ".", and "keeper" before "of the".
    ``content`` (with ``sentences``): a number's sentence ranks by content words (``content_distance``),
    not tokens: the digits of "the special magic number for violin is 2215279." reach "violin", "is"
    and "number" within three steps, where three tokens reach only " is", "violin" and the space
    before the digits (with ``names_below``, the names' sentences as ``name_words`` says)."""
    lengths = np.array([len(p) for p in pieces], np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    text = "".join(pieces)
    words = content_words(text, starts, ends) if sentences and (content or name_words) else None
    by_words = words if content else None  # a number's sentence by content words
    numbers = [m.span() for m in _NUMBER.finditer(text)]
    found = (name_spans(text, rare) if names else []) + (number_word_spans(text) if number_words else [])
    if not ((names or number_words) and names_below):
        return _outward(text, starts, ends, _overlaps(text, starts, ends, numbers + found), sentences, words=by_words)
    number, name = _overlaps(text, starts, ends, numbers), _overlaps(text, starts, ends, found)
    anchor = number
    if names_with_numbers and sentences and number.any():
        sentence = _sentence_ids(text, ends)
        anchor = number | (name & np.isin(sentence, sentence[number]))
    ranks = _outward(text, starts, ends, anchor, sentences, NAME_RANK + 1, words=by_words)
    below = _outward(text, starts, ends, name, sentences, 1, NAME_RANK, words if name_words else None)
    return np.maximum(ranks, below)


NAME_RANK = 127  # with ``names_below``: the rank of a name token (or number word) itself


def _overlaps(text: str, starts: np.ndarray, ends: np.ndarray, spans) -> np.ndarray:
    """bool per token (its characters starts..ends of ``text``): does it overlap one of ``spans``?"""
    depth = np.zeros(len(text) + 1, np.int64)
    for a, b in spans:
        depth[a] += 1
        depth[b] -= 1
    in_span = np.cumsum(depth)[: len(text)] > 0  # character c lies in some span
    csum = np.concatenate([[0], np.cumsum(in_span)])
    return (csum[ends] - csum[starts]) > 0


def _sentence_ids(text: str, ends: np.ndarray) -> np.ndarray:
    """Per token (ending at character ``ends`` of ``text``): the index of its sentence."""
    bounds = np.array([m.end() for m in _SENTENCE_END.finditer(text)], np.int64)
    return np.searchsorted(bounds, np.maximum(ends - 1, 0), side="right")


_WORD_OR_NUMBER = re.compile(f"{_WORD.pattern}|{_NUMBER.pattern}")
_FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no
of in on at by for to from with without into onto upon over under about above below after before between
through during against among around across along behind beyond near off out up down than as like
and or but nor so yet if then because while when where whether though although unless until
is are was were be been being am do does did done has have had having will would shall should can could
may might must ought
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
who whom whose which what there here not very too also just only
""".split())


def content_words(text: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """int per token (its characters starts..ends of ``text``): the index of the content word it
    belongs to, counted from 0 over the document's content words, or -1 for a token of no content
    word (spaces, punctuation, a function word: "the", "of", "is", "he", ...).  A content word is
    any other word or number; a token that overlaps several words belongs to the first."""
    word = np.full(len(text), -1, np.int64)  # per character: its content word, -1 none
    k = 0
    for m in _WORD_OR_NUMBER.finditer(text):
        if m.group().lower() not in _FUNCTION_WORDS:
            word[m.start():m.end()] = k
            k += 1
    at = np.flatnonzero(word >= 0)  # the characters of content words
    if not len(at):
        return np.full(len(starts), -1, np.int64)
    c = at[np.minimum(np.searchsorted(at, starts), len(at) - 1)]  # each token's first such character (if any)
    return np.where((c >= starts) & (c < ends), word[c], -1)


def content_distance(i: np.ndarray, anchor_at: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The distance of tokens ``i`` from tokens ``anchor_at`` (an anchor each) counted in content
    words (``words``, from ``content_words``): 0 at the anchor, 2k + 1 for a token of a content word
    with k content words between it and the anchor, 2k + 2 for any other token (a function word or
    punctuation ranks after the content word at its side)."""
    has = words >= 0
    first = has & np.concatenate([[True], words[1:] != words[:-1]])  # a content word's first token
    seen = np.cumsum(first)  # content words begun at or before each token
    lo, hi = np.minimum(i, anchor_at), np.maximum(i, anchor_at)
    between = seen[np.maximum(hi - 1, 0)] - seen[lo]  # content words begun strictly between them
    same = has[i] & (words[i] == words[anchor_at])  # a token of the anchor's own word
    between -= (i > anchor_at) & has[i] & ~first[i] & ~same  # i's own word, begun between them
    return np.where(i == anchor_at, 0, np.where(same, 1, 2 * between + np.where(has[i], 1, 2)))


def _outward(text: str, starts: np.ndarray, ends: np.ndarray, anchor: np.ndarray, sentences: bool,
             bottom: int = 1, top: int = TOP_RANK, words: np.ndarray | None = None) -> np.ndarray:
    """``top`` for an anchor token, with ``sentences`` one less per token of distance from the
    nearest anchor of its sentence (at least ``bottom``); 0 elsewhere.  With ``words`` (from
    ``content_words``) the distance counts content words (``content_distance``), not tokens."""
    ranks = np.where(anchor, top, 0).astype(np.uint8)
    if not sentences or not anchor.any():
        return ranks
    sentence = _sentence_ids(text, ends)
    n = len(anchor)
    i = np.arange(n)
    before = np.maximum.accumulate(np.where(anchor, i, -1))  # the nearest anchor at or before i
    after = np.minimum.accumulate(np.where(anchor, i, n)[::-1])[::-1]  # ... at or after i
    far = np.int64(n + TOP_RANK)  # no anchor in the same sentence
    b, a = np.maximum(before, 0), np.minimum(after, n - 1)
    step_b, step_a = (i - before, after - i) if words is None else \
        (content_distance(i, b, words), content_distance(i, a, words))
    d_before = np.where((before >= 0) & (sentence[b] == sentence), step_b, far)
    d_after = np.where((after < n) & (sentence[a] == sentence), step_a, far)
    dist = np.minimum(d_before, d_after)
    return np.where(dist < far, top - np.minimum(dist, top - bottom), 0).astype(np.uint8)
