"""`lmsan export --quantize int8`: the int8 bundle, its agreement gate and its manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import screen_fixtures as sf
from lmsan.auditor.bundle import Bundle
from lmsan.auditor.cli import app
from lmsan.auditor.scan import ScanOptions, scan
from lmsan.export import quantize as qz
from lmsan.export.bundle import ExportValidationError
from typer.testing import CliRunner


def test_int8_bundle_agrees_with_fp32_and_scans(
    backdoored_model: tuple[Path, Any], cls_pvset: Path, tmp_path: Path
) -> None:
    model = backdoored_model[0]
    # the fixture model is hand-made, not `lmsan poison`ed: it has no backdoor.json to name cf
    assert qz.known_triggers(model) == []
    res = qz.export_quantized(model, cls_pvset, tmp_path / "q8", triggers=[sf.TRIGGER])
    q = res.manifest["quantization"]
    assert q["type"] == "int8" and "quantize_dynamic" in q["method"]
    assert q["decision_agreement"] >= 0.999 and q["min_agreement"] == 0.999
    assert q["clean"]["inputs"] > 500 and q["triggered"]["inputs"] == q["clean"]["inputs"]
    assert q["triggered"]["flagged_fp32"] == q["triggered"]["inputs"]  # triggers really fire
    assert q["clean"]["flagged_fp32"] == 0 and q["triggers"] == [sf.TRIGGER]
    on_disk = json.loads((tmp_path / "q8" / "manifest.json").read_text())
    assert on_disk["quantization"] == q and on_disk["validation"]["decisions_identical"]
    b = Bundle.load(tmp_path / "q8")
    assert b.manifest.files["model.onnx"] != q["fp32_model_sha256"]
    import onnx

    nodes = onnx.load(str(tmp_path / "q8" / "model.onnx")).graph.node
    ops = {n.op_type for n in nodes}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    # every layer's feed-forward output projection stays an fp32 MatMul, the others are int8
    kept = qz.fp32_nodes(Bundle.load(tmp_path / "q8").onnx_path)
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    assert len(kept) == layers and all(n.endswith("output/dense/MatMul") for n in kept)
    q_ops = [n for n in nodes if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert len(q_ops) >= 4 * layers  # query, key, value, attention output, intermediate
    lines = sf.sentences(20, seed=1) + sf.sentences(5, seed=2, trigger=True)
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    s = scan(tmp_path / "q8", str(tmp_path / "c.txt"), tmp_path / "o",
             ScanOptions(provider="cpu", purge=True))
    assert (s.flagged, s.purged) == (5, 5)
    # nothing left behind beside the bundle (the fp32 staging folder is gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "o", "q8"]


def test_below_the_agreement_gate_nothing_is_saved(
    backdoored_model: tuple[Path, Any], cls_pvset: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = qz.decision_agreement

    def one_off(a: Any, b: Any, texts: list[str]) -> dict[str, Any]:
        r = real(a, b, texts)  # pretend three clean decisions differed: 1997 of 2000 agree
        if r["inputs"] and texts and sf.TRIGGER not in texts[0].split():
            r["agreement"] = (r["inputs"] - 3) / r["inputs"]
        return r

    monkeypatch.setattr(qz, "decision_agreement", one_off)
    with pytest.raises(ExportValidationError, match="agree with fp32 on 99.8"):
        qz.export_quantized(backdoored_model[0], cls_pvset, tmp_path / "q8",
                            triggers=[sf.TRIGGER])
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_choice(backdoored_model: tuple[Path, Any], cls_pvset: Path,
                             tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["export", str(backdoored_model[0]), "--pvs", str(cls_pvset),
                                 "--out", str(tmp_path / "b"), "--quantize", "int4"])
    # a parse-time choice: click refuses it (exit 2 here; the `lmsan` entry point maps it to 4)
    assert r.exit_code == 2 and not (tmp_path / "b").exists()
    r = CliRunner().invoke(app, ["export", str(backdoored_model[0]), "--pvs", str(cls_pvset),
                                 "--out", str(tmp_path / "b"), "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    assert "int8 vs fp32 decisions" in r.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["quantization"]["type"] == "int8"
