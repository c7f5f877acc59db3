"""Reference-query sources, one small registered class each (Attention Matching spec §2).

* ``context-prefill`` (``context``): the document's own queries, captured during ingestion.
* ``repeat-prefill`` (``repeat``): a user turn "Repeat the previous context verbatim." and the
  document teacher-forced as the answer; queries of every token after the document.
* ``kvzip``: KVzip's chunked repeat prompts (~2,000-token chunks); besides their queries it reads
  each key's importance off the engine's attention probabilities (``QuerySet.key_scores``).
* ``self-study``: the model answers a few fixed prompts about the document (summary, key facts,
  JSON, questions and their answers) with seeded sampling; queries of the prompt turns and of
  the generated tokens, within a token budget.

Repeat-prefill and self-study run in the session's scratch sequence: the document's cache is
shared, not copied, and sequence 0 is left as it was.

On-policy stages (kvlocal.pipeline) take the same queries again through a compacted cache
(``QuerySource.replay``): sources whose tokens the document fixes run again; sources that sample
(self-study, recall probes) decode the token streams they decoded the first time
(``QuerySet.streams``), teacher-forced, so every row is the same token at the same position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .capture import KVzipCapture, QueryCapture
from ..errors import KvlocalError
from ..kv.queryset import RECALL, QuerySet
from ..registry import Registry
from .sampling import Sampler
from .session import CONTENT_MARK, DocumentLayout, Session

QUERY_SOURCES = Registry("query source")


@dataclass
class QuerySource:
    dtype: str = "float16"

    def collect(self, session: Session, layout: DocumentLayout) -> QuerySet:
        raise NotImplementedError

    def replay(self, session: Session, layout: DocumentLayout, first: QuerySet) -> QuerySet:
        """The queries ``collect`` took (``first``), taken again through the session's cache as it
        is now.  Sources whose tokens the document fixes simply run again."""
        return self.collect(session, layout)

    def prompt_texts(self) -> tuple[str, ...]:
        """The user turns this source writes (their templated length is model-dependent)."""
        return ()

    def _capture(self, session: Session) -> QueryCapture:
        return QueryCapture(session.info, dtype=self.dtype, source=self.name)

    @staticmethod
    def _check_room(session: Session, n_tokens: int, what: str) -> None:
        # cells, not positions (a compacted past holds fewer); the scratch sequence's own so far too
        need = sum(session.cells) + n_tokens
        if need > session.n_ctx:
            raise KvlocalError(f"{what} needs {need} cells of context (the document and {n_tokens} more) but "
                               f"the session holds {session.n_ctx}; open it with n_ctx >= {need}")


def teacher_forced(session: Session, ask: str, answer: np.ndarray) -> tuple[np.ndarray, int]:
    """A user turn ``ask`` and ``answer`` (tokens) as the assistant's reply, templated: the tokens
    and where the answer starts in them."""
    before, after = session.template_around(
        [{"role": "user", "content": ask}, {"role": "assistant", "content": CONTENT_MARK}])
    pre = session.tokenize(before)
    return np.concatenate([pre, answer, session.tokenize(after)]), len(pre)


@QUERY_SOURCES.register("context-prefill", "context")
@dataclass
class ContextPrefill(QuerySource):
    def collect(self, session: Session, layout: DocumentLayout) -> QuerySet:
        if session.context_queries is None:
            raise KvlocalError("context-prefill queries are captured while ingesting: "
                               "call ingest_document(..., capture_queries=True)")
        return session.context_queries


@QUERY_SOURCES.register("repeat-prefill", "repeat")
@dataclass
class RepeatPrefill(QuerySource):
    prompt: str = "Repeat the previous context verbatim."

    def prompt_texts(self) -> tuple[str, ...]:
        return (self.prompt,)

    def collect(self, session: Session, layout: DocumentLayout) -> QuerySet:
        doc = np.asarray(session.tokens[layout.doc_start:layout.doc_end], np.int32)
        tokens, n_before = teacher_forced(session, self.prompt, doc)
        self._check_room(session, len(tokens), "repeat-prefill")
        capture = self._capture(session)
        with session.fork() as seq, session.capturing(capture):
            session.ingest(tokens, seq_id=seq, desc="repeat-prefill")
        queries = capture.result()
        queries.anchors[n_before:n_before + len(doc)] = np.arange(layout.doc_start, layout.doc_end)
        return queries


@QUERY_SOURCES.register("kvzip")
@dataclass
class KVzipRepeat(QuerySource):
    """KVzip's scoring pass (Kim et al. 2025; snu-mllab/KVzip): the document is cut into chunks of
    ``chunk`` tokens; each chunk is teacher-forced as the answer to a repeat request (the first:
    ``prompt``; later ones: ``prompt_next`` followed by the previous chunk's last ``overlap``
    tokens), in the scratch sequence.  A key's score is the largest attention probability any
    query head of its group and any token of its chunk's repeat gives it, with the softmax taken
    over the sink (the cells before the document), the chunk and the repeat's own tokens only
    (``KVzipCapture``).  The queries of every repeat token come along (anchored like
    repeat-prefill), so AM fits can use the same pass."""

    chunk: int = 2000
    overlap: int = 8
    prompt: str = "Repeat the previous context exactly."
    prompt_next: str = "Repeat the part of the previous context exactly, starting with"

    def prompt_texts(self) -> tuple[str, ...]:
        return (self.prompt, self.prompt_next)

    def chunks(self, session: Session, layout: DocumentLayout) -> list[tuple[int, int, np.ndarray, int]]:
        """The repeat prompts: (lo, hi, tokens, n_before) per chunk ``[lo, hi)`` of the document
        (offsets into it); the chunk's copy starts at ``tokens[n_before]``."""
        if self.chunk < 1 or self.overlap < 0:
            raise KvlocalError("kvzip needs a positive chunk size and overlap >= 0")
        doc = np.asarray(session.tokens[layout.doc_start:layout.doc_end], np.int32)
        out = []
        for lo in range(0, len(doc), self.chunk):
            hi = min(len(doc), lo + self.chunk)
            ask = self.prompt if lo == 0 else \
                f"{self.prompt_next} {session.model.detokenize(doc[max(0, lo - self.overlap):lo])}"
            out.append((lo, hi, *teacher_forced(session, ask, doc[lo:hi])))
        return out

    def collect(self, session: Session, layout: DocumentLayout) -> QuerySet:
        if session.compacted or session.cells[0] != session.n_past:
            raise KvlocalError("kvzip scores need the uncompacted document in cells 0..n-1 "
                               "(a fresh ingest or restore)")
        plan = self.chunks(session, layout)
        for _, _, tokens, _ in plan:
            self._check_room(session, len(tokens), "kvzip scoring")
        capture = KVzipCapture(session.info, layout.doc_end, dtype=self.dtype, source=self.name)
        anchors = []
        with session.capturing(capture):
            for i, (lo, hi, tokens, n_before) in enumerate(plan):
                a = np.full(len(tokens), -1, np.int32)
                a[n_before:n_before + hi - lo] = np.arange(layout.doc_start + lo, layout.doc_start + hi)
                anchors.append(a)
                capture.window = (layout.doc_start, layout.doc_start + lo, layout.doc_start + hi, session.n_past)
                with session.fork() as seq:
                    session.ingest(tokens, seq_id=seq, desc=f"kvzip {i + 1}/{len(plan)}")
        queries = capture.result()
        queries.anchors[:] = np.concatenate(anchors)
        queries.key_scores = capture.scores
        return queries


