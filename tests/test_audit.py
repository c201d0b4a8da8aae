"""Audit: PV mining, filtering, verdicts, report, bad input, calibration.

Tiny models (d = 32, 2 layers) are built once per test run: a clean BERT, its POR-backdoored
twin (triggers cf, mn; two quarter PVs), and the shipped `tiny-bert-demo` preset (calibrated on
clean tiny shadow models built with other seeds) supplies the thresholds.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from lmsan.auditor.cli import app
from typer.testing import CliRunner

runner = CliRunner()
N_SENT = 512  # a quarter of the default corpus keeps each seed to ~2 s
MINE = ["--max-length", "48", "--target", "cls", "--quiet"]


@pytest.fixture(scope="session")
def tiny_models(tiny_por_pair: dict[str, Path]) -> dict[str, Path]:
    """The shared tiny clean/POR pair (tests/conftest.py)."""
    return tiny_por_pair


def _audit(model: Path, corpus: Path, out: Path, *extra: str) -> tuple[int, dict]:
    r = runner.invoke(app, ["audit", str(model), "--corpus", str(corpus), "--out", str(out),
                            "--key", str(out.parent / "key.pem"), *MINE, *extra])
    rep = {}
    if out.exists():
        from lmsan.auditor.report import read_report

        rep = read_report(out)
    return r.exit_code, rep | {"_output": r.output}


@pytest.fixture(scope="session")
def signing_key(tiny_models: dict[str, Path]) -> Path:
    key = tiny_models["root"] / "key.pem"
    r = runner.invoke(app, ["keygen", "--out", str(key)])
    assert r.exit_code == 0, r.output
    return key


@pytest.fixture(scope="session")
def por_audit(tiny_models: dict[str, Path], signing_key: Path) -> tuple[int, dict, Path]:
    out = signing_key.parent / "por-report.json"
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"], out, "--max-seeds", "6")
    return code, rep, out


@pytest.fixture(scope="session")
def clean_audit(tiny_models: dict[str, Path], signing_key: Path) -> tuple[int, dict, Path]:
    out = signing_key.parent / "clean-report.json"
    code, rep = _audit(tiny_models["clean"], tiny_models["corpus"], out, "--max-seeds", "3")
    return code, rep, out


def test_a_stopped_audit_keeps_its_finished_seeds(tiny_models, signing_key, monkeypatch) -> None:
    """Every finished seed is written to REPORT.partial.jsonl as it ends: the file is gone once
    the report is written, and an audit stopped during its third seed keeps seeds 0 and 1, equal
    to what the finished audit's report records for them. Running it again refuses to drop them;
    --continue-from the file finishes the audit with the uninterrupted audit's seeds."""
    import lmsan.auditor.mining as mining

    args = ("--max-seeds", "3", "--seeds-per-pass", "1", "--no-first-stage")
    out = signing_key.parent / "whole.json"
    code, full = _audit(tiny_models["clean"], tiny_models["corpus"], out, *args)
    assert code == 0 and not out.with_name("whole.partial.jsonl").exists()
    real = mining.Miner.run_seeds
    calls: list[int] = []

    def stop_at_third(self, seeds, progress=None):  # noqa: ANN001, ANN202
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-seed
        calls.append(1)
        return real(self, seeds, progress)

    monkeypatch.setattr(mining.Miner, "run_seeds", stop_at_third)
    stopped = signing_key.parent / "stopped.json"
    code, _ = _audit(tiny_models["clean"], tiny_models["corpus"], stopped, *args)
    assert code != 0 and not stopped.exists()
    rows = [json.loads(x) for x in
            stopped.with_name("stopped.partial.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows[1:]] == [0, 1]  # after the header line
    for row, seed in zip(rows[1:], full["seeds"][:2], strict=True):
        a, b = dict(row), dict(seed)
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert rows[0]["format"] == "lmsan.audit.partial" and rows[0]["model_digest"].startswith(
        "sha256:")
    partial = stopped.with_name("stopped.partial.jsonl")
    monkeypatch.setattr(mining.Miner, "run_seeds", real)
    # the same command again does not drop the finished seeds: it says how to go on
    code, rep = _audit(tiny_models["clean"], tiny_models["corpus"], stopped, *args)
    assert code == 4 and "--continue-from" in rep["_output"] and partial.exists()
    # the seeds of one model cannot continue the audit of another
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"],
                       signing_key.parent / "other.json", *args, "--continue-from", str(partial))
    assert code == 2 and "another model" in rep["_output"], rep["_output"]
    # continued from the partial file: seed 2 trains with seeds 0-1's candidates in its path
    # loss, so the report is the uninterrupted audit's, seed for seed
    code, cont = _audit(tiny_models["clean"], tiny_models["corpus"], stopped, *args,
                        "--continue-from", str(partial))
    assert code == 0 and not partial.exists(), cont["_output"]
    assert cont["continued_from"]["report"] == partial.name
    assert cont["continued_from"]["signer"] is None and cont["continued_from"]["seeds"] == [0, 1]
    for a, b in zip(cont["seeds"], full["seeds"], strict=True):
        a, b = dict(a), dict(b)
        a.pop("seconds"), b.pop("seconds")
        assert a == b


def test_seeds_that_make_candidates_run_one_at_a_time(tiny_models, signing_key,
                                                       monkeypatch) -> None:
    """A pass is cut short after its first seed that makes a candidate (the later seeds need
    its candidate in their path loss), so after a candidate seeds run alone: with T_L = 0 every
    seed makes one, and no seed is trained in a pass only to be thrown away."""
    import lmsan.auditor.mining as mining

    real = mining.Miner.run_seeds
    passes: list[list[int]] = []

    def record(self, seeds, progress=None):  # noqa: ANN001, ANN202
        passes.append(list(seeds))
        return real(self, seeds, progress)

    monkeypatch.setattr(mining.Miner, "run_seeds", record)
    out = signing_key.parent / "every-seed-a-candidate.json"
    code, rep = _audit(tiny_models["clean"], tiny_models["corpus"], out, "--max-seeds", "4",
                       "--no-first-stage", "--t-l", "0", "--no-confirm")
    assert all(any(t["candidate"] for t in s["targets"]) for s in rep["seeds"]), rep["_output"]
    assert passes == [[0], [1], [2], [3]][: len(rep["seeds"])]


def test_backdoored_model_is_flagged_and_pv_matches_injected(por_audit, tiny_models) -> None:
    code, rep, out = por_audit
    assert code == 1, rep["_output"]
    assert rep["verdict"] == "backdoored" and rep["found_targets"] == ["cls"]
    assert rep["preset"]["name"] == "tiny-bert-demo" and rep["preset"]["matched"]
    injected = np.load(tiny_models["root"] / "injected.npy")
    found = np.asarray(rep["pvset"]["pvs"][0]["values"])
    agreement = ((injected >= 0) == (found >= 0)).mean(axis=1).max()
    assert agreement >= 0.9
    kept = rep["kept_pvs"][0]
    assert kept["rule"].startswith("accepted")
    assert kept["concentration"] < rep["parameters"]["mining"]["t_collapse"]


def test_decide_early_flags_at_the_check_epoch(por_audit, tiny_models, signing_key) -> None:
    """--decide-early: the POR twin's accepting seed stops after the check epoch (2 of 4, half
    the steps of the same seed trained in full), and its PV still matches the injected one; the
    clean twin is still cleared."""
    _, full, _ = por_audit
    out = signing_key.parent / "por-early.json"
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"], out, "--max-seeds", "6",
                       "--decide-early")
    assert code == 1, rep["_output"]
    assert rep["parameters"]["mining"]["decide_early"] is True
    seed = next(s for s in rep["seeds"] if any(t["accepted"] for t in s["targets"]))
    assert seed["decided_early"] and seed["epochs_run"] == 2
    trained = [s for s in full["seeds"] if s["epochs_run"] == 4]  # the default: 4 epochs
    assert trained and not any(s["decided_early"] for s in full["seeds"])
    assert seed["steps"] * 2 == trained[0]["steps"]
    injected = np.load(tiny_models["root"] / "injected.npy")
    found = np.asarray(rep["pvset"]["pvs"][0]["values"])
    assert ((injected >= 0) == (found >= 0)).mean(axis=1).max() >= 0.9
    clean_out = signing_key.parent / "clean-early.json"
    code, rep = _audit(tiny_models["clean"], tiny_models["corpus"], clean_out, "--max-seeds",
                       "3", "--decide-early")
    assert code == 0 and rep["verdict"] == "clean", rep["_output"]


