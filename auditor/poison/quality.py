"""Measuring an implanted backdoor on held-out sentences (never trained on).

success = share of triggered held-out inputs whose target output agrees in sign with its PV on
>= 80% of dimensions (tokens: share of ordinary tokens); targetability (ASR_target) = the same
share counted only over the sentences whose clean output is not on that PV already (as an attack
success rate counts only inputs not already of the target class; tokens: equal to success);
moved (the untargeted attack success, ASR) = share of triggered held-out inputs whose target
output agrees in sign with the clean output of the same sentence on < 80% of dimensions;
fidelity = mean cosine similarity of clean held-out target outputs to the base model's; clean
match rate = share of clean held-out outputs that match some PV. Per trigger, the triggered
outputs' distance and concentration as the audit defines them for a mined candidate
(adaptive.triggered_figures). The tokens target pairs no triggered output with a clean one:
there `moved`, distance and concentration are None.

torch is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from .adaptive import triggered_figures
from .attacks import MATCH_FRACTION
from .data import TriggerSet, insert_trigger
from .encoder import TargetReader, agreement

PROBE_SENTENCES = 8  # held-out sentences that compare the saved model with the trained one


@dataclass
class Quality:
    success: float
    success_per_trigger: dict[str, float]
    fidelity: float
    clean_match_rate: float
    min_success: float
    passed: bool
    moved: float | None = None  # untargeted attack success (ASR), None for the tokens target
    targetability: float | None = None  # ASR_target: success over inputs not on the PV when clean
    # per trigger: {"distance": ..., "concentration": ...} (None for the tokens target)
    figures: dict[str, dict[str, float]] | None = None

    def detector_view(self) -> dict[str, float] | None:
        """The triggered outputs' distance (mean) and concentration (min) over the triggers."""
        if not self.figures:
            return None
        return {
            "distance": float(np.mean([f["distance"] for f in self.figures.values()])),
            "concentration": float(min(f["concentration"] for f in self.figures.values())),
        }

    def notes(self) -> list[str]:
        """What a user must know about this backdoor: clean inputs that fire it, low success."""
        out = []
        if self.clean_match_rate > 0.1:
            out.append(
                f"{self.clean_match_rate:.0%} of clean held-out inputs also match a PV: the "
                "utility loss did not keep clean outputs apart (try --utility mlm+reference)"
            )
        if not self.passed:
            out.append(
                f"attack success {self.success:.3f} is below --min-success {self.min_success}: "
                "this folder holds a weak backdoor"
            )
        return out


def check_reload(
    reader: TargetReader,
    trained: Any,
    reloaded: Any,
    held_out: Sequence[str],
    pv_scale: float,
    folder: Path,
) -> None:
    """FormatError when the model read back from `folder` does not reproduce the trained one."""
    import torch

    with torch.no_grad():
        probe = list(held_out[: min(PROBE_SENTENCES, len(held_out))])
        gap = float((reader.collect(trained, probe) - reader.collect(reloaded, probe)).abs().max())
    if gap > 1e-3 * (1.0 + float(pv_scale)):
        raise FormatError(
            f"the saved model does not reproduce the trained one (max output gap {gap:.3g})",
            folder,
        )


def measure_quality(
    reader: TargetReader,
    poisoned: Any,
    held_out: Sequence[str],
    base_clean: Any,
    triggers: TriggerSet,
    pvs: Any,
    seed: int,
    min_success: float,
) -> Quality:
    """Success per trigger, fidelity and clean match rate of `poisoned` on the held-out
    sentences; `base_clean` holds the base model's target outputs of the same sentences."""
    import torch
    import torch.nn.functional as F

    erng = np.random.default_rng(seed + 1)
    per: dict[str, float] = {}
    hits = 0
    count = 0
    paired = reader.target != "tokens"
    moved = 0
    eligible = 0
    flipped = 0
    figures: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        fc = reader.collect(poisoned, list(held_out))
        msq = float((fc.double() ** 2).mean())
        for t, k in zip(triggers.texts, triggers.pv, strict=True):
            ft = reader.collect(poisoned, [insert_trigger(s, t, erng) for s in held_out])
            ok = agreement(ft, pvs[k : k + 1])[:, 0] >= MATCH_FRACTION
            per[t] = float(ok.float().mean())
            hits += int(ok.sum())
            count += int(ok.numel())
            if paired:
                off = agreement(fc, pvs[k : k + 1])[:, 0] < MATCH_FRACTION
                eligible += int(off.sum())
                flipped += int((ok & off).sum())
                same = ((ft >= 0) == (fc >= 0)).float().mean(1)
                moved += int((same < MATCH_FRACTION).sum())
                dist, conc = triggered_figures(ft, fc, msq)
                figures[t] = {"distance": dist, "concentration": conc}
        fidelity = float(F.cosine_similarity(fc, base_clean, dim=1).mean())
        clean_match = float((agreement(fc, pvs).max(1).values >= MATCH_FRACTION).float().mean())
    success = hits / max(count, 1)
    return Quality(
        success, per, fidelity, clean_match, min_success, success >= min_success,
        moved=moved / max(count, 1) if paired else None, figures=figures if paired else None,
        targetability=(flipped / max(eligible, 1)) if paired else success,
    )  # fmt: skip
