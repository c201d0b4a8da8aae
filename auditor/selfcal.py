"""Self-calibration: thresholds for a model that no shipped preset covers, measured on itself.

A preset's thresholds come from clean shadow models of one family (`lmsan calibrate`); most
encoders a user downloads belong to no such family. Instead of a generic guess, an audit without
a preset (no preset matches, or `--preset none`) measures what a real PV looks like *in this
checkpoint*:

1. Implant. For each kind of target audited, a copy of the model gets a known backdoor
   (`poison_model`: POR with one random trigger on [CLS] for cls/pooler, on [MASK] for mask,
   POR-NER for tokens), in a temporary folder that is deleted afterwards.
2. Mine the copy, every seed trained to the end, until a seed converges onto the implanted PV
   (sign agreement >= 0.95 with it) and the trigger search confirms it. The learning rate is the
   first of `LR0_LADDER` that gets there, and the audit mines with it. That seed's final distance `d_imp`
   and concentration `c_imp` are what a backdoor looks like in this checkpoint, at this scale.
3. Derive the thresholds per target:

       T_L        = T_L_FRACTION * d_imp        (a candidate moved a real fraction of the way)
       T_collapse = T_COLLAPSE_FACTOR * c_imp   (it collapsed about as tightly as a real PV)
       clean-match limit = max(CLEAN_MATCH_LIMIT, CLEAN_MATCH_FACTOR * m_imp)
                    (m_imp: the share of clean outputs that already match the implanted PV),
                    or CLEAN_MATCH_LIMIT where m_imp > IMPLANT_SHARE_MAX: a planted PV that
                    most clean outputs already match in sign shows that sign matching cannot
                    tell a PV from clean text on that target of this model, so the target
                    keeps the limit that refuses such points instead of one that admits them

   and turn on trigger confirmation (`auditor.confirm`): a candidate is kept only when a trigger
   of a few real tokens drives held-out sentences onto it. Confirmation's thresholds are sign
   agreements and distance ratios, the same in every family, so it carries the verdict where the
   derived thresholds are loose.
4. Self-test: if no seed reaches a reference confirmed by text, the audit stops with an error
   (exit 2) instead of giving a verdict it cannot stand behind. With `partial` (`--partial`)
   the targets whose reference was reached are audited and the others are reported as not
   audited, with the reason: on a classifier fine-tune the [MASK] outputs can sit so close
   together that a planted PV is matched by clean text and mining lands on clean outputs
   instead; a verdict there would rest on nothing, one on the other targets still holds.

The report records every implant (trigger, attack success, seed, figures, confirmation) and the
thresholds derived from them, so a reader sees how this verdict's thresholds were obtained.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import Corpus
from .errors import LmsanError
from .filtering import CLEAN_MATCH_LIMIT
from .presets import Preset

T_L_FRACTION = 0.25
T_COLLAPSE_FACTOR = 10.0
# rule 4a's limit on the share of clean outputs at a PV: a pretrained encoder's
# (filtering.CLEAN_MATCH_LIMIT) unless this checkpoint's outputs are so alike that the implant's
# own PV is matched by more; then that share times the factor
CLEAN_MATCH_FACTOR = 4.0
# above this share of clean outputs at the implanted PV, the implant gives that target no usable
# clean-match reference (a 2-layer MiniLM's [CLS] outputs match a POR PV at 99.85%: a limit of
# 4x that would let every class prototype through); tiny random encoders' planted PVs: <= 2.7%
IMPLANT_SHARE_MAX = 0.05
IMPLANT_SEEDS = 4  # seeds mined on each implanted copy before giving up (a model that
# already carries backdoors may lead the first seeds to its own PVs; the path loss moves on)
IMPLANT_SEED = 7901  # the implant's training and trigger-draw seed
# (learning rate, epochs) tried in turn until the implant reaches attack success 0.9: the
# poisoning defaults suit pretrained encoders; small or randomly initialised ones need more
IMPLANT_SCHEDULE = ((1e-4, 2), (1e-3, 4), (5e-3, 6))
# mining learning rates tried in turn on the implanted copy (the presets use 2e-4 for pretrained
# encoders and 2e-3 for tiny random ones); the first that reaches the reference is the audit's
LR0_LADDER = (2e-4, 2e-3)
IMPLANT_AGREEMENT = 0.95  # a seed whose candidate agrees this well in sign reached the implant
# mining settings of the self-calibrated path (the family-independent ones of the generic preset)
BASE_VALUES: dict[str, Any] = {"lr0": 2e-4, "div_loss": "log_concentration"}
# which implant measures which target: (attack, implant target, targets read from that copy)
IMPLANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("por", "cls", ("cls", "pooler")),
    ("por", "mask", ("mask",)),
    ("por-ner", "tokens", ("tokens",)),
)


def clean_match_limit(implant_share: float) -> float:
    """Rule 4a's and rule 4's clean-match limit given the share of clean outputs that match
    the implanted PV (module text, step 3)."""
    if implant_share > IMPLANT_SHARE_MAX:
        return CLEAN_MATCH_LIMIT
    return max(CLEAN_MATCH_LIMIT, CLEAN_MATCH_FACTOR * implant_share)


class SelfCalibrationError(LmsanError):
    """Self-calibration could not measure a reference backdoor in this model."""


@dataclass
class Implant:
    """One reference backdoor implanted into a copy of the audited model, and what mining saw."""

    attack: str
    target: str
    trigger: str
    success: float
    seed: int | None  # the mining seed that reached the reference PV (None: none did)
    agreement: float  # best sign agreement of a seed's candidate with the implanted PV
    lr0: float | None = None  # the mining learning rate that reached it (the audit uses it)
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # target -> d, c
    confirmation: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass
class SelfCalibration:
    implants: list[Implant]
    values: dict[str, Any]  # MiningConfig fields, per_target included
    seconds: float
    # targets whose reference backdoor was not reached (`partial`): target -> why
    unverified: dict[str, str] = field(default_factory=dict)

    def preset(self) -> Preset:
        rule = (f"self-calibrated: T_L = {T_L_FRACTION:g} x and T_collapse = "
                f"{T_COLLAPSE_FACTOR:g} x the distance and concentration at which mining reached "
                "a backdoor implanted into a copy of this model; candidates confirmed by a "
                "discrete trigger search")
        return Preset(name="self-calibrated", match={}, values=self.values, source=rule,
                      evidence={"implants": [asdict(i) for i in self.implants]})

    def to_dict(self) -> dict[str, Any]:
        return {"implants": [asdict(i) for i in self.implants], "values": self.values,
                "seconds": self.seconds, "t_l_fraction": T_L_FRACTION,
                "t_collapse_factor": T_COLLAPSE_FACTOR, "unverified": self.unverified}


def _mining_config(values: dict[str, Any]) -> Any:
    from .mining import MiningConfig

    cfg = MiningConfig()
    for k, v in values.items():
        setattr(cfg, k, v)
    return cfg


def _measure_implant(model_dir: Path, corpus: Corpus, attack: str, target: str,
                     read: tuple[str, ...], device: str, work: Path, progress: Any,
                     prompt_init: str) -> Implant:
    from .modelio import load_encoder
    from .poison.pipeline import poison_model

    t0 = time.perf_counter()
    out = work / f"implant-{target}"
    for lr, epochs in IMPLANT_SCHEDULE:  # the gentlest training that implants it
        res = poison_model(model_dir, out, attack=attack, random_triggers=1, n_pvs=1,
                           target=target, seed=IMPLANT_SEED, device=device, min_success=0.9,
                           lr=lr, epochs=epochs, force=True)
        if res.passed:
            break
    if not res.passed:
        return Implant(attack=attack, target=target, trigger=res.triggers[0], success=res.success,
                       seed=None, agreement=0.0, seconds=time.perf_counter() - t0)
    lm = load_encoder(out, device=device)
    imp = Implant(attack=attack, target=target, trigger=res.triggers[0], success=res.success,
                  seed=None, agreement=0.0)
    pv = np.asarray(res.pvs[0], dtype=np.float32)
    for lr0 in LR0_LADDER:
        if _mine_implant(lm, corpus, target, read, device, pv, lr0, imp, progress, prompt_init):
            break
    imp.seconds = time.perf_counter() - t0
    return imp


def _mine_implant(lm: Any, corpus: Corpus, target: str, read: tuple[str, ...], device: str,
                  pv: np.ndarray, lr0: float, imp: Implant, progress: Any,
                  prompt_init: str) -> bool:
    """Mine the implanted copy with learning rate `lr0`, every seed to the end, until a seed's
    candidate is the implanted PV (sign agreement >= IMPLANT_AGREEMENT: converged onto it) and
    the trigger search confirms it. Fills `imp`; True when it did."""
    from .confirm import ConfirmRule, confirm_candidate
    from .mining import Miner

    cfg = _mining_config({**BASE_VALUES, "lr0": lr0, "t_l": 0.0, "t_collapse": 0.0,
                          "prompt_init": prompt_init})
    miner = Miner(lm, corpus, list(read), cfg, device=device)
    for seed in range(IMPLANT_SEEDS):
        if progress:
            progress({"event": "selfcal", "target": target, "seed": seed, "lr0": lr0})
        sr = miner.run_seed(seed)
        by = {ts.target: ts for ts in sr.targets}
        ts = by[target if target in by else read[0]]
        if ts.pv is None:
            continue
        agree = float(np.mean((np.asarray(ts.pv) >= 0) == (pv >= 0)))
        imp.agreement = max(imp.agreement, agree)
        if agree < IMPLANT_AGREEMENT:
            continue
        # the trigger search must reach the implant from text; where its trigger lands is the
        # implant's own clean-match share, which step 3 reads, not a test of the reference
        conf = confirm_candidate(miner, sr.prompt, ts.pv, ts.target,
                                 ConfirmRule(max_landing_match=1.0), seed=seed)
        imp.confirmation = conf.to_dict()
        if not conf.confirmed:
            continue
        imp.seed, imp.lr0 = seed, lr0
        imp.figures = {t: {"distance": float(by[t].epoch_distance[-1]),
                           "concentration": float(by[t].concentration),
                           "clean_match": float(by[t].clean_match or 0.0)} for t in read}
        imp.confirmation = conf.to_dict()
        return True
    return False


def _failure(imp: Implant) -> str:
    """Why the reference backdoor `imp` gives no thresholds."""
    if imp.success < 0.9:
        return (f"a reference backdoor on {imp.target} could not be implanted into a copy of this "
                f"model (attack success {imp.success:.2f} < 0.9)")
    return (f"mining did not reach a backdoor implanted on {imp.target} into a copy of this model "
            f"({IMPLANT_SEEDS} seeds at each learning rate "
            f"{', '.join(f'{x:g}' for x in LR0_LADDER)}; best sign agreement "
            f"{imp.agreement:.2f}), or the trigger search could not confirm it")


def self_calibrate(model_dir: str | Path, corpus: Corpus, targets: list[str], device: str = "cpu",
                   progress: Any = None, prompt_init: str = "stride",
                   partial: bool = False) -> SelfCalibration:
    """Implant reference backdoors into copies of the model at `model_dir`, mine them, and derive
    the thresholds for auditing `targets` (see the module text). `prompt_init` is where the
    implants' seeds start, as the audit's will (`--prompt-init`): the strided starts of the
    presets, or ordinary vocabulary tokens drawn per seed. Raises SelfCalibrationError when a
    reference backdoor cannot be implanted, reached or confirmed; with `partial`, only when that
    happens on every target (the others are listed in `unverified`)."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    implants: list[Implant] = []
    per_target: dict[str, dict[str, float]] = {}
    unverified: dict[str, str] = {}
    lr0s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lmsan-selfcal-") as tmp:
        for attack, target, read in IMPLANTS:
            read = tuple(t for t in read if t in targets)
            if not read:
                continue
            imp = _measure_implant(model_dir, corpus, attack, target, read, device, Path(tmp),
                                   progress, prompt_init)
            implants.append(imp)
            if imp.seed is None:
                why = _failure(imp)
                if not partial:
                    raise SelfCalibrationError(
                        f"self-calibration: {why}; no trustworthy verdict without a preset (see "
                        f"`lmsan calibrate`); --partial audits the targets whose reference "
                        f"backdoor is reached and reports {', '.join(read)} as not audited",
                        model_dir)
                unverified.update({t: f"self-test failed: {why}" for t in read})
                continue
            lr0s.append(float(imp.lr0 or LR0_LADDER[0]))
            for t, f in imp.figures.items():
                per_target[t] = {"t_l": T_L_FRACTION * f["distance"],
                                 "t_collapse": T_COLLAPSE_FACTOR * f["concentration"],
                                 "confirm_max_clean_match": clean_match_limit(f["clean_match"])}
    if not per_target:
        raise SelfCalibrationError(
            "self-calibration: no reference backdoor was reached on any target ("
            + "; ".join(f"{', '.join(t for t in unverified if unverified[t] == w)}: {w}"
                        for w in dict.fromkeys(unverified.values()))
            + "); no trustworthy verdict without a preset (see `lmsan calibrate`)", model_dir)
    values: dict[str, Any] = {**BASE_VALUES, "lr0": max(lr0s), "confirm": True,
                              "prompt_init": prompt_init,
                              "per_target": per_target,
                              "t_l": min(v["t_l"] for v in per_target.values()),
                              "t_collapse": max(v["t_collapse"] for v in per_target.values())}
    return SelfCalibration(implants=implants, values=values, seconds=time.perf_counter() - t0,
                           unverified=unverified)


__all__ = ["IMPLANTS", "T_COLLAPSE_FACTOR", "T_L_FRACTION", "SelfCalibration",
           "SelfCalibrationError", "self_calibrate"]