SELF_STUDY_PROMPTS: tuple[tuple[str, ...], ...] = (
    ("Summarize the main points of the document.",),
    ("List all the key facts in the document.",),
    ("Structure the information in the document as JSON. Keep every date, time, name and number.",),
    ("Write three questions that test whether someone understood the document.",
     "Now answer each of your three questions using the document."),
)


@QUERY_SOURCES.register("self-study")
@dataclass
class SelfStudy(QuerySource):
    """Conversations about the document; each entry of ``prompts`` is one conversation of user turns."""

    max_new_tokens: int = 160  # per answer
    budget: int = 768  # generated tokens over all conversations
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    seed: int = 0
    prompts: tuple[tuple[str, ...], ...] = SELF_STUDY_PROMPTS

    def prompt_texts(self) -> tuple[str, ...]:
        return tuple(user for turns in self.prompts for user in turns)

    def collect(self, session: Session, layout: DocumentLayout) -> QuerySet:
        if self.budget < 1 or self.max_new_tokens < 1:
            raise KvlocalError("self-study needs a positive token budget")
        sampler = Sampler(self.temperature, self.top_k, self.top_p, self.seed)
        end_of_answer = session.turn_end()
        capture = self._capture(session)
        left = self.budget
        bar = tqdm(total=self.budget, desc="self-study", unit="tok", disable=not session.progress, leave=False)
        streams = []
        with bar, session.capturing(capture):
            for turns in self.prompts:
                if left <= 0:
                    break
                decoded = []
                with session.fork() as seq:
                    for i, user in enumerate(turns):
                        if left <= 0:
                            break
                        prompt = session.chat_tokens([{"role": "user", "content": user}])
                        if i:
                            prompt = np.concatenate([end_of_answer, prompt])
                        n_new = min(self.max_new_tokens, left)
                        self._check_room(session, len(prompt) + n_new, "self-study")
                        out = session.generate(prompt, max_tokens=n_new, sampler=sampler, seq_id=seq)
                        decoded += [prompt, _decoded_part(out, n_new)]
                        left -= len(out)
                        bar.update(len(out))
                streams.append(np.concatenate(decoded).astype(np.int32))
        queries = capture.result()
        queries.streams = {self.name: tuple(streams)}
        return queries

    def replay(self, session: Session, layout: DocumentLayout, first: QuerySet) -> QuerySet:
        return replay_streams(session, first, self.name, self._capture(session))


