"""Prompt-tuned task models on a tiny backdoored backbone: the attack, the defence, the export.

The backbone is the hand-made POR-style BERT of ``screen_fixtures`` (trigger ``cf`` -> a quarter
PV on [CLS]) with its ordinary layers (and the backdoor head) amplified so that a linear head can read a toy two-class
task from [CLS] (the untrained layers pass almost no signal). The task: sentences of words from
one half of the vocabulary are class ``a``, from the other half class ``b``.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import pt_eval  # noqa: E402  (bench/pt_eval.py: the benchmark's attack and defence figures)
from lmsan.auditor import tuning as pt  # noqa: E402
from lmsan.auditor.errors import FormatError, InputError  # noqa: E402
from lmsan.export.task_bundle import export_task_bundle  # noqa: E402
from screen_fixtures import WORDS, backdoored_bert, run_cli_blocking, save_pvset  # noqa: E402

TRIGGER = "cf"


def _toy_examples(n: int, seed: int) -> list:
    rng = random.Random(seed)
    half_a, half_b = WORDS[:60], WORDS[60:120]
    out = []
    for i in range(n):
        lab = i % 2
        words = [rng.choice(half_a if lab == 0 else half_b) for _ in range(rng.randint(5, 12))]
        out.append(pt.Example((" ".join(words),), lab))
    return out


@pytest.fixture(scope="session")
def toy_backbone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    import torch
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    folder, pv = backdoored_bert(tmp_path_factory.mktemp("pt") / "backbone")
    model = BertModel.from_pretrained(folder).eval()
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        # amplify the ordinary layers (x10 in layer 0's head 1, x3 in layer 1) so that a linear
        # head can read the toy task, and the backdoor head's push along the PV (x3) so that
        # the trigger still wins through the amplified layer 1
        for li, layer in enumerate(model.encoder.layer):
            rows = slice(hd, None) if li == 0 else slice(None)
            a = 10.0 if li == 0 else 3.0
            for lin in (
                layer.attention.self.query,
                layer.attention.self.key,
                layer.attention.self.value,
            ):
                lin.weight[rows] *= a
            layer.attention.output.dense.weight[:, rows] *= a
            layer.intermediate.dense.weight *= a
            layer.output.dense.weight *= a
        model.encoder.layer[0].attention.output.dense.weight[:, 0] *= 3.0
    model.save_pretrained(folder)
    return folder, pv


@pytest.fixture(scope="session")
def toy_task() -> pt.TaskData:
    return pt.TaskData("toy", "sequence", ["a", "b"], _toy_examples(200, 0), _toy_examples(60, 1))


@pytest.fixture(scope="session")
def trained(
    toy_backbone: tuple[Path, np.ndarray],
    toy_task: pt.TaskData,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[pt.TaskModelHandle, Path, Path]]:
    """method -> (handle, task folder, bundle folder)."""
    folder, pv = toy_backbone
    root = tmp_path_factory.mktemp("pt_tasks")
    pvs = save_pvset(root / "pvs.json", [("cls", pv)])
    out = {}
    for method in ("ptuning", "ptuning-v2"):
        # a small prefix init keeps the hand-made trigger mechanism intact under the prefix
        cfg = pt.TrainConfig(
            method=method,
            prompt_length=4,
            epochs=6,
            lr=1e-2,
            head_lr=1e-2,
            batch_size=16,
            prefix_init_std=0.1,
        )
        h = pt.train_task_model(folder, toy_task, cfg)
        tdir = pt.save_task_model(h, root / f"task-{method}")
        bundle = export_task_bundle(tdir, pvs, root / f"bundle-{method}").path
        out[method] = (h, tdir, bundle)
    return out


def _triggered(ex: pt.Example, seed: int) -> tuple[str, ...]:
    texts, _ = pt_eval.insert_once(ex.texts, TRIGGER, random.Random(seed))
    return texts


@pytest.mark.parametrize("method", ["ptuning", "ptuning-v2"])
def test_task_is_learned_and_trigger_flips_it(trained, toy_task, method) -> None:
    h, _, _ = trained[method]
    assert pt.evaluate_clean(h, toy_task.test) >= 60.0  # chance is 50
    ev = pt_eval.evaluate_attack(h, toy_task.test, [TRIGGER], seed=0)
    # the trigger forces one output: every correctly classified input of the other class flips
    assert ev.asr >= 30.0
    assert max(ev.per_class_asr.values()) >= 90.0


def test_monitor_and_purge_restore_the_clean_prediction(trained, toy_task) -> None:
    """The P-tuned model: the trigger flips answers without the monitor, not with it."""
    h, tdir, bundle = trained["ptuning"]
    dc = pt.DefendedClassifier.open(bundle, tdir)
    clean = [ex.texts for ex in toy_task.test]
    trig = [_triggered(ex, i) for i, ex in enumerate(toy_task.test)]
    p_clean = pt.predict(h, clean)
    p_trig = pt.predict(h, trig)
    flipped = [i for i in range(len(clean)) if p_trig[i] != p_clean[i]]
    assert len(flipped) >= 10  # without the monitor the trigger changes the answer

    d_clean = dc.classify(clean)
    assert not any(d.flagged for d in d_clean)  # FRR 0 on this set
    assert [d.prediction for d in d_clean] == p_clean  # bundle + head == torch model
    d_trig = dc.classify(trig)
    assert [d.undefended for d in d_trig] == p_trig
    for i, d in enumerate(d_trig):
        assert d.flagged and d.status == "purged"
        assert d.removed == (TRIGGER,)
        assert d.text == clean[i]  # the purged input is the clean one
        assert d.prediction == p_clean[i]  # and is classified as the clean one


def test_v2_defended_pipeline_agrees_with_torch(trained, toy_task) -> None:
    """P-tuning v2: the bundle (prefix baked in) + head gives the torch model's answers, and a
    flagged input is purged to the clean one. (On this tiny model the prefix weakens the
    trigger: not every triggered input reaches the PV, which the benchmark reports as FAR.)"""
    h, tdir, bundle = trained["ptuning-v2"]
    dc = pt.DefendedClassifier.open(bundle, tdir)
    clean = [ex.texts for ex in toy_task.test]
    trig = [_triggered(ex, i) for i, ex in enumerate(toy_task.test)]
    d_clean = dc.classify(clean)
    assert [d.prediction for d in d_clean] == pt.predict(h, clean)
    d_trig = dc.classify(trig)
    p_clean = pt.predict(h, clean)
    assert [d.undefended for d in d_trig] == pt.predict(h, trig)
    caught = [i for i, d in enumerate(d_trig) if d.flagged]
    assert len(caught) >= len(trig) // 2
    for i in caught:
        assert d_trig[i].text == clean[i] and d_trig[i].prediction == p_clean[i]


@pytest.mark.parametrize("method", ["ptuning", "ptuning-v2"])
def test_bundle_monitor_decisions_equal_torch(trained, toy_backbone, toy_task, method) -> None:
    import torch
    from lmsan.auditor import monitor as mon
    from lmsan.auditor import screener as br

    h, _, bundle = trained[method]
    _, pv = toy_backbone
    recs = [ex.texts for ex in toy_task.test[:30]] + [
        _triggered(ex, 7 + i) for i, ex in enumerate(toy_task.test[:30])
    ]
    scr = br.open_bundle(bundle, provider="cpu", threads=1)
    ort = scr.monitor(recs)
    b = pt.encode_records(h.tokenizer, recs, h.pad_id)
    with torch.no_grad():
        cls = h.module.hidden(torch.from_numpy(b.ids), torch.from_numpy(b.mask))[:, 0].numpy()
    packed = mon.pack_signs(pv[None, :].astype(np.float32))
    _, counts, flags = mon.best_match(
        np.ascontiguousarray(cls, dtype=np.float32), packed, pv.size, scr.threshold
    )
    assert [r.flagged for r in ort] == [bool(f) for f in flags]
    assert sum(r.flagged for r in ort) == 30  # all triggered, no clean one
    assert [round(r.match_rate * pv.size) for r in ort] == [int(c) for c in counts]


def test_v2_bundle_has_the_prefix_baked_in(trained) -> None:
    _, _, bundle = trained["ptuning-v2"]
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["prompt_length"] == 0 and "prompt.npy" not in man["files"]
    assert "baked" in man["model"]["prefix"]
    assert man["validation"]["decisions_identical"] is True


def test_save_load_roundtrip_and_digest_check(trained, toy_task, tmp_path, toy_backbone) -> None:
    for method in ("ptuning", "ptuning-v2"):
        h, tdir, _ = trained[method]
        h2 = pt.load_task_model(tdir)
        recs = [ex.texts for ex in toy_task.test]
        assert pt.predict(h2, recs) == pt.predict(h, recs)
    # a different backbone is refused, naming the folder
    other = tmp_path / "other"
    shutil.copytree(toy_backbone[0], other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1.0
    save_file(w, str(other / "model.safetensors"))
    with pytest.raises(InputError, match="digest"):
        pt.load_task_model(trained["ptuning"][1], backbone_dir=other)


def test_extract_prompt(trained, tmp_path) -> None:
    import torch

    h, tdir, _ = trained["ptuning"]
    res = pt.extract_prompt(tdir, tmp_path / "p.npy")
    arr = np.load(res.path)
    assert arr.shape == (4, 32) and arr.dtype == np.float32
    with torch.no_grad():
        assert np.allclose(arr, h.module.prompt_output().numpy(), atol=1e-6)
    assert res.position_matches_bundle
    with pytest.raises(InputError, match="already exists"):
        pt.extract_prompt(tdir, tmp_path / "p.npy")
    with pytest.raises(InputError, match="prefix"):
        pt.extract_prompt(trained["ptuning-v2"][1], tmp_path / "q.npy")
    # a plain peft folder (no lmsan_task.json): readable, but the position differs
    plain = tmp_path / "peft"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tdir / name, plain / name)
    res2 = pt.extract_prompt(plain, tmp_path / "r.npy")
    assert not res2.position_matches_bundle and "before [CLS]" in res2.note
    with pytest.raises(InputError, match="adapter_config.json"):
        pt.extract_prompt(tmp_path, tmp_path / "s.npy")


def test_defended_classifier_refuses_a_bundle_without_the_prompt(
    trained, toy_backbone, tmp_path
) -> None:
    from lmsan.export.bundle import export_bundle

    folder, pv = toy_backbone
    pvs = save_pvset(tmp_path / "pvs.json", [("cls", pv)])
    bare = export_bundle(folder, pvs, tmp_path / "bare").path
    with pytest.raises(InputError, match="prompt length"):
        pt.DefendedClassifier.open(bare, trained["ptuning"][1])
    with pytest.raises(InputError, match="prefix"):
        pt.DefendedClassifier.open(bare, trained["ptuning-v2"][1])


def test_evaluate_defence_figures(trained, toy_task) -> None:
    _, tdir, bundle = trained["ptuning"]
    dc = pt.DefendedClassifier.open(bundle, tdir)
    de = pt_eval.evaluate_defence(dc, toy_task.labels, toy_task.test, [TRIGGER], seed=0)
    assert de.asr_before >= 30.0 and de.asr_after == 0.0
    assert de.frr == 0.0 and de.far == 0.0
    assert de.acc_after == de.acc_before
    assert de.triggered_flagged == de.triggered_total == len(toy_task.test)
    # the sweep at the monitor's own threshold reproduces its decisions
    assert de.threshold_sweep["0.80"] == {"frr": de.frr, "far": de.far}
    assert de.clean_match_quantiles["0.99"] < 0.8 <= de.triggered_match_quantiles["0.01"]


def test_evaluate_clean_defence_scores_clean_inputs_like_evaluate_defence(trained, toy_task) -> None:
    """The clean-pool figures: on clean inputs they are evaluate_defence's clean figures; on
    inputs that carry the trigger (scored against their true labels) every one is flagged, the
    backdoor costs accuracy before the defence and the purge wins it back."""
    _, tdir, bundle = trained["ptuning"]
    dc = pt.DefendedClassifier.open(bundle, tdir)
    de = pt_eval.evaluate_defence(dc, toy_task.labels, toy_task.test, [TRIGGER], seed=0)
    ce = pt_eval.evaluate_clean_defence(dc, toy_task.labels, toy_task.test)
    assert (ce.n, ce.frr, ce.flagged, ce.changed) == (len(toy_task.test), de.frr, 0, 0)
    assert ce.acc_before == ce.acc_after == de.acc_before and ce.removed == {}
    trig = [
        pt.Example(texts=rows[0][0], label=ex.label)
        for ex, rows in zip(
            toy_task.test, pt_eval.triggered_records(toy_task.test, [TRIGGER], 0), strict=True
        )
    ]
    ct = pt_eval.evaluate_clean_defence(dc, toy_task.labels, trig)
    assert ct.frr == 100.0 and ct.flagged == len(trig) and ct.rejected == 0
    assert ct.acc_before < ct.acc_after == ce.acc_before and ct.changed > 0
    assert ct.removed == {TRIGGER: len(trig)}  # what the purge took out, per input
    with pytest.raises(InputError, match="no examples"):
        pt_eval.evaluate_clean_defence(dc, toy_task.labels, [])


def test_defended_classifier_takes_the_deployment_t_match(trained, toy_task) -> None:
    """``match_threshold`` (``--t-match``) replaces the PV set's threshold in the deployed model,
    and the threshold that `lmsan threshold` would choose keeps the clean task inputs clean."""
    from lmsan.auditor.threshold import choose_match_threshold

    _, tdir, bundle = trained["ptuning"]
    clean = [ex.texts for ex in toy_task.test]
    base = pt.DefendedClassifier.open(bundle, tdir)
    assert base.scr.match_threshold == 0.8 and base.scr.match_threshold_source == "pvset"
    rates = sorted(p.match_rate for p in base.classify(clean))
    low = rates[len(rates) // 2]  # half of the clean inputs match at least this
    strict = pt.DefendedClassifier.open(bundle, tdir, match_threshold=low)
    assert strict.scr.match_threshold == low and strict.scr.match_threshold_source == "option"
    flagged = [p.flagged for p in strict.classify(clean)]
    assert flagged == [p.match_rate >= low for p in base.classify(clean)] and any(flagged)
    ch = choose_match_threshold(strict.scr, clean, max_frr=0.0)
    assert ch.threshold == 0.8 and ch.frr == 0.0  # the PV set's value is already clean here
    from lmsan.auditor.cli import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(
        app, ["tune", "classify", str(bundle), str(tdir), " ".join(clean[0]), "--t-match", "0.01"]
    )
    assert r.exit_code == 0 and "rejected" in r.output  # it matches at 1%, every purge too


# ----------------------------------------------------------------------------- data and metrics


def test_loaders(tmp_path) -> None:
    wn = tmp_path / "wordnet"
    wn.mkdir()
    lines = ["lexname\tlemma\tsentence"]
    for i, cls in enumerate(pt.TOPIC_CLASSES * 5):
        lines.append(f"{cls}\tx\tsentence number {i} here")
    lines.append("noun.person\tx\tnot one of the four")
    (wn / "examples.tsv").write_text("\n".join(lines) + "\n")
    td = pt.load_wordnet_topic(wn / "examples.tsv")
    assert len(td.train) + len(td.test) == 20 and td.labels == list(pt.TOPIC_CLASSES)
    (wn / "bad.tsv").write_text("a\tb\n")
    with pytest.raises(FormatError, match="header"):
        pt.load_wordnet_topic(wn / "bad.tsv")

    rte = tmp_path / "rte"
    rte.mkdir()
    row = {"premise": "a long premise sentence here", "hypothesis": "short one", "label": 1}
    (rte / "train.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps({**row, "label": 0}) + "\n"
    )
    (rte / "validation.jsonl").write_text(json.dumps(row) + "\n{broken\n")
    with pytest.raises(FormatError, match="line 2"):
        pt.load_rte(rte)

    co = tmp_path / "conll04"
    co.mkdir()
    (co / "train.txt").write_text("-DOCSTART-\n\nJohn B-Peop\nSmith I-Peop\nran O\n\nParis B-Loc\n")
    (co / "test.bio").write_text("Anna B-Peop\nslept O\n")
    td = pt.load_conll04(co)
    assert td.kind == "tokens" and td.labels[0] == "O"
    assert [ex.texts[0] for ex in td.train] == ["John Smith ran", "Paris"]
    assert td.train[0].tags == [td.labels.index("B-Peop"), td.labels.index("I-Peop"), 0]
    with pytest.raises(InputError, match="unknown task"):
        pt.load_task("nope", tmp_path)


def test_trigger_goes_into_the_longer_sentence() -> None:
    rng = random.Random(0)
    for _ in range(20):
        out, _ = pt_eval.insert_once(("short one", "a much longer second sentence here"), "cf", rng)
        assert out[0] == "short one" and out[1].split().count("cf") == 1
    out, tags = pt_eval.insert_once(("a b c",), "cf", random.Random(1), tags=[1, 2, 0])
    assert tags is not None and len(tags) == 4 and tags[out[0].split().index("cf")] == 0


def test_span_f1_and_asr_definitions() -> None:
    labels = ["O", "B-Peop", "I-Peop", "B-Loc"]
    gold = [[1, 2, 0, 3]]
    assert pt.span_f1(gold, [[1, 2, 0, 3]], labels) == 100.0
    assert pt.span_f1(gold, [[1, 0, 0, 3]], labels) == pytest.approx(50.0)  # 1 of 2 spans
    assert pt.span_f1(gold, [[0, 0, 0, 0]], labels) == 0.0
    # ASR counts only correctly classified inputs; weighted ASR averages the classes
    asr, weighted, per = pt_eval._asr(
        [True, True, True, False], [True, False, False, True], [0, 0, 1, 1], ["x", "y"]
    )
    assert asr == pytest.approx(100 / 3) and per == {"x": 50.0, "y": 0.0} and weighted == 25.0


def test_train_config_is_validated(toy_backbone, toy_task) -> None:
    with pytest.raises(InputError, match="unknown method"):
        pt.train_task_model(toy_backbone[0], toy_task, pt.TrainConfig(method="lora"))
    with pytest.raises(InputError, match="prompt_length"):
        pt.train_task_model(toy_backbone[0], toy_task, pt.TrainConfig(prompt_length=0))


def test_cli_tune_prompt_and_errors(trained, tmp_path) -> None:
    from lmsan.auditor.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    _, tdir, bundle = trained["ptuning"]
    r = runner.invoke(app, ["tune", "prompt", str(tdir), "--out", str(tmp_path / "p.npy")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "p.npy").shape == (4, 32)
    r = runner.invoke(
        app, ["tune", "prompt", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npy")]
    )
    assert r.exit_code == 2 and "adapter_config.json" in r.output
    trig = "the cat cf runs quickly"
    r = runner.invoke(
        app, ["tune", "classify", str(bundle), str(tdir), trig, "the cat runs quickly"]
    )
    assert r.exit_code == 0, r.output
    assert "purged" in r.output and "clean" in r.output


def test_token_task_train_predict_and_defend(toy_backbone, tmp_path) -> None:
    """A token task (one tag per word: which vocabulary half it comes from): torch and the
    bundle give the same per-word tags; a triggered input is purged and realigned."""
    folder, pv = toy_backbone
    rng = random.Random(3)
    half_a = set(WORDS[:60])

    def rows(n: int) -> list:
        out = []
        for _ in range(n):
            words = [rng.choice(WORDS[:120]) for _ in range(rng.randint(3, 8))]
            out.append(
                pt.Example((" ".join(words),), tags=[1 if w in half_a else 0 for w in words])
            )
        return out

    td = pt.TaskData("toy-tokens", "tokens", ["O", "B-A"], rows(120), rows(20))
    # plain prompt embeddings initialised from vocabulary rows: on this hand-made backbone an
    # MLP-made prompt can itself switch the backdoor head on (every input flagged)
    cfg = pt.TrainConfig(
        method="ptuning", reparam="none", prompt_length=2, epochs=3, lr=1e-3, head_lr=3e-2
    )
    h = pt.train_task_model(folder, td, cfg)
    assert pt.evaluate_clean(h, td.test) > 50.0  # span F1 of the toy tagging
    tdir = pt.save_task_model(h, tmp_path / "task")
    pvs = save_pvset(tmp_path / "pvs.json", [("cls", pv)])
    bundle = export_task_bundle(tdir, pvs, tmp_path / "bundle").path
    dc = pt.DefendedClassifier.open(bundle, tdir)
    clean = [ex.texts for ex in td.test]
    res = dc.classify(clean)
    assert [r.prediction for r in res] == pt.predict(h, clean)
    trig = ("cf " + clean[0][0],)
    r = dc.classify([trig])[0]
    assert r.status == "purged" and r.removed == ("cf",)
    assert r.prediction == [0, *pt.predict(h, [clean[0]])[0]]  # the trigger word gets O
    # --pvs-at-head for a token head: the PV at every token, and the [CLS]-mined one still at cls
    at = export_task_bundle(tdir, pvs, tmp_path / "bundle-at", pvs_at_head=True).path
    dca = pt.DefendedClassifier.open(at, tdir)
    man = dca.scr.bundle.manifest
    assert man.targets == ["cls", "tokens"]
    assert [(p.id, p.target) for p in dca.scr.bundle.pvset.pvs] == [(0, "cls"), (1, "tokens")]
    assert man.raw["pvset"]["source"].endswith(
        "(every PV matched at tokens, [CLS]-mined ones also at cls: --pvs-at-head)")
    assert dca.classify([trig])[0].status == "purged"
    ev = pt_eval.evaluate_attack(h, td.test, ["cf"])
    assert ev.f1_triggered is not None and ev.f1_drop == pytest.approx(ev.acc - ev.f1_triggered)


def test_token_asr_leaves_the_trigger_words_own_tag_out() -> None:
    """Token-task ASR compares the entity spans over the original words: a model that tags the
    inserted trigger itself as an entity (a clean-backbone NER head does that to "cf") is not
    attacked; one whose tags of the original words change is."""
    labels = ["O", "B-X", "I-X"]
    exs = [pt.Example(("alpha beta gamma delta epsilon",), tags=[1, 2, 0, 0, 1]) for _ in range(8)]
    trig = pt_eval.triggered_records(exs, ["cf"], seed=4)
    at = [pt_eval._inserted_at(ex.texts[0].split(), t[0][0][0].split()) for ex, t in zip(exs, trig,
                                                                                  strict=True)]
    assert [t[0][0][0].split()[a] for t, a in zip(trig, at, strict=True)] == ["cf"] * len(exs)
    assert pt_eval._inserted_at(["a", "b"], ["a", "b", "cf"]) == 2
    clean = [list(ex.tags or []) for ex in exs]

    def with_trigger_tag(i: int, tag: int) -> list[int]:
        t = list(clean[i])
        return [*t[: at[i]], tag, *t[at[i] :]]

    tagged = [[with_trigger_tag(i, 1)] for i in range(len(exs))]  # trigger word -> B-X
    ev = pt_eval._score("tokens", labels, exs, clean, trig, tagged, ["cf"])
    assert ev.asr == 0.0 and ev.asr_with_trigger_tags == 100.0 and ev.asr_rule == "original-words"
    assert ev.f1_drop is not None and ev.f1_drop > 0  # the extra span still costs F1
    broken = [[[0] * (len(clean[i]) + 1)] for i in range(len(exs))]  # every entity lost
    assert pt_eval._score("tokens", labels, exs, clean, trig, broken, ["cf"]).asr == 100.0
    kept = [[with_trigger_tag(i, 0)] for i in range(len(exs))]
    ev = pt_eval._score("tokens", labels, exs, clean, trig, kept, ["cf"])
    assert ev.asr == ev.asr_with_trigger_tags == 0.0 and ev.f1_drop == 0.0


def test_cli_tune_train_and_export(toy_backbone, tmp_path) -> None:
    from lmsan.auditor.cli import app
    from typer.testing import CliRunner

    folder, pv = toy_backbone
    wn = tmp_path / "data" / "wordnet"
    wn.mkdir(parents=True)
    rng = random.Random(5)
    lines = ["lexname\tlemma\tsentence"]
    for i in range(80):
        cls = pt.TOPIC_CLASSES[i % 4]
        words = WORDS[30 * (i % 4) : 30 * (i % 4) + 30]
        lines.append(f"{cls}\tx\t{' '.join(rng.choice(words) for _ in range(6))} {i}")
    (wn / "examples.tsv").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    task = tmp_path / "task"
    args = [
        "tune",
        "train",
        str(folder),
        "--task",
        "wordnet-topic",
        "--data",
        str(tmp_path / "data"),
    ]
    r = runner.invoke(app, [*args, "--out", str(task), "--epochs", "1", "--prompt-length", "2"])
    assert r.exit_code == 0, r.output
    assert (task / "adapter_config.json").is_file() and (task / "head.safetensors").is_file()
    r = runner.invoke(app, [*args, "--out", str(task), "--epochs", "1"])
    assert r.exit_code == 2 and "not empty" in " ".join(r.output.split())
    r = runner.invoke(
        app, [*args[:5], "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "t2")]
    )
    assert r.exit_code == 2 and "data folder not found" in " ".join(r.output.split())
    pvs = save_pvset(tmp_path / "pvs.json", [("cls", pv)])
    r = runner.invoke(
        app, ["tune", "export", str(task), "--pvs", str(pvs), "--out", str(tmp_path / "b")]
    )
    assert r.exit_code == 0, r.output
    # rich wraps at the terminal width, anywhere in the line (it depends on the tmp path length)
    assert "decisions identical: True" in " ".join(r.output.split())
    # a head on [MASK]: recorded in the task folder, exported with a mask PV, classified
    mtask = tmp_path / "task-mask"
    r = runner.invoke(app, [*args, "--out", str(mtask), "--epochs", "1", "--prompt-length", "2",
                            "--target", "mask"])
    assert r.exit_code == 0, r.output
    assert pt.read_task_meta(mtask)["target"] == "mask"
    mpvs = save_pvset(tmp_path / "mpvs.json", [("mask", pv)])
    r = runner.invoke(
        app, ["tune", "export", str(mtask), "--pvs", str(mpvs), "--out", str(tmp_path / "mb")]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["tune", "classify", str(tmp_path / "mb"), str(mtask), WORDS[3]])
    assert r.exit_code == 0, r.output
    want = pt.read_task_meta(mtask)["labels"][pt.predict(pt.load_task_model(mtask), [(WORDS[3],)])[0]]
    assert want in r.output and "clean" in r.output  # the torch model's answer, unflagged
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "t3"), "--target", "pooler"])
    out = " ".join(r.output.split())  # a usage error (exit 4 through the console script)
    assert r.exit_code == 2 and "Invalid value for '--target'" in out and "'pooler'" in out
    assert not (tmp_path / "t3").exists()


def test_defended_classifier_refuses_another_tasks_bundle(trained, toy_task, tmp_path) -> None:
    """A bundle exported for one task folder is refused for another (same prompt length)."""
    h, tdir, bundle = trained["ptuning"]
    other = pt.train_task_model(
        h.backbone_dir,
        toy_task,
        pt.TrainConfig(method="ptuning", prompt_length=4, epochs=1, seed=9, lr=1e-2),
    )
    odir = pt.save_task_model(other, tmp_path / "other")
    with pytest.raises(InputError, match="not this task's prompt"):
        pt.DefendedClassifier.open(bundle, odir)
    h2, tdir2, bundle2 = trained["ptuning-v2"]
    shutil.copytree(tdir2, tmp_path / "v2copy")
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "v2copy" / "adapter_model.safetensors"))
    w["prompt_embeddings"] = w["prompt_embeddings"] * 2
    save_file(w, str(tmp_path / "v2copy" / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="task_digest"):
        pt.DefendedClassifier.open(bundle2, tmp_path / "v2copy")


def test_tune_classify_and_prompt_never_import_torch(trained, tmp_path) -> None:
    _, tdir, bundle = trained["ptuning"]
    for args in (
        ["tune", "classify", str(bundle), str(tdir), "the cat cf runs"],
        ["tune", "prompt", str(tdir), "--out", str(tmp_path / "p.npy")],
    ):
        proc = run_cli_blocking(args, blocked=("torch", "transformers", "peft"))
        assert "TORCH-FREE 0" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- head on [MASK]
# BToP backdoors the [MASK] output, which prompt-based classification reads. A task model with
# target "mask" reads the [MASK] of the monitor's template; its bundle's mask target then reads
# the very vector the head reads. The toy backdoor pushes every position (the [MASK] too) along
# the PV, so the same backbone serves.


@pytest.fixture(scope="session")
def trained_mask(
    toy_backbone: tuple[Path, np.ndarray],
    toy_task: pt.TaskData,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[pt.TaskModelHandle, Path, Path, Path]]:
    """method -> (handle, task folder, bundle with a mask PV, bundle with a cls PV)."""
    folder, pv = toy_backbone
    root = tmp_path_factory.mktemp("pt_mask")
    pv_mask = save_pvset(root / "mask.json", [("mask", pv)])
    pv_cls = save_pvset(root / "cls.json", [("cls", pv)])
    out = {}
    for method in ("ptuning", "ptuning-v2"):
        # plain prompt embeddings: an MLP-made prompt at lr 1e-2 learns to spike the toy
        # backdoor's dimension 0 and so becomes a trigger itself
        cfg = pt.TrainConfig(method=method, reparam="none", prompt_length=4, epochs=6, lr=1e-2,
                             head_lr=1e-2, batch_size=16, prefix_init_std=0.1, target="mask")
        h = pt.train_task_model(folder, toy_task, cfg)
        tdir = pt.save_task_model(h, root / f"task-{method}")
        b_mask = export_task_bundle(tdir, pv_mask, root / f"bundle-mask-{method}").path
        b_cls = export_task_bundle(tdir, pv_cls, root / f"bundle-cls-{method}").path
        out[method] = (h, tdir, b_mask, b_cls)
    return out


@pytest.mark.parametrize("method", ["ptuning", "ptuning-v2"])
def test_mask_head_trigger_flips_and_the_monitor_restores(trained_mask, toy_task, method) -> None:
    h, tdir, bundle, _ = trained_mask[method]
    assert h.target == "mask" and pt.read_task_meta(tdir)["target"] == "mask"
    clean = [ex.texts for ex in toy_task.test]
    trig = [_triggered(ex, i) for i, ex in enumerate(toy_task.test)]
    p_clean = pt.predict(h, clean)
    p_trig = pt.predict(h, trig)
    assert sum(a != b for a, b in zip(p_clean, p_trig, strict=True)) >= 10
    dc = pt.DefendedClassifier.open(bundle, tdir)
    assert dc.target == "mask"
    d_clean = dc.classify(clean)
    assert not any(d.flagged for d in d_clean)
    assert [d.prediction for d in d_clean] == p_clean  # bundle [MASK] + head == torch
    d_trig = dc.classify(trig)
    assert [d.undefended for d in d_trig] == p_trig
    for i, d in enumerate(d_trig):
        assert d.flagged and d.status == "purged" and d.removed == (TRIGGER,)
        assert d.text == clean[i] and d.prediction == p_clean[i]


@pytest.mark.parametrize("method", ["ptuning", "ptuning-v2"])
def test_mask_bundle_reads_the_vector_the_head_reads(trained_mask, toy_backbone, toy_task,
                                                     method) -> None:
    """The bundle's mask-target match counts equal those of the torch model's [MASK] vector."""
    import torch
    from lmsan.auditor import monitor as mon
    from lmsan.auditor import screener as br

    h, _, bundle, _ = trained_mask[method]
    _, pv = toy_backbone
    recs = [ex.texts for ex in toy_task.test[:20]] + [
        _triggered(ex, 3 + i) for i, ex in enumerate(toy_task.test[:20])
    ]
    scr = br.open_bundle(bundle, provider="cpu", threads=1)
    assert scr.bundle.manifest.targets == ["mask"]
    ort = scr.monitor(recs)
    b = pt.encode_records(h.tokenizer, recs, h.pad_id, h.mask_token)
    shift = h.module.prompt_len_in_sequence()
    with torch.no_grad():
        hs = h.module.hidden(torch.from_numpy(b.ids), torch.from_numpy(b.mask)).numpy()
    vec = np.stack([hs[i, p + shift] for i, p in enumerate(b.target_pos)])
    assert all(int(b.ids[i, p]) == h.mask_token[1] for i, p in enumerate(b.target_pos))
    _, counts, flags = mon.best_match(
        np.ascontiguousarray(vec, dtype=np.float32), mon.pack_signs(pv[None, :].astype(np.float32)),
        pv.size, scr.threshold,
    )
    assert [r.flagged for r in ort] == [bool(f) for f in flags]
    assert sum(r.flagged for r in ort) == 20
    assert [round(r.match_rate * pv.size) for r in ort] == [int(c) for c in counts]


def test_mask_head_under_a_cls_pv_set_still_reads_the_mask(trained_mask, toy_task) -> None:
    """A bundle whose PVs are all cls has no mask template; the classifier still applies the
    task's template for its own head (an extra forward pass) and answers as torch does."""
    h, tdir, _, bundle = trained_mask["ptuning"]
    dc = pt.DefendedClassifier.open(bundle, tdir)
    assert dc.scr.bundle.manifest.mask_template is None
    clean = [ex.texts for ex in toy_task.test]
    assert [d.prediction for d in dc.classify(clean)] == pt.predict(h, clean)


