"""Training a task model: only the prompt/prefix module and the head are trained (Adam), on a
frozen backbone in eval mode."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .data import Example, TaskData, load_task, subsample
from .encode import Batch, encode_records, mask_token_of
from .metrics import evaluate_clean
from .model import (
    HEAD_POSITIONS,
    METHODS,
    REPARAMS,
    TaskModelHandle,
    build_task_model,
    load_backbone,
)
from .store import save_task_model

ProgressFn = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass
class TrainConfig:
    method: str = "ptuning"
    reparam: str = "mlp"  # P-tuning only: "mlp" (PromptEncoder) or "none" (PromptEmbedding)
    prompt_length: int = 16
    prefix_projection: bool = False  # P-tuning v2: reparametrise the prefix with an MLP
    epochs: int = 3
    lr: float = 5e-3
    head_lr: float = 5e-3
    batch_size: int = 16
    max_length: int = 128  # training only: longer inputs are truncated
    seed: int = 0
    train_limit: int | None = None
    encoder_hidden_size: int = 128
    prefix_init_std: float | None = (
        None  # P-tuning v2: N(0, std) prefix init (None: peft's N(0, 1))
    )
    target: str = "cls"  # sequence tasks: "cls" or "mask" (the [MASK] of the monitor's template)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.reparam not in REPARAMS:
            raise InputError(f"unknown reparametrisation {self.reparam!r}; choose mlp or none")
        for name in ("prompt_length", "epochs", "batch_size", "encoder_hidden_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1")
        if self.max_length < 8:
            raise InputError("max_length must be at least 8")
        if self.prefix_init_std is not None and not self.prefix_init_std > 0:
            raise InputError("prefix_init_std must be positive")
        if not (self.lr > 0 and self.head_lr > 0):
            raise InputError("learning rates must be positive")
        if self.target not in HEAD_POSITIONS:
            raise InputError(f"unknown target {self.target!r}; choose one of {', '.join(HEAD_POSITIONS)}")


def _peft_config(cfg: TrainConfig, backbone: Any) -> Any:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    bc = backbone.config
    emb = int(backbone.get_input_embeddings().weight.shape[1])
    common: dict[str, Any] = {
        "num_virtual_tokens": cfg.prompt_length,
        "token_dim": emb,
        "num_transformer_submodules": 1,
        "num_attention_heads": int(bc.num_attention_heads),
        "num_layers": int(bc.num_hidden_layers),
    }
    if cfg.method == "ptuning":
        if cfg.reparam == "mlp":
            return PromptEncoderConfig(
                **common,
                encoder_reparameterization_type="MLP",
                encoder_hidden_size=cfg.encoder_hidden_size,
            )
        return PromptTuningConfig(**common, prompt_tuning_init="RANDOM")
    if emb != int(bc.hidden_size):
        raise InputError("P-tuning v2 needs embedding width == hidden size (factorised embeddings)")
    return PrefixTuningConfig(
        **common,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def _batches(n: int, size: int, rng: random.Random | None) -> list[list[int]]:
    idx = list(range(n))
    if rng is not None:
        rng.shuffle(idx)
    return [idx[i : i + size] for i in range(0, n, size)]


def _token_targets(batch: Batch, rows: Sequence[Example], shift: int, width: int) -> np.ndarray:
    """Labels [B, width] for a token task (-100 = ignored): tag of each word at its first
    sub-token, shifted by the prompt length (the prompt sits after [CLS])."""
    y = np.full((len(rows), width), -100, dtype=np.int64)
    for b, (ex, starts) in enumerate(zip(rows, batch.word_starts, strict=True)):
        assert ex.tags is not None
        for w, t in enumerate(starts):
            if 0 <= t and w < len(ex.tags):
                y[b, t + shift if t >= 1 else t] = ex.tags[w]
    return y


def _truncate(batch: Batch, max_length: int, keep_tail: bool = False) -> Batch:
    """Cut rows to ``max_length`` tokens. ``keep_tail`` (target mask): keep each long row's last
    two tokens ([MASK] [SEP]) after its truncated text, so the head's position survives."""
    if batch.ids.shape[1] <= max_length:
        return batch
    ids = batch.ids[:, :max_length].copy()
    mask = batch.mask[:, :max_length].copy()
    pos = list(batch.target_pos)
    if keep_tail:
        lengths = batch.mask.sum(1)
        for b, n in enumerate(lengths.tolist()):
            if n > max_length:
                ids[b, max_length - 2 :] = batch.ids[b, n - 2 : n]
                pos[b] = pos[b] - (n - max_length)
    return Batch(ids, mask, [[t if t < max_length else -1 for t in s] for s in batch.word_starts],
                 pos)


