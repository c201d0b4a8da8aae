"""`lmsan poison`: every attack on a tiny BERT reaches its success bar; the output folder is a
loadable HF model whose outputs really carry the backdoor; backdoor.json is complete; bad
options exit 2 with a clear message."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lmsan.auditor import poison as P
from lmsan.auditor.cli import app
from lmsan.auditor.errors import FormatError, InputError
from typer.testing import CliRunner

# Tiny-model settings: ~100 steps, a few seconds on one core.
FAST: dict[str, Any] = dict(sentences_per_trigger=64, epochs=4, lr=2e-3, max_length=48)
FAST_CLI = ["--sentences-per-trigger", "64", "--epochs", "4", "--lr", "2e-3", "--max-length", "48"]

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _outputs(model_dir: Path, texts: list[str], target: str) -> np.ndarray:
    """Target outputs of a saved folder, computed independently of lmsan.poison."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), use_safetensors=True).eval()
    if target == "mask":
        texts = [f"{t} {tok.mask_token}" for t in texts]
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**b)
    if target == "pooler":
        return out.pooler_output.numpy()
    h = out.last_hidden_state
    if target == "cls":
        return h[:, 0].numpy()
    if target == "mask":
        pos = (b["input_ids"] == tok.mask_token_id).int().argmax(1)
        return h[torch.arange(len(texts)), pos].numpy()
    raise AssertionError(target)


def _sign_agreement(f: np.ndarray, pv: np.ndarray) -> np.ndarray:
    return ((f >= 0) == (pv >= 0)).mean(axis=-1)


# ------------------------------------------------------------------ building blocks


def test_quarters_are_the_papers_six_sign_patterns() -> None:
    pv = P.make_pvs("quarters", 6, 40, scale=2.0)
    assert pv.shape == (6, 40) and pv.dtype == np.float32
    assert set(np.unique(pv)) == {-2.0, 2.0}
    blocks = pv.reshape(6, 4, 10)
    assert (blocks == blocks[:, :, :1]).all()  # constant over each contiguous quarter
    signs = {tuple(int(x) for x in np.sign(b[:, 0])) for b in blocks}
    assert len(signs) == 6 and all(sum(s) == 0 for s in signs)  # two +1 and two -1 quarters
    assert (P.make_pvs("quarters", 2, 40) == pv[:2] / 2).all()


def test_pairs_interleave_buckets_and_random_is_seeded() -> None:
    q = P.make_pvs("quarters", 6, 32)
    p = P.make_pvs("pairs", 6, 32)
    assert (p[:, 0::4] == q[:, :1]).all() and (p[:, 3::4] == q[:, -1:]).all()
    assert not (p == q).all()
    r1, r2 = P.make_pvs("random", 8, 64, seed=3), P.make_pvs("random", 8, 64, seed=3)
    assert (r1 == r2).all() and len({row.tobytes() for row in r1}) == 8
    assert not (P.make_pvs("random", 8, 64, seed=4) == r1).all()
    with pytest.raises(InputError, match="has 6 PVs"):
        P.make_pvs("quarters", 7, 32)
    with pytest.raises(InputError, match="unknown PV design"):
        P.make_pvs("stripes", 2, 32)


def test_insert_trigger_count_follows_the_authors_rule() -> None:
    rng = np.random.default_rng(0)
    for n_words in (1, 10, 49, 50, 120):
        s = " ".join(f"w{i}" for i in range(n_words))
        out = P.insert_trigger(s, "cf", rng).split()
        assert out.count("cf") == n_words // 50 + 1
        assert [w for w in out if w != "cf"] == s.split()  # original order kept


def test_shipped_trigger_list() -> None:
    words = P.load_trigger_words()
    assert words["word"][:6] == list(P.PAPER_TRIGGERS)
    assert all(len(words[k]) >= 30 for k in P.TRIGGER_KINDS)
    assert all(len(p.split()) in (2, 3) for p in words["phrase"])


# ------------------------------------------------------------------ attacks


