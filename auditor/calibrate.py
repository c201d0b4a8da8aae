"""`lmsan calibrate`: derive a threshold preset from clean shadow models (section V-C).

For each clean shadow model, run fuzz seeds with candidate detection forced on (T_L = 0, no
early abort), so the final soft prompt of every seed is measured: relative distance,
concentration (collapse statistic), spread ratio, paper entropy. A clean model must keep no PV,
so the preset puts the collapse threshold below every clean measurement with a safety margin:

    t_collapse = margin * min(concentration over all clean shadow seeds)

per target (cls, pooler, tokens, mask each have their own clean statistics) and overall (the
fallback for a target the shadows did not measure).

`t_l` (the distance that makes a candidate and decides the early abort) is kept as configured
(METHOD.md's 0.1 by default): on deep models the distances of false and true candidates overlap
(METHOD.md "Calibration"), so only the collapse separates them; the smallest clean epoch-2
distance is recorded in the evidence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .corpus import Corpus
from .errors import InputError
from .modelio import load_encoder, read_config, resolve_device
from .presets import Preset


@dataclass
class CalibrationResult:
    preset: Preset
    rows: list[dict[str, Any]]
    seconds: float


def calibrate(
    model_dirs: Sequence[str | Path],
    corpus: Corpus,
    *,
    name: str,
    seeds: int = 8,
    margin: float = 0.5,
    targets: Sequence[str] = ("auto",),
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    layers_slack: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> CalibrationResult:
    from .mining import Miner, MiningConfig

    if not model_dirs:
        raise InputError("give at least one clean shadow model folder")
    if not 0 < margin <= 1:
        raise InputError("--margin must be in (0, 1]")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    cfgs = [read_config(Path(p)) for p in model_dirs]
    fam = {(c.get("model_type"), c.get("hidden_size")) for c in cfgs}
    if len(fam) != 1:
        raise InputError(f"shadow models must share model_type and hidden_size, got {sorted(fam)}")
    rows: list[dict[str, Any]] = []
    base_cfg = MiningConfig(**(overrides or {}))
    auto = list(targets) == ["auto"]
    measured: list[str] = []
    for path in model_dirs:
        lm = load_encoder(path, device=dev)
        if auto:
            from .audit import supported_targets

            model_targets = supported_targets(lm)[0]
        else:
            from .audit import resolve_targets

            model_targets = [x for t in targets for x in resolve_targets(lm, t)[0]]
        measured += [t for t in model_targets if t not in measured]
        cfg = MiningConfig(**{**asdict(base_cfg), "t_l": 0.0})
        try:
            miner = Miner(lm, corpus, model_targets, cfg, device=dev)
        except ValueError as exc:
            raise InputError(str(exc), corpus.name) from None
        for s in range(seeds):
            res = miner.run_seed(s)
            for ts in res.targets:
                row = {"model": str(path), "seed": s, "target": ts.target,
                       "distance_rel": ts.distance_rel, "concentration": ts.concentration,
                       "spread_ratio": ts.spread_ratio, "entropy_raw": ts.entropy_raw,
                       "epoch_distance": ts.epoch_distance, "prompt_in_range": res.prompt_in_range,
                       "seconds": res.seconds}
                rows.append(row)
                if progress:
                    progress({"event": "calibrate_seed", **row})
    conc = [r["concentration"] for r in rows if math.isfinite(r["concentration"])]
    early = [r["epoch_distance"][min(cfg.abort_epoch, len(r["epoch_distance"])) - 1] for r in rows]
    if not conc:
        raise InputError("no finite measurement from the shadow models")
    layers = sorted({int(c.get("num_hidden_layers", 0)) for c in cfgs})
    values: dict[str, Any] = {
        "t_collapse": margin * min(conc),
        "t_l": base_cfg.t_l,
        "lr0": base_cfg.lr0,
        "div_loss": base_cfg.div_loss,
    }
    per_target: dict[str, dict[str, float]] = {}
    per_target_evidence: dict[str, dict[str, float]] = {}
    for t in measured:
        tc = [r["concentration"] for r in rows if r["target"] == t and math.isfinite(r["concentration"])]
        te = [r["epoch_distance"][min(cfg.abort_epoch, len(r["epoch_distance"])) - 1]
              for r in rows if r["target"] == t]
        if tc:
            per_target[t] = {"t_collapse": margin * min(tc)}
            per_target_evidence[t] = {"min_concentration": min(tc), "max_concentration": max(tc),
                                      "min_epoch2_distance": min(te), "max_epoch2_distance": max(te)}
    if len(per_target) > 1:
        values["per_target"] = per_target
    preset = Preset(
        name=name,
        match={"model_type": cfgs[0]["model_type"], "hidden_size": cfgs[0]["hidden_size"],
               "num_hidden_layers": [layers[0] - layers_slack, layers[-1] + layers_slack]},
        values=values,
        source=f"lmsan calibrate on {len(model_dirs)} clean shadow model(s), {seeds} seeds each, "
        f"margin {margin}",
        evidence={
            "shadow_models": [str(p) for p in model_dirs],
            "min_concentration": min(conc),
            "max_concentration": max(conc),
            "min_epoch2_distance": min(early),
            "max_epoch2_distance": max(early),
            "per_target": per_target_evidence,
            "seeds": seeds,
            "targets": measured,
            "corpus": corpus.name,
            "corpus_digest": corpus.digest,
            "mining": {k: v for k, v in asdict(base_cfg).items() if k not in values},
        },
    )
    return CalibrationResult(preset, rows, time.perf_counter() - t0)
