"""The options of one poisoning run, their defaults and their validation. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..corpus import Corpus
from ..errors import InputError
from ..pvset import TARGETS
from .attacks import ALLOWED_TARGETS, ATTACKS, DEFAULT_TARGET, PV_DESIGNS, UTILITIES
from .data import TRIGGER_KINDS

# Library defaults (the CLI uses the same). Chosen so that POR with the six paper triggers
# reaches success >= 0.9 on all-MiniLM-L6-v2 in a few CPU minutes; see the benchmark notes.
DEFAULT_SENTENCES_PER_TRIGGER = 256
DEFAULT_EPOCHS = 2
DEFAULT_LR = 1e-4

ProgressFn = Callable[[int, int, float], None]


@dataclass
class PoisonOptions:
    """Everything `poison_model` takes besides the two folders (see its docstring)."""

    attack: str = "por"
    triggers: Sequence[str] | None = None
    random_triggers: int = 0
    trigger_kind: str = "word"
    pv_design: str = "quarters"
    n_pvs: int | None = None
    pv_scale: float = 1.0
    corpus: str | Path | Corpus | None = None
    sentences_per_trigger: int = DEFAULT_SENTENCES_PER_TRIGGER
    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    max_length: int = 64
    target: str | None = None
    min_success: float = 0.9
    progress: ProgressFn | None = None
    force: bool = False
    allow_pickle: bool = False
    utility: str = "auto"
    utility_weight: float = 1.0
    # adaptive attacks (auditor/poison/adaptive.py, docs/adaptive.md); 0 = off
    scatter_weight: float = 0.0
    match_clean_weight: float = 0.0
    evade_filter_weight: float = 0.0
    evade_preset: str = "auto"  # shipped preset whose thresholds the evasion loss reads

    def adaptive(self) -> bool:
        return bool(self.scatter_weight or self.match_clean_weight or self.evade_filter_weight)

    def resolved_target(self) -> str:
        """Check every option that needs no model; the target output the attack aims at."""
        attack = self.attack
        if attack not in ATTACKS:
            raise InputError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
        t = self.target or DEFAULT_TARGET[attack]
        if t not in TARGETS:
            raise InputError(f"unknown target {t!r}; choose one of {', '.join(TARGETS)}")
        if t not in ALLOWED_TARGETS[attack]:
            raise InputError(
                f"--target {t} does not apply to --attack {attack}; allowed: "
                + ", ".join(ALLOWED_TARGETS[attack])
            )
        if self.utility not in UTILITIES:
            raise InputError(
                f"unknown utility {self.utility!r}; choose one of {', '.join(UTILITIES)}"
            )
        if self.pv_design not in PV_DESIGNS:
            raise InputError(
                f"unknown PV design {self.pv_design!r}; choose one of {', '.join(PV_DESIGNS)}"
            )
        if self.trigger_kind not in TRIGGER_KINDS:
            raise InputError(
                f"unknown trigger kind {self.trigger_kind!r}; "
                f"choose one of {', '.join(TRIGGER_KINDS)}"
            )
        n_pvs, scale, lr, min_success = self.n_pvs, self.pv_scale, self.lr, self.min_success
        checks = [
            (n_pvs is None or n_pvs >= 1, f"--n-pvs must be at least 1 (got {n_pvs})"),
            (scale > 0 and math.isfinite(scale), f"--pv-scale must be positive (got {scale})"),
            (self.sentences_per_trigger >= 1, "--sentences-per-trigger must be at least 1"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (lr > 0 and math.isfinite(lr), f"--lr must be positive (got {lr})"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.max_length >= 8, "--max-length must be at least 8"),
            (0.0 <= min_success <= 1.0, f"--min-success must lie in [0, 1] (got {min_success})"),
            (self.random_triggers >= 0, "--random-triggers must not be negative"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)
        for flag, w in (
            ("--utility-weight", self.utility_weight),
            ("--scatter-weight", self.scatter_weight),
            ("--match-clean-weight", self.match_clean_weight),
            ("--evade-filter-weight", self.evade_filter_weight),
        ):
            if not (math.isfinite(w) and w >= 0):
                raise InputError(f"{flag} must be a non-negative number (got {w})")
        if self.evade_preset != "auto":
            from ..presets import load_presets

            presets, default = load_presets()
            names = [p.name for p in presets]
            if self.evade_preset not in [*names, default.name]:
                raise InputError(
                    f"unknown preset {self.evade_preset!r} for --evade-preset; choose auto or "
                    "one of " + ", ".join(names)
                )
        if self.evade_filter_weight and t == "tokens":
            raise InputError(
                "--evade-filter-weight reads each triggered output against the clean output of "
                "the same sentence, which the tokens target does not pair; use cls, pooler or mask"
            )
        return t
