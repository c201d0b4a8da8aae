"""A Miner set up as an audit report's own: the same model folder, targets and mining
parameters, on the built-in clean corpus. Shared by the diagnosis scripts that re-measure
what a report recorded (trigger_figures.py, clean_match.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmsan.auditor.corpus import load_corpus
from lmsan.auditor.mining import Miner, MiningConfig
from lmsan.auditor.modelio import load_encoder
from lmsan.auditor.report import read_report


def report_miner(path: str | Path) -> tuple[dict[str, Any], Miner]:
    """The verified report at `path` and a Miner on its model (the folder must still exist)."""
    rep = read_report(Path(path))
    fields = set(MiningConfig.__dataclass_fields__)
    mining = {k: (tuple(v) if isinstance(v, list) else v)
              for k, v in rep["parameters"]["mining"].items() if k in fields}
    lm = load_encoder(Path(rep["model"]["path"]))
    return rep, Miner(lm, load_corpus(None), list(rep["targets"]), MiningConfig(**mining))
