"""`lmsan export --quantize int8`: a bundle whose backbone is quantized to int8.

1. The fp32 bundle is exported and validated as always (:func:`lmsan.export.bundle.export_bundle`),
   in a temporary folder beside ``out``.
2. Its ``model.onnx`` is quantized with ONNX Runtime's dynamic quantization
   (``onnxruntime.quantization.quantize_dynamic``: int8 weights of the MatMul / Gemm nodes,
   activations quantized per batch at run time); the other files are copied unchanged.
   Weights are quantized per output channel and to 7 bits (``reduce_range``: the u8 x s8
   kernels of CPUs without VNNI add pairs of products in int16, which saturates at 8 bits).
   The feed-forward output projection of each layer (``output/dense``, fed by the GELU output,
   whose long-tailed range one per-batch activation scale quantizes poorly) stays fp32. The
   monitor decides on sign counts: ONNX Runtime's default settings move the best PV match count
   of a 3-layer MiniLM's [CLS] output by 9.2 of 384 signs on average, these by 3.5
   (``bench/diagnose/int8_settings.py``).
3. The monitor's decisions (flagged, and by which PV) of the int8 bundle are compared with the fp32
   bundle's on clean inputs (``CLEAN_INPUTS`` sentences of the shipped corpus) and on triggered
   inputs (the same sentences with one of the model's triggers inserted at a random position;
   the triggers come from the model folder's ``backdoor.json`` when it was written by
   ``lmsan poison``, or from ``triggers``). Below ``MIN_AGREEMENT`` (99.9%) nothing is saved
   (ExportValidationError, exit 2).
4. The manifest records ``quantization``: the method, the agreement measured on each input set,
   and the fp32 validation figures stay under ``validation``.

A model with no known trigger has no triggered inputs to compare on: the manifest says so
(``triggered_inputs`` 0, ``triggers`` empty) and the agreement is the clean inputs'.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmsan.auditor import bundle as fmt
from lmsan.auditor.bundle import write_manifest
from lmsan.auditor.corpus import default_corpus
from lmsan.auditor.errors import UsageError
from lmsan.auditor.fsutil import staged_dir
from lmsan.auditor.screener import MonitorResult, Screener

from .bundle import ExportResult, ExportValidationError, check_out_path, export_bundle

QUANTIZATIONS = ("int8",)
MIN_AGREEMENT = 0.999
CLEAN_INPUTS = 1000
METHOD = (
    "onnxruntime quantize_dynamic: int8 weights (QInt8, per channel, reduced range) of "
    "MatMul/Gemm except the feed-forward output projections, dynamic activations"
)


def known_triggers(model_dir: str | Path) -> list[str]:
    """The triggers ``lmsan poison`` recorded in the model folder's backdoor.json (none else)."""
    if not (Path(model_dir) / "backdoor.json").is_file():
        return []
    from lmsan.auditor.poison.backdoor import read_backdoor

    return [str(t["text"]) for t in read_backdoor(model_dir)["triggers"]]


def comparison_inputs(triggers: list[str], n: int = CLEAN_INPUTS) -> tuple[list[str], list[str]]:
    """``n`` clean corpus sentences and, with ``triggers``, each with one trigger inserted."""
    clean = default_corpus().sentences[:n]
    rng = random.Random(0)
    triggered = []
    for i, s in enumerate(clean if triggers else []):
        words = s.split()
        words.insert(rng.randint(0, len(words)), triggers[i % len(triggers)])
        triggered.append(" ".join(words))
    return clean, triggered


def same_decision(x: MonitorResult, y: MonitorResult) -> bool:
    """The monitor's decision: flagged or not and, when flagged, by which PV (the nearest PV of
    a record that is not flagged decides nothing)."""
    return x.flagged == y.flagged and (not x.flagged or x.pv == y.pv)


