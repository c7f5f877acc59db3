"""Summarize, then compact, in the evaluation (issue 15).

Per document, in one run so that the times compare: the model's summary alone (the product's
``kvlocal.summarize`` path: same instruction, header and length bound), the summary compacted with
the default method to each overall ratio of ``EvalConfig.summary_ratios``, and the default method
alone on the document at those ratios.  Cells live under ``<document>/summarize/`` in the cache
(``summarize-ngram<N>/`` for summaries written with another n-gram guard) and carry the summary
settings and the method they were made with; cells made with other settings, or (but for the
summary alone) with another method than today's default, are computed again.

Every variant is scored like the grid: QuALITY articles by reference-answer NLL (R) and multiple
choice, needle haystacks by needles found and next-token agreement with the full cache.  A variant
the mode refuses (the summary already shorter than the ratio asks, too few cells) is recorded with
the reason instead of scores.
"""

from __future__ import annotations

from dataclasses import asdict

from ..am import DEFAULT_METHOD, get_method
from ..engine.session import DocumentError
from ..pipeline import IngestedDocument
from ..summarize import SummarySettings, am_ratio, check_request, ingest_summary, write_summary
from . import tasks

PART = "summarize"


def summarized(ratios) -> list[str]:
    """The cells made from the summary: alone, and compacted to each overall ratio."""
    return ["summary"] + [f"summary+am@{r:g}" for r in ratios]


def alone(ratios) -> list[str]:
    """The cells of the default method alone on the document."""
    return [f"am@{r:g}" for r in ratios]


def variants(ratios) -> list[str]:
    """The cell names of the part, in report order."""
    return summarized(ratios) + alone(ratios)


def folder(cfg) -> str:
    """The cache folder of the part: summaries written with another n-gram guard are kept apart."""
    return PART if cfg.summary_no_repeat == SummarySettings.no_repeat_ngram else f"{PART}-ngram{cfg.summary_no_repeat}"


def settings(cfg) -> SummarySettings:
    return SummarySettings(max_tokens=cfg.summary_tokens, seed=cfg.seed, no_repeat_ngram=cfg.summary_no_repeat)


def cached(cache, cfg, key: str, variant: str) -> dict | None:
    """A cell of the part, None when missing or made with other summary settings or (a compacted
    variant) with another method than the default."""
    got = cache.get(key, folder(cfg), variant)
    if got is None:
        return None
    if not variant.startswith("am@") and got.get("settings") != asdict(settings(cfg)):
        return None
    if variant != "summary" and got.get("method") != DEFAULT_METHOD:
        return None
    return got


class SummaryPart:
    """Runs the part for an ``Evaluator`` (its documents, scorers and cache)."""

    def __init__(self, ev):
        self.ev, self.cfg, self.cache = ev, ev.cfg, ev.cache
        self.queries = tuple(get_method(DEFAULT_METHOD).queries)
        self.settings = settings(self.cfg)

    def _get(self, key: str, variant: str) -> dict | None:
        return cached(self.cache, self.cfg, key, variant)

    def _done(self, key: str) -> bool:
        return all(self._get(key, v) is not None for v in variants(self.cfg.summary_ratios))

    def _compact(self, doc: IngestedDocument, ratio: float, score, n_doc: int, n_sum: int | None) -> dict:
        """The default method at ``ratio`` on ``doc`` (the document, or its summary when ``n_sum``)."""
        info = self.ev._compact(doc, DEFAULT_METHOD, self.queries, ratio)
        info["overall_ratio"] = info["effective_ratio"] * (n_doc / n_sum if n_sum else 1.0)
        info["time_s"] = info["query_s"] + info["fit_s"]
        return {**info, **score(doc.session)}

    def _summarized(self, doc: IngestedDocument, put, score, base: dict) -> None:
        """The summary alone and compacted to each overall ratio."""
        cfg, n_doc = self.cfg, doc.layout.n_doc
        doc.restore()
        text, gen_s = write_summary(doc, self.settings, progress=False)
        try:
            summ = ingest_summary(doc.session.model, text, system=tasks.SYSTEM, threads=self.ev.threads,
                                  progress=False)
        except DocumentError as e:  # the model wrote (next to) nothing
            for v in summarized(cfg.summary_ratios):
                put({**base, "refused": str(e)}, v)
            return
        try:
            n_sum = summ.layout.n_doc
            made = {"summary_tokens": n_sum, "summary_s": gen_s, "summary_ingest_s": summ.ingest_s}
            paid = gen_s + summ.ingest_s  # what every summary variant pays first
            put({**base, **score(summ.session), **made, "overall_ratio": n_doc / n_sum, "time_s": paid,
                 "text": text}, "summary")
            for r in cfg.summary_ratios:
                try:
                    check_request(n_doc, r)
                    am_r = am_ratio(n_doc, n_sum, r)
                except DocumentError as e:
                    put({**base, "refused": str(e)}, f"summary+am@{r:g}")
                    continue
                v = self._compact(summ, am_r, score, n_doc, n_sum)
                put({**base, **v, **made, "am_ratio": am_r, "time_s": paid + v["time_s"]}, f"summary+am@{r:g}")
        finally:
            summ.close()

    def _document(self, key: str, doc: IngestedDocument, score) -> None:
        cfg, put = self.cfg, lambda v, name: self.cache.put(v, key, folder(self.cfg), name)
        n_doc = doc.layout.n_doc
        base = {"doc_tokens": n_doc, "doc_ingest_s": doc.ingest_s, "settings": asdict(self.settings),
                "method": DEFAULT_METHOD}
        if any(self._get(key, v) is None for v in summarized(cfg.summary_ratios)):
            self._summarized(doc, put, score, base)
        for r in cfg.summary_ratios:
            if self._get(key, f"am@{r:g}") is None:
                if n_doc / r < 1:
                    put({**base, "refused": f"ratio {r:g} leaves less than one key of {n_doc} tokens"}, f"am@{r:g}")
                else:
                    put({**base, **self._compact(doc, r, score, n_doc, None)}, f"am@{r:g}")

    def run(self, bar=None) -> None:
        ev = self.ev
        for key, art in ev.articles():
            if not self._done(key):
                doc = ev._open(art.text)
                try:
                    refs = ev.quality_references(key, art, doc)
                    self._document(key, doc, lambda s: ev._score_quality(s, art, refs))
                finally:
                    doc.close()
            if bar is not None:
                bar.update(1)
        for key, hay, cont in ev.haystacks():
            if not self._done(key):
                doc = ev._open(hay.text)
                try:
                    ref_lp = None
                    if self.cache.get(key, "full") is None:
                        full, ref_lp = ev._score_niah(doc.session, hay, cont, None)
                        self.cache.put({**full, "tokens": doc.layout.length}, key, "full")
                    if ref_lp is None:
                        ref_lp = tasks.continuation_logprobs(doc.session, cont)
                    self._document(key, doc, lambda s: ev._score_niah(s, hay, cont, ref_lp)[0])
                finally:
                    doc.close()
            if bar is not None:
                bar.update(1)


