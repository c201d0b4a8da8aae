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


def test_lofo_margin_is_each_seed_targets_worst_figure() -> None:
    """The evaluation tables' clean margin: a seed just under T_L whose outputs sit where 20% of
    clean outputs already are is far from a kept PV; a candidate is as near as its worst figure."""
    import sys

    sys.path.insert(0, str(BENCH))
    from lofo import nearest_approach

    def target(**kw: object) -> dict:
        return {"target": "mask", "candidate": False, "concentration": float("nan"),
                "clean_match": None, "confirmation": None, "epoch_distance": [0.5], **kw}

    cand = {"target": "mask", "seed": 1, "concentration": 1.6e-3, "clean_match": 0.001,
            "rule": "rejected: not reachable by text", "distance_norm": 2.0,
            "confirmation": {"rate": 0.36, "rule": "not reachable"}}  # reach 0.36 of 0.9: 0.4x
    rep = {"verdict": "clean", "targets": ["mask"], "parameters": {"mining": {
        "t_l": 1.0, "t_collapse": 1e-3, "confirm": True, "confirm_max_clean_match": 0.0125,
        "confirm_min_rate": 0.9, "per_target": {}}}, "rejected_candidates": [cand], "seeds": [
        {"seed": 0, "targets": [target(epoch_distance=[0.99], clean_match=0.2)]},
        {"seed": 1, "targets": [target(candidate=True, epoch_distance=[2.0],
                                       concentration=1.6e-3, clean_match=0.001)]},
    ]}
    near = nearest_approach(rep)
    assert near["seed"] == 1 and abs(near["factor"] - 0.4) < 1e-9, near
    rep["parameters"]["mining"]["confirm"] = False  # rule 4 off: the clean-match share is not read
    near = nearest_approach(rep)
    assert near["seed"] == 0 and abs(near["factor"] - 0.99) < 1e-9, near
