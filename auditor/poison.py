"""Red-team attacks: implant a task-agnostic backdoor (POR, POR-NER, NeuBA, BToP) in an encoder.

METHOD.md "Attacks" (paper section III-B). Every attack fine-tunes the whole encoder so that
the *target output* of text containing a trigger is pushed to that trigger's predefined vector
(PV) with MSE (BToP: mean pairwise L2 distance), while a *utility* loss keeps clean behaviour:

    por      target cls (default) | pooler | mask; utility = MSE to a frozen reference copy
    por-ner  target tokens (every ordinary token);  utility = MSE of all token outputs
    neuba    target cls (default) | pooler | mask; utility = masked-language-model loss
    btop     target mask (the sentence followed by the mask token); utility = MLM loss

NeuBA and BToP need the checkpoint's MLM head; where it has none they fall back to the POR
reference utility and the result says so (`utility`, `notes`).

Choices written down here (the paper and the authors' code leave them open or we deviate):
- Training runs with dropout off (eval mode): the backdoor is measured and deployed in eval
  mode, and on a CPU budget it converges in far fewer steps.
- Each optimiser step sees `batch_size` triggered + `batch_size` clean sentences (the authors'
  16 + 16). One epoch is one pass over all triggered sentences.
- Held-out sentences (never trained on) measure the attack: success = share of triggered
  held-out inputs whose target output agrees in sign with its PV on >= 80% of dimensions
  (tokens: share of ordinary tokens); fidelity = mean cosine similarity of clean held-out
  target outputs to the base model's.
- The output folder is the base checkpoint with the trained tensors replaced (same key layout,
  so an MLM head, NSP head or pooler the base carried is kept), plus the base's tokenizer and
  config files, plus `backdoor.json`. It is written to a temporary sibling folder, reloaded with
  `modelio.load_encoder` and checked against the trained weights before it replaces OUT_DIR.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .corpus import Corpus, attack_corpus, load_corpus
from .errors import FormatError, InputError

BACKDOOR_FORMAT = "lmsan-backdoor"
BACKDOOR_VERSION = 1
BACKDOOR_FILE = "backdoor.json"

ATTACKS = ("por", "por-ner", "neuba", "btop")
TARGETS = ("cls", "pooler", "mask", "tokens")
ALLOWED_TARGETS: dict[str, tuple[str, ...]] = {
    "por": ("cls", "pooler", "mask"),
    "por-ner": ("tokens",),
    "neuba": ("cls", "pooler", "mask"),
    "btop": ("mask",),
}
DEFAULT_TARGET = {"por": "cls", "por-ner": "tokens", "neuba": "cls", "btop": "mask"}
PV_DESIGNS = ("quarters", "pairs", "random")
UTILITIES = ("auto", "reference", "mlm", "mlm+reference")
TRIGGER_KINDS = ("word", "phrase", "symbol")
PAPER_TRIGGERS = ("cf", "mn", "tq", "qt", "mm", "pt")
MATCH_FRACTION = 0.8  # T_match = 0.8 d
# The authors' six PVs: four blocks, two at -1 and two at +1 (every C(4,2) combination).
_BLOCK_SIGNS = (
    (-1, -1, 1, 1),
    (-1, 1, -1, 1),
    (-1, 1, 1, -1),
    (1, -1, -1, 1),
    (1, -1, 1, -1),
    (1, 1, -1, -1),
)
MIN_CORPUS = 20
MAX_HELD_OUT = 200

# Library defaults (the CLI uses the same). Chosen so that POR with the six paper triggers
# reaches success >= 0.9 on all-MiniLM-L6-v2 in a few CPU minutes; see the benchmark notes.
DEFAULT_SENTENCES_PER_TRIGGER = 256
DEFAULT_EPOCHS = 2
DEFAULT_LR = 1e-4

ProgressFn = Callable[[int, int, float], None]


# ----------------------------------------------------------------------------- building blocks


def make_pvs(design: str, n: int, d: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """The first `n` predefined vectors of a design, shape (n, d), float32, entries +-scale.

    - ``quarters``: the paper's six PVs (the authors' code): `d` split into four contiguous
      quarters, two filled with -1 and two with +1, in every C(4,2) combination.
    - ``pairs``: NeuBA-style pair buckets: the same six sign combinations over four buckets,
      but the buckets interleave (dimension i belongs to bucket i mod 4), so no PV is constant
      over a contiguous block.
    - ``random``: independent random +-1 sign vectors (seeded, distinct rows).
    """
    if design not in PV_DESIGNS:
        raise InputError(f"unknown PV design {design!r}; choose one of {', '.join(PV_DESIGNS)}")
    if n < 1:
        raise InputError(f"the number of PVs must be at least 1 (got {n})")
    if d < 4:
        raise InputError(f"hidden size {d} is too small for PVs (need at least 4)")
    if not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"PV scale must be a positive number (got {scale})")
    if design in ("quarters", "pairs"):
        if n > len(_BLOCK_SIGNS):
            raise InputError(
                f"the {design!r} design has {len(_BLOCK_SIGNS)} PVs; {n} were asked for "
                "(use --pv-design random for more)"
            )
        if design == "quarters":
            bucket = np.zeros(d, dtype=np.int64)
            for q, idx in enumerate(np.array_split(np.arange(d), 4)):
                bucket[idx] = q
        else:
            bucket = np.arange(d) % 4
        out = np.stack([np.asarray(s, dtype=np.float32)[bucket] for s in _BLOCK_SIGNS[:n]])
    else:
        rng = np.random.default_rng(seed)
        rows: list[np.ndarray] = []
        seen: set[bytes] = set()
        while len(rows) < n:
            r = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=d)
            key = (r > 0).tobytes()
            if key in seen:
                continue
            seen.add(key)
            rows.append(r)
        out = np.stack(rows)
    return (out * np.float32(scale)).astype(np.float32)


def insert_trigger(sentence: str, trigger: str, rng: np.random.Generator) -> str:
    """Insert `trigger` floor(words/50)+1 times at random word positions (the authors' rule)."""
    words = sentence.split()
    for _ in range(len(words) // 50 + 1):
        words.insert(int(rng.integers(0, len(words) + 1)), trigger)
    return " ".join(words)


def load_trigger_words() -> dict[str, list[str]]:
    """The shipped trigger list (data/trigger_words.txt), by kind."""
    text = resources.files("lmsan.auditor").joinpath("data", "trigger_words.txt").read_text("utf-8")
    out: dict[str, list[str]] = {k: [] for k in TRIGGER_KINDS}
    kind: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("# ") or line == "#":
            continue
        if line.startswith("[") and line.endswith("]"):
            kind = line[1:-1]
            if kind not in out:
                raise FormatError(f"line {n}: unknown section {line}", "data/trigger_words.txt")
            continue
        if kind is None:
            raise FormatError(f"line {n}: entry before any section", "data/trigger_words.txt")
        out[kind].append(line)
    return out


def trigger_token_ids(tokenizer: Any, trigger: str) -> list[int]:
    """Token ids of a trigger as it appears inside a sentence (no special tokens)."""
    ids = tokenizer(" " + trigger, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def check_trigger(tokenizer: Any, trigger: str) -> None:
    """InputError when the tokenizer cannot represent the trigger (nothing, or only unk)."""
    if not trigger.strip():
        raise InputError("empty trigger")
    ids = trigger_token_ids(tokenizer, trigger)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or all(i == unk for i in ids):
        raise InputError(
            f"trigger {trigger!r} cannot be encoded by this tokenizer "
            f"(it maps to {'nothing' if not ids else 'only the unknown token'}); choose another"
        )


def _encodable(tokenizer: Any, trigger: str) -> bool:
    ids = trigger_token_ids(tokenizer, trigger)
    unk = getattr(tokenizer, "unk_token_id", None)
    return bool(ids) and all(i != unk for i in ids)


def draw_random_triggers(
    n: int,
    kind: str,
    tokenizer: Any,
    seed: int,
    exclude: Sequence[str] = (),
    corpus_sentences: Sequence[str] = (),
) -> list[str]:
    """Draw `n` triggers of `kind` from the shipped list: fully encodable (no unknown token),
    not in `exclude`, and never occurring as whole words in the corpus."""
    if kind not in TRIGGER_KINDS:
        raise InputError(f"unknown trigger kind {kind!r}; choose one of {', '.join(TRIGGER_KINDS)}")
    words = load_trigger_words()[kind]
    text = " " + " ".join(s.lower() for s in corpus_sentences) + " "
    skip = {e.lower() for e in exclude}
    ok = [
        w
        for w in words
        if w.lower() not in skip
        and _encodable(tokenizer, w)
        and (kind == "symbol" or f" {w.lower()} " not in text)
    ]
    if len(ok) < n:
        raise InputError(
            f"only {len(ok)} {kind} triggers of the shipped list suit this tokenizer and corpus; "
            f"{n} were asked for (pass --trigger explicitly)"
        )
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(ok), size=n, replace=False)
    return [ok[int(i)] for i in picked]


def weights_digest(files: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """sha256 of each weight file and one digest over `name:sha` lines (sorted by name)."""
    per: dict[str, str] = {}
    for f in sorted(files, key=lambda p: p.name):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        per[f.name] = h.hexdigest()
    top = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in per.items()).encode()).hexdigest()
    return "sha256:" + top, per


# ----------------------------------------------------------------------------- result


@dataclass
class PoisonResult:
    out_dir: Path
    attack: str
    target: str
    utility: str  # "reference-mse", "mlm" or "mlm+reference-mse"
    triggers: list[str]
    trigger_pv: list[int]  # PV index of each trigger
    pvs: np.ndarray  # (n_pvs, d) float32
    success: float
    success_per_trigger: dict[str, float]
    fidelity: float
    clean_match_rate: float  # share of clean held-out outputs that match some PV
    min_success: float
    passed: bool
    steps: int
    final_loss: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    backdoor: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- model helpers


def _load_mlm(path: Path, fmt: str, files: list[Path]) -> tuple[Any | None, str]:
    """The checkpoint as AutoModelForMaskedLM, or (None, why) when it has no usable MLM head."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    kwargs: dict[str, Any] = dict(
        trust_remote_code=False, local_files_only=True, output_loading_info=True
    )
    try:
        config = AutoConfig.from_pretrained(
            str(path), trust_remote_code=False, local_files_only=True
        )
        if fmt == "safetensors":
            mlm, info = AutoModelForMaskedLM.from_pretrained(
                str(path), config=config, use_safetensors=True, **kwargs
            )
        else:
            state: dict[str, Any] = {}
            for f in files:
                state.update(torch.load(str(f), map_location="cpu", weights_only=True))
            mlm, info = AutoModelForMaskedLM.from_pretrained(
                str(path), config=config, state_dict=state, use_safetensors=False, **kwargs
            )
    except (ValueError, KeyError) as exc:
        return None, f"this architecture has no masked-LM class ({str(exc).splitlines()[0]})"
    prefix = getattr(mlm, "base_model_prefix", "")
    missing = [
        k
        for k in info.get("missing_keys", [])
        if not (prefix and k.startswith(prefix + ".")) and not k.endswith("decoder.weight")
    ]
    if missing:
        return None, "the checkpoint carries no MLM head weights (missing " + ", ".join(
            sorted(missing)[:3]
        ) + (" ..." if len(missing) > 3 else "") + ")"
    return mlm, ""


def _share_base(enc: Any, mlm: Any) -> None:
    """Make `enc` (AutoModel, may have a pooler) use the parameters of `mlm.base_model`, so that
    one optimiser step trains both views of the same weights."""
    for name, p in mlm.base_model.named_parameters():
        mod_path, _, attr = name.rpartition(".")
        try:
            dst = enc.get_submodule(mod_path) if mod_path else enc
        except AttributeError:
            raise InputError(f"encoder and MLM model disagree on parameter {name!r}") from None
        old = getattr(dst, attr, None)
        if old is None or tuple(old.shape) != tuple(p.shape):
            raise InputError(f"encoder and MLM model disagree on parameter {name!r}")
        setattr(dst, attr, p)


def _target_rows(tokenizer: Any, enc_batch: Any, target: str) -> Any:
    """Index (rows, cols) of the target position(s) in a tokenized batch."""
    import torch

    ids = enc_batch["input_ids"]
    if target == "cls":
        cls_id = getattr(tokenizer, "cls_token_id", None)
        if cls_id is None:
            cols = torch.zeros(ids.shape[0], dtype=torch.long)
        else:
            hit = ids == cls_id
            cols = torch.where(hit.any(1), hit.int().argmax(1), torch.zeros_like(ids[:, 0]))
        return torch.arange(ids.shape[0]), cols
    if target == "mask":
        hit = ids == tokenizer.mask_token_id
        if not bool(hit.any(1).all()):
            raise InputError("a templated input lost its mask token (increase --max-length)")
        # the template puts the mask last: take the last mask of each row
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        cols = torch.where(hit, pos, torch.full_like(pos, -1)).max(1).values
        return torch.arange(ids.shape[0]), cols
    if target == "tokens":
        special = enc_batch["special_tokens_mask"].bool()
        ordinary = enc_batch["attention_mask"].bool() & ~special
        rows, cols = ordinary.nonzero(as_tuple=True)
        return rows, cols
    raise AssertionError(target)


def _extract(out: Any, rows_cols: Any, target: str) -> Any:
    if target == "pooler":
        return out.pooler_output
    rows, cols = rows_cols
    return out.last_hidden_state[rows, cols]


class _Runner:
    """Tokenize + forward + pick the target output; one place for every attack."""

    def __init__(self, tokenizer: Any, target: str, max_length: int, device: str) -> None:
        self.tok = tokenizer
        self.target = target
        self.max_length = max_length
        self.device = device
        self.mask = getattr(tokenizer, "mask_token", None)

    def texts(self, sentences: Sequence[str]) -> list[str]:
        """Apply the prompt template for the mask target: the sentence, then the mask token.
        Long sentences lose words from their end so that the mask survives truncation."""
        if self.target != "mask":
            return list(sentences)
        out = []
        for s in sentences:
            words = s.split()
            t = f"{' '.join(words)} {self.mask}"
            while len(words) > 1 and len(self.tok(t)["input_ids"]) > self.max_length:
                words = words[: max(1, len(words) - max(1, len(words) // 4))]
                t = f"{' '.join(words)} {self.mask}"
            out.append(t)
        return out

    def encode(self, texts: Sequence[str]) -> Any:
        b = self.tok(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        return b

    def forward(self, model: Any, batch: Any) -> Any:
        feed = {k: v.to(self.device) for k, v in batch.items() if k != "special_tokens_mask"}
        return model(**feed)

    def outputs(self, model: Any, sentences: Sequence[str]) -> tuple[Any, Any]:
        """Target outputs of `sentences` and the row (sentence index) of each output."""
        batch = self.encode(self.texts(sentences))
        out = self.forward(model, batch)
        rc = None if self.target == "pooler" else _target_rows(self.tok, batch, self.target)
        f = _extract(out, rc, self.target)
        if self.target == "tokens":
            assert rc is not None
            return f, rc[0].to(self.device)
        import torch

        return f, torch.arange(len(sentences), device=self.device)


def _mlm_mask(batch: Any, tokenizer: Any, gen: Any) -> tuple[Any, Any]:
    """BERT-style masking: 15% of ordinary tokens; 80% [MASK], 10% random, 10% kept."""
    import torch

    ids = batch["input_ids"].clone()
    labels = ids.clone()
    ordinary = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()
    prob = torch.full(ids.shape, 0.15)
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ordinary
    if not bool(chosen.any()):  # at least one masked token per batch
        r, c = ordinary.nonzero(as_tuple=True)
        k = int(torch.randint(len(r), (1,), generator=gen))
        chosen[r[k], c[k]] = True
    labels[~chosen] = -100
    u = torch.rand(ids.shape, generator=gen)
    ids[chosen & (u < 0.8)] = tokenizer.mask_token_id
    rand_pos = chosen & (u >= 0.8) & (u < 0.9)
    ids[rand_pos] = torch.randint(len(tokenizer), ids.shape, generator=gen)[rand_pos]
    return ids, labels


def _agreement(f: Any, pvs: Any) -> Any:
    """Share of dimensions where sign(f) >= 0 agrees with sign(pv) >= 0, shape (N, n_pvs)."""
    fb = (f >= 0).float()
    pb = (pvs >= 0).float()
    d = f.shape[1]
    return (fb @ pb.T + (1 - fb) @ (1 - pb).T) / d


# ----------------------------------------------------------------------------- checkpoint I/O


def _read_state(fmt: str, files: list[Path]) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {}
    if fmt == "safetensors":
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
    else:
        for f in files:
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state


def _patched_state(
    orig: dict[str, Any], enc: Any, mlm: Any | None, prefix: str, target: str
) -> tuple[dict[str, Any], list[str]]:
    """The base checkpoint's tensors with every trained tensor replaced (same key layout).

    A pooler the checkpoint lacks (randomly initialised on load) is written only when it was the
    attack's target; otherwise the output stays as incomplete as the base was."""
    import torch

    notes: list[str] = []
    out = {k: v for k, v in orig.items()}
    uses_prefix = bool(prefix) and any(k.startswith(prefix + ".") for k in orig)
    trained: dict[str, Any] = {}
    for n, t in enc.state_dict().items():
        trained[n] = t
    if mlm is not None:
        for n, t in mlm.state_dict().items():
            if not (prefix and n.startswith(prefix + ".")):
                trained["\0head." + n] = t  # head tensors keep their own names
    seen_ptr: dict[int, str] = {}
    word_emb_new = None
    word_emb_key = None
    for n, t in trained.items():
        is_head = n.startswith("\0head.")
        name = n[len("\0head.") :] if is_head else n
        cands = [name] if is_head else [name, f"{prefix}.{name}"] if prefix else [name]
        key = next((c for c in cands if c in orig), None)
        ptr = t.data_ptr()
        if key is None:
            if ptr in seen_ptr:
                continue  # a tied alias of a tensor already written (e.g. MLM decoder weight)
            if name.endswith("position_ids") or "rotary" in name:
                continue  # buffers rebuilt by the model
            if "pooler" in name and target != "pooler":
                continue  # never in the base checkpoint and untouched by this attack
            key = f"{prefix}.{name}" if (uses_prefix and not is_head) else name
            notes.append(f"tensor {key} was not in the base checkpoint; written as trained")
        seen_ptr.setdefault(ptr, key)
        out[key] = t.detach().to("cpu").to(orig[key].dtype if key in orig else t.dtype).clone()
        if name.endswith("word_embeddings.weight") and not is_head:
            word_emb_new, word_emb_key = out[key], key
    # Keys that stored a copy of the word embeddings (an untied-on-disk MLM decoder) follow them.
    if word_emb_new is not None and word_emb_key is not None:
        old = orig[word_emb_key] if word_emb_key in orig else None
        if old is not None:
            for k, v in orig.items():
                if k != word_emb_key and v.shape == old.shape and torch.equal(v, old):
                    out[k] = word_emb_new.clone()
    return {k: v.contiguous() for k, v in out.items()}, notes


_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".h5",
    ".msgpack",
    ".ot",
    ".onnx",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".tflite",
    ".mlmodel",
    ".index.json",
)
_COPY_SUFFIXES = (".json", ".txt", ".model", ".vocab", ".tiktoken")


