"""`lmsan export`: a Hugging Face encoder + a PV set -> a validated, versioned ONNX bundle.

The bundle's format is :mod:`lmsan.auditor.bundle` (file names, manifest, loading) and how the
runtime feeds it is :mod:`lmsan.auditor.encoding`. This module writes it:

1. load the model safely (``modelio.load_encoder``: safetensors unless ``allow_pickle``) and the
   PV set (a PV set file or a signed report);
2. write every file into a temporary folder beside ``out``: ``model.onnx`` (TorchScript
   exporter, dynamic batch and sequence axes), ``embeddings.npy``, ``tokenizer.json``,
   ``pvset.json``, ``prompt.npy`` (optional P-tuning prompt, inserted after the first special
   token) and ``manifest.json`` (:func:`lmsan.auditor.bundle.write_manifest`: format header,
   SHA-256 of every file);
3. validate: the ONNX checker; then the bundle is loaded exactly as ``lmsan scan`` loads it
   (hashes verified, tokenizer.json, embedding table, prompt) and its ORT outputs are compared
   with torch's on the same embedding inputs: corpus sentences of several lengths, batched in
   input order so that most rows are padded. Figures: max abs difference of the target outputs
   (and of all unpadded hidden states), the monitor's decisions (flagged, best PV) which must be
   identical, and the largest difference of match counts. Without a soft prompt, the
   embedding-level input is also checked against the model's ordinary ``input_ids`` path;
4. only then rename the temporary folder to ``out`` (replacing an existing bundle only with
   ``force``). A failed validation raises :class:`ExportValidationError` (exit 2) and leaves
   nothing behind.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lmsan.auditor import __version__
from lmsan.auditor import bundle as fmt
from lmsan.auditor import monitor as mon
from lmsan.auditor.bundle import write_manifest
from lmsan.auditor.corpus import default_corpus
from lmsan.auditor.encoding import reads_form
from lmsan.auditor.errors import InputError, LmsanError
from lmsan.auditor.fsutil import staged_dir
from lmsan.auditor.report import PVSetSource, load_trusted_pvset
from lmsan.auditor.screener import Screener

from .onnx_export import DEFAULT_OPSET, export_onnx, torch_forward, torch_forward_ids

DEFAULT_TOLERANCE = 1e-3  # max abs diff allowed, relative to max(1, max |torch output|)


class ExportValidationError(LmsanError):
    """The exported graph does not reproduce the torch model (exit 2)."""


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    validation: dict[str, Any]
    files: dict[str, int] = field(default_factory=dict)  # name -> size in bytes
    warnings: list[str] = field(default_factory=list)  # e.g. a PV set with no model digest


def validation_sentences(max_tokens: int, n: int = 48) -> list[str]:
    """Corpus sentences of several lengths: ``n`` WordNet sentences spread over the length
    range, plus a few long ones made by joining sentences (the longest near ``max_tokens``
    words, capped at 200 words to keep validation quick)."""
    sents = default_corpus().sentences
    by_len = sorted(sents, key=lambda s: (len(s.split()), s))
    picks = [by_len[int(i * (len(by_len) - 1) / max(1, n - 1))] for i in range(n)]
    long: list[str] = []
    cap = min(200, max(8, max_tokens // 2))
    for target in (cap // 4, cap // 2, cap):
        words: list[str] = []
        for s in sents[len(long) * 50 :]:
            if len(words) + len(s.split()) > target:
                break
            words.extend(s.split())
        if words:
            long.append(" ".join(words))
    # interleave so that every batch mixes short and long rows (padding on most rows)
    return [s for pair in zip(picks[::2], picks[1::2][::-1], strict=False) for s in pair] + long


def _load_prompt(path: Path, emb_size: int) -> np.ndarray:
    if not path.is_file():
        raise InputError("soft prompt file not found", path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"not a .npy array ({exc})", path) from None
    if arr.ndim != 2 or arr.shape[1] != emb_size or arr.shape[0] < 1:
        raise InputError(
            f"soft prompt must be a [length, {emb_size}] array (the embedding width), got "
            f"{list(arr.shape)}",
            path,
        )
    if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
        raise InputError("soft prompt must hold finite floats", path)
    return np.ascontiguousarray(arr, dtype=np.float32)


def max_positions(config: Any, family: str) -> int:
    """The longest input in tokens the model's position table allows."""
    n = int(getattr(config, "max_position_embeddings", 512) or 512)
    if family == "roberta":  # positions start at padding_idx + 1
        n -= int(getattr(config, "pad_token_id", 1) or 1) + 1
    return n


