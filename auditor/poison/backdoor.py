"""backdoor.json: what `lmsan poison` implanted (attack, triggers, PVs, base digest, measured
quality), written into every poisoned model folder. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..corpus import Corpus
from ..errors import FormatError, InputError
from ..pvset import TARGETS
from .attacks import ATTACKS, MATCH_FRACTION
from .data import TriggerSet
from .options import PoisonOptions
from .quality import Quality

BACKDOOR_FORMAT = "lmsan-backdoor"
BACKDOOR_VERSION = 1
BACKDOOR_FILE = "backdoor.json"


@dataclass
class BaseModel:
    """The checkpoint a backdoor was implanted in."""

    path: Path
    model_type: str
    weights_format: str
    digest: str  # weights_digest over its weight files
    files: dict[str, str]  # weight file -> sha256


def backdoor_record(
    opts: PoisonOptions,
    *,
    target: str,
    utility: str,
    triggers: TriggerSet,
    token_ids: list[list[int]],
    pvs: np.ndarray,
    base: BaseModel,
    corpus: Corpus,
    sentences: int,
    held_out: int,
    quality: Quality,
    steps: int,
    final_loss: float,
    files: list[str],
    notes: list[str],
    seconds: float,
    evade: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The backdoor.json object of one run. `evade`: the thresholds the filter-evasion loss
    read (adaptive.EvadeThresholds.to_json), when it was on."""
    return {
        "format": BACKDOOR_FORMAT,
        "version": BACKDOOR_VERSION,
        "lmsan_version": __version__,
        "attack": opts.attack,
        "target": target,
        "utility": utility,
        "triggers": [
            {"text": t, "pv": k, "source": src, "token_ids": ids}
            for t, k, src, ids in zip(
                triggers.texts, triggers.pv, triggers.sources, token_ids, strict=True
            )
        ],
        "pvs": {
            "design": opts.pv_design,
            "scale": float(opts.pv_scale),
            "dim": int(pvs.shape[1]),
            "count": triggers.n_pvs,
            "values": [[float(x) for x in row] for row in pvs],
        },
        "base_model": {
            "path": str(base.path.resolve()),
            "model_type": base.model_type,
            "weights_format": base.weights_format,
            "digest": base.digest,
            "files": base.files,
        },
        "seed": opts.seed,
        "hyper_parameters": {
            "sentences_per_trigger": opts.sentences_per_trigger,
            "epochs": opts.epochs,
            "lr": opts.lr,
            "batch_size": opts.batch_size,
            "max_length": opts.max_length,
            "optimizer": "adam",
            "utility_requested": opts.utility,
            "utility_weight": opts.utility_weight,
            "dropout": False,
            "steps": steps,
            "device": opts.device,
        },
        "adaptive": {
            "trigger_kind": opts.trigger_kind,
            "n_pvs": triggers.n_pvs,
            "scatter_weight": opts.scatter_weight,
            "match_clean_weight": opts.match_clean_weight,
            "evade_filter_weight": opts.evade_filter_weight,
            "evade_filter": evade,
        },
        "corpus": {
            "name": corpus.name,
            "digest": corpus.digest,
            "sentences": sentences,
            "held_out": held_out,
        },
        "quality": {
            "success": quality.success,
            "targetability": quality.targetability,
            "moved": quality.moved,
            "success_per_trigger": quality.success_per_trigger,
            "triggered_figures": quality.figures,
            "triggered_distance_concentration": quality.detector_view(),
            "fidelity": quality.fidelity,
            "clean_match_rate": quality.clean_match_rate,
            "match_fraction": MATCH_FRACTION,
            "min_success": quality.min_success,
            "meets_min_success": quality.passed,
            "final_loss": final_loss,
        },
        "files": files,
        "notes": notes,
        "seconds": round(seconds, 3),
    }


def validate_backdoor(data: Any, path: str | Path = BACKDOOR_FILE) -> dict[str, Any]:
    """Check a backdoor.json object; FormatError names the first bad field."""

    def need(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise FormatError(f"missing field {where}{key}", path)
        v = obj[key]
        if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float, (int, float))):
            raise FormatError(f"field {where}{key} has the wrong type", path)
        return v

    if not isinstance(data, dict):
        raise FormatError("not a JSON object", path)
    if need(data, "format", str, "") != BACKDOOR_FORMAT:
        raise FormatError(f"field format is not {BACKDOOR_FORMAT!r}", path)
    if need(data, "version", int, "") != BACKDOOR_VERSION:
        raise FormatError(
            f"unsupported version {data['version']} (expected {BACKDOOR_VERSION})", path
        )
    if need(data, "attack", str, "") not in ATTACKS:
        raise FormatError(f"field attack is not one of {', '.join(ATTACKS)}", path)
    if need(data, "target", str, "") not in TARGETS:
        raise FormatError(f"field target is not one of {', '.join(TARGETS)}", path)
    need(data, "utility", str, "")
    need(data, "seed", int, "")
    pv = need(data, "pvs", dict, "")
    dim = need(pv, "dim", int, "pvs.")
    values = need(pv, "values", list, "pvs.")
    if not values or any(not isinstance(r, list) or len(r) != dim for r in values):
        raise FormatError(
            "field pvs.values must be a non-empty list of rows of length pvs.dim", path
        )
    trig = need(data, "triggers", list, "")
    if not trig:
        raise FormatError("field triggers is empty", path)
    for i, t in enumerate(trig):
        need(t, "text", str, f"triggers[{i}].")
        k = need(t, "pv", int, f"triggers[{i}].")
        if not 0 <= k < len(values):
            raise FormatError(f"field triggers[{i}].pv points at no PV", path)
    bm = need(data, "base_model", dict, "")
    if not str(need(bm, "digest", str, "base_model.")).startswith("sha256:"):
        raise FormatError("field base_model.digest is not a sha256 digest", path)
    need(data, "hyper_parameters", dict, "")
    q = need(data, "quality", dict, "")
    for key in ("success", "fidelity", "clean_match_rate", "min_success"):
        need(q, key, (int, float), "quality.")
    need(q, "meets_min_success", bool, "quality.")
    return data


def read_backdoor(model_dir: str | Path) -> dict[str, Any]:
    """Read and validate `backdoor.json` of a poisoned model folder."""
    p = Path(model_dir) / BACKDOOR_FILE
    if not p.is_file():
        raise InputError(
            "no backdoor.json (not a folder written by `lmsan poison`)", Path(model_dir)
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", p) from None
    return validate_backdoor(data, p)


def backdoor_pvs(data: dict[str, Any]) -> np.ndarray:
    """The PVs of a validated backdoor.json as an (n, d) float32 array."""
    return np.asarray(data["pvs"]["values"], dtype=np.float32)
