"""Session files served to stateless chat requests: lazy loading, one request per session at a
time, and the reuse of the cells a request shares with the previous one.

OpenAI-style requests carry the whole conversation every time.  ``ServedSession`` keeps the
tokens its context holds after the compacted document (``held``); a request's prompt is compared
token by token with them and only what follows the longest common prefix is decoded.  When the
conversation compacted itself (online compaction) inside that common prefix, the cells cannot be
rewound into and the session starts again from its file's state.

``SessionPool`` loads a session on its first request, holds at most ``max_loaded`` of them (the
least recently used idle one is let go first) and serves the requests of one session one at a
time - the others wait in line.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from ..api import CHAT_BUDGET, CompactedSession
from ..engine import binding
from ..engine.sampling import Sampler
from ..errors import ContextFullError, KvlocalError
from ..online import OnlineSettings
from ..sessionfile import check_compatible, read_info


class UnknownSession(KvlocalError):
    """A request named a session the server does not serve."""


class ContextFull(KvlocalError):
    """A conversation that does not fit the session's context."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class StopText:
    """Text in as it is generated, out once it can no longer be the start of a stop string;
    ``hit`` once a stop string was met (the text stops just before it)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops or () if s]
        self.held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[: min(found)]
        keep = max([k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])] + [0])
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out


@dataclass
class Generation:
    """One request's answer, generated as it is read; ``close`` hands the session back."""

    prompt_tokens: int
    cached_tokens: int
    pieces: Iterator[str]
    release: Callable[[], None]
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list | None = None  # per generated token, when asked for (OpenAI's logprobs.content)
    _closed: bool = field(default=False, repr=False)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        return next(self.pieces)

    def text(self) -> str:
        try:
            return "".join(self)
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.pieces.close()
            finally:
                self.release()


class ServedSession:
    """One session file behind the API (see the module docstring)."""

    def __init__(self, name: str, path: Path, meta: dict, model: binding.Model, *, online: OnlineSettings | None,
                 threads: int | None, chat_budget: int):
        self.name, self.path, self.meta, self.model = name, path, meta, model
        self.online, self.threads, self.chat_budget = online, threads, chat_budget
        self.lock = threading.Lock()  # one request at a time
        self.conv: CompactedSession | None = None
        self.stats: Counter = Counter()  # requests, prompt_tokens, cached_tokens, decoded_tokens, restarts, loads

    # loading ----------------------------------------------------------------------------------
    def load(self) -> None:
        self.conv = CompactedSession(str(self.path), self.model, chat_budget=self.chat_budget, threads=self.threads,
                                     online=self.online)
        self.stats["loads"] += 1

    def unload(self) -> None:
        if self.conv is not None:
            self.conv.close()
        self.conv = None

    @property
    def held(self) -> list[int]:
        """The tokens the context holds after the session's base (read off the session's history)."""
        return self.conv.conversation_tokens if self.conv is not None else []

    # answering --------------------------------------------------------------------------------
    def generate(self, turns: list[dict], *, max_tokens: int, sampler: Sampler, stops: Sequence[str],
                 release=lambda: None, logprobs: int | None = None) -> Generation:
        """Decode what ``turns`` add to the cells this session holds and return the answer's
        generator (the caller holds ``lock``; ``release`` runs when the generation is closed).
        ``logprobs``: record each token's log-probability and that many alternatives."""
        conv = self.conv
        s = conv.session
        prompt = [int(t) for t in s.chat_tokens(turns)]
        self.stats["requests"] += 1
        try:
            n = self._reuse(prompt)
            tokens = conv.continue_tokens(prompt[n:], max_tokens=max_tokens, sampler=sampler, with_logits=True)
            first = next(tokens, None)  # the prompt is decoded here: a context error comes before any answer
        except ContextFullError as exc:
            self._forget()
            raise ContextFull(f"the conversation ({len(prompt)} tokens) does not fit {self.name}'s context "
                              f"({s.n_ctx} cells, {conv.session.cells[0]} taken by the document): {exc}") from exc
        except BaseException:
            self._forget()
            raise
        self.stats["prompt_tokens"] += len(prompt)
        self.stats["cached_tokens"] += n
        self.stats["decoded_tokens"] += len(prompt) - n
        gen = Generation(len(prompt), n, iter(()), release, logprobs=None if logprobs is None else [])
        gen.pieces = self._pieces(gen, first, tokens, stops, max_tokens, logprobs)
        return gen

    def _pieces(self, gen: Generation, first, tokens, stops, max_tokens: int, logprobs: int | None) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = StopText(stops)
        step = first
        try:
            while step is not None:
                tok, logits = step
                if logprobs is not None:
                    gen.logprobs.append(self._logprob(tok, logits, logprobs))
                gen.completion_tokens += 1
                out = stop.feed(decoder.decode(self.model.token_bytes(tok)))
                if out:
                    yield out
                if stop.hit:
                    gen.finish_reason = "stop"
                    return
                step = next(tokens, None)
            gen.finish_reason = "length" if gen.completion_tokens >= max_tokens else "stop"  # else: end of turn
            out = stop.feed(decoder.decode(b"", final=True)) + stop.flush()
            if out:
                yield out
        except Exception:
            self._forget()
            raise
        finally:
            tokens.close()

    def _logprob(self, tok: int, logits, top: int) -> dict:
        """OpenAI's logprobs entry of ``tok``: its log-probability under ``logits`` (float64 log-softmax)
        and the ``top`` likeliest tokens'."""
        lp = log_softmax(np.asarray(logits, np.float64))

        def entry(t: int) -> dict:
            raw = self.model.token_bytes(int(t))
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(lp[t]), "bytes": list(raw)}
        return {**entry(tok), "top_logprobs": [entry(t) for t in np.argsort(-lp, kind="stable")[:top]]}

    def _reuse(self, prompt: list[int]) -> int:
        """Rewind to the longest common prefix of ``prompt`` and the held tokens (less one: the
        last prompt token is decoded again for its logits); returns how many prompt tokens stay."""
        conv = self.conv
        n = min(common_prefix(self.held, prompt), len(prompt) - 1)
        if n < conv.compacted_until - conv.base:  # compacted cells cannot be rewound into
            conv.restart()
            n = 0
            self.stats["restarts"] += 1
        conv.session.rewind(conv.base + n)
        return n

    def _forget(self) -> None:
        """After an error: back to the file's state (what the cells hold is not known for sure)."""
        if self.conv is not None:
            self.conv.restart()

    def card(self) -> dict:
        m = self.meta
        report = m["compaction.report"]
        return {"id": self.name, "created": int(self.path.stat().st_mtime),
                "document": str(report.get("document") or self.path.name), "cells": m["cache.n_cells"],
                "tokens": m["cache.logical_length"],
                "ratio": float((report.get("summary") or {}).get("overall_ratio") or m["compaction.ratio"]),
                "method": m["compaction.method"]}