def decision_agreement(a: Screener, b: Screener, texts: list[str]) -> dict[str, Any]:
    """How often two screeners take the same decision (:func:`same_decision`) on ``texts``."""
    if not texts:
        return {"inputs": 0, "agreement": None, "flagged_fp32": 0, "flagged_int8": 0}
    keep = [i for i, L in enumerate(a.too_long(a.encode_all([(t,) for t in texts]))) if L is None]
    recs = [texts[i] for i in keep]
    ra, rb = a.monitor(recs), b.monitor(recs)
    same = sum(same_decision(x, y) for x, y in zip(ra, rb, strict=True))
    return {
        "inputs": len(recs),
        "agreement": same / len(recs) if recs else None,
        "flagged_fp32": sum(r.flagged for r in ra),
        "flagged_int8": sum(r.flagged for r in rb),
    }


def fp32_nodes(src: Path) -> list[str]:
    """The MatMul/Gemm nodes kept fp32: each layer's feed-forward output projection (the
    exporter's node names end in ``output/dense/MatMul`` outside ``attention``)."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    return [
        n.name for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and n.name.endswith("output/dense/MatMul")
        and "attention" not in n.name
    ]


def quantize_onnx(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of an ONNX graph (module docstring, step 2)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
        nodes_to_exclude=fp32_nodes(src),
    )


def export_quantized(
    model_dir: str | Path,
    pvs: str | Path,
    out: str | Path,
    quantize: str = "int8",
    *,
    force: bool = False,
    triggers: list[str] | None = None,
    min_agreement: float = MIN_AGREEMENT,
    **export_options: Any,
) -> ExportResult:
    """Export ``model_dir`` with ``pvs`` to a bundle at ``out`` whose backbone is ``quantize``
    (module docstring). ``export_options``: the other options of
    :func:`~lmsan.export.bundle.export_bundle`."""
    if quantize not in QUANTIZATIONS:
        raise UsageError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZATIONS)}")
    out_path = Path(out)
    check_out_path(out_path, force)
    trig = list(triggers) if triggers is not None else known_triggers(model_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".lmsan-fp32-") as tmp_root:
        fp32_dir = Path(tmp_root) / "fp32"
        fp32 = export_bundle(model_dir, pvs, fp32_dir, **export_options)
        with staged_dir(out_path, replace=True) as tmp:
            for name in fp32.manifest["files"]:
                if name != fmt.ONNX_FILE:
                    shutil.copy2(fp32_dir / name, tmp / name)
            quantize_onnx(fp32_dir / fmt.ONNX_FILE, tmp / fmt.ONNX_FILE)
            body = {k: v for k, v in fp32.manifest.items()
                    if k not in ("format", "version", "files")}
            write_manifest(tmp, body)
            ref = Screener(fmt.Bundle.load(fp32_dir), provider="cpu", batch_size=32)
            q8 = Screener(fmt.Bundle.load(tmp), provider="cpu", batch_size=32)
            clean, triggered = comparison_inputs(trig)
            on_clean = decision_agreement(ref, q8, clean)
            on_trig = decision_agreement(ref, q8, triggered)
            n = on_clean["inputs"] + on_trig["inputs"]
            same = sum(
                (x["agreement"] or 0.0) * x["inputs"] for x in (on_clean, on_trig)
            )
            agreement = same / n if n else 0.0
            figures = {
                "type": quantize,
                "method": METHOD,
                "decision_agreement": agreement,
                "min_agreement": min_agreement,
                "clean": on_clean,
                "triggered": on_trig,
                "triggers": trig,
                "fp32_model_sha256": fp32.manifest["files"][fmt.ONNX_FILE],
            }
            if agreement < min_agreement:
                raise ExportValidationError(
                    f"int8 validation failed: the monitor's decisions agree with fp32 on "
                    f"{100 * agreement:.2f}% of {n} inputs (at least {100 * min_agreement:.1f}% "
                    "needed); nothing saved"
                )
            manifest = write_manifest(tmp, {**body, "quantization": figures})
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
    return ExportResult(
        path=out_path, manifest=manifest, validation=fp32.validation, files=sizes
    )
