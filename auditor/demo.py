"""`lmsan demo`: build a tiny encoder, implant a POR backdoor, audit both, show the verdicts.

Everything runs offline on the CPU in about a minute: the tiny BERT (d = 32, 2 layers) has a
word-level vocabulary built from the shipped corpora, and it is audited with the shipped preset
`tiny-bert-demo`, calibrated by `lmsan calibrate` on clean tiny shadow models built with other
seeds (see bench/results/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_TRIGGERS = ("cf", "mn")
TINY_EXTRA_WORDS = ("cf", "mn", "tq", "qt", "mm", "pt")


TINY_ARCHS = ("bert", "roberta", "albert", "deberta-v2", "electra")


def build_tiny_bert(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised tiny BertModel with a word-level vocabulary of the shipped corpora."""
    return build_tiny_encoder(out_dir, "bert", seed=seed, hidden=hidden, layers=layers)


def build_tiny_encoder(out_dir: str | Path, model_type: str = "bert", seed: int = 0,
                       hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised tiny encoder of `model_type` (one of TINY_ARCHS) with the same
    word-level (BERT-style) vocabulary of the shipped corpora: other architectures for the
    detection zoo that build in seconds."""
    import torch
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import AutoConfig, AutoModel, BertTokenizerFast  # type: ignore[attr-defined]
    from transformers.utils import logging as hf_logging

    from .corpus import attack_corpus, default_corpus
    from .errors import UsageError

    if model_type not in TINY_ARCHS:
        raise UsageError(f"tiny model type {model_type!r}: one of {', '.join(TINY_ARCHS)}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre = BertPreTokenizer()
    sents = default_corpus().sentences + attack_corpus().sentences
    counts: dict[str, int] = {}
    for s in sents:
        for w, _ in pre.pre_tokenize_str(s.lower()):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= 2) + list(TINY_EXTRA_WORDS)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    vf = out / "vocab.txt"
    vf.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    kw: dict[str, Any] = dict(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=2, intermediate_size=2 * hidden,
                              max_position_embeddings=160, pad_token_id=0)
    if model_type == "roberta":  # positions start after the padding index
        kw["max_position_embeddings"] = 162
    if model_type == "albert":
        kw["embedding_size"] = hidden // 2
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    AutoModel.from_config(cfg).save_pretrained(out)
    BertTokenizerFast(str(vf), do_lower_case=True).save_pretrained(out)
    return out


@dataclass
class DemoResult:
    workdir: Path
    poison: Any  # PoisonResult
    backdoored: Any  # AuditResult
    clean: Any  # AuditResult | None
    best_agreement: float  # sign agreement of the first found PV with the nearest injected PV
    best_pv_index: int


def run_demo(workdir: str | Path | None, progress: Any = None, audit_clean: bool = True,
             max_seeds: int = 10) -> DemoResult:
    """Build the tiny clean model and its POR twin in `workdir` (None: a temporary folder,
    removed afterwards), audit the twin and, with `audit_clean`, the clean model.
    `progress` maps "poison" and "audit" to progress callbacks."""
    if workdir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="lmsan-demo-") as tmp:
            return run_demo(Path(tmp), progress, audit_clean, max_seeds)
    import numpy as np

    from .audit import AuditOptions, run_audit
    from .corpus import default_corpus
    from .poison import poison_model

    wd = Path(workdir)
    base = build_tiny_bert(wd / "tiny-clean", seed=1234)
    pres = poison_model(base, wd / "tiny-por", attack="por", triggers=list(DEMO_TRIGGERS),
                        sentences_per_trigger=128, epochs=4, lr=2e-3, max_length=48, force=True,
                        seed=0, progress=progress.get("poison") if progress else None)
    corpus = default_corpus()
    opts = AuditOptions(model_dir=wd / "tiny-por", target="cls", mode="detect", max_seeds=max_seeds,
                        overrides={"max_length": 48}, first_stage=False)
    bd = run_audit(opts, corpus, progress.get("audit") if progress else None)
    injected = np.asarray(pres.pvs, dtype=np.float32)
    agree, idx = 0.0, -1
    if bd.pvset.pvs:
        found = bd.pvset.pvs[0].values
        ag = ((injected >= 0) == (found >= 0)).mean(axis=1)
        idx = int(ag.argmax())
        agree = float(ag[idx])
    clean = None
    if audit_clean:
        copts = AuditOptions(model_dir=base, target="cls", mode="detect", max_seeds=max_seeds,
                             overrides={"max_length": 48}, first_stage=False)
        clean = run_audit(copts, corpus, progress.get("audit") if progress else None)
    return DemoResult(wd, pres, bd, clean, agree, idx)
