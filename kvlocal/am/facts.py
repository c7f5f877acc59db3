"""Fact tokens: the numbers and proper names of a document, from its token texts (no engine).

Attention statistics do not find them.  Measured on SmolLM2-135M with 3,000-token needle
haystacks (bench/results/facts_diagnosis.md): a needle's digits rank, on average over layers, at
the 42nd-59th percentile of every key score we tried — repeat-prefill RMS or max attention,
attention times value displacement, recall-probe attention — and of the model's own surprisal.
A seven-digit number is as "important" as any other token until somebody asks about it, so a
generic score keeps it whole in almost no layer.  Numbers are what users ask about, so
``SharedSpans`` (``fact_share``) keeps the sentences holding them in every head, and am-facts keeps
those keys verbatim and fits everything else around them; proper names are found too
(``names=True``) but are too many in a story to keep whole.

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
    mask = (csum[ends] - csum[starts]) > 0
    if sentences and mask.any():
        bounds = np.array([m.end() for m in _SENTENCE_END.finditer(text)], np.int64)
        sentence = np.searchsorted(bounds, np.maximum(ends - 1, 0), side="right")
        mask = np.isin(sentence, np.unique(sentence[mask]))
    return mask
