"""What the zoo-reading diagnosis scripts share: the zoo's recorded rows and the shipped T_L."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def shipped_presets() -> dict[str, dict[str, Any]]:
    """The shipped presets' values by name."""
    return {p["name"]: p["values"] for p in
            json.loads((ROOT / "auditor/data/presets.json").read_text())["presets"]}


def t_l_of(presets: dict[str, dict[str, Any]]) -> Callable[[str, str], float]:
    """T_L of a target under a preset (its per-target value first)."""
    def t_l(preset: str, target: str) -> float:
        v = presets[preset]
        return float(v.get("per_target", {}).get(target, {}).get("t_l", v["t_l"]))

    return t_l


def zoo_rows() -> list[dict[str, Any]]:
    """The detection zoo's rows (bench/results/zoo_detect.jsonl)."""
    return [json.loads(x) for x in
            (ROOT / "bench/results/zoo_detect.jsonl").read_text().splitlines()]
