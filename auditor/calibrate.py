"""`lmsan calibrate`: derive a threshold preset from clean shadow models (section V-C).

For each clean shadow model, run fuzz seeds with candidate detection forced on (T_L = 0, no
early abort), so the final soft prompt of every seed is measured: relative distance,
concentration (collapse statistic), spread ratio, paper entropy. A clean model must keep no PV,
so the preset puts the collapse threshold below every clean measurement with a safety margin:

    t_collapse = margin * min(concentration over all clean shadow seeds)

per target (cls, pooler, tokens, mask each have their own clean statistics) and overall (the
fallback for a target the shadows did not measure). With backdoored shadows (the paper tunes on
BToP shadow models, section V-C) the threshold moves down to the geometric mean of the largest
concentration of a found backdoor and the smallest clean one, when that is lower, and a target's
T_L is raised between the clean and the found epoch-2 distances when they separate.

Where the found backdoors aimed at a target moved FAR_RATIO x farther (final distance) than every
clean seed, the target also gets `t_far` (the geometric mean of the two): a candidate beyond it
is accepted without collapse.

`t_l` (the distance that makes a candidate and decides the early abort) is otherwise kept as
configured: on deep models the distances of false and true candidates overlap (docs/how-it-works.md,
"Calibration"), so only the collapse separates them; the smallest clean epoch-2 distance is
recorded in the evidence.

The collapse threshold reads the clean seeds that pass T_L on that target in an audit or come
within `NEAR_MISS` of it: a seed whose distances stay under T_L on every target at the check
epoch is abandoned there, and one whose final distance on the target stays under its T_L makes
no candidate, so in an audit their concentration never meets T_collapse. Reading every seed let
one clean seed that collapsed while it stayed far under T_L (a 6-layer shadow's seed 15, at
0.3-0.45x T_L) pull the threshold under every backdoor the family's audits flag. Where no clean
seed comes that near on a target, the threshold reads every clean seed, and the evidence says
which reading it is.

`calibrate_and_write` runs the calibration and writes the preset file, which is what
`lmsan calibrate` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .audit import DETECT_SEEDS, resolve_targets, supported_targets
from .corpus import Corpus, load_corpus
from .errors import InputError
from .filtering import NEAR_MISS
from .modelio import load_encoder, read_config, resolve_device
from .presets import Preset, write_presets

# a target gets a distance-only acceptance threshold (t_far) only when every found backdoor
# aimed at that target moved at least this many times farther than every clean shadow seed
FAR_RATIO = 10.0


@dataclass
class CalibrationResult:
    preset: Preset
    rows: list[dict[str, Any]]
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the preset's evidence does not cover


def _threshold(clean: list[float], found: list[float], margin: float) -> tuple[float, str]:
    """A "below is a PV" threshold from clean values and (optionally) found backdoor values.

    Never above margin x the smallest clean value; when the backdoor values lie below every
    clean one, the geometric mean of the two edges if that is lower still (halfway on the log
    scale the statistic lives on)."""
    lo_clean = min(clean)
    t = margin * lo_clean
    if not found:
        return t, f"{margin:g} x min clean"
    hi_found = max(found)
    if hi_found >= lo_clean:
        return t, f"{margin:g} x min clean; OVERLAP: a found backdoor value {hi_found:.3g} >= min clean"
    g = math.sqrt(hi_found * lo_clean)
    if g < t:
        return g, "geometric mean of max backdoor and min clean"
    if hi_found >= t:
        return t, f"{margin:g} x min clean; THIN: a found backdoor value {hi_found:.3g} >= it"
    return t, f"{margin:g} x min clean"


def _target_t_l(t: str, clean: list[dict[str, Any]], found: list[dict[str, Any]], t_l: float,
                ep2: Callable[[dict[str, Any]], float]) -> float:
    """Target `t`'s T_L: raised to the geometric mean of the largest clean and the smallest found
    epoch-2 distance when the found backdoors' distances clear every clean one and that mean lies
    above the configured T_L; else the configured T_L."""
    hi_c = max((ep2(r) for r in clean if r["target"] == t), default=None)
    lo_f = min((ep2(r) for r in found if r["target"] == t), default=None)
    if hi_c is not None and lo_f is not None and lo_f > hi_c and math.sqrt(hi_c * lo_f) > t_l:
        return math.sqrt(hi_c * lo_f)
    return t_l


def _clean_reading(rows: list[dict[str, Any]], t_l: dict[str, float], default_t_l: float,
                   ep2: Callable[[dict[str, Any]], float],
                   target: str) -> tuple[list[dict[str, Any]], str]:
    """The clean rows of `target` whose concentrations set its collapse threshold, and which
    reading they are; `rows` are every clean row, since whether a seed runs past the check epoch
    depends on all its targets.

    "near": the rows whose last distance in an audit (the check epoch's for a seed abandoned
    there, the final one otherwise) came within NEAR_MISS of the target's T_L or passed it: the
    seeds an audit judges under the threshold, and those that came as near to being judged as
    the seeds a clean verdict's margin reads. A seed of one shadow that passes T_L is one draw of
    the clean tail; the near ones widen the sample without reading seeds that stay far under T_L.
    Else "all" of the target's rows."""
    def tl(r: dict[str, Any]) -> float:
        return t_l.get(r["target"], default_t_l)

    alive = {(r["model"], r["seed"]) for r in rows if ep2(r) > tl(r)}

    def last(r: dict[str, Any]) -> float:
        return float(r["epoch_distance"][-1]) if (r["model"], r["seed"]) in alive else ep2(r)

    mine = [r for r in rows if r["target"] == target]
    near = [r for r in mine if last(r) >= NEAR_MISS * tl(r)]
    return (near, "near") if near else (mine, "all")


