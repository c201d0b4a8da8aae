"""The signed audit report. Torch-free.

The report file is a DSSE envelope (see `signing`) whose payload is an in-toto Statement v1::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<model folder name>", "digest": {"sha256": "<model digest>"}}],
     "predicateType": "https://lmsan.dev/audit/v1",
     "predicate": {"format": "lmsan.report", "version": 1,
                   "tool": {"name": "lmsan", "version": "0.1.0"},
                   "created": "2025-01-01T00:00:00Z",
                   "model": {"path": "...", "digest": "sha256:<hex>", "manifest": {...}},
                   ...the audit's own fields: verdict, parameters, candidates, timings,
                   device, corpus digest, "pvset": {<PV set JSON>}...}}

The model digest is the manifest digest of `manifest.model_manifest`. The file is written in one
canonical form (`dump_envelope`: sorted keys, two-space indent, ASCII, final newline) and a
verifier rejects any other byte sequence, so a change anywhere in the file, even in whitespace
outside the signed payload, fails verification.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EXIT_FOUND, FormatError, InputError, LmsanError
from .fsutil import atomic_write_bytes
from .manifest import Diff, Manifest, compare, model_manifest, relative_inside
from .pvset import FORMAT as PVSET_FORMAT
from .pvset import PVSet
from .signing import (
    DEFAULT_KEY_NAME,
    PublicKey,
    b64decode_strict,
    check_envelope,
    default_key,
    fingerprint,
    lmsan_home,
    load_private_key,
    load_public_key,
    pub_path_for,
    sign_envelope,
)

FORMAT = "lmsan.report"
VERSION = 1
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://lmsan.dev/audit/v1"
RESERVED = ("format", "version", "tool", "created")
_HEX = frozenset("0123456789abcdef")


@dataclass
class ReportInfo:
    path: Path
    fingerprint: str
    key_path: Path
    model_digest: str  # "sha256:<hex>"
    key_created: bool = False  # True when the per-user default key was created just now


@dataclass
class Verification:
    valid: bool
    signature_ok: bool
    fingerprint: str | None
    problems: list[str]
    diff: Diff | None = None  # set when a model folder was compared
    pinned: bool = False  # True when the signature was checked against --pub
    pinned_fingerprint: str | None = None  # the fingerprint of the --pub key, when one was given
    predicate: dict[str, Any] | None = None
    model_digest: str | None = None
    model_files: int | None = None  # files hashed in the model folder, when one was compared


# --- writing ----------------------------------------------------------------------------------


def _jsonable(obj: Any, where: str) -> Any:
    """A JSON-safe copy of `obj`: numpy scalars/arrays and paths converted, NaN/inf refused."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"report field '{where}' is {obj}, which JSON cannot hold")
        return float(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"report field '{where}' has a non-string key {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalar or array, without importing numpy
    if callable(tolist):
        return _jsonable(tolist(), where)
    raise ValueError(f"report field '{where}' holds a {type(obj).__name__}, not JSON data")


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def dump_envelope(env: Any) -> bytes:
    """The one byte form in which a report file is written (and accepted)."""
    return (json.dumps(env, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _write_report(path: Path, data: bytes) -> None:
    if not path.parent.is_dir():
        raise InputError("folder for the report does not exist", path.parent)
    if path.is_dir():
        raise InputError("is a folder, expected a report file path", path)
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise InputError(f"cannot write the report ({exc.strerror or exc})", path) from None


def write_signed_report(
    payload: dict[str, Any],
    model_dir: Path,
    out_path: Path,
    key_path: Path | None = None,
    *,
    ignore: tuple[str, ...] = (),
) -> ReportInfo:
    """Hash `model_dir`, wrap `payload` in a signed in-toto Statement, write it to `out_path`.

    `key_path` None uses the per-user default key (created on first use; `ReportInfo.key_created`
    says so, and the caller should print the fingerprint). An existing report is replaced
    atomically. When `out_path` lies inside `model_dir` it is left out of the manifest, as are
    the relative paths in `ignore` (e.g. a PV set file written beside it).
    """
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    if not isinstance(payload, dict):
        raise TypeError("payload must be a dict")
    clash = [k for k in RESERVED if k in payload]
    if clash:
        raise ValueError(f"payload must not set the report's own field(s): {', '.join(clash)}")
    body = _jsonable(payload, "predicate")

    if key_path is None:
        info = default_key()
        key_path, created = info.path, info.created
    else:
        key_path, created = Path(key_path), False
    key = load_private_key(key_path)

    skip = set(ignore)
    own = relative_inside(out_path, model_dir)
    if own is not None:
        skip.add(own)
    manifest = model_manifest(model_dir, ignore=skip)
    digest = f"sha256:{manifest.digest}"

    model = body.get("model", {})
    if not isinstance(model, dict):
        raise ValueError("payload field 'model' must be a dict when given")
    clash = [k for k in ("path", "digest", "manifest") if k in model]
    if clash:
        raise ValueError(f"payload must not set model.{', model.'.join(clash)}: lmsan fills them")
    pvset = body.get("pvset")
    if isinstance(pvset, dict):
        pv_model = pvset.setdefault("model", {})
        if isinstance(pv_model, dict):
            if pv_model.setdefault("digest", digest) != digest:
                raise ValueError(
                    f"payload pvset.model.digest is {pv_model['digest']}, but the model folder "
                    f"hashes to {digest}"
                )
    predicate = {
        "format": FORMAT,
        "version": VERSION,
        "tool": {"name": "lmsan", "version": __version__},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **body,
        "model": {
            **model,
            "path": str(model_dir.resolve()),
            "digest": digest,
            "manifest": manifest.to_json(),
        },
    }
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": model_dir.resolve().name or "model", "digest": {"sha256": manifest.digest}}
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
    env = sign_envelope(_canonical_json(statement), key)
    _write_report(out_path, dump_envelope(env))
    return ReportInfo(
        path=out_path,
        fingerprint=fingerprint(key.public_key()),
        key_path=key_path,
        model_digest=digest,
        key_created=created,
    )


# --- reading ----------------------------------------------------------------------------------


def read_report_bytes(path: Path) -> bytes:
    """A report file's bytes; a missing, non-file or unreadable path is an InputError naming it."""
    if not path.exists():
        raise InputError("report not found", path)
    if not path.is_file():
        raise InputError("not a file", path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the report ({exc.strerror or exc})", path) from None


def _parse(raw: bytes, path: Path | None) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"not a report: not UTF-8 text ({exc.reason} at byte {exc.start})", path
        ) from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"not a report: not valid JSON ({exc})", path) from None


def _load(path: Path) -> tuple[bytes, Any]:
    raw = read_report_bytes(path)
    return raw, _parse(raw, path)


def _digest_hex(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise FormatError(f"field '{where}' is not 64 lower-case hex digits")
    return value


def parse_statement(payload: bytes) -> dict[str, Any]:
    """Validate the in-toto Statement and the lmsan predicate; return the predicate.

    Raises FormatError naming the first malformed field.
    """
    try:
        st = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"field 'payload' does not hold JSON ({exc})") from None
    if not isinstance(st, dict):
        raise FormatError("field 'payload' is not a JSON object")
    if st.get("_type") != STATEMENT_TYPE:
        raise FormatError(f"field '_type' is {st.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if st.get("predicateType") != PREDICATE_TYPE:
        raise FormatError(
            f"field 'predicateType' is {st.get('predicateType')!r}, expected {PREDICATE_TYPE!r}"
        )
    subject = st.get("subject")
    if not isinstance(subject, list) or len(subject) != 1 or not isinstance(subject[0], dict):
        raise FormatError("field 'subject' must be a list of one object")
    if not isinstance(subject[0].get("name"), str):
        raise FormatError("field 'subject[0].name' is missing or not a string")
    sdig = subject[0].get("digest")
    if not isinstance(sdig, dict):
        raise FormatError("field 'subject[0].digest' is not an object")
    subject_hex = _digest_hex(sdig.get("sha256"), "subject[0].digest.sha256")

    pred = st.get("predicate")
    if not isinstance(pred, dict):
        raise FormatError("field 'predicate' is missing or not an object")
    if pred.get("format") != FORMAT:
        raise FormatError(
            f"field 'predicate.format' is {pred.get('format')!r}, expected {FORMAT!r}"
        )
    if pred.get("version") != VERSION or isinstance(pred.get("version"), bool):
        raise FormatError(
            f"field 'predicate.version' is {pred.get('version')!r}, this lmsan reads {VERSION}"
        )
    tool = pred.get("tool")
    if not isinstance(tool, dict) or not all(
        isinstance(tool.get(k), str) for k in ("name", "version")
    ):
        raise FormatError("field 'predicate.tool' must hold strings 'name' and 'version'")
    if not isinstance(pred.get("created"), str):
        raise FormatError("field 'predicate.created' is missing or not a string")
    model = pred.get("model")
    if not isinstance(model, dict):
        raise FormatError("field 'predicate.model' is missing or not an object")
    if not isinstance(model.get("path"), str):
        raise FormatError("field 'predicate.model.path' is missing or not a string")
    mdig = model.get("digest")
    if not isinstance(mdig, str) or not mdig.startswith("sha256:"):
        raise FormatError("field 'predicate.model.digest' must be 'sha256:<hex>'")
    model_hex = _digest_hex(mdig[len("sha256:") :], "predicate.model.digest")
    manifest = Manifest.from_json(model.get("manifest"), "predicate.model.manifest")
    if manifest.digest != model_hex:
        raise FormatError(
            "field 'predicate.model.digest' does not match the digest of 'predicate.model.manifest'"
        )
    if subject_hex != model_hex:
        raise FormatError("field 'subject[0].digest.sha256' differs from 'predicate.model.digest'")
    return pred


def report_manifest(predicate: dict[str, Any]) -> Manifest:
    return Manifest.from_json(predicate["model"]["manifest"], "predicate.model.manifest")


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a report and validate its structure and format version; return the predicate.

    This does not check the signature (use `verify_report`). Raises InputError when the file is
    missing, FormatError (naming the field) when it is not a well-formed lmsan report.
    """
    p = Path(path)
    _, env = _load(p)
    if not isinstance(env, dict) or not isinstance(env.get("payload"), str):
        raise FormatError("not a signed lmsan report: field 'payload' is missing", p)
    try:
        return parse_statement(b64decode_strict(env["payload"]))
    except FormatError as exc:
        raise FormatError(str(exc), p) from None


def extract_pvset(data: Any, path: str | Path | None = None) -> dict[str, Any]:
    """The PV set embedded in a parsed signed report (the envelope's JSON).

    The envelope's signature must verify with its embedded key (integrity; use `lmsan verify
    --pub` to check who signed it).
    """
    if not isinstance(data, dict) or "payload" not in data or "signatures" not in data:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise FormatError(
            f"neither a PV set (field 'format' is {fmt!r}, expected 'lmsan.pvset') "
            "nor a signed lmsan report",
            path,
        )
    check = check_envelope(data)
    if not check.signature_ok or check.payload is None:
        why = check.problems[0] if check.problems else "no valid signature"
        raise FormatError(f"signed report does not verify ({why}); run `lmsan verify`", path)
    try:
        pred = parse_statement(check.payload)
    except FormatError as exc:
        raise FormatError(str(exc), path) from None
    pvset = pred.get("pvset")
    if not isinstance(pvset, dict):
        raise FormatError("the report holds no PV set (field 'predicate.pvset')", path)
    return pvset


def _pvset_json(path: str | Path) -> tuple[Path, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError("PV set file not found", p)
    try:
        return p, json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", p) from None


def load_pvset(path: str | Path) -> PVSet:
    """Read a PV set file, or the PV set embedded in a signed audit report (whose signature must
    verify with its embedded key; see `extract_pvset`)."""
    p, data = _pvset_json(path)
    if isinstance(data, dict) and data.get("format") != PVSET_FORMAT:
        data = extract_pvset(data, p)
    return PVSet.from_json(data, p)


ENVELOPE_FIELDS = ("payloadType", "payload", "signatures")


def check_is_envelope(data: Any, path: Path | None = None) -> None:
    """Raise FormatError unless parsed JSON `data` is at least shaped like a DSSE envelope (an
    object with one of its fields): a file that is no report at all is an input error (exit 2),
    while a damaged envelope is a report that fails verification (exit 1)."""
    if isinstance(data, dict) and any(k in data for k in ENVELOPE_FIELDS):
        return
    if isinstance(data, dict) and isinstance(data.get("format"), str):
        what = f"it is a {data['format']!r} file"
    elif isinstance(data, dict):
        what = "it has none of the fields 'payloadType', 'payload', 'signatures'"
    else:
        what = "its top level is not a JSON object"
    raise FormatError(f"not an lmsan report: not a DSSE envelope ({what})", path)


class ReportNotTrusted(LmsanError):
    """A signed report that fails verification or whose signer cannot be checked (exit 1)."""

    exit_code = EXIT_FOUND


@dataclass
class PVSetSource:
    """A PV set and what is known of where it comes from (`load_trusted_pvset`)."""

    pvset: PVSet
    signed: bool  # read from a signed audit report
    signer: str | None = None  # fingerprint of the key whose signature verified
    trusted_key: str = ""  # "--pub", "the per-user key", or "" (signer not checked)
    model_digest: str | None = None  # "sha256:<hex>" of the audited model, when recorded
    ignored: list[str] = field(default_factory=list)  # files the audit's manifest left out
    warnings: list[str] = field(default_factory=list)


def user_public_key() -> Path | None:
    """The per-user key's public half (or, without a `.pub`, the private key), if it exists."""
    private = lmsan_home() / DEFAULT_KEY_NAME
    pub = pub_path_for(private)
    return pub if pub.is_file() else private if private.is_file() else None


def load_trusted_pvset(
    path: str | Path, pub: str | Path | None = None, *, allow_unverified: bool = False
) -> PVSetSource:
    """Read a PV set file, or the PV set of a signed audit report checked against a trusted key.

    A signed report must verify with `pub` when given, else with the per-user key when there is
    one (`user_public_key`); a report signed by another key, or with no key to check it against,
    is refused (ReportNotTrusted, exit 1) unless `allow_unverified`, which accepts it with a
    warning. Its signature must verify with its embedded key in every case (the file is intact).
    A plain PV set file carries no signature: refused with `pub` (InputError), else read as is.
    """
    p, data = _pvset_json(path)
    if not isinstance(data, dict) or data.get("format") == PVSET_FORMAT:
        if pub is not None:
            raise InputError(
                "a plain PV set file carries no signature to check against --pub; give the "
                "signed report of the audit instead",
                p,
            )
        pvs = PVSet.from_json(data, p)
        digest = pvs.model.get("digest")
        return PVSetSource(pvs, signed=False, model_digest=digest if isinstance(digest, str) else None)
    pvset_json = extract_pvset(data, p)  # integrity: verifies with the embedded key
    key_path = Path(pub) if pub is not None else user_public_key()
    src = PVSetSource(PVSet.from_json(pvset_json, p), signed=True)
    embedded = check_envelope(data)
    src.signer = embedded.fingerprint
    if key_path is None:
        why = "no --pub key is given and there is no per-user key to check its signer against"
        if not allow_unverified:
            raise ReportNotTrusted(
                f"cannot verify who signed the report: {why}; pass --pub KEY (the signer's "
                "public key) or --allow-unverified",
                p,
            )
        src.warnings.append(
            f"{p}: the report's signer {src.signer} is not verified ({why}); used because of "
            "--allow-unverified"
        )
    else:
        what = "--pub" if pub is not None else "the per-user key"
        key = load_public_key(key_path)
        if not check_envelope(data, key).signature_ok:
            msg = (
                f"the report is signed by key {src.signer}, not by {what} ({key_path}, "
                f"{fingerprint(key)})"
            )
            if pub is not None or not allow_unverified:
                hint = "" if pub is not None else "; pass --pub KEY or --allow-unverified"
                raise ReportNotTrusted(msg + hint, p)
            src.warnings.append(f"{p}: {msg}; used because of --allow-unverified")
        else:
            src.trusted_key = what
    pred = parse_statement(b64decode_strict(data["payload"]))
    src.model_digest = pred["model"]["digest"]
    src.ignored = list(report_manifest(pred).ignored)
    return src


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def verify_report(
    path: str | Path,
    model_dir: str | Path | None = None,
    pub: str | Path | PublicKey | None = None,
) -> Verification:
    """Check a report's signature, structure and, with `model_dir`, that the folder still matches.

    `pub` pins the signer (a `.pub` PEM file or a key object); without it the key embedded in the
    report is used, which proves integrity but not who signed. Raises InputError/FormatError only
    when an input cannot be read at all (missing file, not JSON, missing model folder, bad key
    file, a JSON file that is no DSSE envelope); everything wrong with a readable report is
    listed in `Verification.problems`.
    """
    p = Path(path)
    return verify_report_bytes(read_report_bytes(p), p, model_dir=model_dir, pub=pub)


def verify_report_bytes(
    raw: bytes,
    path: Path | None = None,
    model_dir: str | Path | None = None,
    pub: str | Path | PublicKey | None = None,
) -> Verification:
    """`verify_report` on a report's bytes; `path` (where they came from) names it in errors
    and, when it lies inside `model_dir`, is left out of the folder comparison."""
    env = _parse(raw, path)
    check_is_envelope(env, path)
    key = load_public_key(pub) if isinstance(pub, (str, os.PathLike)) else pub

    problems: list[str] = []
    canonical = dump_envelope(env)
    if canonical != raw:
        at = _first_difference(canonical, raw)
        problems.append(
            f"the file differs from its canonical form at byte {at}: it was re-formatted or "
            "altered outside the signed payload"
        )
    check = check_envelope(env, key)
    problems += check.problems

    predicate: dict[str, Any] | None = None
    if check.payload is not None:
        try:
            predicate = parse_statement(check.payload)
        except FormatError as exc:
            problems.append(str(exc))
    if predicate is not None and "pvset" in predicate:
        try:
            pvs = PVSet.from_json(predicate["pvset"])
        except FormatError as exc:
            problems.append(f"field 'predicate.pvset': {exc}")
        else:
            pv_digest = pvs.model.get("digest")
            if pv_digest is not None and pv_digest != predicate["model"]["digest"]:
                problems.append(
                    "field 'predicate.pvset.model.digest' differs from 'predicate.model.digest'"
                )

    diff: Diff | None = None
    n_files: int | None = None
    if model_dir is not None:
        root = Path(model_dir)
        if not root.is_dir():
            raise InputError("model folder not found", root)
        if predicate is None:
            problems.append("cannot compare the model folder: the report's manifest is unreadable")
        else:
            old = report_manifest(predicate)
            skip = set(old.ignored)
            own = relative_inside(path, root) if path is not None else None
            if own is not None:
                skip.add(own)
            new = model_manifest(root, ignore=skip)
            n_files = len(new.files)
            diff = compare(old, new)
            problems += [f"model file {line}" for line in diff.lines()]

    return Verification(
        valid=check.signature_ok and not problems,
        signature_ok=check.signature_ok,
        fingerprint=check.fingerprint,
        problems=problems,
        diff=diff,
        pinned=check.pinned,
        pinned_fingerprint=fingerprint(key) if key is not None else None,
        predicate=predicate,
        model_digest=predicate["model"]["digest"] if predicate else None,
        model_files=n_files,
    )


__all__ = [
    "FORMAT",
    "VERSION",
    "ReportInfo",
    "Verification",
    "write_signed_report",
    "read_report",
    "extract_pvset",
    "load_pvset",
    "load_trusted_pvset",
    "PVSetSource",
    "ReportNotTrusted",
    "user_public_key",
    "verify_report",
    "verify_report_bytes",
    "check_is_envelope",
    "dump_envelope",
]