def test_clean_twin_is_not_flagged_and_rejections_are_explained(clean_audit) -> None:
    code, rep, out = clean_audit
    assert code == 0, (rep["_output"], [(x["seed"], x["targets"][0]["rule"]) for x in rep["seeds"]],
                       rep.get("preset"))
    assert rep["verdict"] == "clean" and rep["kept_pvs"] == []
    # a model the first stage flags gets twice the seed budget before a clean verdict
    fs = rep["first_stage"]
    expected = 3 * (2 if fs["verdict"] == "suspicious" else 1)
    assert len(rep["seeds"]) == expected == fs["seed_budget"]["used"]
    assert fs["seed_budget"]["extended"] == (fs["verdict"] == "suspicious")
    # every seed that produced a candidate says which rule rejected it and with which figures
    for c in rep["rejected_candidates"]:
        assert c["rule"].startswith("rejected:")
        assert c["concentration"] is not None and math.isfinite(c["concentration"])
    rules = [c["rule"] for c in rep["rejected_candidates"]]
    assert any("no collapse" in r for r in rules) or not rules


def test_first_stage_figures_sit_beside_the_mining_and_stay_advisory(clean_audit, por_audit) -> None:
    """The first stage runs before mining; every deciding figure carries its threshold and
    margin. Random tiny BERTs look long-tailed to it (a false positive on the clean twin), so a
    flag orders the targets and extends the seeds, and the verdict stays the mining's."""
    for (_code, rep, _), verdict in ((clean_audit, "clean"), (por_audit, "backdoored")):
        fs = rep["first_stage"]
        assert rep["verdict"] == verdict and fs["verdict"] in ("suspicious", "unremarkable")
        assert fs["role"].startswith("advisory")
        figs = {t["target"]: t for t in fs["targets"]}
        assert {"cls", "mask", "tokens"} <= set(figs)
        for name in ("mask", "tokens"):
            t = figs[name]
            assert t["hfr_margin"] == pytest.approx(t["hfr"] - t["hfr_threshold"])
            assert t["alikeness_margin"] == pytest.approx(t["alikeness"] - t["alikeness_threshold"])
        assert sorted(fs["mining_order"]) == sorted(rep["targets"])
        if fs["verdict"] == "suspicious":  # flagged targets are mined first
            assert fs["mining_order"] == [t for t in fs["ranked_targets"] if t in rep["targets"]]
        else:
            assert fs["mining_order"] == rep["targets"]
    clean_fs = clean_audit[1]["first_stage"]
    if clean_fs["verdict"] == "suspicious":
        assert clean_fs["second_opinion"].startswith("disagree")
        assert "6 seeds" in clean_audit[1]["stop_reason"]


def test_audit_without_first_stage(tiny_models) -> None:
    from lmsan.auditor.audit import AuditOptions, audit_payload, run_audit
    from lmsan.auditor.corpus import load_corpus

    opts = AuditOptions(model_dir=tiny_models["clean"], target="cls", max_seeds=2,
                        first_stage=False, overrides={"max_length": 48})
    res = run_audit(opts, load_corpus(tiny_models["corpus"]))
    assert res.verdict == "clean" and len(res.seeds) == 2 and res.first_stage is None
    assert audit_payload(res, opts)["first_stage"] is None


def test_report_verifies_and_tampering_fails(por_audit, tiny_models, tmp_path) -> None:
    _, _, out = por_audit
    r = runner.invoke(app, ["verify", str(out), "--model", str(tiny_models["por"])])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.json"
    data = bytearray(out.read_bytes())
    i = len(data) // 2  # inside the base64 payload of the DSSE envelope
    data[i] ^= 0x01
    bad.write_bytes(bytes(data))
    r = runner.invoke(app, ["verify", str(bad)])
    assert r.exit_code in (1, 2) and r.exit_code != 0


def test_pvset_file_written_and_loadable(por_audit) -> None:
    from lmsan.auditor.pvset import PVSet
    from lmsan.auditor.report import load_pvset

    _, rep, out = por_audit
    pvs = PVSet.load(out.with_suffix(".pvs.json"))
    assert len(pvs.pvs) == len(rep["kept_pvs"]) >= 1
    assert pvs.pvs[0].target == "cls"
    assert load_pvset(out).pvs[0].values.tolist() == pvs.pvs[0].values.tolist()


def test_same_seed_same_pvs(tiny_models) -> None:
    from lmsan.auditor.audit import AuditOptions, run_audit
    from lmsan.auditor.corpus import load_corpus

    corpus = load_corpus(tiny_models["corpus"])
    opts = AuditOptions(model_dir=tiny_models["por"], target="cls", max_seeds=1, first_seed=0,
                        overrides={"max_length": 48, "t_l": 0.0})
    a = run_audit(opts, corpus)
    b = run_audit(opts, corpus)
    assert a.seeds[0].prompt == b.seeds[0].prompt
    assert a.seeds[0].targets[0].pv == b.seeds[0].targets[0].pv