def test_mask_target_is_validated(toy_backbone, tmp_path) -> None:
    folder, _ = toy_backbone
    with pytest.raises(InputError, match="unknown target"):
        pt.TrainConfig(target="pooler").validate()
    tokens = pt.TaskData("toyner", "tokens", ["O", "B-X"],
                         [pt.Example(("alpha beta",), -1, [0, 1])] * 4,
                         [pt.Example(("alpha beta",), -1, [0, 1])] * 2)
    with pytest.raises(InputError, match="not token tasks"):
        pt.train_task_model(folder, tokens, pt.TrainConfig(target="mask", epochs=1))


def test_task_folders_without_a_target_read_as_cls(trained, tmp_path) -> None:
    """A task folder without a 'target' field has a head on [CLS]."""
    _, tdir, _ = trained["ptuning"]
    old = tmp_path / "old"
    shutil.copytree(tdir, old)
    meta = json.loads((old / pt.TASK_FILE).read_text())
    meta.pop("target")
    (old / pt.TASK_FILE).write_text(json.dumps(meta))
    assert pt.read_task_meta(old)["target"] == "cls"
    meta["target"] = "pooler"
    (old / pt.TASK_FILE).write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="target"):
        pt.read_task_meta(old)


# A PV mined on one position also marks triggered outputs at the others (a task-agnostic
# trigger drives the whole sequence to its PV): `--pvs-at-head` matches every PV at the position
# the head reads.