def special_tokens(tok: Any, model_dir: Path) -> dict[str, Any]:
    """The manifest's ``special_tokens`` of a transformers tokenizer (InputError without a pad
    token, naming ``model_dir``)."""

    def tid(name: str) -> int | None:
        v = getattr(tok, f"{name}_token_id", None)
        return int(v) if isinstance(v, int) else None

    cls_id = tid("cls") if tid("cls") is not None else tid("bos")
    pad = tid("pad")
    if pad is None:
        raise InputError("the tokenizer has no pad token; cannot batch", model_dir)
    return {
        "cls_id": cls_id,
        "sep_id": tid("sep") if tid("sep") is not None else tid("eos"),
        "mask_id": tid("mask"),
        "pad_id": pad,
        "mask_token": getattr(tok, "mask_token", None),
    }


def check_out_path(out_path: Path, force: bool) -> None:
    """Refuse to write a bundle over anything but an empty folder or a bundle, or over a bundle
    without ``force`` (InputError naming ``out_path``)."""
    if out_path.exists() and not force:
        raise InputError("already exists; pass --force to replace it", out_path)
    if out_path.exists() and not out_path.is_dir():
        raise InputError("exists and is not a folder", out_path)
    if out_path.exists() and not fmt.is_bundle_or_empty(out_path):
        raise InputError(
            "exists and is not an lmsan bundle (no manifest.json); refusing to replace it",
            out_path,
        )


def _audit_outputs_inside(model_dir: Path, pvs: Path) -> set[str]:
    """Relative paths of the PV set file and of its audit sibling (``X.json`` / ``X.pvs.json``)
    when they lie inside ``model_dir``: written there after the audit hashed the folder."""
    from lmsan.auditor.manifest import relative_inside

    name = pvs.name
    sibling = name[: -len(".pvs.json")] + ".json" if name.endswith(".pvs.json") else (
        pvs.stem + ".pvs.json"
    )
    found = set()
    for q in (pvs, pvs.with_name(sibling)):
        rel = relative_inside(q, model_dir) if q.is_file() else None
        if rel is not None:
            found.add(rel)
    return found


def check_model_digest(
    src: PVSetSource, model_dir: Path, pvs: Path, allow_other_model: bool
) -> tuple[str, list[str]]:
    """Check that ``model_dir`` is the model the PV set was mined from: its manifest digest (with
    the files the audit left out, and the audit's own outputs inside the folder, left out) must be
    the digest the PV set records. Returns the folder's full manifest digest (for the bundle) and
    warnings; InputError (exit 2) naming both digests on a mismatch unless ``allow_other_model``.
    """
    from lmsan.auditor.manifest import model_manifest

    full = "sha256:" + model_manifest(model_dir).digest
    if src.model_digest is None:
        return full, [
            f"{pvs}: the PV set records no model digest: cannot check that it was mined from "
            f"{model_dir}"
        ]
    skip = set(src.ignored) | _audit_outputs_inside(model_dir, pvs)
    actual = "sha256:" + model_manifest(model_dir, ignore=skip).digest if skip else full
    if actual == src.model_digest:
        return full, []
    msg = (
        f"the PV set was mined from the model with digest {src.model_digest}, but {model_dir} "
        f"has digest {actual}: it is another model (or a changed one)"
    )
    if not allow_other_model:
        raise InputError(msg + "; pass --allow-other-model to export it anyway", pvs)
    return full, [f"{pvs}: {msg}; exported because of --allow-other-model"]


