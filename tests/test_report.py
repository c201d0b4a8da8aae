"""The signed audit report: manifest, keys, DSSE/in-toto signing, verification, CLI. Torch-free."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from lmsan.auditor import manifest as mf
from lmsan.auditor.cli import app
from lmsan.auditor.errors import FormatError, InputError
from lmsan.auditor.pvset import PV, PVSet
from lmsan.auditor.report import (
    dump_envelope,
    extract_pvset,
    load_pvset,
    read_report,
    verify_report,
    verify_report_bytes,
    write_signed_report,
)
from lmsan.auditor.signing import (
    check_envelope,
    default_key,
    fingerprint,
    generate_key,
    load_private_key,
    pae,
    sign_envelope,
)
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(autouse=True)
def _lmsan_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LMSAN_HOME", str(home))
    return home


def make_model(root: Path) -> Path:
    """A fake model folder: a few small files, one in a subfolder, plus git metadata."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "bert", "hidden_size": 4}\n')
    (root / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return root


def make_payload() -> dict:
    pvs = PVSet(
        hidden_size=4,
        pvs=[PV(id=0, target="cls", values=np.array([0.5, -1.0, 2.0, -0.25], np.float32), seed=3)],
        model={"model_type": "bert"},
    )
    return {
        "verdict": "backdoor",
        "parameters": {"epochs": 4, "lr": np.float32(0.5)},
        "timings": [np.float64(1.25), 2.5],
        "pvset": pvs.to_json(),
    }


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model")


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return generate_key(tmp_path / "k.pem").path


@pytest.fixture
def report(tmp_path: Path, model: Path, key: Path) -> Path:
    out = tmp_path / "report.json"
    write_signed_report(make_payload(), model, out, key)
    return out


def flip(path: Path, pos: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_hashes_every_file_except_git(model: Path) -> None:
    m = mf.model_manifest(model)
    assert list(m.files) == sorted(["config.json", "model.safetensors", "tokenizer/vocab.txt"])
    blob = (model / "model.safetensors").read_bytes()
    assert m.files["model.safetensors"] == mf.FileEntry(hashlib.sha256(blob).hexdigest(), 5000)
    # the digest is over the canonical file list, reproducible by hand
    body = {
        "files": [
            {"path": p, "sha256": e.sha256, "size": e.size} for p, e in sorted(m.files.items())
        ]
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert m.digest == hashlib.sha256(text.encode()).hexdigest()
    assert mf.Manifest.from_json(m.to_json()).digest == m.digest


def test_manifest_streams_files_larger_than_a_chunk(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    blob = np.random.default_rng(1).bytes(mf.CHUNK * 2 + 17)
    (d / "w.bin").write_bytes(blob)
    assert mf.model_manifest(d).files["w.bin"].sha256 == hashlib.sha256(blob).hexdigest()


def test_manifest_digest_tracks_content_and_names(model: Path) -> None:
    before = mf.model_manifest(model)
    (model / ".git" / "HEAD").write_text("changed\n")  # git metadata is not the model
    assert mf.model_manifest(model).digest == before.digest
    (model / "tokenizer" / "vocab.txt").rename(model / "tokenizer" / "vocab2.txt")
    after = mf.model_manifest(model)
    assert after.digest != before.digest
    diff = mf.compare(before, after)
    assert (diff.added, diff.removed, diff.changed) == (
        ["tokenizer/vocab2.txt"],
        ["tokenizer/vocab.txt"],
        [],
    )


def test_manifest_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="model folder not found"):
        mf.model_manifest(tmp_path / "missing")
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".git" / "HEAD").write_text("x")
    with pytest.raises(InputError, match="no files"):
        mf.model_manifest(tmp_path / "empty")


def test_manifest_follows_file_links_like_the_hf_cache(tmp_path: Path) -> None:
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    (blobs / "abc123").write_bytes(b"weights")
    (snap / "model.safetensors").symlink_to(blobs / "abc123")
    m = mf.model_manifest(snap)
    assert m.files == {"model.safetensors": mf.FileEntry(hashlib.sha256(b"weights").hexdigest(), 7)}
    (snap / "loop").symlink_to(snap)
    with pytest.raises(InputError, match="link loop"):
        mf.model_manifest(snap)
    (snap / "loop").unlink()
    (snap / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="dangling: not a regular file"):
        mf.model_manifest(snap)


# --- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa-p256"])
def test_generate_key_is_private_and_refuses_to_overwrite(tmp_path: Path, kind: str) -> None:
    info = generate_key(tmp_path / "k.pem", kind)
    assert stat.S_IMODE(info.path.stat().st_mode) == 0o600
    assert info.pub_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(info.fingerprint) == 64
    with pytest.raises(InputError, match="already exists"):
        generate_key(tmp_path / "k.pem", kind)
    again = generate_key(tmp_path / "k.pem", kind, force=True)
    assert again.fingerprint != info.fingerprint
    assert stat.S_IMODE(again.path.stat().st_mode) == 0o600


def test_default_key_is_created_once(_lmsan_home: Path) -> None:
    first = default_key()
    assert first.created and first.path.parent == _lmsan_home
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(_lmsan_home.stat().st_mode) == 0o700
    second = default_key()
    assert not second.created and second.fingerprint == first.fingerprint


def test_private_key_readable_by_others_is_refused(key: Path) -> None:
    os.chmod(key, 0o644)
    with pytest.raises(InputError, match="chmod 600"):
        load_private_key(key)


def test_pae_matches_the_dsse_spec() -> None:
    # test vector from the DSSE protocol document
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


# --- write / read / verify ----------------------------------------------------------------------


def test_report_round_trip(report: Path, model: Path, key: Path) -> None:
    v = verify_report(report, model_dir=model)
    assert v.valid and v.signature_ok and not v.problems, v.problems
    assert v.fingerprint == fingerprint(load_private_key(key).public_key())
    assert v.diff is not None and v.diff.same and v.model_files == 3

    env = json.loads(report.read_text())
    assert env["payloadType"] == "application/vnd.in-toto+json"
    statement = json.loads(base64.b64decode(env["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    digest = mf.model_manifest(model).digest
    assert statement["subject"][0]["digest"] == {"sha256": digest}

    pred = read_report(report)
    assert pred == statement["predicate"]
    assert (pred["format"], pred["version"], pred["tool"]["name"]) == ("lmsan.report", 1, "lmsan")
    assert pred["model"]["digest"] == f"sha256:{digest}"
    assert pred["verdict"] == "backdoor" and pred["parameters"]["lr"] == 0.5
    assert pred["pvset"]["model"]["digest"] == f"sha256:{digest}"

    loaded = load_pvset(report)  # a report is also a PV set source
    assert loaded.hidden_size == 4 and loaded.pvs[0].seed == 3
    assert extract_pvset(env, report)["format"] == "lmsan.pvset"


def test_pvset_load_refuses_a_tampered_report(report: Path) -> None:
    env = json.loads(report.read_text())
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["pvset"]["pvs"][0]["values"][0] = 9.0
    statement["predicate"]["pvset"]["pvs"][0].pop("signs")
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    report.write_bytes(dump_envelope(env))
    with pytest.raises(FormatError, match="does not verify"):
        load_pvset(report)


def test_report_uses_default_key_when_none_given(tmp_path: Path, model: Path) -> None:
    info = write_signed_report(make_payload(), model, tmp_path / "r.json", None)
    assert info.key_created and info.fingerprint == default_key().fingerprint
    info2 = write_signed_report(make_payload(), model, tmp_path / "r.json", None)  # overwrite
    assert not info2.key_created
    assert verify_report(tmp_path / "r.json", pub=info.key_path.with_suffix(".pem.pub")).valid
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no tmp left


def test_report_inside_model_folder_excludes_itself(model: Path, key: Path) -> None:
    out = model / "lmsan-report.json"
    write_signed_report(make_payload(), model, out, key)
    assert "lmsan-report.json" not in read_report(out)["model"]["manifest"]["files"]
    v = verify_report(out, model_dir=model)
    assert v.valid, v.problems


def test_payload_errors(tmp_path: Path, model: Path, key: Path) -> None:
    with pytest.raises(ValueError, match="'predicate.timings\\[1\\]' is nan"):
        write_signed_report({"timings": [1.0, float("nan")]}, model, tmp_path / "r.json", key)
    with pytest.raises(ValueError, match="version"):
        write_signed_report({"version": 3}, model, tmp_path / "r.json", key)
    assert not (tmp_path / "r.json").exists()


def flipped(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


@pytest.mark.parametrize("mask", [0x01, 0x02, 0x20, 0x80])
def test_any_byte_flip_fails_verification(report: Path, mask: int) -> None:
    """Every position of the file, flipped: never valid, never an unexpected exception."""
    original = report.read_bytes()
    assert verify_report_bytes(original, report).valid
    kinds: dict[str, int] = {}
    for pos in range(len(original)):
        try:
            v = verify_report_bytes(flipped(original, pos, mask), report)
        except FormatError as exc:
            assert "not valid JSON" in str(exc) or "not UTF-8" in str(exc)
            kinds["unreadable"] = kinds.get("unreadable", 0) + 1
        else:
            assert not v.valid, f"flip of byte {pos} ({original[pos : pos + 1]!r}) still verifies"
            assert v.problems
            for key in ("bad signature", "canonical form", "publicKey", "keyid", "payload"):
                if any(key in p for p in v.problems):
                    kinds[key] = kinds.get(key, 0) + 1
                    break
            else:
                kinds["other"] = kinds.get("other", 0) + 1
    # the flips hit the payload, the signature, the key and the JSON structure
    if mask == 0x80:  # makes every byte non-ASCII: never UTF-8 JSON
        assert set(kinds) == {"unreadable"}
    else:
        assert {"unreadable", "bad signature", "publicKey", "keyid"} <= set(kinds), kinds


def test_whitespace_substitution_fails_verification(report: Path) -> None:
    """Changing a byte into other JSON whitespace keeps the JSON and signature intact."""
    original = report.read_bytes()
    n = 0
    for pos, byte in enumerate(original):
        if byte not in b" \t\n\r":
            continue
        for other in b" \t\n\r":
            if other != byte:
                data = bytearray(original)
                data[pos] = other
                try:
                    v = verify_report_bytes(bytes(data), report)
                except FormatError:  # a control character inside a string
                    continue
                assert v.signature_ok and not v.valid
                assert "canonical form at byte" in v.problems[0]
                n += 1
    assert n > 20


def test_flip_of_the_file_on_disk_fails(report: Path) -> None:
    original = report.read_bytes()
    for pos in range(0, len(original), 97):
        flip(report, pos)
        try:
            assert not verify_report(report).valid
        except FormatError:
            pass
        report.write_bytes(original)
    assert verify_report(report).valid


def test_flip_in_each_region_names_the_problem(report: Path) -> None:
    text = report.read_bytes()
    env = json.loads(text)

    def at(s: str, offset: int) -> int:
        return text.index(s.encode()) + offset

    pem = json.dumps(env["signatures"][0]["publicKey"])[1:-1]
    cases = {
        at(env["payload"], 100): "bad signature",
        at(env["signatures"][0]["sig"], 5): "bad signature",
        at(env["signatures"][0]["keyid"], 3): "keyid",
        at(pem, 40): "publicKey",
        at('"payloadType"', 3): "payloadType",
        at("application/vnd.in-toto", 3): "payloadType",
    }
    base64_regions = {at(env["payload"], 100), at(env["signatures"][0]["sig"], 5)}
    for pos, expected in cases.items():
        # Inside base64 a bit flip can leave the alphabet ('Z' ^ 1 == '['), which is a
        # format error, not a signature failure; swap in another base64 letter there instead.
        if pos in base64_regions:
            tampered = bytearray(text)
            tampered[pos] = ord("B") if text[pos] == ord("A") else ord("A")
            data = bytes(tampered)
        else:
            data = flipped(text, pos)
        v = verify_report_bytes(data, report)
        assert not v.valid and any(expected in p for p in v.problems), (pos, v.problems)
    # whitespace re-formatting keeps JSON and signature intact but is still refused
    v = verify_report_bytes(text.replace(b'\n  "payload"', b'\n   "payload"'), report)
    assert v.signature_ok and not v.valid and "canonical form" in v.problems[0]


def test_well_signed_but_malformed_predicate_names_the_field(tmp_path: Path, key: Path) -> None:
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "m", "digest": {"sha256": "0" * 64}}],
        "predicateType": "https://lmsan.dev/audit/v1",
        "predicate": {"format": "lmsan.report", "version": 2},
    }
    env = sign_envelope(json.dumps(statement).encode(), load_private_key(key))
    assert check_envelope(env).signature_ok
    path = tmp_path / "odd.json"
    path.write_bytes(dump_envelope(env))
    with pytest.raises(FormatError, match="'predicate.version' is 2"):
        read_report(path)
    v = verify_report(path)
    assert v.signature_ok and not v.valid
    assert v.problems == ["field 'predicate.version' is 2, this lmsan reads 1"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda m: (m / "config.json").write_text("{}"), "model file changed: config.json"),
        (lambda m: (m / "tokenizer" / "extra.txt").write_text("x"), "added: tokenizer/extra.txt"),
        (lambda m: (m / "model.safetensors").unlink(), "model file removed: model.safetensors"),
    ],
)
def test_model_change_fails_and_names_the_file(report: Path, model: Path, change, expected) -> None:
    change(model)
    assert verify_report(report).valid  # the report itself is intact
    v = verify_report(report, model_dir=model)
    assert v.signature_ok and not v.valid
    assert any(expected in p for p in v.problems), v.problems
    assert len(v.problems) == 1


def test_pub_pins_the_signer(tmp_path: Path, report: Path, key: Path) -> None:
    right = verify_report(report, pub=Path(f"{key}.pub"))
    assert right.valid and right.pinned
    assert verify_report(report, pub=key).valid  # a private key file gives its public half
    other = generate_key(tmp_path / "other.pem", "ecdsa-p256")
    wrong = verify_report(report, pub=other.pub_path)
    assert not wrong.valid and not wrong.signature_ok
    assert any("not by the pinned key" in p for p in wrong.problems)


def test_ecdsa_signed_report_verifies(tmp_path: Path, model: Path) -> None:
    k = generate_key(tmp_path / "ec.pem", "ecdsa-p256")
    out = tmp_path / "r.json"
    info = write_signed_report(make_payload(), model, out, k.path)
    assert info.fingerprint == k.fingerprint
    assert verify_report(out, model_dir=model, pub=k.pub_path).valid


def test_unreadable_inputs_raise_input_errors(tmp_path: Path, report: Path) -> None:
    with pytest.raises(InputError, match="report not found"):
        verify_report(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FormatError, match="not valid JSON"):
        verify_report(tmp_path / "bad.json")
    with pytest.raises(InputError, match="model folder not found"):
        verify_report(report, model_dir=tmp_path / "gone")
    with pytest.raises(InputError, match="public key not found"):
        verify_report(report, pub=tmp_path / "nokey.pub")
    (tmp_path / "p.json").write_text('{"format": "lmsan.other"}')
    with pytest.raises(FormatError, match="neither a PV set"):
        load_pvset(tmp_path / "p.json")


def test_verify_is_torch_free(report: Path, model: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from lmsan.auditor.report import verify_report
        assert verify_report({str(report)!r}, model_dir={str(model)!r}).valid
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_keygen(tmp_path: Path) -> None:
    out = tmp_path / "k.pem"
    r = runner.invoke(app, ["keygen", "--out", str(out), "--kind", "ecdsa-p256"])
    assert r.exit_code == 0, r.output
    fp = fingerprint(load_private_key(out).public_key())
    assert fp in r.output.replace("\n", "")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    r = runner.invoke(app, ["keygen", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    assert load_private_key(out).public_key() is not None  # untouched
    r = runner.invoke(app, ["keygen", "--out", str(out), "--force"])
    assert r.exit_code == 0 and fp not in r.output.replace("\n", "")


def test_cli_keygen_default_location(_lmsan_home: Path) -> None:
    r = runner.invoke(app, ["keygen"])
    assert r.exit_code == 0, r.output
    assert (_lmsan_home / "signing_key.pem").is_file()


def test_cli_verify_exit_codes(tmp_path: Path, report: Path, model: Path, key: Path) -> None:
    r = runner.invoke(app, ["verify", str(report), "--model", str(model), "--pub", f"{key}.pub"])
    assert r.exit_code == 0 and "VALID" in r.output, r.output

    (model / "config.json").write_text("{}")
    (model / "new.bin").write_bytes(b"\0")
    r = runner.invoke(app, ["verify", str(report), "--model", str(model)])
    assert r.exit_code == 1 and "INVALID" in r.output
    assert "changed: config.json" in r.output and "added: new.bin" in r.output

    other = generate_key(tmp_path / "o.pem")
    r = runner.invoke(app, ["verify", str(report), "--pub", str(other.pub_path)])
    assert r.exit_code == 1 and "pinned key" in r.output

    original = report.read_bytes()
    for pos in range(0, len(original), max(1, len(original) // 40)):
        flip(report, pos)
        r = runner.invoke(app, ["verify", str(report)])
        assert r.exit_code in (1, 2), (pos, r.output)
        assert isinstance(r.exception, SystemExit), r.exception  # never a traceback
        report.write_bytes(original)

    r = runner.invoke(app, ["verify", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "report not found" in r.output
    (tmp_path / "notjson.json").write_bytes(b"\x89PNG\r\n")
    r = runner.invoke(app, ["verify", str(tmp_path / "notjson.json")])
    assert r.exit_code == 2 and "not a report" in r.output


def test_lmsan_errors_keep_their_exit_code_through_main(tmp_path: Path) -> None:
    """The console script must not turn exit code 2 (input error) into 4 (usage error)."""
    r = subprocess.run(
        ["lmsan", "verify", str(tmp_path / "missing.json")], capture_output=True, text=True
    )
    assert r.returncode == 2, (r.returncode, r.stderr)


def _with_forged_verdict(report: Path, verdict: str) -> Path:
    """`report` with its payload's verdict replaced, in canonical form, signature left as is."""
    env = json.loads(report.read_bytes())
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["verdict"] = verdict
    body = json.dumps(st, sort_keys=True, separators=(",", ":")).encode()
    env["payload"] = base64.b64encode(body).decode("ascii")
    out = report.with_name("forged.json")
    out.write_bytes(dump_envelope(env))
    return out


def test_cli_verify_does_not_show_a_forged_verdict_as_trusted(report: Path) -> None:
    forged = _with_forged_verdict(report, "clean")
    r = runner.invoke(app, ["verify", str(forged)])
    assert r.exit_code == 1, r.output
    assert "signature INVALID: verdict not trusted" in r.output
    assert not re.search(r"^verdict\s+clean", r.output, re.M), r.output
    assert "bad signature" in r.output and "INVALID" in r.output
    # an intact report shows its verdict
    r = runner.invoke(app, ["verify", str(report)])
    assert r.exit_code == 0 and re.search(r"^verdict\s+backdoor", r.output, re.M), r.output


def test_cli_verify_names_a_key_that_does_not_match_the_pinned_one(
    tmp_path: Path, report: Path, key: Path
) -> None:
    other = generate_key(tmp_path / "o.pem")
    r = runner.invoke(app, ["verify", str(report), "--pub", str(other.pub_path)])
    out = " ".join(r.output.split())
    assert r.exit_code == 1, r.output
    assert "pinned with --pub)" not in out
    assert "does not match the key pinned with --pub" in out and other.fingerprint in out
    assert "verdict not trusted" in out
    r = runner.invoke(app, ["verify", str(report), "--pub", f"{key}.pub"])
    assert r.exit_code == 0 and "(pinned with --pub)" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize(
    "content, what",
    [
        ('{"hello": 1}\n', "none of the fields"),
        ('[1, 2]\n', "not a JSON object"),
        ('{"format": "lmsan.pvset", "version": 1}\n', "'lmsan.pvset' file"),
    ],
)
def test_cli_verify_a_json_file_that_is_not_an_envelope(
    tmp_path: Path, content: str, what: str
) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "not an lmsan report: not a DSSE envelope" in out and what in out
    assert "canonical form" not in out and "INVALID" not in out
    with pytest.raises(FormatError, match="not a DSSE envelope"):
        verify_report(path)