@QUERY_SOURCES.register("self-study-long")
@dataclass
class SelfStudyLong(SelfStudy):
    """Self-study with room to answer at length: up to 512 tokens per answer, 2,048 in all (the
    reference generates about 5,000 per QuALITY article; ``self-study`` stops at 768)."""

    max_new_tokens: int = 512
    budget: int = 2048


RECALL_PROMPTS: tuple[str, ...] = (
    "List every number in the document and what it refers to.",
    "List every name, place and date in the document.",
    "List the specific details of the document: who did what, where, when and how much.",
)


@QUERY_SOURCES.register("recall")
@dataclass
class RecallProbes(QuerySource):
    """The model lists the document's specific content (numbers, names, places, dates) from
    memory, greedily; the queries of the prompts and of what it writes are tagged ``RECALL``.

    Repeat-prefill copies the document in order, so its queries find each token through its
    neighbour and spread a number's attention over every equal digit; a recall probe has to
    find the number from far away, as a question about it will.  What the model writes need not
    be right (a 135M model lists "1. 1, 2. 2, ..."): the queries at positions where it expects a
    number or a name look at the document's numbers and names.  Group selectors such as
    ``SharedSpans(queries="recall")`` reserve part of each head's budget for what these rows
    attend to."""

    max_new_tokens: int = 128  # per prompt
    prompts: tuple[str, ...] = RECALL_PROMPTS

    def prompt_texts(self) -> tuple[str, ...]:
        return self.prompts

    def collect(self, session: Session, layout: DocumentLayout) -> QuerySet:
        if self.max_new_tokens < 1 or not self.prompts:
            raise KvlocalError("recall probes need prompts and a positive token budget")
        capture = self._capture(session)
        bar = tqdm(total=len(self.prompts) * self.max_new_tokens, desc="recall", unit="tok",
                   disable=not session.progress, leave=False)
        streams = []
        with bar, session.capturing(capture):
            for user in self.prompts:
                prompt = session.chat_tokens([{"role": "user", "content": user}])
                self._check_room(session, len(prompt) + self.max_new_tokens, "recall probes")
                with session.fork() as seq:
                    out = session.generate(prompt, max_tokens=self.max_new_tokens, seq_id=seq)
                streams.append(np.concatenate([prompt, _decoded_part(out, self.max_new_tokens)]).astype(np.int32))
                bar.update(self.max_new_tokens)
        queries = capture.result()
        queries.anchors[:] = RECALL
        queries.streams = {self.name: tuple(streams)}
        return queries

    def replay(self, session: Session, layout: DocumentLayout, first: QuerySet) -> QuerySet:
        queries = replay_streams(session, first, self.name, self._capture(session))
        queries.anchors[:] = RECALL
        return queries


def _decoded_part(out: Sequence[int], max_tokens: int) -> np.ndarray:
    """The part of ``Session.generate``'s output it decoded: all of it when it stopped at an
    end-of-generation token, all but the last token when it stopped at ``max_tokens``."""
    n = len(out) - 1 if len(out) >= max_tokens else len(out)
    return np.asarray(out[:max(n, 0)], np.int32)


def replay_streams(session: Session, first: QuerySet, name: str, capture: QueryCapture) -> QuerySet:
    """Decode the token streams source ``name`` decoded for ``first`` again, teacher-forced, each in
    the scratch sequence as before: the same tokens at the same positions, through the session's
    cache as it is now."""
    streams = first.streams.get(name)
    if streams is None:
        raise KvlocalError(f"these queries carry no decoded streams of {name!r} to replay")
    with session.capturing(capture):
        for tokens in streams:
            with session.fork() as seq:
                session.ingest(tokens, seq_id=seq, desc=f"{name} replay")
    queries = capture.result()
    queries.streams = {name: streams}
    return queries


def prompt_room(session: Session, sources: Sequence[str | QuerySource]) -> int:
    """The most cells one user turn of ``sources`` takes with this model's template and tokenizer
    (the turn before it closed, the assistant's turn opened): what a plan must leave per turn
    beside the tokens the sources generate or copy."""
    longest = 0
    for src in sources:
        source = QUERY_SOURCES.create(src) if isinstance(src, str) else src
        for text in source.prompt_texts():
            longest = max(longest, len(session.chat_tokens([{"role": "user", "content": text}])))
    return longest + len(session.turn_end()) if longest else 0


def collect_queries(session: Session, layout: DocumentLayout, sources: Sequence[str | QuerySource], *,
                    max_per_kv_head: int | None = None, seed: int = 0, replay: QuerySet | None = None) -> QuerySet:
    """Queries of several sources, concatenated, optionally subsampled to a per-KV-head budget.
    ``replay``: queries these sources gave before; the sources take them again (``QuerySource.replay``)."""
    parts = []
    for src in sources:
        source = QUERY_SOURCES.create(src) if isinstance(src, str) else src
        parts.append(source.collect(session, layout) if replay is None else source.replay(session, layout, replay))
    queries = QuerySet.concat(parts)
    if max_per_kv_head is not None:
        queries = queries.subsample(max_per_kv_head, session.info.n_rep, seed)
    return queries