def validate_bundle(
    root: Path, model: Any, with_pooler: bool, tolerance: float, prompt: bool
) -> dict[str, Any]:
    """Check the bundle written in ``root`` against the torch ``model`` (module docstring, step
    3); the validation figures, or ExportValidationError. ``prompt``: the bundle has a soft
    prompt (then the ``input_ids`` path cannot be compared)."""
    import onnx

    try:
        onnx.checker.check_model(str(root / fmt.ONNX_FILE), full_check=True)
    except Exception as exc:  # noqa: BLE001 - any checker failure refuses the export
        raise ExportValidationError(f"ONNX checker rejected the graph: {exc}") from None
    scr = Screener(fmt.Bundle.load(root), provider="cpu", threads=0, batch_size=8)
    sents = validation_sentences(scr.max_length)
    encs = scr.encode_all([(s,) for s in sents])
    keep = [i for i, L in enumerate(scr.too_long(encs)) if L is None]
    max_target = 0.0
    max_hidden = 0.0
    max_ref = 0.0
    max_ids_diff: float | None = None if prompt else 0.0
    count_diff = 0
    mismatched: list[int] = []
    padded_rows = 0
    lengths: list[int] = []
    for s in range(0, len(keep), scr.batch_size):
        rows = keep[s : s + scr.batch_size]
        ort_t: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        ref_t: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for form, enc in encs.items():
            x, mask = scr.build_inputs(enc, rows)
            padded_rows += int((mask.sum(1) < mask.shape[1]).sum())
            lengths.extend(mask.sum(1).tolist())
            outs = scr.run(x, mask)
            hs, pooled = torch_forward(model, x, mask, with_pooler)
            ref = {"last_hidden_state": hs}
            if pooled is not None:
                ref["pooler_output"] = pooled
            valid = mask.astype(bool)
            max_hidden = max(max_hidden, float(np.abs(outs["last_hidden_state"] - hs)[valid].max()))
            max_ref = max(max_ref, float(np.abs(hs[valid]).max()))
            if form == "plain" and not prompt:
                ids = np.full(mask.shape, scr.bundle.manifest.special_tokens.pad_id, np.int64)
                for b, r in enumerate(rows):
                    ids[b, : len(enc.ids[r])] = enc.ids[r]
                via_ids = torch_forward_ids(model, ids, mask)
                assert max_ids_diff is not None
                max_ids_diff = max(max_ids_diff, float(np.abs(via_ids - hs)[valid].max()))
            for t in scr.bundle.manifest.targets:
                if reads_form(t, form):
                    ort_t[t] = scr.target_rows(enc, rows, outs, t)
                    ref_t[t] = scr.target_rows(enc, rows, ref, t)
                    if ort_t[t][0].size:
                        max_target = max(max_target, float(np.abs(ort_t[t][0] - ref_t[t][0]).max()))
        # match counts per row, both ways
        for t in ort_t:
            packed, _ = scr.pvs_by_target[t]
            _, c1, _ = mon.best_match(ort_t[t][0], packed, scr.d, scr.threshold)
            _, c2, _ = mon.best_match(ref_t[t][0], packed, scr.d, scr.threshold)
            if c1.size:
                count_diff = max(count_diff, int(np.abs(c1.astype(int) - c2.astype(int)).max()))
        d_ort = scr.decide(ort_t, len(rows))
        d_ref = scr.decide(ref_t, len(rows))
        for r, a, b in zip(rows, d_ort, d_ref, strict=True):
            if (a.flagged, a.pv) != (b.flagged, b.pv):
                mismatched.append(r)
    limit = tolerance * max(1.0, max_ref)
    figures: dict[str, Any] = {
        "sentences": len(keep),
        "batches_padded_rows": padded_rows,
        "sequence_lengths": [int(min(lengths)), int(max(lengths))] if lengths else [0, 0],
        "max_abs_diff_target": max_target,
        "max_abs_diff_hidden": max_hidden,
        "max_abs_torch_output": max_ref,
        "tolerance": limit,
        "max_match_count_diff": count_diff,
        "decisions_identical": not mismatched,
        "decision_mismatches": len(mismatched),
        "embedding_path_max_abs_diff": max_ids_diff,
        "provider": scr.provider,
    }
    problems = []
    if max_target > limit or max_hidden > limit:
        problems.append(
            f"ONNX Runtime differs from torch by {max(max_target, max_hidden):.3g} "
            f"(allowed {limit:.3g})"
        )
    if mismatched:
        problems.append(
            f"monitor decisions differ on {len(mismatched)} of {len(keep)} validation sentences"
        )
    if max_ids_diff is not None and max_ids_diff > limit:
        problems.append(
            "the embedding-level input does not reproduce the model's input_ids path "
            f"(max abs diff {max_ids_diff:.3g}): this architecture transforms its embeddings "
            "in a way the bundle does not capture"
        )
    if not keep:
        problems.append("no validation sentence fits the model's max length")
    if problems:
        raise ExportValidationError("export validation failed: " + "; ".join(problems))
    return figures


