"""Shared pytest fixtures. Each engineer's fixtures live in their own marked block."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# rich wraps console output at the terminal width, which the test runner does not have: a message
# after a long tmp path could break anywhere. A wide fixed width keeps each message on one line.
os.environ["COLUMNS"] = "400"

import pytest

# ----------------------------------------------------------------------------------------------
# BEGIN poison fixtures (owner: lmsan poison). Tiny randomly initialised BERT encoders with a
# word-level vocabulary built from the first 300 sentences of the shipped attack corpus.
#   tiny_poison_corpus  -> Path of a text corpus (one sentence a line)
#   tiny_bert_dir       -> BertModel folder (pooler, no MLM head), safetensors + tokenizer
#   tiny_bert_mlm_dir   -> BertForMaskedLM folder (MLM head, no pooler)
#   tiny_bert_nomask_dir-> like tiny_bert_dir, but the tokenizer has no mask token
# d = 32, 2 layers, 2 heads; vocabulary also holds the paper triggers and a few list words.
# ----------------------------------------------------------------------------------------------

TINY_EXTRA_WORDS = ("cf", "mn", "tq", "qt", "mm", "pt", "zorp", "blick", "flimt", "snarv")


@pytest.fixture(scope="session")
def _tiny_poison_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from lmsan.auditor.corpus import attack_corpus
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("tiny_poison")
    sents = attack_corpus().sentences[:300]
    (root / "corpus.txt").write_text("\n".join(sents) + "\n", encoding="utf-8")
    pre = BertPreTokenizer()
    words = {w for s in sents for w, _ in pre.pre_tokenize_str(s.lower())}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words | set(TINY_EXTRA_WORDS))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    tok = BertTokenizerFast(str(root / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(root / "enc")
    tok.save_pretrained(root / "enc")
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(root / "mlm")
    tok.save_pretrained(root / "mlm")
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(root / "nomask")
    BertTokenizerFast(str(root / "vocab.txt"), do_lower_case=True, mask_token=None).save_pretrained(
        root / "nomask"
    )
    return root


@pytest.fixture(scope="session")
def tiny_poison_corpus(_tiny_poison_root: Path) -> Path:
    return _tiny_poison_root / "corpus.txt"


@pytest.fixture(scope="session")
def tiny_bert_dir(_tiny_poison_root: Path) -> Path:
    return _tiny_poison_root / "enc"


@pytest.fixture(scope="session")
def tiny_bert_mlm_dir(_tiny_poison_root: Path) -> Path:
    return _tiny_poison_root / "mlm"


@pytest.fixture(scope="session")
def tiny_bert_nomask_dir(_tiny_poison_root: Path) -> Path:
    return _tiny_poison_root / "nomask"


# END poison fixtures
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# BEGIN screen fixtures (export, scan, threshold). The hand-made POR-style BERT of
# screen_fixtures (d = 32, trigger ``cf`` -> a quarter +/-1 PV) and the bundle exported from it.
#   backdoored_model -> (model folder, the PV the trigger drives [CLS] onto)
#   cls_pvset        -> PV set file: that PV on target cls, match threshold 0.8
#   cls_bundle       -> the bundle of the model and cls_pvset (`lmsan export` defaults)
# Tests marked `gpu` run only where ONNX Runtime has a CUDA execution provider.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def backdoored_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    import screen_fixtures as sf
    import torch

    torch.set_num_threads(1)
    return sf.backdoored_bert(tmp_path_factory.mktemp("backdoored") / "model")


@pytest.fixture(scope="session")
def cls_pvset(backdoored_model: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    import screen_fixtures as sf

    folder = tmp_path_factory.mktemp("pvsets")
    return sf.save_pvset(folder / "cls.json", [("cls", backdoored_model[1])])


@pytest.fixture(scope="session")
def cls_bundle(
    backdoored_model: tuple[Path, Any], cls_pvset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from lmsan.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "cls"
    export_bundle(backdoored_model[0], cls_pvset, out)
    return out


def _cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not _cuda_provider_available():
        pytest.skip("needs an active CUDA execution provider (onnxruntime-gpu and a GPU)")


# END screen fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_por_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny clean BERT and its POR copy (triggers cf, mn; the injected PVs in injected.npy)
    with a 512-sentence clean corpus, built once for the audit, render and batch tests. Treat
    the models as read only: copy one before changing it."""
    import numpy as np
    import torch
    from lmsan.auditor.corpus import default_corpus
    from lmsan.auditor.demo import build_tiny_bert
    from lmsan.auditor.poison import poison_model

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tiny-por")
    clean = build_tiny_bert(root / "clean", seed=1234)
    res = poison_model(clean, root / "por", attack="por", triggers=["cf", "mn"],
                       sentences_per_trigger=128, epochs=4, lr=2e-3, max_length=48, seed=0)
    assert res.success >= 0.9
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(default_corpus().sentences[:512]) + "\n")
    np.save(root / "injected.npy", np.asarray(res.pvs, dtype=np.float32))
    return {"clean": clean, "por": root / "por", "corpus": corpus, "root": root}