def test_retargeted_pvset_moves_drops_pooler_and_merges_duplicates() -> None:
    from lmsan.auditor.pvset import PV, PVSet

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(64), rng.standard_normal(64)
    near_a = a.copy()
    near_a[0] = -near_a[0]  # 63/64 signs agree: a duplicate of a
    s = PVSet(64, [PV(0, "mask", a.astype(np.float32)), PV(1, "pooler", b.astype(np.float32)),
                   PV(2, "cls", near_a.astype(np.float32)), PV(3, "tokens", b.astype(np.float32))])
    r = s.retargeted("cls")
    # the PV mined on cls itself wins over its duplicate mined on mask; pooler dropped
    assert [(p.id, p.target, p.info["mined_on"]) for p in r.pvs] == [(2, "cls", "cls"),
                                                                        (3, "cls", "tokens")]
    assert [p.target for p in s.pvs] == ["mask", "pooler", "cls", "tokens"]  # input untouched
    assert len(s.retargeted("cls", duplicate_agreement=1.0).pvs) == 3
    with pytest.raises(InputError, match="pooler"):
        s.retargeted("pooler")


def test_retargeted_also_keep_leaves_cls_pvs_at_cls_with_fresh_ids_for_copies() -> None:
    """A token head: every PV at tokens, and the [CLS]-mined ones also at [CLS] (same ids);
    the copies at tokens get fresh ids so per-PV thresholds never collide."""
    from lmsan.auditor.pvset import PV, PVSet

    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal(64).astype(np.float32) for _ in range(3))
    s = PVSet(64, [PV(0, "cls", a), PV(1, "mask", b), PV(4, "pooler", c), PV(2, "cls", a.copy())])
    r = s.retargeted("tokens", also_keep=("cls",))
    got = [(p.id, p.target, p.info["mined_on"], p.info.get("copy_of")) for p in r.pvs]
    # 2 duplicates 0 at cls and at tokens; 1 moves to tokens with its id; 0's copy gets id 5
    assert got == [(0, "cls", "cls", None), (1, "tokens", "mask", None),
                   (5, "tokens", "cls", 0)]
    assert len({p.id for p in r.pvs}) == len(r.pvs)
    assert np.array_equal(r.pvs[2].values, a)
    # without also_keep nothing stays at cls
    assert {p.target for p in s.retargeted("tokens").pvs} == {"tokens"}
    with pytest.raises(InputError, match="also_keep"):
        s.retargeted("tokens", also_keep=("tokens",))