class SessionPool:
    """The session files a server answers from, loaded lazily, at most ``max_loaded`` at once."""

    def __init__(self, paths: Sequence[str | Path], model: str | binding.Model, *, max_loaded: int = 2,
                 online: OnlineSettings | None = OnlineSettings(), threads: int | None = None,
                 chat_budget: int = CHAT_BUDGET):
        if not paths:
            raise KvlocalError("serve needs at least one session file")
        if max_loaded < 1:
            raise KvlocalError("max_loaded must be at least 1")
        self.model, self._own_model = binding.borrow_or_open(model)
        try:
            self.sessions: dict[str, ServedSession] = {}
            for p in map(Path, paths):
                meta = read_info(p)  # every file checked now: a bad one stops the server before it starts
                check_compatible(meta, self.model, p)
                name = p.stem
                if name in self.sessions:
                    raise KvlocalError(f"two session files are named {name!r} ({self.sessions[name].path} and {p}): "
                                       "rename one, the name is what requests ask for")
                self.sessions[name] = ServedSession(name, p, meta, self.model, online=online, threads=threads,
                                                    chat_budget=chat_budget)
        except BaseException:
            self.close()
            raise
        self.max_loaded = max_loaded
        self._cond = threading.Condition()
        self._loaded: OrderedDict[str, ServedSession] = OrderedDict()  # least recently used first

    def get(self, name: str) -> ServedSession:
        try:
            return self.sessions[name]
        except KeyError:
            raise UnknownSession(f"the model {name!r} does not exist: this server serves "
                                 f"{', '.join(sorted(self.sessions))}") from None

    @contextmanager
    def use(self, name: str):
        """The session ``name``, loaded, for one request at a time (later ones wait here)."""
        served, release = self.acquire(name)
        try:
            yield served
        finally:
            release()

    def acquire(self, name: str) -> tuple[ServedSession, Callable[[], None]]:
        """Like ``use`` for an answer read later (streamed): the session and the function that
        hands it back."""
        served = self.get(name)
        served.lock.acquire()
        try:
            self._make_loaded(served)
        except BaseException:
            served.lock.release()
            raise

        def release():
            served.lock.release()
            with self._cond:
                self._cond.notify_all()
        return served, release

    def _make_loaded(self, served: ServedSession) -> None:
        with self._cond:
            if served.name in self._loaded:
                self._loaded.move_to_end(served.name)
                return
            while len(self._loaded) >= self.max_loaded:  # let the least recently used idle one go
                victim = next((v for v in self._loaded.values() if v.lock.acquire(blocking=False)), None)
                if victim is None:
                    self._cond.wait(timeout=1.0)
                    continue
                try:
                    del self._loaded[victim.name]
                    victim.unload()
                finally:
                    victim.lock.release()
            self._loaded[served.name] = served  # the slot is taken before the (slow) load
        try:
            served.load()
        except BaseException:
            with self._cond:
                self._loaded.pop(served.name, None)
                self._cond.notify_all()
            raise

    @property
    def loaded(self) -> list[str]:
        with self._cond:
            return list(self._loaded)

    def close(self) -> None:
        for served in getattr(self, "sessions", {}).values():
            served.unload()
        if self._own_model:
            self.model.close()


def sampler_for(temperature: float, top_p: float, seed: int | None) -> Sampler:
    return Sampler(temperature=temperature, top_p=top_p, seed=seed if seed is not None else time.time_ns() % 2 ** 32)
