"""`lmsan audit` over many models: discovery (plain folders and the Hugging Face cache layout),
per-model signed reports, the summary (table, summary.json, summary.sarif), the exit code of a
batch, --resume, --format, the Ray engine, and the option checks of audit/calibrate/demo.

A tiny clean BERT and its POR-backdoored twin (as in tests/test_audit.py) are built once; the
clean one is laid out as a Hugging Face cache snapshot whose files link into `blobs/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from lmsan.auditor.cli import app
from typer.testing import CliRunner

runner = CliRunner()
MINE = ["--max-length", "48", "--target", "cls", "--max-seeds", "4", "--quiet"]
SARIF_SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
REV = "0123456789abcdef0123456789abcdef01234567"
CLEAN_NAME = f"acme/tiny-clean@{REV}"


def _hf_snapshot(src: Path, hub: Path, repo: str, rev: str) -> Path:
    """Lay out `src` as the Hugging Face cache does: files in blobs/<sha256>, the snapshot
    folder holding relative links to them."""
    base = hub / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    (base / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    for f in sorted(src.iterdir()):
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, tiny_por_pair: dict[str, Path]) -> dict[str, Path]:
    """root/plain/por (backdoored), root/hub/models--acme--tiny-clean/snapshots/REV (clean), and
    folders that look like models but are not auditable encoders."""
    work = tmp_path_factory.mktemp("batch")
    clean, corpus = tiny_por_pair["clean"], tiny_por_pair["corpus"]
    shutil.copytree(tiny_por_pair["por"], work / "por")
    root = work / "root"
    shutil.copytree(work / "por", root / "plain" / "por")
    snap = _hf_snapshot(clean, root / "hub", "acme/tiny-clean", REV)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model\n")
    gpt = root / "odd" / "gpt"
    gpt.mkdir(parents=True)
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    shutil.copyfile(clean / "model.safetensors", gpt / "model.safetensors")
    noconf = root / "odd" / "noconf"
    noconf.mkdir()
    shutil.copyfile(clean / "model.safetensors", noconf / "model.safetensors")
    pk = root / "odd" / "pickle"
    pk.mkdir()
    shutil.copyfile(clean / "config.json", pk / "config.json")
    (pk / "pytorch_model.bin").write_bytes(b"not read")
    key = work / "key.pem"
    r = runner.invoke(app, ["keygen", "--out", str(key)])
    assert r.exit_code == 0, r.output
    return {"root": root, "por": root / "plain" / "por", "clean": snap, "gpt": gpt,
            "corpus": corpus, "key": key, "work": work, "clean_src": clean}


def _batch(zoo: dict[str, Path], out: Path, *args: str) -> Any:
    r = runner.invoke(app, ["audit", *args, "--out-dir", str(out), "--corpus",
                            str(zoo["corpus"]), "--key", str(zoo["key"]), *MINE])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def batch_out(zoo: dict[str, Path]) -> tuple[Any, Path, dict[str, Any], list[str]]:
    """The first batch over the root: the CLI result, the folder, and the summary and file
    names as that run left them (later tests run more batches into the same folder)."""
    out = zoo["work"] / "out"
    r = _batch(zoo, out, str(zoo["root"]), "--format", "html", "--format", "sarif")
    return r, out, _summary(out), sorted(p.name for p in out.iterdir())


def test_root_batch_audits_each_encoder_and_skips_the_rest(batch_out, zoo) -> None:
    r, out, s, _ = batch_out
    assert r.exit_code == 1, r.output  # the worst verdict: one model is backdoored
    assert s["format"] == "lmsan.audit-summary" and s["exit_code"] == 1
    rows = {m["name"]: m for m in s["models"]}
    assert set(rows) == {"plain/por", CLEAN_NAME}
    por, clean = rows["plain/por"], rows[CLEAN_NAME]
    assert por["status"] == "backdoored" and por["verdict"] == "BACKDOORED"
    assert clean["status"] == "clean" and clean["verdict"] == "CLEAN"
    # the kept PV's figure that passed by the least: its trigger's reach rate (rule 4)
    assert por["figure"]["threshold"] == "min rate" and por["figure"]["margin"] >= 0
    assert clean["figure"] is None or clean["figure"]["margin"] <= 0
    assert Path(por["report"]) == out / "plain--por.json"
    assert Path(clean["report"]) == out / f"acme--tiny-clean@{REV}.json"
    skipped = {Path(x["path"]).name: x["reason"] for x in s["skipped"]}
    assert set(skipped) == {"gpt", "noconf", "pickle"}
    assert "unsupported model_type 'gpt2'" in skipped["gpt"]
    assert "no config.json" in skipped["noconf"]
    assert "--allow-pickle" in skipped["pickle"]
    assert s["counts"] == {"models": 2, "backdoored": 1, "clean": 1, "error": 0, "resumed": 0,
                           "skipped": 3}
    # the console table names each model, its verdict and the deciding figure
    assert "plain/por" in r.output and CLEAN_NAME in r.output
    assert "BACKDOORED" in r.output and "CLEAN" in r.output and "min rate" in r.output
    assert "skipped" in r.output and "unsupported model_type" in r.output


def test_batch_reports_verify_against_their_models(batch_out, zoo) -> None:
    from lmsan.auditor.render import load_verified

    _, out, s, _ = batch_out
    rows = {m["name"]: m for m in s["models"]}
    for name, folder in (("plain/por", zoo["por"]), (CLEAN_NAME, zoo["clean"])):
        v = load_verified(rows[name]["report"], model_dir=folder, pub=str(zoo["key"]) + ".pub")
        assert v.valid, v.problems
        assert v.verification.model_digest == rows[name]["model_digest"]
        assert Path(rows[name]["pvs"]).is_file()
        for fmt, suffix in (("html", ".html"), ("sarif", ".sarif")):
            assert rows[name]["renderings"][fmt] == str(Path(rows[name]["report"]).with_suffix(suffix))
            assert Path(rows[name]["renderings"][fmt]).is_file()
    assert "BACKDOORED" in (out / "plain--por.html").read_text()


def test_summary_sarif_merges_the_model_runs(batch_out) -> None:
    _, out, _, _ = batch_out
    doc = json.loads((out / "summary.sarif").read_text())
    schema = json.loads(SARIF_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft4Validator(schema).validate(doc)
    assert len(doc["runs"]) == 1
    run = doc["runs"][0]
    assert run["results"] and {x["properties"]["model"] for x in run["results"]} == {"plain/por"}
    # discovery order: sorted folders, hub/ before plain/
    assert [m["model"] for m in run["properties"]["models"]] == [CLEAN_NAME, "plain/por"]
    assert len(run["invocations"]) == 2
    assert set(run["originalUriBaseIds"]) == {"MODEL0", "MODEL1"}
    for res in run["results"]:
        loc = res["locations"][0]["physicalLocation"]["artifactLocation"]
        assert run["artifacts"][loc["index"]]["location"]["uri"] == loc["uri"]
        assert loc["uriBaseId"] == "MODEL1"


def test_resume_skips_finished_models(batch_out, zoo) -> None:
    _, out, _, _ = batch_out
    clean_report = out / f"acme--tiny-clean@{REV}.json"
    before = clean_report.read_bytes()
    (out / "plain--por.json").unlink()  # as if the batch had stopped before this model
    r = _batch(zoo, out, str(zoo["root"]), "--resume")
    assert r.exit_code == 1, r.output
    rows = {m["name"]: m for m in _summary(out)["models"]}
    assert rows[CLEAN_NAME]["resumed"] and not rows["plain/por"]["resumed"]
    assert rows["plain/por"]["status"] == "backdoored"
    assert clean_report.read_bytes() == before  # not audited again
    assert "resumed" in r.output
    # a report that no longer matches its model folder is audited again
    changed = zoo["work"] / "por-changed"
    shutil.copytree(zoo["por"], changed)
    (changed / "extra.txt").write_text("changed\n")
    shutil.copyfile(out / "plain--por.json", out / "por-changed.json")
    shutil.copyfile(out / "plain--por.pvs.json", out / "por-changed.pvs.json")
    r = _batch(zoo, out, str(changed), "--resume")
    assert r.exit_code == 1 and not _summary(out)["models"][0]["resumed"], r.output


def test_exit_code_is_the_worst_verdict(batch_out, zoo, tmp_path) -> None:
    _, out, _, _ = batch_out
    # the clean model alone (resumed: no new audit) -> 0
    r = _batch(zoo, out, str(zoo["clean"]), "--resume")
    assert r.exit_code == 0, r.output
    rows = _summary(out)["models"]
    assert [m["name"] for m in rows] == [CLEAN_NAME] and rows[0]["resumed"]
    # a named folder that is not an encoder is an input error -> 2 when nothing is backdoored
    r = _batch(zoo, out, str(zoo["clean"]), str(zoo["gpt"]), "--resume")
    assert r.exit_code == 2, r.output
    err = next(m for m in _summary(out)["models"] if m["status"] == "error")
    assert "unsupported model_type 'gpt2'" in err["error"] and str(zoo["gpt"]) in err["error"]
    # ... and 1 when one is
    r = _batch(zoo, out, str(zoo["por"]), str(zoo["gpt"]), "--resume")
    assert r.exit_code == 1, r.output
    # nothing auditable -> 3
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = _batch(zoo, tmp_path / "o", str(tmp_path / "empty"))
    assert r.exit_code == 3, r.output
    assert _summary(tmp_path / "o")["models"] == []


def test_single_model_keeps_its_report_and_writes_renderings(zoo, tmp_path) -> None:
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["audit", str(zoo["por"]), "--out", str(out), "--corpus",
                            str(zoo["corpus"]), "--key", str(zoo["key"]), *MINE,
                            "--format", "md", "--format", "text"])
    assert r.exit_code == 1, r.output
    assert out.is_file() and out.with_suffix(".pvs.json").is_file()
    assert "BACKDOORED" in out.with_suffix(".md").read_text()
    assert "BACKDOORED" in out.with_suffix(".txt").read_text()
    assert not (tmp_path / "summary.json").exists()


def test_unreadable_pickle_weights_are_an_input_error(zoo, tmp_path) -> None:
    import pickle
    from datetime import date

    for name, data in (("objects", pickle.dumps({"w": date(2020, 1, 1)}, protocol=2)),
                       ("truncated", b"\x80\x02garbage")):
        d = tmp_path / name
        shutil.copytree(zoo["clean_src"], d)
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(data)
        r = runner.invoke(app, ["audit", str(d), "--allow-pickle", "--quiet",
                                "--out", str(tmp_path / "r.json"), "--key", str(zoo["key"])])
        assert r.exit_code == 2, (name, r.output)
        assert str(d / "pytorch_model.bin") in r.output and "cannot be loaded safely" in r.output
        assert "weights_only=False" not in r.output and "Traceback" not in r.output


def test_ray_engine_writes_what_the_local_engine_writes(batch_out, zoo, tmp_path) -> None:
    ray = pytest.importorskip("ray")  # an optional extra: `pip install "lmsan[ray]"`

    _, local, a, local_files = batch_out
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = _batch(zoo, tmp_path / "ray", str(zoo["root"]), "--engine", "ray",
                   "--format", "html", "--format", "sarif")
    finally:
        ray.shutdown()
    assert r.exit_code == 1, r.output
    b = _summary(tmp_path / "ray")

    def norm(s: dict[str, Any], out: Path) -> Any:
        text = json.dumps(s).replace(str(out), "OUT")
        d = json.loads(text)
        for m in d["models"]:
            m["seconds"] = None
            m["resumed"] = False
            fig = m.pop("figure")  # thread counts differ: figures agree to rounding
            m["figure"] = None if fig is None else (fig["figure"], fig["threshold"])
        d["counts"]["resumed"] = 0
        return d

    assert norm(a, local) == norm(b, tmp_path / "ray")
    for ma, mb in zip(a["models"], b["models"], strict=True):
        if ma["figure"] is not None:
            assert np.isclose(ma["figure"]["value"], mb["figure"]["value"], rtol=1e-3)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == local_files


def test_ray_engine_without_ray_is_a_usage_error(zoo, tmp_path, monkeypatch) -> None:
    from lmsan.auditor.batch_ray import require_ray
    from lmsan.auditor.errors import UsageError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=re.escape('pip install "lmsan[ray]"')):
        require_ray()
    r = _batch(zoo, tmp_path / "o", str(zoo["root"]), "--engine", "ray")
    assert r.exit_code == 4 and "--engine ray needs Ray" in r.output, r.output
    assert 'pip install "lmsan' in r.output and "Traceback" not in r.output
    assert not list((tmp_path / "o").glob("*.json"))


# ---------------------------------------------------------------- torch-free checks
_MAIN = textwrap.dedent("""
    import json, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    from lmsan.auditor.cli import main
    codes = []
    for args in json.loads(sys.argv[1]):
        sys.argv = ["lmsan", *args]
        try:
            main()
        except SystemExit as exc:
            codes.append(exc.code)
        print("\\n@@", flush=True)
        print("\\n@@", file=sys.stderr, flush=True)
    print("CODES", json.dumps(codes))