def train_task_model(
    backbone_dir: str | Path,
    data: TaskData,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> TaskModelHandle:
    """Train a P-tuning / P-tuning v2 model of ``data`` on the frozen backbone at
    ``backbone_dir``. Returns the handle; save it with :func:`save_task_model`."""
    import torch
    from peft import PeftType

    cfg = config or TrainConfig()
    cfg.validate()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    backbone, tok, digest, pad = load_backbone(backbone_dir)
    pcfg = _peft_config(cfg, backbone)
    init = None
    if cfg.method == "ptuning":
        # initialise the prompt from random vocabulary rows (the prompt lies in the embedding
        # range from the start, as in P-tuning's and the PV miner's initialisation)
        table = backbone.get_input_embeddings().weight.detach()
        g = torch.Generator().manual_seed(cfg.seed)
        init = table[torch.randint(0, table.shape[0], (cfg.prompt_length,), generator=g)].clone()
        if pcfg.peft_type == PeftType.P_TUNING:
            init = None  # the MLP maps its own embedding; keep peft's init
    if cfg.target == "mask" and data.kind != "sequence":
        raise InputError("target 'mask' is for sentence and pair tasks, not token tasks")
    mtok = mask_token_of(tok) if cfg.target == "mask" else None
    module = build_task_model(backbone, cfg.method, len(data.labels), data.kind, pcfg, init)
    if cfg.method == "ptuning-v2" and cfg.prefix_init_std is not None:
        with torch.no_grad():
            module.prompt_module.embedding.weight.normal_(0.0, cfg.prefix_init_std)
    params = [
        {"params": list(module.prompt_module.parameters()), "lr": cfg.lr},
        {"params": list(module.head.parameters()), "lr": cfg.head_lr},
    ]
    opt = torch.optim.Adam(params)
    train = subsample(data.train, cfg.train_limit, cfg.seed)
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    step = 0
    losses: list[float] = []
    module.train()
    for _ in range(cfg.epochs):
        for rows_idx in _batches(len(train), cfg.batch_size, rng):
            rows = [train[i] for i in rows_idx]
            b = _truncate(encode_records(tok, [r.texts for r in rows], pad, mtok),
                          cfg.max_length, keep_tail=mtok is not None)
            ids = torch.from_numpy(b.ids)
            mask = torch.from_numpy(b.mask)
            logits = module(ids, mask, torch.tensor(b.target_pos, dtype=torch.long))
            if data.kind == "sequence":
                y = torch.tensor([r.label for r in rows], dtype=torch.long)
                loss = torch.nn.functional.cross_entropy(logits, y)
            else:
                y = torch.from_numpy(
                    _token_targets(b, rows, module.prompt_len_in_sequence(), logits.shape[1])
                )
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, total, losses[-1])
    module.eval()
    info = {
        "config": asdict(cfg),
        "train_examples": len(train),
        "steps": step,
        "final_loss": float(np.mean(losses[-max(1, steps_per_epoch // 4) :])) if losses else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "peft_type": str(pcfg.peft_type.value),
    }
    return TaskModelHandle(
        module,
        tok,
        data.name,
        data.kind,
        list(data.labels),
        cfg.method,
        Path(backbone_dir),
        digest,
        pad,
        info,
        cfg.target,
    )


@dataclass
class TrainedTask:
    """A task model trained, saved and scored (what ``lmsan tune train`` reports)."""

    path: Path
    handle: TaskModelHandle
    kind: str  # the task's kind: "sequence" | "tokens"
    score: float  # on the test split, percent: accuracy (sequence) or entity span F1 (tokens)


def train_task_folder(
    backbone_dir: str | Path,
    task: str,
    data_dir: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    force: bool = False,
    threads: int = 0,
    progress: Callable[[], AbstractContextManager[ProgressFn | None]] | None = None,
) -> TrainedTask:
    """Train a task model of ``task`` (read from ``data_dir`` with the config's seed) on the
    backbone, save it to the task folder ``out`` and score it on the task's test split.

    ``threads`` > 0 sets torch's CPU threads. ``progress`` opens the context of the training
    steps (a progress bar) and yields the per-step callback; it is entered after the inputs are
    checked and the data is read, and left before the model is saved."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    config.validate()
    out_dir = Path(out)
    if out_dir.exists() and out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError("output folder is not empty (pass --force to replace it)", out_dir)
    data = load_task(task, data_dir, seed=config.seed)
    with progress() if progress is not None else nullcontext(None) as step:
        handle = train_task_model(backbone_dir, data, config, progress=step)
    save_task_model(handle, out_dir, force=force)
    score = evaluate_clean(handle, data.test)
    return TrainedTask(out_dir, handle, data.kind, score)