def _assert_same_seed(a, b, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Same seed, same decisions, figures equal up to float rounding."""
    assert (a.seed, a.epochs_run, a.aborted, a.steps, a.lr_dropped_at, a.prompt_in_range) == (
        b.seed, b.epochs_run, b.aborted, b.steps, b.lr_dropped_at, b.prompt_in_range)
    np.testing.assert_allclose(a.prompt, b.prompt, rtol=rtol, atol=atol)
    for x, y in zip(a.targets, b.targets, strict=True):
        assert (x.target, x.candidate, x.accepted, x.rule.split(":")[0]) == (
            y.target, y.candidate, y.accepted, y.rule.split(":")[0])
        np.testing.assert_allclose(x.epoch_distance, y.epoch_distance, rtol=rtol, atol=atol)
        for k in ("distance_rel", "concentration", "spread_ratio", "entropy_raw"):
            np.testing.assert_allclose(getattr(x, k), getattr(y, k), rtol=rtol, atol=atol)
        if x.pv is not None:
            np.testing.assert_allclose(x.pv, y.pv, rtol=rtol, atol=atol)


def test_seeds_in_one_pass_equal_seeds_alone(tiny_models) -> None:
    """Pure speed: seeds trained in lockstep (their rows regrouped by length into shared forward
    passes) get the figures each gets alone in the plain sequential loop, to float rounding:
    same epochs, learning-rate drop, candidates and decisions. T_L = 0 makes every seed a
    candidate, so the pass stops after its first seed (its path loss must reach the others)."""
    from lmsan.auditor.corpus import load_corpus
    from lmsan.auditor.mining import Miner, MiningConfig
    from lmsan.auditor.modelio import load_encoder

    corpus = load_corpus(tiny_models["corpus"], limit=256)
    targets = ["cls", "tokens", "mask"]
    for model, t_l in ((tiny_models["clean"], 1e9), (tiny_models["por"], 0.0)):
        lm = load_encoder(model)
        cfg = MiningConfig(max_length=48, eval_sentences=64, t_l=t_l)
        plain = Miner(lm, corpus, targets, cfg, chunk_rows=None)
        seq = [plain.run_seed(s) for s in range(3)]
        batched = Miner(lm, corpus, targets, cfg, chunk_rows=8)
        got = batched.run_seeds([0, 1, 2])
        if t_l > 0:  # every seed aborts: nothing found, the whole pass stands
            assert len(got) == 3 and all(r.aborted for r in got)
        else:  # seed 0 made a candidate: seeds 1-2 trained without it in their path loss
            assert len(got) == 1 and got[0].targets[0].candidate
            got += batched.run_seeds([1, 2])[:1]
            got += batched.run_seeds([2])
        assert [r.seed for r in got] == [0, 1, 2]
        for a, b in zip(seq, got, strict=True):
            _assert_same_seed(a, b)


# ---------------------------------------------------------------- filtering rules
def _miner(tiny_models, **cfg):
    from lmsan.auditor.corpus import load_corpus
    from lmsan.auditor.mining import Miner, MiningConfig
    from lmsan.auditor.modelio import load_encoder

    lm = load_encoder(tiny_models["clean"])
    corpus = load_corpus(tiny_models["corpus"], limit=128)
    return Miner(lm, corpus, ["cls"], MiningConfig(max_length=48, eval_sentences=64, **cfg))


def test_prompt_init_vocab_starts_each_seed_on_different_ordinary_words(tiny_models) -> None:
    import torch

    m = _miner(tiny_models, prompt_init="vocab")
    w = m.emb.weight.detach()
    toks = m.lm.tokenizer.convert_ids_to_tokens(list(range(m.vocab_size)))
    rows = []
    for seed in range(4):
        p = m.init_prompt(seed)
        assert torch.equal(p, m.init_prompt(seed))  # deterministic per seed
        ids = [int(torch.nonzero((w == r).all(1))[0]) for r in p]
        assert all(i not in m.special_ids and not toks[i].startswith("[unused") for i in ids), ids
        rows.append(tuple(ids))
    assert len(set(rows)) == 4  # different seeds, different starting words
    stride = _miner(tiny_models)  # the paper's default stays the detect default
    assert torch.equal(stride.init_prompt(1), w[[70 + 10 * i for i in range(7)]])
    with pytest.raises(ValueError, match="prompt_init"):
        _miner(tiny_models, prompt_init="zeros").init_prompt(0)


def test_bad_key_or_report_folder_fails_before_mining(tiny_models, tmp_path) -> None:
    """A missing signing key or report folder is refused at once (exit 2, naming the path),
    not after the mining has run."""
    for extra, words in [(["--key", str(tmp_path / "nokey.pem"), "--out", str(tmp_path / "r.json")],
                          "signing key not found"),
                         (["--out", str(tmp_path / "nodir" / "r.json")],
                          "folder for the report does not exist")]:
        r = runner.invoke(app, ["audit", str(tiny_models["clean"]), "--quiet", *extra])
        assert r.exit_code == 2 and words in r.output, r.output
        assert "seed" not in r.output.lower()  # no mining happened


def test_search_mode_collects_pvs_with_vocab_init(tiny_models, signing_key) -> None:
    out = signing_key.parent / "search-report.json"
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"], out, "--mode", "search",
                       "--max-seeds", "6")
    assert code == 1 and rep["mode"] == "search", rep["_output"]
    assert rep["parameters"]["mining"]["prompt_init"] == "vocab"
    assert rep["parameters"]["mining"]["lambda_p"] == 2.0  # search's stronger path loss
    assert len(rep["seeds"]) == 6 and "budget of 6" in rep["stop_reason"]  # search never stops early
    injected = np.load(tiny_models["root"] / "injected.npy") >= 0
    kept = [np.asarray(t["pv"]) >= 0 for s in rep["seeds"] for t in s["targets"] if t["accepted"]]
    assert len(kept) == len(rep["kept_pvs"])
    assert kept and max(float((k == injected).mean(1).max()) for k in kept) >= 0.8
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"], out, "--mode", "search",
                       "--max-seeds", "1", "--prompt-init", "stride")
    assert rep["parameters"]["mining"]["prompt_init"] == "stride"
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"], out, "--mode", "search",
                       "--max-seeds", "1", "--lambda-p", "0.5")
    assert rep["parameters"]["mining"]["lambda_p"] == 0.5  # the user's weight wins
    r = runner.invoke(app, ["audit", str(tiny_models["por"]), "--prompt-init", "zeros", "--quiet"])
    # a choice the parser checks (exit 4 through `lmsan`, tests/test_batch.py)
    assert r.exit_code != 0 and "'zeros' is not one of 'stride', 'vocab'" in r.output


def _stats(**kw):
    from lmsan.auditor.filtering import TargetStats

    base = dict(target="cls", distance_rel=50.0, distance_raw=1.0, distance_norm=1.0, spread_ratio=0.1,
                concentration=1e-4, sign_consensus=1.0, entropy_raw=-3.4655, entropy_std=-3.46,
                epoch_distance=[50.0], candidate=True, pv=[1.0] * 32)
    base.update(kw)
    return TargetStats(**base)


def test_filter_rejects_out_of_range_prompt(tiny_models) -> None:
    m = _miner(tiny_models, t_collapse=1e-3)
    ts = _stats()
    m.filter.apply(ts, in_range=False)
    assert not ts.accepted and "out of range" in ts.rule


def test_filter_rejects_high_diversity_candidate(tiny_models) -> None:
    m = _miner(tiny_models, t_collapse=1e-3)
    ts = _stats(concentration=0.03)
    m.filter.apply(ts, in_range=True)
    assert not ts.accepted and "no collapse" in ts.rule
    # the paper's rule: raw entropy above T_div is rejected too
    mp = _miner(tiny_models, filter_rule="paper")
    ts = _stats(entropy_raw=-3.40)
    mp.filter.apply(ts, in_range=True)
    assert not ts.accepted and "diversity" in ts.rule


def test_filter_accepts_then_rejects_duplicate(tiny_models) -> None:
    m = _miner(tiny_models, t_collapse=1e-3)
    a = _stats()
    m.filter.apply(a, in_range=True)
    assert a.accepted
    b = _stats(pv=[1.0] * 30 + [-1.0] * 2)
    m.filter.apply(b, in_range=True)
    assert not b.accepted and "duplicate" in b.rule
    c = _stats(pv=[1.0] * 16 + [-1.0] * 16)  # agreement 0.5: a different PV
    m.filter.apply(c, in_range=True)
    assert c.accepted


def test_per_target_collapse_threshold_overrides_family_value(tiny_models) -> None:
    m = _miner(tiny_models, t_collapse=1e-3, per_target={"tokens": {"t_collapse": 1e-5}})
    cls = _stats(concentration=1e-4)
    m.filter.apply(cls, in_range=True)
    assert cls.accepted and "T_collapse 0.00100" in cls.rule
    tok = _stats(target="tokens", concentration=1e-4)
    m.filter.kept["tokens"] = []
    m.filter.apply(tok, in_range=True)
    assert not tok.accepted and "T_collapse 0.00001" in tok.rule


def test_preset_per_target_values_parsed_and_validated(tmp_path) -> None:
    from lmsan.auditor.errors import FormatError
    from lmsan.auditor.presets import load_presets

    def write(values: dict) -> Path:
        p = tmp_path / "p.json"
        p.write_text(json.dumps({"format": "lmsan.presets", "version": 1, "presets": [],
                                 "default": {"name": "d", "values": values}}))
        return p

    _, d = load_presets(write({"t_collapse": 1e-3, "per_target": {"pooler": {"t_collapse": 2e-4}}}))
    assert d.values["per_target"] == {"pooler": {"t_collapse": 2e-4}}
    _, d = load_presets(write({"confirm": False, "confirm_max_clean_match": 0.05,
                               "per_target": {"mask": {"confirm_max_clean_match": 0.1}}}))
    assert d.values["confirm"] is False and d.values["confirm_max_clean_match"] == 0.05
    for bad, msg in [({"confirm": "no"}, "confirm must be true or false"),({"per_target": {"head": {"t_l": 1}}}, "unknown target"),
                     ({"per_target": {"cls": {"lr0": 1}}}, "only t_l, t_collapse"),
                     ({"per_target": {"cls": {"t_l": "x"}}}, "non-negative number"),
                     ({"per_target": [1]}, "must be an object")]:
        with pytest.raises(FormatError, match=msg):
            load_presets(write(bad))


def test_user_threshold_overrides_preset_per_target(tiny_models, tmp_path) -> None:
    from lmsan.auditor.audit import AuditOptions, run_audit
    from lmsan.auditor.corpus import load_corpus

    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"format": "lmsan.presets", "version": 1, "presets": [],
                                  "default": {"name": "d", "values": {
                                      "t_collapse": 1e-3, "t_l": 0.1,
                                      "per_target": {"cls": {"t_collapse": 1e-5, "t_l": 0.2}}}}}))
    corpus = load_corpus(tiny_models["corpus"], limit=64)
    opts = AuditOptions(model_dir=tiny_models["clean"], target="cls", max_seeds=1, preset=preset,
                        overrides={"max_length": 32, "epochs": 1, "abort_epoch": 1,
                                   "t_collapse": 0.5})
    res = run_audit(opts, corpus)
    assert res.config["t_collapse"] == 0.5
    assert res.config["per_target"] == {"cls": {"t_l": 0.2}}


def test_soft_prompt_insertion_keeps_cls_first_and_grows_mask(tiny_models) -> None:
    import torch

    m = _miner(tiny_models)
    rows = [m.ids[0], m.ids[1]]
    prompt = torch.zeros(7, m.emb.weight.shape[1])
    rng = np.random.default_rng(0)
    embeds, mask, pos = m._insert(rows, prompt, rng)
    assert embeds.shape[1] == max(len(r) for r in rows) + 7
    assert all(p >= 1 for p in pos)
    for i, r in enumerate(rows):
        assert int(mask[i].sum()) == len(r) + 7
        assert torch.equal(embeds[i, pos[i]: pos[i] + 7], prompt)
        assert torch.allclose(embeds[i, 0], m.emb.weight[r[0]])


def test_init_prompt_uses_paper_rows(tiny_models) -> None:
    m = _miner(tiny_models)
    p = m.init_prompt(3)
    v = m.vocab_size
    for i in range(7):
        assert np.allclose(p[i].numpy(), m.emb.weight[(70 * 3 + 10 * i) % v].detach().numpy())


# ---------------------------------------------------------------- scale invariance
@pytest.fixture(scope="session")
def scaled_clean(tiny_models) -> Path:
    """The clean tiny model with its last LayerNorm multiplied by 7.5: every output x 7.5."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_models["clean"]
    dst = tiny_models["root"] / "clean-x7.5"
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    last = max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for k in (f"encoder.layer.{last}.output.LayerNorm.weight",
              f"encoder.layer.{last}.output.LayerNorm.bias"):
        sd[k] = sd[k] * 7.5
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_collapse_statistic_invariant_to_output_scale_and_batch(tiny_models, scaled_clean) -> None:
    import torch
    from lmsan.auditor.corpus import load_corpus
    from lmsan.auditor.mining import Miner, MiningConfig
    from lmsan.auditor.modelio import load_encoder

    corpus = load_corpus(tiny_models["corpus"])
    cfg = MiningConfig(max_length=48, eval_sentences=256)
    m1 = Miner(load_encoder(tiny_models["clean"]), corpus, ["cls"], cfg)
    m2 = Miner(load_encoder(scaled_clean), corpus, ["cls"], cfg)
    assert m2.scale["cls"] == pytest.approx(7.5 * m1.scale["cls"], rel=1e-4)
    torch.manual_seed(0)
    prompt = m1.init_prompt(5) + 0.05 * torch.randn(7, m1.emb.weight.shape[1])
    s1, s2 = m1.evaluate(prompt, "cls"), m2.evaluate(prompt, "cls")
    for k in ("concentration", "spread_ratio", "distance_rel", "distance_norm"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-3), k
    assert s2["distance_raw"] == pytest.approx(7.5**2 * s1["distance_raw"], rel=1e-3)
    # batch size: the statistic is a ratio of unbiased variances, so B = 16 and B = 64 agree
    m16 = Miner(load_encoder(tiny_models["clean"]), corpus, ["cls"], replace(cfg, batch_size=16))
    m64 = Miner(load_encoder(tiny_models["clean"]), corpus, ["cls"], replace(cfg, batch_size=64))
    c16, c64 = m16.evaluate(prompt, "cls"), m64.evaluate(prompt, "cls")
    assert c16["concentration"] == pytest.approx(c64["concentration"], rel=0.25)
    assert c16["spread_ratio"] == pytest.approx(c64["spread_ratio"], rel=0.25)


def test_rescaled_model_gets_same_verdict(tiny_models, scaled_clean, clean_audit, signing_key) -> None:
    out = signing_key.parent / "scaled-report.json"
    code, rep = _audit(scaled_clean, tiny_models["corpus"], out, "--max-seeds", "3")
    _, orig, _ = clean_audit
    assert code == 0 and rep["verdict"] == orig["verdict"] == "clean"
    for a, b in zip(rep["seeds"], orig["seeds"], strict=True):
        ca, cb = a["targets"][0]["concentration"], b["targets"][0]["concentration"]
        assert (ca is None) == (cb is None)
        if ca is not None:
            assert ca == pytest.approx(cb, rel=1e-2)


# ---------------------------------------------------------------- targets
def test_auto_target_lists_supported_and_skipped(tiny_models, tmp_path, signing_key) -> None:
    from lmsan.auditor.audit import resolve_targets
    from lmsan.auditor.modelio import load_encoder

    lm = load_encoder(tiny_models["clean"])
    targets, skipped = resolve_targets(lm, "auto")
    assert targets == ["cls", "pooler", "tokens", "mask"]
    assert skipped == {}


def test_tokenizer_without_mask_skips_mask(tiny_bert_nomask_dir) -> None:
    from lmsan.auditor.audit import resolve_targets
    from lmsan.auditor.modelio import load_encoder

    lm = load_encoder(tiny_bert_nomask_dir)
    targets, skipped = resolve_targets(lm, "auto")
    assert "mask" not in targets and "mask token" in skipped["mask"]
    r = runner.invoke(app, ["audit", str(tiny_bert_nomask_dir), "--target", "mask", "--quiet"])
    assert r.exit_code == 2 and "mask token" in r.output


# ---------------------------------------------------------------- bad input
def test_missing_folder(tmp_path) -> None:
    r = runner.invoke(app, ["audit", str(tmp_path / "nope"), "--quiet"])
    assert r.exit_code == 2 and "model folder not found" in r.output


def test_no_weights(tmp_path, tiny_models) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((tiny_models["clean"] / "config.json").read_text())
    r = runner.invoke(app, ["audit", str(d), "--quiet"])
    assert r.exit_code == 2 and "no weights" in r.output


def test_pickle_only_needs_opt_in(tmp_path, tiny_models) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pk"
    shutil.copytree(tiny_models["clean"], d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    r = runner.invoke(app, ["audit", str(d), "--quiet"])
    assert r.exit_code == 2 and "--allow-pickle" in r.output
    from lmsan.auditor.modelio import load_encoder

    lm = load_encoder(d, allow_pickle=True)  # weights_only=True load works for plain tensors
    assert lm.weights_format == "pickle"


def test_unsupported_model_type(tmp_path) -> None:
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = runner.invoke(app, ["audit", str(d), "--quiet"])
    assert r.exit_code == 2 and "unsupported model_type 'gpt2'" in r.output


@pytest.mark.parametrize("content,msg", [(b"", "no sentences"), (b"\x00\x01\x02abc", "binary"),
                                         (b"\xff\xfe bad", "UTF-8")])
def test_bad_corpus(tmp_path, tiny_models, content, msg) -> None:
    c = tmp_path / "c.txt"
    c.write_bytes(content)
    r = runner.invoke(app, ["audit", str(tiny_models["clean"]), "--corpus", str(c), "--quiet"])
    assert r.exit_code == 2 and msg in r.output and str(c) in r.output


# ---------------------------------------------------------------- every target by default
def test_clean_twin_not_flagged_on_any_target(tiny_models, signing_key, tmp_path) -> None:
    rep_path = tmp_path / "r.json"
    r = runner.invoke(app, ["audit", str(tiny_models["clean"]), "--corpus", str(tiny_models["corpus"]),
                            "--out", str(rep_path), "--key", str(signing_key),
                            "--max-length", "48", "--max-seeds", "4", "--quiet"])
    from lmsan.auditor.report import read_report

    rep = read_report(rep_path)
    assert r.exit_code == 0, r.output
    assert rep["verdict"] == "clean" and rep["targets"] == ["cls", "pooler", "tokens", "mask"]
    seeds = 4 * (2 if rep["first_stage"]["verdict"] == "suspicious" else 1)
    assert all(v["seeds_run"] == seeds and v["kept"] == 0 for v in rep["per_target"].values())


@pytest.mark.parametrize("attack,target", [
    ("por-ner", "tokens"),
    ("por", "pooler"),
    ("btop", "mask"),
])
def test_auto_target_flags_each_attack_target(tiny_models, signing_key, tmp_path, attack,
                                              target) -> None:
    from lmsan.auditor.poison import poison_model

    out = tmp_path / attack
    res = poison_model(tiny_models["clean"], out, attack=attack, target=target,
                       triggers=["cf", "mn"], sentences_per_trigger=128, epochs=4, lr=2e-3,
                       max_length=48, seed=0, utility="reference")
    assert res.success >= 0.9, res
    rep_path = tmp_path / "r.json"
    r = runner.invoke(app, ["audit", str(out), "--corpus", str(tiny_models["corpus"]),
                            "--out", str(rep_path), "--key", str(signing_key),
                            "--max-length", "48", "--max-seeds", "4", "--quiet"])
    from lmsan.auditor.report import read_report

    rep = read_report(rep_path)
    assert r.exit_code == 1, r.output  # flagged whatever the attack's target
    assert rep["verdict"] == "backdoored"
    assert rep["targets"] == ["cls", "pooler", "tokens", "mask"]
    assert target in rep["found_targets"], rep["per_target"]
    assert {p["target"] for p in rep["pvset"]["pvs"]} >= {target}


# ---------------------------------------------------------------- calibration
def test_calibration_threshold_rule() -> None:
    from lmsan.auditor.calibrate import _threshold

    t, why = _threshold([0.003, 0.004], [], 0.5)
    assert t == pytest.approx(0.0015) and "min clean" in why
    t, why = _threshold([0.003, 0.004], [1e-4, 5e-5], 0.5)  # separated: between the classes
    assert t == pytest.approx(math.sqrt(1e-4 * 0.003)) and 1e-4 < t < 0.003
    t, why = _threshold([0.003], [0.002], 0.5)  # found above margin x clean: thin, flagged
    assert t == pytest.approx(0.0015) and "THIN" in why
    t, why = _threshold([0.003], [0.005], 0.5)  # overlap is reported, FP safety kept
    assert t == pytest.approx(0.0015) and "OVERLAP" in why


def _shadow_row(label: str, seed: int, conc: float, final: float, agreement: float = 0.0,
                attack_target: str = "cls") -> dict:
    return {"model": f"{label}-model", "label": label, "seed": seed, "target": "cls",
            "concentration": conc, "epoch_distance": [final / 4, final / 2, final, final],
            "agreement": agreement, "attack_target": attack_target}


@pytest.mark.parametrize("found_distance, expect_far", [(2.5, True), (0.1, False)])
def test_calibration_sets_t_far_only_on_a_wide_distance_gap(found_distance, expect_far) -> None:
    """Clean shadows move 0.01-0.02; a found backdoor that collapses no more than they do gets
    a distance-only threshold only when it moved >= FAR_RATIO x farther than every clean seed."""
    from lmsan.auditor.calibrate import FAR_RATIO, preset_from_rows
    from lmsan.auditor.corpus import Corpus
    from lmsan.auditor.mining import MiningConfig

    rows = [_shadow_row("clean", 0, 1.0e-3, 0.01), _shadow_row("clean", 1, 1.4e-3, 0.02),
            _shadow_row("backdoored", 0, 1.1e-3, found_distance, agreement=1.0),
            # another attack's PV seen on cls (POR-NER aims at tokens): it moved little, and
            # does not count against a distance rule for the backdoors aimed at cls
            _shadow_row("backdoored", 1, 1.2e-3, 0.05, agreement=0.9, attack_target="tokens")]
    cfg = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 2}
    p = preset_from_rows(rows, [cfg], name="t", margin=0.5, base_cfg=MiningConfig(t_l=0.005),
                         corpus=Corpus("c", ["a"]))
    entry, ev = p.values["per_target"]["cls"], p.evidence["per_target"]["cls"]
    # the collapse statistic cannot separate these
    assert "OVERLAP" in ev["t_collapse_rule"] or "THIN" in ev["t_collapse_rule"]
    assert ev["max_final_distance"] == 0.02 and ev["found_min_final_distance"] == found_distance
    assert ev["found_own_target_seeds"] == 1 and ev["backdoored_found_seeds"] == 2
    if expect_far:
        assert found_distance >= FAR_RATIO * 0.02
        assert entry["t_far"] == pytest.approx(math.sqrt(0.02 * found_distance))
        assert 0.02 < entry["t_far"] < found_distance and "t_far_rule" in ev
    else:
        assert "t_far" not in entry and "t_far_rule" not in ev


def _clean_row(seed: int, target: str, conc: float, ep2: float, final: float) -> dict:
    return {"model": "clean-model", "label": "clean", "seed": seed, "target": target,
            "concentration": conc, "epoch_distance": [ep2 / 2, ep2, final, final]}


def test_calibration_reads_the_clean_seeds_near_t_l() -> None:
    """A clean seed that collapses tightly while it stays far under T_L is abandoned (or makes no
    candidate) in an audit, so it does not pull the collapse threshold down; the threshold reads
    the seeds that pass T_L or come within NEAR_MISS of it, else every clean seed, and says which."""
    from lmsan.auditor.calibrate import preset_from_rows
    from lmsan.auditor.corpus import Corpus
    from lmsan.auditor.filtering import NEAR_MISS
    from lmsan.auditor.mining import MiningConfig

    cfg = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 2}

    def preset(rows: list[dict]):
        return preset_from_rows(rows, [cfg], name="t", margin=0.5, base_cfg=MiningConfig(t_l=1.0),
                                corpus=Corpus("c", ["a"]))

    assert NEAR_MISS == 0.5
    tight = _clean_row(0, "cls", 1e-5, 0.3, 0.4)  # abandoned at the check epoch, far from T_L
    rows = [tight,
            # runs on (its pooler passes T_L at the check epoch) and ends past T_L on cls: judged
            _clean_row(1, "cls", 4e-3, 0.9, 1.5), _clean_row(1, "pooler", 5e-3, 1.2, 1.6),
            # abandoned at 0.6 x T_L: near, read
            _clean_row(2, "cls", 3e-3, 0.6, 3.0),
            # runs on (pooler), but its cls ends at 0.4 x T_L: read on its final distance, not near
            _clean_row(3, "cls", 2e-5, 0.9, 0.4), _clean_row(3, "pooler", 6e-3, 1.1, 1.2)]
    p = preset(rows)
    ev = p.evidence["per_target"]["cls"]
    assert p.values["per_target"]["cls"]["t_collapse"] == pytest.approx(1.5e-3)  # 0.5 x 3e-3
    assert ev["clean_reading"] == "near" and ev["clean_seeds_read"] == 2 and ev["clean_seeds"] == 4
    assert ev["min_concentration"] == 1e-5  # the tight seed is recorded, not read
    # no seed near T_L: every clean seed, the tight one included (the cautious reading)
    p = preset([tight, _clean_row(1, "cls", 4e-3, 0.2, 0.3)])
    ev = p.evidence["per_target"]["cls"]
    assert p.values["per_target"]["cls"]["t_collapse"] == pytest.approx(5e-6)
    assert ev["clean_reading"] == "all" and "NO SEED NEAR T_L" in ev["t_collapse_rule"]
    # the fallback for a target the shadows did not measure reads every clean row
    assert p.values["t_collapse"] == pytest.approx(5e-6)


