"""Non-uniform budgets from downstream sensitivity: what would they buy if they cost no padding?

The paper allocates keys per head from log-perplexity influence curves.  Here, per layer (the
heads of a layer share its cells' count in llama.cpp anyway):

1. calibration (SQuALITY *train* stories, never evaluated): for every layer alone, compact it with
   the default method at keep-fractions 5 / 10 / 20 % (every other layer whole) and measure the
   rise of the log-perplexity of the story's next 128 tokens over the full cache;
2. the spec's ratio-agnostic swap solver turns the mean curves into layer proportions;
3. evaluation on the two needle haystacks of the standard grid (SQuALITY dev stories 0, 1 at
   3,000 tokens, 8 needles each): uniform vs influence budgets at 10x and 20x, the default method
   on its own queries; needles found, next-token KL and top-1 agreement with the full cache over
   the next 96 story tokens.

Unequal layers cost padding in llama.cpp's layout (every layer has the same cells); the table
reports it and compares at the nominal ratio, i.e. as if the budgets were stored packed.

    python bench/influence_budgets.py [--docs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, pyplot, save_figure, write_report

GRID = (0.05, 0.1, 0.2)
TARGETS = (0.05, 0.1)
RATIOS = (10, 20)
METHOD = "am-facts-omp"


def stories(name: str, n: int) -> list[str]:
    with open(ROOT.parent / "shared" / "data" / name) as fh:
        return [json.loads(line)["document"] for _, line in zip(range(n), fh, strict=False)]


def model_layers(model):
    from kvlocal.engine.modelinfo import ModelInfo

    return ModelInfo.from_model(model).base_layers


def main(argv: list[str] | None = None) -> int:
    from kvlocal.engine import binding
    from kvlocal.am import Compactor, JsonBudget, get_method, swap_allocation
    from kvlocal.am.budgets import to_json
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.data import make_haystack
    from kvlocal.engine.queries import collect_queries
    from kvlocal.engine.session import Session
    from models import smollm2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2, help="calibration stories")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--curves", default=None, help="reuse the curves of an earlier run (its JSON) instead of measuring")
    args = ap.parse_args(argv)

    model = binding.Model(smollm2.ensure())
    method = get_method(METHOD)
    count = lambda t: len(model.tokenize(t, add_special=False))  # noqa: E731
    t_start = time.perf_counter()

    def prepared(s, text):
        layout = s.ingest_document(text, system=tasks.SYSTEM, capture_queries=True)
        qs = collect_queries(s, layout, list(method.queries))
        facts = method.fact_ranks(s.token_texts(layout.length))
        return layout, qs, facts, s.snapshot(), s.state()

    # 1. influence curves: [docs, layers, grid] rise of the continuation's NLL (nats per token)
    curves = []
    if args.curves:
        curves = [np.asarray(json.loads(open(args.curves).read())["curves"])]
    for i, story in enumerate([] if args.curves else stories("squality-train.jsonl", args.docs)):
        toks = model.tokenize(story, add_special=False)
        text, cont = model.detokenize(toks[: args.tokens]), np.asarray(toks[args.tokens: args.tokens + 128], np.int32)
        with Session(model, n_ctx=2 * args.tokens + 1536, capture=True, progress=False) as s:
            layout, qs, facts, snap, blob = prepared(s, text)
            ref = tasks.continuation_logprobs(s, cont)
            nll_full = -ref[np.arange(len(cont) - 1), cont[1:]].mean()
            n_layers = len(snap.keys)
            c = np.zeros((n_layers, len(GRID)))
            for li in range(n_layers):
                others = [x for x in range(n_layers) if x != li]
                for gi, g in enumerate(GRID):
                    cache, _ = Compactor(method, ratio=1 / g, max_queries_per_head=4096, holdout=0.0).compact(
                        snap, layout.doc_start, layout.doc_end, qs, facts=facts, whole_layers=others)
                    s.inject(cache, snap)
                    lp = tasks.continuation_logprobs(s, cont)
                    c[li, gi] = -lp[np.arange(len(cont) - 1), cont[1:]].mean() - nll_full
                    s.restore(blob)
            curves.append(c)
        print(f"calibration story {i}: {layout.n_doc} tokens, {time.perf_counter() - t_start:.0f} s", flush=True)
    mean = np.mean(curves, axis=0)
    # the solver wants errors that fall as a layer keeps more: clip the noise of insensitive layers
    mono = np.maximum.accumulate(np.maximum(mean, 0.0)[:, ::-1], axis=1)[:, ::-1]
    p_layer = swap_allocation(mono, np.asarray(GRID), TARGETS)
    n_head_kv = model.n_head_kv
    layer_ids = tuple(model_layers(model))
    props = np.repeat(p_layer[:, None] / n_head_kv, n_head_kv, axis=1)
    table = to_json(props, layer_ids)
    # the solver's allocation is extreme (most layers near nothing): also half uniform, half influence
    mixed = to_json(0.5 * props + 0.5 / props.size, layer_ids)
    policies = (("uniform", "uniform"), ("influence", JsonBudget(table)), ("½ uniform + ½ influence", JsonBudget(mixed)))

    # 3. held-out evaluation on the standard needle haystacks
    rows = []
    for si, story in enumerate(stories("squality-dev.jsonl", 2)):
        hay = make_haystack(story, 3000, count, k=8, seed=si)
        cont = np.asarray(model.tokenize(" " + hay.continuation, add_special=False)[:96], np.int32)
        with Session(model, n_ctx=2 * 3000 + 1536, capture=True, progress=False) as s:
            layout, qs, facts, snap, blob = prepared(s, hay.text)
            ref = tasks.continuation_logprobs(s, cont)
            for ratio in RATIOS:
                for name, budgets in policies:
                    # the standard grid's settings: its uniform cells are these rows' uniform ones
                    cache, rep = Compactor(method, ratio=ratio, budgets=budgets, max_queries_per_head=4096,
                                           holdout=0.1).compact(snap, layout.doc_start, layout.doc_end, qs,
                                                                facts=facts)
                    s.inject(cache, snap)
                    hits = sum(tasks.needle_found(s, k, n) for k, n in hay.needles)
                    ag = tasks.agreement(ref, tasks.continuation_logprobs(s, cont))
                    rows.append({"story": si, "ratio": ratio, "budgets": name, "hits": hits, **ag,
                                 "padding": rep.padding_fraction, "cells": cache.n_cells})
                    print(rows[-1], flush=True)
                    s.restore(blob)

    def agg(ratio, name, key):
        return [r[key] for r in rows if r["ratio"] == ratio and r["budgets"] == name]

    lines = [
        "# Non-uniform layer budgets from downstream influence (SmolLM2)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `bench/influence_budgets.py` on {machine(os.cpu_count() or 2)}, "
        f"{time.perf_counter() - t_start:.0f} s in all"
        + (f" (influence curves reused from `{Path(args.curves).name}`, measured by an earlier full run)."
           if args.curves else "."),
        "",
        f"SmolLM2-135M-Instruct Q4_1; method {METHOD} on its own queries ({' + '.join(method.queries)}, at most "
        "4096 per KV head). Influence: for each layer alone compacted at keep-fractions "
        f"{', '.join(f'{g:.0%}' for g in GRID)} (every other layer whole), the rise of the log-perplexity of the "
        f"next 128 tokens of {args.docs} SQuALITY *train* stories cut to {args.tokens} tokens; the spec's swap "
        f"solver (targets {', '.join(f'{t:.0%}' for t in TARGETS)}) turns the mean curves into layer proportions "
        "(heads of a layer equal); a third policy mixes it half and half with uniform. Evaluated on the standard grid's needle haystacks (SQuALITY dev stories 0 and 1, "
        "3,000 tokens, 8 needles each): needles found, next-token KL and top-1 agreement with the full cache over "
        "the next 96 story tokens.",
        "",
        "## Influence curves (rise of the continuation's NLL, nats/token, mean over calibration stories)",
        "",
        "| layer | " + " | ".join(f"keep {g:.0%}" for g in GRID) + " | proportion × layers |",
        "|---|" + "---|" * (len(GRID) + 1),
    ] + [f"| {il} | " + " | ".join(f"{v:+.3f}" for v in mean[li]) + f" | {p_layer[li] * len(p_layer):.2f} |"
         for li, il in enumerate(layer_ids)] + [
        "",
        "## Held-out: uniform vs influence budgets (sum over the 2 haystacks; KL and top-1: mean)",
        "",
        "| ratio | budgets | needles (of 16) | next-token KL | top-1 | padding | cells |",
        "|---|---|---|---|---|---|---|",
    ] + [f"| {r}x | {n} | {sum(agg(r, n, 'hits'))} | {np.mean(agg(r, n, 'kl')):.3f} | {np.mean(agg(r, n, 'top1')):.3f}"
         f" | {100 * np.mean(agg(r, n, 'padding')):.0f} % | {int(np.mean(agg(r, n, 'cells')))} |"
         for r in RATIOS for n, _ in policies] + [
        "",
        "Padding: unequal layers, each padded to the largest (llama.cpp gives every layer the same cells); the",
        "comparison is at the nominal ratio, as if the budgets were stored packed.",
    ]
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for gi, g in enumerate(GRID):
            ax.plot(layer_ids, mean[:, gi], marker="o", ms=3, label=f"keep {g:.0%}")
        ax.set_xlabel("layer (compacted alone)")
        ax.set_ylabel("Δ NLL (nats/token)")
        ax.set_title(f"SmolLM2: influence of each layer's compaction ({METHOD})")
        ax.legend()
        save_figure(fig, ROOT / "bench" / "results" / "influence_budgets.png")
        lines += ["", "![influence curves](influence_budgets.png)"]
    write_report("influence_budgets", lines)
    (ROOT / "bench" / "results" / "influence_budgets.json").write_text(
        json.dumps({"curves": mean.tolist(), "layer_proportions": p_layer.tolist(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