""")


def _run_main(cases: list[list[str]]) -> tuple[list[int], list[str]]:
    """Run `lmsan ARGS` for each case in one interpreter where torch cannot be imported; return
    the exit codes and each case's stdout + stderr."""
    p = subprocess.run([sys.executable, "-c", _MAIN, json.dumps(cases)], capture_output=True,
                       text=True, timeout=120)
    assert "CODES" in p.stdout, p.stderr
    codes = json.loads(p.stdout.rsplit("CODES", 1)[1])
    outs = [o + e for o, e in zip(p.stdout.split("\n@@"), p.stderr.split("\n@@"), strict=False)]
    return codes, outs


def test_bad_choices_and_paths_fail_before_torch(zoo, tmp_path) -> None:
    m = str(zoo["por"])
    cases = [
        ["audit", m, "--device", "tpu"],
        ["audit", m, "--target", "head"],
        ["audit", m, "--mode", "fast"],
        ["audit", m, "--filter-rule", "x"],
        ["audit", m, "--div-loss", "x"],
        ["audit", m, "--prompt-init", "zeros"],
        ["audit", m, "--format", "pdf"],
        ["audit", m, "--engine", "spark"],
        ["calibrate", m, "--out", "p.json", "--name", "n", "--target", "head"],
        ["calibrate", m, "--out", "p.json", "--name", "n", "--div-loss", "x"],
        ["calibrate", m, "--out", "p.json", "--name", "n", "--device", "tpu"],
        ["audit", str(zoo["root"])],  # a folder of models needs --out-dir
        ["audit", m, "--resume"],  # batch-only
        ["audit", m, "--out-dir", str(tmp_path / "o"), "--out", "r.json"],
        ["audit", str(tmp_path / "missing")],
        ["audit", str(zoo["gpt"])],
    ]
    codes, outs = _run_main(cases)
    assert codes[:14] == [4] * 14, list(zip(codes, outs, strict=False))
    for out in outs:
        assert "Traceback" not in out and "blocked in this test" not in out, out
    for flag, out in zip(["--device", "--target", "--mode", "--filter-rule", "--div-loss",
                          "--prompt-init", "--format", "--engine", "--target", "--div-loss",
                          "--device"], outs, strict=False):
        assert flag in out, out
    assert "--out-dir" in outs[11] and "--resume" in outs[12]
    assert codes[14:] == [2, 2]
    assert outs[14].strip().startswith("error:") and "model folder not found" in outs[14]
    assert "unsupported model_type 'gpt2'" in outs[15]