def test_calibration_warns_when_found_prompts_leave_the_range() -> None:
    """A backdoor found only by out-of-range soft prompts cannot be flagged by the audit (the
    range filter rejects it): the preset's evidence says so."""
    from lmsan.auditor.calibrate import preset_from_rows
    from lmsan.auditor.corpus import Corpus
    from lmsan.auditor.mining import MiningConfig

    def rows(in_range: bool) -> list[dict]:
        bd = [_shadow_row("backdoored", i, 1e-4, 2.0, agreement=1.0) for i in range(2)]
        for r in bd:
            r["prompt_in_range"] = in_range
        return [_shadow_row("clean", 0, 1e-3, 0.01), *bd]

    cfg = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 2}
    for in_range in (True, False):
        p = preset_from_rows(rows(in_range), [cfg], name="t", margin=0.5,
                             base_cfg=MiningConfig(), corpus=Corpus("c", ["a"]))
        ev = p.evidence["per_target"]["cls"]
        assert ev["found_prompt_in_range"] == (2 if in_range else 0)
        assert ("range_warning" in ev) is (not in_range)


def test_filter_accepts_far_candidate_only_with_t_far() -> None:
    """The report names the rule: accepted by T_far, or rejected for no collapse (and distance)."""
    from lmsan.auditor.filtering import PVFilter, TargetStats
    from lmsan.auditor.mining import MiningConfig

    def stats() -> TargetStats:
        return TargetStats(target="cls", distance_rel=1.0, distance_raw=1.0, distance_norm=2.9,
                           spread_ratio=0.01, concentration=9e-4, sign_consensus=0.9,
                           entropy_raw=-3.0, entropy_std=-3.0, epoch_distance=[0.3, 2.6, 2.8, 2.9],
                           candidate=True, pv=[1.0, -1.0, 0.5, -0.5])

    base = {"t_l": 0.05, "t_collapse": 5e-4}
    for per_target, accepted, words in [
        ({}, False, "no collapse, concentration 0.00090 >= T_collapse 0.00050"),
        ({"cls": {"t_far": 0.2}}, True, "distance 2.9 > T_far 0.2"),
        ({"cls": {"t_far": 5.0}}, False, "and distance 2.9 <= T_far 5"),
    ]:
        ts = stats()
        rules = PVFilter(MiningConfig(**base, per_target=per_target), ["cls"])
        rules.apply(ts, True)
        assert ts.accepted is accepted and words in ts.rule, ts.rule
        assert len(rules.kept["cls"]) == int(accepted)


