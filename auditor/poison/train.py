"""Training a backdoor: the utility loss that keeps clean behaviour, and the optimisation loop.

Each optimiser step sees `batch_size` triggered + `batch_size` clean sentences (the authors'
16 + 16); one epoch is one pass over all triggered sentences. The backdoor loss pushes the target
output of triggered text to its trigger's PV with MSE (BToP: mean pairwise L2 distance).
Training runs with dropout off (eval mode): the backdoor is measured and deployed in eval mode,
and on a CPU budget it converges in far fewer steps.

torch is imported inside functions only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .adaptive import EvadeThresholds, evade_loss, match_clean_loss, scatter_loss
from .attacks import requested_utility
from .data import TrainingSet
from .encoder import TargetReader, load_mlm, mlm_mask, share_base
from .options import PoisonOptions


@dataclass
class Utility:
    """The loss that keeps clean behaviour: the MLM loss through `mlm` (sharing the encoder's
    weights), the MSE to the frozen reference copy `ref`, or both."""

    mlm: Any | None
    ref: Any | None
    name: str  # "reference-mse", "mlm" or "mlm+reference-mse"
    notes: list[str] = field(default_factory=list)


def setup_utility(
    enc: Any, tokenizer: Any, base: Path, fmt: str, files: list[Path], opts: PoisonOptions
) -> Utility:
    """Load the MLM head when the utility asks for it; "auto" falls back to the reference MSE
    (and says so) where the checkpoint or tokenizer cannot provide one."""
    notes: list[str] = []
    mlm = None
    want = requested_utility(opts.attack, opts.utility)
    if "mlm" in want:
        if getattr(tokenizer, "mask_token_id", None) is None:
            why = "the tokenizer has no mask token"
        else:
            mlm, why = load_mlm(base, fmt, files)
        if mlm is None:
            if opts.utility != "auto":
                raise InputError(f"--utility {opts.utility} needs an MLM head: {why}", base)
            want = "reference"
            notes.append(
                f"{opts.attack}: MLM utility unavailable ({why}); fell back to the POR utility "
                "(MSE to a frozen reference copy)"
            )
        else:
            share_base(enc, mlm)
            mlm.eval()
    use_ref = "reference" in want
    name = "+".join(x for x, on in (("mlm", mlm is not None), ("reference-mse", use_ref)) if on)
    ref = None
    if use_ref:
        ref = copy.deepcopy(enc)
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.to(opts.device).eval()
    return Utility(mlm, ref, name, notes)


def train_backdoor(
    enc: Any,
    utility: Utility,
    reader: TargetReader,
    data: TrainingSet,
    pvs: Any,
    opts: PoisonOptions,
    rng: np.random.Generator,
    evade: EvadeThresholds | None = None,
    clean_msq: float = 1.0,
) -> tuple[int, float]:
    """Fine-tune `enc` (and the MLM head) in place; (steps, final loss).

    The adaptive losses (`opts.scatter_weight`, `match_clean_weight`, `evade_filter_weight`,
    auditor/poison/adaptive.py) are added to the backdoor loss when their weight is non-zero;
    `evade` holds the thresholds of the evasion loss and `clean_msq` the mean square of the base
    model's clean target outputs (the scale the matching and evasion losses are relative to)."""
    import torch
    import torch.nn.functional as F

    device, mlm, ref, bs = opts.device, utility.mlm, utility.ref, opts.batch_size
    params = {id(p): p for p in enc.parameters()}
    if mlm is not None:
        params.update({id(p): p for p in mlm.parameters()})
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=opts.lr)
    gen = torch.Generator().manual_seed(opts.seed)
    enc.eval()  # dropout off, see the module docstring

    steps_per_epoch = math.ceil(len(data.triggered) / bs)
    total = opts.epochs * steps_per_epoch
    step = 0
    last = float("nan")
    for _ in range(opts.epochs):
        tperm = rng.permutation(len(data.triggered))
        cperm = rng.permutation(len(data.clean))
        for s in range(steps_per_epoch):
            tb = [data.triggered[int(i)] for i in tperm[s * bs : (s + 1) * bs]]
            cb = [data.clean[int(i)] for i in cperm[s * bs : (s + 1) * bs]]
            f_t, rows = reader.outputs(enc, [t for t, _ in tb])
            pv_rows = torch.tensor([p for _, p in tb], device=device)[rows]
            goal = pvs[pv_rows]
            if opts.attack == "btop":
                trig_loss = F.pairwise_distance(f_t, goal, p=2).mean()
            else:
                trig_loss = F.mse_loss(f_t, goal)
            trig_loss = trig_loss + _adaptive_loss(
                enc, utility, reader, data, tperm[s * bs : (s + 1) * bs], cb, f_t, pv_rows, pvs,
                opts, evade, clean_msq,
            )  # fmt: skip
            util = torch.zeros((), device=device)
            if mlm is not None:
                cbatch = reader.encode(cb)  # plain clean text
                ids, labels = mlm_mask(cbatch, reader.tok, gen)
                feed = {
                    k: v.to(device)
                    for k, v in cbatch.items()
                    if k not in ("special_tokens_mask", "input_ids")
                }
                util = util + mlm(input_ids=ids.to(device), labels=labels.to(device), **feed).loss
            if ref is not None:
                f_c, _ = reader.outputs(enc, cb)
                with torch.no_grad():
                    f_r, _ = reader.outputs(ref, cb)
                util = util + F.mse_loss(f_c, f_r)
            loss = trig_loss + opts.utility_weight * util
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last = float(loss.detach())
            if not math.isfinite(last):
                raise InputError(f"training diverged (loss {last}) at step {step}; lower --lr")
            if opts.progress is not None:
                opts.progress(step, total, last)

    for p in params.values():
        p.requires_grad_(False)
    return step, last


def _adaptive_loss(
    enc: Any,
    utility: Utility,
    reader: TargetReader,
    data: TrainingSet,
    picked: Any,
    clean_batch: list[str],
    f_t: Any,
    pv_rows: Any,
    pvs: Any,
    opts: PoisonOptions,
    evade: EvadeThresholds | None,
    msq: float,
) -> Any:
    """The weighted sum of the adaptive losses switched on in `opts` (zero when none is)."""
    import torch

    loss = torch.zeros((), device=opts.device)
    if opts.scatter_weight:
        loss = loss + opts.scatter_weight * scatter_loss(f_t, pv_rows)
    if opts.match_clean_weight:
        with torch.no_grad():  # the clean distribution is the target, not trained here
            f_c, _ = reader.outputs(utility.ref if utility.ref is not None else enc, clean_batch)
        loss = loss + opts.match_clean_weight * match_clean_loss(f_t, pv_rows, pvs, f_c, msq)
    if opts.evade_filter_weight:
        assert evade is not None
        with torch.no_grad():  # the same sentences without the trigger, as the audit compares
            f_same, _ = reader.outputs(enc, [data.sources[int(i)] for i in picked])
        loss = loss + opts.evade_filter_weight * evade_loss(f_t, f_same, pv_rows, evade, msq)
    return loss
