"""The bundle format: the folder ``lmsan export`` writes and ``lmsan scan`` reads.

Torch-free (NumPy, ``tokenizers``). A bundle is a folder::

    manifest.json    {"format": "lmsan.bundle", "version": 1, ..., "files": {name: "sha256:<hex>"}}
    model.onnx       the backbone: inputs ``inputs_embeds`` float32 [batch, seq, emb] and
                     ``attention_mask`` int64 [batch, seq]; outputs ``last_hidden_state``
                     (+ ``pooler_output`` when a PV targets ``pooler``)
    embeddings.npy   the word-embedding table, float32 [vocab, emb]
    tokenizer.json   the fast tokenizer (special-token ids are in the manifest)
    pvset.json       the PV set (``lmsan.pvset`` format)
    prompt.npy       optional soft prompt float32 [l, emb] (a P-tuning task prompt)

Every writer builds the manifest with :func:`write_manifest` (format header, SHA-256 of every
file) and every reader goes through :meth:`Bundle.load` (header, schema, digests, shapes). How a
bundle's text becomes the backbone's input is :mod:`lmsan.auditor.encoding`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, InputError, check_header
from .fsutil import atomic_write_json
from .pvset import TARGETS, PVSet

FORMAT = "lmsan.bundle"
VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
EMBEDDINGS_FILE = "embeddings.npy"
TOKENIZER_FILE = "tokenizer.json"
PVSET_FILE = "pvset.json"
PROMPT_FILE = "prompt.npy"
REQUIRED_FILES = (ONNX_FILE, EMBEDDINGS_FILE, TOKENIZER_FILE, PVSET_FILE)
MASK_TEMPLATE = "{sentence} {mask_token}"


def sha256_of(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write_manifest(root: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Write ``root/manifest.json``: the format header, ``body``, and the digest of every other
    file in ``root``. Returns the manifest written."""
    files = {
        p.name: sha256_of(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "version": VERSION, **body, "files": files}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def is_bundle_or_empty(path: Path) -> bool:
    """Whether ``path`` may be replaced by a bundle: a folder that is empty or holds a manifest."""
    return path.is_dir() and (not any(path.iterdir()) or (path / MANIFEST).is_file())


@dataclass(frozen=True)
class SpecialTokens:
    cls_id: int | None
    sep_id: int | None
    mask_id: int | None
    pad_id: int
    mask_token: str | None

    @classmethod
    def from_json(cls, data: Any, where: Path) -> SpecialTokens:
        if not isinstance(data, dict):
            raise FormatError("field 'special_tokens' must be an object", where)

        def opt_int(key: str) -> int | None:
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise FormatError(f"field 'special_tokens.{key}' must be a token id or null", where)
            return v

        pad = opt_int("pad_id")
        if pad is None:
            raise FormatError("field 'special_tokens.pad_id' is required", where)
        mt = data.get("mask_token")
        if mt is not None and not isinstance(mt, str):
            raise FormatError("field 'special_tokens.mask_token' must be a string", where)
        return cls(opt_int("cls_id"), opt_int("sep_id"), opt_int("mask_id"), pad, mt)


@dataclass
class BundleManifest:
    """The parsed, validated ``manifest.json`` of a bundle."""

    files: dict[str, str]
    targets: list[str]
    hidden_size: int
    embedding_size: int
    max_positions: int
    special_tokens: SpecialTokens
    mask_template: str | None
    prompt_length: int
    outputs: list[str]
    model: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: Path) -> BundleManifest:
        def bad(msg: str) -> FormatError:
            return FormatError(f"invalid bundle manifest: {msg}", where)

        check_header(data, FORMAT, VERSION, bad)
        files = data.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:")
            for k, v in files.items()
        ):
            raise bad("field 'files' must map file names to 'sha256:<hex>' digests")
        for req in REQUIRED_FILES:
            if req not in files:
                raise bad(f"field 'files' does not list {req}")
        for name in files:
            if "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST:
                raise bad(f"field 'files' lists {name!r}: only plain file names of the bundle")
        targets = data.get("targets")
        if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
            raise bad(f"field 'targets' must be a non-empty list of {TARGETS}")

        def pos_int(key: str, allow_zero: bool = False) -> int:
            v = data.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise bad(
                    f"field {key!r} must be a {'non-negative' if allow_zero else 'positive'} integer"
                )
            return v

        outputs = data.get("outputs")
        if not isinstance(outputs, list) or "last_hidden_state" not in outputs:
            raise bad("field 'outputs' must list 'last_hidden_state'")
        if "pooler" in targets and "pooler_output" not in outputs:
            raise bad("a PV targets 'pooler' but field 'outputs' has no 'pooler_output'")
        prompt_length = pos_int("prompt_length", allow_zero=True)
        if prompt_length and PROMPT_FILE not in files:
            raise bad(f"field 'prompt_length' is {prompt_length} but 'files' has no {PROMPT_FILE}")
        tmpl = data.get("mask_template")
        special = SpecialTokens.from_json(data.get("special_tokens"), where)
        if "mask" in targets:
            if not isinstance(tmpl, str) or "{sentence}" not in tmpl:
                raise bad("target 'mask' needs field 'mask_template' with '{sentence}'")
            if special.mask_id is None or special.mask_token is None:
                raise bad("target 'mask' needs 'special_tokens.mask_id' and 'mask_token'")
        return cls(
            files=dict(files),
            targets=list(targets),
            hidden_size=pos_int("hidden_size"),
            embedding_size=pos_int("embedding_size"),
            max_positions=pos_int("max_positions"),
            special_tokens=special,
            mask_template=tmpl if isinstance(tmpl, str) else None,
            prompt_length=prompt_length,
            outputs=[str(o) for o in outputs],
            model=dict(data.get("model") or {}),
            validation=dict(data.get("validation") or {}),
            raw=data,
        )


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Check every listed file's SHA-256; raise FormatError naming the first one that differs."""
    for name, digest in sorted(files.items()):
        p = root / name
        if not p.is_file():
            raise FormatError(f"bundle file {name} listed in manifest.json is missing", root)
        got = sha256_of(p)
        if got != digest:
            raise FormatError(
                f"bundle file {name} does not match manifest.json (sha256 {got[7:19]}... "
                f"!= {digest[7:19]}...): the bundle was modified or damaged",
                root,
            )


