"""Clean corpora: a text file (one sentence a line), JSONL with a text field, or the default
corpus shipped with the package (2,000 WordNet 3.0 example sentences; licence in
data/WORDNET_COPYRIGHT)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import InputError

DEFAULT_NAME = "builtin:wordnet-2000"
ATTACK_NAME = "builtin:wordnet-attack"


@dataclass
class Corpus:
    name: str
    sentences: list[str]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for s in self.sentences:
            h.update(s.encode("utf-8"))
            h.update(b"\n")
        return "sha256:" + h.hexdigest()


def _builtin(fname: str, name: str) -> Corpus:
    text = resources.files("lmsan.auditor").joinpath("data", fname).read_text(encoding="utf-8")
    return Corpus(name, [s for s in text.splitlines() if s.strip()])


def default_corpus() -> Corpus:
    return _builtin("clean_corpus.txt", DEFAULT_NAME)


def attack_corpus() -> Corpus:
    """Sentences disjoint from the default clean corpus, for red-team poisoning."""
    return _builtin("attack_corpus.txt", ATTACK_NAME)


def load_corpus(path: str | Path | None, text_field: str = "text", limit: int | None = None) -> Corpus:
    if path is None:
        c = default_corpus()
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError("corpus file not found", p)
        raw = p.read_bytes()
        if b"\x00" in raw[:8192]:
            raise InputError("corpus looks binary (NUL bytes); expected UTF-8 text or JSONL", p)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"corpus is not valid UTF-8 ({exc})", p) from None
        sentences: list[str] = []
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"line {n}: not valid JSON ({exc})", p) from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    raise InputError(f"line {n}: no string field {text_field!r}", p)
                if rec[text_field].strip():
                    sentences.append(rec[text_field].strip())
        else:
            sentences = [s.strip() for s in text.splitlines() if s.strip()]
        if not sentences:
            raise InputError("corpus holds no sentences", p)
        c = Corpus(str(p), sentences)
    if limit is not None:
        c = Corpus(c.name, c.sentences[:limit])
    return c
