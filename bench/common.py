"""Helpers shared by the benchmarks: machine description, texts, result paths."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {threads} threads"


def document_text() -> tuple[str, str]:
    """A long real text: the first SQuALITY story from ../shared/data, else the sample document."""
    data = ROOT.parent / "shared" / "data" / "squality-dev.jsonl"
    if data.exists():
        with open(data) as fh:
            return json.loads(fh.readline())["document"], f"{data.name}, story 1"
    sample = (ROOT / "kvlocal" / "data" / "sample_document.txt").read_text()
    return sample * 20, "kvlocal/data/sample_document.txt, repeated"


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def write_report(name: str, lines: list[str]) -> Path:
    """Write ``bench/results/<name>.md`` from ``lines`` and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    text = "\n".join(lines)
    path.write_text(text + "\n")
    print(text)
    return path


def grid_tables(rows, got: dict, ratios, metrics, n_needles: int | None = None, legend: bool = True) -> list[str]:
    """Markdown for a bench comparing rows of the evaluation grid: the 'row | what' table, then one
    table per metric with a column per ratio.  ``rows``: (row label, what it is); ``got``: the
    collected cells by (row label, ratio) (``kvlocal.evaluation.report.collect``); ``metrics``:
    (cell key, title, format), a format of None printing a needle fraction as a count of
    ``n_needles``; a missing cell prints '–'; ``legend`` False: no 'row | what' table."""
    lines = (["| row | what |", "|---|---|"] + [f"| {name} | {what} |" for name, what in rows]) if legend else []
    header = ["| row | " + " | ".join(f"{r}x" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for key, title, fmt in metrics:
        lines += ["", f"## {title}", ""] + header
        for name, _ in rows:
            cells = []
            for r in ratios:
                row = got.get((name, r))
                if row is None or row.get(key) is None:
                    cells.append("–")
                elif fmt is None:
                    cells.append(str(round(row[key] * n_needles)))
                else:
                    cells.append(fmt.format(row[key]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
