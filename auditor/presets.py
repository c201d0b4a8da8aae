"""Threshold presets per model family, calibrated on clean shadow models (section V-C).

A preset fixes the thresholds that do not transfer across architectures: `t_l` (relative
distance that makes a candidate), `t_collapse` (concentration below which the outputs collapsed,
Observation II) and `lr0`. `lmsan calibrate` measures them on clean shadow models and writes a
preset file (`write_presets`); the package ships the presets it has measured in
`data/presets.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import FormatError, InputError
from .fsutil import atomic_write_text
from .pvset import TARGETS

FORMAT = "lmsan.presets"
VERSION = 1


@dataclass
class Preset:
    name: str
    match: dict[str, Any]  # model_type (str or list), hidden_size, num_hidden_layers [lo, hi]
    values: dict[str, Any]  # t_l, t_collapse, lr0, div_loss, ... (MiningConfig fields)
    source: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def matches(self, cfg: dict[str, Any]) -> bool:
        m = self.match
        mt = m.get("model_type")
        if mt is not None:
            allowed = [mt] if isinstance(mt, str) else list(mt)
            if cfg.get("model_type") not in allowed:
                return False
        if "hidden_size" in m and cfg.get("hidden_size") != m["hidden_size"]:
            return False
        if "num_hidden_layers" in m:
            lo, hi = m["num_hidden_layers"]
            n = cfg.get("num_hidden_layers", cfg.get("n_layers", cfg.get("n_layer")))
            if n is None or not lo <= int(n) <= hi:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "match": self.match,
            "values": self.values,
            "source": self.source,
            "evidence": self.evidence,
        }


PER_TARGET_KEYS = ("t_l", "t_collapse", "t_far", "confirm_max_clean_match")


def _per_target(v: Any, where: str, path: str | Path) -> dict[str, dict[str, float]]:
    """{target: {t_l | t_collapse | t_far | confirm_max_clean_match: number}}: thresholds of one
    output overriding the family's (t_far exists only per target)."""
    if not isinstance(v, dict):
        raise FormatError(f"{where} must be an object {{target: {{threshold: number}}}}", path)
    out: dict[str, dict[str, float]] = {}
    for t, d in v.items():
        if t not in TARGETS:
            raise FormatError(f"{where}: unknown target {t!r} (one of {', '.join(TARGETS)})", path)
        if not isinstance(d, dict) or set(d) - set(PER_TARGET_KEYS):
            raise FormatError(f"{where}.{t}: only {', '.join(PER_TARGET_KEYS)} may be set", path)
        for k, x in d.items():
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not x >= 0:
                raise FormatError(f"{where}.{t}.{k} must be a non-negative number", path)
        out[t] = {k: float(x) for k, x in d.items()}
    return out


def _parse(data: Any, path: str | Path) -> tuple[list[Preset], Preset]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FormatError(f"field 'format' must be {FORMAT!r}", path)
    if data.get("version") != VERSION:
        raise FormatError(f"field 'version' must be {VERSION}", path)
    out = []
    allowed = {"t_l", "t_collapse", "lr0", "t_div", "t_grad", "t_match",
               "confirm_max_clean_match"}
    choices = {"div_loss": ("entropy", "log_concentration"), "loss_scale": ("raw", "standardized"),
               "filter_rule": ("collapse", "paper")}
    raw = data.get("presets", [])
    if not isinstance(raw, list):
        raise FormatError("field 'presets' must be a list", path)
    for i, e in enumerate(raw + [data.get("default")]):
        where = f"presets[{i}]" if i < len(raw) else "default"
        if not isinstance(e, dict) or not isinstance(e.get("values"), dict):
            raise FormatError(f"{where}: needs an object 'values'", path)
        bad = set(e["values"]) - allowed - set(choices) - {"per_target", "confirm"}
        if bad:
            raise FormatError(f"{where}.values: unknown threshold(s) {sorted(bad)}", path)
        values: dict[str, Any] = {}
        for k, v in e["values"].items():
            if k == "per_target":
                values[k] = _per_target(v, f"{where}.values.per_target", path)
            elif k == "confirm":
                if not isinstance(v, bool):
                    raise FormatError(f"{where}.values.confirm must be true or false", path)
                values[k] = v
            elif k in choices:
                if v not in choices[k]:
                    raise FormatError(f"{where}.values.{k} must be one of {choices[k]}", path)
                values[k] = v
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                raise FormatError(f"{where}.values.{k} must be a number", path)
            else:
                values[k] = float(v)
        out.append(
            Preset(
                name=str(e.get("name", where)),
                match=dict(e.get("match") or {}),
                values=values,
                source=str(e.get("source", "")),
                evidence=dict(e.get("evidence") or {}),
            )
        )
    return out[:-1], out[-1]


def load_presets(path: str | Path | None = None) -> tuple[list[Preset], Preset]:
    if path is None:
        text = resources.files("lmsan.auditor").joinpath("data", "presets.json").read_text()
        return _parse(json.loads(text), "lmsan/auditor/data/presets.json")
    p = Path(path)
    if not p.is_file():
        raise InputError("preset file not found", p)
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", p) from None
    return _parse(data, p)


@dataclass
class PresetChoice:
    preset: Preset
    matched: bool  # False: no preset for this family, the default was used
    warning: str | None


def default_preset() -> Preset:
    """The shipped file's default entry (what an audit starts from when no preset matches)."""
    return load_presets()[1]


def choose_preset(model_config: dict[str, Any], path: str | Path | None = None) -> PresetChoice:
    presets, default = load_presets(path)
    for p in presets:
        if p.matches(model_config):
            return PresetChoice(p, True, None)
    desc = (
        f"{model_config.get('model_type')} (hidden {model_config.get('hidden_size')}, "
        f"{model_config.get('num_hidden_layers', '?')} layers)"
    )
    return PresetChoice(
        default,
        False,
        f"no calibrated preset matches {desc}; using the generic default thresholds. "
        "A 'backdoored' verdict may be a false positive and a 'clean' verdict is less certain: "
        "calibrate this family on clean shadow models with `lmsan calibrate` and pass --preset.",
    )


def write_presets(
    path: str | Path,
    presets: list[Preset],
    default: Preset,
    rows: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a preset file (the `lmsan.presets` format `load_presets` reads); `rows`, the shadow
    measurements a preset came from, travel with it."""
    data: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                            "presets": [p.to_json() for p in presets], "default": default.to_json()}
    if rows is not None:
        data["rows"] = rows
    try:
        return atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        raise InputError(f"cannot write the preset file ({exc.strerror or exc})", path) from None