def test_help_short_flag_exit_codes_and_plain_force() -> None:
    for cmd in ("audit", "calibrate", "demo"):
        r = runner.invoke(app, [cmd, "-h"])
        assert r.exit_code == 0, r.output
        tail = " ".join(r.output.split())[-400:]
        assert "Exit codes:" in tail and "usage error" in tail
    r = runner.invoke(app, ["calibrate", "-h"])
    assert "--force" in r.output and "--no-force" not in r.output
    flat = " ".join(runner.invoke(app, ["audit", "-h"]).output.split())
    assert "--out-dir" in flat and "Folder (created if missing)" in flat
    assert "File: the signed JSON report" in flat
    flat = " ".join(runner.invoke(app, ["calibrate", "-h"]).output.split())
    assert "File: the preset to write" in flat


# ---------------------------------------------------------------- names
def test_names_and_file_stems() -> None:
    from lmsan.auditor.batch import ModelEntry, hf_cache_name, plan_jobs, safe_stem

    assert hf_cache_name(Path("/c/hub/models--org--name/snapshots/abc")) == "org/name@abc"
    assert hf_cache_name(Path("/c/hub/models--bert-base/snapshots/abc")) == "bert-base@abc"
    assert hf_cache_name(Path("/c/models/bert")) is None
    assert safe_stem("org/name@abc") == "org--name@abc"
    assert safe_stem("../a b/c:d") == "a_b--c_d"
    jobs = plan_jobs([ModelEntry("x/y", Path("a")), ModelEntry("x--y", Path("b")),
                      ModelEntry("summary", Path("c"))], Path("out"))
    assert [j.report.name for j in jobs] == ["x--y.json", "x--y-2.json", "summary-2.json"]
    assert jobs[0].pvs.name == "x--y.pvs.json"
