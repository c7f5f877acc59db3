"""The evaluation grid: methods x ratios x query sources, with the full cache and no context as references.

Every cell of the grid is one JSON file in the cache folder, written when the cell is done, so an
interrupted run resumes where it stopped; reference answers and summaries are cached the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..engine import binding
from ..engine.modelinfo import model_fingerprint
from ..engine.session import Session
from ..errors import KvlocalError
from ..pipeline import REPEAT_MARGIN, CompactionSettings, CompactionSummary, IngestedDocument, pad
from . import tasks
from .data import (
    DEFAULT_DATA, Article, cut_to_tokens, data_dir, data_fingerprint, make_haystack, quality_articles,
    squality_stories,
)

STANDARD_METHODS = (
    ("am-facts-omp-cores-loose", ("repeat", "self-study")),
    ("am-facts-omp-cores-balanced", ("repeat", "self-study")), ("am-facts-omp-balanced", ("repeat", "self-study")),
    ("am-facts-omp-half", ("repeat", "self-study")), ("am-facts-omp-whole", ("repeat", "self-study")),
    ("am-facts-omp-names", ("repeat", "self-study")), ("am-facts-omp-near", ("repeat", "self-study")),
    ("am-facts-omp", ("repeat", "self-study")),
    ("am-facts", ("repeat",)), ("am-facts", ("repeat", "self-study")),
    ("am-highest", ("repeat",)), ("am-highest", ("context",)), ("am-highest", ("repeat", "self-study")),
    ("am-omp-fast", ("repeat",)), ("am-kvzip", ("kvzip",)),
    ("truncate", ()), ("streaming-llm", ()), ("h2o", ("context",)), ("snapkv", ("self-study",)),
    ("kvzip", ("kvzip",)), ("kvzip-uniform", ("kvzip",)),
)
PARTS = ("quality", "niah", "summary", "cost")  # "cost" is measured by evaluation.cost (the CLI runs it)


@dataclass
class EvalConfig:
    methods: tuple = STANDARD_METHODS
    ratios: tuple = (5, 10, 20, 50)
    articles: tuple = (8, 1, 2)  # LEval-QuALITY indices: the three shortest articles (~3k tokens)
    questions: int = 8  # per article
    answer_tokens: int = 48
    haystack_tokens: tuple = (3000,)
    haystack_stories: tuple = (0, 1)  # SQuALITY dev stories
    needles: int = 8
    continuation_tokens: int = 96
    summary_tokens: int = 320
    summary_ratios: tuple = (50, 100, 200)  # overall ratios of summarize-then-compact (and AM alone beside it)
    summary_no_repeat: int = 4  # SummarySettings.no_repeat_ngram of the summary part
    max_queries: int = 4096
    cost_tokens: int = 4000  # the long document of the speed and memory measurements
    article_words: int | None = None  # cut articles to this many words (smoke runs on tiny models)
    # articles longer than this are cut at a sentence end; None: what lets repeat-prefill (the
    # document twice, plus prompts) fit the model's training context
    max_doc_tokens: int | None = None
    seed: int = 0
    data: str | None = None

    @classmethod
    def smoke(cls, **kw) -> EvalConfig:
        """One short document, two methods, two ratios: the harness's own test."""
        base = dict(methods=(("am-highest", ("context",)), ("truncate", ())), ratios=(4, 8), articles=(8,),
                    questions=2, answer_tokens=8, haystack_tokens=(600,), haystack_stories=(0,), needles=2,
                    continuation_tokens=16, summary_tokens=24, summary_ratios=(16,), max_queries=512,
                    article_words=60, cost_tokens=300)
        return cls(**{**base, **kw})


def cell_id(method: str, queries: tuple, ratio: float) -> str:
    return f"{method}+{'+'.join(queries) or 'none'}@{ratio:g}"


class ResultCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts[:-1], parts[-1] + ".json")

    def get(self, *parts: str):
        p = self.path(*parts)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, value, *parts: str):
        p = self.path(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, p)
        return value