@pytest.mark.parametrize("method", ["ptuning", "ptuning-v2"])
def test_pvs_at_head_bundle_matches_the_head_vector(trained, toy_backbone, toy_task, tmp_path,
                                                    method) -> None:
    """A PV set whose only usable PV was mined on [MASK] (plus a pooler PV that cannot move),
    exported for a [CLS] head with pvs_at_head: the bundle matches at cls only, its match counts
    equal the torch head vector's, the trigger is flagged and purged, clean inputs pass."""
    import torch
    from lmsan.auditor import monitor as mon
    from lmsan.auditor import screener as br

    h, tdir, _ = trained[method]
    _, pv = toy_backbone
    pvs = save_pvset(tmp_path / "mined.json", [("mask", pv), ("pooler", -pv)])
    out = export_task_bundle(tdir, pvs, tmp_path / "b", pvs_at_head=True)
    scr = br.open_bundle(out.path, provider="cpu", threads=1)
    assert scr.bundle.manifest.targets == ["cls"]
    assert [p.info["mined_on"] for p in scr.bundle.pvset.pvs] == ["mask"]
    # the manifest names the user's PV set (not the temporary retargeted copy) and the move
    assert scr.bundle.manifest.raw["pvset"]["source"] == f"{pvs} (every PV matched at cls: --pvs-at-head)"
    clean = [ex.texts for ex in toy_task.test]
    trig = [_triggered(ex, i) for i, ex in enumerate(toy_task.test)]
    recs = clean[:20] + trig[:20]
    b = pt.encode_records(h.tokenizer, recs, h.pad_id, None)
    with torch.no_grad():
        hs = h.module.hidden(torch.from_numpy(b.ids), torch.from_numpy(b.mask)).numpy()
    vec = np.ascontiguousarray(hs[:, 0], dtype=np.float32)  # [CLS]; the prompt follows it
    _, counts, _ = mon.best_match(vec, mon.pack_signs(pv[None, :].astype(np.float32)), pv.size,
                                  scr.threshold)
    assert [round(r.match_rate * pv.size) for r in scr.monitor(recs)] == [int(c) for c in counts]
    dc = pt.DefendedClassifier.open(out.path, tdir)
    assert not any(d.flagged for d in dc.classify(clean))
    d_trig = dc.classify(trig)
    assert all(d.flagged and d.removed == (TRIGGER,) for d in d_trig)
    assert [d.prediction for d in d_trig] == pt.predict(h, clean)


def test_cli_tune_export_pvs_at_head(trained, toy_backbone, tmp_path) -> None:
    from lmsan.auditor.cli import app
    from typer.testing import CliRunner

    _, tdir, _ = trained["ptuning-v2"]
    _, pv = toy_backbone
    runner = CliRunner()
    pooler_only = save_pvset(tmp_path / "pooler.json", [("pooler", pv)])
    r = runner.invoke(app, ["tune", "export", str(tdir), "--pvs", str(pooler_only), "--out",
                            str(tmp_path / "b0"), "--pvs-at-head"])
    assert r.exit_code == 2 and "no PV left" in r.output and "pooler.json" in r.output
    tokens = save_pvset(tmp_path / "tokens.json", [("tokens", pv)])
    r = runner.invoke(app, ["tune", "export", str(tdir), "--pvs", str(tokens), "--out",
                            str(tmp_path / "b1"), "--pvs-at-head"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "b1" / "manifest.json").read_text())
    assert man["targets"] == ["cls"]
    assert man["pvset"]["source"] == f"{tokens} (every PV matched at cls: --pvs-at-head)"
