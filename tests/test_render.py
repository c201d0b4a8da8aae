"""`lmsan report`: readable renderings (text, md, html, sarif) of a real signed audit report.

A tiny clean BERT and its POR-backdoored twin are built once and audited with `lmsan audit` (as in
tests/test_audit.py); each rendering is checked against the report's own figures.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
from lmsan.auditor.cli import app
from lmsan.auditor.render import FORMATS, load_verified, render
from lmsan.auditor.report import dump_envelope, read_report
from typer.testing import CliRunner

runner = CliRunner()
SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
MINE = ["--max-length", "48", "--target", "cls", "--quiet"]


@pytest.fixture(scope="session")
def audited(
    tmp_path_factory: pytest.TempPathFactory, tiny_por_pair: dict[str, Path]
) -> dict[str, Path]:
    """Signed reports of a backdoored (search mode: several PVs) and a clean tiny BERT."""
    root = tmp_path_factory.mktemp("render")
    clean, corpus = tiny_por_pair["clean"], tiny_por_pair["corpus"]
    por = tiny_por_pair["por"]
    key = root / "key.pem"
    r = runner.invoke(app, ["keygen", "--out", str(key)])
    assert r.exit_code == 0, r.output
    out = {"root": root, "key": key, "por": por, "clean": clean}
    for name, model, extra in (("backdoored", por, ["--mode", "search", "--max-seeds", "4"]),
                               ("clean_report", clean, ["--max-seeds", "3"])):
        rep = root / f"{name}.json"
        r = runner.invoke(app, ["audit", str(model), "--corpus", str(corpus), "--out", str(rep),
                                "--key", str(key), *MINE, *extra])
        assert r.exit_code in (0, 1), r.output
        out[name] = rep
    return out


def kept(report: Path) -> list[dict]:
    return read_report(report)["kept_pvs"]


def thresholds(report: Path, target: str) -> dict[str, float]:
    mining = read_report(report)["parameters"]["mining"]
    own = mining.get("per_target", {}).get(target, {})
    return {k: own.get(k, mining[k]) for k in ("t_l", "t_collapse")}


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, ["report", *args])
    assert isinstance(r.exception, SystemExit) or r.exception is None, r.exception
    return r.exit_code, r.stdout, r.stderr


def tamper(report: Path, dest: Path) -> Path:
    """Flip one byte of the signed payload (a digit of the run time), keep the file canonical."""
    env = json.loads(report.read_bytes())
    payload = bytearray(base64.b64decode(env["payload"]))
    i = payload.index(b'"seconds":') + len(b'"seconds":')
    assert chr(payload[i]).isdigit()
    payload[i] ^= 0x01  # one digit becomes another: still JSON, no longer what was signed
    env["payload"] = base64.b64encode(bytes(payload)).decode("ascii")
    dest.write_bytes(dump_envelope(env))
    return dest


# --- the report's content in each format ----------------------------------------------------


def test_backdoored_report_is_real_and_has_kept_pvs(audited) -> None:
    v = load_verified(audited["backdoored"])
    assert v.valid, v.problems
    pred = read_report(audited["backdoored"])
    assert pred["verdict"] == "backdoored" and len(pred["kept_pvs"]) >= 1
    assert read_report(audited["clean_report"])["verdict"] == "clean"


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_names_the_verdict(audited, fmt: str) -> None:
    for name, verdict in (("backdoored", "BACKDOORED"), ("clean_report", "CLEAN")):
        code, out, _ = run(str(audited[name]), "--format", fmt)
        assert code == 0
        assert verdict in out, (name, fmt)
        assert "UNVERIFIED" not in out
        other = "CLEAN" if verdict == "BACKDOORED" else "BACKDOORED"
        assert other not in out, (name, fmt)


@pytest.mark.parametrize("fmt", ["text", "md"])
def test_text_and_md_give_each_kept_pv_with_its_margin(audited, fmt: str) -> None:
    rep = audited["backdoored"]
    out = render(load_verified(rep), fmt)
    pvs = kept(rep)
    assert pvs
    for k in pvs:
        th = thresholds(rep, k["target"])
        assert k["target"] in out
        margin = th["t_collapse"] - k["concentration"]  # the concentration must lie below it
        assert margin > 0
        assert f"{margin:+.4g}" in out, (k, out)
        words = list(dict.fromkeys(h[0] for h in k["trigger_hint"]))
        assert all(w in out for w in words)
    assert "lmsan verify" in out and "lmsan audit" in out  # how to verify and reproduce


def test_clean_text_says_why_and_how_close(audited) -> None:
    verified = load_verified(audited["clean_report"])
    out = render(verified, "text")
    n_seeds = len(verified.verification.predicate["seeds"])  # 3, or 6 when the first stage flags
    assert n_seeds >= 3
    assert "CLEAN" in out and f"No legitimate PV in {n_seeds} seed(s)" in out
    assert "T_L" in out  # the nearest approach, against its threshold


def test_html_is_one_self_contained_file(audited, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    page = dest / "report.html"
    code, _, _ = run(str(audited["backdoored"]), "--format", "html", "--out", str(page))
    assert code == 0
    assert [p.name for p in dest.iterdir()] == ["report.html"]
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"<script|<link|<iframe|<img|@import|url\(", html, re.I)
    assert html.count("<svg") >= 3  # distance chart, concentration chart, sign strip
    assert "T_L" in html and "T_collapse" in html
    for k in kept(audited["backdoored"]):
        assert k["trigger_hint"][0][0] in html
    fp = json.loads(audited["backdoored"].read_bytes())["signatures"][0]["keyid"]
    assert fp in html  # signature status names the signer


def _validator():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema)


def test_sarif_validates_and_has_one_result_per_kept_pv(audited) -> None:
    validator = _validator()
    rep = audited["backdoored"]
    doc = json.loads(render(load_verified(rep), "sarif"))
    errors = sorted(validator.iter_errors(doc), key=str)
    assert not errors, [e.message for e in errors[:5]]
    assert doc["version"] == "2.1.0" and len(doc["runs"]) == 1
    run_ = doc["runs"][0]
    assert run_["tool"]["driver"]["name"] == "lmsan" and run_["tool"]["driver"]["version"]
    assert run_["tool"]["driver"]["rules"]
    pvs = kept(rep)
    assert len(run_["results"]) == len(pvs) >= 1
    for res, k in zip(run_["results"], pvs, strict=True):
        assert res["level"] == "error"
        text = res["message"]["text"]
        assert k["target"] in text and f"seed {k['seed']}" in text
        assert k["trigger_hint"][0][0] in text
        loc = res["locations"][0]["physicalLocation"]["artifactLocation"]
        assert loc["uri"] == "model.safetensors" and loc["uriBaseId"] == "MODELDIR"
    base = run_["originalUriBaseIds"]["MODELDIR"]["uri"]
    assert base == audited["por"].resolve().as_uri() + "/"
    assert run_["properties"]["verdict"] == "BACKDOORED"


def test_sarif_of_a_clean_report_has_no_results(audited) -> None:
    validator = _validator()
    doc = json.loads(render(load_verified(audited["clean_report"]), "sarif"))
    assert not list(validator.iter_errors(doc))
    assert len(doc["runs"]) == 1 and doc["runs"][0]["results"] == []
    assert doc["runs"][0]["properties"]["verdict"] == "CLEAN"


# --- trust: the report is verified before it is rendered ------------------------------------


def test_tampered_report_is_refused(audited, tmp_path: Path) -> None:
    bad = tamper(audited["backdoored"], tmp_path / "bad.json")
    code, out, err = run(str(bad), "--format", "md")
    assert code == 1
    assert out == ""  # nothing rendered
    assert "fails verification" in err and "bad signature" in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_tampered_report_renders_only_under_the_unverified_banner(audited, tmp_path: Path,
                                                                  fmt: str) -> None:
    bad = tamper(audited["backdoored"], tmp_path / "bad.json")
    code, out, err = run(str(bad), "--format", fmt, "--allow-unverified")
    assert code == 1
    assert "UNVERIFIED" in out and "BACKDOORED" in out
    assert "UNVERIFIED" in err
    if fmt == "sarif":
        validator = _validator()
        doc = json.loads(out)
        assert not list(validator.iter_errors(doc))
        inv = doc["runs"][0]["invocations"][0]
        assert inv["executionSuccessful"] is False
        assert "UNVERIFIED" in inv["toolExecutionNotifications"][0]["message"]["text"]
        assert all(r["message"]["text"].startswith("UNVERIFIED")
                   for r in doc["runs"][0]["results"])


def test_report_with_an_unreadable_payload_renders_unverified(audited, tmp_path: Path) -> None:
    """A flipped base64 character can leave the payload undecodable: still no traceback."""
    data = bytearray(audited["backdoored"].read_bytes())
    i = data.index(b'"payload": "') + len(b'"payload": "') + 40
    data[i] = ord("!")
    bad = tmp_path / "bad.json"
    bad.write_bytes(bytes(data))
    code, _, err = run(str(bad))
    assert code == 1 and "fails verification" in err
    code, out, _ = run(str(bad), "--allow-unverified", "--format", "html")
    assert code == 1 and "UNVERIFIED" in out and "UNKNOWN" in out


def test_pub_and_model_are_checked_as_by_verify(audited, tmp_path: Path) -> None:
    rep = audited["backdoored"]
    code, out, _ = run(str(rep), "--pub", f"{audited['key']}.pub", "--model", str(audited["por"]))
    assert code == 0 and "pinned with --pub" in out and "matches the report" in out
    code, _, err = run(str(rep), "--model", str(audited["clean"]))
    assert code == 1 and "model file changed" in err
    other = tmp_path / "other.pem"
    assert runner.invoke(app, ["keygen", "--out", str(other)]).exit_code == 0
    code, _, err = run(str(rep), "--pub", f"{other}.pub")
    assert code == 1 and "pinned key" in err


# --- bad input ------------------------------------------------------------------------------


def test_missing_or_not_a_report_exits_2_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    code, out, err = run(str(missing))
    assert code == 2 and str(missing) in err and "report not found" in err and out == ""
    for name, data in (("png.json", b"\x89PNG\r\n"), ("obj.json", b'{"verdict": "clean"}\n'),
                       ("list.json", b"[1, 2]\n")):
        p = tmp_path / name
        p.write_bytes(data)
        code, _, err = run(str(p))
        assert code == 2 and str(p) in err and "Traceback" not in err, (name, err)
    code, _, err = run(str(tmp_path))
    assert code == 2 and "not a file" in err


def test_bad_format_is_a_usage_error_and_help_lists_the_formats(tmp_path: Path) -> None:
    r = subprocess.run(["lmsan", "report", str(tmp_path / "x.json"), "--format", "pdf"],
                       capture_output=True, text=True)
    assert r.returncode == 4 and "Traceback" not in r.stderr
    r = runner.invoke(app, ["report", "--help"])
    assert r.exit_code == 0 and all(f in r.output for f in FORMATS)


def test_out_into_a_missing_folder_exits_2(audited, tmp_path: Path) -> None:
    dest = tmp_path / "nope" / "r.md"
    code, _, err = run(str(audited["clean_report"]), "--format", "md", "--out", str(dest))
    assert code == 2 and "folder for the output does not exist" in err and not dest.exists()


def test_missing_file_through_the_console_script_has_no_traceback(tmp_path: Path) -> None:
    r = subprocess.run(["lmsan", "report", str(tmp_path / "missing.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "report not found" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_rendering_is_torch_free(audited) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from lmsan.auditor.render import load_verified, render
        v = load_verified({str(audited["backdoored"])!r})
        for fmt in ("text", "md", "html", "sarif"):
            render(v, fmt)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- trigger hints: the nearest usable vocabulary tokens of a soft prompt ------------------------


def _tiny_wordpiece():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]", "[unused2]",
             "cf", "mn", "the", "##y", "pt"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}), vocab


def test_trigger_hint_leaves_out_special_and_unused_tokens(tmp_path: Path) -> None:
    import numpy as np
    from lmsan.auditor.hints import nearest_tokens

    tok, vocab = _tiny_wordpiece()
    rng = np.random.default_rng(0)  # near-orthogonal rows: one-hot plus a little noise
    emb = (np.eye(len(vocab), 16) + 0.01 * rng.normal(size=(len(vocab), 16))).astype(np.float32)
    at = {t: i for i, t in enumerate(vocab)}
    # Position 0 sits on [PAD], then [unused0], then cf; position 1 on [unused1], [SEP], ##y, mn.
    p0 = emb[at["[PAD]"]] + 0.6 * emb[at["[unused0]"]] + 0.3 * emb[at["cf"]]
    p1 = emb[at["[unused1]"]] + 0.5 * emb[at["[SEP]"]] + 0.3 * emb[at["##y"]] + 0.2 * emb[at["mn"]]
    hint = nearest_tokens(np.stack([p0, p1]), emb, tok, k=2)
    assert len(hint) == 2 and all(len(h) == 2 for h in hint), hint
    ordinary = {"cf", "mn", "the", "##y", "pt"}
    assert all(w in ordinary for h in hint for w in h), hint
    assert hint[0][0] == "cf" and hint[1][0] == "##y"
    # the trained mining path hands tensors in; the result is the same
    torch = pytest.importorskip("torch")
    assert nearest_tokens(torch.from_numpy(np.stack([p0, p1])), torch.from_numpy(emb), tok, 2) == hint


def test_trigger_hint_decodes_byte_level_and_sentencepiece_pieces(tmp_path: Path) -> None:
    from lmsan.auditor.hints import readable_token, usable_token
    from transformers import RobertaTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "c": 5, "f": 6, "Ġ": 7,
             "cf": 8, "Ġcf": 9, "madeupword0000": 10}
    tok = RobertaTokenizerFast(vocab=vocab, merges=[("c", "f"), ("Ġ", "cf")])
    special = set(tok.all_special_ids)
    assert usable_token(tok, 9, special) == "cf"  # "Ġcf" reads as the word it is
    assert usable_token(tok, 8, special) == "cf"
    for empty in (0, 1, 2, 3, 4, 7, 10):  # special, a bare space marker, a placeholder
        assert usable_token(tok, empty, special) == "", empty
    wp, _ = _tiny_wordpiece()
    assert readable_token(wp, "##y") == "##y" and readable_token(wp, "##") == ""
