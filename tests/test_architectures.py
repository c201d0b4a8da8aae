"""Every supported architecture loads through the safe loader and mines (tiny random configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

ARCHS = ["bert", "roberta", "albert", "deberta-v2", "electra", "distilbert", "mpnet", "xlnet"]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from lmsan.auditor.corpus import default_corpus
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    root = tmp_path_factory.mktemp("tok")
    pre = BertPreTokenizer()
    words = sorted({w for s in default_corpus().sentences[:200] for w, _ in
                    pre.pre_tokenize_str(s.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(str(root / "vocab.txt"), do_lower_case=True), len(vocab)


@pytest.mark.parametrize("model_type", ARCHS)
def test_architecture_loads_and_mines(model_type: str, word_tokenizer, tmp_path: Path) -> None:
    import torch
    from lmsan.auditor.audit import resolve_targets
    from lmsan.auditor.corpus import Corpus, default_corpus
    from lmsan.auditor.mining import Miner, MiningConfig
    from lmsan.auditor.modelio import load_encoder
    from transformers import AutoConfig, AutoModel

    tok, v = word_tokenizer
    kw = dict(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    if model_type == "distilbert":
        kw = dict(vocab_size=v, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                  max_position_embeddings=128, pad_token_id=0)
    if model_type == "xlnet":
        kw = dict(vocab_size=v, d_model=32, n_layer=2, n_head=2, d_inner=64, pad_token_id=0)
    if model_type == "albert":
        kw["embedding_size"] = 16
    if model_type == "roberta":
        kw["max_position_embeddings"] = 130
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_encoder(tmp_path)
    assert lm.model_type == model_type and lm.weights_format == "safetensors"
    targets, _ = resolve_targets(lm, "auto")
    assert targets[0] == "cls" and "tokens" in targets
    corpus = Corpus("t", default_corpus().sentences[:64])
    m = Miner(lm, corpus, targets, MiningConfig(max_length=32, epochs=1, abort_epoch=1,
                                                eval_sentences=32, t_l=0.0))
    res = m.run_seed(0)
    assert res.steps == 2 and {t.target for t in res.targets} == set(targets)
    for t in res.targets:
        assert t.candidate and t.distance_raw >= 0 and t.concentration >= 0
        width = lm.hidden_size
        assert t.pv is not None and len(t.pv) == width


@pytest.mark.parametrize("model_type", ["roberta", "albert", "deberta-v2", "electra"])
def test_build_tiny_encoder_makes_a_loadable_model(model_type: str, tmp_path: Path) -> None:
    """The zoo's tiny other-architecture encoders load through the safe loader, same vocabulary."""
    from lmsan.auditor.demo import build_tiny_encoder
    from lmsan.auditor.modelio import load_encoder

    d = build_tiny_encoder(tmp_path / model_type, model_type, seed=3)
    lm = load_encoder(d)
    assert lm.model_type == model_type and lm.hidden_size == 32
    assert lm.weights_format == "safetensors" and lm.tokenizer.mask_token == "[MASK]"
    assert lm.tokenizer.convert_tokens_to_ids("cf") != lm.tokenizer.unk_token_id


def test_build_tiny_encoder_refuses_unknown_type(tmp_path: Path) -> None:
    from lmsan.auditor.demo import build_tiny_encoder
    from lmsan.auditor.errors import UsageError

    with pytest.raises(UsageError, match="tiny model type 'gpt2'"):
        build_tiny_encoder(tmp_path / "x", "gpt2")
