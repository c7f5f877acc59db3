"""The ``kvlocal`` command: compact a document, chat with it, ask it, inspect a session file.

    kvlocal compact DOC -m MODEL --ratio 10 [--method am-facts-omp] [--queries repeat,self-study] -o DOC.kvs
    kvlocal chat DOC.kvs -m MODEL
    kvlocal ask DOC.kvs -m MODEL "question"
    kvlocal info DOC.kvs

Flags follow llama.cpp: -m/--model, -c/--ctx-size, -t/--threads.  Errors print one line and
exit with status 1 (2 for bad usage); nothing is written unless the whole command succeeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import KvlocalError


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _read_document(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    path = Path(arg)
    if not path.is_file():
        raise KvlocalError(f"document not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KvlocalError(f"{path} is not UTF-8 text") from exc


def _check_output(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise KvlocalError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise KvlocalError(f"cannot write to {parent}")


def cmd_compact(a) -> int:
    from .api import Compaction
    from .pipeline import CompactionSettings
    from .streaming import LongContextWarning
    from .summarize import SummarySettings

    text = _read_document(a.document)
    _check_output(a.output)
    # settings are checked before the (long) ingestion
    settings = CompactionSettings(ratio=a.ratio, method=a.method, queries=a.queries or None, budgets=a.budgets,
                                  recent_window=a.recent_window, chunk_size=a.chunk_size,
                                  max_queries_per_head=a.max_queries, seed=a.seed)
    summarize = SummarySettings(max_tokens=a.summary_tokens, seed=a.seed,
                                no_repeat_ngram=a.summary_no_repeat) if a.summarize else None
    t0 = time.perf_counter()
    with Compaction(a.model, n_ctx=a.ctx_size, threads=a.threads, progress=not a.quiet, verbose=a.verbose) as kv:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LongContextWarning)
            kv.ingest(text, system=a.system, name=Path(a.document).name[:255])
        for w in caught:
            print(f"kvlocal: warning: {w.message}", file=sys.stderr)
        r = kv.compact(settings=settings, summarize=summarize)
        size = kv.save(a.output)
        t = kv.timings
        n_ctx = kv.session.n_ctx
        summary = kv.summary
    total = time.perf_counter() - t0
    if summary is not None:
        print(f"summarized {Path(a.document).name}: {summary.document_tokens} tokens -> a {summary.summary_tokens}-token "
              f"summary ({summary.summary_ratio:.1f}x) in {summary.seconds:.1f} s; the document itself is not kept")
    what = "its summary" if summary is not None else Path(a.document).name
    print(f"compacted {what}: {r.tokens_before} tokens ({r.document_tokens} document) -> "
          f"{r.cells_after} cells, {r.method} at {r.ratio:g}x (effective {r.effective_ratio:.1f}x), "
          f"queries {'+'.join(r.queries)}")
    if summary is not None:
        kept = r.cells_after - (r.tokens_before - r.document_tokens)  # the template's cells are kept whole
        print(f"  overall    {summary.document_tokens} document tokens -> {kept} cells for the summary's text "
              f"({summary.document_tokens / max(kept, 1):.0f}x; {r.cells_after} cells with the template)")
    if r.streamed_chunks:
        print(f"  streamed   ingested and compacted in chunks: {r.streamed_chunks} of them, in a {n_ctx}-cell context")
    print(f"  KV cache   {_size(r.kv_bytes_before)} -> {_size(r.kv_bytes_after)}"
          f" ({100 * r.padding_fraction:.0f} % padding); session file {_size(size)} -> {a.output}")
    print(f"  time       ingest {t['ingest_s']:.1f} s, queries {t['queries_s']:.1f} s, fit {t['fit_s']:.1f} s, "
          f"save {t['save_s']:.2f} s (total {total:.1f} s)")
    if r.heldout_output_rel_l2 is not None:
        print(f"  quality    held-out attention error {r.heldout_output_rel_l2:.3f} (relative L2 of outputs), "
              f"mass error {r.heldout_mass_err:.3f} (mean over layers)")
    if r.fallbacks:
        print("  solvers    " + ", ".join(f"{k} x{v}" for k, v in sorted(r.fallbacks.items())))
    return 0


def _sampler(a):
    from .engine.sampling import Sampler

    return Sampler(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def cmd_ask(a) -> int:
    from .api import CompactedSession

    with CompactedSession(a.session, a.model, threads=a.threads, verbose=a.verbose) as s:
        for piece in s.ask(a.question, max_tokens=a.n_predict, stream=True, sampler=_sampler(a)):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(a) -> int:
    from .api import CompactedSession
    from .online import OnlineSettings

    online = None if a.no_compact else \
        OnlineSettings(max_context=a.max_context, ratio=a.online_ratio, keep_recent=a.keep_recent,
                       method=a.online_method)
    if a.save:
        _check_output(a.save)
    with CompactedSession(a.session, a.model, threads=a.threads, verbose=a.verbose, online=online) as s:
        m = s.meta
        print(f"kvlocal chat: {Path(a.session).name} ({m['cache.n_cells']} cells standing for "
              f"{m['cache.logical_length']} tokens, {m['compaction.method']} {m['compaction.ratio']:g}x), "
              f"loaded in {s.load_seconds:.2f} s. Empty line or Ctrl-D to quit, /reset to forget the conversation.")
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                break
            if not line.strip():
                break
            if line.strip() == "/reset":
                s.reset()
                continue
            seen = len(s.online_records)
            for piece in s.chat(line, max_tokens=a.n_predict, stream=True, sampler=_sampler(a)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            for r in s.online_records[seen:]:
                err = f", held-out attention error {r.heldout_output_rel_l2:.3f}" if r.heldout_output_rel_l2 else ""
                print(f"[compacted the conversation: {r.cells_before} -> {r.cells_after} cells, {r.method} at "
                      f"{r.ratio:g}x{err}]", file=sys.stderr)
        if a.save:
            size = s.save(a.save)
            print(f"saved {a.save} ({_size(size)})")
    return 0


def cmd_serve(a) -> int:
    from .online import OnlineSettings
    from .server import serve

    online = None if a.no_compact else OnlineSettings(max_context=a.max_context)
    serve(a.sessions, a.model, host=a.host, port=a.port, allow_remote=a.allow_remote, max_loaded=a.max_loaded,
          online=online, threads=a.threads, max_tokens=a.n_predict, log_level="info" if a.verbose else "warning")
    return 0


def cmd_info(a) -> int:
    from .sessionfile import describe, read_info

    meta = read_info(a.session)
    if a.json:
        print(json.dumps(meta, indent=1, sort_keys=True))
        return 0
    print("\n".join(describe(meta, a.session)))
    return 0


def _parse_methods(spec: str) -> tuple:
    """"am-highest:repeat+self-study,truncate" -> (("am-highest", ("repeat", "self-study")), ("truncate", ()))."""
    from .am.methods import METHODS
    from .engine.queries import QUERY_SOURCES

    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, srcs = item.partition(":")
        sources = tuple(x for x in srcs.split("+") if x)
        METHODS.get(name)  # unknown names raise with the list of known ones
        for x in sources:
            QUERY_SOURCES.get(x)
        out.append((name, sources))
    if not out:
        raise KvlocalError("--methods names no method")
    return tuple(out)


def cmd_eval(a) -> int:
    from .engine import binding
    from .evaluation import cost as cost_mod
    from .evaluation import report
    from .evaluation.data import data_dir
    from .evaluation.harness import PARTS, EvalConfig, Evaluator

    parts = tuple(a.parts.split(","))
    if set(parts) - set(PARTS):
        raise KvlocalError(f"--parts: unknown {', '.join(sorted(set(parts) - set(PARTS)))}; choose from {', '.join(PARTS)}")
    notes = None  # read first: a bad path fails before an hour of work
    if a.notes:
        try:
            notes = Path(a.notes).read_text()
        except OSError as e:
            raise KvlocalError(f"cannot read the notes file {a.notes}: {e.strerror}") from None
    data_dir(a.data)  # missing data: one line saying where to get it, before any work
    cfg = EvalConfig.smoke(data=a.data) if a.smoke else EvalConfig(data=a.data)
    if a.ratios:
        cfg.ratios = tuple(float(x) for x in a.ratios.split(","))
    if a.summary_ratios:
        cfg.summary_ratios = tuple(float(x) for x in a.summary_ratios.split(","))
    if a.summary_no_repeat is not None:
        cfg.summary_no_repeat = a.summary_no_repeat
    if "summary" in parts:
        from .evaluation.summaries import settings

        settings(cfg)  # bad summary settings: one line before the model loads
    if a.articles:
        cfg.articles = tuple(int(x) for x in a.articles.split(","))
    if a.questions:
        cfg.questions = a.questions
    if a.methods:
        cfg.methods = _parse_methods(a.methods)
    if a.max_queries is not None:
        if a.max_queries < 0:
            raise KvlocalError("--max-queries must be >= 0 (0: every query)")
        cfg.max_queries = a.max_queries or None
    model = binding.Model(a.model)
    ev = Evaluator(model, cfg, a.cache, progress=not a.quiet, threads=a.threads)
    ev.run(parts)
    measured = None
    if "cost" in parts:
        measured = ev.cache.get("cost") or ev.cache.put(cost_mod.measure(
            model, cfg.ratios, tokens=cfg.cost_tokens, data=cfg.data, threads=a.threads), "cost")
    import platform

    args = [Path(x).name if x == a.model else x for x in sys.argv[1:]] if sys.argv[1:2] == ["eval"] else ["eval"]
    path = report.write(ev, Path(a.out), measured, machine=f"{platform.machine()}, {os.cpu_count()} cores",
                        notes=notes, command="kvlocal " + " ".join(args))
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .am.methods import DEFAULT_METHOD, METHODS, ONLINE_METHOD

    ap = argparse.ArgumentParser(prog="kvlocal", description="Compact the KV cache of a local GGUF model.")
    ap.add_argument("--version", action="version", version=f"kvlocal {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, model=True):
        if model:
            p.add_argument("-m", "--model", required=True, help="GGUF model file")
            p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
            p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")

    c = sub.add_parser("compact", help="ingest a document, compact its KV cache and save it")
    c.add_argument("document", help="UTF-8 text file, or - for stdin")
    common(c)
    c.add_argument("-o", "--output", required=True, help="session file to write (.kvs)")
    c.add_argument("-c", "--ctx-size", type=int, default=None, help="context size (default: sized to the document)")
    c.add_argument("--ratio", type=float, default=10.0, help="document tokens per kept key (default 10)")
    c.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS.names(),
                   help=f"compaction method (default {DEFAULT_METHOD})")
    c.add_argument("--queries", default=None,
                   help="query sources, comma-separated: context, repeat, self-study, self-study-long, recall "
                        "(default: the method's)")
    c.add_argument("--budgets", default="uniform", help="uniform, sensitivity, or a JSON file of head proportions")
    c.add_argument("--recent-window", type=int, default=0, help="last tokens kept uncompacted")
    c.add_argument("--chunk-size", type=int, default=None, help="compact the document in chunks of this many tokens")
    c.add_argument("--max-queries", type=int, default=4096, help="reference queries per KV head")
    c.add_argument("--system", default=None, help="system prompt placed before the document")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--summarize", action="store_true",
                   help="have the model summarize the document and compact the summary's KV to --ratio overall "
                        "(for 50-200x when the gist is enough; the document itself is not kept)")
    c.add_argument("--summary-tokens", type=int, default=320, help="summary length at most (default 320)")
    c.add_argument("--summary-no-repeat", type=int, default=4,
                   help="no n-gram of this length twice in the summary (default 4; 0: off)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compact)

    for name, func, help_ in (("chat", cmd_chat, "chat with a compacted session"),
                              ("ask", cmd_ask, "ask a compacted session one question")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("session", help="session file (.kvs)")
        common(p)
        if name == "ask":
            p.add_argument("question")
        p.add_argument("-n", "--n-predict", type=int, default=256, help="max tokens per answer")
        p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
        p.add_argument("--top-k", type=int, default=40)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--seed", type=int, default=0)
        if name == "chat":
            p.add_argument("--max-context", type=int, default=None,
                           help="cells the chat may hold before it compacts its older part (default: the "
                                "session's cells + 1,024)")
            p.add_argument("--no-compact", action="store_true", help="stop when the context is full instead")
            p.add_argument("--online-ratio", type=float, default=2.0, help="ratio of those compactions (default 2)")
            p.add_argument("--keep-recent", type=int, default=256, help="last tokens never compacted (default 256)")
            p.add_argument("--online-method", default=ONLINE_METHOD, choices=METHODS.names(), metavar="METHOD",
                           help=f"method of those compactions (default {ONLINE_METHOD}: a number's whole sentence "
                                "before any name's core, since what one compaction drops is gone from the next)")
            p.add_argument("--save", default=None, help="write the session (conversation included) here on exit")
        p.set_defaults(func=func)

    e = sub.add_parser("eval", help="evaluate methods x ratios against the full cache and baselines")
    common(e)
    e.add_argument("--smoke", action="store_true", help="a seconds-long grid for testing the harness")
    e.add_argument("--parts", default="quality,niah,summary,cost",
                   help="quality, niah, summary (summarize-then-compact at --summary-ratios), cost (comma-separated)")
    e.add_argument("--summary-ratios", default=None, help="overall ratios of the summary part (default 50,100,200)")
    e.add_argument("--summary-no-repeat", type=int, default=None,
                   help="the summary part's n-gram guard (default 4, as kvlocal compact --summarize; 0: off)")
    e.add_argument("--ratios", default=None, help="e.g. 5,10,20,50")
    e.add_argument("--articles", default=None, help="LEval-QuALITY article indices, e.g. 8,1,2")
    e.add_argument("--questions", type=int, default=None, help="questions per article")
    e.add_argument("--methods", default=None,
                   help="rows of the grid, e.g. am-highest:repeat+self-study,truncate (default: the standard grid)")
    e.add_argument("--max-queries", type=int, default=None,
                   help="reference queries per KV head (default 4096; 0: every query)")
    e.add_argument("--data", default=None, help="folder with leval-quality.jsonl and squality-dev.jsonl")
    e.add_argument("--cache", default=str(Path.home() / ".cache" / "kvlocal" / "eval"),
                   help="where grid cells are cached (runs resume from it)")
    e.add_argument("--out", default="bench/results", help="folder for the report and plots")
    e.add_argument("--notes", default=None, help="a markdown file appended to the report as its analysis")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("serve", help="serve session files behind an OpenAI-compatible HTTP API")
    v.add_argument("sessions", nargs="+", help="session files (.kvs); a request's model names one by its file stem")
    common(v)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--allow-remote", action="store_true", help="allow an address other machines can reach")
    v.add_argument("--max-loaded", type=int, default=2, help="sessions held in memory at once (default 2)")
    v.add_argument("-n", "--n-predict", type=int, default=256, help="answer length when a request sets none")
    v.add_argument("--max-context", type=int, default=None,
                   help="cells a conversation may hold before it compacts its older part")
    v.add_argument("--no-compact", action="store_true",
                   help="refuse conversations that do not fit instead of compacting them")
    v.set_defaults(func=cmd_serve)

    i = sub.add_parser("info", help="show what a session file records (no model needed)")
    i.add_argument("session")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KvlocalError as exc:
        print(f"kvlocal: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvlocal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
