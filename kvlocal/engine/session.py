"""A llama.cpp session: ingest a document, capture queries, extract and inject the KV cache.

Sequence 0 holds the conversation; sequence 1 is scratch space for work that must not disturb
it (repeat-prefill and self-study queries): it starts as a copy of sequence 0 (cells shared,
nothing copied, the cache is unified) and is removed afterwards.  The context is created with
flash attention off (V transposed, the ``kq`` path exists) and an F16 KV cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import binding
from .capture import QueryCapture
from ..errors import ContextFullError, KvlocalError
from ..kv.cache import CompactedCache, KVSnapshot
from ..kv.statecodec import cells_in_state
from .modelinfo import ModelInfo
from ..kv.queryset import QuerySet
from .sampling import GREEDY, Sampler

SCRATCH = 1  # the scratch sequence
CONTENT_MARK = "@@kvlocal-content-7f3a@@"  # no NUL: the template goes through C strings


class DocumentError(KvlocalError):
    """A document cannot be ingested as asked (empty, longer than the context, ...)."""


class ContextFull(DocumentError, ContextFullError):
    """Sequence 0 needs more cells than the context holds."""


@dataclass(frozen=True)
class DocumentLayout:
    """Token ranges of an ingested document: ``[0, doc_start)`` template prefix (BOS, system
    prompt, user-turn header), ``[doc_start, doc_end)`` the document, ``[doc_end, length)`` the
    end of the user turn.  ``length`` is the logical length T."""

    doc_start: int
    doc_end: int
    length: int

    @property
    def n_doc(self) -> int:
        return self.doc_end - self.doc_start


class Session:
    def __init__(self, model: str | binding.Model, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, capture: bool = False, progress: bool = True,
                 kv_type: str = "f16"):
        """``model``: a GGUF path or a loaded ``binding.Model`` (shared, not closed here).
        ``capture``: install the eval callback so that queries can be captured.
        ``kv_type``: "f16" (default) or "f32" KV cache."""
        kv = {"f16": binding.GGML_TYPE_F16, "f32": binding.GGML_TYPE_F32}.get(kv_type)
        if kv is None:
            raise KvlocalError(f"kv_type must be 'f16' or 'f32', not {kv_type!r}")
        self.model, self._own_model = binding.borrow_or_open(model)
        try:
            self.info = ModelInfo.from_model(self.model)
            self.tap = binding.TensorTap() if capture else None
            self.ctx = binding.Context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_seq_max=2,
                                       type_k=kv, type_v=kv, tap=self.tap)
        except BaseException:
            self.close()
            raise
        self.progress = progress
        self.tokens: list[int] = []  # the token history of sequence 0
        self.cells = [0, 0]  # KV cells held by sequence 0 and (beyond them) by the scratch sequence
        self.layout: DocumentLayout | None = None
        self.context_queries: QuerySet | None = None
        self.compacted = False
        self._capture: QueryCapture | None = None

    def close(self) -> None:
        if getattr(self, "ctx", None) is not None:
            self.ctx.close()
        if self._own_model and getattr(self, "model", None) is not None:
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def rewind(self, length: int) -> None:
        """Forget sequence 0's tokens from logical position ``length`` on (e.g. the last answer)."""
        if not 0 <= length <= self.n_past:
            raise KvlocalError(f"cannot rewind to {length}: the sequence is {self.n_past} long")
        n_drop = self.n_past - length
        if n_drop:
            self.ctx.seq_rm(0, length, -1)
            self.cells[0] -= n_drop
            self._forget_history(n_drop)

    def _forget_history(self, n_drop: int) -> None:
        """Drop the token history's last ``n_drop`` tokens.  The history ends at n_past but may
        start later than position 0 (a reloaded session knows only what it decoded itself): the
        dropped positions are its last tokens."""
        if n_drop > 0:
            del self.tokens[max(0, len(self.tokens) - n_drop):]

    @property
    def n_past(self) -> int:
        """The logical length: the position the next token of sequence 0 takes."""
        return self.ctx.pos_max(0) + 1

    # text -----------------------------------------------------------------------------------
    def tokenize(self, text: str, *, bos: bool = False, special: bool = True) -> np.ndarray:
        """Tokens of ``text``; ``bos`` adds the model's BOS if it uses one; ``special`` parses
        template tokens such as ``<|im_start|>``."""
        return self.model.tokenize(text, add_special=bos, parse_special=special)

    def template_around(self, messages: Sequence[dict], add_assistant: bool = False) -> tuple[str, str]:
        """The chat-template text before and after the content of the last message."""
        if self.model.chat_template() is None:
            return "", "\n"
        text = self.model.apply_chat_template(list(messages), add_assistant=add_assistant)
        before, sep, after = text.partition(CONTENT_MARK)
        if not sep:
            raise KvlocalError("the chat template dropped the message content")
        return before, after

    def turn_end(self) -> np.ndarray:
        """Tokens that close an assistant turn (ChatML: ``<|im_end|>\n``)."""
        return self.tokenize(self.template_around(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": CONTENT_MARK}])[1])

    def chat_tokens(self, messages: Sequence[dict], add_assistant: bool = True) -> np.ndarray:
        """A conversation turn continuing the cached context (no BOS)."""
        if self.model.chat_template() is None:
            text = "".join(f"{m['content']}\n" for m in messages)
        else:
            text = self.model.apply_chat_template(list(messages), add_assistant=add_assistant)
        return self.tokenize(text)

    # decoding -------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], *, seq_id: int = 0, logits: str = "last") -> np.ndarray:
        """Decode ``tokens`` after the sequence's last position (reported to an active capture)."""
        toks = np.asarray(tokens, np.int32).reshape(-1)
        start = self.ctx.pos_max(seq_id) + 1
        if start == 0 and seq_id == SCRATCH:
            raise KvlocalError("the scratch sequence is empty: use Session.fork()")
        if sum(self.cells) + len(toks) > self.n_ctx:
            raise ContextFull(f"{sum(self.cells) + len(toks)} KV cells are needed but the context holds "
                                f"{self.n_ctx}; create the session with a larger n_ctx")
        out = self.ctx.decode(toks, pos=start, seq_id=seq_id, logits=logits)
        self.cells[min(seq_id, 1)] += len(toks)
        if self._capture is not None:
            self._capture.add_positions(np.arange(start, start + len(toks), dtype=np.int32))
        if seq_id == 0:
            self.tokens.extend(int(t) for t in toks)
        return out

    def ingest(self, tokens: str | Sequence[int], *, seq_id: int = 0, desc: str = "ingest") -> np.ndarray:
        """Decode text or tokens in batches with a progress bar (tokens/s); returns the last logits.
        Text is tokenized with template tokens parsed, and BOS if the sequence is empty."""
        if isinstance(tokens, str):
            tokens = self.tokenize(tokens, bos=self.ctx.pos_max(seq_id) < 0)
        toks = np.asarray(tokens, np.int32).reshape(-1)
        if len(toks) == 0:
            raise DocumentError("nothing to ingest")
        logits = None
        with tqdm(total=len(toks), desc=desc, unit="tok", unit_scale=True, disable=not self.progress,
                  leave=False) as bar:
            for start in range(0, len(toks), self.ctx.n_batch):
                part = toks[start:start + self.ctx.n_batch]
                last = start + len(part) == len(toks)
                logits = self.decode(part, seq_id=seq_id, logits="last" if last else "none")
                bar.update(len(part))
        return logits

    def token_texts(self, n: int | None = None) -> list[str]:
        """The text of each of the first ``n`` tokens of sequence 0 (all by default), for text-level
        annotations such as kvlocal.am.facts."""
        return [self.model.detokenize([t]) for t in self.tokens[:n]]

    def document_tokens(self, document: str, system: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tokens of ``document`` in a user turn of the chat template (after an optional
        system turn): template prefix (with BOS), the document, the end of the turn."""
        if not document or not document.strip():
            raise DocumentError("the document is empty")
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": CONTENT_MARK}]
        before, after = self.template_around(messages)
        return self.tokenize(before, bos=True), self.tokenize(document, special=False), self.tokenize(after)

    def ingest_document(self, document: str, *, system: str | None = None, capture_queries: bool = False,
                        reserve: int = 0) -> DocumentLayout:
        """Put ``document`` in a user turn of the chat template at the start of sequence 0.

        ``capture_queries`` keeps the context-prefill queries (document + end of turn) in
        ``self.context_queries``.  ``reserve`` tokens of the context must stay free after it.
        """
        if self.n_past:
            raise DocumentError("the session already holds tokens; ingest the document into a new session")
        prefix, doc, suffix = self.document_tokens(document, system)
        total = len(prefix) + len(doc) + len(suffix)
        if total + reserve > self.n_ctx:
            raise DocumentError(
                f"the document takes {total} tokens (+{reserve} reserved) but the context holds {self.n_ctx}; "
                f"open the session with n_ctx >= {total + reserve} (the model was trained for "
                f"{self.info.n_ctx_train}) or compact the document in chunks")
        t0 = time.perf_counter()
        if len(prefix):
            self.ingest(prefix, desc="ingest")
        capture = QueryCapture(self.info, source="context-prefill") if capture_queries else None
        with self.capturing(capture):
            self.ingest(np.concatenate([doc, suffix]), desc="ingest")
        self.ingest_seconds = time.perf_counter() - t0
        self.layout = DocumentLayout(len(prefix), len(prefix) + len(doc), total)
        if capture is not None:
            queries = capture.result()
            queries.anchors[: len(doc)] = queries.positions[: len(doc)]  # each document token reads itself
            self.context_queries = queries
        return self.layout

    def generate(self, prompt: Sequence[int], *, max_tokens: int = 256, sampler: Sampler = GREEDY,
                 seq_id: int = 0, on_token: Callable[[int], None] | None = None) -> list[int]:
        """Decode ``prompt``, then sample up to ``max_tokens`` tokens until an end-of-generation
        token (not decoded).  ``on_token`` receives each token as it comes (streaming)."""
        logits = self.decode(prompt, seq_id=seq_id)[-1]
        out: list[int] = []
        while len(out) < max_tokens:
            tok = sampler(logits)
            if self.model.is_eog(tok):
                break
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(out) < max_tokens:
                logits = self.decode([tok], seq_id=seq_id)[-1]
        return out

    # scratch sequence and capture -----------------------------------------------------------
    @contextlib.contextmanager
    def fork(self) -> Iterator[int]:
        """Scratch sequence 1 as a copy of sequence 0 for the duration of the block."""
        self.ctx.seq_rm(SCRATCH)
        self.ctx.seq_cp(0, SCRATCH)
        self.cells[1] = 0
        try:
            yield SCRATCH
        finally:
            self.ctx.seq_rm(SCRATCH)
            self.cells[1] = 0

    @contextlib.contextmanager
    def capturing(self, capture: QueryCapture | None) -> Iterator[QueryCapture | None]:
        """Route the eval callback to ``capture`` for the duration of the block."""
        if capture is None:
            yield None
            return
        if self.tap is None:
            raise KvlocalError("this session was opened without capture=True")
        if self._capture is not None:
            raise KvlocalError("a capture is already running")
        self._capture, self.tap.select, self.tap.sink = capture, capture.select, capture.sink
        try:
            yield capture
        finally:
            self._capture, self.tap.select, self.tap.sink = None, None, None

    # KV cache -------------------------------------------------------------------------------
    def state(self, seq_id: int = 0) -> bytes:
        return self.ctx.seq_state(seq_id)

    def snapshot(self) -> KVSnapshot:
        """Sequence 0's cells as arrays (base cache; the SWA section is kept for writing back)."""
        return KVSnapshot.from_blob(self.state(0), self.info)

    def inject(self, cache: CompactedCache, snapshot: KVSnapshot | None = None) -> None:
        """Replace sequence 0's cells by ``cache`` (validated first) and set its bias.

        ``snapshot``: the extraction the cache was built from (default: extract now); its
        SWA section (iSWA models) is written back unchanged."""
        snap = snapshot if snapshot is not None else self.snapshot()
        cache.validate(self.info)
        n_before = self.n_past
        if cache.logical_length != snap.logical_length:
            raise KvlocalError(f"the compacted cache continues at {cache.logical_length}, the session at "
                               f"{snap.logical_length}")
        blob = cache.to_state(snap).to_bytes()
        self.ctx.clear()  # restored cells then take indices 0..N-1: attention spans only them
        self.ctx.set_seq_state(blob, 0)
        # without a bias llama.cpp runs its own, unchanged attention graph
        self.ctx.bias_enable(cache.has_bias)
        if cache.has_bias:
            for il, bias in zip(self.info.base_layers, cache.bias, strict=True):
                self.ctx.bias_set(il, bias)
        self.compacted = True
        self.cells = [cache.n_cells, 0]
        self._forget_history(n_before - cache.logical_length)  # history beyond T is gone with the old cells
        if self.n_past != cache.logical_length:
            raise KvlocalError(f"after injecting, decoding would continue at {self.n_past}, not "
                               f"{cache.logical_length}")

    def bias(self) -> list[np.ndarray]:
        """Per base layer ``[n_cells, H_kv]``: the bias sequence 0's cells carry, in the cell order of
        ``snapshot()`` (0 for cells decoded since the last ``inject``; all 0 when the bias is off)."""
        n_cells = self.cells[0]
        out = []
        for il in self.info.base_layers:
            b = self.ctx.bias_get(il) if self.ctx.bias_cells(il) >= 0 else \
                np.zeros((n_cells, self.info.n_head_kv), np.float32)
            if len(b) != n_cells:
                raise KvlocalError(f"layer {il}: the engine holds a bias for {len(b)} cells, the sequence {n_cells}")
            out.append(b)
        return out

    def clear(self) -> None:
        """Empty the context (cells, bias, history) for a new document."""
        self.ctx.clear()
        self.ctx.bias_enable(False)
        self.compacted = False
        self.cells = [0, 0]
        self.tokens.clear()
        self.layout = None
        self.context_queries = None

    def restore(self, blob: bytes) -> None:
        """Restore an uncompacted state of sequence 0 (bias off)."""
        self.ctx.clear()
        self.ctx.bias_enable(False)
        self.ctx.set_seq_state(blob, 0)
        self.compacted = False
        self.cells = [cells_in_state(blob), 0]
        del self.tokens[self.n_past:]  # blobs of this session are prefixes of its history