def export_bundle(
    model_dir: str | Path,
    pvs: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    prompt: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    allow_pickle: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    pvs_source: str | None = None,
    pub: str | Path | None = None,
    allow_unverified: bool = True,
    allow_other_model: bool = True,
) -> ExportResult:
    """Export ``model_dir`` with the PV set ``pvs`` to the bundle folder ``out``.

    ``pvs_source``: the provenance the manifest records for the PV set (default: ``pvs``), for
    callers that export a derived set from a temporary file. ``pub`` / ``allow_unverified``: how
    a signed report given as ``pvs`` is trusted (``report.load_trusted_pvset``);
    ``allow_other_model`` False refuses a PV set mined from another model
    (``check_model_digest``). ``lmsan export`` passes the strict settings."""
    from lmsan.auditor.modelio import load_encoder

    out_path = Path(out)
    check_out_path(out_path, force)
    src = load_trusted_pvset(pvs, pub, allow_unverified=allow_unverified)
    pvset = src.pvset
    model_digest, digest_warnings = check_model_digest(
        src, Path(model_dir), Path(pvs), allow_other_model
    )
    if not pvset.pvs:
        raise InputError("the PV set holds no PV: nothing to monitor", pvs)
    loaded = load_encoder(model_dir, allow_pickle=allow_pickle, device="cpu")
    model = loaded.model
    if pvset.hidden_size != loaded.hidden_size:
        raise InputError(
            f"PV set hidden_size {pvset.hidden_size} != model hidden size {loaded.hidden_size}",
            pvs,
        )
    targets = pvset.targets()
    if "pooler" in targets and not loaded.has_pooler:
        raise InputError("a PV targets 'pooler' but the model has no trained pooler", model_dir)
    tok = loaded.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            "the model's tokenizer has no fast (tokenizers) version; the bundle needs "
            "tokenizer.json",
            model_dir,
        )
    special = special_tokens(tok, Path(model_dir))
    if "mask" in targets and (special["mask_id"] is None or not special["mask_token"]):
        raise InputError("a PV targets 'mask' but the tokenizer has no mask token", model_dir)
    table = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    emb_size = int(table.shape[1])
    soft = _load_prompt(Path(prompt), emb_size) if prompt is not None else None
    with_pooler = "pooler" in targets

    with staged_dir(out_path, replace=True) as tmp:
        np.save(tmp / fmt.EMBEDDINGS_FILE, np.ascontiguousarray(table, dtype=np.float32))
        backend.save(str(tmp / fmt.TOKENIZER_FILE))
        pvset.save(tmp / fmt.PVSET_FILE)
        if soft is not None:
            np.save(tmp / fmt.PROMPT_FILE, soft)
        outputs = export_onnx(model, tmp / fmt.ONNX_FILE, emb_size, with_pooler, opset)
        body: dict[str, Any] = {
            "created_by": f"lmsan {__version__}",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "source": str(Path(model_dir)),
                "digest": model_digest,
                "model_type": loaded.model_type,
                "family": loaded.family,
                "weights_format": loaded.weights_format,
            },
            "hidden_size": loaded.hidden_size,
            "embedding_size": emb_size,
            "max_positions": max_positions(loaded.config, loaded.family),
            "targets": targets,
            "outputs": outputs,
            "inputs": ["inputs_embeds", "attention_mask"],
            "opset": opset,
            "special_tokens": special,
            "mask_template": fmt.MASK_TEMPLATE if "mask" in targets else None,
            "prompt_length": 0 if soft is None else int(soft.shape[0]),
            "prompt_insert": "after the first special token (position 1 after [CLS]/<s>)",
            "pvset": {
                "pvs": len(pvset.pvs),
                "match_threshold": pvset.match_threshold,
                "source": pvs_source or str(pvs),
            },
        }
        write_manifest(tmp, body)
        figures = validate_bundle(tmp, model, with_pooler, tolerance, soft is not None)
        manifest = write_manifest(tmp, {**body, "validation": figures})
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
    return ExportResult(
        path=out_path,
        manifest=manifest,
        validation=figures,
        files=sizes,
        warnings=src.warnings + digest_warnings,
    )