READING = {
    "near": f"over the clean seeds that pass T_L here or come within {NEAR_MISS:g} x T_L of it",
    "all": (f"NO SEED NEAR T_L: no clean seed comes within {NEAR_MISS:g} x T_L here; over every "
            "clean seed"),
}


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
    backdoored: Sequence[str | Path] = (),
    backdoored_seeds: int | None = None,
) -> CalibrationResult:
    """Clean shadows set the collapse threshold below every clean measurement; backdoored
    shadows (folders written by `lmsan poison`, with backdoor.json) are optional. Their seeds
    whose candidate on some target matches an injected PV ("found") place that target's threshold
    between the classes and, where the found distances exceed every clean epoch-2 distance,
    set that target's T_L between them too (so clean seeds are abandoned early: cost)."""
    from .mining import MiningConfig

    if not model_dirs:
        raise InputError("give at least one clean shadow model folder")
    if not 0 < margin <= 1:
        raise InputError("--margin must be in (0, 1]")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    cfgs = [read_config(Path(p)) for p in [*model_dirs, *backdoored]]
    fam = {(c.get("model_type"), c.get("hidden_size")) for c in cfgs}
    if len(fam) != 1:
        raise InputError(f"shadow models must share model_type and hidden_size, got {sorted(fam)}")
    base_cfg = MiningConfig(**(overrides or {}))
    rows = measure_shadows(model_dirs, corpus, seeds=seeds, targets=targets, base_cfg=base_cfg,
                           device=dev, progress=progress, backdoored=backdoored,
                           backdoored_seeds=backdoored_seeds)
    preset = preset_from_rows(rows, cfgs, name=name, margin=margin, base_cfg=base_cfg,
                              layers_slack=layers_slack, corpus=corpus)
    notes = []
    if seeds < DETECT_SEEDS:
        notes.append(
            f"{seeds} seeds per shadow; `lmsan audit` runs up to {DETECT_SEEDS} in detect mode and "
            f"a seed's figures depend on which seed it is (its starting prompt, the earlier "
            f"candidates): seeds {seeds}..{DETECT_SEEDS - 1} are not in this preset's evidence "
            f"(--seeds {DETECT_SEEDS} covers them)")
    return CalibrationResult(preset, rows, time.perf_counter() - t0, notes)


def calibrate_and_write(
    model_dirs: Sequence[str | Path],
    out: Path,
    *,
    name: str,
    force: bool = False,
    corpus: Path | None = None,
    text_field: str = "text",
    **kwargs: Any,
) -> CalibrationResult:
    """`calibrate` on the corpus file `corpus` (default: the shipped one), then write the preset
    file `out` with the preset as its only entry and default, and the shadow rows. An existing
    `out` is replaced only with `force`; the keyword arguments are `calibrate`'s."""
    if out.exists() and not force:
        raise InputError("preset file exists; pass --force to overwrite", out)
    crp = load_corpus(corpus, text_field=text_field)
    res = calibrate(model_dirs, crp, name=name, **kwargs)
    write_presets(out, [res.preset], res.preset, rows=res.rows)
    return res


