"""Task datasets: the WordNet topic task, RTE and CoNLL04 entities, read from a data folder.

A sequence task (sentence or pair) has one label per example; a token task (CoNLL04) has one tag
per whitespace word of the sentence.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, InputError

TASKS = ("wordnet-topic", "rte", "conll04")
TOPIC_CLASSES = ("verb.change", "verb.communication", "verb.motion", "verb.contact")


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