def test_filter_refuses_a_refuted_point_without_searching_again() -> None:
    """A candidate the monitor cannot tell from one whose trigger search failed (sign agreement
    >= T_match) is refused with that earlier search's figures; a different point is searched."""
    from types import SimpleNamespace

    from lmsan.auditor.filtering import PVFilter, TargetStats
    from lmsan.auditor.mining import MiningConfig

    def stats(pv: list[float]) -> TargetStats:
        return TargetStats(target="cls", distance_rel=1.0, distance_raw=1.0, distance_norm=2.9,
                           spread_ratio=0.01, concentration=1e-4, sign_consensus=0.9,
                           entropy_raw=-3.0, entropy_std=-3.0, epoch_distance=[0.3, 2.9],
                           candidate=True, pv=pv)

    calls: list[int] = []

    def search(confirmed: bool):  # noqa: ANN202
        def run() -> SimpleNamespace:
            calls.append(1)
            return SimpleNamespace(confirmed=confirmed, margin=0.4, tokens=["the"],
                                   rule="not reachable by text: test",
                                   to_dict=lambda: {"confirmed": confirmed, "margin": 0.4})
        return run

    rules = PVFilter(MiningConfig(t_l=0.05, t_collapse=5e-4, t_match=0.8), ["cls"])
    proto = [1.0, -1.0, 0.5, -0.5, 1.0, 1.0, -1.0, 0.2, 0.3, -0.4] * 2
    first = stats(proto)
    assert not rules.apply(first, True, search(False), seed=0) and len(calls) == 1
    near = stats([*proto[:19], 0.4])  # 19 of 20 signs shared (REFUTED_AGREEMENT 0.95)
    assert not rules.apply(near, True, search(True), seed=3) and len(calls) == 1
    assert "earlier candidate whose trigger search failed (seed 0, margin 0.40" in near.rule
    assert near.confirmation["same_point_as"]["seed"] == 0 and near.confirmation["margin"] == 0.4
    apart = stats([*proto[:18], -0.3, 0.5])  # 18 of 20 (below 0.95): searched again
    assert not rules.apply(apart, True, search(False), seed=5) and len(calls) == 2
    other = stats([-x for x in proto])  # another point: searched, and kept when confirmed
    assert rules.apply(other, True, search(True), seed=4) and len(calls) == 3