def measure_shadows(
    model_dirs: Sequence[str | Path],
    corpus: Corpus,
    *,
    seeds: int,
    targets: Sequence[str],
    base_cfg: Any,
    device: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
    backdoored: Sequence[str | Path] = (),
    backdoored_seeds: int | None = None,
) -> list[dict[str, Any]]:
    """Mine `seeds` seeds (T_L = 0, no early abort) on every shadow; one row per seed and target.
    Rows of backdoored shadows carry the best sign agreement with an injected PV and `found`."""
    import numpy as np

    from .mining import Miner, MiningConfig
    from .poison import backdoor_pvs, read_backdoor

    dev = device
    injected = {str(p): read_backdoor(p) for p in backdoored}
    rows: list[dict[str, Any]] = []
    auto = list(targets) == ["auto"]
    jobs = [(p, "clean", seeds) for p in model_dirs]
    jobs += [(p, "backdoored", backdoored_seeds or seeds) for p in backdoored]
    for path, label, n_seeds in jobs:
        lm = load_encoder(path, device=dev)
        if auto:
            model_targets = supported_targets(lm)[0]
        else:
            model_targets = [x for t in targets for x in resolve_targets(lm, t)[0]]
        cfg = MiningConfig(**{**asdict(base_cfg), "t_l": 0.0})
        try:
            miner = Miner(lm, corpus, model_targets, cfg, device=dev)
        except ValueError as exc:
            raise InputError(str(exc), corpus.name) from None
        bd = injected.get(str(path))
        signs = backdoor_pvs(bd) >= 0 if bd else None
        for s in range(n_seeds):
            res = miner.run_seed(s)
            for ts in res.targets:
                row = {"model": str(path), "label": label, "seed": s, "target": ts.target,
                       "distance_rel": ts.distance_rel, "concentration": ts.concentration,
                       "spread_ratio": ts.spread_ratio, "entropy_raw": ts.entropy_raw,
                       "epoch_distance": ts.epoch_distance, "prompt_in_range": res.prompt_in_range,
                       "seconds": res.seconds}
                if bd is not None and signs is not None:
                    vec = ts.pv_eval if ts.pv_eval is not None else ts.pv
                    agree = (float(((np.asarray(vec) >= 0) == signs).mean(1).max())
                             if vec is not None else 0.0)
                    # found: the candidate IS the backdoor, on whichever output it showed
                    # (BToP's [MASK] PV also drives the templated input's [CLS], for example)
                    row.update(attack_target=bd["target"], agreement=agree,
                               found=bool(agree >= base_cfg.t_match))
                rows.append(row)
                if progress:
                    progress({"event": "calibrate_seed", **row})
    return rows


