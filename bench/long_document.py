"""Beyond the context window (issue 12): a long document compacted while it is ingested, and a
long chat that compacts itself.

Part 1 - a document longer than the context.  SQuALITY dev stories cut to ``--tokens`` (7,000:
inside SmolLM2's 8,192-token training context) with ``--needles`` needles at seeded depths
("The special magic number for X is NNNNNNN.").  Each story is held four ways:

  full        the whole document in an 8,192-cell context (the reference);
  truncate    its last tokens only, as many as a ``--ctx`` context holds beside the questions;
  streamed    compacted while ingested into a ``--ctx`` context at ``--ratio`` (kvlocal.streaming);
  one-shot    compacted at ``--ratio`` in one piece, in a context that holds the document and its
              repeat-prefill (positions of that pass run past 8,192: RoPE unscaled there);

both compactions with the default method on its own query sources.  Measured: needles found
(by third of the document), next-token KL and top-1 agreement with the full cache over the story's
next 96 tokens, and the likelihood of each right number (answer NLL).

Part 2 - a chat longer than its context.  A transcript of ``--turns`` turns (user: "Go on.",
assistant: the story's next paragraph) on top of a compacted opening of the story, fed into
  full       an 8,192-cell context that holds all of it;
  online     a ``--chat-ctx``-cell conversation that compacts its older part when full
             (``OnlineSettings`` defaults: kvlocal.am.ONLINE_METHOD, ratio 2, the last 256 tokens kept);
  truncate   a ``--chat-ctx``-cell conversation that drops its oldest turns when full (the same cells);
then scored on the next assistant turn (teacher-forced): KL and top-1 against the full history.

    python bench/long_document.py [--stories 2] [--tokens 7000] [--ctx 2048] [--ratio 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from common import ROOT, machine, pyplot, save_figure, write_report

CONDITIONS = ("full", "truncate", "streamed", "one-shot")


def squality(n: int) -> list[str]:
    with open(ROOT.parent / "shared" / "data" / "squality-dev.jsonl") as fh:
        return [json.loads(line)["document"] for line in fh][:n]


def long_stories(model, n: int, tokens: int) -> list[int]:
    """Indices of the first ``n`` dev stories long enough for ``tokens`` tokens plus a continuation."""
    out = []
    for i, story in enumerate(squality(25)):
        if len(model.tokenize(story, add_special=False)) >= tokens + 400:
            out.append(i)
        if len(out) == n:
            break
    return out


def needles_by_third(text: str, needles) -> list[int]:
    return [min(2, int(3 * text.index(f"for {key} is {num}") / len(text))) for key, num in needles]


def score(s, hay, cont_tokens, ref_lp, tasks) -> dict:
    hits = [tasks.needle_found(s, key, num) for key, num in hay.needles]
    nll = [tasks.needle_nll(s, key, num) for key, num in hay.needles]
    lp = tasks.continuation_logprobs(s, cont_tokens)
    out = {"hits": [bool(h) for h in hits], "nll": nll}
    if ref_lp is not None:
        out.update(tasks.agreement(ref_lp, lp))
    return out, lp


def document_part(args, model, threads: int) -> list[dict]:
    from kvlocal.api import Compaction
    from kvlocal.engine.session import Session
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.data import make_haystack

    count = lambda t: len(model.tokenize(t, add_special=False))  # noqa: E731
    rows = []
    for si in long_stories(model, args.stories, args.tokens):
        hay = make_haystack(squality(si + 1)[si], args.tokens, count, k=args.needles, seed=si)
        thirds = needles_by_third(hay.text, hay.needles)
        cont = model.tokenize(" " + hay.continuation, add_special=False)[:96]
        row = {"story": si, "doc_tokens": count(hay.text), "thirds": thirds}
        # full cache
        t0 = time.perf_counter()
        with Session(model, n_ctx=8192, n_threads=threads, progress=False) as s:
            s.ingest_document(hay.text, system=tasks.SYSTEM)
            row["full"], ref = score(s, hay, cont, None, tasks)
            row["full"]["cells"] = s.cells[0]
        row["full"]["s"] = time.perf_counter() - t0
        # truncation: the last tokens that fit the small context beside a question and its answer
        doc = model.tokenize(hay.text, add_special=False)
        keep = args.ctx - 160
        tail = model.detokenize(doc[-keep:])
        t0 = time.perf_counter()
        with Session(model, n_ctx=args.ctx, n_threads=threads, progress=False) as s:
            s.ingest_document(tail, system=tasks.SYSTEM)
            row["truncate"], _ = score(s, hay, cont, ref, tasks)
            row["truncate"]["cells"] = s.cells[0]
        row["truncate"]["s"] = time.perf_counter() - t0
        # compacted: streamed into the small context, and in one shot
        for name, n_ctx in (("streamed", args.ctx), ("one-shot", None)):
            t0 = time.perf_counter()
            if n_ctx is None:  # room for the document and its repeat-prefill
                n_ctx = 2 * row["doc_tokens"] + 1400
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Compaction(model, n_ctx=n_ctx, threads=threads, progress=False) as kv:
                    kv.ingest(hay.text, system=tasks.SYSTEM)
                    rep = kv.compact(ratio=args.ratio)
                    res, _ = score(kv.session, hay, cont, ref, tasks)
                    res.update(cells=rep.cells_after, streamed_chunks=rep.streamed_chunks, n_ctx=kv.session.n_ctx,
                               method=rep.method, queries="+".join(rep.queries), **kv.timings)
            res["s"] = time.perf_counter() - t0
            row[name] = res
        rows.append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "hits"})
                          for k, v in row.items()}), flush=True)
    return rows


def chat_part(args, model, threads: int, story: int = 0, methods=(None,)) -> dict:
    """The chat of Part 2 on SQuALITY dev story ``story``: the full history and truncation once, the
    online conversation once per method of ``methods`` (None: ``OnlineSettings``'s default), under
    "online" (the default) or "online METHOD"."""
    from kvlocal.api import Compaction
    from kvlocal.evaluation import tasks
    from kvlocal.online import OnlineSettings

    import random

    from kvlocal.evaluation.data import NEEDLE_KEYS

    story = squality(story + 1)[story]
    paras = [p.strip() for p in story.split("\n") if len(p.split()) > 25]
    opening, turns, target = paras[0], paras[1:1 + args.turns], paras[1 + args.turns]
    rng = random.Random(7)  # needles in the first quarter of the chat: gone from a truncated one
    needles = [(k, str(rng.randrange(1_000_000, 10_000_000))) for k in rng.sample(NEEDLE_KEYS, 4)]
    for i, (key, num) in enumerate(needles):
        turns[i * max(1, args.turns // 16)] += f" The special magic number for {key} is {num}."
    transcript = [m for p in turns for m in ({"role": "user", "content": "Go on."},
                                             {"role": "assistant", "content": p})]
    out = {"turns": args.turns, "needles": len(needles)}

    def run(max_context, online, method=None):
        with Compaction(model, n_ctx=8192 if max_context is None else max_context, threads=threads,
                        progress=False) as kv:
            kv.ingest(opening, system=tasks.SYSTEM)
            kv.compact(ratio=2, method="am-highest", queries="context")
            if online:
                kv.auto_compact(OnlineSettings(max_context=max_context) if method is None else
                                OnlineSettings(max_context=max_context, method=method))
            s = kv.session
            prompt = s.chat_tokens([{"role": "user", "content": "Go on."}])
            answer = model.tokenize(target, add_special=False)[:96]
            if online or max_context is None:
                kv.append(transcript)
                kv.make_room(len(prompt) + len(answer))
            else:  # truncation in the same cells: the oldest turns go when the next one would not fit
                for m in transcript + [None]:
                    tok = s.chat_tokens([m], add_assistant=False) if m else np.concatenate([prompt, answer])
                    while s.cells[0] + len(tok) > max_context:
                        drop = s.snapshot().positions
                        first = int(drop[drop >= kv.layout.length].min()) if (drop >= kv.layout.length).any() else None
                        if first is None:
                            raise RuntimeError("nothing left to drop")
                        s.ctx.seq_rm(0, first, first + 64)
                        s.cells[0] = int(s.snapshot().n_cells)
                    if m:
                        s.decode(tok, logits="none")
            n_past, cells = s.n_past, s.cells[0]
            lp = tasks.continuation_logprobs(s, np.concatenate([prompt, answer]))[len(prompt) - 1:-1]
            hits, nll = [], []
            for key, num in needles:  # asked in the room the scoring span left
                hits.append(bool(tasks.needle_found(s, key, num)))
                nll.append(tasks.needle_nll(s, key, num))
            return lp, {"n_past": n_past, "cells": cells, "compactions": len(kv.online_records), "hits": hits,
                        "nll": nll, "records": [r.as_dict() for r in kv.online_records]}

    ref, out["full"] = run(None, False)
    runs = [("online" if m is None else f"online {m}", True, m) for m in methods] + [("truncate", False, None)]
    for name, online, method in runs:
        lp, info = run(args.chat_ctx, online, method)
        out[name] = {**info, **tasks.agreement(ref, lp)}
    print(json.dumps({k: v for k, v in out.items()}, default=str)[:2000], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from kvlocal.engine import binding
    from models import smollm2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=7000)
    ap.add_argument("--needles", type=int, default=12)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--chat-ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-document", action="store_true", help="rerun the chat part only (the document "
                    "part is taken from the last results)")
    ap.add_argument("--skip-chat", action="store_true", help="rerun the document part only (the chat part is "
                    "taken from the last results)")
    args = ap.parse_args(argv)
    binding.set_verbose(False)
    path = smollm2.locate() or smollm2.ensure()
    model = binding.Model(path)
    saved = ROOT / "bench" / "results" / "long_document.json"
    if args.skip_document:  # the document part as measured last time, if any
        rows = json.loads(saved.read_text())["documents"] if saved.exists() else []
    else:
        rows = document_part(args, model, args.threads)
    chat = json.loads(saved.read_text())["chat"] if args.skip_chat else chat_part(args, model, args.threads)

    lines = ["# Beyond the context window: streamed compaction and self-compacting chats", "",
             f"Written by `python bench/long_document.py` on {machine(args.threads)}; model {path.name}.", ""]
    if rows:
        n = sum(len(r["thirds"]) for r in rows)
        lines += [
            f"## A {args.tokens}-token document, {args.ctx}-cell context", "",
            f"SQuALITY dev stories {[r['story'] for r in rows]} cut to {args.tokens} tokens, {args.needles} needles "
            f"each at seeded depths ({n} in all); compactions at {args.ratio:g}x with the default method on its own "
            "query sources; KL / top-1 against the full cache over the story's next 96 tokens.", "",
            "| condition | context (cells) | cells held | needles found | first third | middle | last third "
            "| answer NLL first third | middle | last third | next-token KL | top-1 | time s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in CONDITIONS:
            hits = [h for r in rows for h in r[c]["hits"]]
            by = [[h for r in rows for h, t in zip(r[c]["hits"], r["thirds"], strict=True) if t == k] for k in range(3)]
            ctx = {"full": 8192, "truncate": args.ctx}.get(c) or int(np.mean([r[c]["n_ctx"] for r in rows]))
            kl = "-" if c == "full" else f"{np.mean([r[c]['kl'] for r in rows]):.3f}"
            top1 = "-" if c == "full" else f"{np.mean([r[c]['top1'] for r in rows]):.3f}"
            nll = [np.mean([x for r in rows for x, t in zip(r[c]["nll"], r["thirds"], strict=True) if t == k] or [np.nan])
                   for k in range(3)]
            lines.append(f"| {c} | {ctx} | {int(np.mean([r[c]['cells'] for r in rows]))} | {sum(hits)}/{len(hits)} | "
                         + " | ".join(f"{sum(b)}/{len(b)}" for b in by) + " | "
                         + " | ".join(f"{x:.2f}" for x in nll)
                         + f" | {kl} | {top1} | {np.mean([r[c]['s'] for r in rows]):.0f} |")
        st = rows[0]["streamed"]
        lines += ["", "Answer NLL: mean negative log-likelihood per token of the right number as the answer to its "
                  "question (teacher-forced), found or not; lower is better, a uniform guess over digits is "
                  f"{np.log(10):.2f}.", "", f"Streamed: {np.mean([r['streamed']['streamed_chunks'] for r in rows]):.0f} chunks per document "
                  f"({st['method']}, queries {st['queries']}); times include ingestion, queries, fits and the "
                  "questions. One-shot: the context holds the document twice (repeat-prefill), so its repeat pass "
                  "runs at positions past the 8,192 the model was trained for."]
    lines += ["", f"## A chat of {chat['turns']} turns in a {args.chat_ctx}-cell context", "",
              "The story's opening (compacted 2x) and a transcript of user \"Go on.\" / assistant: the next "
              f"paragraph, with {chat['needles']} needles in the assistant turns of the first quarter; scored on "
              "the next paragraph (96 tokens, teacher-forced) against the full history, then asked for each needle "
              "(found, and the right number's answer NLL). Online and truncated conversations hold at most the "
              "same cells.", "",
              "| condition | positions | cells held | compactions | next-token KL | top-1 | needles found "
              "| needle answer NLL |",
              "|---|---|---|---|---|---|---|---|"]
    for c in ("full", "online", "truncate"):
        r = chat[c]
        kl = "-" if c == "full" else f"{r['kl']:.3f}"
        top1 = "-" if c == "full" else f"{r['top1']:.3f}"
        lines.append(f"| {c} | {r['n_past']} | {r['cells']} | {r['compactions']} | {kl} | {top1} | "
                     f"{sum(r['hits'])}/{len(r['hits'])} | {np.mean(r['nll']):.2f} |")
    plt = pyplot()
    if plt is not None and rows:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        for c in CONDITIONS:
            by = [np.mean([x for r in rows for x, t in zip(r[c]["nll"], r["thirds"], strict=True) if t == k] or [np.nan])
                  for k in range(3)]
            ax[0].plot(["first third", "middle", "last third"], by, marker="o", label=c)
        ax[0].set_ylabel("needle answer NLL (nats/token)")
        ax[0].set_title(f"{args.tokens}-token document, {args.ctx}-cell context")
        ax[0].legend(fontsize=8)
        names = ["online", "truncate"]
        ax[1].bar(names, [chat[c]["kl"] for c in names])
        ax[1].set_ylabel("next-token KL vs full history")
        ax[1].set_title(f"{chat['turns']}-turn chat, {args.chat_ctx}-cell context")
        save_figure(fig, ROOT / "bench" / "results" / "long_document.png")
        lines += ["", "![long document and chat](long_document.png)"]
    write_report("long_document", lines)
    (ROOT / "bench" / "results" / "long_document.json").write_text(
        json.dumps({"documents": rows, "chat": chat}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
