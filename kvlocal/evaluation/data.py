"""Evaluation data: LEval-QuALITY articles and questions, and multi-needle haystacks (no engine)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvlocalError

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    text: str  # the question and its four options, as LEval writes them
    answer: int  # index of the correct option

    @property
    def stem(self) -> str:
        """The question without its options."""
        return re.split(r"\s*\(A\)", self.text, maxsplit=1)[0].strip()


@dataclass(frozen=True)
class Article:
    index: int
    text: str
    questions: tuple[Question, ...]


FILES = ("leval-quality.jsonl", "squality-dev.jsonl")


def data_dir(path: str | Path | None = None) -> Path:
    """The folder with the evaluation data (default: the ``shared/data`` beside the checkout)."""
    d = Path(path) if path else DEFAULT_DATA
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise KvlocalError(f"evaluation data not found in {d} (no {', '.join(missing)}): pass --data with the "
                           "folder holding LEval-QuALITY and SQuALITY (shared/data of the kvlocal project, "
                           "whose README names their sources)")
    return d


def data_fingerprint(path: str | Path | None = None) -> str:
    """A short hash of the data files, so results on other data are cached apart."""
    h = hashlib.sha256()
    for f in FILES:
        h.update((data_dir(path) / f).read_bytes())
    return h.hexdigest()[:10]


def quality_articles(path: str | Path | None = None) -> list[Article]:
    """The 15 LEval-QuALITY articles with their multiple-choice questions."""
    out = []
    with open(data_dir(path) / "leval-quality.jsonl") as fh:
        for i, line in enumerate(fh):
            row = json.loads(line)
            qs = []
            for text, gold in zip(row["instructions"], row["outputs"], strict=False):
                m = re.match(r"\s*\(([ABCD])\)", gold)
                if m:
                    qs.append(Question(text.strip(), LETTERS.index(m.group(1))))
            out.append(Article(i, row["input"], tuple(qs)))
    return out


def squality_stories(path: str | Path | None = None) -> list[str]:
    with open(data_dir(path) / "squality-dev.jsonl") as fh:
        return [json.loads(line)["document"] for line in fh]


def cut_to_tokens(text: str, n_tokens: int, count_tokens) -> tuple[str, bool]:
    """``text`` cut after the last whole sentence that keeps it within ``n_tokens`` tokens
    (unchanged when it already fits); returns the text and whether it was cut."""
    if count_tokens(text) <= n_tokens:
        return text, False
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s)", text)]
    lo, hi = 0, len(ends)  # the number of sentences kept
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[: ends[mid - 1]]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise KvlocalError(f"the first sentence alone is longer than {n_tokens} tokens")
    return text[: ends[lo - 1]], True


NEEDLE_KEYS = ("lighthouse", "orchard", "violin", "glacier", "lantern", "harbor", "compass", "meadow", "falcon",
               "quarry", "teapot", "satellite", "cathedral", "marble", "bicycle", "volcano")


_FIRST_NAMES = ("Margaret", "Thomas", "Eleanor", "Henry", "Clara", "Walter", "Alice", "Arthur", "Helen", "Oliver",
                "Ruth", "Samuel", "Edith", "George", "Iris", "Felix")
_LAST_NAMES = ("Holloway", "Pemberton", "Ashford", "Whitlock", "Carrow", "Fenwick", "Lindqvist", "Marlowe",
               "Thornbury", "Okafor", "Castellano", "Brandt", "Ivers", "Kowalski", "Draycott", "Sutcliffe")


def _names(rng: random.Random, k: int) -> list[str]:
    """``k`` people, a first and a last name drawn at random, no name used twice: a needle the model
    must read (nothing in the question tells it)."""
    return [f"{a} {b}" for a, b in zip(rng.sample(_FIRST_NAMES, k), rng.sample(_LAST_NAMES, k), strict=True)]


_ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def in_words(n: int) -> str:
    """1 <= n <= 999 as a story writes it: "six hundred and forty-two"."""
    if not 1 <= n <= 999:
        raise ValueError(f"in_words takes 1..999, not {n}")
    hundreds, rest = divmod(n, 100)
    tens, ones = divmod(rest, 10)
    below = _ONES[rest] if rest < 20 else _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if not hundreds:
        return below
    return f"{_ONES[hundreds]} hundred" + (f" and {below}" if rest else "")


def _words(rng: random.Random, k: int) -> list[str]:
    """``k`` different numbers from 101 to 999 that are not whole hundreds, in words."""
    return [in_words(n) for n in rng.sample([n for n in range(101, 1000) if n % 100], k)]


_SPELLED = {in_words(n): n for n in range(1, 1000)}


def _plain(text: str) -> str:
    return " ".join(text.lower().replace("-", " ").split())


@dataclass(frozen=True)
class NeedleKind:
    sentence: str  # the needle, with {key} and {answer}
    question: str  # asking for it, with {key}
    noun: str  # what the answer is ("Answer with the number only.")
    draw: object  # (rng, k) -> k answers
    lead_nll: bool = False  # the answer's NLL is taken after the needle's own lead, as the model answers
    answer_tokens: int = 16  # how long a greedy answer may run
    spelled: bool = False  # the answers are numbers in words: found in words or in digits

    def lead(self, key: str) -> str:
        """The needle's words before its answer ("The keeper of the lantern is")."""
        return self.sentence.split("{answer}")[0].format(key=key).rstrip()

    def found(self, answer: str, text: str) -> bool:
        """Does ``text`` (a greedy answer) give ``answer``?  A number in words counts in digits too,
        and in any case, with or without hyphens."""
        if answer in text:
            return True
        if not self.spelled or answer not in _SPELLED:
            return False
        digits = rf"(?<![\d,.]){_SPELLED[answer]}(?![\d,])"
        return _plain(answer) in _plain(text) or re.search(digits, text) is not None


