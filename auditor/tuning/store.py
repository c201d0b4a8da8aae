"""The task folder: a ``peft`` adapter folder plus the head and lmsan's record of the task::

    adapter_config.json        peft's config (PromptEncoderConfig / PromptTuningConfig /
                               PrefixTuningConfig), written by peft
    adapter_model.safetensors  {"prompt_embeddings": [l, emb]} (P-tuning: the prompt *after*
                               the MLP, as peft saves it) or [l, layers*2*d] (P-tuning v2, peft's
                               past_key_values layout); the trainable weights in "trainable.*"
    head.safetensors           {"weight": [classes, d], "bias": [classes]}
    lmsan_task.json            format "lmsan.task" v1: task, labels, method, backbone digest,
                               prompt position, head position ("target"), training figures
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import FormatError, InputError
from ..fsutil import atomic_write_json, staged_dir
from .model import (
    HEAD_POSITIONS,
    METHODS,
    PROMPT_POSITION,
    TaskModelHandle,
    build_task_model,
    load_backbone,
)

TASK_FORMAT = "lmsan.task"
TASK_VERSION = 1
TASK_FILE = "lmsan_task.json"
HEAD_FILE = "head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_task_model(handle: TaskModelHandle, out_dir: str | Path, force: bool = False) -> Path:
    """Write the task folder (a peft adapter folder + head + ``lmsan_task.json``), built beside
    ``out_dir`` and moved into place when complete. A non-empty ``out_dir`` is replaced only
    with ``force``."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError("output folder is not empty (pass --force to replace it)", out)
    m = handle.module
    with torch.no_grad():
        emb = m.prompt_output().detach().float().contiguous().clone()
    tensors = {"prompt_embeddings": emb}
    if m.fixed is None:
        for k, v in m.prompt_module.state_dict().items():
            tensors[f"trainable.{k}"] = v.detach().float().contiguous().clone()
    meta = {
        "format": TASK_FORMAT,
        "version": TASK_VERSION,
        "created_by": f"lmsan {__version__}",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": handle.task,
        "kind": handle.kind,
        "labels": handle.labels,
        "method": handle.method,
        "prompt_length": handle.prompt_length,
        "prompt_position": PROMPT_POSITION
        if handle.method == "ptuning"
        else "prefix (every layer)",
        "token_types": "zero",
        "target": handle.target,
        "backbone": {"path": str(handle.backbone_dir), "digest": handle.backbone_digest},
        "training": handle.info,
    }
    with staged_dir(out, replace=True) as tmp:  # replaces only an empty folder unless force
        handle_cfg = m.peft_config
        handle_cfg.base_model_name_or_path = str(handle.backbone_dir)
        handle_cfg.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        save_file(
            {k: v.detach().float().contiguous().clone() for k, v in m.head.state_dict().items()},
            str(tmp / HEAD_FILE),
        )
        atomic_write_json(tmp / TASK_FILE, meta)
    return out


def read_task_meta(task_dir: str | Path) -> dict[str, Any]:
    p = Path(task_dir) / TASK_FILE
    if not p.is_file():
        raise InputError(
            f"no {TASK_FILE} (not a task folder written by `lmsan tune train`)", Path(task_dir)
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", p) from None
    if not isinstance(data, dict) or data.get("format") != TASK_FORMAT:
        raise FormatError(f"field 'format' must be {TASK_FORMAT!r}", p)
    if data.get("version") != TASK_VERSION:
        raise FormatError(
            f"field 'version' is {data.get('version')!r}, this lmsan reads {TASK_VERSION}", p
        )
    for key, typ in (
        ("task", str),
        ("kind", str),
        ("labels", list),
        ("method", str),
        ("prompt_length", int),
    ):
        if not isinstance(data.get(key), typ):
            raise FormatError(f"field {key!r} is missing or not a {typ.__name__}", p)
    if data["method"] not in METHODS:
        raise FormatError(f"field 'method' must be one of {METHODS}", p)
    data.setdefault("target", "cls")  # a folder without the field: the head reads [CLS]
    if data["target"] not in HEAD_POSITIONS:
        raise FormatError(f"field 'target' must be one of {HEAD_POSITIONS}", p)
    if data["target"] == "mask" and data["kind"] != "sequence":
        raise FormatError("field 'target' is 'mask' for a token task", p)
    if not isinstance(data.get("backbone"), dict) or not isinstance(
        data["backbone"].get("digest"), str
    ):
        raise FormatError("field 'backbone.digest' is missing", p)
    return data


def _load_adapter_tensors(
    task_dir: Path, load_file: Callable[[str], dict[str, Any]]
) -> tuple[dict[str, Any], Path]:
    """The tensors of the folder's adapter weights, read with ``load_file`` (safetensors' torch
    or NumPy loader), and the file's path."""
    from safetensors import SafetensorError

    p = task_dir / ADAPTER_WEIGHTS
    if not p.is_file():
        raise InputError(f"no {ADAPTER_WEIGHTS} in the adapter folder", task_dir)
    try:
        return load_file(str(p)), p
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"cannot read safetensors ({exc})", p) from None