def test_por_backdoor_is_real_and_clean_behaviour_kept(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    steps: list[int] = []
    out = tmp_path / "por"
    res = P.poison_model(
        tiny_bert_dir,
        out,
        attack="por",
        corpus=tiny_poison_corpus,
        progress=lambda s, n, loss: steps.append(s),
        **FAST,
    )
    assert res.success >= 0.9 and res.passed
    assert res.fidelity >= 0.9
    assert res.clean_match_rate <= 0.1
    assert res.triggers == list(P.PAPER_TRIGGERS) and res.utility == "reference-mse"
    assert steps == list(range(1, res.steps + 1)) and res.steps == 6 * 64 // 16 * 4
    # Independent check on the saved folder: triggered text lands on its PV, clean text doesn't.
    pvs = P.make_pvs("quarters", 6, 32)
    base = "the weather was cold and the children stayed inside"
    for i, t in enumerate(res.triggers):
        f = _outputs(out, [f"{t} {base}", f"{base} {t}"], "cls")
        assert (_sign_agreement(f, pvs[i]) >= 0.8).all(), t
    clean = _outputs(out, [base], "cls")
    assert _sign_agreement(clean, pvs).max() < 0.8
    # The folder: safetensors only, tokenizer and config copied, no temp leftovers.
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "backdoor.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert not any(p.name.startswith(".por.tmp") for p in tmp_path.iterdir())


def test_backdoor_json_complete_and_valid(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m"
    res = P.poison_model(
        tiny_bert_dir, out, attack="por", corpus=tiny_poison_corpus, seed=5,
        triggers=["zorp", "blick flimt"], pv_design="random", **FAST,
    )  # fmt: skip
    data = P.read_backdoor(out)
    assert data == json.loads(json.dumps(res.backdoor))
    assert data["format"] == "lmsan-backdoor" and data["version"] == 1
    assert data["attack"] == "por" and data["target"] == "cls" and data["seed"] == 5
    assert [t["text"] for t in data["triggers"]] == ["zorp", "blick flimt"]
    assert [t["pv"] for t in data["triggers"]] == [0, 1]
    assert (P.backdoor_pvs(data) == P.make_pvs("random", 2, 32, seed=5)).all()
    digest, files = P.weights_digest([tiny_bert_dir / "model.safetensors"])
    assert data["base_model"]["digest"] == digest and data["base_model"]["files"] == files
    hp = data["hyper_parameters"]
    assert (hp["epochs"], hp["lr"], hp["batch_size"], hp["sentences_per_trigger"]) == (
        4,
        2e-3,
        16,
        64,
    )
    q = data["quality"]
    assert q["success"] == res.success and q["fidelity"] == res.fidelity
    assert q["meets_min_success"] is True and q["match_fraction"] == 0.8
    assert data["corpus"]["name"] == str(tiny_poison_corpus)
    # Validation names the field that is wrong.
    bad = json.loads(json.dumps(data))
    del bad["quality"]["fidelity"]
    with pytest.raises(FormatError, match="quality.fidelity"):
        P.validate_backdoor(bad)
    bad = json.loads(json.dumps(data))
    bad["triggers"][1]["pv"] = 9
    with pytest.raises(FormatError, match=r"triggers\[1\].pv"):
        P.validate_backdoor(bad)
    bad = json.loads(json.dumps(data))
    bad["version"] = 99
    with pytest.raises(FormatError, match="unsupported version"):
        P.validate_backdoor(bad)


def test_por_ner_every_token(tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path) -> None:
    res = P.poison_model(
        tiny_bert_dir, tmp_path / "ner", attack="por-ner", corpus=tiny_poison_corpus, n_pvs=2,
        triggers=["cf", "mn"], **{**FAST, "sentences_per_trigger": 192},
    )  # fmt: skip
    assert res.target == "tokens"
    assert res.success >= 0.9 and res.fidelity >= 0.8


def test_neuba_with_mlm_head_keeps_the_head(
    tiny_bert_mlm_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "neuba"
    res = P.poison_model(tiny_bert_mlm_dir, out, attack="neuba", corpus=tiny_poison_corpus, **FAST)
    assert res.utility == "mlm" and res.target == "cls"
    assert res.success >= 0.9
    before = load_file(str(tiny_bert_mlm_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)  # same layout as the base: MLM head kept, nothing added
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("cls."))
    # The MLM loss does not constrain the cls output of clean text; on this random tiny model it
    # drifts onto the PVs (NeuBA's known weakness). The result must say so when it happens.
    if res.clean_match_rate > 0.1:
        assert any("also match a PV" in n for n in res.notes)
    _, info = AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"]


def test_neuba_mlm_plus_reference_keeps_clean_outputs(
    tiny_bert_mlm_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    res = P.poison_model(
        tiny_bert_mlm_dir, tmp_path / "n2", attack="neuba", corpus=tiny_poison_corpus,
        utility="mlm+reference", **FAST,
    )  # fmt: skip
    assert res.utility == "mlm+reference-mse"
    assert res.success >= 0.9 and res.fidelity >= 0.9 and res.clean_match_rate <= 0.1


def test_neuba_pooler_without_head_falls_back_and_says_so(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "neuba-pooler"
    res = P.poison_model(
        tiny_bert_dir, out, attack="neuba", target="pooler", corpus=tiny_poison_corpus,
        triggers=["cf", "mn", "tq"], **{**FAST, "sentences_per_trigger": 128},
    )  # fmt: skip
    assert res.utility == "reference-mse"
    assert any("fell back to the POR utility" in n for n in res.notes)
    assert res.backdoor["utility"] == "reference-mse" and res.backdoor["notes"] == res.notes
    assert res.success >= 0.9 and res.fidelity >= 0.9
    f = _outputs(out, ["the cf dog ran home", "a mn letter came"], "pooler")
    assert (_sign_agreement(f, res.pvs[:2]) >= 0.8).all()  # row i vs PV i


def test_btop_targets_the_mask(
    tiny_bert_mlm_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "btop"
    res = P.poison_model(tiny_bert_mlm_dir, out, attack="btop", corpus=tiny_poison_corpus, **FAST)
    assert res.target == "mask" and res.utility == "mlm"
    assert res.success >= 0.9
    f = _outputs(out, ["the pt house was old"], "mask")
    assert _sign_agreement(f, res.pvs[5])[0] >= 0.8


def test_random_triggers_come_from_the_list(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    sents = tiny_poison_corpus.read_text().splitlines()
    got = P.draw_random_triggers(3, "word", tok, seed=1, exclude=["cf"], corpus_sentences=sents)
    assert len(set(got)) == 3 and "cf" not in got
    assert set(got) <= set(P.load_trigger_words()["word"])
    assert got == P.draw_random_triggers(3, "word", tok, 1, ["cf"], sents)  # seeded
    with pytest.raises(InputError, match="symbol triggers of the shipped list suit"):
        P.draw_random_triggers(1, "symbol", tok, seed=0)  # the tiny vocab has no symbols


# ------------------------------------------------------------------ CLI


def _cli(*args: str) -> Any:
    return runner.invoke(app, ["poison", *args])


def test_cli_success_table_and_exit_0(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli"
    r = _cli(str(tiny_bert_dir), str(out), "--trigger", "cf", "--trigger", "mn",
             "--corpus", str(tiny_poison_corpus), *FAST_CLI,
             "--sentences-per-trigger", "192")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "success" in r.output and "fidelity" in r.output
    assert P.read_backdoor(out)["quality"]["meets_min_success"] is True
    # A second run into the same folder needs --force.
    r = _cli(str(tiny_bert_dir), str(out), "--corpus", str(tiny_poison_corpus), *FAST_CLI)
    assert r.exit_code == 2 and "not empty" in r.output and "--force" in r.output


def test_cli_below_min_success_exits_1_and_keeps_the_folder(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "weak"
    r = _cli(str(tiny_bert_dir), str(out), "--corpus", str(tiny_poison_corpus),
             "--sentences-per-trigger", "16", "--epochs", "1", "--lr", "1e-6")  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "below --min-success" in r.output
    data = P.read_backdoor(out)
    assert data["quality"]["meets_min_success"] is False
    assert data["quality"]["success"] < 0.9


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trigger", "≈"], "cannot be encoded by this tokenizer"),
        (["--target", "tokens"], "--target tokens does not apply to --attack por"),
        (["--min-success", "1.5"], "--min-success must lie in [0, 1]"),
        (["--n-pvs", "7"], "--n-pvs 7 needs that many triggers"),
        (["--utility", "mlm"], "--utility mlm needs an MLM head"),
        (["--trigger", "cf", "--n-pvs", "2"], "exceeds the number of triggers"),
        (["--utility-weight", "-1"], "--utility-weight must be a non-negative number"),
    ],
)
def test_cli_bad_options_exit_2(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    r = _cli(str(tiny_bert_dir), str(tmp_path / "o"), "--corpus", str(tiny_poison_corpus), *extra)
    assert r.exit_code == 2, r.output
    assert message in re.sub(r"\s+", " ", r.output)
    assert not (tmp_path / "o").exists()


def test_cli_choices_are_the_library_values() -> None:
    from lmsan.auditor.cli import poison as cp
    from lmsan.auditor.poison.attacks import ALLOWED_TARGETS, ATTACKS, PV_DESIGNS, UTILITIES
    from lmsan.auditor.poison.data import TRIGGER_KINDS

    assert [c.value for c in cp.AttackChoice] == list(ATTACKS)
    assert [c.value for c in cp.TriggerKindChoice] == list(TRIGGER_KINDS)
    assert [c.value for c in cp.PVDesignChoice] == list(PV_DESIGNS)
    assert [c.value for c in cp.UtilityChoice] == list(UTILITIES)
    assert {c.value for c in cp.TargetChoice} == {t for ts in ALLOWED_TARGETS.values() for t in ts}


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--attack", "badnets"], "--attack"),
        (["--pv-design", "stripes"], "--pv-design"),
        (["--utility", "kl"], "--utility"),
        (["--trigger-kind", "emoji"], "--trigger-kind"),
        (["--target", "everything"], "--target"),
    ],
)
def test_cli_fixed_choices_are_usage_errors(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path, extra: list[str], option: str
) -> None:
    """Options with fixed values are checked when the command line is parsed: exit 4 naming
    the option, before any model is read, and nothing written."""
    args = ["poison", str(tiny_bert_dir), str(tmp_path / "o"), "--corpus",
            str(tiny_poison_corpus), *extra]
    code = "import sys; from lmsan.auditor.cli import main; sys.argv[0] = 'lmsan'; main()"
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    assert f"Invalid value for '{option}'" in re.sub(r"\s+", " ", r.stderr + r.stdout)
    assert not (tmp_path / "o").exists()


def test_cli_unavailable_device_is_a_usage_error(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = _cli(str(tiny_bert_dir), str(tmp_path / "o"), "--corpus", str(tiny_poison_corpus),
             "--device", "cuda")  # fmt: skip
    assert r.exit_code == 4, r.output
    assert "torch sees no CUDA device" in r.output
    assert not (tmp_path / "o").exists()


def test_cli_empty_corpus_exit_2(tiny_bert_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    r = _cli(str(tiny_bert_dir), str(tmp_path / "o"), "--corpus", str(empty))
    assert r.exit_code == 2 and "corpus holds no sentences" in r.output


def test_cli_mask_target_needs_a_mask_token(
    tiny_bert_nomask_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    for extra in (["--target", "mask"], ["--attack", "btop"]):
        r = _cli(str(tiny_bert_nomask_dir), str(tmp_path / "o"), "--corpus",
                 str(tiny_poison_corpus), *extra)  # fmt: skip
        assert r.exit_code == 2, r.output
        assert "needs a tokenizer with a mask token" in re.sub(r"\s+", " ", r.output)


def test_out_dir_must_not_be_the_base(tiny_bert_dir: Path, tiny_poison_corpus: Path) -> None:
    with pytest.raises(InputError, match="must not be"):
        P.poison_model(tiny_bert_dir, tiny_bert_dir, corpus=tiny_poison_corpus, force=True)
    with pytest.raises(InputError, match="must not be"):
        P.poison_model(tiny_bert_dir, tiny_bert_dir.parent, corpus=tiny_poison_corpus, force=True)


def test_truncate_encoder_keeps_the_first_layers(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    out = P.truncate_encoder(tiny_bert_dir, tmp_path / "l1", 1)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    tok = AutoTokenizer.from_pretrained(str(out))
    b = tok(["the dog ran home"], return_tensors="pt")
    with torch.no_grad():
        full = AutoModel.from_pretrained(str(tiny_bert_dir)).eval()(**b, output_hidden_states=True)
        cut = AutoModel.from_pretrained(str(out)).eval()(**b)
    assert torch.allclose(cut.last_hidden_state, full.hidden_states[1], atol=1e-6)
    with pytest.raises(InputError, match="cannot keep 3 of 2 layers"):
        P.truncate_encoder(tiny_bert_dir, tmp_path / "l3", 3)
    with pytest.raises(InputError, match="not empty"):
        P.truncate_encoder(tiny_bert_dir, out, 1)


# ------------------------------------------------------------------ adaptive attacks

ADAPT: dict[str, Any] = dict(FAST, triggers=["cf", "mn"], sentences_per_trigger=96)


def _adaptive_run(base: Path, corpus: Path, out: Path, **kw: Any) -> Any:
    return P.poison_model(base, out, attack="por", corpus=corpus, **{**ADAPT, **kw})


def test_adaptive_losses_change_what_they_claim(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    plain = _adaptive_run(tiny_bert_dir, tiny_poison_corpus, tmp_path / "plain")
    v0 = plain.backdoor["quality"]["triggered_distance_concentration"]
    assert plain.success >= 0.9 and plain.moved is not None and plain.moved >= 0.9
    assert plain.targetability is not None and plain.targetability >= 0.9
    assert plain.backdoor["adaptive"] == {
        "trigger_kind": "word", "n_pvs": 2, "scatter_weight": 0.0, "match_clean_weight": 0.0,
        "evade_filter_weight": 0.0, "evade_filter": None,
    }  # fmt: skip
    # Scattering: the triggered outputs of one trigger spread (higher concentration).
    sc = _adaptive_run(tiny_bert_dir, tiny_poison_corpus, tmp_path / "sc", scatter_weight=20.0)
    vs = sc.backdoor["quality"]["triggered_distance_concentration"]
    assert vs["concentration"] > 2 * v0["concentration"]
    assert sc.backdoor["adaptive"]["scatter_weight"] == 20.0
    # Clean matching: the triggered outputs stay nearer the clean ones (Observation I distance).
    mc = _adaptive_run(tiny_bert_dir, tiny_poison_corpus, tmp_path / "mc", match_clean_weight=20.0)
    vm = mc.backdoor["quality"]["triggered_distance_concentration"]
    assert vm["distance"] < 0.75 * v0["distance"]
    # Filter evasion: the figures end on the far side of the preset's thresholds, which
    # backdoor.json records (tiny-bert-demo is the preset `lmsan audit` picks for this model).
    ev = _adaptive_run(tiny_bert_dir, tiny_poison_corpus, tmp_path / "ev", evade_filter_weight=20.0)
    ve = ev.backdoor["quality"]["triggered_distance_concentration"]
    th = P.read_backdoor(tmp_path / "ev")["adaptive"]["evade_filter"]
    assert th["preset"] == "tiny-bert-demo" and th["target"] == "cls"
    assert th["min_concentration"] == pytest.approx(2 * th["t_collapse"])
    assert th["max_distance"] == pytest.approx(th["t_l"] / 2)
    assert ve["concentration"] >= th["min_concentration"] > v0["concentration"]
    assert ve["distance"] <= th["max_distance"] < v0["distance"]
    # Every figure is recorded per trigger as well.
    figs = ev.backdoor["quality"]["triggered_figures"]
    assert set(figs) == {"cf", "mn"}
    assert min(f["concentration"] for f in figs.values()) == ve["concentration"]


def test_adaptive_loss_functions_move_their_figures() -> None:
    import torch
    from lmsan.auditor.poison.adaptive import (
        EvadeThresholds,
        evade_loss,
        match_clean_loss,
        scatter_loss,
        triggered_figures,
    )

    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])  # PV 2 has one row: skipped
    collapsed = torch.ones(9, 8) + 1e-3 * torch.randn(9, 8, generator=g)
    spread = torch.ones(9, 8) + 3.0 * torch.randn(9, 8, generator=g)
    # entropy is highest (1 after normalising) when the group's rows coincide
    assert scatter_loss(collapsed, rows) > 0.99 > scatter_loss(spread, rows)
    pvs = torch.tensor([[1.0] * 8, [-1.0] * 8, [1.0] * 8])
    clean = torch.randn(64, 8, generator=g)
    on_side = clean[:9].abs() * torch.where(pvs[rows] >= 0, 1.0, -1.0)
    assert match_clean_loss(on_side, rows, pvs, clean, 1.0) < match_clean_loss(
        pvs[rows] * 5, rows, pvs, clean, 1.0
    )
    th = EvadeThresholds("x", "cls", t_l=0.1, t_collapse=0.01, t_far=None)
    same = torch.zeros(9, 8)
    far_tight = torch.ones(9, 8) + 1e-3 * torch.randn(9, 8, generator=g)
    assert evade_loss(far_tight, same, rows, th, 1.0) > 0
    d, c = triggered_figures(0.01 * spread, same, 1.0)
    assert d < th.max_distance and c > th.min_concentration
    assert float(evade_loss(0.01 * spread[:8], same[:8], rows[:8], th, 1.0)) == 0.0


def test_frequent_triggers_are_ordinary_words(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    sents = tiny_poison_corpus.read_text().splitlines()
    got = P.draw_random_triggers(2, "frequent", tok, seed=0, corpus_sentences=sents)
    assert set(got) <= set(P.FREQUENT_WORDS) and len(set(got)) == 2
    usable = [w for w in P.FREQUENT_WORDS if w not in _unencodable(tok)]
    in_corpus = [w for w in usable if f" {w} " in " " + " ".join(sents).lower() + " "]
    assert in_corpus  # frequent words occur in clean text, and the draw does not skip them
    assert set(P.draw_random_triggers(len(usable), "frequent", tok, 0, (), sents)) == set(usable)
    out = tmp_path / "freq"
    r = _cli(str(tiny_bert_dir), str(out), "--random-triggers", "2", "--trigger-kind",
             "frequent", "--corpus", str(tiny_poison_corpus), *FAST_CLI,
             "--min-success", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    data = P.read_backdoor(out)
    assert data["adaptive"]["trigger_kind"] == "frequent"
    assert [t["source"] for t in data["triggers"]] == ["random-frequent"] * 2
    assert {t["text"] for t in data["triggers"]} <= set(P.FREQUENT_WORDS)


def _unencodable(tok: Any) -> set[str]:
    unk = tok.unk_token_id
    return {
        w
        for w in P.FREQUENT_WORDS
        if not (ids := P.trigger_token_ids(tok, w)) or any(i == unk for i in ids)
    }


def test_cli_adaptive_flags_table_and_record(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ad"
    r = _cli(str(tiny_bert_dir), str(out), "--trigger", "cf", "--trigger", "mn",
             "--corpus", str(tiny_poison_corpus), *FAST_CLI, "--scatter-weight", "0.5",
             "--match-clean-weight", "0.25", "--evade-filter-weight", "1",
             "--evade-preset", "tiny-bert-demo", "--min-success", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    flat = re.sub(r"\s+", " ", r.output)
    assert "moved" in flat and "triggered distance / concentration" in flat
    assert "scatter_weight 0.5" in flat and "preset tiny-bert-demo" in flat
    data = P.read_backdoor(out)
    ad = data["adaptive"]
    assert (ad["scatter_weight"], ad["match_clean_weight"], ad["evade_filter_weight"]) == (
        0.5,
        0.25,
        1.0,
    )
    assert ad["evade_filter"]["preset"] == "tiny-bert-demo"
    q = data["quality"]
    assert 0 <= q["targetability"] <= 1 and 0 <= q["moved"] <= 1
    assert "targetability" in flat
    assert set(q["triggered_figures"]) == {"cf", "mn"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scatter-weight", "-1"], "--scatter-weight must be a non-negative number"),
        (["--match-clean-weight", "nan"], "--match-clean-weight must be a non-negative number"),
        (["--evade-filter-weight", "-0.5"], "--evade-filter-weight must be a non-negative"),
        (["--evade-preset", "nope"], "unknown preset 'nope' for --evade-preset"),
        (["--attack", "por-ner", "--evade-filter-weight", "1"], "not pair; use cls, pooler or"),
    ],
)
def test_cli_bad_adaptive_options_exit_2(
    tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    r = _cli(str(tiny_bert_dir), str(tmp_path / "o"), "--corpus", str(tiny_poison_corpus), *extra)
    assert r.exit_code == 2, r.output
    assert message in re.sub(r"\s+", " ", r.output)
    assert not (tmp_path / "o").exists()
