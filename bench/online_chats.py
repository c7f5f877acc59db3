"""Chats that compact themselves, by online method: does a number said early survive?

bench/long_document.py's chat (Part 2: a story's opening compacted 2x, then 24 turns of user "Go on." /
assistant: the story's next paragraph, 4 needles in the first turns' answers, 1,024 cells, online
compaction at ratio 2 whenever the context fills) on several SQuALITY dev stories, once per
online method, beside the full history and truncation in the same cells.  Measured: needles found,
the right numbers' answer NLL (teacher-forced, nats/token), next-token KL against the full history
over the next assistant turn.

    python bench/online_chats.py [--stories 0,4,5,6] [--methods am-facts-omp-balanced,am-facts-omp-cores-balanced]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import machine, write_report
from long_document import chat_part


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", default="0,4,5,6")
    ap.add_argument("--methods", default="am-facts-omp-balanced,am-facts-omp-cores-balanced,am-facts-omp-cores-content")
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--chat-ctx", type=int, default=1024)
    ap.add_argument("--out", default="online_chats")
    args = ap.parse_args()
    args.threads = os.cpu_count() or 2

    from kvlocal.am import DEFAULT_METHOD, ONLINE_METHOD
    from kvlocal.engine import binding
    from models import smollm2

    binding.set_verbose(False)
    model = binding.Model(smollm2.locate() or smollm2.ensure())
    stories, methods = [int(x) for x in args.stories.split(",")], args.methods.split(",")
    t0 = time.perf_counter()
    rows: dict = {}
    for si in stories:
        out = chat_part(args, model, args.threads, story=si, methods=methods)  # full and truncation once
        for name in ("full", "truncate"):
            rows[(name, si)] = out[name]
        for m in methods:
            rows[(m, si)] = o = out[f"online {m}"]
            print(f"story {si} {m}: {sum(o['hits'])} found, NLL {np.mean(o['nll']):.3f}, KL {o['kl']:.4f}", flush=True)

    def cell(name, si):
        r = rows[(name, si)]
        kl = f", KL {r['kl']:.3f}" if "kl" in r else ""
        return f"{sum(r['hits'])}/{len(r['hits'])}, {np.mean(r['nll']):.2f}{kl}"

    names = ["full", *methods, "truncate"]
    lines = [
        "# Chats that compact themselves: numbers said early, by online method",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/online_chats.py` on {machine(args.threads)}; "
        f"{time.perf_counter() - t0:.0f} s.",
        "",
        f"SmolLM2-135M-Instruct Q4_1; bench/long_document.py's chat on SQuALITY dev stories {stories}: the story's "
        f"opening compacted 2x (am-highest), then {args.turns} turns (user \"Go on.\", assistant: the next paragraph), "
        "4 needles (\"The special magic number for X is NNNNNNN.\") in the first turns' answers, "
        f"{args.chat_ctx} cells; online compaction at ratio 2 (the last 256 tokens kept, the conversation's captured "
        "queries) whenever the context fills, 4 times per chat; truncation drops the oldest turns in the same cells. "
        "Each cell: needles found / asked, mean answer NLL of the right numbers (nats/token, teacher-forced, found or "
        "not), next-token KL against the full history over the next assistant turn (96 tokens). "
        f"The document's default is {DEFAULT_METHOD}; a chat's is {ONLINE_METHOD}.",
        "",
        "| story | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for si in stories:
        lines.append(f"| {si} | " + " | ".join(cell(n, si) for n in names) + " |")
    tot = []
    for n in names:
        rs = [rows[(n, si)] for si in stories]
        kl = f", KL {np.mean([r['kl'] for r in rs]):.3f}" if all("kl" in r for r in rs) else ""
        tot.append(f"{sum(sum(r['hits']) for r in rs)}/{sum(len(r['hits']) for r in rs)}, "
                   f"{np.mean([x for r in rs for x in r['nll']]):.2f}{kl}")
    lines.append("| all | " + " | ".join(tot) + " |")
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
