"""Turn the cached grid into tables, plots and a verdict against the targets."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from . import summaries
from .harness import Evaluator, cell_id

TARGET_R = {10: 0.92, 20: 0.85, 50: 0.75}  # issue 10
TARGET_NIAH = {5: 0.80, 10: 0.60, 20: 0.40}  # of the full cache (issue 10)
BASELINES = ("truncate", "streaming-llm", "h2o", "snapkv", "kvzip", "kvzip-uniform", "repeat-max")


def label(method: str, queries) -> str:
    return f"{method} ({'+'.join(queries)})" if queries else method


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def collect(ev: Evaluator) -> dict:
    """Pooled metrics per (method label, ratio) and for the references."""
    cfg, c = ev.cfg, ev.cache
    q_keys, n_keys = ev.document_keys()

    def pooled(keys, cell, field):
        out = []
        for k in keys:
            r = c.get(k, cell)
            if r is not None and field in r:
                v = r[field]
                out += v if isinstance(v, list) else [v]
        return out

    refs = {name: {"nll": _mean(pooled(q_keys, name, "nll")), "mc": _mean(pooled(q_keys, name, "mc"))}
            for name in ("full", "none")}
    refs["full"]["niah"] = _mean(pooled(n_keys, "full", "hits"))
    span = refs["none"]["nll"] - refs["full"]["nll"]

    def retention(nll):
        return (refs["none"]["nll"] - nll) / span if span and not math.isnan(nll) else float("nan")

    summarized = summaries.collect(ev, retention)
    alone = summarized["summary"]
    refs["summary"] = {"nll": alone["nll"], "mc": alone["mc"], "R": alone["R"],
                       "effective_ratio": alone["overall_ratio"]}
    rows = {}
    for method, queries in cfg.methods:
        for ratio in cfg.ratios:
            cell = cell_id(method, tuple(queries), ratio)
            nll = _mean(pooled(q_keys, cell, "nll"))
            ingest = pooled(q_keys + n_keys, cell, "ingest_s")
            work = [a + b for a, b in zip(pooled(q_keys + n_keys, cell, "query_s"),
                                          pooled(q_keys + n_keys, cell, "fit_s"), strict=False)]
            rows[(label(method, queries), ratio)] = {
                "nll": nll, "R": retention(nll), "mc": _mean(pooled(q_keys, cell, "mc")),
                "niah": _mean(pooled(n_keys, cell, "hits")), "kl": _mean(pooled(n_keys, cell, "kl")),
                "top1": _mean(pooled(n_keys, cell, "top1")),
                "attn": _mean(pooled(q_keys + n_keys, cell, "attn_rel_l2")),
                "effective_ratio": _mean(pooled(q_keys, cell, "effective_ratio")),
                "time_vs_ingest": _mean([w / i for w, i in zip(work, ingest, strict=False) if i]),
                "fit_s": _mean(pooled(q_keys + n_keys, cell, "fit_s")),
                "query_s": _mean(pooled(q_keys + n_keys, cell, "query_s")),
                "ingest_s": _mean(ingest),
                "padding": _mean(pooled(q_keys + n_keys, cell, "padding")),
                "done": len(pooled(q_keys + n_keys, cell, "fit_s")),
            }
    return {"refs": refs, "rows": rows, "summarized": summarized, "expected": len(q_keys) + len(n_keys)}


def _article_sizes(ev: Evaluator) -> str:
    parts = []
    for a in ev.cfg.articles:
        full = ev.cache.get(f"quality{a}", "doc") or {}
        n = full.get("doc_tokens")
        if n is not None:
            parts.append(f"{a}: {n:,}" + (" (cut at a sentence end so that repeat-prefill fits the context)"
                                          if full.get("cut") else ""))
    return f"Document tokens: {'; '.join(parts)}." if parts else ""


def _fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write(ev: Evaluator, out_dir: Path, cost: dict | None = None, machine: str = "", notes: str | None = None,
          command: str = "kvlocal eval") -> Path:
    res = collect(ev)
    refs, rows, cfg = res["refs"], res["rows"], ev.cfg
    labels = list(dict.fromkeys(lbl for lbl, _ in rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{ev.name}"
    lines = [
        f"# Evaluation: {ev.name}",
        "",
        f"Written {time.strftime('%Y-%m-%d')} by `{command}`{', ' + machine if machine else ''}.",
        "",
        f"- QuALITY (LEval subset): articles {list(cfg.articles)}, {cfg.questions} questions each; reference answers "
        f"= the model's own greedy answers with the full cache ({cfg.answer_tokens} tokens), scored by mean token NLL. "
        "Retention R = (NLL_none − NLL_method) / (NLL_none − NLL_full). " + _article_sizes(ev),
        f"- Needles: {cfg.needles} needles at seeded depths in SQuALITY dev stories {list(cfg.haystack_stories)} cut "
        f"to {list(cfg.haystack_tokens)} tokens; exact match of the 7-digit number. Next-token KL and top-1 "
        f"agreement with the full cache over the next {cfg.continuation_tokens} story tokens.",
        f"- Every compaction: {f'at most {cfg.max_queries}' if cfg.max_queries else 'all the'} queries per KV head, 10 % of the query tokens held out for the "
        "attention error; uniform budgets; BOS/system/template tokens kept whole.",
        f"- References: full cache NLL {_fmt(refs['full']['nll'])}, MC accuracy {_fmt(refs['full']['mc'], '.2f')}, "
        f"needles {_fmt(refs['full']['niah'], '.2f')}; no context NLL {_fmt(refs['none']['nll'])}, MC "
        f"{_fmt(refs['none']['mc'], '.2f')}; the model's summary alone (effective ratio "
        f"{_fmt(refs['summary']['effective_ratio'], '.1f')}x) R {_fmt(refs['summary']['R'])}, MC "
        f"{_fmt(refs['summary']['mc'], '.2f')} (the summarize part; – when it was not run).",
        "",
    ]
    for title, key, spec in (("Retention R (QuALITY reference answers)", "R", ".3f"),
                             ("Needle exact match (fraction)", "niah", ".2f"),
                             ("Next-token KL vs full cache (nats)", "kl", ".3f"),
                             ("Next-token top-1 agreement", "top1", ".3f"),
                             ("QuALITY multiple-choice accuracy (reported, not gated)", "mc", ".2f"),
                             ("Held-out attention output error (relative L2, mean over layers)", "attn", ".3f"),
                             ("Compaction time ÷ ingestion time (queries + fit)", "time_vs_ingest", ".2f")):
        if all(rows[(lbl, r)][key] is None or math.isnan(rows[(lbl, r)][key]) for lbl in labels for r in cfg.ratios):
            continue  # a part that was not run
        lines += [f"## {title}", "", "| method | " + " | ".join(f"{r:g}x" for r in cfg.ratios) + " |",
                  "|---|" + "---|" * len(cfg.ratios)]
        for lbl in labels:
            lines.append(f"| {lbl} | " + " | ".join(_fmt(rows[(lbl, r)][key], spec) for r in cfg.ratios) + " |")
        lines.append("")
    lines += _memory_table(rows, labels, cfg)
    detail_ratio = 10 if 10 in cfg.ratios else cfg.ratios[len(cfg.ratios) // 2]
    lines += _time_table(rows, labels, detail_ratio)
    lines += _layer_table(ev, detail_ratio)
    missing = [f"{lbl} {r:g}x" for (lbl, r), v in rows.items() if v["done"] < res["expected"]]
    if missing:
        lines += [f"Incomplete cells (resume with the same command): {', '.join(missing[:12])}", ""]
    lines += _targets(rows, refs, cfg, labels)
    lines += summaries.report_lines(res["summarized"], cfg)
    if cost:
        lines += _cost_lines(cost)
    if notes:
        lines += ["## Analysis", "", notes.strip(), ""]
    plots = _plots(rows, refs, cfg, labels, out_dir, stem, res["summarized"])
    if plots is None:
        lines += ["", "(plots skipped: matplotlib is not installed; `pip install 'kvlocal[eval]'`)"]
    else:
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


PADDED = 0.1  # rows whose padding exceeds this share of their cells are not at the nominal memory


def _memory_ratio(row, ratio) -> float:
    """Document tokens per compacted cell: the nominal ratio less the cells spent on padding."""
    pad = row["padding"]
    return ratio * (1 - pad) if not math.isnan(pad) else float("nan")


def _memory_table(rows, labels, cfg) -> list[str]:
    """Methods that keep unequal numbers of keys per head pay padding: llama.cpp's cells are shared
    by every head and layer, so a compacted segment is as long as its longest head."""
    padded = [lbl for lbl in labels if any(rows[(lbl, r)]["padding"] > PADDED for r in cfg.ratios)]
    if not padded:
        return []
    lines = ["## Memory actually saved: document tokens per KV cell (nominal ratio x (1 - padding))", "",
             "| method | " + " | ".join(f"{r:g}x" for r in cfg.ratios) + " |", "|---|" + "---|" * len(cfg.ratios)]
    for lbl in padded:
        lines.append(f"| {lbl} | " + " | ".join(_fmt(_memory_ratio(rows[(lbl, r)], r), ".1f") for r in cfg.ratios)
                     + " |")
    return lines + ["", f"Rows with more than {PADDED:.0%} padding hold far more cells than their nominal ratio says; "
                    "the targets below compare the default only with baselines at their nominal memory.", ""]


def _time_table(rows, labels, ratio) -> list[str]:
    """Where the compaction time goes, per document (mean over the documents), at one ratio."""
    lines = [f"## Compaction time per document at {ratio:g}x (seconds, mean over the documents)", "",
             "| method | ingestion | query generation | fit | (queries + fit) ÷ ingestion |", "|---|---|---|---|---|"]
    for lbl in labels:
        d = rows[(lbl, ratio)]
        lines.append(f"| {lbl} | {_fmt(d['ingest_s'], '.1f')} | {_fmt(d['query_s'], '.1f')} | {_fmt(d['fit_s'], '.1f')} "
                     f"| {_fmt(d['time_vs_ingest'], '.2f')} |")
    return lines + [""]


def _layer_table(ev: Evaluator, ratio) -> list[str]:
    """Held-out attention output error and mass error per layer, pooled over the documents."""
    cfg, c = ev.cfg, ev.cache
    keys = [k for part in ev.document_keys() for k in part]
    cols = {}
    for method, queries in cfg.methods:
        per = {}
        for k in keys:
            r = c.get(k, cell_id(method, tuple(queries), ratio))
            for il, e in (r or {}).get("layer_errors", {}).items():
                per.setdefault(int(il), []).append((e["output_rel_l2"], e["mass_err"]))
        if per:
            cols[label(method, queries)] = per
    if not cols:
        return []
    layers = sorted({il for per in cols.values() for il in per})
    lines = [f"## Per layer at {ratio:g}x: held-out attention output error / mass error", "",
             "| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for il in layers:
        cells = []
        for per in cols.values():
            v = per.get(il)
            cells.append(f"{np.mean([x for x, _ in v]):.3f} / {np.mean([m for _, m in v]):.3f}" if v else "–")
        lines.append(f"| {il} | " + " | ".join(cells) + " |")
    return lines + [""]


def _targets(rows, refs, cfg, labels) -> list[str]:
    from ..am import DEFAULT_METHOD, get_method

    am = [lbl for lbl in labels if lbl.startswith("am-")]
    out = ["## Targets", ""]
    default = label(DEFAULT_METHOD, get_method(DEFAULT_METHOD).queries)
    if default in labels:
        out += [f"The default method, {default}:", ""]
        out += _target_lines(rows, refs, cfg, labels, [default], "the default")
        out += ["", "The best AM row at each ratio:", ""]
    return out + _target_lines(rows, refs, cfg, labels, am, "best AM") + [""]


def _target_lines(rows, refs, cfg, labels, am, who) -> list[str]:
    base = [lbl for lbl in labels if lbl.split(" ")[0] in BASELINES]
    out = []
    for r, goal in TARGET_R.items():
        if r in cfg.ratios and am:
            best = max(am, key=lambda lbl: np.nan_to_num(rows[(lbl, r)]["R"], nan=-9))
            got = rows[(best, r)]["R"]
            out.append(f"- R at {r}x >= {goal}: {who} {best} {_fmt(got)} — "
                       + ("met." if got >= goal else f"missed by {_fmt(goal - got)}."))
    full = refs["full"]["niah"]
    for r, goal in TARGET_NIAH.items():
        if r in cfg.ratios and am and full:
            best = max(am, key=lambda lbl: np.nan_to_num(rows[(lbl, r)]["niah"], nan=-9))
            rel = rows[(best, r)]["niah"] / full
            out.append(f"- Needles at {r}x >= {goal:.0%} of the full cache ({_fmt(full, '.2f')}): {who} {best} "
                       f"{_fmt(rows[(best, r)]['niah'], '.2f')} = {rel:.0%} — "
                       + ("met." if rel >= goal else f"missed by {100 * (goal - rel):.0f} points."))
    if am and base:
        for key, name, sign in (("R", "retention", 1), ("niah", "needles", 1), ("kl", "next-token KL", -1),
                                ("top1", "top-1 agreement", 1)):
            worse, margins = [], []
            for r in cfg.ratios:
                fair = [b for b in base if not rows[(b, r)]["padding"] > PADDED]  # same memory only
                if not fair:
                    continue
                best_am = max(sign * np.nan_to_num(rows[(lbl, r)][key], nan=-np.inf * sign) for lbl in am)
                best_b, b_lbl = max((sign * np.nan_to_num(rows[(b, r)][key], nan=-np.inf * sign), b) for b in fair)
                if not (np.isfinite(best_am) and np.isfinite(best_b)):
                    continue  # not measured at this ratio (a part of the grid that did not run)
                if best_b >= best_am:
                    worse.append(f"{b_lbl} at {r:g}x")
                else:
                    margins.append((best_am - best_b, r, b_lbl))
            line = f"- {who} above every eviction baseline at every ratio ({name}): "
            if worse:
                line += "missed: " + ", ".join(worse) + f" (at least as good as {who})."
            elif not margins:
                continue  # no baseline measured for this metric
            else:
                m, r, b_lbl = min(margins)
                line += f"met; smallest margin {m:.4f} ({b_lbl} at {r:g}x)."
            out.append(line)
        padded = [b for b in base if any(rows[(b, r)]["padding"] > PADDED for r in cfg.ratios)]
        if padded:
            out.append(f"- not compared where their padding exceeds {PADDED:.0%} (they hold more cells than the ratio "
                       f"says; see the memory table): {', '.join(padded)}.")
    return out


def _cost_lines(cost: dict) -> list[str]:
    lines = ["## Speed and cost (one run, same process for decoding)", "",
             f"Document: {cost['tokens']} tokens of a SQuALITY story; ingestion {cost['ingest_s']:.1f} s; full KV cache "
             f"{cost['full_kv_bytes'] / 2**20:.1f} MiB over {cost['cells_full']} cells; decode with the full cache "
             f"{cost['full_decode_ms']:.1f} ms/token. Compaction: am-highest, context-prefill queries.", "",
             "| ratio | cells | KV MiB | session file MiB | fit s | decode ms/token | decode speed-up |", "|---|---|---|---|---|---|---|"]
    for r, d in cost["ratios"].items():
        lines.append(f"| {float(r):g}x | {d['cells']} | {d['kv_bytes'] / 2**20:.2f} | {d['file_bytes'] / 2**20:.2f} | "
                     f"{d['fit_s']:.1f} | {d['decode_ms']:.1f} | {d['speedup']:.2f}x |")
    if "20" in cost["ratios"] or "20.0" in cost["ratios"]:
        d = cost["ratios"].get("20", cost["ratios"].get("20.0"))
        lines += ["", f"Decode speed-up at 20x: {d['speedup']:.2f}x (target >= 1.5x: "
                  + ("met)." if d["speedup"] >= 1.5 else f"missed by {1.5 - d['speedup']:.2f}x).")]
    rss = cost.get("rss", {})
    if rss:
        lines += ["", "Peak RSS in a fresh process (model mapped, one 8-token answer): "
                  + "; ".join(f"{k}: {v.get('peak_rss_mib', float('nan')):.0f} MiB, ready in {v.get('ready_s', float('nan')):.2f} s"
                              if "error" not in v else f"{k}: failed ({v['error']})" for k, v in rss.items()) + "."]
    return lines + [""]


def _plots(rows, refs, cfg, labels, out_dir: Path, stem: str, summarized: dict | None = None) -> list[Path] | None:
    """The report's PNGs; None when matplotlib is missing (the report then says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summ = [(v, d) for v, d in (summarized or {}).items() if v != "summary" and not math.isnan(d["R"])]
    paths = []
    for key, ylabel, ref in (("R", "retention R", None), ("niah", "needle exact match", refs["full"]["niah"])):
        fig, ax = plt.subplots(figsize=(7, 4))
        for lbl in labels:
            ys = [rows[(lbl, r)][key] for r in cfg.ratios]
            ax.plot(cfg.ratios, ys, marker="o", ls="-" if lbl.startswith("am-") else "--", label=lbl)
        if ref is not None:
            ax.axhline(ref, color="k", ls=":", label="full cache")
        ticks = list(cfg.ratios)
        if key == "R" and not math.isnan(refs["summary"]["R"]):
            ax.plot([refs["summary"]["effective_ratio"]], [refs["summary"]["R"]], "k*", ms=12, label="summary alone")
        if key == "R" and summ:
            for prefix, marker, name in (("summary+am@", "kP", f"summary + {summaries.DEFAULT_METHOD}"),
                                         ("am@", "kx", f"{summaries.DEFAULT_METHOD} alone (summary part)")):
                pts = sorted((d["overall_ratio"], d["R"]) for v, d in summ if v.startswith(prefix))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker[1:], color=marker[0], ls=":", ms=9, label=name)
            ticks = sorted(set(ticks) | set(cfg.summary_ratios))
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ticks, [f"{r:g}x" for r in ticks])
        ax.set_xlabel("compaction ratio")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
        fig.tight_layout()
        p = out_dir / f"{stem}-{key}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in [x for x in (10, 20) if x in cfg.ratios]:
        for lbl in labels:
            d = rows[(lbl, r)]
            ax.scatter(d["time_vs_ingest"], d["R"], marker="o" if r == 10 else "s")
            ax.annotate(f"{lbl} {r}x", (d["time_vs_ingest"], d["R"]), fontsize=5)
    title = "compaction time vs quality (o 10x, s 20x"
    points = [d for v, d in (summarized or {}).items() if not math.isnan(d["R"])]
    for d in points:  # summarize-then-compact and its comparison: one point per variant
        ax.scatter(d["time_vs_ingest"], d["R"], marker="*", color="k", s=60)
        ax.annotate(f"{d['label']} ({d['overall_ratio']:.0f}x)", (d["time_vs_ingest"], d["R"]), fontsize=5)
    if points:
        title += ", * summarize part"
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("compaction time ÷ ingestion time")
    ax.set_ylabel("retention R")
    ax.set_title(title + ")", fontsize=9)
    fig.tight_layout()
    p = out_dir / f"{stem}-pareto.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths + [p]
