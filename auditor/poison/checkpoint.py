"""The poisoned model folder: the base checkpoint with the trained tensors replaced (same key
layout, so an MLM head, NSP head or pooler the base carried is kept), plus the base's tokenizer
and config files. Also the base's weight digest and the output-folder checks.

torch and safetensors are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .backdoor import BACKDOOR_FILE

MODEL_FILE = "model.safetensors"

_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".h5",
    ".msgpack",
    ".ot",
    ".onnx",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".tflite",
    ".mlmodel",
    ".index.json",
)
_COPY_SUFFIXES = (".json", ".txt", ".model", ".vocab", ".tiktoken")


def weights_digest(files: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """sha256 of each weight file and one digest over `name:sha` lines (sorted by name)."""
    per: dict[str, str] = {}
    for f in sorted(files, key=lambda p: p.name):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        per[f.name] = h.hexdigest()
    top = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in per.items()).encode()).hexdigest()
    return "sha256:" + top, per


def check_out_dir(base: Path, out: Path, force: bool) -> None:
    """InputError unless `out` may be written: a folder (or nothing) that is not and does not
    contain the base, and empty unless `force`."""
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", out)
    rb, ro = base.resolve(), out.resolve()
    if ro == rb or rb.is_relative_to(ro):
        raise InputError("the output folder must not be (or contain) the base model folder", out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError("output folder is not empty (pass --force to replace it)", out)


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Config, tokenizer and sentence-transformers files of the base; never its weights."""
    copied: list[str] = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name == BACKDOOR_FILE:
            continue
        if p.is_file():
            if p.name.endswith(_WEIGHT_SUFFIXES) or not p.name.endswith(_COPY_SUFFIXES):
                continue
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
        elif p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            if files and all(f.suffix == ".json" for f in files) and len(files) <= 16:
                shutil.copytree(p, dst / p.name)
                copied.append(p.name + "/")
    return copied


def read_state(fmt: str, files: list[Path]) -> dict[str, Any]:
    """The tensors of the base checkpoint (safetensors, or pickle loaded with weights_only)."""
    import torch

    state: dict[str, Any] = {}
    if fmt == "safetensors":
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
    else:
        for f in files:
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state


def patched_state(
    orig: dict[str, Any], enc: Any, mlm: Any | None, prefix: str, target: str
) -> tuple[dict[str, Any], list[str]]:
    """The base checkpoint's tensors with every trained tensor replaced (same key layout).

    A pooler the checkpoint lacks (randomly initialised on load) is written only when it was the
    attack's target; otherwise the output stays as incomplete as the base was."""
    import torch

    notes: list[str] = []
    out = {k: v for k, v in orig.items()}
    uses_prefix = bool(prefix) and any(k.startswith(prefix + ".") for k in orig)
    trained: dict[str, Any] = {}
    for n, t in enc.state_dict().items():
        trained[n] = t
    if mlm is not None:
        for n, t in mlm.state_dict().items():
            if not (prefix and n.startswith(prefix + ".")):
                trained["\0head." + n] = t  # head tensors keep their own names
    seen_ptr: dict[int, str] = {}
    word_emb_new = None
    word_emb_key = None
    for n, t in trained.items():
        is_head = n.startswith("\0head.")
        name = n[len("\0head.") :] if is_head else n
        cands = [name] if is_head else [name, f"{prefix}.{name}"] if prefix else [name]
        key = next((c for c in cands if c in orig), None)
        ptr = t.data_ptr()
        if key is None:
            if ptr in seen_ptr:
                continue  # a tied alias of a tensor already written (e.g. MLM decoder weight)
            if name.endswith("position_ids") or "rotary" in name:
                continue  # buffers rebuilt by the model
            if "pooler" in name and target != "pooler":
                continue  # never in the base checkpoint and untouched by this attack
            key = f"{prefix}.{name}" if (uses_prefix and not is_head) else name
            notes.append(f"tensor {key} was not in the base checkpoint; written as trained")
        seen_ptr.setdefault(ptr, key)
        out[key] = t.detach().to("cpu").to(orig[key].dtype if key in orig else t.dtype).clone()
        if name.endswith("word_embeddings.weight") and not is_head:
            word_emb_new, word_emb_key = out[key], key
    # Keys that stored a copy of the word embeddings (an untied-on-disk MLM decoder) follow them.
    if word_emb_new is not None and word_emb_key is not None:
        old = orig[word_emb_key] if word_emb_key in orig else None
        if old is not None:
            for k, v in orig.items():
                if k != word_emb_key and v.shape == old.shape and torch.equal(v, old):
                    out[k] = word_emb_new.clone()
    return {k: v.contiguous() for k, v in out.items()}, notes


def write_model(
    folder: Path,
    base: Path,
    fmt: str,
    files: list[Path],
    enc: Any,
    mlm: Any | None,
    target: str,
) -> tuple[list[str], list[str]]:
    """Write the trained weights (in the base's key layout, as safetensors) and the base's
    support files into `folder`; (the files written, notes). Moves `enc` and `mlm` to the CPU."""
    from safetensors.torch import save_file

    prefix = str(getattr(enc, "base_model_prefix", "") or "")
    orig = read_state(fmt, files)
    state, notes = patched_state(orig, enc.to("cpu"), mlm.to("cpu") if mlm else None, prefix, target)
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})
    copied = copy_support_files(base, folder)
    if fmt == "pickle":
        notes.append("base weights were pickle; the backdoored model is saved as safetensors")
    return [MODEL_FILE, *copied], notes