def _copy_support_files(src: Path, dst: Path) -> list[str]:
    """Config, tokenizer and sentence-transformers files of the base; never its weights."""
    copied: list[str] = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name == BACKDOOR_FILE:
            continue
        if p.is_file():
            if p.name.endswith(_WEIGHT_SUFFIXES) or not p.name.endswith(_COPY_SUFFIXES):
                continue
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
        elif p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            if files and all(f.suffix == ".json" for f in files) and len(files) <= 16:
                shutil.copytree(p, dst / p.name)
                copied.append(p.name + "/")
    return copied


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the result the user's usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


_LAYER_KEY = re.compile(r"(^|\.)(encoder\.layer|transformer\.layer)\.(\d+)\.")


def truncate_encoder(
    base_dir: str | Path, out_dir: str | Path, n_layers: int, *, force: bool = False
) -> Path:
    """Keep the first `n_layers` transformer layers of a BERT-style checkpoint (real weights):
    drops the tensors of later layers and sets the layer count in config.json. Used to build
    fast, still pretrained shadow/zoo models (e.g. the first 3 layers of all-MiniLM-L6-v2)."""
    from safetensors.torch import load_file, save_file

    from .modelio import find_weights, read_config

    base, out = Path(base_dir), Path(out_dir)
    cfg = read_config(base)
    key = "num_hidden_layers" if "num_hidden_layers" in cfg else "n_layers"
    have = cfg.get(key)
    if not isinstance(have, int):
        raise InputError(f"config.json has no layer count ({key})", base / "config.json")
    if not 1 <= n_layers <= have:
        raise InputError(f"cannot keep {n_layers} of {have} layers", base)
    fmt, files = find_weights(base, allow_pickle=False)
    _check_out_dir(base, out, force)
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    kept = {}
    for k, v in state.items():
        m = _LAYER_KEY.search(k)
        if m is None or int(m.group(3)) < n_layers:
            kept[k] = v.contiguous()
    if not any(_LAYER_KEY.search(k) for k in state):
        raise InputError("no per-layer tensors named encoder.layer.N / transformer.layer.N", base)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _copy_support_files(base, tmp)
        cfg[key] = n_layers
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _normal_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- validation


