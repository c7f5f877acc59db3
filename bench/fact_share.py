"""How much of the evaluation documents the facts are: the share of tokens that am-facts* keep
verbatim (sentences holding a number, ``kvlocal.am.facts.fact_mask``) in the grid's two needle
haystacks and three QuALITY articles, against the share of keys a head keeps at each ratio.

    python bench/fact_share.py
"""

from __future__ import annotations

import os
import tempfile
import time

from common import machine, write_report

RATIOS = (5, 10, 20, 50)


def main() -> int:
    from kvlocal.engine import binding
    from kvlocal.evaluation.data import cut_to_tokens, make_haystack, quality_articles, squality_stories
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from kvlocal.am.facts import fact_mask
    from models.smollm2 import ensure as ensure_model

    cfg = EvalConfig()
    model = binding.Model(str(ensure_model()))
    with tempfile.TemporaryDirectory() as tmp:
        limit = Evaluator(model, cfg, tmp, progress=False).max_doc_tokens()  # the harness's cut

    def n_tokens(text: str) -> int:
        return len(model.tokenize(text, add_special=False))

    def share(text: str) -> tuple[int, float]:
        ids = model.tokenize(text, add_special=False)
        pieces = [model.token_bytes(int(i)).decode("utf-8", "replace") for i in ids]
        return len(ids), float(fact_mask(pieces).mean())

    docs = []
    stories = squality_stories(cfg.data)
    for si in cfg.haystack_stories:
        hay = make_haystack(stories[si], cfg.haystack_tokens[0], n_tokens, k=cfg.needles, seed=cfg.seed * 1000 + si)
        docs.append((f"needle haystack, SQuALITY dev story {si}", *share(hay.text)))
    articles = quality_articles(cfg.data)
    for ai in cfg.articles:
        text, _ = cut_to_tokens(articles[ai].text, limit, n_tokens)
        docs.append((f"QuALITY article {ai}", *share(text)))
    lines = [
        "# Share of fact tokens in the evaluation documents",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/fact_share.py` on {machine(os.cpu_count() or 2)}; "
        "SmolLM2-135M-Instruct tokenizer; facts = tokens of sentences holding a number (what am-facts* keep "
        "verbatim). A head keeps 1/ratio of the document's keys: " + ", ".join(f"{100 / r:.0f} % at {r}x" for r in RATIOS)
        + ".",
        "",
        "| document | tokens | fact tokens |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {n:,} | {100 * f:.1f} % |" for name, n, f in docs]
    write_report("fact_share", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
