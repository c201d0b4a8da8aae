"""``lmsan tune export``: the protected bundle of a task folder.

P-tuning: ``lmsan export`` of the backbone with the task's prompt. P-tuning v2: the backbone with
the trained prefix baked into the graph as constants (every layer's attention reads the constant
prefix keys/values), written and validated step for step as ``lmsan export`` writes and validates
a bundle (numeric parity with torch, identical monitor decisions), with the task folder's digest
in the manifest.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lmsan.auditor import __version__
from lmsan.auditor import bundle as br
from lmsan.auditor.errors import InputError
from lmsan.auditor.fsutil import staged_dir
from lmsan.auditor.manifest import model_manifest
from lmsan.auditor.modelio import load_encoder
from lmsan.auditor.report import load_pvset
from lmsan.auditor.tuning import (
    ADAPTER_WEIGHTS,
    TaskModelHandle,
    extract_prompt,
    head_position,
    load_task_model,
    read_task_meta,
)
from lmsan.export.bundle import (
    DEFAULT_TOLERANCE,
    export_bundle,
    max_positions,
    special_tokens,
    validate_bundle,
)

from .onnx_export import DEFAULT_OPSET, export_onnx


@dataclass
class TaskExport:
    path: Path
    method: str
    validation: dict[str, Any]
    manifest: dict[str, Any]


def export_task_bundle(
    task_dir: str | Path,
    pvs: str | Path,
    out: str | Path,
    *,
    backbone_dir: str | Path | None = None,
    force: bool = False,
    pvs_at_head: bool = False,
    pvs_source: str | None = None,
) -> TaskExport:
    """A protected bundle for a task folder. P-tuning: ``lmsan export`` of the backbone with the
    task prompt. P-tuning v2: the backbone with the trained prefix baked into the graph as
    constants (every layer's attention reads the constant prefix keys/values), validated like
    ``lmsan export`` (numeric parity with torch, identical monitor decisions).

    ``pvs_at_head``: match every PV of the set (pooler PVs dropped, duplicates merged; see
    ``PVSet.retargeted``) at the position the head reads (``head_position``) instead of the
    position it was mined on (a token head: at every token, and the PVs mined on [CLS] at [CLS]
    as well); the bundle carries the retargeted set and its manifest names
    ``pvs`` as the source, with the move. ``pvs_source``: the PV set provenance the manifest
    records (default: ``pvs``)."""
    tdir = Path(task_dir)
    meta = read_task_meta(tdir)
    bdir = Path(backbone_dir) if backbone_dir is not None else Path(meta["backbone"]["path"])
    if pvs_at_head:
        with tempfile.TemporaryDirectory() as tmp:
            at = head_position(meta["kind"], meta["target"])
            moved = _pvs_at(pvs, at, Path(tmp) / f"{Path(pvs).stem}.at-{at}.pvset.json")
            where = at + (", [CLS]-mined ones also at cls" if at == "tokens" else "")
            return export_task_bundle(
                tdir, moved, out, backbone_dir=backbone_dir, force=force,
                pvs_source=f"{pvs_source or pvs} (every PV matched at {where}: --pvs-at-head)",
            )
    if meta["method"] == "ptuning":
        digest = "sha256:" + model_manifest(bdir).digest
        if digest != meta["backbone"]["digest"]:
            raise InputError(
                f"backbone digest {digest[:19]}... differs from the one the task was trained on "
                f"({meta['backbone']['digest'][:19]}...)",
                bdir,
            )
        with tempfile.TemporaryDirectory() as tmp:
            prompt = extract_prompt(tdir, Path(tmp) / "prompt.npy").path
            res = export_bundle(
                bdir, pvs, out, force=force, prompt=prompt, pvs_source=pvs_source
            )
        return TaskExport(res.path, "ptuning", res.validation, res.manifest)
    handle = load_task_model(tdir, bdir)
    return _export_module_bundle(
        handle, bdir, pvs, Path(out), force=force, task_dir=tdir, pvs_source=pvs_source
    )


def _pvs_at(pvs: str | Path, target: str, out: Path) -> Path:
    # a token head: the [CLS]-mined PVs stay at [CLS] too (a trigger that drives [CLS] onto
    # its PV moves the token outputs only part of the way, as on the 6-layer POR CoNLL04 models)
    moved = load_pvset(pvs).retargeted(target, also_keep=("cls",) if target == "tokens" else ())
    if not moved.pvs:
        raise InputError(f"no PV left to match at {target!r} (pooler PVs cannot move)", pvs)
    moved.save(out)
    return out


def _export_module_bundle(
    handle: TaskModelHandle,
    bdir: Path,
    pvs: str | Path,
    out_path: Path,
    *,
    force: bool,
    task_dir: Path,
    pvs_source: str | None = None,
) -> TaskExport:
    """``lmsan export`` for a backbone module with a baked prefix (P-tuning v2). Mirrors
    ``lmsan.export.bundle.export_bundle`` step for step, with the module in place of the loaded
    model folder (and the task folder's digest in the manifest)."""
    import torch

    if out_path.exists() and not force:
        raise InputError("already exists; pass --force to replace it", out_path)
    if out_path.exists() and (
        not out_path.is_dir()
        or (any(out_path.iterdir()) and not (out_path / br.MANIFEST).is_file())
    ):
        raise InputError("exists and is not an lmsan bundle; refusing to replace it", out_path)
    pvset = load_pvset(pvs)
    if not pvset.pvs:
        raise InputError("the PV set holds no PV: nothing to monitor", pvs)
    m = handle.module
    backbone = m.backbone
    if pvset.hidden_size != m.d:
        raise InputError(f"PV set hidden_size {pvset.hidden_size} != model hidden size {m.d}", pvs)
    targets = pvset.targets()
    if "pooler" in targets:
        raise InputError("P-tuning v2 task bundles support PV targets cls, tokens and mask", pvs)
    loaded = load_encoder(bdir, allow_pickle=False, device="cpu")  # config/family/tokenizer only
    tok = handle.tokenizer
    special = special_tokens(tok, bdir)
    with torch.no_grad():
        m.set_prefix()
        m.prefix_state.kv = m.prefix_state.kv.detach().clone()  # a constant in the traced graph
    table = backbone.get_input_embeddings().weight.detach().float().cpu().numpy()
    emb_size = int(table.shape[1])
    with staged_dir(out_path, replace=True) as tmp:
        np.save(tmp / br.EMBEDDINGS_FILE, np.ascontiguousarray(table, dtype=np.float32))
        tok.backend_tokenizer.save(str(tmp / br.TOKENIZER_FILE))
        pvset.save(tmp / br.PVSET_FILE)
        outputs = export_onnx(backbone, tmp / br.ONNX_FILE, emb_size, False, DEFAULT_OPSET)
        body: dict[str, Any] = {
            "format": br.FORMAT,
            "version": br.VERSION,
            "created_by": f"lmsan {__version__}",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "source": str(bdir),
                "digest": "sha256:" + model_manifest(bdir).digest,
                "model_type": loaded.model_type,
                "family": loaded.family,
                "weights_format": loaded.weights_format,
                "task": str(task_dir),
                "task_digest": br.sha256_of(task_dir / ADAPTER_WEIGHTS),
                "prefix": f"P-tuning v2 prefix of {m.n_tokens} key/value pairs per layer, baked as constants",
            },
            "hidden_size": m.d,
            "embedding_size": emb_size,
            "max_positions": max_positions(loaded.config, loaded.family),
            "targets": targets,
            "outputs": outputs,
            "inputs": ["inputs_embeds", "attention_mask"],
            "opset": DEFAULT_OPSET,
            "special_tokens": special,
            "mask_template": br.MASK_TEMPLATE if "mask" in targets else None,
            "prompt_length": 0,
            "prompt_insert": "none (the P-tuning v2 prefix is inside the graph)",
            "pvset": {
                "pvs": len(pvset.pvs),
                "match_threshold": pvset.match_threshold,
                "source": pvs_source or str(pvs),
            },
        }
        br.write_manifest(tmp, body)
        figures = validate_bundle(tmp, backbone, False, DEFAULT_TOLERANCE, True)
        manifest = br.write_manifest(tmp, {**body, "validation": figures})
    return TaskExport(out_path, "ptuning-v2", figures, manifest)
