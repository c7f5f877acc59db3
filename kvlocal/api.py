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
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__, binding
from .am import DEFAULT_METHOD, Compactor, CompactionReport, JsonBudget
from .errors import KvlocalError
from .kvcache import CompactedCache, KVSnapshot
from .onpolicy import compact_on_policy
from .queries import QUERY_SOURCES, collect_queries
from .queryset import QuerySet
from .sampling import GREEDY, Sampler
from .session import DocumentError, DocumentLayout, Session
from .sessionfile import SessionData, SessionFileError, read_session, write_session

CHAT_BUDGET = 1024  # free cells a reloaded session keeps for the conversation


def _pad(n: int, to: int = 256) -> int:
    return -(-n // to) * to


def model_fingerprint(model: binding.Model) -> dict:
    """What must match between the model a session was made with and the one reloading it
    (computed once per loaded model)."""
    cached = getattr(model, "_kvlocal_fingerprint", None)
    if cached is None:
        cached = model._kvlocal_fingerprint = _fingerprint(model)
    return dict(cached)


def _fingerprint(model: binding.Model) -> dict:
    path = model.path
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:  # the header (metadata, vocabulary, tensor table) and a tail of weights
        h.update(fh.read(8 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read())
    tok = hashlib.sha256()
    for i in range(model.n_vocab):
        tok.update(model.token_bytes(i, special=True) + b"\0")
    arch = model.arch
    rope = {k: model.meta(f"{arch}.rope.{k}") for k in ("freq_base", "dimension_count", "scaling.type",
                                                          "scaling.factor")}
    return {"model.name": path.name, "model.arch": arch, "model.n_layer": model.n_layer, "model.n_head": model.n_head,
            "model.n_head_kv": model.n_head_kv, "model.head_dim": model.head_dim, "model.n_embd": model.n_embd,
            "model.n_vocab": model.n_vocab, "model.n_ctx_train": model.n_ctx_train,
            "model.rope": json.dumps({k: v for k, v in rope.items() if v is not None}, sort_keys=True),
            "model.file_sha256": h.hexdigest(), "model.tokenizer_sha256": tok.hexdigest()}


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
        self._own_model = not isinstance(model, binding.Model)
        self.model = binding.Model(model) if self._own_model else model
        self.n_ctx, self.threads, self.progress = n_ctx, threads, progress
        self.session: Session | None = None
        self.layout: DocumentLayout | None = None
        self.snapshot: KVSnapshot | None = None
        self.cache: CompactedCache | None = None
        self.report: dict = {}
        self.messages: list = []
        self.timings: dict = {}
        self.full_kv_bytes = 0
        self._queries: dict = {}  # query source -> QuerySet, kept across compactions

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self._own_model:
            self.model.close()

    def ingest(self, text: str, *, system: str | None = None) -> DocumentLayout:
        """Ingest the document (its context-prefill queries are captured on the way)."""
        if self.session is not None:
            raise DocumentError("a document is already ingested; open a new one for another document")
        if not text or not text.strip():
            raise DocumentError("the document is empty")
        n_doc = len(self.model.tokenize(text, add_special=False))
        limit = self.model.n_ctx_train
        if n_doc + 64 > limit:
            raise DocumentError(f"the document has {n_doc} tokens but {self.model.path.name} works with at most "
                                f"{limit}: split the document and compact the parts as separate sessions")
        # room for the document, a repeat-prefill of it and a self-study budget, within the model's context
        n_ctx = self.n_ctx or min(limit, _pad(2 * n_doc + 1200))
        self.session = Session(self.model, n_ctx=n_ctx, n_threads=self.threads, capture=True, progress=self.progress)
        t0 = time.perf_counter()
        self.layout = self.session.ingest_document(text, system=system, capture_queries=True)
        self.timings["ingest_s"] = time.perf_counter() - t0
        self.base = self.layout.length
        self.snapshot = self.session.snapshot()
        self.full_kv_bytes = sum(k.nbytes + v.nbytes for k, v in zip(self.snapshot.keys, self.snapshot.values,
                                                                       strict=True))
        return self.layout

    def compact(self, ratio: float = 10.0, method: str = DEFAULT_METHOD, queries: str | Sequence[str] | None = None,
                budgets: str = "uniform", recent_window: int = 0, chunk_size: int | None = None,
                max_queries_per_head: int = 4096, holdout: float = 0.1, seed: int = 0,
                progress: bool | None = None) -> dict:
        """Compact the ingested document in place and return the summary."""
        if self.session is None:
            raise KvlocalError("ingest a document first")
        # compaction always starts from the full cache: compacting again replaces the last result
        # (and the conversation held on top of it)
        compactor = Compactor(method, ratio=ratio, budgets=_budgets(budgets), recent_window=recent_window,
                              chunk_size=chunk_size, max_queries_per_head=max_queries_per_head, holdout=holdout,
                              seed=seed)
        n_doc = min(self.layout.doc_end, self.layout.length - recent_window) - self.layout.doc_start
        if n_doc / ratio < 1:
            raise KvlocalError(f"ratio {ratio} leaves less than one key per head of a {n_doc}-token document")
        method_obj = compactor.method
        sources = [queries] if isinstance(queries, str) else list(queries or method_obj.queries)
        for src in sources:
            QUERY_SOURCES.get(src)
        s = self.session
        t0 = time.perf_counter()
        qs = None
        if method_obj.needs_queries:
            missing = [src for src in sources if QUERY_SOURCES.get(src).name not in self._queries]
            if missing and self.cache is not None:
                s.restore(self.snapshot.state.to_bytes())  # queries come from the full cache
            for src in missing:
                self._queries[QUERY_SOURCES.get(src).name] = collect_queries(s, self.layout, [src])
            qs = QuerySet.concat([self._queries[QUERY_SOURCES.get(src).name] for src in sources])
        self.timings["queries_s"] = time.perf_counter() - t0
        show = self.progress if progress is None else progress
        with tqdm(total=len(self.snapshot.keys), desc="fit", unit="layer", disable=not show, leave=False) as bar:
            def tick(done, total):
                bar.total = total
                bar.n = done
                bar.refresh()

            facts = method_obj.fact_mask(s.token_texts(self.layout.length)) if method_obj.uses_facts else None
            if method_obj.stages > 1 and qs is not None:  # on-policy: queries again after each stage
                cache, report, more_s = compact_on_policy(s, self.layout, self.snapshot, compactor, sources,
                                                          method_obj.stages, first=qs, facts=facts)
                self.timings["queries_s"] += more_s
            else:
                cache, report = compactor.compact(self.snapshot, self.layout.doc_start, self.layout.doc_end, qs,
                                                  progress=tick, facts=facts)
        self.timings["fit_s"] = report.seconds
        s.inject(cache, self.snapshot)
        self.cache = cache
        self.messages = []
        self.report = _summary(report, self, sources, budgets)
        return self.report

    def save(self, path: str) -> int:
        """Write the compacted session (atomically); returns the file size in bytes."""
        if self.cache is None:
            raise KvlocalError("compact the document before saving it")
        t0 = time.perf_counter()
        c, lay = self.cache, self.layout
        prefix = self.session.tokens[: lay.doc_start]
        suffix = self.session.tokens[lay.doc_end: lay.length]
        info = binding.native_info()
        meta = {
            "kvlocal_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "native.llama_cpp_python": str(info.get("llama_cpp_python", "")),
            "native.patch_hash": str(info.get("patch_hash", "")), "native.bias_abi": binding.BIAS_ABI_VERSION,
            **model_fingerprint(self.model),
            "cache.logical_length": c.logical_length, "cache.n_cells": c.n_cells,
            "cache.layers": list(self.snapshot.layer_ids), "cache.has_swa": self.snapshot.swa_section() is not None,
            "doc.start": lay.doc_start, "doc.end": lay.doc_end, "doc.prefix_tokens": prefix,
            "doc.suffix_tokens": suffix, "chat.messages": self.messages,
            "chat.tokens": self.session.tokens[self.base:],
            "compaction.method": self.report["method"], "compaction.ratio": self.report["ratio"],
            "compaction.queries": ",".join(self.report["queries"]), "compaction.budgets": self.report["budgets"],
            "compaction.report": {**self.report, "timings": dict(self.timings)},
        }
        data = SessionData(meta, c.positions, c.keys, c.values, c.bias, c.origin, self.snapshot.swa_section())
        size = write_session(path, data)
        self.timings["save_s"] = time.perf_counter() - t0
        return size


def _budgets(spec: str):
    """A budget policy from its CLI/API spelling: a policy name or a JSON file."""
    if spec in ("uniform", "sensitivity"):
        return spec
    if Path(spec).is_file():
        return JsonBudget(spec)
    raise KvlocalError(f"budgets must be 'uniform', 'sensitivity' or a JSON file, not {spec!r}")


def _summary(report: CompactionReport, c: Compaction, sources: list[str], budgets: str) -> dict:
    cells = report.n_cells
    kept_bytes = sum(k.nbytes + v.nbytes for k, v in zip(c.snapshot.keys, c.snapshot.values, strict=True)) \
        // max(c.snapshot.n_cells, 1) * cells
    errors = report.layer_errors
    return {
        "method": report.method, "ratio": float(report.ratio), "queries": sources, "budgets": str(budgets),
        "tokens_before": c.layout.length, "cells_after": cells, "document_tokens": report.n_document,
        "effective_ratio": report.effective_ratio, "padding_fraction": report.padding_fraction,
        "kv_bytes_before": c.full_kv_bytes, "kv_bytes_after": kept_bytes,
        "fallbacks": report.notes, "chunks": report.chunks,
        "heldout_output_rel_l2": float(np.mean([e["output_rel_l2"] for e in errors.values()])) if errors else None,
        "heldout_mass_err": float(np.mean([e["mass_err"] for e in errors.values()])) if errors else None,
        "layer_errors": {str(k): v for k, v in errors.items()},
    }


class CompactedSession(_Conversation):
    """A session reloaded from a file (``kvlocal.load``): ask() and chat() on the compacted context."""

    def __init__(self, path: str, model: str | binding.Model, *, chat_budget: int = CHAT_BUDGET,
                 threads: int | None = None, verbose: bool = False):
        """``model``: a GGUF path, or a loaded ``binding.Model`` to share (not closed here)."""
        binding.set_verbose(verbose)
        t0 = time.perf_counter()
        data = read_session(path)
        self._own_model = not isinstance(model, binding.Model)
        self.model = binding.Model(model) if self._own_model else model
        self.session = None
        try:
            self._check(data.meta, path)
            self.session = Session(self.model, n_ctx=_pad(data.meta["cache.n_cells"] + chat_budget),
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
        self._check(data.meta, path)
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

    def _check(self, m: dict, path: str) -> None:
        fp = model_fingerprint(self.model)
        for key in ("model.arch", "model.n_layer", "model.n_head", "model.n_head_kv", "model.head_dim",
                    "model.n_embd", "model.n_vocab", "model.tokenizer_sha256", "model.file_sha256"):
            if fp[key] != m[key]:
                raise SessionFileError(
                    f"{path} was compacted with {m['model.name']} ({key.split('.', 1)[1]} {m[key]!s:.16}), "
                    f"not with {fp['model.name']} ({fp[key]!s:.16}): reload it with the model it was made with")
        info = binding.native_info()
        if m["native.bias_abi"] != binding.BIAS_ABI_VERSION or m["native.patch_hash"] != info.get("patch_hash"):
            raise SessionFileError(
                f"{path} was made with kvlocal patch {m['native.patch_hash'][:12]} (bias ABI {m['native.bias_abi']}), "
                f"this llama.cpp has {str(info.get('patch_hash'))[:12]} (ABI {binding.BIAS_ABI_VERSION}): "
                "compact the document again with this build")
