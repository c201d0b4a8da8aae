"""Model identity: a manifest of per-file SHA-256 digests, the way OpenSSF model_signing does it.

Torch-free. Every regular file under the model folder (recursively, following symbolic links,
which is how the Hugging Face cache lays out a snapshot) is hashed in 1 MiB chunks. Paths are
relative, POSIX-style and sorted. Excluded:

- any path with a component that starts with ``.git`` (``.git/``, ``.gitattributes``,
  ``.github/``, ``.gitignore``): version-control metadata, not the model;
- ``.cache/huggingface/`` at the top level: the download metadata `huggingface-cli download
  --local-dir` writes (etags and timestamps that change on every re-download);
- the paths passed in ``ignore`` (the signed report itself, when it is written into the model
  folder); they are recorded in the manifest so a verifier applies the same exclusions.

The model digest is the SHA-256 of the canonical JSON of the file list::

    {"files":[{"path":"config.json","sha256":"<hex>","size":123},...]}

(keys sorted, no whitespace, ASCII only), so it identifies exactly the bytes and names of the
files and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FormatError, InputError

CHUNK = 1 << 20
EXCLUDED_PREFIXES = (".git",)  # any path component starting with this
EXCLUDED_DIRS = (".cache/huggingface",)  # relative to the model folder's top level
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Diff:
    """What differs between two manifests; each list holds relative paths, sorted."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def lines(self) -> list[str]:
        return (
            [f"added: {p}" for p in self.added]
            + [f"removed: {p}" for p in self.removed]
            + [f"changed: {p}" for p in self.changed]
        )


@dataclass
class Manifest:
    files: dict[str, FileEntry]
    ignored: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """Hex SHA-256 over the canonical JSON of the file list."""
        return hashlib.sha256(canonical_files_json(self.files)).hexdigest()

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": "sha256",
            "excluded": [f"{p}*" for p in EXCLUDED_PREFIXES] + [f"{d}/" for d in EXCLUDED_DIRS],
            "ignored": sorted(self.ignored),
            "files": [
                {"path": p, "sha256": e.sha256, "size": e.size}
                for p, e in sorted(self.files.items())
            ],
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> Manifest:
        """Validate a manifest written by `to_json`; errors name the field."""
        if not isinstance(data, dict):
            raise FormatError(f"field '{where}' is not an object")
        if data.get("algorithm") != "sha256":
            raise FormatError(
                f"field '{where}.algorithm' is {data.get('algorithm')!r}, expected 'sha256'"
            )
        ignored = data.get("ignored", [])
        if not isinstance(ignored, list) or not all(isinstance(p, str) for p in ignored):
            raise FormatError(f"field '{where}.ignored' must be a list of paths")
        raw = data.get("files")
        if not isinstance(raw, list):
            raise FormatError(f"field '{where}.files' must be a list")
        files: dict[str, FileEntry] = {}
        for i, e in enumerate(raw):
            name = f"{where}.files[{i}]"
            if not isinstance(e, dict):
                raise FormatError(f"field '{name}' is not an object")
            path, digest, size = e.get("path"), e.get("sha256"), e.get("size")
            if not isinstance(path, str) or not path or path in files:
                raise FormatError(f"field '{name}.path' is missing, empty or repeated")
            if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
                raise FormatError(f"field '{name}.sha256' is not 64 lower-case hex digits")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise FormatError(f"field '{name}.size' is not a non-negative integer")
            files[path] = FileEntry(digest, size)
        return cls(files=files, ignored=list(ignored))


def canonical_files_json(files: dict[str, FileEntry]) -> bytes:
    body = {
        "files": [{"path": p, "sha256": e.sha256, "size": e.size} for p, e in sorted(files.items())]
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_file(path: Path) -> tuple[str, int]:
    """Stream a file through SHA-256; return (hex digest, size in bytes)."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InputError(f"cannot read model file ({exc.strerror or exc})", path) from None
    return h.hexdigest(), size


def is_excluded(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    if any(part.startswith(EXCLUDED_PREFIXES) for part in parts):
        return True
    return any(rel == d or rel.startswith(d + "/") for d in EXCLUDED_DIRS)


def _walk(root: Path) -> Iterable[tuple[str, Path]]:
    """Yield (relative POSIX path, path) of every file, following links, refusing loops."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            raise InputError("symbolic link loop in the model folder", dirpath)
        seen.add(real)
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not is_excluded(prefix + d))
        for name in sorted(filenames):
            rel = prefix + name
            p = Path(dirpath) / name
            if is_excluded(rel):
                continue
            if not p.is_file():  # broken link, socket, fifo
                raise InputError("not a regular file (broken link?)", p)
            yield rel, p


def model_manifest(model_dir: str | Path, ignore: Iterable[str] = ()) -> Manifest:
    """Hash every file of `model_dir` (see the module docstring for what is excluded).

    `ignore` holds relative POSIX paths to leave out (e.g. the signed report, when it sits in
    the folder); they are recorded in the manifest.
    """
    root = Path(model_dir)
    if not root.exists():
        raise InputError("model folder not found", root)
    if not root.is_dir():
        raise InputError("not a folder", root)
    skip = set(ignore)
    files: dict[str, FileEntry] = {}
    for rel, p in _walk(root):
        if rel in skip:
            continue
        digest, size = sha256_file(p)
        files[rel] = FileEntry(digest, size)
    if not files:
        raise InputError("model folder holds no files to hash", root)
    return Manifest(files=files, ignored=sorted(skip))


def compare(old: Manifest, new: Manifest) -> Diff:
    """Files added in `new`, removed from `old`, and present in both with other contents."""
    a, b = old.files, new.files
    return Diff(
        added=sorted(set(b) - set(a)),
        removed=sorted(set(a) - set(b)),
        changed=sorted(p for p in set(a) & set(b) if a[p] != b[p]),
    )


def relative_inside(path: Path, root: Path) -> str | None:
    """`path` relative to `root` as POSIX text, or None when it lies outside `root`."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None
