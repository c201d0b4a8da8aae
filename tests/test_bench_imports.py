"""The benchmark programs import lmsan lazily, inside functions, so a renamed module or function
breaks them only when that function runs. Every `from lmsan... import name` in bench/ must
resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _lmsan_imports() -> list[tuple[str, int, str, str]]:
    out = []
    for f in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmsan"):
                out += [(f.name, node.lineno, str(node.module), a.name) for a in node.names]
    return out


def test_every_lmsan_import_of_the_benchmarks_resolves() -> None:
    found = _lmsan_imports()
    assert len(found) > 50  # the walk really reads the benchmark programs
    missing = []
    for name, line, module, attr in found:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{name}:{line}: {module} ({exc})")
            continue
        if not hasattr(mod, attr):
            try:
                importlib.import_module(f"{module}.{attr}")
            except ImportError:
                missing.append(f"{name}:{line}: {module}.{attr}")
    assert not missing, "\n".join(missing)
