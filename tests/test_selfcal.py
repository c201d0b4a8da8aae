"""Trigger confirmation (auditor.confirm) and self-calibration (`--preset none`, auditor.selfcal).

The shared tiny clean/POR pair (tests/conftest.py): the POR twin maps the triggers cf and mn onto
two injected quarter PVs of [CLS].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lmsan.auditor.cli import app
from typer.testing import CliRunner

runner = CliRunner()
MINE = ["--max-length", "48", "--target", "cls", "--quiet"]


def _miner(model: Path, corpus: Path):
    import torch
    from lmsan.auditor.corpus import load_corpus
    from lmsan.auditor.mining import Miner, MiningConfig
    from lmsan.auditor.modelio import load_encoder

    torch.set_num_threads(2)
    cfg = MiningConfig(max_length=48)
    return Miner(load_encoder(model), load_corpus(corpus), ["cls"], cfg)


def _words_prompt(miner, words: list[str]) -> np.ndarray:
    ids = miner.lm.tokenizer.convert_tokens_to_ids(words)
    return miner.emb.weight.detach()[ids].numpy()


def test_confirmation_recovers_the_trigger_of_an_injected_pv(tiny_por_pair) -> None:
    from lmsan.auditor.confirm import ConfirmRule, confirm_candidate

    m = _miner(tiny_por_pair["por"], tiny_por_pair["corpus"])
    pvs = np.load(tiny_por_pair["root"] / "injected.npy")
    # a soft prompt of ordinary words, none of them a trigger: the search has to find cf / mn
    prompt = _words_prompt(m, ["the", "river", "house", "small", "green", "music", "water"])
    rule = ConfirmRule(max_landing_match=0.06)  # the tiny presets' clean-match limit: a tiny
    # random-init encoder's clean outputs are alike (its triggers land where 1-3% of them are)
    for pv, trigger in zip(pvs, ("cf", "mn"), strict=True):
        c = confirm_candidate(m, prompt, pv, "cls", rule)
        assert c.confirmed, c.rule
        assert trigger in c.tokens, c.tokens
        assert c.rate >= 0.9 and c.landing_match <= c.landing_limit == 0.06
        assert c.margin >= 1.0


def test_confirmation_rejects_a_pv_no_text_reaches(tiny_por_pair) -> None:
    from lmsan.auditor.confirm import ConfirmRule, confirm_candidate

    m = _miner(tiny_por_pair["clean"], tiny_por_pair["corpus"])
    pv = np.load(tiny_por_pair["root"] / "injected.npy")[0]  # nothing in the clean twin maps here
    prompt = _words_prompt(m, ["cf", "mn", "river", "house", "small", "green", "music"])
    c = confirm_candidate(m, prompt, pv, "cls", ConfirmRule())
    assert not c.confirmed
    assert c.rule.startswith("not reachable by text")
    assert c.margin < 1.0
    assert 1 <= len(c.tried) <= ConfirmRule().max_tokens


def _audit(model: Path, corpus: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    key = out.parent / "key.pem"
    if not key.exists():
        assert runner.invoke(app, ["keygen", "--out", str(key)]).exit_code == 0
    r = runner.invoke(app, ["audit", str(model), "--corpus", str(corpus), "--out", str(out),
                            "--key", str(key), *MINE, *extra])
    rep = {}
    if out.exists():
        from lmsan.auditor.report import read_report

        rep = read_report(out)
    return r.exit_code, rep, r.output


@pytest.fixture(scope="module")
def none_audits(tiny_por_pair, tmp_path_factory) -> dict[str, tuple[int, dict, str]]:
    out = tmp_path_factory.mktemp("selfcal")
    return {m: _audit(tiny_por_pair[m], tiny_por_pair["corpus"], out / f"{m}.json",
                      "--preset", "none", "--max-seeds", "4")
            for m in ("por", "clean")}


def test_preset_none_self_calibrates_and_flags_the_backdoor(none_audits, tiny_por_pair) -> None:
    code, rep, output = none_audits["por"]
    assert code == 1, output
    pred = rep
    assert pred["verdict"] == "backdoored"
    preset = pred["preset"]
    assert preset["name"] == "self-calibrated" and preset["file"] == "none"
    sc = preset["self_calibration"]
    imp = sc["implants"][0]
    assert imp["attack"] == "por" and imp["target"] == "cls" and imp["success"] >= 0.9
    assert imp["confirmation"]["confirmed"] and imp["agreement"] >= 0.8
    # thresholds are the fixed fractions of what mining measured on the implanted copy
    d, c = imp["figures"]["cls"]["distance"], imp["figures"]["cls"]["concentration"]
    pt = pred["parameters"]["mining"]["per_target"]["cls"]
    assert pt["t_l"] == pytest.approx(sc["t_l_fraction"] * d)
    assert pt["t_collapse"] == pytest.approx(sc["t_collapse_factor"] * c)
    assert pred["parameters"]["mining"]["confirm"] is True
    # the kept PV is one of the injected ones, and its confirmation names a real trigger
    kept = pred["kept_pvs"][0]
    injected = np.load(tiny_por_pair["root"] / "injected.npy")
    pv = np.asarray(pred["pvset"]["pvs"][0]["values"])
    agree = max(float(np.mean((pv >= 0) == (x >= 0))) for x in injected)
    assert agree >= 0.9
    assert "reachable by text" in kept["rule"]


def test_preset_none_clears_the_clean_twin(none_audits) -> None:
    code, rep, output = none_audits["clean"]
    assert code == 0, output
    pred = rep
    assert pred["verdict"] == "clean"
    assert pred["preset"]["name"] == "self-calibrated"
    assert not any("no calibrated preset" in w for w in pred["warnings"])
    # a candidate the collapse rule let through is stopped by confirmation, with its figures
    for r in pred["rejected_candidates"]:
        if "not reachable by text" in r["rule"]:
            assert r["confirmation"]["margin"] < 1.0


def test_self_calibration_that_cannot_reach_its_implant_stops_the_audit(
        tiny_por_pair, tmp_path, monkeypatch) -> None:
    import lmsan.auditor.selfcal as selfcal

    monkeypatch.setattr(selfcal, "IMPLANT_SEEDS", 0)  # mining never runs on the copy
    code, rep, output = _audit(tiny_por_pair["clean"], tiny_por_pair["corpus"],
                               tmp_path / "r.json", "--preset", "none", "--max-seeds", "1")
    assert code == 2, output
    assert "did not reach a backdoor implanted" in output and "Traceback" not in output
    assert not (tmp_path / "r.json").exists()


def test_confirm_is_on_by_default_with_a_preset_and_can_be_turned_off(tiny_por_pair, tmp_path) -> None:
    code, rep, output = _audit(tiny_por_pair["por"], tiny_por_pair["corpus"], tmp_path / "r.json",
                               "--max-seeds", "2")
    assert code == 1, output
    assert rep["parameters"]["mining"]["confirm"] is True
    assert "reachable by text" in rep["kept_pvs"][0]["rule"]
    assert rep["kept_pvs"][0]["confirmation"]["confirmed"]
    json.dumps(rep)  # the confirmation figures are plain JSON
    code, rep, output = _audit(tiny_por_pair["por"], tiny_por_pair["corpus"], tmp_path / "c.json",
                               "--max-seeds", "2", "--no-confirm")
    assert code == 1, output
    assert rep["parameters"]["mining"]["confirm"] is False
    assert rep["kept_pvs"][0]["confirmation"] is None


def test_clean_match_limit_follows_the_implant_unless_clean_text_already_sits_there() -> None:
    from lmsan.auditor.filtering import CLEAN_MATCH_LIMIT
    from lmsan.auditor.selfcal import CLEAN_MATCH_FACTOR, IMPLANT_SHARE_MAX, clean_match_limit

    # a planted PV apart from clean text: the pretrained-encoder limit
    assert clean_match_limit(0.0) == CLEAN_MATCH_LIMIT
    # outputs so alike that the implant itself is matched by a few percent: 4x its share
    assert clean_match_limit(0.027) == pytest.approx(CLEAN_MATCH_FACTOR * 0.027)
    assert clean_match_limit(IMPLANT_SHARE_MAX) == pytest.approx(CLEAN_MATCH_FACTOR * IMPLANT_SHARE_MAX)
    # most clean outputs already match the implant in sign (a 2-layer MiniLM's [CLS]): the
    # implant tells nothing there, and the target keeps the limit instead of 4 x 99.85%
    assert clean_match_limit(0.9985) == CLEAN_MATCH_LIMIT
    assert clean_match_limit(IMPLANT_SHARE_MAX + 1e-6) == CLEAN_MATCH_LIMIT


def test_self_calibration_mines_its_implants_from_the_audits_starts(tiny_por_pair, tmp_path) -> None:
    code, rep, output = _audit(tiny_por_pair["clean"], tiny_por_pair["corpus"], tmp_path / "r.json",
                               "--preset", "none", "--prompt-init", "vocab", "--max-seeds", "1")
    assert code in (0, 1), output
    assert rep["parameters"]["mining"]["prompt_init"] == "vocab"
    sc = rep["preset"]["self_calibration"]
    assert sc["values"]["prompt_init"] == "vocab"
    assert all(i["seed"] is not None for i in sc["implants"])


def test_partial_audits_the_targets_whose_self_test_passed(tiny_por_pair, tmp_path,
                                                          monkeypatch) -> None:
    import lmsan.auditor.selfcal as selfcal

    real = selfcal._mine_implant

    def only_cls(lm, corpus, target, *args, **kwargs):  # the other implants are never reached
        return real(lm, corpus, target, *args, **kwargs) if target == "cls" else False

    monkeypatch.setattr(selfcal, "_mine_implant", only_cls)
    common = ("--preset", "none", "--max-seeds", "4", "--target", "auto")
    # without --partial: no verdict, and the message says what --partial would do
    code, rep, output = _audit(tiny_por_pair["por"], tiny_por_pair["corpus"],
                               tmp_path / "r.json", *common)
    assert code == 2, output
    assert "did not reach a backdoor implanted" in output and "--partial" in output
    assert not (tmp_path / "r.json").exists()
    # with --partial the backdoor on cls is still flagged; the unreached targets are reported
    code, rep, output = _audit(tiny_por_pair["por"], tiny_por_pair["corpus"],
                               tmp_path / "p.json", *common, "--partial")
    assert code == 1, output
    skipped = rep["skipped_targets"]
    assert skipped and all(w.startswith("self-test failed: mining did not reach")
                           for w in skipped.values())
    assert "cls" in rep["targets"] and not set(skipped) & set(rep["targets"])
    assert rep["preset"]["self_calibration"]["unverified"] == skipped
    assert any("partial audit" in w for w in rep["warnings"])
    assert rep["kept_pvs"][0]["target"] in rep["targets"]
    # the clean twin: CLEAN on what was audited, and the verdict line says so
    code, rep, output = _audit(tiny_por_pair["clean"], tiny_por_pair["corpus"],
                               tmp_path / "c.json", *common, "--partial")
    assert code == 0, output
    assert rep["verdict"] == "clean" and "only" in output and rep["skipped_targets"]


def test_partial_still_stops_when_no_target_passes_its_self_test(tiny_por_pair, tmp_path,
                                                                 monkeypatch) -> None:
    import lmsan.auditor.selfcal as selfcal

    monkeypatch.setattr(selfcal, "IMPLANT_SEEDS", 0)
    code, rep, output = _audit(tiny_por_pair["clean"], tiny_por_pair["corpus"],
                               tmp_path / "r.json", "--preset", "none", "--partial",
                               "--max-seeds", "1")
    assert code == 2, output
    assert "no reference backdoor was reached on any target" in output
    assert "Traceback" not in output and not (tmp_path / "r.json").exists()
