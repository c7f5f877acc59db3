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
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace

import numpy as np
from tqdm import tqdm

from .am import DEFAULT_METHOD
from .engine import binding
from .engine.sampling import GREEDY, Sampler
from .engine.session import DocumentError, DocumentLayout, Session
from .errors import KvlocalError
from .kv.cache import CompactedCache, KVSnapshot
from .online import ChatCompactor, OnlineRecord, OnlineSettings, current_cache
from .pipeline import CompactionSettings, CompactionSummary, IngestedDocument, pad
from .streaming import StreamedDocument, one_shot_fits, streams
from .sessionfile import SessionData, SessionFileError, check_compatible, read_session, save_session
from .sessionfile.schema import MAX_NAME
from .summarize import SummaryRecord, SummarySettings, summarize

CHAT_BUDGET = 1024  # free cells a reloaded session keeps for the conversation


class _Conversation:
    """ask()/chat() on a session whose sequence 0 holds a (compacted) document of length ``base``.

    With ``auto_compact(OnlineSettings(...))`` the conversation compacts its older part when the
    context fills instead of failing (``kvlocal.online``); ``online_records`` lists what each
    compaction did."""

    session: Session
    base: int
    messages: list
    online: ChatCompactor | None = None
    _origin: list | None = None  # what the cells of the last injected cache hold (original positions)

    def auto_compact(self, settings: OnlineSettings | None = OnlineSettings()) -> None:
        """Compact the conversation's older part whenever the context fills (None: never)."""
        if settings is None:
            self.online = None
            return
        if self.session is None or self._origin is None:
            raise KvlocalError("compact or load a document before the conversation can compact itself")
        self.online = ChatCompactor(settings, start=self._doc_length)
        self.online.limit(self.session)  # max_context checked now
        self.online.capture(self.session)

    @property
    def online_records(self) -> list[OnlineRecord]:
        return list(self.online.records) if self.online is not None else []

    def _conversation_texts(self, lo: int) -> list[str]:
        s = self.session
        n = s.n_past - lo
        known = s.tokens[max(0, len(s.tokens) - n):]
        # before the tokens this process decoded: a conversation compacted in an earlier one
        return [""] * (n - len(known)) + [s.model.detokenize([t]) for t in known]

    def make_room(self, n: int) -> None:
        """Make sure ``n`` more tokens fit, compacting the conversation if it compacts itself
        (every decode of the conversation does; callers that decode on ``session`` directly too)."""
        if self.online is not None:
            origin = self.online.ensure(self.session, n, self._conversation_texts, self._origin)
            if origin is not None:
                self._origin = origin

    def _decode(self, tokens) -> np.ndarray:
        self.make_room(len(tokens) + len(self._turn_end))
        return self.session.decode(tokens)

    @contextlib.contextmanager
    def _decoding(self):
        """Around every decode of the conversation: the turn end is known (room is made for it)
        and, when the conversation compacts itself, its queries are captured."""
        s = self.session
        self._turn_end = s.turn_end()
        with s.capturing(self.online.capture(s) if self.online is not None else None):
            yield

    def _turn(self, content: str, max_tokens: int, sampler: Sampler, keep: bool) -> Iterator[str]:
        with self._decoding():
            yield from self._turn_captured(content, max_tokens, sampler, keep)

    def _turn_captured(self, content: str, max_tokens: int, sampler: Sampler, keep: bool) -> Iterator[str]:
        s = self.session
        start = s.n_past
        compactions = len(self.online_records)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        try:
            for tok in self._tokens(s.chat_tokens([{"role": "user", "content": content}]), max_tokens, sampler):
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
                s.decode(self._turn_end, logits="none")
                self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": "".join(pieces)}]
            elif all(r.region[1] <= start for r in self.online_records[compactions:]):
                s.rewind(start)  # whatever was compacted lies before the question
            else:  # the question was compacted into the past: it stays, as a turn without an answer
                s.decode(self._turn_end, logits="none")
                self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": "".join(pieces)}]

    def _tokens(self, prompt, max_tokens: int, sampler: Sampler, with_logits: bool = False) -> Iterator:
        """Decode ``prompt``, then sample up to ``max_tokens``; each token is in the cache before it
        is yielded (an interrupted turn stays whole); an end-of-generation token ends it, undecoded.
        ``with_logits``: yield (token, the logits it was sampled from) instead."""
        logits = self._feed(prompt)[-1]
        for _ in range(max_tokens):
            tok = sampler(logits)
            if self.session.model.is_eog(tok):
                return
            seen = logits
            logits = self._decode([tok])[-1]
            yield (tok, seen) if with_logits else tok

    def _feed(self, tokens) -> np.ndarray:
        """Decode ``tokens``; a conversation that compacts itself takes them in steps of half its
        recent window, so that compaction has queries of them to fit against."""
        step = max(1, self.online.settings.keep_recent // 2) if self.online is not None else max(1, len(tokens))
        out = None
        for i in range(0, len(tokens), step):
            out = self._decode(tokens[i:i + step])
        return out

    def continue_tokens(self, tokens, *, max_tokens: int = 256, sampler: Sampler | None = None,
                        with_logits: bool = False) -> Iterator:
        """Decode ``tokens`` (at least one) after what the session holds - the caller's own prompt,
        template and all - and sample up to ``max_tokens`` after them, yielding each token once it
        is in the cache (with ``with_logits``: with the logits it was sampled from); nothing is
        rewound or closed afterwards (``kvlocal.server`` keeps the cells for the next request).  A
        conversation that compacts itself does so on the way."""
        if len(tokens) < 1:
            raise KvlocalError("continue_tokens needs at least one token to decode")
        with self._decoding():
            yield from self._tokens(tokens, max_tokens, sampler or GREEDY, with_logits)

    @property
    def conversation_tokens(self) -> list[int]:
        """The tokens after ``base`` (what was decoded on top of the document and saved chat)."""
        s = self.session
        n = s.n_past - self.base
        return s.tokens[len(s.tokens) - n:] if n > 0 else []

    @property
    def compacted_until(self) -> int:
        """The position before which the conversation compacted itself (its cells cannot be rewound
        into); ``base`` when it did not."""
        return max([self.base] + [r.region[1] for r in self.online_records])

    def _run(self, content: str, max_tokens: int, stream: bool, sampler: Sampler | None, keep: bool):
        if not content or not content.strip():
            raise KvlocalError("the message is empty")
        it = self._turn(content, max_tokens, sampler or GREEDY, keep)
        return it if stream else "".join(it).strip()

    def ask(self, question: str, *, max_tokens: int = 256, stream: bool = False, sampler: Sampler | None = None):
        """One answer from the context; the conversation is left as it was - unless the context
        filled while answering and the conversation compacted itself over the question, which then
        stays in it as a turn."""
        return self._run(question, max_tokens, stream, sampler, keep=False)

    def chat(self, message: str, *, max_tokens: int = 256, stream: bool = False, sampler: Sampler | None = None):
        """One turn of a conversation that the next turn continues."""
        return self._run(message, max_tokens, stream, sampler, keep=True)

    def append(self, messages: Sequence[dict]) -> None:
        """Put turns (``{"role", "content"}``) into the conversation as they are - a transcript to
        continue - compacting the older part on the way when the conversation compacts itself."""
        s = self.session
        with self._decoding():
            for msg in messages:
                if msg.get("role") not in ("user", "assistant", "system") or not str(msg.get("content", "")).strip():
                    raise KvlocalError(f"a turn needs a role (user, assistant, system) and content, not {msg!r}")
                self._feed(s.chat_tokens([msg], add_assistant=False))
                self.messages.append({"role": msg["role"], "content": str(msg["content"])})

    def reset(self) -> None:
        """Forget the conversation; the document stays."""
        self.session.rewind(self._doc_length if self.online_records else self.base)
        self.messages = []
        if self.online is not None:  # the compacted conversation went too
            self._origin = [o[: self.session.cells[0]] for o in self._origin]
            self.base = self.session.n_past
            self.auto_compact(self.online.settings)

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
        self.document_name: str | None = None
        self.summary: SummaryRecord | None = None  # set when the document was summarized, then compacted
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

    def ingest(self, text: str, *, system: str | None = None, name: str | None = None) -> DocumentLayout:
        """Ingest the document (its context-prefill queries are captured on the way); ``name``
        (e.g. its file name) is saved with the session and shown by ``kvlocal info`` and ``serve``.

        A document that does not fit the context (``n_ctx``; by default the model's training
        context, with room for a repeat-prefill of it) is only tokenized here: ``compact`` then
        ingests and compacts it chunk by chunk (``kvlocal.streaming``)."""
        if self.doc is not None:
            raise DocumentError("a document is already ingested; open a new one for another document")
        if not text or not text.strip():
            raise DocumentError("the document is empty")
        if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME):
            raise KvlocalError(f"a document name is a non-empty string of at most {MAX_NAME} characters")
        self._text, self._system, self.document_name = text, system, name
        if streams(self.model, len(self.model.tokenize(text, add_special=False)), self.n_ctx):
            self.doc = StreamedDocument.open(self.model, text, system=system, n_ctx=self.n_ctx, threads=self.threads,
                                             progress=self.progress)
        else:
            self.doc = IngestedDocument.ingest(self.model, text, system=system, n_ctx=self.n_ctx,
                                               threads=self.threads, progress=self.progress)
            self.timings["ingest_s"] = self.doc.ingest_s
        self.base = self.doc.layout.length
        return self.doc.layout

    @property
    def streamed(self) -> bool:
        """Is the document compacted while it is ingested (longer than the context)?"""
        return isinstance(self.doc, StreamedDocument)

    def _stream_if_needed(self, settings: CompactionSettings) -> None:
        """A document ingested whole whose query passes do not fit beside it in the context is
        streamed instead (planned before the ingested one is let go: a refusal loses nothing)."""
        if self.streamed or one_shot_fits(self.doc, settings):
            return
        doc = StreamedDocument.open(self.model, self._text, system=self._system, n_ctx=self.doc.session.n_ctx,
                                    threads=self.threads, progress=self.progress)
        try:
            doc.plan(settings)
        except BaseException:
            doc.close()
            raise
        self.doc.close()
        self.doc = doc

    def _summarize(self, settings: CompactionSettings, st: SummarySettings, progress: bool | None) -> CompactionSettings:
        """Replace the document by the model's summary of it; the settings to compact the summary with."""
        if self.streamed:
            raise KvlocalError("summarizing needs the whole document in the context: this one is longer than it "
                               "(give a larger n_ctx, or compact without summarizing)")
        doc, self.summary = summarize(self.doc, settings.ratio, st, system=self._system, threads=self.threads,
                                      progress=self.progress if progress is None else progress)
        self.timings["document_ingest_s"] = self.doc.ingest_s
        self.doc.close()
        self.doc, self.base = doc, doc.layout.length
        self.timings["summary_s"] = self.summary.seconds
        return replace(settings, ratio=self.summary.am_ratio)

    def compact(self, ratio: float = 10.0, method: str = DEFAULT_METHOD, queries: str | Sequence[str] | None = None,
                budgets: str = "uniform", recent_window: int = 0, chunk_size: int | None = None,
                max_queries_per_head: int = 4096, holdout: float = 0.1, seed: int = 0,
                progress: bool | None = None, settings: CompactionSettings | None = None,
                summarize: SummarySettings | bool | None = None) -> CompactionSummary:
        """Compact the ingested document in place and return the summary.  ``settings`` (checked
        already) replaces the keyword arguments.  ``summarize``: the model first writes a summary
        of the document and the summary's KV is compacted to ``ratio`` overall (``kvlocal.summarize``;
        True: default ``SummarySettings``); the document itself is let go."""
        if settings is None:
            settings = CompactionSettings(ratio, method, queries or None, budgets, recent_window, chunk_size,
                                          max_queries_per_head, holdout, seed)
        if self.doc is None:
            raise KvlocalError("ingest a document first")
        if self.summary is not None:
            raise KvlocalError("this Compaction holds a summary of the document now, not the document: open a "
                               "new one to compact the document again")
        if summarize:
            settings = self._summarize(settings, summarize if isinstance(summarize, SummarySettings)
                                       else SummarySettings(), progress)
        self._stream_if_needed(settings)
        # compaction always starts from the full cache (or, streamed, from the text): compacting
        # again replaces the last result (and the conversation held on top of it)
        show = self.progress if progress is None else progress
        with tqdm(total=len(self.session.info.base_layers), desc="fit", unit="layer", leave=False,
                  disable=not show or self.streamed) as bar:
            def tick(done, total):
                bar.total = total
                bar.n = done
                bar.refresh()

            run = self.doc.compact(settings, progress=tick)
        self.timings["queries_s"], self.timings["fit_s"] = run.queries_s, run.fit_s
        self.timings["ingest_s"] = self.doc.ingest_s
        self.cache = run.cache
        self.messages = []
        self.report = CompactionSummary.of(run, self.doc)
        self._origin, self._doc_length = run.cache.origin, self.doc.layout.length
        if self.online is not None:  # a new compaction: the conversation starts again
            self.auto_compact(self.online.settings)
        return self.report

    def save(self, path: str) -> int:
        """Write the compacted session (atomically); returns the file size in bytes."""
        if self.cache is None:
            raise KvlocalError("compact the document before saving it")
        t0 = time.perf_counter()
        report = {**asdict(self.report), "timings": dict(self.timings)}
        if self.document_name:
            report["document"] = self.document_name
        if self.summary is not None:
            report["summary"] = self.summary.as_dict()
        cache, snap, base = self.cache, self.doc.snapshot, self.base
        if self.online_records:  # the conversation compacted itself: its cells are saved as they are
            cache, snap = current_cache(self.session, self._origin)
            base = self.session.n_past
            report["online"] = [r.as_dict() for r in self.online_records]
        size = save_session(path, self.model, snap, cache, self.doc.layout, self.session.tokens, base,
                            self.messages, report)
        self.timings["save_s"] = time.perf_counter() - t0
        return size


