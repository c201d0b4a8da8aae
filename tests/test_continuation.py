"""`lmsan audit --continue-from`: an audit run in parts equals the audit run in one go.

Every candidate a seed makes enters the path loss of the seeds after it, so the thresholds here
make every seed a candidate (T_L 0) that the filter rejects (T_collapse 0): seed 2 trains against
the candidates of seeds 0 and 1, and a part that started without them would train it otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmsan.auditor.cli import app
from typer.testing import CliRunner

runner = CliRunner()
ARGS = ["--max-length", "48", "--target", "cls", "--quiet", "--t-l", "0", "--t-collapse", "0",
        "--seeds-per-pass", "1", "--no-first-stage"]


def _audit(pair: dict[str, Path], out: Path, *extra: str) -> tuple[int, dict, str]:
    from lmsan.auditor.report import read_report

    key = out.parent / "key.pem"
    if not key.exists():
        assert runner.invoke(app, ["keygen", "--out", str(key)]).exit_code == 0
    r = runner.invoke(app, ["audit", str(pair["clean"]), "--corpus", str(pair["corpus"]),
                            "--out", str(out), "--key", str(key), *ARGS, *extra])
    return r.exit_code, (read_report(out) if r.exit_code in (0, 1) else {}), r.output


def _figures(seed: dict) -> str:
    s = dict(seed)
    s.pop("seconds")
    return json.dumps(s, sort_keys=True)


@pytest.fixture(scope="module")
def runs(tiny_por_pair, tmp_path_factory) -> dict[str, tuple[int, dict, str]]:
    d = tmp_path_factory.mktemp("continue")
    out = {"full": _audit(tiny_por_pair, d / "full.json", "--max-seeds", "3"),
           "part1": _audit(tiny_por_pair, d / "part1.json", "--max-seeds", "2"),
           "alone": _audit(tiny_por_pair, d / "alone.json", "--max-seeds", "1",
                           "--first-seed", "2")}
    out["part2"] = _audit(tiny_por_pair, d / "part2.json", "--max-seeds", "3",
                          "--continue-from", str(d / "part1.json"))
    out["dir"] = (0, {"path": str(d)}, "")
    return out


def test_the_seeds_make_candidates_so_the_history_matters(runs) -> None:
    code, full, output = runs["full"]
    assert code == 0, output
    assert full["verdict"] == "clean"
    cands = [t for s in full["seeds"] for t in s["targets"] if t["candidate"]]
    assert len(cands) == 3, "every seed must make a candidate for this test to mean anything"
    # seed 2 trained alone, without the candidates of seeds 0-1, ends elsewhere
    alone = runs["alone"][1]["seeds"][0]
    assert alone["seed"] == 2
    assert _figures(alone) != _figures(full["seeds"][2])


def test_a_continued_audit_equals_the_audit_run_in_one_go(runs) -> None:
    full, part1 = runs["full"][1], runs["part1"][1]
    code, part2, output = runs["part2"]
    assert code == 0, output
    assert [s["seed"] for s in part2["seeds"]] == [0, 1, 2]
    for a, b in zip(full["seeds"], part2["seeds"], strict=True):
        assert _figures(a) == _figures(b)  # seed 2 bit for bit, seeds 0-1 carried over
    assert part2["rejected_candidates"] == full["rejected_candidates"]
    cf = part2["continued_from"]
    assert cf["report"] == "part1.json" and cf["seeds"] == [0, 1]
    assert cf["signer"] and len(cf["sha256"]) == 64
    assert part1["continued_from"] is None


def test_continuing_with_other_settings_is_refused(runs, tiny_por_pair, monkeypatch) -> None:
    import lmsan.auditor.audit as audit_mod

    def no_first_stage(*a: object, **k: object) -> None:
        raise AssertionError("the first stage ran before the settings were checked")

    monkeypatch.setattr(audit_mod, "run_first_stage", no_first_stage)
    d = Path(runs["dir"][1]["path"])
    part1 = str(d / "part1.json")
    code, _, output = _audit(tiny_por_pair, d / "x.json", "--max-seeds", "3",
                             "--continue-from", part1, "--lambda-p", "0.9", "--first-stage")
    assert code == 4 and "mining parameter lambda_p differs" in output, output
    code, _, output = _audit(tiny_por_pair, d / "y.json", "--max-seeds", "2",
                             "--continue-from", part1)
    assert code == 4 and "already ran 2 seeds" in output, output
    assert not (d / "x.json").exists() and not (d / "y.json").exists()


def test_a_tampered_report_cannot_be_continued(runs, tiny_por_pair) -> None:
    d = Path(runs["dir"][1]["path"])
    env = json.loads((d / "part1.json").read_text())
    env["signatures"][0]["sig"] = env["signatures"][0]["sig"][::-1]
    bad = d / "tampered.json"
    bad.write_text(json.dumps(env))
    code, _, output = _audit(tiny_por_pair, d / "z.json", "--max-seeds", "3",
                             "--continue-from", str(bad))
    assert code == 2 and "does not verify" in output and "Traceback" not in output, output
