"""`lmsan export`: parity of the ONNX bundle with torch, refusal rules, manifest integrity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import screen_fixtures as sf
from lmsan.auditor.bundle import Bundle, sha256_of
from lmsan.auditor.cli import app
from lmsan.auditor.errors import FormatError, InputError
from lmsan.auditor.screener import open_bundle
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bert(backdoored_model: tuple[Path, np.ndarray], cls_pvset: Path) -> tuple[Path, Path]:
    return backdoored_model[0], cls_pvset


@pytest.fixture(scope="session")
def bert_bundle(cls_bundle: Path) -> Path:
    return cls_bundle


@pytest.fixture(scope="session")
def roberta(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("roberta")
    model = sf.random_roberta(root / "model")
    rng = np.random.default_rng(0)
    pvs = [(t, rng.choice([-1.0, 1.0], size=sf.D)) for t in ("cls", "tokens", "mask", "pooler")]
    return model, sf.save_pvset(root / "pvs.json", pvs)


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def _torch_model(path: Path):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def test_bert_bundle_parity_and_manifest(bert: tuple[Path, Path], bert_bundle: Path) -> None:
    man = json.loads((bert_bundle / "manifest.json").read_text())
    assert man["format"] == "lmsan.bundle" and man["version"] == 1
    assert set(man["files"]) == {"model.onnx", "embeddings.npy", "tokenizer.json", "pvset.json"}
    for name, digest in man["files"].items():
        assert sha256_of(bert_bundle / name) == digest
    v = man["validation"]
    assert v["decisions_identical"] and v["decision_mismatches"] == 0
    assert v["max_abs_diff_target"] < 1e-4 and v["max_abs_diff_hidden"] < 1e-4
    assert v["embedding_path_max_abs_diff"] < 1e-4
    assert v["batches_padded_rows"] > 0 and v["sequence_lengths"][1] > 3 * v["sequence_lengths"][0]
    assert man["special_tokens"]["cls_id"] == 2 and man["special_tokens"]["pad_id"] == 0

    # Independent check: the runtime (tokenizer.json + embeddings.npy + ORT) on new sentences of
    # mixed lengths against torch's ordinary input_ids path, batched with padding.
    model, tok = _torch_model(bert[0])
    texts = sf.sentences(20, seed=40) + sf.sentences(20, seed=41, trigger=True)
    scr = open_bundle(bert_bundle, provider="cpu", batch_size=7)
    enc = scr.encode_all([(t,) for t in texts])["plain"]
    rows = list(range(len(texts)))
    x, mask = scr.build_inputs(enc, rows)
    ort_cls = scr.run(x, mask)["last_hidden_state"][:, 0]
    with torch.no_grad():
        b = tok(texts, padding=True, return_tensors="pt")
        ref_cls = model(**b).last_hidden_state[:, 0].numpy()
    assert np.abs(ort_cls - ref_cls).max() < 1e-4
    res = scr.monitor(texts)
    assert [r.flagged for r in res] == [False] * 20 + [True] * 20


def test_roberta_all_targets_parity(roberta: tuple[Path, Path], tmp_path: Path) -> None:
    from lmsan.export.bundle import export_bundle

    res = export_bundle(roberta[0], roberta[1], tmp_path / "b")
    man = res.manifest
    assert man["targets"] == ["cls", "mask", "tokens", "pooler"]
    assert man["outputs"] == ["last_hidden_state", "pooler_output"]
    assert man["mask_template"] == "{sentence} {mask_token}"
    assert man["max_positions"] == 128  # 130 - (padding_idx + 1)
    v = res.validation
    assert v["decisions_identical"] and v["max_abs_diff_target"] < 1e-4
    assert v["embedding_path_max_abs_diff"] < 1e-4  # right padding keeps RoBERTa positions

    # Runtime pooler/mask rows against torch on the template text.
    model, tok = _torch_model(roberta[0])
    scr = open_bundle(tmp_path / "b", provider="cpu")
    texts = sf.sentences(6, seed=9)
    enc = scr.encode_all([(t,) for t in texts])["template"]
    outs = scr.forward(enc, range(len(texts)))
    rows, _, _ = scr.target_rows(enc, list(range(len(texts))), outs, "mask")
    with torch.no_grad():
        b = tok([f"{t} {tok.mask_token}" for t in texts], padding=True, return_tensors="pt")
        o = model(**b)
    mpos = (b["input_ids"] == tok.mask_token_id).int().argmax(1)
    ref = o.last_hidden_state[torch.arange(len(texts)), mpos].numpy()
    assert np.abs(rows - ref).max() < 1e-4
    assert np.abs(outs["pooler_output"] - o.pooler_output.numpy()).max() < 1e-4


def test_soft_prompt_is_inserted_after_cls(bert: tuple[Path, Path], tmp_path: Path) -> None:
    from lmsan.export.bundle import export_bundle

    prompt = np.random.default_rng(1).normal(size=(3, sf.D)).astype(np.float32) * 0.05
    np.save(tmp_path / "p.npy", prompt)
    res = export_bundle(bert[0], bert[1], tmp_path / "b", prompt=tmp_path / "p.npy")
    assert res.manifest["prompt_length"] == 3 and "prompt.npy" in res.manifest["files"]
    assert res.validation["embedding_path_max_abs_diff"] is None
    model, tok = _torch_model(bert[0])
    scr = open_bundle(tmp_path / "b", provider="cpu")
    text = "the cat sees a bird"
    enc = scr.encode_all([(text,)])["plain"]
    got = scr.forward(enc, [0])["last_hidden_state"][0]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        e = model.get_input_embeddings()(ids)[0]
        x = torch.cat([e[:1], torch.from_numpy(prompt), e[1:]])[None]
        ref = model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long))
    assert got.shape[0] == ids.shape[1] + 3
    assert np.abs(got - ref.last_hidden_state[0].numpy()).max() < 1e-4


def test_refuses_to_overwrite_without_force(bert: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "b"
    runner = CliRunner()
    args = ["export", str(bert[0]), "--pvs", str(bert[1]), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "manifest.json").read_text()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in flat(r.output)
    assert (out / "manifest.json").read_text() == before
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    Bundle.load(out)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder left


def test_failed_validation_saves_nothing(
    bert: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmsan.export.bundle as eb

    real = eb.torch_forward

    def drifting(model, x, mask, with_pooler):  # a graph that does not reproduce torch
        hs, pooled = real(model, x, mask, with_pooler)
        return -hs, pooled

    monkeypatch.setattr(eb, "torch_forward", drifting)
    with pytest.raises(eb.ExportValidationError, match="differs from torch"):
        eb.export_bundle(bert[0], bert[1], tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(bert: tuple[Path, Path], tmp_path: Path) -> None:
    from lmsan.export.bundle import export_bundle

    wrong = sf.save_pvset(tmp_path / "wrong.json", [("cls", np.ones(16, np.float32))], d=16)
    with pytest.raises(InputError, match="hidden_size 16"):
        export_bundle(bert[0], wrong, tmp_path / "b")
    np.save(tmp_path / "p.npy", np.zeros((2, 5), np.float32))
    with pytest.raises(InputError, match=r"\[length, 32\]"):
        export_bundle(bert[0], bert[1], tmp_path / "b", prompt=tmp_path / "p.npy")
    r = CliRunner().invoke(
        app, ["export", str(tmp_path / "nope"), "--pvs", str(bert[1]), "--out", str(tmp_path / "c")]
    )
    assert r.exit_code == 2 and "model folder not found" in flat(r.output)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_tampered_bundle_is_rejected(bert_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bert_bundle, copy)
    Bundle.load(copy)
    data = bytearray((copy / "embeddings.npy").read_bytes())
    data[-1] ^= 1
    (copy / "embeddings.npy").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="embeddings.npy does not match manifest.json"):
        Bundle.load(copy)
    (copy / "embeddings.npy").unlink()
    with pytest.raises(FormatError, match="embeddings.npy listed in manifest.json is missing"):
        Bundle.load(copy)
    (tmp_path / "c.txt").write_text("hello\n")
    r = CliRunner().invoke(
        app, ["scan", str(copy), str(tmp_path / "c.txt"), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "embeddings.npy listed in manifest.json is missing" in flat(
        r.output
    )
    man = json.loads((bert_bundle / "manifest.json").read_text())
    man["version"] = 99
    shutil.copy(bert_bundle / "embeddings.npy", copy / "embeddings.npy")
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FormatError, match="'version' is 99"):
        Bundle.load(copy)


# --- trust in the PV set: the signer of a report and the model it was mined from ----------------


def _signed_report(model: Path, pvset: Path, out: Path, key: Path) -> Path:
    from lmsan.auditor.report import write_signed_report

    write_signed_report({"verdict": "backdoored", "pvset": json.loads(pvset.read_text())},
                        model, out, key)
    return out


@pytest.fixture
def signed(
    bert: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path]:
    """(report of the bert model signed by a team key, that key); no per-user key exists."""
    from lmsan.auditor.signing import generate_key

    monkeypatch.setenv("LMSAN_HOME", str(tmp_path / "home"))
    key = generate_key(tmp_path / "team.pem").path
    return _signed_report(bert[0], bert[1], tmp_path / "report.json", key), key


def test_export_verifies_a_signed_report_against_a_trusted_key(
    bert: tuple[Path, Path], signed: tuple[Path, Path], tmp_path: Path
) -> None:
    from lmsan.auditor.signing import generate_key

    report, key = signed
    runner = CliRunner()
    base = ["export", str(bert[0]), "--pvs", str(report), "--out", str(tmp_path / "b")]
    r = runner.invoke(app, base)  # no --pub, no per-user key: the signer cannot be checked
    assert r.exit_code == 1, r.output
    assert "cannot verify who signed" in flat(r.output) and "--allow-unverified" in flat(r.output)
    other = generate_key(tmp_path / "other.pem")
    r = runner.invoke(app, [*base, "--pub", str(other.pub_path)])
    assert r.exit_code == 1 and "not by --pub" in flat(r.output), r.output
    assert other.fingerprint in flat(r.output)
    r = runner.invoke(app, [*base, "--pub", str(other.pub_path), "--allow-unverified"])
    assert r.exit_code == 4, r.output
    assert not (tmp_path / "b").exists()
    r = runner.invoke(app, [*base, "--pub", f"{key}.pub"])
    assert r.exit_code == 0, r.output
    assert "warning" not in flat(r.output)
    Bundle.load(tmp_path / "b")


def test_export_trusts_the_per_user_key_and_allow_unverified(
    bert: tuple[Path, Path], signed: tuple[Path, Path], tmp_path: Path
) -> None:
    from lmsan.auditor.report import ReportNotTrusted, load_trusted_pvset
    from lmsan.auditor.signing import default_key

    report, _ = signed
    with pytest.raises(ReportNotTrusted, match="cannot verify who signed"):
        load_trusted_pvset(report)
    src = load_trusted_pvset(report, allow_unverified=True)
    assert src.signed and src.trusted_key == "" and "not verified" in src.warnings[0]
    user = default_key()  # a per-user key now exists, and it is not the signer
    with pytest.raises(ReportNotTrusted, match="not by the per-user key"):
        load_trusted_pvset(report)
    assert "--allow-unverified" in load_trusted_pvset(report, allow_unverified=True).warnings[0]
    mine = _signed_report(bert[0], bert[1], tmp_path / "mine.json", user.path)
    src = load_trusted_pvset(mine)
    assert src.trusted_key == "the per-user key" and src.signer == user.fingerprint
    assert not src.warnings and src.model_digest is not None and src.model_digest.startswith("sha256:")
    with pytest.raises(InputError, match="no signature to check against --pub"):
        load_trusted_pvset(bert[1], pub=user.pub_path)
    # a report altered after signing is refused whatever the options
    env = json.loads(mine.read_text())
    env["signatures"][0]["sig"] = env["signatures"][0]["sig"][::-1]
    (tmp_path / "bad.json").write_text(json.dumps(env))
    with pytest.raises(FormatError, match="does not verify"):
        load_trusted_pvset(tmp_path / "bad.json", allow_unverified=True)


def test_export_refuses_a_pv_set_of_another_model(
    bert: tuple[Path, Path], roberta: tuple[Path, Path], signed: tuple[Path, Path], tmp_path: Path
) -> None:
    from lmsan.auditor.manifest import model_manifest

    _, key = signed
    report = _signed_report(roberta[0], bert[1], tmp_path / "r.json", key)  # mined on roberta
    r = CliRunner().invoke(app, ["export", str(bert[0]), "--pvs", str(report), "--pub",
                                 f"{key}.pub", "--out", str(tmp_path / "b")])
    out = flat(r.output)
    assert r.exit_code == 2, r.output
    bert_digest = "sha256:" + model_manifest(bert[0]).digest
    roberta_digest = "sha256:" + model_manifest(roberta[0]).digest
    assert bert_digest in out and roberta_digest in out and "--allow-other-model" in out
    assert not (tmp_path / "b").exists()
    # a plain PV set file carries the digest too
    data = json.loads(bert[1].read_text())
    data["model"] = {**data.get("model", {}), "digest": roberta_digest}
    (tmp_path / "plain.json").write_text(json.dumps(data))
    r = CliRunner().invoke(app, ["export", str(bert[0]), "--pvs", str(tmp_path / "plain.json"),
                                 "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and roberta_digest in flat(r.output), r.output


def test_model_digest_check_leaves_out_the_audit_outputs(tmp_path: Path) -> None:
    """A report and PV set written into the model folder do not make it another model; a PV set
    with no digest is a warning; --allow-other-model turns a mismatch into a warning."""
    from lmsan.auditor.pvset import PV, PVSet
    from lmsan.auditor.report import load_trusted_pvset, write_signed_report
    from lmsan.auditor.signing import generate_key
    from lmsan.export.bundle import check_model_digest

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\1" * 64)
    key = generate_key(tmp_path / "k.pem")
    pvs = PVSet(hidden_size=4, pvs=[PV(id=0, target="cls", values=np.ones(4, np.float32))])
    info = write_signed_report({"pvset": pvs.to_json()}, model, model / "report.json", key.path)
    pvs.model["digest"] = info.model_digest
    pvs.save(model / "report.pvs.json")  # written after the audit hashed the folder
    for given in (model / "report.json", model / "report.pvs.json"):
        src = load_trusted_pvset(given, key.pub_path if given.name == "report.json" else None)
        assert src.model_digest == info.model_digest
        full, warnings = check_model_digest(src, model, given, allow_other_model=False)
        assert warnings == [] and full.startswith("sha256:")
    (model / "model.safetensors").write_bytes(b"\2" * 64)
    src = load_trusted_pvset(model / "report.pvs.json")
    with pytest.raises(InputError, match="another model"):
        check_model_digest(src, model, model / "report.pvs.json", allow_other_model=False)
    _, warnings = check_model_digest(src, model, model / "report.pvs.json", allow_other_model=True)
    assert "--allow-other-model" in warnings[0]
    del pvs.model["digest"]
    pvs.save(tmp_path / "nodigest.json")
    src = load_trusted_pvset(tmp_path / "nodigest.json")
    _, warnings = check_model_digest(src, model, tmp_path / "nodigest.json", False)
    assert "records no model digest" in warnings[0]