def test_filter_measures_rule_4_on_collapse_near_misses_without_deciding() -> None:
    """A candidate refused by the collapse rule alone within NEAR_MISS of T_collapse gets its
    trigger searched for the record (decision unchanged, even when the search succeeds); one
    further away, or refused by another rule too, is not searched; a near miss's failed search
    never refuses a later candidate that passes rules 1-3."""
    from types import SimpleNamespace

    from lmsan.auditor.filtering import PVFilter, TargetStats
    from lmsan.auditor.mining import MiningConfig

    def stats(conc: float, pv: list[float]) -> TargetStats:
        return TargetStats(target="cls", distance_rel=1.0, distance_raw=1.0, distance_norm=2.9,
                           spread_ratio=0.01, concentration=conc, sign_consensus=0.9,
                           entropy_raw=-3.0, entropy_std=-3.0, epoch_distance=[0.3, 2.9],
                           candidate=True, pv=pv)

    calls: list[bool] = []

    def search(confirmed: bool):  # noqa: ANN202
        def run() -> SimpleNamespace:
            calls.append(confirmed)
            return SimpleNamespace(confirmed=confirmed, margin=1.2 if confirmed else 0.3,
                                   tokens=["the"], rule=f"reachable {confirmed}",
                                   to_dict=lambda: {"confirmed": confirmed, "margin": 0.3})
        return run

    rules = PVFilter(MiningConfig(t_l=0.05, t_collapse=5e-4, t_match=0.8), ["cls"])
    proto = [1.0, -1.0, 0.5, -0.5, 1.0, 1.0, -1.0, 0.2, 0.3, -0.4] * 2
    near = stats(8e-4, proto)  # T_collapse / concentration 0.625 >= 0.5
    assert not rules.apply(near, True, search(False), seed=0) and calls == [False]
    assert near.confirmation["measured_only"] and "no collapse" in near.rule
    assert "measured for the margin" in near.rule
    far = stats(2e-3, [-x for x in proto])  # 0.25: not searched
    assert not rules.apply(far, True, search(False), seed=1) and calls == [False]
    assert far.confirmation is None
    out = stats(8e-4, [-x for x in proto])  # near, but out of range as well: not searched
    assert not rules.apply(out, False, search(False), seed=2) and len(calls) == 1
    reached = stats(8e-4, [-x for x in proto])  # a trigger reaches it: still refused by rule 2
    assert not rules.apply(reached, True, search(True), seed=3) and calls == [False, True]
    assert reached.confirmation["measured_only"] and not reached.accepted
    again = stats(8e-4, proto)  # the near miss's point again: its earlier search is reused
    assert not rules.apply(again, True, search(False), seed=4) and len(calls) == 2
    assert again.confirmation["same_point_as"]["seed"] == 0
    collapsed = stats(1e-4, proto)  # the same point, collapsed: rule 4 searches and decides
    assert rules.apply(collapsed, True, search(True), seed=5) and len(calls) == 3
    assert "measured_only" not in collapsed.confirmation


