"""Scoring on a prepared session: reference-answer NLL, multiple choice, needles, next-token agreement.

Every function leaves the session as it found it (it rewinds to the length it started at).
"""

from __future__ import annotations

import contextlib

import numpy as np
from scipy.special import log_softmax

from ..engine.session import Session
from .data import LETTERS, NEEDLE_KINDS, Question

SYSTEM = "You answer questions about the document the user shares."
ANSWER_HINT = "\nAnswer with the letter of the correct option, then explain briefly."
OPEN_HINT = "\nAnswer in one or two sentences, with details from the document."


@contextlib.contextmanager
def rewound(s: Session):
    start = s.n_past
    try:
        yield
    finally:
        s.rewind(start)


def completion_style(s: Session) -> bool:
    """A model without a chat template (a base model) is asked in completion style."""
    return s.model.chat_template() is None


def question_prompt(s: Session, q: Question) -> np.ndarray:
    """The multiple-choice prompt: the question with its options."""
    if completion_style(s):
        return s.tokenize(f"\n\nQuestion: {q.text}\n")
    return s.chat_tokens([{"role": "user", "content": q.text + ANSWER_HINT}])


def open_prompt(s: Session, q: Question) -> np.ndarray:
    """The open-answer prompt of the retention metric: the question without its options, so that the
    answer has to come from the document (the options alone make it predictable without one)."""
    if completion_style(s):
        return s.tokenize(f"\n\nQuestion: {q.stem}\nAnswer:")
    return s.chat_tokens([{"role": "user", "content": q.stem + OPEN_HINT}])


def greedy(s: Session, prompt: np.ndarray, max_tokens: int) -> list[int]:
    with rewound(s):
        return s.generate(prompt, max_tokens=max_tokens)


def answer_nll(s: Session, prompt: np.ndarray, answer: list[int]) -> float:
    """Mean negative log-likelihood per token of ``answer`` after ``prompt``."""
    if not answer:
        return float("nan")
    with rewound(s):
        logits = s.decode(np.concatenate([prompt, np.asarray(answer, np.int32)]), logits="all")
    lp = log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(answer)].astype(np.float64), axis=-1)
    return float(-lp[np.arange(len(answer)), answer].mean())


def multiple_choice(s: Session, q: Question) -> bool:
    """Is the most likely letter after "Answer: (" the correct one?"""
    prompt = np.concatenate([question_prompt(s, q), s.tokenize("Answer: (", special=False)])
    letters = [int(s.tokenize(x, special=False)[-1]) for x in LETTERS]
    with rewound(s):
        logits = s.decode(prompt)[-1]
    return int(np.argmax(logits[letters])) == q.answer


def needle_prompt(s: Session, key: str, kind: str = "number") -> np.ndarray:
    """The needle question: a chat turn, or for a model without a chat template (a base model)
    a completion that the answer continues."""
    needle = NEEDLE_KINDS[kind]
    question = needle.question.format(key=key)
    if completion_style(s):
        return s.tokenize(f"\n\nQuestion: {question}\nAnswer: {needle.lead(key)}")
    return s.chat_tokens([{"role": "user", "content": f"{question} Answer with the {needle.noun} only."}])


def needle_found(s: Session, key: str, answer: str, max_tokens: int | None = None, kind: str = "number") -> bool:
    """Does the greedy answer to the needle's question hold ``answer`` (the number, the whole name, or
    a number in words, written either way)?"""
    needle = NEEDLE_KINDS[kind]
    prompt = needle_prompt(s, key, kind)
    return needle.found(answer, s.model.detokenize(greedy(s, prompt, max_tokens or needle.answer_tokens)))


def needle_nll(s: Session, key: str, answer: str, kind: str = "number") -> float:
    """How likely the right answer is to its question, found or not: mean NLL per token of
    ``answer`` (the number, or the name) teacher-forced after the needle prompt (for a name or a
    number in words asked in a chat, after the words the model answers with: "The keeper of the X
    is")."""
    prompt = needle_prompt(s, key, kind)
    if NEEDLE_KINDS[kind].lead_nll:
        if not completion_style(s):
            prompt = np.concatenate([prompt, s.tokenize(NEEDLE_KINDS[kind].lead(key), special=False)])
        answer = " " + answer
    return answer_nll(s, prompt, [int(t) for t in s.tokenize(answer, special=False)])


def continuation_logprobs(s: Session, tokens: np.ndarray) -> np.ndarray:
    """log p of every next token along ``tokens`` teacher-forced after the context: [len, n_vocab]."""
    with rewound(s):
        logits = s.decode(tokens, logits="all")
    return log_softmax(logits.astype(np.float64), axis=-1).astype(np.float32)


def agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Mean KL(ref || got) per position and top-1 agreement of two next-token distributions."""
    p = np.exp(ref.astype(np.float64))
    kl = (p * (ref.astype(np.float64) - got.astype(np.float64))).sum(axis=-1)
    return {"kl": float(kl.mean()), "top1": float((ref.argmax(-1) == got.argmax(-1)).mean())}
