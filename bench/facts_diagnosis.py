"""Can a key score find the facts?  Where needle digits rank under every score we tried.

A compaction that keeps 1/r of each head's keys keeps a number only if the number's digits rank
in the top 1/r of the selection score, in (nearly) every layer.  On the evaluation grid's
haystacks (SQuALITY dev stories 0 and 1 cut to 3,000 tokens, 8 needles each, seeds 0 and 1) this
bench ranks every document token, per layer, by the score a layer-shared selection would use
(max over the layer's KV heads of the per-head score), and reports the median percentile of the
needle digits (0.5: an average token; 0.8: kept at 5x):

  rms / max        repeat-prefill queries, rms / max of block-local attention (am-highest, kvzip)
  contribution     repeat-prefill, max over queries of attention x |v_j - o_i| (KVzip+-like)
  recall max       recall-probe queries ("list every number ..."), max attention
  surprisal        the model's own next-token loss at ingestion (no attention)

    python bench/facts_diagnosis.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from common import RESULTS, machine, pyplot, save_figure, write_report
from scipy.special import logsumexp
from scipy.stats import rankdata

SCORES = ("rms", "max", "contribution", "recall max", "surprisal")


def _attention(p) -> tuple[np.ndarray, np.ndarray]:
    """Block-local attention [n, T] of a head problem and its outputs [n, d]."""
    E = p.logits().astype(np.float64)
    E -= E.max(axis=1, keepdims=True)
    np.exp(E, out=E)
    E /= E.sum(axis=1, keepdims=True)
    return E, E @ p.values.astype(np.float64)


def _contribution(p) -> np.ndarray:
    A, out = _attention(p)
    V = p.values.astype(np.float64)
    d2 = (V ** 2).sum(1)[None, :] - 2 * out @ V.T + (out ** 2).sum(1)[:, None]
    return (A * np.sqrt(np.maximum(d2, 0))).max(axis=0)


def _surprisal(model, tokens: np.ndarray, n_batch: int = 256) -> np.ndarray:
    from kvlocal.engine import binding

    nll = np.zeros(len(tokens))
    with binding.Context(model, n_ctx=len(tokens) + 16, n_batch=n_batch) as ctx:
        for a in range(0, len(tokens), n_batch):
            part = tokens[a:a + n_batch]
            lg = ctx.decode(part, pos=a, logits="all").astype(np.float64)
            nxt = tokens[a + 1:a + 1 + len(part)]
            m = len(nxt)
            nll[a + 1:a + 1 + m] = logsumexp(lg[:m], axis=1) - lg[np.arange(m), nxt]
    return nll


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", default="0,1")
    args = ap.parse_args()

    from niah_diagnosis import _needle_positions

    from kvlocal.am import Compactor
    from kvlocal.evaluation.data import make_haystack, squality_stories
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from models.smollm2 import ensure as ensure_model

    cfg = EvalConfig()
    ev = Evaluator(str(ensure_model()), cfg, "/tmp/kvlocal-facts-diagnosis", progress=False)
    model = ev.model
    t_start = time.perf_counter()
    per_layer = {k: [] for k in SCORES}  # per story: [n_layers] median percentile of the digits
    sentence = {k: [] for k in SCORES}
    for si in [int(x) for x in args.stories.split(",")]:
        hay = make_haystack(squality_stories()[si], 3000, lambda t: len(model.tokenize(t, add_special=False)),
                            k=cfg.needles, seed=cfg.seed * 1000 + si)
        doc = ev._open(hay.text)
        s = doc.session
        sent_pos, num_pos = _needle_positions(model, s.tokens, hay.needles)
        rep, rec = doc.queries(("repeat",)), doc.queries(("recall",))
        snap, lo, hi = doc.snapshot, doc.layout.doc_start, doc.layout.doc_end
        cells = np.flatnonzero((snap.positions >= lo) & (snap.positions < hi))
        pos = snap.positions[cells]
        digits, in_sentence = np.isin(pos, np.concatenate(num_pos)), np.isin(pos, sent_pos)
        problem = Compactor(max_queries_per_head=None)._problems(snap, cells, None)
        nll = _surprisal(model, np.asarray(s.tokens[:hi], np.int32))[pos]

        def pct(score):
            r = rankdata(score) / len(score)
            return float(np.median(r[digits])), float(np.median(r[in_sentence]))

        rows = {k: [] for k in SCORES}
        for li in range(len(snap.keys)):
            heads = {k: [] for k in SCORES if k != "surprisal"}
            for h in range(snap.keys[0].shape[1]):
                p, pr = problem(li, h, 1, rep), problem(li, h, 1, rec)
                st = p.stats()
                heads["rms"].append(np.sqrt(st.a_sq / p.n))
                heads["max"].append(st.a_max)
                heads["contribution"].append(_contribution(p))
                heads["recall max"].append(pr.stats().a_max)
            for k, v in heads.items():
                rows[k].append(pct(np.max(np.stack(v), axis=0)))
            rows["surprisal"].append(pct(nll))
        for k in SCORES:
            per_layer[k].append([d for d, _ in rows[k]])
            sentence[k].append([x for _, x in rows[k]])
        s.close()
        print(f"story {si} done", flush=True)

    n_layers = len(per_layer["rms"][0])
    lines = [
        "# Can a key score find the facts?",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/facts_diagnosis.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        "SmolLM2-135M-Instruct Q4_1; the evaluation grid's haystacks (SQuALITY dev stories "
        f"{args.stories} cut to 3,000 tokens, 8 needles each). Every document token is ranked per layer by "
        "the score a layer-shared selection uses (max over the layer's 3 KV heads); the table gives the "
        "median percentile of the needle digits (0.5 = an average token; a selection keeping 1/r of the keys "
        "keeps tokens above 1 - 1/r: 0.5 at 2x, 0.8 at 5x, 0.9 at 10x). Queries: all repeat-prefill "
        "queries, all recall-probe queries.",
        "",
        "| score | digits: mean over layers | digits: worst layer | digits: best layer | layers with digits >= 0.8 "
        "| whole needle sentence: mean |",
        "|---|---|---|---|---|---|",
    ]
    for k in SCORES:
        d = np.array(per_layer[k])  # [stories, layers]
        lines.append(f"| {k} | {d.mean():.2f} | {d.min():.2f} | {d.max():.2f} | "
                     f"{int((d >= 0.8).sum())} of {d.size} | {np.mean(sentence[k]):.2f} |")
    lines += ["", "Per layer (mean over the stories), digits:", "",
              "| layer | " + " | ".join(SCORES) + " |", "|---|" + "---|" * len(SCORES)]
    for il in range(n_layers):
        lines.append(f"| {il} | " + " | ".join(f"{np.mean([r[il] for r in per_layer[k]]):.2f}" for k in SCORES) + " |")
    png = _plot(per_layer, n_layers)
    if png:
        lines += ["", f"![digit percentile per layer]({png.name})"]
    write_report("facts_diagnosis", lines)
    (RESULTS / "facts_diagnosis.json").write_text(json.dumps({"per_layer": per_layer, "sentence": sentence},
                                                             indent=1))
    return 0


def _plot(per_layer, n_layers):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, v in per_layer.items():
        ax.plot(range(n_layers), np.mean(v, axis=0), label=k, marker=".")
    for y, lab in ((0.5, "2x"), (0.8, "5x"), (0.9, "10x")):
        ax.axhline(y, color="grey", lw=0.6, ls="--")
        ax.text(n_layers - 0.5, y + 0.01, f"kept at {lab}", fontsize=7, ha="right")
    ax.set_xlabel("layer")
    ax.set_ylabel("needle digits: median percentile")
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2-135M, 3k-token haystacks: no key score ranks the digits high")
    ax.legend(fontsize=7, ncol=3)
    path = RESULTS / "facts_diagnosis.png"
    save_figure(fig, path)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