def test_rule_4_refuses_a_point_where_clean_text_already_is_without_searching() -> None:
    """A collapsed candidate that clean outputs already sign-match (a class prototype) is refused
    by rule 4a before any trigger search; one away from clean text goes on to the search."""
    from lmsan.auditor.filtering import PVFilter, TargetStats
    from lmsan.auditor.mining import MiningConfig

    def stats(clean_match: float) -> TargetStats:
        return TargetStats(target="cls", distance_rel=1.0, distance_raw=1.0, distance_norm=2.9,
                           spread_ratio=0.01, concentration=1e-4, sign_consensus=0.9,
                           entropy_raw=-3.0, entropy_std=-3.0, epoch_distance=[0.3, 2.9],
                           candidate=True, pv=[1.0, -1.0] * 10, clean_match=clean_match)

    searched: list[int] = []

    def search():  # noqa: ANN202
        from types import SimpleNamespace
        searched.append(1)
        return SimpleNamespace(confirmed=True, margin=1.1, tokens=["cf"], rule="reachable",
                               to_dict=lambda: {"confirmed": True, "margin": 1.1})

    cfg = MiningConfig(t_l=0.05, t_collapse=5e-4, confirm=True, confirm_max_clean_match=0.0125)
    proto = stats(0.11)
    assert not PVFilter(cfg, ["cls"]).apply(proto, True, search, seed=0) and not searched
    assert "clean text already there: 11.00% of clean outputs match it" in proto.rule
    planted = stats(0.0005)
    assert PVFilter(cfg, ["cls"]).apply(planted, True, search, seed=0) and searched == [1]
    assert "apart from clean text" in planted.rule
    off = MiningConfig(t_l=0.05, t_collapse=5e-4, confirm=False)  # rule 4 off: not read
    assert PVFilter(off, ["cls"]).apply(stats(0.11), True)


def test_a_continued_audit_remembers_failed_trigger_searches() -> None:
    """Candidates carried from an earlier run of the audit refuse their points as they did when
    their searches ran (rule 4's by deciding, the near misses' for the record only)."""
    from lmsan.auditor.filtering import PVFilter, TargetStats
    from lmsan.auditor.mining import MiningConfig

    def stats(conc: float, pv: list[float], conf: dict | None = None) -> TargetStats:
        return TargetStats(target="cls", distance_rel=1.0, distance_raw=1.0, distance_norm=2.9,
                           spread_ratio=0.01, concentration=conc, sign_consensus=0.9,
                           entropy_raw=-3.0, entropy_std=-3.0, epoch_distance=[0.3, 2.9],
                           candidate=True, pv=pv, confirmation=conf)

    proto = [1.0, -1.0, 0.5, -0.5, 1.0, 1.0, -1.0, 0.2, 0.3, -0.4] * 2
    other = [-x for x in proto]
    rules = PVFilter(MiningConfig(t_l=0.05, t_collapse=5e-4, t_match=0.8), ["cls"])
    rules.remember(stats(1e-4, proto, {"confirmed": False, "margin": 0.4, "tokens": ["a"]}), 2)
    rules.remember(stats(8e-4, other, {"confirmed": False, "margin": 0.3, "tokens": ["b"],
                                       "measured_only": True}), 3)

    def never() -> None:
        raise AssertionError("searched again")

    again = stats(1e-4, proto)
    assert not rules.apply(again, True, never, seed=7)
    assert again.confirmation["same_point_as"]["seed"] == 2
    near = stats(8e-4, other)
    assert not rules.apply(near, True, never, seed=8)
    assert near.confirmation["same_point_as"]["seed"] == 3


def test_clean_margin_is_each_candidates_worst_figure() -> None:
    """The closest approach of a clean verdict reads every rule a candidate had to pass: a
    candidate near T_collapse whose trigger search stayed far is as far as its search."""
    from lmsan.auditor.render.facts import Figure, Thresholds, _deciding, bottleneck, nearest

    th = Thresholds(t_l=0.05, t_collapse=5e-4, t_far=None, t_div=None, rule="collapse",
                    confirm_min_rate=0.9, confirm_max_residual=(0.115, 0.08))
    a = {"concentration": 5.3e-4, "confirmation": {"rate": 0.87, "residual": 0.23,
                                                   "tokens": ["deepened"], "margin": 0.5}}
    b = {"concentration": 6e-4}
    fa, fb = _deciding(th, None, a), _deciding(th, None, b)
    assert [g.name for g in fa] == ["concentration", "trigger reach", "trigger residual (1 token)"]
    worst_a = bottleneck(fa)
    assert worst_a is not None and worst_a.threshold == 0.115 and not worst_a.passes
    assert abs(worst_a.factor - 0.5) < 1e-9  # 0.115 / 0.23
    worst_b = bottleneck(fb)
    assert worst_b is not None and worst_b.name == "concentration"  # 0.83x: nearer than 0.5x
    assert nearest([worst_a, worst_b]) is worst_b
    assert Figure("trigger reach", 0.9, ">=", "min rate", 0.9).passes
    # a report of this version: where the trigger lands decides, not the residual
    c = {"concentration": 4e-4, "confirmation": {"rate": 0.98, "residual": 0.05,
                                                 "landing_match": 0.14, "landing_limit": 0.0125,
                                                 "tokens": ["roller", "bolted"], "margin": 0.09}}
    fc = _deciding(th, None, c)
    assert [g.name for g in fc] == ["concentration", "trigger reach",
                                    "clean outputs where the trigger lands"]
    worst_c = bottleneck(fc)
    assert worst_c is not None and worst_c.name == "clean outputs where the trigger lands"
    assert not worst_c.passes and abs(worst_c.factor - 0.0125 / 0.14) < 1e-9


def test_an_abandoned_seed_near_t_l_is_measured_for_the_record(tiny_models) -> None:
    """A seed abandoned at the check epoch within NEAR_MISS of T_L gets its point measured
    (concentration, clean outputs already there) like a seed that ran on below T_L; one further
    from T_L stays unmeasured. Neither becomes a candidate, and training is the same."""
    from lmsan.auditor.filtering import NEAR_MISS

    far = _miner(tiny_models, t_l=1e9).run_seed(0).targets[0]
    d = far.epoch_distance[-1]
    assert far.rule.startswith("aborted") and math.isnan(far.concentration)
    assert far.clean_match is None and len(far.epoch_distance) == 2
    near = _miner(tiny_models, t_l=d * (1 + 1 / NEAR_MISS) / 2).run_seed(0).targets[0]  # between
    assert near.rule.startswith("aborted") and not near.candidate and near.pv is None
    assert near.epoch_distance == far.epoch_distance  # the same training
    assert math.isfinite(near.concentration) and near.concentration > 0
    assert near.clean_match is not None and 0.0 <= near.clean_match <= 1.0
    below = _miner(tiny_models, t_l=2 * d / NEAR_MISS).run_seed(0).targets[0]
    assert math.isnan(below.concentration) and below.clean_match is None


