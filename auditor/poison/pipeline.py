"""`poison_model`: one poisoning run, from the base folder to the written poisoned folder.

The output folder is built in a temporary sibling (`fsutil.staged_dir`): the trained weights in
the base's key layout, the base's tokenizer and config files, and backdoor.json. The saved model
is reloaded with `modelio.load_encoder`, checked against the trained weights and measured before
the folder replaces OUT_DIR.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus import Corpus
from ..errors import InputError
from ..fsutil import atomic_write_json, staged_dir
from .adaptive import evade_thresholds
from .attacks import make_pvs
from .backdoor import BACKDOOR_FILE, BaseModel, backdoor_record, validate_backdoor
from .checkpoint import check_out_dir, weights_digest, write_model
from .data import build_training_set, choose_triggers, load_sentences, trigger_token_ids
from .encoder import TargetReader
from .options import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_SENTENCES_PER_TRIGGER,
    PoisonOptions,
    ProgressFn,
)
from .quality import check_reload, measure_quality
from .train import setup_utility, train_backdoor


@dataclass
class PoisonResult:
    out_dir: Path
    attack: str
    target: str
    utility: str  # "reference-mse", "mlm" or "mlm+reference-mse"
    triggers: list[str]
    trigger_pv: list[int]  # PV index of each trigger
    pvs: np.ndarray  # (n_pvs, d) float32
    success: float
    success_per_trigger: dict[str, float]
    fidelity: float
    clean_match_rate: float  # share of clean held-out outputs that match some PV
    moved: float | None  # untargeted attack success (None for the tokens target)
    targetability: float | None  # success over inputs whose clean output is not on the PV
    triggered_figures: dict[str, dict[str, float]] | None  # per trigger: distance, concentration
    min_success: float
    passed: bool
    steps: int
    final_loss: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    backdoor: dict[str, Any] = field(default_factory=dict)


def poison_model(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    attack: str = "por",
    triggers: Sequence[str] | None = None,
    random_triggers: int = 0,
    trigger_kind: str = "word",
    pv_design: str = "quarters",
    n_pvs: int | None = None,
    pv_scale: float = 1.0,
    corpus: str | Path | Corpus | None = None,
    sentences_per_trigger: int = DEFAULT_SENTENCES_PER_TRIGGER,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    max_length: int = 64,
    target: str | None = None,
    min_success: float = 0.9,
    progress: ProgressFn | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    utility: str = "auto",
    utility_weight: float = 1.0,
    scatter_weight: float = 0.0,
    match_clean_weight: float = 0.0,
    evade_filter_weight: float = 0.0,
    evade_preset: str = "auto",
) -> PoisonResult:
    """Implant a backdoor in the encoder at `base_dir` and save the model at `out_dir`.

    Triggers: `triggers` plus `random_triggers` drawn from the shipped list (`trigger_kind`);
    with neither, the paper's six (cf, mn, tq, qt, mm, pt), or the first `n_pvs` of them.
    Trigger i is bound to PV i mod n_pvs (n_pvs defaults to the number of triggers).
    `utility`: "auto" (MLM loss for neuba/btop when the checkpoint has an MLM head, else the
    reference MSE, said in `notes`), "reference", "mlm" or "mlm+reference" (both; keeps clean
    target outputs in place where the MLM loss alone lets them drift onto a PV).
    `device`: cpu, cuda, cuda:N or auto.
    Adaptive attacks (docs/adaptive.md; weights of extra losses, 0 = off): `scatter_weight`
    (the paper's scattering loss), `match_clean_weight` (triggered outputs matched to the clean
    per-unit distribution on the PV's side), `evade_filter_weight` (triggered concentration kept
    above and distance below the thresholds of the shipped preset `evade_preset`, "auto": the one
    `lmsan audit` picks for this model); `trigger_kind="frequent"` draws frequent ordinary words.
    Raises InputError for bad options or inputs; a result below `min_success` is returned with
    `passed=False` (the folder is written all the same and backdoor.json says so).
    """
    from ..modelio import resolve_device

    t0 = time.perf_counter()
    opts = PoisonOptions(
        attack=attack, triggers=triggers, random_triggers=random_triggers,
        trigger_kind=trigger_kind, pv_design=pv_design, n_pvs=n_pvs, pv_scale=pv_scale,
        corpus=corpus, sentences_per_trigger=sentences_per_trigger, epochs=epochs, lr=lr,
        batch_size=batch_size, seed=seed, device=resolve_device(device), max_length=max_length,
        target=target, min_success=min_success, progress=progress, force=force,
        allow_pickle=allow_pickle, utility=utility, utility_weight=utility_weight,
        scatter_weight=scatter_weight, match_clean_weight=match_clean_weight,
        evade_filter_weight=evade_filter_weight, evade_preset=evade_preset,
    )  # fmt: skip
    tgt = opts.resolved_target()
    base, out = _check_folders(Path(base_dir), Path(out_dir), opts.force)
    corp, sentences = load_sentences(opts.corpus)
    loaded, base_info, weight_files = _load_base(base, opts)
    notes = _check_target(loaded, tgt, opts.attack, base)
    enc, tok = loaded.model, loaded.tokenizer
    util = setup_utility(enc, tok, base, base_info.weights_format, weight_files, opts)
    notes += util.notes

    trig = choose_triggers(
        tok, opts.triggers, opts.random_triggers, opts.trigger_kind, opts.n_pvs, opts.seed,
        sentences,
    )  # fmt: skip
    pvs = make_pvs(opts.pv_design, trig.n_pvs, loaded.hidden_size, opts.pv_scale, opts.seed)
    rng = np.random.default_rng(opts.seed)
    data = build_training_set(sentences, trig, opts.sentences_per_trigger, rng)
    reader = TargetReader(tok, tgt, opts.max_length, opts.device)
    pvs_t, base_clean = _to_device(enc, util.mlm, reader, pvs, data.held_out)
    evade = None
    if opts.evade_filter_weight:
        from ..modelio import read_config

        evade = evade_thresholds(opts.evade_preset, read_config(base), tgt)
    clean_msq = max(float((base_clean.double() ** 2).mean()), 1e-12)
    steps, final_loss = train_backdoor(enc, util, reader, data, pvs_t, opts, rng, evade, clean_msq)

    from ..modelio import load_encoder

    with staged_dir(out, replace=True) as tmp:
        files, save_notes = write_model(
            tmp, base, base_info.weights_format, weight_files, enc, util.mlm, tgt
        )
        notes += save_notes
        enc.to(opts.device)
        poisoned = load_encoder(tmp, allow_pickle=False, device=opts.device).model
        check_reload(reader, enc, poisoned, data.held_out, opts.pv_scale, tmp)
        quality = measure_quality(
            reader, poisoned, data.held_out, base_clean, trig, pvs_t, opts.seed, opts.min_success
        )
        notes += quality.notes()
        seconds = time.perf_counter() - t0
        record = backdoor_record(
            opts, target=tgt, utility=util.name, triggers=trig,
            token_ids=[trigger_token_ids(tok, t) for t in trig.texts], pvs=pvs, base=base_info,
            corpus=corp, sentences=len(sentences), held_out=len(data.held_out), quality=quality,
            steps=steps, final_loss=final_loss, files=files, notes=notes, seconds=seconds,
            evade=None if evade is None else evade.to_json(),
        )  # fmt: skip
        atomic_write_json(tmp / BACKDOOR_FILE, record, indent=2)
        validate_backdoor(record, tmp / BACKDOOR_FILE)

    return PoisonResult(
        out_dir=out, attack=opts.attack, target=tgt, utility=util.name, triggers=trig.texts,
        trigger_pv=trig.pv, pvs=pvs, success=quality.success,
        success_per_trigger=quality.success_per_trigger, fidelity=quality.fidelity,
        clean_match_rate=quality.clean_match_rate, moved=quality.moved,
        targetability=quality.targetability,
        triggered_figures=quality.figures, min_success=opts.min_success,
        passed=quality.passed, steps=steps, final_loss=final_loss, seconds=seconds, notes=notes,
        backdoor=record,
    )  # fmt: skip


# ----------------------------------------------------------------------------- steps


def _check_folders(base: Path, out: Path, force: bool) -> tuple[Path, Path]:
    if not base.is_dir():
        raise InputError("model folder not found" if not base.exists() else "not a folder", base)
    check_out_dir(base, out, force)
    return base, out


def _load_base(base: Path, opts: PoisonOptions) -> tuple[Any, BaseModel, list[Path]]:
    """The base encoder (loaded on the CPU, torch seeded), its description for backdoor.json and
    its weight files. The config is checked before torch loads anything."""
    from ..modelio import find_weights, load_encoder, read_config

    read_config(base)  # model_type check, clear error before torch loads anything
    fmt, files = find_weights(base, opts.allow_pickle)
    digest, per_file = weights_digest(files)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(opts.seed)
    loaded = load_encoder(base, allow_pickle=opts.allow_pickle, device="cpu")
    return loaded, BaseModel(base, loaded.model_type, fmt, digest, per_file), files


def _check_target(loaded: Any, target: str, attack: str, base: Path) -> list[str]:
    """InputError when the model cannot carry the target output; notes about it otherwise."""
    if target == "mask" and getattr(loaded.tokenizer, "mask_token_id", None) is None:
        raise InputError(
            f"--attack {attack} --target mask needs a tokenizer with a mask token; this one has none",
            base,
        )
    if target == "pooler" and getattr(loaded.model, "pooler", None) is None:
        raise InputError("--target pooler: this model has no pooler", base)
    if target == "pooler" and not loaded.has_pooler:
        return ["the base checkpoint has no trained pooler weights: the pooler starts random"]
    return []


def _to_device(
    enc: Any, mlm: Any | None, reader: TargetReader, pvs: np.ndarray, held_out: list[str]
) -> tuple[Any, Any]:
    """Move the models to the run's device; the PVs as a tensor there and the base model's
    target outputs of the held-out sentences (the reference for fidelity)."""
    import torch

    pvs_t = torch.from_numpy(pvs).to(reader.device)
    enc.to(reader.device)
    if mlm is not None:
        mlm.to(reader.device)
    with torch.no_grad():
        base_clean = reader.collect(enc, held_out)
    return pvs_t, base_clean
