"""Prompt-tuned downstream models on a frozen (possibly backdoored) backbone, and their defence.

Issue 5 / paper sections V-A and V-B (Tables II, III). Two prompt methods, both with ``peft``'s
prompt modules and a linear classification head on the target position:

- ``ptuning``: P-tuning. ``l`` trainable prompt embeddings are inserted into the input embedding
  sequence. The prompt comes from ``peft``'s ``PromptEncoder`` (``PromptEncoderConfig``, MLP
  reparametrisation; ``reparam="mlp"``) or ``PromptEmbedding`` (plain embeddings, the prompt
  tuning of Lester et al.; ``reparam="none"``).
- ``ptuning-v2``: P-tuning v2. ``peft``'s ``PrefixEncoder`` (``PrefixTuningConfig``) makes ``l``
  key/value pairs for *every* layer, prepended to each self-attention's keys and values.

Choices written down here (the deployed model must be exactly what the monitor reads):

- **Prompt position.** ``peft``'s own ``PeftModel`` prepends P-tuning prompts *before* ``[CLS]``.
  The bundle runtime (``bundle_runtime``, ``lmsan export --prompt``) inserts the prompt right
  *after* the first special token, as the PV miner does. The task model here inserts it after
  ``[CLS]`` too, so that the exported bundle computes exactly the backbone output that the
  classifier reads. A prompt trained by ``PeftModel`` (before ``[CLS]``) would need a bundle that
  inserts it there; :func:`extract_prompt` says so (``position_matches_bundle=False``).
- **Token types** are all 0 (a pair is encoded ``[CLS] a [SEP] b [SEP]`` with one segment), as in
  the exported graph and the audit.
- **Prefix positions.** The P-tuning v2 prefix has no position: prefix keys/values are
  concatenated in front of the keys/values of each layer, and the attention mask is extended with
  ones for them; the position ids of the text are not shifted.
- The backbone runs in eval mode (no dropout) and is frozen; only the prompt/prefix module and
  the head are trained (Adam).
- Target position: ``[CLS]`` (position 0) for sentence and pair tasks; the first sub-token of
  every whitespace word for token classification (CoNLL04), so a word tag is read where the
  monitor's ``tokens`` target also reads. ``TrainConfig.target="mask"`` (sentence and pair
  tasks) instead reads the ``[MASK]`` of the monitor's template: the last text becomes
  ``f"{text} [MASK]"`` (``bundle_runtime.MASK_TEMPLATE``), the prompt-based classification that
  BToP attacks; its bundle's ``mask`` target then reads exactly the vector the head reads.

Saved task folder (:func:`save_task_model`) = a ``peft`` adapter folder plus the head::

    adapter_config.json        peft's config (PromptEncoderConfig / PromptTuningConfig /
                               PrefixTuningConfig), written by peft
    adapter_model.safetensors  {"prompt_embeddings": [l, emb]} (P-tuning: the prompt *after*
                               the MLP, as peft saves it) or [l, layers*2*d] (P-tuning v2, peft's
                               past_key_values layout); the trainable weights in "trainable.*"
    head.safetensors           {"weight": [classes, d], "bias": [classes]}
    lmsan_task.json            format "lmsan.task" v1: task, labels, method, backbone digest,
                               prompt position, training figures

Evaluation (:func:`evaluate_attack`, :func:`evaluate_defence`), as METHOD.md "Metrics":
ACC, ASR (a correctly classified test input counts as a success if ANY trigger, inserted once
at a random word position of its longer sentence, makes the prediction wrong), weighted ASR
(mean of the per-class ASRs), F1 and F1 drop for token tasks. With the defence, every input goes
through the bundle: one forward pass gives the monitor decision AND the classifier input (the
head is applied to the bundle's own backbone output); flagged inputs are purged with the
sliding window and the purged text is classified; an input that cannot be purged is rejected
(counted as a wrong answer on clean data and as a failed attack on triggered data; the number is
reported).

torch, transformers and peft are imported inside functions only.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .bundle_runtime import MASK_TEMPLATE
from .errors import FormatError, InputError

TASK_FORMAT = "lmsan.task"
TASK_VERSION = 1
TASK_FILE = "lmsan_task.json"
HEAD_FILE = "head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METHODS = ("ptuning", "ptuning-v2")
REPARAMS = ("mlp", "none")
TARGETS = ("cls", "mask")  # sequence tasks: the position the head reads
TASKS = ("wordnet-topic", "rte", "conll04")
TOPIC_CLASSES = ("verb.change", "verb.communication", "verb.motion", "verb.contact")
PROMPT_POSITION = "after_first_special"  # what the bundle runtime does

ProgressFn = Callable[[int, int, float], None]  # (step, total steps, loss)


# ----------------------------------------------------------------------------- data


@dataclass
class Example:
    """One task input: a sentence or a pair; ``label`` (sequence tasks) or ``tags`` (one per
    whitespace word of ``texts[0]``; token tasks)."""

    texts: tuple[str, ...]
    label: int = -1
    tags: list[int] | None = None


@dataclass
class TaskData:
    name: str
    kind: str  # "sequence" | "tokens"
    labels: list[str]
    train: list[Example]
    test: list[Example]
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("sequence", "tokens"):
            raise InputError(f"task kind must be 'sequence' or 'tokens', got {self.kind!r}")
        if len(self.labels) < 2:
            raise InputError(f"task {self.name!r} needs at least two labels")
        for part, rows in (("train", self.train), ("test", self.test)):
            if not rows:
                raise InputError(f"task {self.name!r}: the {part} split is empty")
            for i, ex in enumerate(rows):
                if not ex.texts or not all(t.strip() for t in ex.texts):
                    raise InputError(f"task {self.name!r}: {part}[{i}] has an empty text")
                if self.kind == "sequence" and not 0 <= ex.label < len(self.labels):
                    raise InputError(
                        f"task {self.name!r}: {part}[{i}] label {ex.label} out of range"
                    )
                if self.kind == "tokens":
                    if ex.tags is None or len(ex.tags) != len(ex.texts[0].split()):
                        raise InputError(
                            f"task {self.name!r}: {part}[{i}] needs one tag per whitespace word"
                        )


def _split(
    rows: list[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(round(len(rows) * test_fraction)))
    return [rows[i] for i in idx[n_test:]], [rows[i] for i in idx[:n_test]]


def load_wordnet_topic(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """The four-class topic task: WordNet example sentences of the lexicographer files
    verb.change / verb.communication / verb.motion / verb.contact (``examples.tsv``: a header
    ``lexname lemma sentence``). A seeded random split; sentences are deduplicated."""
    p = Path(path)
    if not p.is_file():
        raise InputError("WordNet examples file not found", p)
    rows: list[Example] = []
    seen: set[str] = set()
    with open(p, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:1] != ["lexname"] or "sentence" not in header:
            raise FormatError("expected a TSV header 'lexname<TAB>lemma<TAB>sentence'", p)
        si = header.index("sentence")
        for n, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(header):
                raise FormatError(f"line {n}: expected {len(header)} tab-separated fields", p)
            if parts[0] in TOPIC_CLASSES and parts[si].strip() and parts[si] not in seen:
                seen.add(parts[si])
                rows.append(Example((parts[si].strip(),), TOPIC_CLASSES.index(parts[0])))
    if not rows:
        raise InputError(f"no sentence of the classes {', '.join(TOPIC_CLASSES)}", p)
    train, test = _split(rows, test_fraction, seed)
    return TaskData("wordnet-topic", "sequence", list(TOPIC_CLASSES), train, test, str(p))


def _read_rte(p: Path) -> list[Example]:
    if not p.is_file():
        raise InputError("RTE file not found", p)
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                prem, hyp, lab = r["premise"], r["hypothesis"], r["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise FormatError(
                    f"line {n}: expected premise/hypothesis/label ({exc})", p
                ) from None
            if lab not in (0, 1) or not isinstance(prem, str) or not isinstance(hyp, str):
                raise FormatError(f"line {n}: label must be 0 or 1 and texts strings", p)
            out.append(Example((prem.strip(), hyp.strip()), int(lab)))
    return out


def load_rte(folder: str | Path) -> TaskData:
    """RTE (SuperGLUE jsonl): ``train.jsonl`` and ``validation.jsonl`` (the test split here)."""
    d = Path(folder)
    return TaskData(
        "rte",
        "sequence",
        ["entailment", "not_entailment"],
        _read_rte(d / "train.jsonl"),
        _read_rte(d / "validation.jsonl"),
        str(d),
    )


def _read_conll(p: Path, tagset: dict[str, int]) -> list[Example]:
    if not p.is_file():
        raise InputError("CoNLL file not found", p)
    out: list[Example] = []
    words: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if words:
            out.append(
                Example((" ".join(words),), tags=[tagset.setdefault(t, len(tagset)) for t in tags])
            )
        words.clear()
        tags.clear()

    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("-DOCSTART-"):
                flush()
                continue
            parts = s.split()
            if len(parts) < 2:
                raise FormatError(f"line {n}: expected 'token TAG'", p)
            words.append(parts[0])
            tags.append(parts[-1])
    flush()
    return out


def load_conll04(folder: str | Path) -> TaskData:
    """CoNLL04 entities: ``train.txt`` (+ ``dev.txt``, also trained on) and ``test.bio``,
    one ``token TAG`` a line. Tags are numbered O first, then in order of appearance."""
    d = Path(folder)
    tagset: dict[str, int] = {"O": 0}
    train = _read_conll(d / "train.txt", tagset)
    if (d / "dev.txt").is_file():
        train += _read_conll(d / "dev.txt", tagset)
    test = _read_conll(d / "test.bio", tagset)
    labels = [t for t, _ in sorted(tagset.items(), key=lambda kv: kv[1])]
    return TaskData("conll04", "tokens", labels, train, test, str(d))


def load_task(name: str, data_dir: str | Path, seed: int = 0) -> TaskData:
    """Load a task by name from a data folder holding ``wordnet/examples.tsv``, ``rte/``,
    ``conll04/`` (the layout of the project's offline data)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise InputError("data folder not found", d)
    if name == "wordnet-topic":
        return load_wordnet_topic(d / "wordnet" / "examples.tsv", seed=seed)
    if name == "rte":
        return load_rte(d / "rte")
    if name == "conll04":
        return load_conll04(d / "conll04")
    raise InputError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def subsample(rows: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """At most ``n`` rows, a seeded random subset in the original order."""
    if n is None or n >= len(rows):
        return list(rows)
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


# ----------------------------------------------------------------------------- trigger insertion


def longer_index(texts: Sequence[str]) -> int:
    """Index of the sentence a trigger goes into: the longer one (in words) of a pair."""
    lens = [len(t.split()) for t in texts]
    return int(np.argmax(lens))


def insert_once(
    texts: Sequence[str], trigger: str, rng: random.Random, tags: list[int] | None = None
) -> tuple[tuple[str, ...], list[int] | None]:
    """Insert ``trigger`` once at a random word position of the longer sentence. For token
    tasks also returns the tags with an ``O`` (0) for the trigger word."""
    i = longer_index(texts)
    words = texts[i].split()
    pos = rng.randint(0, len(words))
    words.insert(pos, trigger)
    out = list(texts)
    out[i] = " ".join(words)
    new_tags = None if tags is None else [*tags[:pos], 0, *tags[pos:]]
    return tuple(out), new_tags


# ----------------------------------------------------------------------------- encoding


@dataclass
class Batch:
    """Token ids (right-padded), attention mask and, for token tasks, the position of the first
    sub-token of every whitespace word (in the token sequence, before the prompt) per row."""

    ids: np.ndarray  # int64 [B, S]
    mask: np.ndarray  # int64 [B, S]
    word_starts: list[list[int]]
    # sequence tasks: the position the head reads per row (0 = [CLS]; the [MASK] for target mask)
    target_pos: list[int] = field(default_factory=list)


def word_first_tokens(
    text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int]
) -> list[int]:
    """Index of the first token of every whitespace word of ``text`` (-1 when a word got no
    token), from the tokenizer's character offsets."""
    spans = []
    pos = 0
    for w in text.split():
        s = text.index(w, pos)
        spans.append((s, s + len(w)))
        pos = s + len(w)
    out = [-1] * len(spans)
    wi = 0
    for ti, ((a, b), sp) in enumerate(zip(offsets, special, strict=True)):
        if sp or b <= a:
            continue
        while wi < len(spans) and a >= spans[wi][1]:
            wi += 1
        if wi < len(spans) and spans[wi][0] <= a < spans[wi][1] and out[wi] < 0:
            out[wi] = ti
    return out


_PLAIN: dict[int, tuple[Any, Any]] = {}


def _plain_backend(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's backend with padding and truncation off (a saved
    tokenizer.json may carry them, and the bundle runtime turns them off too)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    hit = _PLAIN.get(id(backend))
    if hit is not None and hit[0] is backend:
        return hit[1]
    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    _PLAIN[id(backend)] = (backend, plain)
    return plain


def mask_token_of(tokenizer: Any) -> tuple[str, int]:
    """The tokenizer's mask token and its id (InputError when it has none)."""
    tokenizer_mask = getattr(tokenizer, "mask_token", None)
    mid = getattr(tokenizer, "mask_token_id", None)
    if not isinstance(tokenizer_mask, str) or not isinstance(mid, int):
        raise InputError("target 'mask' needs a tokenizer with a mask token")
    return tokenizer_mask, mid


def apply_mask_template(records: Sequence[Sequence[str]], mask_token: str) -> list[tuple[str, ...]]:
    """The monitor's ``mask`` form of each record: the template on the last text."""
    return [
        (*r[:-1], MASK_TEMPLATE.format(sentence=r[-1], mask_token=mask_token)) for r in records
    ]


def encode_records(
    tokenizer: Any,
    records: Sequence[Sequence[str]],
    pad_id: int,
    mask_token: tuple[str, int] | None = None,
) -> Batch:
    """Encode texts or pairs like the bundle runtime does (special tokens, no truncation, one
    segment), right-padded. ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast
    tokenizer (its ``backend_tokenizer`` is used). ``mask_token`` (token, id): apply the mask
    template to each record and read the head at its last mask token (target ``mask``)."""
    backend = _plain_backend(tokenizer)
    if mask_token is not None:
        records = apply_mask_template(records, mask_token[0])
    inputs: list[Any] = [r[0] if len(r) == 1 else (r[0], r[1]) for r in records]
    encs = backend.encode_batch(inputs, add_special_tokens=True)
    L = max(len(e.ids) for e in encs)
    ids = np.full((len(encs), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(encs), L), dtype=np.int64)
    starts: list[list[int]] = []
    pos: list[int] = []
    for b, (e, r) in enumerate(zip(encs, records, strict=True)):
        ids[b, : len(e.ids)] = e.ids
        mask[b, : len(e.ids)] = 1
        if len(r) == 1 and mask_token is None:
            starts.append(word_first_tokens(r[0], e.offsets, e.special_tokens_mask))
        else:
            starts.append([])
        if mask_token is None:
            pos.append(0)
        else:
            hits = [i for i, t in enumerate(e.ids) if t == mask_token[1]]
            if not hits:
                raise InputError(f"record {b}: the mask template lost its mask token")
            pos.append(hits[-1])
    return Batch(ids, mask, starts, pos)


# ----------------------------------------------------------------------------- the task model


def _prefix_attention_class() -> Any:
    import torch

    class PrefixSelfAttention(torch.nn.Module):
        """A BERT-style self-attention with prefix keys/values in front of its own (P-tuning v2).

        Wraps the original module (same weights); the prefix for this layer is read from
        ``state.kv[layer]`` ([2, l, d]: keys, values) at every call, so training can feed the
        prefix encoder's output and the export can bake a constant."""

        def __init__(self, inner: Any, layer: int, state: Any) -> None:
            super().__init__()
            self.inner = inner
            self.layer = layer
            self.state = state  # a plain object, not a module

        def forward(
            self, hidden_states: Any, attention_mask: Any = None, *args: Any, **kw: Any
        ) -> Any:
            inner = self.inner
            B, S, _ = hidden_states.shape
            h, hd = inner.num_attention_heads, inner.attention_head_size

            def heads(x: Any) -> Any:
                return x.view(x.shape[0], -1, h, hd).transpose(1, 2)

            q = heads(inner.query(hidden_states))
            k = heads(inner.key(hidden_states))
            v = heads(inner.value(hidden_states))
            kv = self.state.kv
            lp = 0
            if kv is not None:
                pk = kv[self.layer, 0]  # [l, d]
                pv = kv[self.layer, 1]
                lp = pk.shape[0]
                k = torch.cat([heads(pk.unsqueeze(0)).expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([heads(pv.unsqueeze(0)).expand(B, -1, -1, -1), v], dim=2)
            scores = torch.matmul(q, k.transpose(-1, -2)) * inner.scaling
            if attention_mask is not None:
                m = attention_mask
                if m.dtype == torch.bool:
                    m = torch.zeros_like(m, dtype=scores.dtype).masked_fill(
                        ~m, torch.finfo(scores.dtype).min
                    )
                if lp:
                    m = torch.nn.functional.pad(m, (lp, 0), value=0.0)
                scores = scores + m
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, h * hd)
            return out, None

    return PrefixSelfAttention


class _PrefixState:
    kv: Any = None


def _build_task_model(
    backbone: Any,
    method: str,
    n_labels: int,
    kind: str,
    peft_config: Any,
    init_rows: Any | None,
) -> Any:
    """The torch module: frozen backbone + peft prompt/prefix module + linear head."""
    import torch

    class TaskModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
            self.method = method
            self.kind = kind
            self.peft_config = peft_config
            cfg = backbone.config
            self.d = int(cfg.hidden_size)
            self.n_tokens = int(peft_config.num_virtual_tokens)
            self.prefix_state = _PrefixState()
            self.fixed: Any = None  # a constant prompt / prefix (loaded or baked)
            from peft import PeftType

            self.prompt_module: Any
            if method == "ptuning":
                if peft_config.peft_type == PeftType.P_TUNING:
                    from peft.tuners.p_tuning import PromptEncoder

                    self.prompt_module = PromptEncoder(peft_config)
                else:
                    from peft.tuners.prompt_tuning import PromptEmbedding

                    self.prompt_module = PromptEmbedding(
                        peft_config, backbone.get_input_embeddings()
                    )
                if init_rows is not None:
                    with torch.no_grad():
                        self.prompt_module.embedding.weight.copy_(init_rows)
            else:
                from peft.tuners.prefix_tuning import PrefixEncoder

                self.prompt_module = PrefixEncoder(peft_config)
                cls = _prefix_attention_class()
                for i, layer in enumerate(backbone.encoder.layer):
                    inner = layer.attention.self
                    if isinstance(inner, cls):
                        raise InputError("the backbone already carries prefix attention")
                    layer.attention.self = cls(inner, i, self.prefix_state)
            self.head = torch.nn.Linear(self.d, n_labels)

        # -- the prompt as used at run time
        def prompt_output(self) -> Any:
            """P-tuning: [l, emb]; P-tuning v2: [l, layers*2*d] (peft's save layout)."""
            if self.fixed is not None:
                return self.fixed
            idx = torch.arange(self.n_tokens, device=self.head.weight.device)
            if self.method == "ptuning":
                return self.prompt_module(idx)
            return self.prompt_module(idx.unsqueeze(0))[0]

        def set_prefix(self) -> None:
            if self.method == "ptuning-v2":
                n_layers = len(self.backbone.encoder.layer)
                self.prefix_state.kv = (
                    self.prompt_output()
                    .view(self.n_tokens, n_layers, 2, self.d)
                    .permute(1, 2, 0, 3)
                )  # [layers, 2, l, d]

        def hidden(self, ids: Any, mask: Any) -> Any:
            """The backbone's last hidden state as deployed (prompt inserted after [CLS])."""
            emb = self.backbone.get_input_embeddings()(ids)
            if self.method == "ptuning":
                p = self.prompt_output().to(emb.dtype)
                B = emb.shape[0]
                emb = torch.cat([emb[:, :1], p.unsqueeze(0).expand(B, -1, -1), emb[:, 1:]], dim=1)
                ones = torch.ones(B, p.shape[0], dtype=mask.dtype, device=mask.device)
                mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
            else:
                self.set_prefix()
            kw: dict[str, Any] = {"inputs_embeds": emb, "attention_mask": mask}
            if int(getattr(self.backbone.config, "type_vocab_size", 0) or 0) > 0:
                kw["token_type_ids"] = torch.zeros_like(mask)
            return self.backbone(**kw, return_dict=True).last_hidden_state

        def prompt_len_in_sequence(self) -> int:
            return self.n_tokens if self.method == "ptuning" else 0

        def forward(self, ids: Any, mask: Any, pos: Any = None) -> Any:
            """``pos``: per row, the position the head reads (sequence tasks; in the token
            sequence before the prompt; None = [CLS])."""
            hs = self.hidden(ids, mask)
            if self.kind == "sequence":
                if pos is None:
                    return self.head(hs[:, 0])
                pos = pos.to(hs.device)
                shift = self.prompt_len_in_sequence()
                pos = torch.where(pos >= 1, pos + shift, pos)
                return self.head(hs[torch.arange(hs.shape[0], device=hs.device), pos])
            return self.head(hs)  # [B, S', classes]; token positions shifted by the prompt

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            self.backbone.eval()  # no dropout in the frozen backbone, ever
            return self

    return TaskModel()


@dataclass
class TrainConfig:
    method: str = "ptuning"
    reparam: str = "mlp"  # P-tuning only: "mlp" (PromptEncoder) or "none" (PromptEmbedding)
    prompt_length: int = 16
    prefix_projection: bool = False  # P-tuning v2: reparametrise the prefix with an MLP
    epochs: int = 3
    lr: float = 5e-3
    head_lr: float = 5e-3
    batch_size: int = 16
    max_length: int = 128  # training only: longer inputs are truncated
    seed: int = 0
    train_limit: int | None = None
    encoder_hidden_size: int = 128
    prefix_init_std: float | None = (
        None  # P-tuning v2: N(0, std) prefix init (None: peft's N(0, 1))
    )
    target: str = "cls"  # sequence tasks: "cls" or "mask" (the [MASK] of the monitor's template)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.reparam not in REPARAMS:
            raise InputError(f"unknown reparametrisation {self.reparam!r}; choose mlp or none")
        for name in ("prompt_length", "epochs", "batch_size", "encoder_hidden_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1")
        if self.max_length < 8:
            raise InputError("max_length must be at least 8")
        if self.prefix_init_std is not None and not self.prefix_init_std > 0:
            raise InputError("prefix_init_std must be positive")
        if not (self.lr > 0 and self.head_lr > 0):
            raise InputError("learning rates must be positive")
        if self.target not in TARGETS:
            raise InputError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")


@dataclass
class TaskModelHandle:
    """A trained (or loaded) task model with everything needed to run and save it."""

    module: Any  # the torch TaskModel
    tokenizer: Any
    task: str
    kind: str
    labels: list[str]
    method: str
    backbone_dir: Path
    backbone_digest: str
    pad_id: int
    info: dict[str, Any] = field(default_factory=dict)
    target: str = "cls"

    @property
    def mask_token(self) -> tuple[str, int] | None:
        """(token, id) for target mask; None for target cls."""
        return mask_token_of(self.tokenizer) if self.target == "mask" else None

    @property
    def prompt_length(self) -> int:
        return int(self.module.n_tokens)


def _peft_config(cfg: TrainConfig, backbone: Any) -> Any:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    bc = backbone.config
    emb = int(backbone.get_input_embeddings().weight.shape[1])
    common: dict[str, Any] = {
        "num_virtual_tokens": cfg.prompt_length,
        "token_dim": emb,
        "num_transformer_submodules": 1,
        "num_attention_heads": int(bc.num_attention_heads),
        "num_layers": int(bc.num_hidden_layers),
    }
    if cfg.method == "ptuning":
        if cfg.reparam == "mlp":
            return PromptEncoderConfig(
                **common,
                encoder_reparameterization_type="MLP",
                encoder_hidden_size=cfg.encoder_hidden_size,
            )
        return PromptTuningConfig(**common, prompt_tuning_init="RANDOM")
    if emb != int(bc.hidden_size):
        raise InputError("P-tuning v2 needs embedding width == hidden size (factorised embeddings)")
    return PrefixTuningConfig(
        **common,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def _load_backbone(backbone_dir: str | Path) -> tuple[Any, Any, str, int]:
    from transformers.utils import logging as hf_logging

    from .manifest import model_manifest
    from .modelio import load_encoder

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    loaded = load_encoder(backbone_dir, allow_pickle=False, device="cpu")
    model = loaded.model
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "layer"):
        raise InputError(
            f"prompt tuning supports BERT-style encoders (encoder.layer[i].attention.self); "
            f"got {loaded.model_type}",
            backbone_dir,
        )
    pad = getattr(loaded.tokenizer, "pad_token_id", None)
    if not isinstance(pad, int):
        raise InputError("the tokenizer has no pad token", backbone_dir)
    if getattr(loaded.tokenizer, "backend_tokenizer", None) is None:
        raise InputError("the tokenizer has no fast (tokenizers) version", backbone_dir)
    return model, loaded.tokenizer, "sha256:" + model_manifest(backbone_dir).digest, int(pad)


def _batches(n: int, size: int, rng: random.Random | None) -> list[list[int]]:
    idx = list(range(n))
    if rng is not None:
        rng.shuffle(idx)
    return [idx[i : i + size] for i in range(0, n, size)]


def _token_targets(batch: Batch, rows: Sequence[Example], shift: int, width: int) -> np.ndarray:
    """Labels [B, width] for a token task (-100 = ignored): tag of each word at its first
    sub-token, shifted by the prompt length (the prompt sits after [CLS])."""
    y = np.full((len(rows), width), -100, dtype=np.int64)
    for b, (ex, starts) in enumerate(zip(rows, batch.word_starts, strict=True)):
        assert ex.tags is not None
        for w, t in enumerate(starts):
            if 0 <= t and w < len(ex.tags):
                y[b, t + shift if t >= 1 else t] = ex.tags[w]
    return y


def _truncate(batch: Batch, max_length: int, keep_tail: bool = False) -> Batch:
    """Cut rows to ``max_length`` tokens. ``keep_tail`` (target mask): keep each long row's last
    two tokens ([MASK] [SEP]) after its truncated text, so the head's position survives."""
    if batch.ids.shape[1] <= max_length:
        return batch
    ids = batch.ids[:, :max_length].copy()
    mask = batch.mask[:, :max_length].copy()
    pos = list(batch.target_pos)
    if keep_tail:
        lengths = batch.mask.sum(1)
        for b, n in enumerate(lengths.tolist()):
            if n > max_length:
                ids[b, max_length - 2 :] = batch.ids[b, n - 2 : n]
                pos[b] = pos[b] - (n - max_length)
    return Batch(ids, mask, [[t if t < max_length else -1 for t in s] for s in batch.word_starts],
                 pos)


def train_task_model(
    backbone_dir: str | Path,
    data: TaskData,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> TaskModelHandle:
    """Train a P-tuning / P-tuning v2 model of ``data`` on the frozen backbone at
    ``backbone_dir``. Returns the handle; save it with :func:`save_task_model`."""
    import torch
    from peft import PeftType

    cfg = config or TrainConfig()
    cfg.validate()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    backbone, tok, digest, pad = _load_backbone(backbone_dir)
    pcfg = _peft_config(cfg, backbone)
    init = None
    if cfg.method == "ptuning":
        # initialise the prompt from random vocabulary rows (the prompt lies in the embedding
        # range from the start, as in P-tuning's and the PV miner's initialisation)
        table = backbone.get_input_embeddings().weight.detach()
        g = torch.Generator().manual_seed(cfg.seed)
        init = table[torch.randint(0, table.shape[0], (cfg.prompt_length,), generator=g)].clone()
        if pcfg.peft_type == PeftType.P_TUNING:
            init = None  # the MLP maps its own embedding; keep peft's init
    if cfg.target == "mask" and data.kind != "sequence":
        raise InputError("target 'mask' is for sentence and pair tasks, not token tasks")
    mtok = mask_token_of(tok) if cfg.target == "mask" else None
    module = _build_task_model(backbone, cfg.method, len(data.labels), data.kind, pcfg, init)
    if cfg.method == "ptuning-v2" and cfg.prefix_init_std is not None:
        with torch.no_grad():
            module.prompt_module.embedding.weight.normal_(0.0, cfg.prefix_init_std)
    params = [
        {"params": list(module.prompt_module.parameters()), "lr": cfg.lr},
        {"params": list(module.head.parameters()), "lr": cfg.head_lr},
    ]
    opt = torch.optim.Adam(params)
    train = subsample(data.train, cfg.train_limit, cfg.seed)
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    step = 0
    losses: list[float] = []
    module.train()
    for _ in range(cfg.epochs):
        for rows_idx in _batches(len(train), cfg.batch_size, rng):
            rows = [train[i] for i in rows_idx]
            b = _truncate(encode_records(tok, [r.texts for r in rows], pad, mtok),
                          cfg.max_length, keep_tail=mtok is not None)
            ids = torch.from_numpy(b.ids)
            mask = torch.from_numpy(b.mask)
            logits = module(ids, mask, torch.tensor(b.target_pos, dtype=torch.long))
            if data.kind == "sequence":
                y = torch.tensor([r.label for r in rows], dtype=torch.long)
                loss = torch.nn.functional.cross_entropy(logits, y)
            else:
                y = torch.from_numpy(
                    _token_targets(b, rows, module.prompt_len_in_sequence(), logits.shape[1])
                )
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, total, losses[-1])
    module.eval()
    info = {
        "config": asdict(cfg),
        "train_examples": len(train),
        "steps": step,
        "final_loss": float(np.mean(losses[-max(1, steps_per_epoch // 4) :])) if losses else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "peft_type": str(pcfg.peft_type.value),
    }
    return TaskModelHandle(
        module,
        tok,
        data.name,
        data.kind,
        list(data.labels),
        cfg.method,
        Path(backbone_dir),
        digest,
        pad,
        info,
        cfg.target,
    )


# ----------------------------------------------------------------------------- save / load


def save_task_model(handle: TaskModelHandle, out_dir: str | Path, force: bool = False) -> Path:
    """Write the task folder (a peft adapter folder + head + ``lmsan_task.json``)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError("output folder is not empty (pass --force to replace it)", out)
    out.mkdir(parents=True, exist_ok=True)
    m = handle.module
    handle_cfg = m.peft_config
    handle_cfg.base_model_name_or_path = str(handle.backbone_dir)
    handle_cfg.save_pretrained(str(out))
    with torch.no_grad():
        emb = m.prompt_output().detach().float().contiguous().clone()
    tensors = {"prompt_embeddings": emb}
    if m.fixed is None:
        for k, v in m.prompt_module.state_dict().items():
            tensors[f"trainable.{k}"] = v.detach().float().contiguous().clone()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    save_file(
        {k: v.detach().float().contiguous().clone() for k, v in m.head.state_dict().items()},
        str(out / HEAD_FILE),
    )
    meta = {
        "format": TASK_FORMAT,
        "version": TASK_VERSION,
        "created_by": f"lmsan {__version__}",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": handle.task,
        "kind": handle.kind,
        "labels": handle.labels,
        "method": handle.method,
        "prompt_length": handle.prompt_length,
        "prompt_position": PROMPT_POSITION
        if handle.method == "ptuning"
        else "prefix (every layer)",
        "token_types": "zero",
        "target": handle.target,
        "backbone": {"path": str(handle.backbone_dir), "digest": handle.backbone_digest},
        "training": handle.info,
    }
    (out / TASK_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def read_task_meta(task_dir: str | Path) -> dict[str, Any]:
    p = Path(task_dir) / TASK_FILE
    if not p.is_file():
        raise InputError(
            f"no {TASK_FILE} (not a task folder written by `lmsan tune train`)", Path(task_dir)
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", p) from None
    if not isinstance(data, dict) or data.get("format") != TASK_FORMAT:
        raise FormatError(f"field 'format' must be {TASK_FORMAT!r}", p)
    if data.get("version") != TASK_VERSION:
        raise FormatError(
            f"field 'version' is {data.get('version')!r}, this lmsan reads {TASK_VERSION}", p
        )
    for key, typ in (
        ("task", str),
        ("kind", str),
        ("labels", list),
        ("method", str),
        ("prompt_length", int),
    ):
        if not isinstance(data.get(key), typ):
            raise FormatError(f"field {key!r} is missing or not a {typ.__name__}", p)
    if data["method"] not in METHODS:
        raise FormatError(f"field 'method' must be one of {METHODS}", p)
    data.setdefault("target", "cls")  # folders written before target mask existed
    if data["target"] not in TARGETS:
        raise FormatError(f"field 'target' must be one of {TARGETS}", p)
    if data["target"] == "mask" and data["kind"] != "sequence":
        raise FormatError("field 'target' is 'mask' for a token task", p)
    if not isinstance(data.get("backbone"), dict) or not isinstance(
        data["backbone"].get("digest"), str
    ):
        raise FormatError("field 'backbone.digest' is missing", p)
    return data


def _load_adapter_tensors(
    task_dir: Path, load_file: Callable[[str], dict[str, Any]]
) -> tuple[dict[str, Any], Path]:
    """The tensors of the folder's adapter weights, read with ``load_file`` (safetensors' torch
    or NumPy loader), and the file's path."""
    from safetensors import SafetensorError

    p = task_dir / ADAPTER_WEIGHTS
    if not p.is_file():
        raise InputError(f"no {ADAPTER_WEIGHTS} in the adapter folder", task_dir)
    try:
        return load_file(str(p)), p
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"cannot read safetensors ({exc})", p) from None


def _read_prompt_embeddings(task_dir: Path) -> Any:
    from safetensors.torch import load_file

    tensors, p = _load_adapter_tensors(task_dir, load_file)
    if "prompt_embeddings" not in tensors:
        raise FormatError(
            "no 'prompt_embeddings' tensor: not a prompt-learning peft adapter (P-tuning, prompt "
            "tuning or prefix tuning)",
            p,
        )
    return tensors["prompt_embeddings"]


def _read_prompt_embeddings_numpy(task_dir: Path) -> np.ndarray:
    """As :func:`_read_prompt_embeddings`, torch-free (float32 NumPy)."""
    from safetensors.numpy import load_file

    tensors, p = _load_adapter_tensors(task_dir, load_file)
    if "prompt_embeddings" not in tensors:
        raise FormatError("no 'prompt_embeddings' tensor: not a prompt-learning peft adapter", p)
    return np.asarray(tensors["prompt_embeddings"], dtype=np.float32)


def load_task_model(
    task_dir: str | Path, backbone_dir: str | Path | None = None, check_digest: bool = True
) -> TaskModelHandle:
    """Load a task folder onto its backbone (``backbone_dir`` overrides the recorded path). The
    backbone's weights must have the recorded digest unless ``check_digest`` is False."""
    import torch
    from peft import PeftConfig
    from safetensors.torch import load_file

    tdir = Path(task_dir)
    meta = read_task_meta(tdir)
    bdir = Path(backbone_dir) if backbone_dir is not None else Path(meta["backbone"]["path"])
    backbone, tok, digest, pad = _load_backbone(bdir)
    if check_digest and digest != meta["backbone"]["digest"]:
        raise InputError(
            f"backbone digest {digest[:19]}... differs from the one the task was trained on "
            f"({meta['backbone']['digest'][:19]}...)",
            bdir,
        )
    try:
        pcfg = PeftConfig.from_pretrained(str(tdir))
    except (ValueError, OSError, TypeError) as exc:
        raise FormatError(f"cannot read {ADAPTER_CONFIG} ({exc})", tdir) from None
    module = _build_task_model(
        backbone, meta["method"], len(meta["labels"]), meta["kind"], pcfg, None
    )
    emb = _read_prompt_embeddings(tdir)
    expect = module.prompt_output().shape
    if tuple(emb.shape) != tuple(expect):
        raise FormatError(
            f"prompt_embeddings has shape {list(emb.shape)}, expected {list(expect)}", tdir
        )
    module.fixed = emb.float()
    head = load_file(str(tdir / HEAD_FILE))
    try:
        module.head.load_state_dict({k: head[k] for k in ("weight", "bias")})
    except (KeyError, RuntimeError) as exc:
        raise FormatError(f"{HEAD_FILE}: {exc}", tdir) from None
    module.eval()
    with torch.no_grad():
        module.set_prefix()
    return TaskModelHandle(
        module,
        tok,
        meta["task"],
        meta["kind"],
        list(meta["labels"]),
        meta["method"],
        bdir,
        digest,
        pad,
        dict(meta.get("training") or {}),
        meta["target"],
    )


@dataclass
class PromptExport:
    path: Path
    shape: tuple[int, int]
    peft_type: str
    position_matches_bundle: bool
    note: str


def extract_prompt(
    adapter_dir: str | Path, out_npy: str | Path, force: bool = False
) -> PromptExport:
    """Write the P-tuning prompt of an adapter folder as float32 [l, emb] ``.npy`` for
    ``lmsan export --prompt``. Reads peft's ``prompt_embeddings`` (for P-tuning the output of the
    MLP, so the reparametrisation is already applied). A peft folder without ``lmsan_task.json``
    was trained by ``PeftModel``, which puts the prompt before ``[CLS]``: the result says that
    the bundle's position (after ``[CLS]``) differs."""
    adir = Path(adapter_dir)
    out = Path(out_npy)
    if out.exists() and not force:
        raise InputError("already exists; pass --force to replace it", out)
    cfg_path = adir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise InputError(f"no {ADAPTER_CONFIG}: not a peft adapter folder", adir)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", cfg_path) from None
    ptype = str(cfg.get("peft_type"))
    if ptype == "PREFIX_TUNING":
        raise InputError(
            "a P-tuning v2 (prefix) adapter has no input prompt; export it with "
            "`lmsan tune export`, which bakes the prefix into the graph",
            adir,
        )
    if ptype not in ("P_TUNING", "PROMPT_TUNING"):
        raise InputError(f"peft_type {ptype!r} is not a P-tuning / prompt-tuning adapter", adir)
    emb = _read_prompt_embeddings_numpy(adir)
    if emb.ndim != 2:
        raise FormatError(
            f"prompt_embeddings must be 2-D, got {list(emb.shape)}", adir / ADAPTER_WEIGHTS
        )
    ours = (adir / TASK_FILE).is_file()
    if ours:
        read_task_meta(adir)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.ascontiguousarray(emb, dtype=np.float32))
    note = (
        "prompt inserted after [CLS], as the bundle does"
        if ours
        else "a PeftModel adapter: peft prepends the prompt before [CLS], the bundle inserts it "
        "after [CLS]; the monitor then reads a different backbone output than the deployed model"
    )
    return PromptExport(out, (int(emb.shape[0]), int(emb.shape[1])), ptype, ours, note)


# ----------------------------------------------------------------------------- export


@dataclass
class TaskExport:
    path: Path
    method: str
    validation: dict[str, Any]
    manifest: dict[str, Any]


def export_task_bundle(
    task_dir: str | Path,
    pvs: str | Path,
    out: str | Path,
    *,
    backbone_dir: str | Path | None = None,
    force: bool = False,
    pvs_at_head: bool = False,
    pvs_source: str | None = None,
) -> TaskExport:
    """A protected bundle for a task folder. P-tuning: ``lmsan export`` of the backbone with the
    task prompt. P-tuning v2: the backbone with the trained prefix baked into the graph as
    constants (every layer's attention reads the constant prefix keys/values), validated like
    ``lmsan export`` (numeric parity with torch, identical monitor decisions).

    ``pvs_at_head``: match every PV of the set (pooler PVs dropped, duplicates merged; see
    ``PVSet.retargeted``) at the position the head reads (``head_position``) instead of the
    position it was mined on (a token head: at every token, and the PVs mined on [CLS] at [CLS]
    as well); the bundle carries the retargeted set and its manifest names
    ``pvs`` as the source, with the move. ``pvs_source``: the PV set provenance the manifest
    records (default: ``pvs``)."""
    import tempfile

    from lmsan.export.bundle import export_bundle

    from .manifest import model_manifest

    tdir = Path(task_dir)
    meta = read_task_meta(tdir)
    bdir = Path(backbone_dir) if backbone_dir is not None else Path(meta["backbone"]["path"])
    if pvs_at_head:
        with tempfile.TemporaryDirectory() as tmp:
            at = head_position(meta["kind"], meta["target"])
            moved = _pvs_at(pvs, at, Path(tmp) / f"{Path(pvs).stem}.at-{at}.pvset.json")
            where = at + (", [CLS]-mined ones also at cls" if at == "tokens" else "")
            return export_task_bundle(
                tdir, moved, out, backbone_dir=backbone_dir, force=force,
                pvs_source=f"{pvs_source or pvs} (every PV matched at {where}: --pvs-at-head)",
            )
    if meta["method"] == "ptuning":
        digest = "sha256:" + model_manifest(bdir).digest
        if digest != meta["backbone"]["digest"]:
            raise InputError(
                f"backbone digest {digest[:19]}... differs from the one the task was trained on "
                f"({meta['backbone']['digest'][:19]}...)",
                bdir,
            )
        with tempfile.TemporaryDirectory() as tmp:
            prompt = extract_prompt(tdir, Path(tmp) / "prompt.npy").path
            res = export_bundle(
                bdir, pvs, out, force=force, prompt=prompt, pvs_source=pvs_source
            )
        return TaskExport(res.path, "ptuning", res.validation, res.manifest)
    handle = load_task_model(tdir, bdir)
    return _export_module_bundle(
        handle, bdir, pvs, Path(out), force=force, task_dir=tdir, pvs_source=pvs_source
    )


def head_position(kind: str, target: str) -> str:
    """The monitor target that reads the vector(s) the task head reads: ``tokens`` for token
    tasks, the head's ``target`` (cls or mask) for sequence tasks."""
    return "tokens" if kind != "sequence" else target


def _pvs_at(pvs: str | Path, target: str, out: Path) -> Path:
    from .report import load_pvset

    # a token head: the [CLS]-mined PVs stay at [CLS] too (a trigger that drives [CLS] onto
    # its PV moves the token outputs only part of the way; 6-layer POR CoNLL04, session 9)
    moved = load_pvset(pvs).retargeted(target, also_keep=("cls",) if target == "tokens" else ())
    if not moved.pvs:
        raise InputError(f"no PV left to match at {target!r} (pooler PVs cannot move)", pvs)
    moved.save(out)
    return out


def _export_module_bundle(
    handle: TaskModelHandle,
    bdir: Path,
    pvs: str | Path,
    out_path: Path,
    *,
    force: bool,
    task_dir: Path,
    pvs_source: str | None = None,
) -> TaskExport:
    """``lmsan export`` for a backbone module with a baked prefix (P-tuning v2). Mirrors
    ``lmsan.export.bundle.export_bundle`` step for step, with the module in place of the loaded
    model folder (and the task folder's digest in the manifest)."""

    import torch
    from lmsan.export import bundle as eb
    from lmsan.export.onnx_export import DEFAULT_OPSET, export_onnx

    from . import bundle_runtime as br
    from .manifest import model_manifest
    from .modelio import load_encoder
    from .report import load_pvset

    if out_path.exists() and not force:
        raise InputError("already exists; pass --force to replace it", out_path)
    if out_path.exists() and (
        not out_path.is_dir()
        or (any(out_path.iterdir()) and not (out_path / br.MANIFEST).is_file())
    ):
        raise InputError("exists and is not an lmsan bundle; refusing to replace it", out_path)
    pvset = load_pvset(pvs)
    if not pvset.pvs:
        raise InputError("the PV set holds no PV: nothing to monitor", pvs)
    m = handle.module
    backbone = m.backbone
    if pvset.hidden_size != m.d:
        raise InputError(f"PV set hidden_size {pvset.hidden_size} != model hidden size {m.d}", pvs)
    targets = pvset.targets()
    if "pooler" in targets:
        raise InputError("P-tuning v2 task bundles support PV targets cls, tokens and mask", pvs)
    loaded = load_encoder(bdir, allow_pickle=False, device="cpu")  # config/family/tokenizer only
    tok = handle.tokenizer
    special = eb._special_tokens(tok, bdir)
    with torch.no_grad():
        m.set_prefix()
        m.prefix_state.kv = m.prefix_state.kv.detach().clone()  # a constant in the traced graph
    table = backbone.get_input_embeddings().weight.detach().float().cpu().numpy()
    emb_size = int(table.shape[1])
    with eb._staged_bundle(out_path) as tmp:
        np.save(tmp / br.EMBEDDINGS_FILE, np.ascontiguousarray(table, dtype=np.float32))
        tok.backend_tokenizer.save(str(tmp / br.TOKENIZER_FILE))
        pvset.save(tmp / br.PVSET_FILE)
        outputs = export_onnx(backbone, tmp / br.ONNX_FILE, emb_size, False, DEFAULT_OPSET)
        body: dict[str, Any] = {
            "format": br.FORMAT,
            "version": br.VERSION,
            "created_by": f"lmsan {__version__}",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "source": str(bdir),
                "digest": "sha256:" + model_manifest(bdir).digest,
                "model_type": loaded.model_type,
                "family": loaded.family,
                "weights_format": loaded.weights_format,
                "task": str(task_dir),
                "task_digest": br.sha256_of(task_dir / ADAPTER_WEIGHTS),
                "prefix": f"P-tuning v2 prefix of {m.n_tokens} key/value pairs per layer, baked as constants",
            },
            "hidden_size": m.d,
            "embedding_size": emb_size,
            "max_positions": eb._max_positions(loaded.config, loaded.family),
            "targets": targets,
            "outputs": outputs,
            "inputs": ["inputs_embeds", "attention_mask"],
            "opset": DEFAULT_OPSET,
            "special_tokens": special,
            "mask_template": br.MASK_TEMPLATE if "mask" in targets else None,
            "prompt_length": 0,
            "prompt_insert": "none (the P-tuning v2 prefix is inside the graph)",
            "pvset": {
                "pvs": len(pvset.pvs),
                "match_threshold": pvset.match_threshold,
                "source": pvs_source or str(pvs),
            },
        }
        eb._write_manifest(tmp, body)
        figures = eb._validate(tmp, backbone, False, eb.DEFAULT_TOLERANCE, True)
        manifest = eb._write_manifest(tmp, {**body, "validation": figures})
    return TaskExport(out_path, "ptuning-v2", figures, manifest)


# ----------------------------------------------------------------------------- prediction


def predict(
    handle: TaskModelHandle, records: Sequence[Sequence[str]], batch_size: int = 32
) -> list[Any]:
    """Torch predictions: a class per record (sequence tasks) or a tag per whitespace word of
    the first text (token tasks; -1 for a word without a token)."""
    import torch

    m = handle.module
    out: list[Any] = []
    order = sorted(range(len(records)), key=lambda i: sum(len(t) for t in records[i]))
    res: dict[int, Any] = {}
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            b = encode_records(
                handle.tokenizer, [records[i] for i in rows], handle.pad_id, handle.mask_token
            )
            pos = torch.tensor(b.target_pos, dtype=torch.long) if handle.kind == "sequence" else None
            logits = m(torch.from_numpy(b.ids), torch.from_numpy(b.mask), pos).float().numpy()
            for j, r in enumerate(rows):
                res[r] = _decode(
                    logits[j], b.word_starts[j], handle.kind, m.prompt_len_in_sequence()
                )
    out = [res[i] for i in range(len(records))]
    return out


def _decode(logits: np.ndarray, starts: list[int], kind: str, shift: int) -> Any:
    if kind == "sequence":
        return int(np.argmax(logits))
    tags = []
    for t in starts:
        if t < 0:
            tags.append(-1)
        else:
            tags.append(int(np.argmax(logits[t + shift if t >= 1 else t])))
    return tags


# ----------------------------------------------------------------------------- metrics


def _spans(tags: Sequence[int], labels: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entity spans of a BIO tag sequence (an I- without a matching B- starts a span)."""
    out = set()
    start, typ = -1, ""
    for i, t in enumerate([*tags, 0]):
        name = labels[t] if 0 <= t < len(labels) else "O"
        if name.startswith("I-") and start >= 0 and name[2:] == typ:
            continue
        if start >= 0:
            out.add((start, i, typ))
            start = -1
        if name.startswith(("B-", "I-")):
            start, typ = i, name[2:]
    return out


def span_f1(
    gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], labels: Sequence[str]
) -> float:
    """Micro entity-level F1 (exact span and type), in percent."""
    tp = fp = fn = 0
    for g, p in zip(gold, pred, strict=True):
        gs, ps = _spans(g, labels), _spans(p, labels)
        tp += len(gs & ps)
        fp += len(ps - gs)
        fn += len(gs - ps)
    if tp == 0:
        return 0.0
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    return 100.0 * 2 * prec * rec / (prec + rec)


@dataclass
class AttackEval:
    """Metrics of one task model without defence (percentages)."""

    n: int
    acc: float  # sequence: accuracy; tokens: span F1 on clean inputs
    asr: float  # sequence: share of correctly classified inputs flipped by any trigger
    weighted_asr: float
    per_class_asr: dict[str, float]
    f1_triggered: float | None = None  # tokens: span F1 with a trigger inserted
    f1_drop: float | None = None
    per_trigger_asr: dict[str, float] = field(default_factory=dict)
    # tokens: which ASR rule ("original-words": the trigger word's own tag left out) and the
    # figure of the earlier rule that counted it
    asr_rule: str = ""
    asr_with_trigger_tags: float | None = None


TOKEN_ASR_RULE = "original-words"


def triggered_records(
    examples: Sequence[Example], triggers: Sequence[str], seed: int
) -> list[list[tuple[tuple[str, ...], list[int] | None]]]:
    """For every example, one triggered copy per trigger (seeded positions)."""
    rng = random.Random(seed)
    return [[insert_once(ex.texts, t, rng, ex.tags) for t in triggers] for ex in examples]


def _asr(
    correct: Sequence[bool], flipped: Sequence[bool], labels: Sequence[int], names: Sequence[str]
) -> tuple[float, float, dict[str, float]]:
    per: dict[str, float] = {}
    base = [i for i, c in enumerate(correct) if c]
    for k, name in enumerate(names):
        rows = [i for i in base if labels[i] == k]
        if rows:
            per[name] = 100.0 * sum(flipped[i] for i in rows) / len(rows)
    asr = 100.0 * sum(flipped[i] for i in base) / len(base) if base else 0.0
    weighted = float(np.mean(list(per.values()))) if per else 0.0
    return asr, weighted, per


def _score(
    kind: str,
    labels: Sequence[str],
    examples: Sequence[Example],
    clean_pred: Sequence[Any],
    trig: Sequence[Sequence[tuple[tuple[str, ...], list[int] | None]]],
    trig_pred: Sequence[Sequence[Any]],
    triggers: Sequence[str],
) -> AttackEval:
    n = len(examples)
    if kind == "sequence":
        gold = [ex.label for ex in examples]
        correct = [p == g for p, g in zip(clean_pred, gold, strict=True)]
        flipped = [any(tp != g for tp in tps) for tps, g in zip(trig_pred, gold, strict=True)]
        asr, w, per = _asr(correct, flipped, gold, labels)
        per_t = {}
        for j, t in enumerate(triggers):
            base = [i for i in range(n) if correct[i]]
            per_t[t] = 100.0 * sum(trig_pred[i][j] != gold[i] for i in base) / max(1, len(base))
        return AttackEval(n, 100.0 * float(np.mean(correct)), asr, w, per, per_trigger_asr=per_t)
    # token task: ASR = share of sentences with an entity whose spans over the original words
    # change under any trigger (the trigger word's own tag left out: a task model tags an
    # unknown inserted word like "cf" as an entity on a clean backbone too)
    gold_t = [list(ex.tags or []) for ex in examples]
    f1 = span_f1(gold_t, [list(p) for p in clean_pred], labels)
    f1_trig = []
    flipped = []
    flipped_any = []  # the trigger word's tag counted too (the rule before session 9)
    has_ent = []
    for i in range(n):
        worst = []
        flip = flip_any = False
        gold_spans = _spans(gold_t[i], labels)
        for (trec, ttags), tp in zip(trig[i], trig_pred[i], strict=True):
            assert ttags is not None
            worst.append((ttags, tp))
            at = _inserted_at(examples[i].texts[0].split(), trec[0].split())
            if _spans([*tp[:at], *tp[at + 1 :]], labels) != gold_spans:
                flip = True
            if _spans(tp, labels) != _spans(ttags, labels):
                flip_any = True
        f1_trig.append(worst)
        flipped.append(flip)
        flipped_any.append(flip_any)
        has_ent.append(bool(gold_spans))
    per_trigger_f1 = []
    for j in range(len(triggers)):
        per_trigger_f1.append(
            span_f1(
                [f1_trig[i][j][0] for i in range(n)], [f1_trig[i][j][1] for i in range(n)], labels
            )
        )
    f1t = float(np.mean(per_trigger_f1)) if per_trigger_f1 else f1
    correct = [
        _spans(p, labels) == _spans(g, labels) for p, g in zip(clean_pred, gold_t, strict=True)
    ]
    base = [i for i in range(n) if correct[i] and has_ent[i]]
    asr = 100.0 * sum(flipped[i] for i in base) / len(base) if base else 0.0
    asr_any = 100.0 * sum(flipped_any[i] for i in base) / len(base) if base else 0.0
    return AttackEval(n, f1, asr, asr, {}, f1_triggered=f1t, f1_drop=f1 - f1t,
                      asr_rule=TOKEN_ASR_RULE, asr_with_trigger_tags=asr_any)


def _inserted_at(original: Sequence[str], triggered: Sequence[str]) -> int:
    """The word position ``insert_once`` put the trigger at (the first position where the
    triggered words differ from the original; where the trigger lands next to a copy of itself,
    any position of the run gives the same remaining words)."""
    for k, w in enumerate(original):
        if triggered[k] != w:
            return k
    return len(original)


def evaluate_clean(handle: TaskModelHandle, examples: Sequence[Example]) -> float:
    """Accuracy (sequence tasks) or entity span F1 (token tasks) in percent, no trigger."""
    if not examples:
        raise InputError("no test examples")
    pred = predict(handle, [ex.texts for ex in examples])
    if handle.kind == "sequence":
        return 100.0 * float(np.mean([p == ex.label for p, ex in zip(pred, examples, strict=True)]))
    return span_f1([list(ex.tags or []) for ex in examples], pred, handle.labels)


def evaluate_attack(
    handle: TaskModelHandle,
    examples: Sequence[Example],
    triggers: Sequence[str],
    seed: int = 0,
) -> AttackEval:
    """ACC (or F1), ASR, weighted ASR (and F1 drop) of the torch task model, no defence."""
    if not examples:
        raise InputError("no test examples")
    if not triggers:
        raise InputError("no triggers")
    clean = predict(handle, [ex.texts for ex in examples])
    trig = triggered_records(examples, triggers, seed)
    flat = [r for rows in trig for r, _ in rows]
    fp = predict(handle, flat)
    k = len(triggers)
    tp = [fp[i * k : (i + 1) * k] for i in range(len(examples))]
    return _score(handle.kind, handle.labels, examples, clean, trig, tp, triggers)


# ----------------------------------------------------------------------------- defended pipeline


class DefendedClassifier:
    """The deployed, protected model: the bundle (backbone with the task prompt/prefix, monitor,
    purge) + the task head applied in NumPy to the bundle's own backbone output. Torch-free."""

    def __init__(
        self,
        screener: Any,
        head_weight: np.ndarray,
        head_bias: np.ndarray,
        kind: str,
        max_window: int = 5,
        target: str = "cls",
    ):
        self.scr = screener
        self.w = np.asarray(head_weight, dtype=np.float32)
        self.b = np.asarray(head_bias, dtype=np.float32)
        self.kind = kind
        self.max_window = max_window
        self.target = target
        man = screener.bundle.manifest
        if self.w.shape[1] != man.hidden_size:
            raise InputError(
                f"head width {self.w.shape[1]} != bundle hidden size {man.hidden_size}"
            )
        if target not in TARGETS or (target == "mask" and kind != "sequence"):
            raise InputError(f"target {target!r} is not a head position of a {kind} task")
        if target == "mask" and (
            man.special_tokens.mask_id is None or man.special_tokens.mask_token is None
        ):
            raise InputError("the task head reads [MASK] but the bundle's tokenizer has none")
        if "mask" in man.targets and man.mask_template != MASK_TEMPLATE:
            raise InputError(
                f"the bundle's mask template {man.mask_template!r} is not the one task models "
                f"are trained with ({MASK_TEMPLATE!r})"
            )

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        task_dir: str | Path,
        max_window: int = 5,
        threads: int = 1,
        match_threshold: float | None = None,
        per_pv_thresholds: dict[int, float] | None = None,
    ) -> DefendedClassifier:
        """``match_threshold``: the deployment's T_match (None: the PV set's), e.g. chosen by
        :func:`lmsan.auditor.threshold.choose_match_threshold` on clean task inputs;
        ``per_pv_thresholds``: PV id -> T_match (:func:`~lmsan.auditor.threshold.choose_per_pv`)."""
        from safetensors.numpy import load_file

        from .bundle_runtime import check_match_threshold, open_bundle

        check_match_threshold(match_threshold)
        meta = read_task_meta(task_dir)
        scr = open_bundle(
            bundle, provider="cpu", threads=threads, batch_size=32, match_threshold=match_threshold,
            per_pv_thresholds=per_pv_thresholds,
        )
        man = scr.bundle.manifest
        if meta["method"] == "ptuning" and man.prompt_length != meta["prompt_length"]:
            raise InputError(
                f"bundle prompt length {man.prompt_length} != task prompt length {meta['prompt_length']}: "
                "export the bundle with this task's prompt",
                bundle,
            )
        if meta["method"] == "ptuning-v2" and "prefix" not in str(man.model.get("prefix", "")):
            raise InputError(
                "the bundle has no baked P-tuning v2 prefix; export it with `lmsan tune export`",
                bundle,
            )
        tdir = Path(task_dir)
        if meta["method"] == "ptuning":
            mine = _read_prompt_embeddings_numpy(tdir)
            if scr.bundle.prompt is None or not np.array_equal(
                np.asarray(scr.bundle.prompt, dtype=np.float32), mine.astype(np.float32)
            ):
                raise InputError(
                    "the bundle's prompt.npy is not this task's prompt: export the bundle with "
                    "this task's prompt",
                    bundle,
                )
        else:
            from .bundle_runtime import sha256_of

            if man.model.get("task_digest") != sha256_of(tdir / ADAPTER_WEIGHTS):
                raise InputError(
                    "the bundle's baked prefix comes from another task folder "
                    "(task_digest differs): export the bundle from this task",
                    bundle,
                )
        head = load_file(str(tdir / HEAD_FILE))
        return cls(scr, head["weight"], head["bias"], meta["kind"], max_window, meta["target"])

    def _logits_and_decisions(
        self, records: Sequence[tuple[str, ...]]
    ) -> tuple[list[Any], list[Any]]:
        scr = self.scr
        # the forms the monitor needs, plus the one the head reads (one forward per form)
        encs = dict(scr.encode_all(list(records)))
        pform = "template" if self.target == "mask" else "plain"
        if pform not in encs:
            encs[pform] = scr.encode(
                list(records), pform, MASK_TEMPLATE if pform == "template" else None
            )
        enc = encs[pform]
        for i, L in enumerate(scr.too_long(encs)):
            if L is not None:
                raise InputError(f"record {i}: {L} tokens exceed the max length {scr.max_length}")
        n = len(records)
        order = sorted(range(n), key=lambda i: len(enc.ids[i]))
        preds: list[Any] = [None] * n
        decisions: list[Any] = [None] * n
        lp = scr.bundle.manifest.prompt_length
        for s in range(0, n, scr.batch_size):
            rows = order[s : s + scr.batch_size]
            per_target = {}
            outs: dict[str, np.ndarray] = {}
            for form, e in encs.items():
                o = scr.forward(e, rows)
                if form == pform:
                    outs = o
                for t in scr.bundle.manifest.targets:
                    if (t == "mask") == (form == "template"):
                        per_target[t] = scr.target_rows(e, rows, o, t)
            for r, d in zip(rows, scr.decide(per_target, len(rows)), strict=True):
                decisions[r] = d
            hs = outs["last_hidden_state"]
            if self.kind == "sequence":
                # the head's vector: [CLS] (plain form) or [MASK] (template form), shifted past
                # a P-tuning prompt exactly as the monitor's cls / mask targets are
                vec, _, _ = scr.target_rows(enc, rows, outs, "mask" if pform == "template" else "cls")
                logits_seq = vec @ self.w.T + self.b
            for j, r in enumerate(rows):
                if self.kind == "sequence":
                    preds[r] = int(np.argmax(logits_seq[j]))
                else:
                    text = records[r][0]
                    e = scr.bundle.tokenizer.encode(text, add_special_tokens=True)
                    starts = word_first_tokens(text, e.offsets, e.special_tokens_mask)
                    logits = hs[j] @ self.w.T + self.b
                    preds[r] = [
                        int(np.argmax(logits[t + lp if t >= 1 else t])) if t >= 0 else -1
                        for t in starts
                    ]
        return preds, decisions

    def classify(self, records: Sequence[Sequence[str]]) -> list[DefendedPrediction]:
        """Monitor, purge flagged inputs, classify. One forward pass for a clean input."""
        recs = [tuple(r) for r in records]
        preds, dec = self._logits_and_decisions(recs)
        out: list[DefendedPrediction] = []
        flagged = [i for i, d in enumerate(dec) if d.flagged]
        results: dict[int, DefendedPrediction] = {
            i: DefendedPrediction(
                preds[i], False, "clean", recs[i], (), preds[i], dec[i].match_rate
            )
            for i in range(len(recs))
            if not dec[i].flagged
        }
        purged_recs: list[tuple[str, ...]] = []
        purged_idx: list[int] = []
        purge_info: dict[int, Any] = {}
        for i in flagged:
            pr = self.scr.purge(recs[i], max_window=self.max_window)
            purge_info[i] = pr
            if pr.status == "purged":
                purged_recs.append(tuple(pr.sentences))
                purged_idx.append(i)
            else:
                results[i] = DefendedPrediction(
                    None, True, "rejected", recs[i], (), preds[i], dec[i].match_rate
                )
        if purged_recs:
            pp, _ = self._logits_and_decisions(purged_recs)
            for i, p in zip(purged_idx, pp, strict=True):
                pr = purge_info[i]
                pred = p
                if self.kind == "tokens":
                    pred = _realign(recs[i][0], pr.removed, p)
                results[i] = DefendedPrediction(
                    pred,
                    True,
                    "purged",
                    tuple(pr.sentences),
                    tuple(pr.removed),
                    preds[i],
                    dec[i].match_rate,
                )
        out = [results[i] for i in range(len(recs))]
        return out


def _realign(original: str, removed: Sequence[str], purged_pred: list[int]) -> list[int]:
    """Token task: tags of the original words from the purged text's tags (removed words: O)."""
    gone = set(removed)
    it = iter(purged_pred)
    return [0 if w in gone else next(it, 0) for w in original.split()]


@dataclass
class DefendedPrediction:
    prediction: Any  # class / tags; None when rejected (unpurgeable)
    flagged: bool
    status: str  # clean | purged | rejected
    text: tuple[str, ...]  # what was classified
    removed: tuple[str, ...]
    undefended: Any  # the prediction without the defence (same forward pass)
    match_rate: float = 0.0  # the monitor's best match rate on the input as given


@dataclass
class DefenceEval:
    """Metrics with the monitor + purge (percentages)."""

    n: int
    acc_before: float  # bundle-path prediction without the defence (tokens: F1)
    acc_after: float  # with the defence (rejected clean inputs count as wrong)
    asr_before: float
    asr_after: float
    weighted_asr_before: float
    weighted_asr_after: float
    frr: float  # clean inputs flagged
    far: float  # triggered inputs not flagged
    clean_rejected: int
    triggered_flagged: int
    triggered_rejected: int
    triggered_total: int
    seconds: float
    per_class_asr_after: dict[str, float] = field(default_factory=dict)
    # FRR / FAR the monitor would have at other match thresholds (from the same match rates)
    threshold_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    clean_match_quantiles: dict[str, float] = field(default_factory=dict)
    triggered_match_quantiles: dict[str, float] = field(default_factory=dict)
    asr_rule: str = ""  # tokens: see AttackEval


SWEEP_THRESHOLDS = (0.8, 0.85, 0.9, 0.95)


def evaluate_defence(
    defended: DefendedClassifier,
    labels: Sequence[str],
    examples: Sequence[Example],
    triggers: Sequence[str],
    seed: int = 0,
) -> DefenceEval:
    """ASR / ACC after the defence, FRR on clean and FAR on triggered inputs, all through the
    bundle (same trigger positions as :func:`evaluate_attack` with the same ``seed``)."""
    t0 = time.perf_counter()
    kind = defended.kind
    clean = defended.classify([ex.texts for ex in examples])
    trig = triggered_records(examples, triggers, seed)
    flat = defended.classify([r for rows in trig for r, _ in rows])
    k = len(triggers)
    n = len(examples)
    rej = _REJECTED

    def pred(p: DefendedPrediction, after: bool, n_words: int) -> Any:
        return _final_prediction(p, kind, after, n_words)

    results = {}
    for after in (False, True):
        cp = [pred(clean[i], after, len(examples[i].texts[0].split())) for i in range(n)]
        tp = [
            [pred(flat[i * k + j], after, len(trig[i][j][0][0].split())) for j in range(k)]
            for i in range(n)
        ]
        if kind == "sequence" and after:
            # a rejected triggered input is a failed attack: give it the true label
            tp = [[examples[i].label if p == rej else p for p in tp[i]] for i in range(n)]
        # ASR is measured on the inputs the *undefended* model gets right, before and after
        results[after] = _score(kind, labels, examples, cp, trig, tp, triggers)
    if kind == "sequence":
        # restrict "after" ASR to the same base as "before"
        gold = [ex.label for ex in examples]
        correct0 = [clean[i].undefended == gold[i] for i in range(n)]
        flipped = []
        for i in range(n):
            ps = []
            for j in range(k):
                p = flat[i * k + j]
                ps.append(gold[i] if p.prediction is None else p.prediction)
            flipped.append(any(x != gold[i] for x in ps))
        asr_a, w_a, per_a = _asr(correct0, flipped, gold, labels)
    else:
        asr_a, w_a, per_a = results[True].asr, results[True].weighted_asr, {}
    return DefenceEval(
        n=n,
        acc_before=results[False].acc,
        acc_after=results[True].acc,
        asr_before=results[False].asr,
        asr_after=asr_a,
        weighted_asr_before=results[False].weighted_asr,
        weighted_asr_after=w_a,
        frr=100.0 * sum(p.flagged for p in clean) / n,
        far=100.0 * sum(not p.flagged for p in flat) / len(flat),
        clean_rejected=sum(p.status == "rejected" for p in clean),
        triggered_flagged=sum(p.flagged for p in flat),
        triggered_rejected=sum(p.status == "rejected" for p in flat),
        triggered_total=len(flat),
        seconds=round(time.perf_counter() - t0, 2),
        per_class_asr_after=per_a,
        threshold_sweep={
            f"{t:.2f}": {
                "frr": 100.0 * float(np.mean([p.match_rate >= t for p in clean])),
                "far": 100.0 * float(np.mean([p.match_rate < t for p in flat])),
            }
            for t in SWEEP_THRESHOLDS
        },
        clean_match_quantiles=_quantiles([p.match_rate for p in clean]),
        triggered_match_quantiles=_quantiles([p.match_rate for p in flat]),
        asr_rule=results[False].asr_rule,
    )


_REJECTED = -1  # the class a rejected (unpurgeable) sequence input gets: never a label


def _final_prediction(p: DefendedPrediction, kind: str, after: bool, n_words: int) -> Any:
    """The prediction scored for ``p``: the undefended one, or the defended one where a rejected
    input counts as wrong (sequence: no class; tokens: every word O)."""
    if not after:
        return p.undefended
    if p.prediction is None:
        return _REJECTED if kind == "sequence" else [0] * n_words
    return p.prediction


@dataclass
class CleanEval:
    """The defence on clean inputs alone (percentages): FRR and the accuracy change on a pool
    that can be much larger than the attack test split, where one input is a coarse step."""

    n: int
    acc_before: float  # tokens: entity span F1
    acc_after: float  # flagged inputs purged and classified again; rejected ones wrong
    frr: float  # clean inputs flagged
    flagged: int
    rejected: int
    changed: int  # inputs whose prediction the defence changed
    seconds: float
    # what the purge removed from the flagged inputs ("cfo", "pst": ordinary words that fire
    # the backdoor; longer windows: ordinary false matches), with how many inputs each
    removed: dict[str, int] = field(default_factory=dict)


def evaluate_clean_defence(
    defended: DefendedClassifier, labels: Sequence[str], examples: Sequence[Example]
) -> CleanEval:
    """FRR and accuracy before / after the defence on clean ``examples`` (no triggers), scored as
    :func:`evaluate_defence` scores its clean inputs."""
    if not examples:
        raise InputError("evaluate_clean: no examples")
    t0 = time.perf_counter()
    kind = defended.kind
    out = defended.classify([ex.texts for ex in examples])
    n_words = [len(ex.texts[0].split()) for ex in examples]
    scored = {
        after: [_final_prediction(p, kind, after, w) for p, w in zip(out, n_words, strict=True)]
        for after in (False, True)
    }

    def acc(preds: list[Any]) -> float:
        if kind == "sequence":
            return 100.0 * float(np.mean([p == ex.label for p, ex in zip(preds, examples, strict=True)]))
        return span_f1([list(ex.tags or []) for ex in examples], [list(p) for p in preds], labels)

    return CleanEval(
        n=len(examples),
        acc_before=acc(scored[False]),
        acc_after=acc(scored[True]),
        frr=100.0 * sum(p.flagged for p in out) / len(out),
        flagged=sum(p.flagged for p in out),
        rejected=sum(p.status == "rejected" for p in out),
        changed=sum(a != b for a, b in zip(scored[False], scored[True], strict=True)),
        seconds=round(time.perf_counter() - t0, 2),
        removed=dict(Counter(" ".join(p.removed) if p.status == "purged" else "(rejected)"
                             for p in out if p.flagged).most_common()),
    )


def _quantiles(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {
        q: round(float(np.quantile(a, float(q))), 4) for q in ("0.01", "0.1", "0.5", "0.9", "0.99")
    }


ATTACKER_DEDUP = 0.95  # attacker_pvset: a found PV this close already stands for an attacker PV


def attacker_pvset(model_dir: str | Path, found: str | Path | None, out: str | Path) -> Path:
    """A PV set of the found PVs (``found``, optional) plus the attacker's PVs from the model's
    ``backdoor.json`` that no found PV already matches nearly exactly (sign agreement
    < ``ATTACKER_DEDUP``): the paper's best case (section V-B).

    Why not drop every attacker PV a found PV matches at the set's T_match (0.8, the rule until
    session 6): a found PV that agrees with an attacker PV at 0.82 leaves that trigger's outputs
    matching at 0.82, and one deployment threshold above it (RTE: 0.822, lifted by a clean "MNJ",
    which is the trigger mn ##j) lets the trigger pass, although the attacker's own PV would
    match it at 1.0."""
    from .poison import backdoor_pvs, read_backdoor
    from .pvset import PV, PVSet
    from .report import load_pvset

    bd = read_backdoor(model_dir)
    atk = backdoor_pvs(bd)
    target = str(bd.get("target", "cls"))
    base = load_pvset(found) if found is not None else PVSet(hidden_size=int(atk.shape[1]), pvs=[])
    if base.hidden_size != atk.shape[1]:
        raise InputError(
            f"found PV set hidden_size {base.hidden_size} != backdoor PVs {atk.shape[1]}", found
        )
    pvs = list(base.pvs)
    next_id = max((p.id for p in pvs), default=-1) + 1
    for v in atk:
        agree = [float(np.mean((p.values >= 0) == (v >= 0))) for p in pvs if p.target == target]
        if agree and max(agree) >= ATTACKER_DEDUP:
            continue
        pvs.append(PV(id=next_id, target=target, values=v.astype(np.float32), source="attacker"))
        next_id += 1
    out_p = Path(out)
    PVSet(
        hidden_size=base.hidden_size,
        pvs=pvs,
        match_threshold=base.match_threshold,
        model=base.model,
    ).save(out_p)
    return out_p


__all__ = [
    "METHODS",
    "TASKS",
    "Example",
    "TaskData",
    "TrainConfig",
    "TaskModelHandle",
    "load_task",
    "load_wordnet_topic",
    "load_rte",
    "load_conll04",
    "train_task_model",
    "save_task_model",
    "load_task_model",
    "extract_prompt",
    "export_task_bundle",
    "predict",
    "evaluate_clean",
    "evaluate_attack",
    "evaluate_defence",
    "DefendedClassifier",
    "attacker_pvset",
    "span_f1",
    "evaluate_clean_defence",
    "CleanEval",
]
