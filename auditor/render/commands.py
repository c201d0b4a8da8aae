"""The commands a rendered report prints to verify the report and to repeat the audit."""

from __future__ import annotations

from shlex import quote
from typing import Any

from ..corpus import DEFAULT_NAME


def _d(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def verify_command(report_path: str, model_dir: str) -> str:
    return " ".join(
        ["lmsan verify", quote(report_path), "--model", quote(model_dir), "--pub", "SIGNER_KEY.pub"]
    )


def audit_command(pred: dict[str, Any], model_path: str) -> str:
    par = _d(pred.get("parameters"))
    mining = _d(par.get("mining"))
    preset = _d(pred.get("preset"))
    corpus = _d(pred.get("corpus")).get("name")
    parts = ["lmsan audit", quote(model_path)]
    if isinstance(corpus, str) and corpus and corpus != DEFAULT_NAME:
        parts += ["--corpus", quote(corpus)]
    for opt, key in (("--target", "target"), ("--mode", "mode"), ("--max-seeds", "max_seeds"),
                     ("--first-seed", "first_seed"), ("--seed", "seed")):
        if key in par:
            parts += [opt, str(par[key])]
    if par.get("mode") == "search" and "patience" in par:
        parts += ["--patience", str(par["patience"])]
    if mining.get("max_length") not in (None, 128):
        parts += ["--max-length", str(mining["max_length"])]
    if preset.get("file") not in (None, "builtin"):
        parts += ["--preset", quote(str(preset["file"]))]
    if par.get("allow_pickle"):
        parts.append("--allow-pickle")
    return " ".join(parts)
