"""The Python API: compact a document, save it, reload it and chat.

    kv = kvlocal.open("SmolLM2-135M-Instruct.Q4_1.gguf")
    kv.ingest(open("story.txt").read())
    report = kv.compact(ratio=20, method="am-highest", queries="repeat")
    kv.save("story.kvs")

    s = kvlocal.load("story.kvs", "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(s.ask("Who caught the lobster?"))
    for piece in s.chat("And then?", stream=True):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict

import numpy as np
from tqdm import tqdm

from .am import DEFAULT_METHOD
from .engine import binding
from .engine.sampling import GREEDY, Sampler
from .engine.session import DocumentError, DocumentLayout, Session
from .errors import KvlocalError
from .kv.cache import CompactedCache, KVSnapshot
from .pipeline import CompactionSettings, CompactionSummary, IngestedDocument, pad
from .sessionfile import SessionData, SessionFileError, check_compatible, read_session, save_session

CHAT_BUDGET = 1024  # free cells a reloaded session keeps for the conversation


class _Conversation:
    """ask()/chat() on a session whose sequence 0 holds a (compacted) document of length ``base``."""

    session: Session
    base: int
    messages: list

    def _turn(self, content: str, max_tokens: int, sampler: Sampler, keep: bool) -> Iterator[str]:
        s = self.session
        start = s.n_past
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        try:
            logits = s.decode(s.chat_tokens([{"role": "user", "content": content}]))[-1]
            for _ in range(max_tokens):
                tok = sampler(logits)
                if s.model.is_eog(tok):
                    break
                logits = s.decode([tok])[-1]  # in the cache before it is shown: an interrupted turn stays whole
                piece = decoder.decode(s.model.token_bytes(tok))
                if piece:
                    pieces.append(piece)
                    yield piece
            tail = decoder.decode(b"", final=True)
            if tail:
                pieces.append(tail)
                yield tail
        finally:
            if keep:
                s.decode(s.turn_end(), logits="none")
                self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": "".join(pieces)}]
            else:
                s.rewind(start)

    def _run(self, content: str, max_tokens: int, stream: bool, sampler: Sampler | None, keep: bool):
        if not content or not content.strip():
            raise KvlocalError("the message is empty")
        it = self._turn(content, max_tokens, sampler or GREEDY, keep)
        return it if stream else "".join(it).strip()

    def ask(self, question: str, *, max_tokens: int = 256, stream: bool = False, sampler: Sampler | None = None):
        """One answer from the context; the conversation is left as it was."""
        return self._run(question, max_tokens, stream, sampler, keep=False)

    def chat(self, message: str, *, max_tokens: int = 256, stream: bool = False, sampler: Sampler | None = None):
        """One turn of a conversation that the next turn continues."""
        return self._run(message, max_tokens, stream, sampler, keep=True)

    def reset(self) -> None:
        """Forget the conversation; the document stays."""
        self.session.rewind(self.base)
        self.messages = []

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Compaction(_Conversation):
    """A model, a document and its compaction (``kvlocal.open``)."""

    def __init__(self, model: str | binding.Model, *, n_ctx: int | None = None, threads: int | None = None,
                 progress: bool = True, verbose: bool = False):
        """``model``: a GGUF path, or a loaded ``binding.Model`` to share (not closed here)."""
        binding.set_verbose(verbose)
        self.model, self._own_model = binding.borrow_or_open(model)
        self.n_ctx, self.threads, self.progress = n_ctx, threads, progress
        self.doc: IngestedDocument | None = None
        self.cache: CompactedCache | None = None
        self.report: CompactionSummary | None = None
        self.messages: list = []
        self.timings: dict = {}

    # the ingested document's parts, as before the pipeline held them
    session = property(lambda self: self.doc.session if self.doc is not None else None)
    layout = property(lambda self: self.doc.layout if self.doc is not None else None)
    snapshot = property(lambda self: self.doc.snapshot if self.doc is not None else None)
    full_kv_bytes = property(lambda self: self.doc.full_kv_bytes if self.doc is not None else 0)

    def close(self) -> None:
        if self.doc is not None:
            self.doc.close()
        if self._own_model:
            self.model.close()

    def ingest(self, text: str, *, system: str | None = None) -> DocumentLayout:
        """Ingest the document (its context-prefill queries are captured on the way)."""
        if self.doc is not None:
            raise DocumentError("a document is already ingested; open a new one for another document")
        self.doc = IngestedDocument.ingest(self.model, text, system=system, n_ctx=self.n_ctx, threads=self.threads,
                                           progress=self.progress)
        self.timings["ingest_s"] = self.doc.ingest_s
        self.base = self.doc.layout.length
        return self.doc.layout

    def compact(self, ratio: float = 10.0, method: str = DEFAULT_METHOD, queries: str | Sequence[str] | None = None,
                budgets: str = "uniform", recent_window: int = 0, chunk_size: int | None = None,
                max_queries_per_head: int = 4096, holdout: float = 0.1, seed: int = 0,
                progress: bool | None = None, settings: CompactionSettings | None = None) -> CompactionSummary:
        """Compact the ingested document in place and return the summary.  ``settings`` (checked
        already) replaces the keyword arguments."""
        if settings is None:
            settings = CompactionSettings(ratio, method, queries or None, budgets, recent_window, chunk_size,
                                          max_queries_per_head, holdout, seed)
        if self.doc is None:
            raise KvlocalError("ingest a document first")
        # compaction always starts from the full cache: compacting again replaces the last result
        # (and the conversation held on top of it)
        show = self.progress if progress is None else progress
        with tqdm(total=len(self.doc.snapshot.keys), desc="fit", unit="layer", disable=not show, leave=False) as bar:
            def tick(done, total):
                bar.total = total
                bar.n = done
                bar.refresh()

            run = self.doc.compact(settings, progress=tick)
        self.timings["queries_s"], self.timings["fit_s"] = run.queries_s, run.fit_s
        self.cache = run.cache
        self.messages = []
        self.report = CompactionSummary.of(run, self.doc)
        return self.report

    def save(self, path: str) -> int:
        """Write the compacted session (atomically); returns the file size in bytes."""
        if self.cache is None:
            raise KvlocalError("compact the document before saving it")
        t0 = time.perf_counter()
        size = save_session(path, self.model, self.doc.snapshot, self.cache, self.doc.layout, self.session.tokens,
                            self.base, self.messages, {**asdict(self.report), "timings": dict(self.timings)})
        self.timings["save_s"] = time.perf_counter() - t0
        return size


class CompactedSession(_Conversation):
    """A session reloaded from a file (``kvlocal.load``): ask() and chat() on the compacted context."""

    def __init__(self, path: str, model: str | binding.Model, *, chat_budget: int = CHAT_BUDGET,
                 threads: int | None = None, verbose: bool = False):
        """``model``: a GGUF path, or a loaded ``binding.Model`` to share (not closed here)."""
        binding.set_verbose(verbose)
        t0 = time.perf_counter()
        data = read_session(path)
        self.model, self._own_model = binding.borrow_or_open(model)
        self.session = None
        try:
            check_compatible(data.meta, self.model, path)
            self.session = Session(self.model, n_ctx=pad(data.meta["cache.n_cells"] + chat_budget),
                                   n_threads=threads, progress=False)
            self._load(data, path)
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - t0

    def switch(self, path: str) -> None:
        """Load another session file of the same model into this context (no new context);
        the current conversation and document are replaced."""
        t0 = time.perf_counter()
        data = read_session(path)
        check_compatible(data.meta, self.model, path)
        if data.meta["cache.n_cells"] + 64 > self.session.n_ctx:
            raise SessionFileError(f"{path} needs {data.meta['cache.n_cells']} cells; this context holds "
                                   f"{self.session.n_ctx}: load it with kvlocal.load")
        self._load(data, path)
        self.load_seconds = time.perf_counter() - t0

    def _load(self, data: SessionData, path: str) -> None:
        m = data.meta
        if list(self.session.info.base_layers) != data.layer_ids:
            raise SessionFileError(f"{path} holds layers {data.layer_ids}, the model compacts "
                                   f"{list(self.session.info.base_layers)}")
        snap = KVSnapshot.from_arrays(data.positions, data.keys, data.values, data.layer_ids, data.swa_state)
        cache = CompactedCache(np.asarray(data.positions), snap.keys, snap.values,
                               [np.asarray(b, np.float32) for b in data.bias], m["cache.logical_length"])
        self.session.inject(cache, snap)
        self.meta = m
        self.base = self.session.n_past
        self.messages = [dict(msg) for msg in m["chat.messages"]]
        if m.get("chat.tokens"):  # replay the conversation saved with the session, token for token
            self.session.ingest(np.asarray(m["chat.tokens"], np.int32), desc="chat")

    def close(self) -> None:
        if getattr(self, "session", None) is not None:
            self.session.close()
        if self._own_model:
            self.model.close()
