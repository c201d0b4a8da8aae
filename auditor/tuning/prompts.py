"""The P-tuning prompt of an adapter folder, as the ``.npy`` that ``lmsan export --prompt``
inserts after the first special token of every input. Torch-free."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FormatError, InputError
from ..fsutil import atomic_write_bytes
from .store import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TASK_FILE,
    read_prompt_embeddings_numpy,
    read_task_meta,
)


@dataclass
class PromptExport:
    path: Path
    shape: tuple[int, int]
    peft_type: str
    position_matches_bundle: bool
    note: str


def extract_prompt(
    adapter_dir: str | Path, out_npy: str | Path, force: bool = False
) -> PromptExport:
    """Write the P-tuning prompt of an adapter folder as float32 [l, emb] ``.npy`` for
    ``lmsan export --prompt``. Reads peft's ``prompt_embeddings`` (for P-tuning the output of the
    MLP, so the reparametrisation is already applied). A peft folder without ``lmsan_task.json``
    was trained by ``PeftModel``, which puts the prompt before ``[CLS]``: the result says that
    the bundle's position (after ``[CLS]``) differs."""
    adir = Path(adapter_dir)
    out = Path(out_npy)
    if out.exists() and not force:
        raise InputError("already exists; pass --force to replace it", out)
    cfg_path = adir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise InputError(f"no {ADAPTER_CONFIG}: not a peft adapter folder", adir)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", cfg_path) from None
    ptype = str(cfg.get("peft_type"))
    if ptype == "PREFIX_TUNING":
        raise InputError(
            "a P-tuning v2 (prefix) adapter has no input prompt; export it with "
            "`lmsan tune export`, which bakes the prefix into the graph",
            adir,
        )
    if ptype not in ("P_TUNING", "PROMPT_TUNING"):
        raise InputError(f"peft_type {ptype!r} is not a P-tuning / prompt-tuning adapter", adir)
    emb = read_prompt_embeddings_numpy(adir)
    if emb.ndim != 2:
        raise FormatError(
            f"prompt_embeddings must be 2-D, got {list(emb.shape)}", adir / ADAPTER_WEIGHTS
        )
    ours = (adir / TASK_FILE).is_file()
    if ours:
        read_task_meta(adir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_npy(out, emb)
    note = (
        "prompt inserted after [CLS], as the bundle does"
        if ours
        else "a PeftModel adapter: peft prepends the prompt before [CLS], the bundle inserts it "
        "after [CLS]; the monitor then reads a different backbone output than the deployed model"
    )
    return PromptExport(out, (int(emb.shape[0]), int(emb.shape[1])), ptype, ours, note)


def _save_npy(out: Path, arr: np.ndarray) -> None:
    """``np.save(out, arr)`` as float32, written atomically (to ``out`` + ``.npy`` where ``out``
    lacks the suffix, as ``np.save`` names it)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    dest = out if out.name.endswith(".npy") else out.with_name(out.name + ".npy")
    atomic_write_bytes(dest, buf.getvalue())
