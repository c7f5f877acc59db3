"""The README and the bench reports link to files of this repository: every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(md: Path) -> list[str]:
    out = []
    for target in LINK.findall(md.read_text(encoding="utf-8")):
        path = target.split("#")[0]
        if path and not re.match(r"[a-z]+://", path) and not (md.parent / path).exists():
            out.append(target)
    return out


def test_every_relative_link_of_the_docs_resolves(tmp_path):
    docs = [ROOT / "README.md", *sorted((ROOT / "bench" / "results").rglob("*.md"))]
    assert len(docs) > 10
    assert {str(d.relative_to(ROOT)): broken for d in docs if (broken := broken_links(d))} == {}
    # the planted error: a link to a file that is not there is found
    planted = tmp_path / "doc.md"
    planted.write_text("[here](missing.md), [there](doc.md#top), [web](https://example.org/x.md)\n")
    assert broken_links(planted) == ["missing.md"]