# the report ---------------------------------------------------------------------------------
def label(variant: str) -> str:
    if variant == "summary":
        return "summary alone"
    what, r = variant.split("@")
    return f"summary + {DEFAULT_METHOD} to {r}x" if what == "summary+am" else f"{DEFAULT_METHOD} alone at {r}x"


def collect(ev, retention) -> dict[str, dict]:
    """Pooled metrics per variant (``retention`` maps a mean NLL to R)."""
    from .report import _mean as mean

    cfg = ev.cfg
    q_keys, n_keys = ev.document_keys()
    rows = {}
    for v in variants(cfg.summary_ratios):
        got = {k: cached(ev.cache, cfg, k, v) for k in q_keys + n_keys}
        done = {k: r for k, r in got.items() if r is not None and "refused" not in r}
        q = [done[k] for k in q_keys if k in done]
        n = [done[k] for k in n_keys if k in done]
        nll = mean([x for r in q for x in r["nll"]])
        rows[v] = {
            "label": label(v), "nll": nll, "R": retention(nll), "mc": mean([x for r in q for x in r["mc"]]),
            "niah": mean([x for r in n for x in r["hits"]]), "kl": mean([r["kl"] for r in n]),
            "top1": mean([r["top1"] for r in n]), "overall_ratio": mean([r["overall_ratio"] for r in done.values()]),
            "time_s": mean([r["time_s"] for r in done.values()]),
            "time_vs_ingest": mean([r["time_s"] / r["doc_ingest_s"] for r in done.values()]),
            "summary_tokens": mean([r["summary_tokens"] for r in done.values() if "summary_tokens" in r]),
            "done": len(done), "missing": sum(r is None for r in got.values()),
            "refused": sorted({r["refused"] for r in got.values() if r is not None and "refused" in r}),
        }
    return rows


def report_lines(rows: dict[str, dict], cfg) -> list[str]:
    """The report's section: one row per variant, refusals with their reasons."""
    from .report import _fmt

    if not rows or all(r["done"] == 0 for r in rows.values()):
        return []
    out = ["## Summarize, then compact (kvlocal compact --summarize)", "",
           f"The model's own summary (at most {cfg.summary_tokens} tokens, greedy, "
           + (f"no {cfg.summary_no_repeat}-gram twice, " if cfg.summary_no_repeat else "no n-gram guard, ")
           + f"the product's instruction and header) replaces the document; its KV is then compacted with "
           f"{DEFAULT_METHOD} (queries: its own sources on the summary) to the overall ratio. Beside it, the same method on the document itself. "
           "Overall ratio = document tokens per kept key (mean over the documents); time = summary generation "
           "+ its ingestion + query generation + fit, per document, in the same run.", "",
           "| variant | overall ratio | R | MC | needles | KL | top-1 | time s | time ÷ ingestion |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        ratio = _fmt(r["overall_ratio"], ".0f")
        out.append(f"| {r['label']} | {ratio}{'x' if ratio != '–' else ''} | {_fmt(r['R'])} | {_fmt(r['mc'], '.2f')} | "
                   f"{_fmt(r['niah'], '.2f')} | {_fmt(r['kl'])} | {_fmt(r['top1'])} | {_fmt(r['time_s'], '.1f')} | "
                   f"{_fmt(r['time_vs_ingest'], '.2f')} |")
    refused = sorted({(r["label"], why) for r in rows.values() for why in r["refused"]})
    if refused:
        out += [""] + [f"- refused, {lbl}: {why}" for lbl, why in refused]
    missing = [r["label"] for r in rows.values() if r["missing"]]
    if missing:
        out += ["", f"Incomplete (resume with the same command): {', '.join(missing)}"]
    return out + [""]