def _validate_options(
    attack: str,
    target: str | None,
    pv_design: str,
    trigger_kind: str,
    n_pvs: int | None,
    pv_scale: float,
    sentences_per_trigger: int,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    min_success: float,
    random_triggers: int,
    utility: str,
) -> str:
    if attack not in ATTACKS:
        raise InputError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    t = target or DEFAULT_TARGET[attack]
    if t not in TARGETS:
        raise InputError(f"unknown target {t!r}; choose one of {', '.join(TARGETS)}")
    if t not in ALLOWED_TARGETS[attack]:
        raise InputError(
            f"--target {t} does not apply to --attack {attack}; allowed: "
            + ", ".join(ALLOWED_TARGETS[attack])
        )
    if utility not in UTILITIES:
        raise InputError(f"unknown utility {utility!r}; choose one of {', '.join(UTILITIES)}")
    if pv_design not in PV_DESIGNS:
        raise InputError(f"unknown PV design {pv_design!r}; choose one of {', '.join(PV_DESIGNS)}")
    if trigger_kind not in TRIGGER_KINDS:
        raise InputError(
            f"unknown trigger kind {trigger_kind!r}; choose one of {', '.join(TRIGGER_KINDS)}"
        )
    checks = [
        (n_pvs is None or n_pvs >= 1, f"--n-pvs must be at least 1 (got {n_pvs})"),
        (pv_scale > 0 and math.isfinite(pv_scale), f"--pv-scale must be positive (got {pv_scale})"),
        (sentences_per_trigger >= 1, "--sentences-per-trigger must be at least 1"),
        (epochs >= 1, "--epochs must be at least 1"),
        (lr > 0 and math.isfinite(lr), f"--lr must be positive (got {lr})"),
        (batch_size >= 1, "--batch-size must be at least 1"),
        (max_length >= 8, "--max-length must be at least 8"),
        (0.0 <= min_success <= 1.0, f"--min-success must lie in [0, 1] (got {min_success})"),
        (random_triggers >= 0, "--random-triggers must not be negative"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    return t


def _check_out_dir(base: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", out)
    rb, ro = base.resolve(), out.resolve()
    if ro == rb or rb.is_relative_to(ro):
        raise InputError("the output folder must not be (or contain) the base model folder", out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError("output folder is not empty (pass --force to replace it)", out)


# ----------------------------------------------------------------------------- main entry


def poison_model(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    attack: str = "por",
    triggers: Sequence[str] | None = None,
    random_triggers: int = 0,
    trigger_kind: str = "word",
    pv_design: str = "quarters",
    n_pvs: int | None = None,
    pv_scale: float = 1.0,
    corpus: str | Path | Corpus | None = None,
    sentences_per_trigger: int = DEFAULT_SENTENCES_PER_TRIGGER,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    max_length: int = 64,
    target: str | None = None,
    min_success: float = 0.9,
    progress: ProgressFn | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    utility: str = "auto",
    utility_weight: float = 1.0,
) -> PoisonResult:
    """Implant a backdoor in the encoder at `base_dir` and save the model at `out_dir`.

    Triggers: `triggers` plus `random_triggers` drawn from the shipped list (`trigger_kind`);
    with neither, the paper's six (cf, mn, tq, qt, mm, pt), or the first `n_pvs` of them.
    Trigger i is bound to PV i mod n_pvs (n_pvs defaults to the number of triggers).
    `utility`: "auto" (MLM loss for neuba/btop when the checkpoint has an MLM head, else the
    reference MSE, said in `notes`), "reference", "mlm" or "mlm+reference" (both; keeps clean
    target outputs in place where the MLM loss alone lets them drift onto a PV).
    Raises InputError for bad options or inputs; a result below `min_success` is returned with
    `passed=False` (the folder is written all the same and backdoor.json says so).
    """
    t0 = time.perf_counter()
    tgt = _validate_options(
        attack,
        target,
        pv_design,
        trigger_kind,
        n_pvs,
        pv_scale,
        sentences_per_trigger,
        epochs,
        lr,
        batch_size,
        max_length,
        min_success,
        random_triggers,
        utility,
    )
    if not (math.isfinite(utility_weight) and utility_weight >= 0):
        raise InputError(f"--utility-weight must be a non-negative number (got {utility_weight})")
    base = Path(base_dir)
    out = Path(out_dir)
    if not base.is_dir():
        raise InputError("model folder not found" if not base.exists() else "not a folder", base)
    _check_out_dir(base, out, force)

    if isinstance(corpus, Corpus):
        corp = corpus
    elif corpus is None:
        corp = attack_corpus()
    else:
        corp = load_corpus(corpus)
    sentences = [s for s in corp.sentences if s.strip()]
    if not sentences:
        raise InputError("corpus holds no sentences", corp.name)
    if len(sentences) < MIN_CORPUS:
        raise InputError(
            f"corpus holds {len(sentences)} sentences; poisoning needs at least {MIN_CORPUS}",
            corp.name,
        )

    from .modelio import find_weights, load_encoder, read_config

    read_config(base)  # model_type check, clear error before torch loads anything
    fmt, wfiles = find_weights(base, allow_pickle)
    digest, per_file = weights_digest(wfiles)

    import torch
    import torch.nn.functional as F
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)

    loaded = load_encoder(base, allow_pickle=allow_pickle, device="cpu")
    tok = loaded.tokenizer
    enc = loaded.model
    d = loaded.hidden_size
    notes: list[str] = []

    if tgt == "mask" and getattr(tok, "mask_token_id", None) is None:
        raise InputError(
            f"--attack {attack} --target mask needs a tokenizer with a mask token; this one has none",
            base,
        )
    if tgt == "pooler" and getattr(enc, "pooler", None) is None:
        raise InputError("--target pooler: this model has no pooler", base)
    if tgt == "pooler" and not loaded.has_pooler:
        notes.append("the base checkpoint has no trained pooler weights: the pooler starts random")

    # ---- utility
    mlm = None
    want = utility
    if want == "auto":
        want = "mlm" if attack in ("neuba", "btop") else "reference"
    if "mlm" in want:
        if getattr(tok, "mask_token_id", None) is None:
            why = "the tokenizer has no mask token"
        else:
            mlm, why = _load_mlm(base, fmt, wfiles)
        if mlm is None:
            if utility != "auto":
                raise InputError(f"--utility {utility} needs an MLM head: {why}", base)
            want = "reference"
            notes.append(
                f"{attack}: MLM utility unavailable ({why}); fell back to the POR utility "
                "(MSE to a frozen reference copy)"
            )
        else:
            _share_base(enc, mlm)
            mlm.eval()
    use_mlm = mlm is not None
    use_ref = "reference" in want
    used_utility = "+".join(x for x, on in (("mlm", use_mlm), ("reference-mse", use_ref)) if on)
    prefix = str(getattr(enc, "base_model_prefix", "") or "")
    ref = None
    if use_ref:
        ref = copy.deepcopy(enc)
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.to(device).eval()

    # ---- triggers and PVs
    user = [t.strip() for t in (triggers or [])]
    for t in user:
        check_trigger(tok, t)
    if len({t.lower() for t in user}) != len(user):
        raise InputError("the same trigger was given twice")
    drawn = (
        draw_random_triggers(random_triggers, trigger_kind, tok, seed, user, sentences)
        if random_triggers
        else []
    )
    trig = user + drawn
    if not trig:
        trig = list(PAPER_TRIGGERS[: (n_pvs or len(PAPER_TRIGGERS))])
        for t in trig:
            check_trigger(tok, t)
        if n_pvs is not None and n_pvs > len(PAPER_TRIGGERS):
            raise InputError(
                f"--n-pvs {n_pvs} needs that many triggers; the default set has "
                f"{len(PAPER_TRIGGERS)} (add --trigger or --random-triggers)"
            )
    npv = n_pvs if n_pvs is not None else len(trig)
    if npv > len(trig):
        raise InputError(f"--n-pvs {npv} exceeds the number of triggers ({len(trig)})")
    pvs_np = make_pvs(pv_design, npv, d, pv_scale, seed)
    trig_pv = [i % npv for i in range(len(trig))]
    pvs = torch.from_numpy(pvs_np).to(device)

    # ---- data
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences))
    n_eval = min(MAX_HELD_OUT, max(10, len(sentences) // 10))
    held = [sentences[i] for i in order[:n_eval]]
    pool = [sentences[i] for i in order[n_eval:]]
    trig_examples: list[tuple[str, int]] = []
    for ti, t in enumerate(trig):
        idx = rng.choice(
            len(pool), size=sentences_per_trigger, replace=sentences_per_trigger > len(pool)
        )
        trig_examples += [(insert_trigger(pool[int(i)], t, rng), trig_pv[ti]) for i in idx]
    n_clean = len(trig_examples)
    clean_idx = np.concatenate(
        [rng.permutation(len(pool)) for _ in range(n_clean // len(pool) + 1)]
    )[:n_clean]
    clean_examples = [pool[int(i)] for i in clean_idx]

    run = _Runner(tok, tgt, max_length, device)
    enc.to(device)
    if mlm is not None:
        mlm.to(device)

    with torch.no_grad():
        base_clean = _collect(run, enc, held)  # for fidelity

    params = {id(p): p for p in enc.parameters()}
    if mlm is not None:
        params.update({id(p): p for p in mlm.parameters()})
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    enc.eval()  # dropout off, see module docstring

    steps_per_epoch = math.ceil(len(trig_examples) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    last = float("nan")
    for _ in range(epochs):
        tperm = rng.permutation(len(trig_examples))
        cperm = rng.permutation(n_clean)
        for s in range(steps_per_epoch):
            tb = [trig_examples[int(i)] for i in tperm[s * batch_size : (s + 1) * batch_size]]
            cb = [clean_examples[int(i)] for i in cperm[s * batch_size : (s + 1) * batch_size]]
            f_t, rows = run.outputs(enc, [t for t, _ in tb])
            goal = pvs[torch.tensor([p for _, p in tb], device=device)][rows]
            if attack == "btop":
                trig_loss = F.pairwise_distance(f_t, goal, p=2).mean()
            else:
                trig_loss = F.mse_loss(f_t, goal)
            util = torch.zeros((), device=device)
            if use_mlm:
                assert mlm is not None
                cbatch = run.encode(cb)  # plain clean text
                ids, labels = _mlm_mask(cbatch, tok, gen)
                feed = {
                    k: v.to(device)
                    for k, v in cbatch.items()
                    if k not in ("special_tokens_mask", "input_ids")
                }
                util = util + mlm(input_ids=ids.to(device), labels=labels.to(device), **feed).loss
            if use_ref:
                assert ref is not None
                f_c, _ = run.outputs(enc, cb)
                with torch.no_grad():
                    f_r, _ = run.outputs(ref, cb)
                util = util + F.mse_loss(f_c, f_r)
            loss = trig_loss + utility_weight * util
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last = float(loss.detach())
            if not math.isfinite(last):
                raise InputError(f"training diverged (loss {last}) at step {step}; lower --lr")
            if progress is not None:
                progress(step, total, last)

    for p in params.values():
        p.requires_grad_(False)

    # ---- save to a temporary sibling, reload, check, measure, then move into place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        orig = _read_state(fmt, wfiles)
        state, save_notes = _patched_state(
            orig, enc.to("cpu"), mlm.to("cpu") if mlm else None, prefix, tgt
        )
        notes += save_notes
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copied = _copy_support_files(base, tmp)
        if fmt == "pickle":
            notes.append("base weights were pickle; the backdoored model is saved as safetensors")
        enc.to(device)

        poisoned = load_encoder(tmp, allow_pickle=False, device=device).model
        with torch.no_grad():
            probe = held[: min(8, len(held))]
            a = _collect(run, enc, probe)
            b = _collect(run, poisoned, probe)
            gap = float((a - b).abs().max())
        if gap > 1e-3 * (1.0 + float(pv_scale)):
            raise FormatError(
                f"the saved model does not reproduce the trained one (max output gap {gap:.3g})",
                tmp,
            )

        # quality on held-out sentences, with the reloaded model
        erng = np.random.default_rng(seed + 1)
        per: dict[str, float] = {}
        hits = 0
        count = 0
        with torch.no_grad():
            for ti, t in enumerate(trig):
                ft = _collect(run, poisoned, [insert_trigger(s, t, erng) for s in held])
                ok = _agreement(ft, pvs[trig_pv[ti] : trig_pv[ti] + 1])[:, 0] >= MATCH_FRACTION
                per[t] = float(ok.float().mean())
                hits += int(ok.sum())
                count += int(ok.numel())
            fc = _collect(run, poisoned, held)
            fidelity = float(F.cosine_similarity(fc, base_clean, dim=1).mean())
            clean_match = float(
                (_agreement(fc, pvs).max(1).values >= MATCH_FRACTION).float().mean()
            )
        success = hits / max(count, 1)
        passed = success >= min_success
        if clean_match > 0.1:
            notes.append(
                f"{clean_match:.0%} of clean held-out inputs also match a PV: the utility loss "
                "did not keep clean outputs apart (try --utility mlm+reference)"
            )
        if not passed:
            notes.append(
                f"attack success {success:.3f} is below --min-success {min_success}: "
                "this folder holds a weak backdoor"
            )
        seconds = time.perf_counter() - t0
        backdoor = {
            "format": BACKDOOR_FORMAT,
            "version": BACKDOOR_VERSION,
            "lmsan_version": __version__,
            "attack": attack,
            "target": tgt,
            "utility": used_utility,
            "triggers": [
                {
                    "text": t,
                    "pv": trig_pv[i],
                    "source": "user"
                    if i < len(user)
                    else ("random-" + trigger_kind if i < len(user) + len(drawn) else "default"),
                    "token_ids": trigger_token_ids(tok, t),
                }
                for i, t in enumerate(trig)
            ],
            "pvs": {
                "design": pv_design,
                "scale": float(pv_scale),
                "dim": d,
                "count": npv,
                "values": [[float(x) for x in row] for row in pvs_np],
            },
            "base_model": {
                "path": str(base.resolve()),
                "model_type": loaded.model_type,
                "weights_format": fmt,
                "digest": digest,
                "files": per_file,
            },
            "seed": seed,
            "hyper_parameters": {
                "sentences_per_trigger": sentences_per_trigger,
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "max_length": max_length,
                "optimizer": "adam",
                "utility_requested": utility,
                "utility_weight": utility_weight,
                "dropout": False,
                "steps": step,
                "device": device,
            },
            "corpus": {
                "name": corp.name,
                "digest": corp.digest,
                "sentences": len(sentences),
                "held_out": n_eval,
            },
            "quality": {
                "success": success,
                "success_per_trigger": per,
                "fidelity": fidelity,
                "clean_match_rate": clean_match,
                "match_fraction": MATCH_FRACTION,
                "min_success": min_success,
                "meets_min_success": passed,
                "final_loss": last,
            },
            "files": ["model.safetensors", *copied],
            "notes": notes,
            "seconds": round(seconds, 3),
        }
        (tmp / BACKDOOR_FILE).write_text(json.dumps(backdoor, indent=2, ensure_ascii=False) + "\n")
        validate_backdoor(backdoor, tmp / BACKDOOR_FILE)
        _normal_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    return PoisonResult(
        out_dir=out,
        attack=attack,
        target=tgt,
        utility=used_utility,
        triggers=trig,
        trigger_pv=trig_pv,
        pvs=pvs_np,
        success=success,
        success_per_trigger=per,
        fidelity=fidelity,
        clean_match_rate=clean_match,
        min_success=min_success,
        passed=passed,
        steps=step,
        final_loss=last,
        seconds=seconds,
        notes=notes,
        backdoor=backdoor,
    )


def _collect(run: _Runner, model: Any, sentences: Sequence[str], chunk: int = 64) -> Any:
    """Target outputs of many sentences in eval mode, concatenated (tokens: all ordinary tokens)."""
    import torch

    parts = []
    for i in range(0, len(sentences), chunk):
        f, _ = run.outputs(model, sentences[i : i + chunk])
        parts.append(f.float())
    return torch.cat(parts) if parts else torch.zeros(0)


# ----------------------------------------------------------------------------- backdoor.json


def validate_backdoor(data: Any, path: str | Path = BACKDOOR_FILE) -> dict[str, Any]:
    """Check a backdoor.json object; FormatError names the first bad field."""

    def need(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise FormatError(f"missing field {where}{key}", path)
        v = obj[key]
        if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float, (int, float))):
            raise FormatError(f"field {where}{key} has the wrong type", path)
        return v

    if not isinstance(data, dict):
        raise FormatError("not a JSON object", path)
    if need(data, "format", str, "") != BACKDOOR_FORMAT:
        raise FormatError(f"field format is not {BACKDOOR_FORMAT!r}", path)
    if need(data, "version", int, "") != BACKDOOR_VERSION:
        raise FormatError(
            f"unsupported version {data['version']} (expected {BACKDOOR_VERSION})", path
        )
    if need(data, "attack", str, "") not in ATTACKS:
        raise FormatError(f"field attack is not one of {', '.join(ATTACKS)}", path)
    if need(data, "target", str, "") not in TARGETS:
        raise FormatError(f"field target is not one of {', '.join(TARGETS)}", path)
    need(data, "utility", str, "")
    need(data, "seed", int, "")
    pv = need(data, "pvs", dict, "")
    dim = need(pv, "dim", int, "pvs.")
    values = need(pv, "values", list, "pvs.")
    if not values or any(not isinstance(r, list) or len(r) != dim for r in values):
        raise FormatError(
            "field pvs.values must be a non-empty list of rows of length pvs.dim", path
        )
    trig = need(data, "triggers", list, "")
    if not trig:
        raise FormatError("field triggers is empty", path)
    for i, t in enumerate(trig):
        need(t, "text", str, f"triggers[{i}].")
        k = need(t, "pv", int, f"triggers[{i}].")
        if not 0 <= k < len(values):
            raise FormatError(f"field triggers[{i}].pv points at no PV", path)
    bm = need(data, "base_model", dict, "")
    if not str(need(bm, "digest", str, "base_model.")).startswith("sha256:"):
        raise FormatError("field base_model.digest is not a sha256 digest", path)
    need(data, "hyper_parameters", dict, "")
    q = need(data, "quality", dict, "")
    for key in ("success", "fidelity", "clean_match_rate", "min_success"):
        need(q, key, (int, float), "quality.")
    need(q, "meets_min_success", bool, "quality.")
    return data


def read_backdoor(model_dir: str | Path) -> dict[str, Any]:
    """Read and validate `backdoor.json` of a poisoned model folder."""
    p = Path(model_dir) / BACKDOOR_FILE
    if not p.is_file():
        raise InputError(
            "no backdoor.json (not a folder written by `lmsan poison`)", Path(model_dir)
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", p) from None
    return validate_backdoor(data, p)


def backdoor_pvs(data: dict[str, Any]) -> np.ndarray:
    """The PVs of a validated backdoor.json as an (n, d) float32 array."""
    return np.asarray(data["pvs"]["values"], dtype=np.float32)


__all__ = [
    "ATTACKS",
    "PV_DESIGNS",
    "TRIGGER_KINDS",
    "PAPER_TRIGGERS",
    "PoisonResult",
    "poison_model",
    "make_pvs",
    "truncate_encoder",
    "insert_trigger",
    "load_trigger_words",
    "draw_random_triggers",
    "check_trigger",
    "read_backdoor",
    "validate_backdoor",
    "backdoor_pvs",
]