class Evaluator:
    def __init__(self, model: str | binding.Model, config: EvalConfig, cache_dir: str | Path,
                 progress: bool = True, threads: int | None = None):
        self.model, _ = binding.borrow_or_open(model)  # a path is opened for the evaluator's lifetime
        self.cfg, self.progress, self.threads = config, progress, threads
        fp = model_fingerprint(self.model)["model.file_sha256"][:12]
        root = Path(cache_dir) / f"{self.model.path.stem}-{fp}"
        if config.max_queries != EvalConfig.max_queries:  # cells depend on it: keep them apart
            root = root / f"max-queries-{config.max_queries or 'all'}"
        if config.data is not None and data_dir(config.data).resolve() != DEFAULT_DATA.resolve():
            root = root / f"data-{data_fingerprint(config.data)}"  # other data: other cells
        self.cache = ResultCache(root)
        self.name = self.model.path.stem

    # documents ------------------------------------------------------------------------------
    def _open(self, text: str) -> IngestedDocument:
        return IngestedDocument.ingest(self.model, text, system=tasks.SYSTEM, threads=self.threads, progress=False)

    def _plain(self, text: str | None) -> Session:
        """A session with ``text`` as the document (None: no document, the system prompt only)."""
        n = len(self.model.tokenize(text or "", add_special=False))
        s = Session(self.model, n_ctx=pad(n + 1024), n_threads=self.threads, progress=False)
        if text:
            s.ingest_document(text, system=tasks.SYSTEM)
        elif not tasks.completion_style(s):
            s.ingest(s.model.apply_chat_template([{"role": "system", "content": tasks.SYSTEM}], add_assistant=False))
        else:  # a base model's document has no system turn around it (Session.template_around)
            s.ingest(s.tokenize("", bos=True) if s.model.add_bos else s.tokenize("\n"))
        return s

    def _compact(self, doc: IngestedDocument, method: str, queries: tuple, ratio: float) -> dict:
        settings = CompactionSettings(ratio=ratio, method=method, queries=queries,
                                      max_queries_per_head=self.cfg.max_queries, holdout=0.1, seed=self.cfg.seed)
        run = doc.compact(settings)
        summary = CompactionSummary.of(run, doc)
        return {"cells": summary.cells_after, "tokens": summary.tokens_before, "effective_ratio": summary.effective_ratio,
                "padding": summary.padding_fraction, "fit_s": run.fit_s, "query_s": run.queries_s,
                "ingest_s": doc.ingest_s, "attn_rel_l2": summary.heldout_output_rel_l2,
                "mass_err": summary.heldout_mass_err, "layer_errors": summary.layer_errors}

    def _cells(self):
        for method, queries in self.cfg.methods:
            for ratio in self.cfg.ratios:
                yield method, tuple(queries), ratio

    def max_doc_tokens(self) -> int:
        if self.cfg.max_doc_tokens is not None:
            return self.cfg.max_doc_tokens
        return (self.model.n_ctx_train - REPEAT_MARGIN) // 2

    # QuALITY retention ----------------------------------------------------------------------
    def _score_quality(self, s: Session, article: Article, refs: list[list[int]]) -> dict:
        qs = article.questions[: self.cfg.questions]
        nll = [tasks.answer_nll(s, tasks.open_prompt(s, q), r) for q, r in zip(qs, refs, strict=True)]
        mc = [tasks.multiple_choice(s, q) for q in qs]
        return {"nll": nll, "mc": [bool(x) for x in mc]}

    def document_keys(self) -> tuple[list[str], list[str]]:
        """The cache keys of the grid's documents: (QuALITY articles, needle haystacks)."""
        cfg = self.cfg
        return ([f"quality{a}" for a in cfg.articles],
                [f"niah{s}-{n}" for s in cfg.haystack_stories for n in cfg.haystack_tokens])

    def articles(self):
        """(cache key, article) of every QuALITY article of the grid, cut as the grid cuts it."""
        articles = quality_articles(self.cfg.data)
        for ai, key in zip(self.cfg.articles, self.document_keys()[0], strict=True):
            art = articles[ai]
            if self.cfg.article_words:
                art = Article(art.index, " ".join(art.text.split()[: self.cfg.article_words]), art.questions)
            text, was_cut = cut_to_tokens(art.text, self.max_doc_tokens(),
                                          lambda t: len(self.model.tokenize(t, add_special=False)))
            if self.cache.get(key, "doc") is None:
                self.cache.put({"doc_tokens": len(self.model.tokenize(text, add_special=False)), "cut": was_cut},
                               key, "doc")
            yield key, Article(art.index, text, art.questions)

    def quality_references(self, key: str, art: Article, doc: IngestedDocument) -> list[list[int]]:
        """The reference answers (the full cache's greedy answers), and the full-cache and
        no-context scores, each computed once."""
        s = doc.session
        refs = self.cache.get(key, "refs")
        if refs is None:
            refs = self.cache.put([tasks.greedy(s, tasks.open_prompt(s, q), self.cfg.answer_tokens)
                                   for q in art.questions[: self.cfg.questions]], key, "refs")
        if self.cache.get(key, "full") is None:
            self.cache.put({**self._score_quality(s, art, refs), "tokens": doc.layout.length,
                            "ingest_s": doc.ingest_s}, key, "full")
        if self.cache.get(key, "none") is None:
            with self._plain(None) as sn:
                self.cache.put(self._score_quality(sn, art, refs), key, "none")
        return refs

    def quality(self, bar=None) -> None:
        for key, art in self.articles():
            todo = [c for c in self._cells() if self.cache.get(key, cell_id(*c)) is None]
            if not todo and all(self.cache.get(key, k) is not None for k in ("full", "none")):
                if bar is not None:
                    bar.update(len(list(self._cells())))
                continue
            doc = self._open(art.text)
            s = doc.session
            refs = self.quality_references(key, art, doc)
            for cell in self._cells():
                if self.cache.get(key, cell_id(*cell)) is None:
                    info = self._compact(doc, *cell)
                    self.cache.put({**info, **self._score_quality(s, art, refs)}, key, cell_id(*cell))
                if bar is not None:
                    bar.update(1)
            doc.close()

    # needles and next-token agreement -------------------------------------------------------
    def _score_niah(self, s: Session, hay, cont: np.ndarray, ref_lp: np.ndarray | None,
                    kind: str = "number") -> tuple[dict, np.ndarray]:
        hits = [tasks.needle_found(s, k, n, kind=kind) for k, n in hay.needles]
        out = {"hits": [bool(h) for h in hits]}
        lp = tasks.continuation_logprobs(s, cont)
        if ref_lp is not None:
            out.update(tasks.agreement(ref_lp, lp))
        return out, lp

    def haystack(self, story: str, si: int, n_tok: int, kind: str = "number"):
        """(haystack, continuation tokens) of SQuALITY story ``si`` (its text ``story``) cut to
        ``n_tok`` tokens, with the grid's needles of ``kind`` at the grid's seeded depths."""
        hay = make_haystack(story, n_tok, lambda t: len(self.model.tokenize(t, add_special=False)),
                            k=self.cfg.needles, seed=self.cfg.seed * 1000 + si, kind=kind)
        return hay, self.model.tokenize(" " + hay.continuation, add_special=False)[: self.cfg.continuation_tokens]

    def haystacks(self):
        """(cache key, haystack, continuation tokens) of every needle document of the grid."""
        stories = squality_stories(self.cfg.data)
        docs = [(si, n_tok) for si in self.cfg.haystack_stories for n_tok in self.cfg.haystack_tokens]
        for (si, n_tok), key in zip(docs, self.document_keys()[1], strict=True):
            yield key, *self.haystack(stories[si], si, n_tok)

    def niah(self, bar=None) -> None:
        for key, hay, cont in self.haystacks():
            if all(self.cache.get(key, cell_id(*c)) is not None for c in self._cells()) \
                    and self.cache.get(key, "full") is not None:
                if bar is not None:
                    bar.update(len(list(self._cells())))
                continue
            doc = self._open(hay.text)
            full, ref_lp = self._score_niah(doc.session, hay, cont, None)
            self.cache.put({**full, "tokens": doc.layout.length}, key, "full")
            for cell in self._cells():
                if self.cache.get(key, cell_id(*cell)) is None:
                    info = self._compact(doc, *cell)
                    res, _ = self._score_niah(doc.session, hay, cont, ref_lp)
                    self.cache.put({**info, **res}, key, cell_id(*cell))
                if bar is not None:
                    bar.update(1)
            doc.close()

    def warm_up(self) -> None:
        """Compile the numba kernels before anything is timed."""
        from ..am import HeadProblem, get_method

        x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
        for method in ("am-highest", "am-omp-fast"):
            get_method(method).fit(HeadProblem(x, x, x, 8))

    def run(self, parts=("quality", "niah")) -> None:
        from .summaries import SummaryPart

        unknown = set(parts) - set(PARTS)
        if unknown:
            raise KvlocalError(f"unknown evaluation part(s) {', '.join(sorted(unknown))}: choose from {', '.join(PARTS)}")
        self.warm_up()
        n_docs = {"quality": len(self.cfg.articles),
                  "niah": len(self.cfg.haystack_stories) * len(self.cfg.haystack_tokens)}
        n = len(list(self._cells())) * sum(n_docs[p] for p in ("quality", "niah") if p in parts)
        n += sum(n_docs.values()) * ("summary" in parts)
        with tqdm(total=n, desc="eval cells", unit="cell", disable=not self.progress) as bar:
            if "quality" in parts:
                self.quality(bar)
            if "niah" in parts:
                self.niah(bar)
            if "summary" in parts:
                SummaryPart(self).run(bar)

    def config_dict(self) -> dict:
        return asdict(self.cfg)