def read_manifest(root: Path) -> BundleManifest:
    """The validated manifest of the bundle folder ``root`` (files not checked)."""
    if not root.is_dir():
        raise InputError("bundle folder not found", root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise FormatError("no manifest.json: not an lmsan bundle", root)
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"manifest is not valid JSON ({exc})", mpath) from None
    return BundleManifest.from_json(data, mpath)


def _load_pvset(root: Path, man: BundleManifest) -> PVSet:
    pvset = PVSet.load(root / PVSET_FILE)
    if pvset.hidden_size != man.hidden_size:
        raise FormatError(
            f"pvset.json hidden_size {pvset.hidden_size} != manifest hidden_size {man.hidden_size}",
            root,
        )
    if sorted(pvset.targets()) != sorted(man.targets):
        raise FormatError(
            f"pvset.json targets {pvset.targets()} != manifest targets {man.targets}", root
        )
    return pvset


def _load_arrays(root: Path, man: BundleManifest) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        emb = np.load(root / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise FormatError(f"cannot read {EMBEDDINGS_FILE} ({exc})", root) from None
    if emb.ndim != 2 or emb.dtype != np.float32 or emb.shape[1] != man.embedding_size:
        raise FormatError(
            f"{EMBEDDINGS_FILE} must be float32 [vocab, {man.embedding_size}], got "
            f"{emb.dtype} {list(emb.shape)}",
            root,
        )
    st = man.special_tokens
    for key in ("cls_id", "sep_id", "mask_id", "pad_id"):
        v = getattr(st, key)
        if v is not None and v >= emb.shape[0]:
            raise FormatError(f"special_tokens.{key} {v} is outside the vocabulary", root)
    if not man.prompt_length:
        return emb, None
    prompt = np.load(root / PROMPT_FILE, allow_pickle=False)
    if prompt.shape != (man.prompt_length, man.embedding_size) or prompt.dtype != np.float32:
        raise FormatError(
            f"{PROMPT_FILE} must be float32 [{man.prompt_length}, {man.embedding_size}]", root
        )
    return emb, prompt


def _load_tokenizer(root: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(root / TOKENIZER_FILE))
    except Exception as exc:  # noqa: BLE001 - any parse error is a format error
        raise FormatError(f"cannot read {TOKENIZER_FILE} ({exc})", root) from None
    tok.no_truncation()
    tok.no_padding()
    return tok


class Bundle:
    """A verified bundle on disk. Build with :meth:`load`."""

    def __init__(
        self,
        path: Path,
        manifest: BundleManifest,
        pvset: PVSet,
        embeddings: np.ndarray,
        prompt: np.ndarray | None,
        tokenizer: Any,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.pvset = pvset
        self.embeddings = embeddings
        self.prompt = prompt
        self.tokenizer = tokenizer

    @property
    def digest(self) -> str:
        """The bundle's identity: the digest of its manifest (which lists every file's)."""
        return sha256_of(self.path / MANIFEST)

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Read and check the bundle at ``path`` (``verify``: every file's digest too)."""
        root = Path(path)
        man = read_manifest(root)
        if verify:
            verify_files(root, man.files)
        pvset = _load_pvset(root, man)
        emb, prompt = _load_arrays(root, man)
        return cls(root, man, pvset, emb, prompt, _load_tokenizer(root))