def preset_from_rows(
    rows: list[dict[str, Any]],
    cfgs: list[dict[str, Any]],
    *,
    name: str,
    margin: float,
    base_cfg: Any,
    layers_slack: int = 0,
    corpus: Corpus,
) -> Preset:
    """The preset the rule of this module derives from measured shadow rows."""
    model_dirs = sorted({r["model"] for r in rows if r["label"] == "clean"})
    backdoored = sorted({r["model"] for r in rows if r["label"] == "backdoored"})
    seeds = max((r["seed"] for r in rows if r["label"] == "clean"), default=-1) + 1
    bd_seeds = max((r["seed"] for r in rows if r["label"] == "backdoored"), default=-1) + 1
    measured: list[str] = []
    for r in rows:
        if r["label"] == "clean" and r["target"] not in measured:
            measured.append(r["target"])

    def ep2(r: dict[str, Any]) -> float:
        return float(r["epoch_distance"][min(base_cfg.abort_epoch, len(r["epoch_distance"])) - 1])

    clean_rows = [r for r in rows if r["label"] == "clean" and math.isfinite(r["concentration"])]
    found_rows = [r for r in rows if r.get("label") == "backdoored" and math.isfinite(r["concentration"])
                  and (r.get("agreement") or 0.0) >= base_cfg.t_match]
    if not clean_rows:
        raise InputError("no finite measurement from the clean shadow models")
    conc = [r["concentration"] for r in clean_rows]
    early = [ep2(r) for r in clean_rows]
    layers = sorted({int(c.get("num_hidden_layers", 0)) for c in cfgs})
    t_l = {t: _target_t_l(t, clean_rows, found_rows, base_cfg.t_l, ep2) for t in measured}
    # the fallback for a target the shadows did not measure: which seeds an audit would judge
    # there is unknown, so every clean seed of every target is read
    t_all, why_all = _threshold(conc, [r["concentration"] for r in found_rows], margin)
    why_all += "; over every clean seed of every target"
    values: dict[str, Any] = {
        "t_collapse": t_all,
        "t_l": base_cfg.t_l,
        "lr0": base_cfg.lr0,
        "div_loss": base_cfg.div_loss,
    }
    per_target: dict[str, dict[str, float]] = {}
    per_target_evidence: dict[str, dict[str, Any]] = {}
    for t in measured:
        tc = [r for r in clean_rows if r["target"] == t]
        tf = [r for r in found_rows if r["target"] == t]
        if not tc:
            continue
        tr, how = _clean_reading(clean_rows, t_l, base_cfg.t_l, ep2, t)
        thr, why = _threshold([r["concentration"] for r in tr],
                              [r["concentration"] for r in tf], margin)
        why += "; " + READING[how]
        entry: dict[str, float] = {"t_collapse": thr}
        ev: dict[str, Any] = {
            "min_concentration": min(r["concentration"] for r in tc),
            "max_concentration": max(r["concentration"] for r in tc),
            "clean_seeds": len(tc),
            "clean_seeds_read": len(tr),
            "clean_reading": how,
            "min_read_concentration": min(r["concentration"] for r in tr),
            "min_epoch2_distance": min(ep2(r) for r in tc),
            "max_epoch2_distance": max(ep2(r) for r in tc),
            "t_collapse_rule": why,
            "backdoored_found_seeds": len(tf),
        }
        if tf:
            # the audit rejects a soft prompt outside the embedding range whatever its figures:
            # found seeds out of range mean this preset's lr0 cannot flag this backdoor
            ev["found_prompt_in_range"] = sum(bool(r.get("prompt_in_range", True)) for r in tf)
            if ev["found_prompt_in_range"] == 0:
                ev["range_warning"] = ("RANGE: every found backdoor seed's soft prompt left the "
                                       "embedding range; lower lr0")
            ev["found_max_concentration"] = max(r["concentration"] for r in tf)
            ev["found_min_epoch2_distance"] = min(ep2(r) for r in tf)
            if t_l[t] != base_cfg.t_l:
                entry["t_l"] = t_l[t]
                ev["t_l_rule"] = "geometric mean of max clean and min found epoch-2 distance"
            # Observation I alone: where every found backdoor that targets this output moved
            # FAR_RATIO x farther than every clean seed (final distance), distance is enough
            # evidence, collapse or not (a 2-layer encoder's outputs barely collapse). Only the
            # attack's own target counts: another attack's output that merely shares the sign
            # pattern (a POR-NER token PV seen on [CLS]) is not where that backdoor drives.
            own = [r for r in tf if r.get("attack_target") == t]
            clean_far = max(r["epoch_distance"][-1] for r in tc)
            ev["max_final_distance"] = clean_far
            found_far = min((r["epoch_distance"][-1] for r in own), default=None)
            ev["found_own_target_seeds"] = len(own)
            if found_far is not None:
                ev["found_min_final_distance"] = found_far
            if found_far is not None and found_far >= FAR_RATIO * clean_far > 0:
                entry["t_far"] = math.sqrt(clean_far * found_far)
                ev["t_far_rule"] = (f"found backdoors >= {FAR_RATIO:g}x every clean final distance: "
                                    "geometric mean of the two")
        per_target[t] = entry
        per_target_evidence[t] = ev
    if per_target:
        values["per_target"] = per_target
    n_bd = len(backdoored)
    preset = Preset(
        name=name,
        match={"model_type": cfgs[0]["model_type"], "hidden_size": cfgs[0]["hidden_size"],
               "num_hidden_layers": [layers[0] - layers_slack, layers[-1] + layers_slack]},
        values=values,
        source=f"lmsan calibrate on {len(model_dirs)} clean shadow model(s), {seeds} seeds each"
        + (f", and {n_bd} backdoored shadow model(s), {bd_seeds} seeds each"
           if n_bd else "")
        + f", margin {margin}",
        evidence={
            "shadow_models": [str(p) for p in model_dirs],
            "backdoored_shadow_models": [str(p) for p in backdoored],
            "min_concentration": min(conc),
            "max_concentration": max(conc),
            "t_collapse_rule": why_all,
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
    return preset