def _read_prompt_embeddings(task_dir: Path) -> Any:
    from safetensors.torch import load_file

    tensors, p = _load_adapter_tensors(task_dir, load_file)
    if "prompt_embeddings" not in tensors:
        raise FormatError(
            "no 'prompt_embeddings' tensor: not a prompt-learning peft adapter (P-tuning, prompt "
            "tuning or prefix tuning)",
            p,
        )
    return tensors["prompt_embeddings"]


def read_prompt_embeddings_numpy(task_dir: Path) -> np.ndarray:
    """As :func:`_read_prompt_embeddings`, torch-free (float32 NumPy)."""
    from safetensors.numpy import load_file

    tensors, p = _load_adapter_tensors(task_dir, load_file)
    if "prompt_embeddings" not in tensors:
        raise FormatError("no 'prompt_embeddings' tensor: not a prompt-learning peft adapter", p)
    return np.asarray(tensors["prompt_embeddings"], dtype=np.float32)


def load_task_model(
    task_dir: str | Path, backbone_dir: str | Path | None = None, check_digest: bool = True
) -> TaskModelHandle:
    """Load a task folder onto its backbone (``backbone_dir`` overrides the recorded path). The
    backbone's weights must have the recorded digest unless ``check_digest`` is False."""
    import torch
    from peft import PeftConfig
    from safetensors.torch import load_file

    tdir = Path(task_dir)
    meta = read_task_meta(tdir)
    bdir = Path(backbone_dir) if backbone_dir is not None else Path(meta["backbone"]["path"])
    backbone, tok, digest, pad = load_backbone(bdir)
    if check_digest and digest != meta["backbone"]["digest"]:
        raise InputError(
            f"backbone digest {digest[:19]}... differs from the one the task was trained on "
            f"({meta['backbone']['digest'][:19]}...)",
            bdir,
        )
    try:
        pcfg = PeftConfig.from_pretrained(str(tdir))
    except (ValueError, OSError, TypeError) as exc:
        raise FormatError(f"cannot read {ADAPTER_CONFIG} ({exc})", tdir) from None
    module = build_task_model(
        backbone, meta["method"], len(meta["labels"]), meta["kind"], pcfg, None
    )
    emb = _read_prompt_embeddings(tdir)
    expect = module.prompt_output().shape
    if tuple(emb.shape) != tuple(expect):
        raise FormatError(
            f"prompt_embeddings has shape {list(emb.shape)}, expected {list(expect)}", tdir
        )
    module.fixed = emb.float()
    head = load_file(str(tdir / HEAD_FILE))
    try:
        module.head.load_state_dict({k: head[k] for k in ("weight", "bias")})
    except (KeyError, RuntimeError) as exc:
        raise FormatError(f"{HEAD_FILE}: {exc}", tdir) from None
    module.eval()
    with torch.no_grad():
        module.set_prefix()
    return TaskModelHandle(
        module,
        tok,
        meta["task"],
        meta["kind"],
        list(meta["labels"]),
        meta["method"],
        bdir,
        digest,
        pad,
        dict(meta.get("training") or {}),
        meta["target"],
    )
