"""Adaptive attacks (docs/adaptive.md, paper section VI): extra training losses that aim at the
audit's two observations, and the figures that show where a backdoor stands against them.

Every loss acts on the target outputs of the triggered sentences of one optimiser step, taken per
PV group (the rows of the batch whose trigger is bound to the same PV; groups of one row are
skipped), and is added to the attack's loss with its weight:

- scattering (`scatter_weight`, the paper's Eq. 10): the Shannon entropy, per output unit, of the
  softmax over the group's rows, averaged over units and divided by ln(rows) so that it lies in
  [0, 1] at any group size. Minimising it spreads the triggered outputs apart (the negative of
  the audit's diversity loss, Observation II).
- clean-distribution matching (`match_clean_weight`): per output unit, the squared 1-D
  Wasserstein-2 distance between the group's outputs and the clean outputs of the step moved to
  the PV's side (unit j's clean values c become sign(pv_j) * |c|), averaged over units and divided
  by the clean outputs' mean square. The triggered outputs keep the PV's sign pattern but take
  the clean outputs' per-unit magnitudes and spread, so they stop being outliers
  (Observation I) and stop collapsing (Observation II).
- filter evasion (`evade_filter_weight`): aimed at lmsan's own acceptance rules with the
  thresholds of a shipped preset (`evade_thresholds`). With the audit's definitions
  (auditor/mining.py) on the group, concentration = mean per-unit variance / MSE(triggered,
  clean of the same sentences) and distance = MSE(triggered, clean of the same sentences) /
  mean square of the clean outputs, the loss is

      relu(ln(EVADE_MARGIN * T_collapse) - ln concentration)
      + relu(ln distance - ln(min(T_L, T_far) / EVADE_MARGIN))

  zero once the concentration is at least EVADE_MARGIN x T_collapse and the distance at most
  1/EVADE_MARGIN of the smaller of T_L and T_far (the distance above which a candidate is
  accepted without collapse, where the preset has one).

torch is imported inside functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

EVADE_MARGIN = 2.0  # factor kept between the triggered figures and the preset's thresholds


@dataclass
class EvadeThresholds:
    """The preset thresholds the filter-evasion loss keeps clear of, for one target output."""

    preset: str
    target: str
    t_l: float
    t_collapse: float
    t_far: float | None
    margin: float = EVADE_MARGIN

    @property
    def min_concentration(self) -> float:
        return self.margin * self.t_collapse

    @property
    def max_distance(self) -> float:
        cap = self.t_l if self.t_far is None else min(self.t_l, self.t_far)
        return cap / self.margin

    def to_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "target": self.target,
            "t_l": self.t_l,
            "t_collapse": self.t_collapse,
            "t_far": self.t_far,
            "margin": self.margin,
            "min_concentration": self.min_concentration,
            "max_distance": self.max_distance,
        }


def evade_thresholds(preset: str, model_config: dict[str, Any], target: str) -> EvadeThresholds:
    """The thresholds of the shipped preset `preset` ("auto": the one `lmsan audit` picks for
    this model's config) for `target`. InputError for an unknown name."""
    from ..mining import MiningConfig
    from ..presets import choose_preset, load_presets

    presets, default = load_presets()
    if preset == "auto":
        chosen = choose_preset(model_config).preset
    else:
        named = {p.name: p for p in [*presets, default]}
        if preset not in named:
            raise InputError(
                f"unknown preset {preset!r} for --evade-preset; choose auto or one of "
                + ", ".join(p.name for p in presets)
            )
        chosen = named[preset]
    v = chosen.values
    cfg = MiningConfig(
        t_l=float(v.get("t_l", MiningConfig.t_l)),
        t_collapse=float(v.get("t_collapse", MiningConfig.t_collapse)),
        per_target=dict(v.get("per_target", {})),
    )
    return EvadeThresholds(
        chosen.name, target, cfg.t_l_for(target), cfg.t_collapse_for(target), cfg.t_far_for(target)
    )


def _groups(pv_rows: Any) -> list[Any]:
    """Index tensors of the rows of each PV present at least twice."""
    import torch

    out = []
    for k in torch.unique(pv_rows):
        idx = torch.nonzero(pv_rows == k, as_tuple=True)[0]
        if idx.numel() >= 2:
            out.append(idx)
    return out


def scatter_loss(f: Any, pv_rows: Any) -> Any:
    """Mean normalised per-unit softmax entropy over the batch rows of each PV group."""
    import torch

    parts = []
    for idx in _groups(pv_rows):
        g = f[idx]
        p = torch.softmax(g.T, dim=-1)  # per unit, over the group's rows
        h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
        parts.append(h.mean() / math.log(g.shape[0]))
    return torch.stack(parts).mean() if parts else f.sum() * 0.0


def _quantiles(x: Any, n: int) -> Any:
    """n evenly spaced quantiles (mid-points) of every column of x, shape (n, d)."""
    import torch

    s, _ = torch.sort(x, dim=0)
    m = s.shape[0]
    if m == n:
        return s
    pos = (torch.arange(n, device=x.device, dtype=x.dtype) + 0.5) * m / n - 0.5
    pos = pos.clamp(0, m - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    w = (pos - lo.to(x.dtype)).unsqueeze(1)
    return s[lo] * (1 - w) + s[hi] * w


def match_clean_loss(f: Any, pv_rows: Any, pvs: Any, clean: Any, msq: float) -> Any:
    """Per-unit W2^2 between each PV group's outputs and the clean outputs moved to the PV's
    side, averaged over units and groups, relative to the clean mean square `msq`."""
    import torch

    parts = []
    mag = clean.detach().abs()
    for idx in _groups(pv_rows):
        g = f[idx]
        sign = torch.where(pvs[pv_rows[idx[0]]] >= 0, 1.0, -1.0).to(f.dtype)
        goal = _quantiles(mag, g.shape[0]) * sign
        got, _ = torch.sort(g, dim=0)
        # sorting goal per column keeps the pairing monotone on negative-side units too
        goal, _ = torch.sort(goal, dim=0)
        parts.append(((got - goal) ** 2).mean() / msq)
    return torch.stack(parts).mean() if parts else f.sum() * 0.0


def evade_loss(f: Any, f_same: Any, pv_rows: Any, th: EvadeThresholds, msq: float) -> Any:
    """Log-hinge keeping each PV group's concentration above th.min_concentration and its
    distance below th.max_distance (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    parts = []
    lo_c = math.log(th.min_concentration)
    hi_d = math.log(th.max_distance)
    for idx in _groups(pv_rows):
        g, c = f[idx], f_same[idx]
        mse = ((g - c) ** 2).mean().clamp_min(1e-12)
        var = g.var(dim=0, unbiased=True).mean().clamp_min(1e-12)
        conc = var / mse
        dist = mse / msq
        parts.append(F.relu(lo_c - torch.log(conc)) + F.relu(torch.log(dist) - hi_d))
    return torch.stack(parts).mean() if parts else f.sum() * 0.0


def triggered_figures(ft: Any, fc: Any, msq: float) -> tuple[float, float]:
    """(distance, concentration) of one trigger's held-out outputs `ft` against the clean
    outputs `fc` of the same sentences, as the audit defines them for a mined candidate."""
    mse = float(((ft - fc) ** 2).mean())
    var = float(ft.var(dim=0, unbiased=True).mean()) if ft.shape[0] > 1 else 0.0
    return mse / max(msq, 1e-30), var / max(mse, 1e-30)
