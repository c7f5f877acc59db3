"""Facts beyond numbers in digits: names read once, numbers written in words, and whole numbers.

am-facts-omp-near keeps numbers and their sentences verbatim; a name is kept only if attention
keeps it.  This bench puts 8 needles into SQuALITY stories: "name needles" ("The keeper of the X
is Clara Marlowe.", first and last names drawn at random from 16 each, none twice in a haystack;
asked "Who is the keeper of the X?"), the grid's number needles (``number``: seven digits) or
numbers in words (``words``: "The special magic number for X is six hundred and forty-two.").
Compared, side by side on the same queries (repeat + self-study, the grid's sampling and 10 %
hold-out):

  am-facts-omp-near        numbers only (the default before am-facts-omp-names)
  + rare names             names mentioned at most twice in the document count as facts too, ranked
                           like numbers (a name the story repeats is held by its other mentions;
                           a word the document also writes in lower case is no name)
  am-facts-omp-names       the same names ranked below every number and its sentence, joining the
                           facts only while they hold less than half of a head's budget (the numbers
                           keep their whole share, the rest stays fitted)
  + names beside numbers   am-facts-omp-names with a rare name in a number's sentence ranked with
                           the number ("finished in 1889 by Tobias Grell")
  + numbers in words       and numbers written in words as facts in the names' tier
  + whole numbers (d)      am-facts-omp-names keeping, when the numbers do not all fit with their d
                           nearest tokens, whole numbers with those tokens (the most number tokens
                           first) and none in part; d = 3 is am-facts-omp-whole
  am-facts-omp-whole       the default before am-facts-omp-half
  am-facts-omp-half        the default before am-facts-omp-balanced: am-facts-omp-whole with the facts'
                           share capped at half of the budget up to 10x, 0.5 sqrt(10/ratio) beyond
                           (bench/results/fact_budget.md)
  am-facts-omp-balanced    the default: am-facts-omp-half with half of the fit's query rows from the
                           queries asked after the document (bench/results/after_document.md)
  am-facts-omp-cores-balanced
                           am-facts-omp-cores on am-facts-omp-balanced's query rows
  am-facts-omp-cores-fixed am-facts-omp-cores-balanced with the facts keeping below 10x as many keys as at
                           10x (the same method from 10x on; bench/results/fixed_facts.md)
  + fixed tails            am-facts-omp-cores-balanced with every fact's core within half of the budget and
                           the sentences' tails below 10x only up to the facts' keys at 10x
                           (SharedSpans.fact_fixed "tails")
  + cores first            am-facts-omp-cores: am-facts-omp-half with every fact's core (a number or a name
                           with its 3 nearest tokens) before the rest of any sentence
  + cores first and whole names
                           and names whose cores do not all fit kept whole (full names first), none in
                           part
  + name units             am-facts-omp-cores-balanced with every name's own keys first, then the names'
                           neighbours a name at a time, the names of most tokens first, the same in every layer
                           (SharedSpans.fact_name_units; bench/results/name_diagnosis.md says why)
  + name words             am-facts-omp-cores-balanced with a name's sentence ranked by content words from
                           the name, not tokens: "lantern" before "is" and "." (SharedSpans.fact_name_words)
  truncate, snapkv         baselines (snapkv on the self-study queries)

Needles: the whole name (the 7-digit number; a number in words, in words or digits) in the greedy
answer; answer NLL: mean NLL per token of the right answer teacher-forced after its question, lower
is better (a 135M model often names the wrong person even with the full cache, so the count alone
is coarse).  KL: next-token KL against the full cache over the story's next 96 tokens.

    python bench/name_needles.py [--stories 0,1] [--ratios 5,10,20] [--kinds name,number] [--methods ...]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from common import machine, write_report


def variants():
    from kvlocal.am.methods import get_method

    names = get_method("am-facts-omp-names")
    return {
        "am-facts-omp-near": get_method("am-facts-omp-near"),
        "+ rare names": _variant(names, "+ rare names", fact_names_below=False, fact_names_upto=1.0),
        "am-facts-omp-names": names,
        "am-facts-omp-whole": get_method("am-facts-omp-whole"),
        "am-facts-omp-half": get_method("am-facts-omp-half"),
        "am-facts-omp-balanced": get_method("am-facts-omp-balanced"),
        "am-facts-omp-cores-balanced": get_method("am-facts-omp-cores-balanced"),
        "am-facts-omp-cores-fixed": get_method("am-facts-omp-cores-fixed"),
        "am-facts-omp-cores-content": get_method("am-facts-omp-cores-content"),
        "am-facts-omp-cores-loose": get_method("am-facts-omp-cores-loose"),
        "am-facts-omp-cores-late": get_method("am-facts-omp-cores-late"),
        "am-facts-omp-cores-late5": get_method("am-facts-omp-cores-late5"),
        "+ fixed tails": _variant(get_method("am-facts-omp-cores-fixed-tails"), "+ fixed tails"),
        "+ names beside numbers": _variant(names, "+ names beside numbers", fact_names_with_numbers=True),
        "+ numbers in words": _variant(names, "+ numbers in words", fact_number_words=True,
                                       fact_names_with_numbers=True),
        **{f"+ whole numbers ({d})": _variant(names, f"+ whole numbers ({d})", fact_whole=d) for d in (2, 4)},
        "+ cores first": _variant(get_method("am-facts-omp-cores"), "+ cores first"),
        "+ cores first and whole names": _variant(get_method("am-facts-omp-cores"), "+ cores first and whole names",
                                                  fact_name_whole=True),
        "+ name units": _variant(get_method("am-facts-omp-cores-balanced"), "+ name units", fact_name_units=True),
        "+ name words": _variant(get_method("am-facts-omp-cores-balanced"), "+ name words", fact_name_words=True),
        "truncate": get_method("truncate"),
        "snapkv": get_method("snapkv"),
    }


def _variant(method, name: str, **selector):
    """``method`` renamed ``name``, its selector with the settings ``selector`` changed."""
    return replace(method, selector=replace(method.selector, **selector), name=name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", default="0,1")
    ap.add_argument("--ratios", default="5,10,20")
    ap.add_argument("--kinds", default="name,number")
    ap.add_argument("--methods", default="am-facts-omp-near,+ rare names,am-facts-omp-names,truncate,snapkv",
                    help="comma-separated, from: " + ", ".join(variants()))
    ap.add_argument("--out", default="name_needles")
    args = ap.parse_args()
    stories, ratios = [int(x) for x in args.stories.split(",")], [int(x) for x in args.ratios.split(",")]
    kinds = args.kinds.split(",")

    import numpy as np

    from kvlocal.am import Compactor
    from kvlocal.evaluation import tasks
    from kvlocal.evaluation.data import squality_stories
    from kvlocal.evaluation.harness import EvalConfig, Evaluator
    from models.smollm2 import ensure as ensure_model

    every = variants()
    unknown = [m for m in args.methods.split(",") if m not in every]
    if unknown:
        ap.error(f"unknown methods {unknown}: choose from {', '.join(every)}")
    methods = {m: every[m] for m in args.methods.split(",")}
    cfg = EvalConfig()
    ev = Evaluator(str(ensure_model()), cfg, "/tmp/kvlocal-name-needles", progress=False)
    t_start = time.perf_counter()
    results, full, shares = {}, {}, {}
    texts = squality_stories()
    for kind in kinds:
        for si in stories:
            hay, cont = ev.haystack(texts[si], si, 3000, kind)
            doc = ev._open(hay.text)
            s, snap, lo, hi = doc.session, doc.snapshot, doc.layout.doc_start, doc.layout.doc_end
            n_head_kv = snap.keys[0].shape[1]

            def score(ref_lp):  # needles found, answer NLL per needle, the harness's scores and log-probs
                out, lp = ev._score_niah(s, hay, cont, ref_lp, kind)
                return sum(out["hits"]), [tasks.needle_nll(s, key, ans, kind) for key, ans in hay.needles], out, lp

            hits, nll, _, ref_lp = score(None)
            got = full.setdefault(kind, {"hits": 0, "nll": []})
            got["hits"] += hits
            got["nll"] += nll
            pieces = s.token_texts(doc.layout.length)
            for name, method in methods.items():
                qs = doc.queries(method.queries) if method.needs_queries else None
                ranks = method.fact_ranks(pieces)
                if ranks is not None:
                    shares[(kind, si, name)] = float((ranks[lo:hi] > 0).mean())
                for r in ratios:  # the rows a method fits on may depend on the ratio (Method.after_share)
                    train = None if qs is None else Compactor(method, ratio=r, max_queries_per_head=cfg.max_queries,
                                                              holdout=0.1, seed=cfg.seed)._split(qs, n_head_kv)[0]
                    doc.restore()
                    cache, _ = Compactor(method, ratio=r, seed=cfg.seed).compact(snap, lo, hi, train, facts=ranks)
                    s.inject(cache, snap)
                    hits, nll, out, _ = score(ref_lp)
                    kl = out["kl"]
                    got = results.setdefault((kind, name, r), {"hits": 0, "kl": [], "nll": []})
                    got["hits"] += hits
                    got["kl"].append(kl)
                    got["nll"] += nll
                    print(f"{kind} story {si} {r}x {name}: {hits} needles, answer NLL {np.mean(nll):.3f}, "
                          f"KL {kl:.3f}", flush=True)
            doc.close()

    n = cfg.needles * len(stories)
    lines = [
        "# Facts in the haystack: names, numbers in words, whole numbers",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `bench/name_needles.py` on {machine(os.cpu_count() or 2)}; "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        f"SmolLM2-135M-Instruct Q4_1; SQuALITY dev stories {stories} cut to 3,000 tokens, {cfg.needles} needles "
        "each at seeded depths (seed 1000 x the grid's seed + story): name needles (\"The keeper of the X is "
        "Clara Marlowe.\", first and last names drawn from 16 each, none twice in a haystack; asked \"Who is "
        "the keeper of the X?\"; found when the whole name is in the greedy answer) or the grid's number "
        "needles (7 digits, exact match), or number needles in words (\"The special magic number for X is six "
        "hundred and forty-two.\", 101-999, found in words or in digits). Answer NLL: mean NLL per token of the right name (number) "
        "teacher-forced after its question (a name or a number in words after the needle's own words, \"The "
        "keeper of the X is\"), lower is better. AM rows fitted on repeat + self-study queries, "
        f"at most {cfg.max_queries} per KV head (the grid's sampling and 10 % hold-out); snapkv on the "
        "self-study queries. KL: next-token KL against the full cache over the story's next "
        f"{cfg.continuation_tokens} tokens. A name is a fact when mentioned at most "
        f"{every['am-facts-omp-names'].selector.fact_rare} times in the "
        "document and never written in lower case. Fact tokens: the share of the document's tokens the "
        "method counts as facts, per story.",
        "",
    ]
    for kind in kinds:
        title = {"number": "Number needles (digits)", "words": "Number needles in words"}.get(kind, "Name needles")
        lines += [f"## {title} (full cache: {full[kind]['hits']} of {n}, answer NLL "
                  f"{np.mean(full[kind]['nll']):.3f})", "",
                  "| method | " + " | ".join(f"{r}x needles" for r in ratios) + " | "
                  + " | ".join(f"{r}x answer NLL" for r in ratios) + " | "
                  + " | ".join(f"{r}x KL" for r in ratios) + " | fact tokens |",
                  "|---|" + "---|" * (3 * len(ratios) + 1)]
        for name in methods:
            cells = [results[(kind, name, r)] for r in ratios]
            share = [shares[(kind, si, name)] for si in stories if (kind, si, name) in shares]
            lines.append(f"| {name} | " + " | ".join(f"{c['hits']} of {n}" for c in cells) + " | "
                         + " | ".join(f"{np.mean(c['nll']):.2f}" for c in cells) + " | "
                         + " | ".join(f"{np.mean(c['kl']):.3f}" for c in cells) + " | "
                         + (" / ".join(f"{x:.1%}" for x in share) if share else "-") + " |")
        lines.append("")
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
