"""Fact tokens: the numbers and proper names of a document, from its token texts (no engine).

Attention statistics do not find them.  Measured on SmolLM2-135M with 3,000-token needle
haystacks (bench/results/facts_diagnosis.md): a needle's digits rank, on average over layers, at
the 42nd-59th percentile of every key score we tried — repeat-prefill RMS or max attention,
attention times value displacement, recall-probe attention — and of the model's own surprisal.
A seven-digit number is as "important" as any other token until somebody asks about it, so a
generic score keeps it whole in almost no layer.  Numbers are what users ask about, so
``SharedSpans`` (``fact_share``) keeps the sentences holding them in every head, and am-facts keeps
those keys verbatim and fits everything else around them; proper names are found too
(``names=True``) but are too many in a story to keep whole.  When the facts do not all fit,
``fact_ranks`` says which go first: the numbers, then their sentences outward from them
(am-facts-omp-near, the default), since attention cannot tell.

A token is a fact token when it overlaps
  * a number: a digit run, with inner separators (3.5, 1,200, 12:30, 2026-11-24);
  * a proper name: a capitalised word that also appears capitalised in mid-sentence somewhere in
    the document (so "Margaret" counts at the start of a sentence too, "The" does not), or a word
    in capitals of two or more letters (NASA).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SENTENCE_START = re.compile(r"(?:^|[.!?]['\")\]]*\s+|\n\s*|[\"'(\[]\s*)$")


def fact_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the numbers and proper names of ``text``."""
    spans = [m.span() for m in _NUMBER.finditer(text)]
    words = list(_WORD.finditer(text))
    mid_caps = set()
    for m in words:
        w = m.group()
        if w[0].isupper() and not _SENTENCE_START.search(text[max(0, m.start() - 4):m.start()]):
            mid_caps.add(w)
    for m in words:
        w = m.group()
        if w in mid_caps or (len(w) >= 2 and w.isupper()):
            spans.append(m.span())
    return sorted(spans)


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


def fact_ranks(pieces: Sequence[str], names: bool = True, sentences: bool = False) -> np.ndarray:
    """uint8 per token: 0 for a token that is no fact (``fact_mask`` is False), else its rank,
    highest first: ``TOP_RANK`` for a token overlapping a number (or name), one less per token of
    distance from the nearest one in its sentence (at least 1).  A selector that cannot keep
    every fact keeps the numbers and what is next to them before the far end of their sentences."""
    lengths = np.array([len(p) for p in pieces], np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    text = "".join(pieces)
    depth = np.zeros(len(text) + 1, np.int64)
    spans = fact_spans(text) if names else [m.span() for m in _NUMBER.finditer(text)]
    for a, b in spans:
        depth[a] += 1
        depth[b] -= 1
    in_span = np.cumsum(depth)[: len(text)] > 0  # character c lies in some span
    csum = np.concatenate([[0], np.cumsum(in_span)])
    anchor = (csum[ends] - csum[starts]) > 0
    ranks = np.where(anchor, TOP_RANK, 0).astype(np.uint8)
    if not sentences or not anchor.any():
        return ranks
    bounds = np.array([m.end() for m in _SENTENCE_END.finditer(text)], np.int64)
    sentence = np.searchsorted(bounds, np.maximum(ends - 1, 0), side="right")
    n = len(pieces)
    i = np.arange(n)
    before = np.maximum.accumulate(np.where(anchor, i, -1))  # the nearest anchor at or before i
    after = np.minimum.accumulate(np.where(anchor, i, n)[::-1])[::-1]  # ... at or after i
    far = np.int64(n + TOP_RANK)  # no anchor in the same sentence
    d_before = np.where((before >= 0) & (sentence[np.maximum(before, 0)] == sentence), i - before, far)
    d_after = np.where((after < n) & (sentence[np.minimum(after, n - 1)] == sentence), after - i, far)
    dist = np.minimum(d_before, d_after)
    return np.where(dist < far, TOP_RANK - np.minimum(dist, TOP_RANK - 1), 0).astype(np.uint8)