NEEDLE_KINDS = {
    "number": NeedleKind("The special magic number for {key} is {answer}.",
                         "What is the special magic number for {key}?", "number",
                         lambda rng, k: [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(k)]),
    "name": NeedleKind("The keeper of the {key} is {answer}.", "Who is the keeper of the {key}?", "name", _names,
                       lead_nll=True),
    "words": NeedleKind("The special magic number for {key} is {answer}.",
                        "What is the special magic number for {key}?", "number", _words, lead_nll=True,
                        answer_tokens=24, spelled=True),
}


@dataclass(frozen=True)
class Haystack:
    text: str
    needles: tuple[tuple[str, str], ...]  # (key, answer: seven digits, a first and last name, or words)
    continuation: str  # the story's text right after the cut, for next-token agreement


def make_haystack(story: str, n_tokens: int, count_tokens, k: int = 8, seed: int = 0,
                  continuation_words: int = 120, kind: str = "number") -> Haystack:
    """Cut ``story`` to about ``n_tokens`` tokens and insert ``k`` needles at seeded depths between
    sentences: "The special magic number for X is NNNNNNN." or (``kind`` "name") "The keeper of the X
    is Firstname Lastname." with a name drawn at random, or (``kind`` "words") "The special magic
    number for X is six hundred and forty-two." (a number from 101 to 999 in words)."""
    if kind not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {kind!r}: choose from {', '.join(NEEDLE_KINDS)}")
    needle = NEEDLE_KINDS[kind]
    rng = random.Random(seed)
    words = story.split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix within the budget (needles included)
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) + 16 * k <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    body, rest = " ".join(words[:lo]), " ".join(words[lo:lo + continuation_words])
    sentences = re.split(r"(?<=[.!?])\s+", body)
    keys = rng.sample(NEEDLE_KEYS, k)
    needles = tuple(zip(keys, needle.draw(rng, k), strict=True))
    slots = sorted(rng.sample(range(1, len(sentences)), min(k, len(sentences) - 1)))
    for (key, value), slot in sorted(zip(needles, slots, strict=False), key=lambda x: -x[1]):
        sentences.insert(slot, needle.sentence.format(key=key, answer=value))
    return Haystack(" ".join(sentences), needles, rest)
