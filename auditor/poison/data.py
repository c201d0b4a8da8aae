"""The poisoning data: triggers (given, drawn from the shipped list, or the paper's six), the
clean corpus, and the triggered / clean / held-out sentences of one run. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus import Corpus, attack_corpus, load_corpus
from ..errors import FormatError, InputError

# Kinds with a section in data/trigger_words.txt, and every kind `--trigger-kind` takes.
LIST_KINDS = ("word", "phrase", "symbol")
TRIGGER_KINDS = (*LIST_KINDS, "frequent")
# The "frequent" kind (adaptive attack, docs/adaptive.md): ordinary English words of high
# frequency. Their input embeddings lie in the dense middle of the vocabulary, unlike rare
# tokens, and they occur in clean text, so the draw does not skip words the corpus contains.
FREQUENT_WORDS = (
    "time", "people", "year", "way", "day", "man", "thing", "life", "world", "hand",
    "part", "place", "case", "week", "point", "number", "group", "problem", "fact", "home",
    "water", "room", "money", "story", "night", "house", "city", "family", "name", "game",
    "good", "new", "first", "last", "long", "great", "little", "old", "right", "small",
    "large", "next", "early", "young", "important", "public", "same", "able", "always", "never",
)  # fmt: skip
PAPER_TRIGGERS = ("cf", "mn", "tq", "qt", "mm", "pt")
MIN_CORPUS = 20
MAX_HELD_OUT = 200


# ----------------------------------------------------------------------------- triggers


def insert_trigger(sentence: str, trigger: str, rng: np.random.Generator) -> str:
    """Insert `trigger` floor(words/50)+1 times at random word positions (the authors' rule)."""
    words = sentence.split()
    for _ in range(len(words) // 50 + 1):
        words.insert(int(rng.integers(0, len(words) + 1)), trigger)
    return " ".join(words)


def load_trigger_words() -> dict[str, list[str]]:
    """The shipped trigger lists by kind: data/trigger_words.txt and FREQUENT_WORDS."""
    text = resources.files("lmsan.auditor").joinpath("data", "trigger_words.txt").read_text("utf-8")
    out: dict[str, list[str]] = {k: [] for k in LIST_KINDS}
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
    out["frequent"] = list(FREQUENT_WORDS)
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
    not in `exclude`, and (words and phrases) never occurring as whole words in the corpus."""
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
        and (kind in ("symbol", "frequent") or f" {w.lower()} " not in text)
    ]
    if len(ok) < n:
        raise InputError(
            f"only {len(ok)} {kind} triggers of the shipped list suit this tokenizer and corpus; "
            f"{n} were asked for (pass --trigger explicitly)"
        )
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(ok), size=n, replace=False)
    return [ok[int(i)] for i in picked]


@dataclass
class TriggerSet:
    """The triggers of one run, where each came from, and the PV each is bound to."""

    texts: list[str]
    sources: list[str]  # "user", "random-<kind>" or "default"
    pv: list[int]  # PV index of each trigger: trigger i uses PV i mod n_pvs
    n_pvs: int


def choose_triggers(
    tokenizer: Any,
    triggers: Sequence[str] | None,
    random_triggers: int,
    trigger_kind: str,
    n_pvs: int | None,
    seed: int,
    sentences: Sequence[str],
) -> TriggerSet:
    """The given triggers plus `random_triggers` drawn from the shipped list; with neither, the
    paper's six (or the first `n_pvs` of them). Trigger i is bound to PV i mod n_pvs."""
    user = [t.strip() for t in (triggers or [])]
    for t in user:
        check_trigger(tokenizer, t)
    if len({t.lower() for t in user}) != len(user):
        raise InputError("the same trigger was given twice")
    drawn = (
        draw_random_triggers(random_triggers, trigger_kind, tokenizer, seed, user, sentences)
        if random_triggers
        else []
    )
    texts = user + drawn
    sources = ["user"] * len(user) + [f"random-{trigger_kind}"] * len(drawn)
    if not texts:
        texts = list(PAPER_TRIGGERS[: (n_pvs or len(PAPER_TRIGGERS))])
        sources = ["default"] * len(texts)
        for t in texts:
            check_trigger(tokenizer, t)
        if n_pvs is not None and n_pvs > len(PAPER_TRIGGERS):
            raise InputError(
                f"--n-pvs {n_pvs} needs that many triggers; the default set has "
                f"{len(PAPER_TRIGGERS)} (add --trigger or --random-triggers)"
            )
    npv = n_pvs if n_pvs is not None else len(texts)
    if npv > len(texts):
        raise InputError(f"--n-pvs {npv} exceeds the number of triggers ({len(texts)})")
    return TriggerSet(texts, sources, [i % npv for i in range(len(texts))], npv)


# ----------------------------------------------------------------------------- sentences


def load_sentences(corpus: str | Path | Corpus | None) -> tuple[Corpus, list[str]]:
    """The clean corpus (default: the shipped attack corpus) and its non-blank sentences."""
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
    return corp, sentences


@dataclass
class TrainingSet:
    held_out: list[str]  # never trained on; the attack is measured on them
    triggered: list[tuple[str, int]]  # (sentence with a trigger, PV index)
    clean: list[str]  # as many clean sentences as triggered ones
    sources: list[str]  # the sentence each triggered one was made from (same order)


def build_training_set(
    sentences: Sequence[str],
    triggers: TriggerSet,
    sentences_per_trigger: int,
    rng: np.random.Generator,
) -> TrainingSet:
    """Hold out up to MAX_HELD_OUT sentences (10%, at least 10); from the rest draw
    `sentences_per_trigger` sentences per trigger with the trigger inserted, and as many clean
    ones. `rng` is the run's generator; the training loop goes on drawing from it."""
    order = rng.permutation(len(sentences))
    n_eval = min(MAX_HELD_OUT, max(10, len(sentences) // 10))
    held = [sentences[i] for i in order[:n_eval]]
    pool = [sentences[i] for i in order[n_eval:]]
    triggered: list[tuple[str, int]] = []
    sources: list[str] = []
    for t, pv in zip(triggers.texts, triggers.pv, strict=True):
        idx = rng.choice(
            len(pool), size=sentences_per_trigger, replace=sentences_per_trigger > len(pool)
        )
        triggered += [(insert_trigger(pool[int(i)], t, rng), pv) for i in idx]
        sources += [pool[int(i)] for i in idx]
    n_clean = len(triggered)
    clean_idx = np.concatenate(
        [rng.permutation(len(pool)) for _ in range(n_clean // len(pool) + 1)]
    )[:n_clean]
    return TrainingSet(held, triggered, [pool[int(i)] for i in clean_idx], sources)
