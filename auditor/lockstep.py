"""Seeds trained together (mining.py): each seed's training state, and the forward pass that
runs the rows of several seeds' batches sorted by length in chunks.

On a CPU the cost of a step is the tokens it computes, padding included. Sorting the rows of a
step (32 per seed, of every seed in the pass) by length and padding each chunk only to its own
longest row computes little padding; rows never interact and padding is masked, so each row's
output is the one it gets alone up to float rounding. torch is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Training:
    """What one seed's training loop leaves: the final prompt and the per-epoch distances."""

    prompt: torch.Tensor
    epoch_distance: dict[str, list[float]]
    last_batch: dict[str, torch.Tensor] = field(default_factory=dict)  # last prompted outputs
    steps: int = 0
    epochs_run: int = 0
    aborted: bool = False
    dropped_at: int | None = None  # step at which the learning-rate boost ended
    decided_early: bool = False  # stopped at the check epoch with a candidate that passes rules 1-3
    figures: dict[str, dict[str, Any]] | None = None  # its evaluation at that epoch


@dataclass
class Out:
    """The two outputs mining reads from a forward pass."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None

    @staticmethod
    def of(out: Any) -> Out:
        return Out(out.last_hidden_state, getattr(out, "pooler_output", None))


@dataclass
class SeedState:
    """One seed's training state within a pass."""

    seed: int
    rng: np.random.Generator
    prompt: torch.nn.Parameter
    opt: torch.optim.Adam
    tr: Training
    perm: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sums: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def start(seed: int, init: torch.Tensor, rng: np.random.Generator, lr: float,
              targets: list[str]) -> SeedState:
        prompt = torch.nn.Parameter(init)
        opt = torch.optim.Adam([prompt], lr=lr)
        tr = Training(prompt=prompt.detach(), epoch_distance={t: [] for t in targets})
        return SeedState(seed, rng, prompt, opt, tr)

    def step(self, t_grad: float, lr0: float) -> None:
        """The adaptive learning rate (the boost of the first steps ends once a gradient entry
        exceeds `t_grad`; `lr0` from then on), then one Adam step."""
        grad = self.prompt.grad
        assert grad is not None
        if self.tr.dropped_at is None and float(grad.abs().max()) > t_grad:
            self.tr.dropped_at = self.tr.steps
            for g in self.opt.param_groups:
                g["lr"] = lr0
        self.opt.step()
        self.tr.steps += 1


def run_rows(model: Any, embs: list[torch.Tensor], masks: list[torch.Tensor],
         chunk_rows: int | None) -> list[Out]:
    """The model over every row of `embs` (one [B, T_i, d] tensor per seed): rows are sorted
    by length and run `chunk_rows` at a time, each chunk padded only to its own longest row,
    then put back in place. Rows never interact and padding is masked, so each row's output
    is its unbatched output up to float rounding; what changes is the padding computed."""
    if not chunk_rows:
        return [Out.of(model(inputs_embeds=e, attention_mask=m)) for e, m in zip(embs, masks, strict=True)]
    width = max(e.shape[1] for e in embs)
    big_e = torch.cat([F.pad(e, (0, 0, 0, width - e.shape[1])) for e in embs])
    big_m = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
    lens = big_m.sum(1)
    order = torch.argsort(lens, stable=True)
    hs, pool = [], []
    for k in range(0, len(order), chunk_rows):
        sel = order[k : k + chunk_rows]
        n = int(lens[sel].max())
        o = Out.of(model(inputs_embeds=big_e[sel, :n], attention_mask=big_m[sel, :n]))
        hs.append(F.pad(o.last_hidden_state, (0, 0, 0, width - n)))
        if o.pooler_output is not None:
            pool.append(o.pooler_output)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    all_hs = torch.cat(hs)[inv]
    all_pool = torch.cat(pool)[inv] if pool else None
    outs, a = [], 0
    for e in embs:
        b = a + e.shape[0]
        outs.append(Out(all_hs[a:b, : e.shape[1]], None if all_pool is None else all_pool[a:b]))
        a = b
    return outs