def test_clean_margin_reads_a_measured_seed_on_every_rule() -> None:
    """A seed just under T_L whose point was measured is as near as its worst figure there: at
    a point where clean text already is, it is far from a kept PV, and a candidate refused
    nearer to its threshold decides the margin. Unmeasured, its distance decides."""
    from lmsan.auditor.render.facts import Facts, SeedPoint, Thresholds, _near_misses

    th = Thresholds(t_l=2.0, t_collapse=1e-3, t_far=None, t_div=None, rule="collapse",
                    confirm_min_rate=0.9, confirm_max_clean_match=0.0125)
    cand = {"seed": 1, "target": "cls", "rule": "rejected: no collapse",
            "concentration": 1.6e-3, "clean_match": 0.005}
    pred = {"rejected_candidates": [cand],
            "seeds": [{"seed": 0, "targets": [{"target": "cls", "rule": "aborted"}]},
                      {"seed": 1, "targets": [{"target": "cls", "epoch_distance": [3.0]}]}]}

    def margin(point: SeedPoint) -> tuple[int | None, float | None]:
        fx = Facts(verified=True, problems=[], verdict="CLEAN", why="", targets=["cls"],
                   thresholds={"cls": th}, seeds=[point])
        (m,) = _near_misses(pred, fx)
        return m.seed, m.figure.factor

    measured = SeedPoint(0, "cls", 1.92, 2e-3, candidate=False, accepted=False, aborted=True,
                         clean_match=0.04)
    seed, factor = margin(measured)
    assert seed == 1 and factor is not None and abs(factor - 1e-3 / 1.6e-3) < 1e-9
    unmeasured = SeedPoint(0, "cls", 1.92, None, candidate=False, accepted=False, aborted=True)
    seed, factor = margin(unmeasured)
    assert seed == 0 and factor is not None and abs(factor - 0.96) < 1e-9


def test_user_t_collapse_drops_preset_t_far(tiny_models, signing_key, tmp_path) -> None:
    """A preset's t_far must not outlive a collapse threshold the user sets by hand."""
    preset = tmp_path / "p.json"
    entry = {"name": "far", "match": {"model_type": "bert"},
             "values": {"t_l": 0.1, "lr0": 2e-3, "div_loss": "entropy", "t_collapse": 1e-9,
                        "per_target": {"cls": {"t_far": 1e-6}}}}
    preset.write_text(json.dumps({"format": "lmsan.presets", "version": 1, "presets": [entry],
                                  "default": entry}))
    args = ("--preset", str(preset), "--max-seeds", "1")
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"], signing_key.parent / "far-a.json", *args)
    # nothing collapses below 1e-9: only T_far accepts the POR candidate (the rule is live)
    assert code == 1 and "T_far" in rep["seeds"][0]["targets"][0]["rule"], rep["_output"]
    code, rep = _audit(tiny_models["por"], tiny_models["corpus"], signing_key.parent / "far-b.json", *args,
                       "--t-collapse", "1e-9")
    assert code == 0, rep["_output"]  # the user's threshold alone decides: nothing collapses that far
    rule = rep["seeds"][0]["targets"][0]["rule"]
    assert "no collapse" in rule and "T_far" not in rule, rule


def test_measure_shadows_rows_repeat_and_carry_the_seed_history(tiny_models) -> None:
    """Calibration rows are deterministic (the zoo caches them and, asked for more seeds,
    measures again from seed 0), and a seed's row depends on the seeds before it: every earlier
    candidate enters the path loss, as in an audit (with lambda_p 0 seed 1 comes out different)."""
    from lmsan.auditor.calibrate import measure_shadows
    from lmsan.auditor.corpus import load_corpus
    from lmsan.auditor.mining import MiningConfig

    corpus = load_corpus(tiny_models["corpus"])
    cfg = MiningConfig(max_length=48, lr0=2e-3, div_loss="entropy", epochs=3)
    kw = {"targets": ("cls",), "base_cfg": cfg, "device": "cpu"}

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    one = measure_shadows([tiny_models["clean"]], corpus, seeds=2, **kw)
    two = measure_shadows([tiny_models["clean"]], corpus, seeds=2, **kw)
    assert [r["seed"] for r in one] == [0, 1] and strip(one) == strip(two)
    cfg_no_path = MiningConfig(max_length=48, lr0=2e-3, div_loss="entropy", epochs=3, lambda_p=0.0)
    lone = measure_shadows([tiny_models["clean"]], corpus, seeds=2,
                           **{**kw, "base_cfg": cfg_no_path})
    # without the path loss seed 1's figures differ from those it had after seed 0's candidate
    assert lone[1]["concentration"] != one[1]["concentration"]


def test_calibrate_with_backdoored_shadow(tiny_models, tmp_path) -> None:
    from lmsan.auditor.presets import load_presets

    out = tmp_path / "preset.json"
    r = runner.invoke(app, ["calibrate", str(tiny_models["clean"]), "--backdoored",
                            str(tiny_models["por"]), "--out", str(out), "--name", "t",
                            "--seeds", "1", "--backdoored-seeds", "2", "--target", "cls",
                            "--max-length", "48", "--lr0", "2e-3", "--div-loss", "entropy",
                            "--corpus", str(tiny_models["corpus"]), "--t-l", "0.1"])
    assert r.exit_code == 0, r.output
    assert "seeds 1..29 are not in this preset's evidence" in r.output  # audit runs 30
    data = json.loads(out.read_text())
    presets, _ = load_presets(out)
    p = presets[0]
    assert p.evidence["backdoored_shadow_models"] == [str(tiny_models["por"])]
    bd_rows = [x for x in data["rows"] if x["label"] == "backdoored"]
    assert len(bd_rows) == 2 and all(0.0 <= x["agreement"] <= 1.0 for x in bd_rows)
    clean_min = p.evidence["per_target"]["cls"]["min_concentration"]
    assert p.values["per_target"]["cls"]["t_collapse"] <= 0.5 * clean_min + 1e-12
    found = [x for x in bd_rows if x["found"]]
    assert found, bd_rows  # mining the tiny POR model finds an injected PV within 2 seeds
    # the found backdoor seeds lie below the chosen threshold (it separates the classes)
    assert p.evidence["per_target"]["cls"]["backdoored_found_seeds"] == len(found)
    assert max(x["concentration"] for x in found) < p.values["per_target"]["cls"]["t_collapse"]
    # a folder without backdoor.json is refused as a backdoored shadow
    r = runner.invoke(app, ["calibrate", str(tiny_models["clean"]), "--backdoored",
                            str(tiny_models["clean"]), "--out", str(tmp_path / "x.json"),
                            "--name", "t", "--seeds", "1", "--target", "cls"])
    assert r.exit_code == 2 and "backdoor.json" in r.output


def test_attacker_pvset_keeps_attacker_pvs_a_found_pv_only_approximates(tiny_models, tmp_path) -> None:
    """found+attacker (the paper's best case): an attacker PV that a found PV matches only at
    0.81 stays in the set (its triggers would match the found PV at 0.81 only), one that a found
    PV matches exactly does not."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from lmsan.auditor.poison import backdoor_pvs, read_backdoor
    from lmsan.auditor.pvset import PV, PVSet
    from pt_eval import attacker_pvset

    atk = backdoor_pvs(read_backdoor(tiny_models["por"]))
    near = atk[0].copy()
    near[:6] *= -1  # 26/32 = 0.8125 sign agreement: above T_match 0.8, far from exact
    found = PVSet(hidden_size=atk.shape[1], pvs=[
        PV(id=0, target="cls", values=near, source="mined"),
        PV(id=1, target="cls", values=atk[1].copy(), source="mined"),
    ])
    found.save(tmp_path / "found.json")
    out = PVSet.load(attacker_pvset(tiny_models["por"], tmp_path / "found.json", tmp_path / "fa.json"))
    assert [(p.id, p.source) for p in out.pvs] == [(0, "mined"), (1, "mined"), (2, "attacker")]
    np.testing.assert_array_equal(out.pvs[2].values, atk[0])
