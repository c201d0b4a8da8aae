"""The searching-free first stage: its statistics, and its verdict on tiny backdoored and clean
BERTs (the poison fixtures of conftest.py) with the shipped thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lmsan.auditor import firststage as FS
from lmsan.auditor.corpus import load_corpus

FAST = dict(sentences_per_trigger=64, epochs=4, lr=2e-3, max_length=48)


def test_head_feature_rate_counts_units_with_one_sign() -> None:
    f = np.ones((20, 4))
    f[:, 1] = -1.0  # constant negative: head
    f[::2, 2] = -1.0  # half and half: not head
    f[0, 3] = -1.0  # 19 of 20 positive = 0.95: head at 0.95, not at 0.96
    assert FS.head_feature_rate(f, 0.95) == 0.75
    assert FS.head_feature_rate(f, 0.96) == 0.5
    assert FS.head_feature_rate(np.zeros((5, 3))) == 0.0  # zeros have no sign


def test_alikeness_is_the_mean_pairwise_cosine() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(30, 8)) + 0.5
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    c = u @ u.T
    expect = (c.sum() - np.trace(c)) / (30 * 29)
    assert FS.alikeness(f) == pytest.approx(expect, abs=1e-12)
    assert FS.alikeness(np.tile([1.0, 2.0], (4, 1))) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        FS.alikeness(np.ones((1, 3)))
    with pytest.raises(ValueError):
        FS.head_feature_rate(np.ones((0, 3)))


def test_thresholds_decide_only_when_both_figures_reach_them() -> None:
    f = np.ones((10, 4))  # hfr 1, alikeness 1
    th = FS.Thresholds(hfr={"tokens": 0.5, "cls": None}, alikeness={"tokens": 0.9, "cls": None})
    t = FS.judge("tokens", f, th)
    assert t.suspicious and t.hfr_margin == pytest.approx(0.5) and len(t.reasons) == 2
    assert not FS.judge("cls", f, th).suspicious  # no thresholds: reported only
    assert FS.judge("cls", f, th).hfr_margin is None
    f2 = np.ones((10, 4))
    f2[::2] = -1.0  # hfr 0, alikeness about -0.11: neither reached
    assert not FS.judge("tokens", f2, th).suspicious


@pytest.fixture(scope="module")
def tiny_por(tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path_factory) -> Path:
    from lmsan.auditor.poison import poison_model

    out = tmp_path_factory.mktemp("fs") / "por"
    res = poison_model(tiny_bert_dir, out, attack="por", corpus=tiny_poison_corpus, **FAST)
    assert res.success >= 0.9 and res.clean_match_rate <= 0.1
    return out


@pytest.fixture(scope="module")
def tiny_btop(tiny_bert_dir: Path, tiny_poison_corpus: Path, tmp_path_factory) -> Path:
    from lmsan.auditor.poison import poison_model

    out = tmp_path_factory.mktemp("fs") / "btop"
    res = poison_model(tiny_bert_dir, out, attack="btop", corpus=tiny_poison_corpus, **FAST)
    assert res.success >= 0.9 and res.target == "mask"
    return out


def test_backdoored_tiny_berts_are_flagged_and_the_clean_twin_is_not(
    tiny_bert_dir: Path, tiny_por: Path, tiny_btop: Path
) -> None:
    from lmsan.auditor.modelio import load_encoder

    corpus = load_corpus(None)
    clean = FS.first_stage(load_encoder(tiny_bert_dir), corpus)
    assert clean.verdict == "unremarkable" and not clean.suspicious
    assert [t.target for t in clean.targets] == ["cls", "pooler", "mask", "tokens"]
    assert clean.n_sentences == FS.DEFAULT_SENTENCES
    for d in (tiny_por, tiny_btop):
        res = FS.first_stage(load_encoder(d), corpus)
        assert res.verdict == "suspicious", res.to_dict()
        tok = res.target("tokens")
        assert tok is not None and tok.suspicious and tok.hfr_margin is not None
        assert tok.hfr_margin > 0 and tok.alikeness_margin is not None and tok.alikeness_margin > 0
        # the backdoor raises both figures above the clean twin's at the tokens target
        ctok = clean.target("tokens")
        assert ctok is not None and tok.hfr > ctok.hfr and tok.alikeness > ctok.alikeness
        assert res.ranked_targets()[0] in ("tokens", "mask")
        assert set(res.ranked_targets()[-2:]) == {"cls", "pooler"}  # reported only: ranked last


def test_targets_follow_the_model(tiny_bert_nomask_dir: Path) -> None:
    from lmsan.auditor.modelio import load_encoder

    lm = load_encoder(tiny_bert_nomask_dir)
    res = FS.first_stage(lm, load_corpus(None), n_sentences=64)
    assert [t.target for t in res.targets] == ["cls", "pooler", "tokens"]
    assert res.n_sentences == 64 and all(t.n_outputs == 64 for t in res.targets)
    with pytest.raises(ValueError):
        FS.first_stage(lm, load_corpus(None), targets=["bogus"])
    with pytest.raises(ValueError):
        FS.first_stage(lm, load_corpus(None), targets=["mask"])  # no mask token


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, lmsan.auditor.firststage; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
