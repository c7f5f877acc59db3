"""The tree's layers hold: what each folder of kvlocal may import, read off the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "kvlocal"

# layer -> kvlocal modules it must never import (prefixes)
FORBIDDEN = {
    "kv": ("kvlocal.engine", "kvlocal.am", "kvlocal.pipeline", "kvlocal.api", "kvlocal.sessionfile",
           "kvlocal.evaluation", "kvlocal.cli", "kvlocal.demo", "kvlocal.server"),
    "am": ("kvlocal.engine", "kvlocal.pipeline", "kvlocal.api", "kvlocal.sessionfile", "kvlocal.evaluation",
           "kvlocal.cli", "kvlocal.demo", "kvlocal.server"),
    "engine": ("kvlocal.am", "kvlocal.pipeline", "kvlocal.api", "kvlocal.sessionfile", "kvlocal.evaluation",
               "kvlocal.cli", "kvlocal.demo", "kvlocal.server"),
    "evaluation": ("kvlocal.api", "kvlocal.cli", "kvlocal.demo", "kvlocal.server"),
    # the server sits on the API: no algorithms, no evaluation, no command line
    "server": ("kvlocal.am", "kvlocal.kv", "kvlocal.pipeline", "kvlocal.streaming", "kvlocal.evaluation",
               "kvlocal.cli", "kvlocal.demo"),
}


def kvlocal_imports(path: Path) -> set[str]:
    """Every kvlocal module ``path`` imports (relative imports resolved; lazy ones included)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kvlocal")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("kvlocal"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # "from kvlocal import api"
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_never_imports_what_sits_above_it(layer):
    files = sorted((PKG / layer).rglob("*.py"))
    assert files, f"kvlocal/{layer}/ has no modules"
    bad = {f"{f.relative_to(PKG.parent)} imports {m}" for f in files for m in kvlocal_imports(f)
           if m.startswith(FORBIDDEN[layer])}
    assert not bad, sorted(bad)


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "kvlocal"
    (fake / "am").mkdir(parents=True)
    (fake / "am" / "x.py").write_text("def f():\n    from ..engine import binding\n    return binding\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert "kvlocal.engine.binding" in kvlocal_imports(fake / "am" / "x.py")


def test_kv_and_am_import_without_llama_cpp():
    code = ("import sys; sys.modules['llama_cpp'] = None\n"
            "import kvlocal.am, kvlocal.kv.cache, kvlocal.kv.queryset, kvlocal.kv.statecodec\n"
            "assert not [m for m in sys.modules if m.startswith(('kvlocal.engine', 'kvlocal.api'))]")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PKG.parent)
    assert res.returncode == 0, res.stderr


def test_only_the_binding_layer_touches_ctypes_and_llama_cpp():
    touching = set()
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] in ("ctypes", "llama_cpp") for n in names):
                touching.add(str(f.relative_to(PKG)))
    assert touching == {"engine/native.py", "engine/binding.py"}, sorted(touching)
