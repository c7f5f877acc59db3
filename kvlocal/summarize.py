"""Summarize, then compact (issue 15): the model writes a summary of the document, the session is
built from the summary's KV instead of the document's, and that KV is compacted with the default
method to the overall ratio asked for (document tokens per cell kept).

    kv.ingest(text)
    kv.compact(ratio=100, summarize=SummarySettings())   # or `kvlocal compact --summarize`

The summary is ingested under a header that says it is one (``SUMMARY_HEADER``), so the model
never reads it as the document itself; the session file records the summary, its text and both
ratios (``kvlocal info`` shows them).

Reference queries: the default method's own sources (repeat-prefill, self-study) run on the
summary's cache.  Queries of the original document cannot stand in for them: they carry RoPE
phases of positions the summary's cache does not have and were fitted to attend over keys that
are gone, so matching their attention on the summary's keys matches nothing the model will do.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from .engine.sampling import NoRepeatNgram, Sampler
from .engine.session import DocumentError
from .errors import KvlocalError
from .pipeline import IngestedDocument

INSTRUCTION = "Summarize the document in detail. Keep every name, number, place and key event."
SUMMARY_HEADER = "A summary of a document (the document itself was not kept):\n\n"
MIN_DOCUMENT = 128  # tokens: a shorter document is not worth summarizing
MIN_CELLS = 8  # cells the overall ratio must leave
MIN_SUMMARY = 16  # tokens the model must write


@dataclass(frozen=True)
class SummarySettings:
    max_tokens: int = 320  # summary length at most
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    instruction: str = INSTRUCTION
    # no n-gram of this length twice (0: off): greedy summaries of small models fall into loops
    # (SmolLM2-135M repeats one sentence to the length bound); 4 leaves the 3-word phrases a
    # summary legitimately repeats ("the old school") alone
    no_repeat_ngram: int = 4

    def __post_init__(self):
        if self.max_tokens < MIN_SUMMARY or self.temperature < 0 or not self.instruction.strip():
            raise KvlocalError(f"a summary needs max_tokens >= {MIN_SUMMARY}, temperature >= 0 and an instruction")
        if self.no_repeat_ngram == 1 or self.no_repeat_ngram < 0:
            raise KvlocalError("no_repeat_ngram is 0 (off) or at least 2")

    def sampler(self):
        base = Sampler(temperature=self.temperature, seed=self.seed)
        return NoRepeatNgram(base, self.no_repeat_ngram) if self.no_repeat_ngram else base


@dataclass
class SummaryRecord:
    """What the summary step did (saved in the session file's report under "summary")."""

    text: str
    document_tokens: int  # of the original document
    summary_tokens: int  # of the summary as ingested (header included)
    seconds: float
    am_ratio: float  # summary tokens per cell kept
    overall_ratio: float  # document tokens per cell kept (as asked)
    settings: dict | None = None  # how it was written (SummarySettings as a dict)

    @property
    def summary_ratio(self) -> float:
        return self.document_tokens / self.summary_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "summary_ratio": self.summary_ratio}


def check_request(n_doc: int, ratio: float) -> None:
    """Refuse, before any generation, what summarizing cannot do well."""
    if n_doc < MIN_DOCUMENT:
        raise DocumentError(f"a {n_doc}-token document is too short to summarize (at least {MIN_DOCUMENT} tokens): "
                            "compact it without summarizing")
    if n_doc / ratio < MIN_CELLS:
        raise DocumentError(f"ratio {ratio:g} would leave {n_doc / ratio:.1f} cells of a {n_doc}-token document; "
                            f"at most {n_doc / MIN_CELLS:.0f}x keeps {MIN_CELLS}")


def summary_prompt(s, instruction: str):
    """The instruction as a chat turn, or for a model without a chat template (a base model) a
    completion that the summary continues."""
    if s.model.chat_template() is None:
        return s.tokenize("\n\nA detailed summary of the document above, with every name, number and place:\n")
    return s.chat_tokens([{"role": "user", "content": instruction}])


def write_summary(doc: IngestedDocument, st: SummarySettings, progress: bool = True) -> tuple[str, float]:
    """The model's summary of the document ``doc`` holds (generated after it, then rewound)."""
    s = doc.session
    prompt = summary_prompt(s, st.instruction)
    room = s.n_ctx - s.cells[0] - len(prompt)  # cells, not positions (as the query passes count)
    if room < st.max_tokens:  # refused before a token is written, not half way through
        raise DocumentError(f"the context ({s.n_ctx} cells) leaves room for {max(room, 0)} summary tokens after the "
                            f"document's {s.cells[0]} cells, not {st.max_tokens}: ask for a shorter summary or a "
                            "larger context (n_ctx / --ctx-size)")
    t0 = time.perf_counter()
    start = s.n_past
    bar = tqdm(total=st.max_tokens, desc="summary", unit="tok", disable=not progress, leave=False)
    try:
        with bar:
            out = s.generate(prompt, max_tokens=st.max_tokens, sampler=st.sampler(),
                             on_token=lambda _: bar.update())
    finally:
        s.rewind(start)
    return s.model.detokenize(out).strip(), time.perf_counter() - t0


def ingest_summary(model, text: str, *, system: str | None = None, threads: int | None = None,
                   progress: bool = True) -> IngestedDocument:
    """The summary ``text`` ingested, under ``SUMMARY_HEADER``, as a document of its own."""
    if len(model.tokenize(text, add_special=False)) < MIN_SUMMARY:
        raise DocumentError(f"the model wrote a summary of {len(text)} characters: too little to build a session on")
    return IngestedDocument.ingest(model, SUMMARY_HEADER + text, system=system, threads=threads, progress=progress)


def am_ratio(n_doc: int, n_sum: int, ratio: float) -> float:
    """The ratio to compact an ``n_sum``-token summary with so that an ``n_doc``-token document ends
    ``ratio`` times smaller; refused when the summary alone is already that small."""
    r = n_sum * ratio / n_doc
    if r <= 1.0:
        raise DocumentError(f"the summary ({n_sum} tokens) is already {n_doc / n_sum:.1f}x shorter than the "
                            f"{n_doc}-token document: ask for more than {n_doc / n_sum:.1f}x, or compact without "
                            "summarizing")
    return r


def summarize(doc: IngestedDocument, ratio: float, st: SummarySettings, *, system: str | None = None,
              threads: int | None = None, progress: bool = True) -> tuple[IngestedDocument, SummaryRecord]:
    """The summary of ``doc`` ingested as a document of its own, and the AM ratio that brings it to
    ``ratio`` overall.  ``doc`` is left as it was (the caller closes it)."""
    n_doc = doc.layout.n_doc
    check_request(n_doc, ratio)
    text, seconds = write_summary(doc, st, progress)
    summary = ingest_summary(doc.session.model, text, system=system, threads=threads, progress=progress)
    n_sum = summary.layout.n_doc
    try:
        r = am_ratio(n_doc, n_sum, ratio)
    except DocumentError:
        summary.close()
        raise
    return summary, SummaryRecord(text, n_doc, n_sum, seconds, r, ratio, asdict(st))