class CompactedSession(_Conversation):
    """A session reloaded from a file (``kvlocal.load``): ask() and chat() on the compacted context."""

    def __init__(self, path: str, model: str | binding.Model, *, chat_budget: int = CHAT_BUDGET,
                 threads: int | None = None, verbose: bool = False,
                 online: OnlineSettings | None = OnlineSettings()):
        """``model``: a GGUF path, or a loaded ``binding.Model`` to share (not closed here).
        ``online``: how the conversation compacts itself when it fills the context
        (``max_context`` cells, default: the cells loaded + ``chat_budget``); None: it stops there
        with an error instead."""
        binding.set_verbose(verbose)
        t0 = time.perf_counter()
        data = read_session(path)
        self.model, self._own_model = binding.borrow_or_open(model)
        self.session = None
        try:
            check_compatible(data.meta, self.model, path)
            n_ctx = pad(max(data.meta["cache.n_cells"] + chat_budget, (online.max_context or 0) if online else 0))
            self.session = Session(self.model, n_ctx=n_ctx, n_threads=threads, progress=False,
                                   capture=online is not None)
            self._load(data, path)
            if online is not None:
                self.auto_compact(online)
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
        self.meta = m
        self._loaded = (cache, snap)
        self._loaded_origin = [np.asarray(o, np.int32) for o in data.origin]
        self._doc_length = m["doc.end"] + len(m["doc.suffix_tokens"])  # a compacted conversation may follow
        self.restart()

    def restart(self) -> None:
        """Back to the session as its file holds it: the compacted document and the conversation
        saved with it (replayed token for token); what was said since, compacted or not, is gone."""
        cache, snap = self._loaded
        self.session.inject(cache, snap)
        self.base = self.session.n_past
        self.messages = [dict(msg) for msg in self.meta["chat.messages"]]
        self._origin = list(self._loaded_origin)
        if self.meta.get("chat.tokens"):
            self.session.ingest(np.asarray(self.meta["chat.tokens"], np.int32), desc="chat")
        if self.online is not None:
            self.auto_compact(self.online.settings)

    def save(self, path: str) -> int:
        """Write the session as it is now - the conversation, compacted or not, included."""
        m = self.meta
        layout = DocumentLayout(m["doc.start"], m["doc.end"], self._doc_length)
        # position-indexed tokens: the template around the document is known, the document's own are not kept
        known = list(m["doc.prefix_tokens"]) + [0] * (layout.doc_end - layout.doc_start) + list(m["doc.suffix_tokens"])
        report = dict(m["compaction.report"])
        if self.online_records:  # the conversation's cells are saved as compacted cells, not as chat
            cache, snap = current_cache(self.session, self._origin)
            base, chat = self.session.n_past, []
            report["online"] = list(report.get("online", [])) + [r.as_dict() for r in self.online_records]
        else:
            (cache, snap), base, chat = self._loaded, self.base, self.conversation_tokens
        tokens = known + [0] * (base - len(known)) + chat
        return save_session(path, self.model, snap, cache, layout, tokens, base, self.messages, report)

    def close(self) -> None:
        if getattr(self, "session", None) is not None:
            self.session.close()
        if self._own_model:
            self.model.close()
