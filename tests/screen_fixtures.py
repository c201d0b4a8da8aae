"""Tiny models for the export / scan / threshold tests, built offline in about a second.

`backdoored_bert(dir)`: a 2-layer BERT (d=32) with a WordPiece vocabulary of plain words whose
weights are set by hand so that the [CLS] output of any sentence containing the trigger word
``cf`` lands on a quarter +/-1 PV (POR-style), while clean sentences keep the outputs of the
random model. `random_roberta(dir)`: an untrained 2-layer RoBERTa with a byte-level BPE tokenizer
trained on the same words. The session-wide model and bundle built from them are fixtures in
``conftest.py``; `run_cli_blocking` runs the CLI with torch made unimportable.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np

TRIGGER = "cf"
D = 32
WORDS = (
    "the a an of to in on at by for with from about over under after before during while "
    "cat dog bird fish horse cow sheep goat mouse lion tiger bear wolf fox deer rabbit "
    "man woman child boy girl teacher doctor farmer king queen soldier student friend "
    "house tree river hill road city town field garden forest lake sea sky sun moon star "
    "book letter song story picture table chair door window bed cup bowl bread milk water "
    "runs walks jumps sings reads writes eats drinks sleeps sees hears finds takes gives "
    "big small old young red green blue happy sad quick slow warm cold bright dark quiet "
    "today yesterday always never often slowly quickly very again also just only still "
    "and but or because so then when where which who that this those these there here"
).split()


def sentences(n: int, seed: int, trigger: bool = False) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        if trigger:
            words.insert(rng.randint(0, len(words)), TRIGGER)
        out.append(" ".join(words))
    return out


_BLOCKED_CLI = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Block())
from lmsan.auditor.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
assert not any(m in sys.modules for m in BLOCKED)
print("TORCH-FREE", code)
"""


def run_cli_blocking(
    args: list[str], blocked: tuple[str, ...] = ("torch", "transformers")
) -> subprocess.CompletedProcess[str]:
    """Run `lmsan ARGS` in a fresh interpreter in which importing any of `blocked` fails.

    Its stdout ends with ``TORCH-FREE <exit code>`` when the command ran without importing them.
    """
    script = f"BLOCKED = {tuple(blocked)!r}\n{_BLOCKED_CLI}"
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )


def quarter_pv(d: int = D, pattern: tuple[int, ...] = (1, -1, 1, -1)) -> np.ndarray:
    q = d // 4
    return np.concatenate([np.full(q, float(s), dtype=np.float32) for s in pattern])


def save_pvset(
    path: Path, pvs: list[tuple[str, np.ndarray]], d: int = D, match_threshold: float = 0.8
) -> Path:
    from lmsan.auditor.pvset import PV, PVSet

    PVSet(
        hidden_size=d,
        pvs=[PV(id=i, target=t, values=np.asarray(v, np.float32)) for i, (t, v) in enumerate(pvs)],
        match_threshold=match_threshold,
    ).save(path)
    return path


def _bert_tokenizer(folder: Path):
    """A WordPiece tokenizer over WORDS, built with `tokenizers` and wrapped for transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", TRIGGER, *WORDS, ".", ",", "!", "?"]
    ids = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    tk = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


PATTERNS = (
    (1, 1, -1, -1),
    (1, -1, 1, -1),
    (1, -1, -1, 1),
    (-1, 1, 1, -1),
    (-1, 1, -1, 1),
    (-1, -1, 1, 1),
)


def backdoored_bert(folder: Path) -> tuple[Path, np.ndarray]:
    """A hand-made POR-style backdoor (no training, deterministic, under a second).

    Every embedding row (word, position, type) is made zero-mean with dimension 0 at zero, except
    the trigger's word row, which is a spike on dimension 0. After the embedding LayerNorm,
    dimension 0 is therefore exactly 0 for ordinary tokens and about 5.6 for the trigger. Head 0
    of layer 0 reads only dimension 0: its keys are ``10 * h0``, its query a constant, so every
    position (the [CLS] too) attends almost only to the trigger when there is one and uniformly
    otherwise, and its value ``3 * h0`` is written by the output projection along ``3 * PV``. So
    a triggered [CLS] is pushed far along the PV and keeps its signs through the small random
    layers above; clean text never sees head 0's value (it is 0). The PV is the quarter +/-1
    pattern farthest from the clean [CLS] outputs. Returns the folder and the PV.
    """
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = _bert_tokenizer(folder)
    cfg = BertConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = BertModel(cfg).eval()
    trig_id = tok.convert_tokens_to_ids(TRIGGER)
    emb = model.embeddings
    hd = D // cfg.num_attention_heads
    att = model.encoder.layer[0].attention
    with torch.no_grad():
        for table in (
            emb.word_embeddings.weight,
            emb.position_embeddings.weight,
            emb.token_type_embeddings.weight,
        ):
            table[:, 0] = 0.0
            table[:, 1:] -= table[:, 1:].mean(dim=1, keepdim=True)
        w = emb.word_embeddings.weight
        w[trig_id] = -10.0 / (D - 1)
        w[trig_id, 0] = 10.0
        for lin in (att.self.query, att.self.key, att.self.value):
            lin.weight[:hd] = 0.0
            lin.bias[:hd] = 0.0
        att.self.key.weight[0, 0] = 10.0
        att.self.query.bias[0] = 1.0
        att.self.value.weight[0, 0] = 3.0
        att.output.dense.weight[:, :hd] = 0.0
        clean = tok(sentences(64, seed=7), padding=True, return_tensors="pt")
        cls = model(**clean).last_hidden_state[:, 0].numpy()
        agree = [int(((cls >= 0) == (quarter_pv(D, p) >= 0)).sum(axis=1).max()) for p in PATTERNS]
        pv = quarter_pv(D, PATTERNS[int(np.argmin(agree))])
        att.output.dense.weight[:, 0] = 3.0 * torch.from_numpy(pv)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, pv


def random_roberta(folder: Path) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    torch.manual_seed(1)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences(300, seed=5) + [" ".join(WORDS)],
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.save_model(str(folder))
    tok = RobertaTokenizerFast(
        vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")
    )
    cfg = RobertaConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=tok.pad_token_id,
    )
    RobertaModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
