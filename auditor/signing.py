"""Signing keys and DSSE envelopes. Torch-free.

Keys are Ed25519 (default) or ECDSA P-256, stored as unencrypted PKCS#8 PEM with mode 0600 and a
`<key>.pub` SubjectPublicKeyInfo PEM beside it. A key's fingerprint is the hex SHA-256 of its DER
SubjectPublicKeyInfo; it is the DSSE `keyid`.

The envelope follows the DSSE spec (https://github.com/secure-systems-lab/dsse): the signature is
over PAE(payloadType, payload) = "DSSEv1 <len(type)> <type> <len(body)> <body>". Each signature
entry also carries the signer's public key as PEM (`publicKey`), so a report can be checked for
integrity without a key file; pinning the key (`--pub`) is what proves who signed it.
ECDSA signatures are DER-encoded over SHA-256, as sigstore and in-toto do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .errors import FormatError, InputError
from .fsutil import atomic_write_bytes, atomic_write_text

KeyKind = Literal["ed25519", "ecdsa-p256"]
KINDS: tuple[str, ...] = ("ed25519", "ecdsa-p256")
PAYLOAD_TYPE = "application/vnd.in-toto+json"
DEFAULT_KEY_NAME = "signing_key.pem"

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass
class KeyInfo:
    path: Path
    pub_path: Path
    kind: str
    fingerprint: str
    created: bool = False


def pub_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def key_kind(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    return "ecdsa-p256"


def public_pem(pub: PublicKey) -> str:
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(pub: PublicKey) -> str:
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _check_supported(key: Any, path: Path | None, what: str) -> None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, ec.SECP256R1):
            return
        raise InputError(f"{what} uses curve {key.curve.name}; lmsan signs with P-256", path)
    raise InputError(f"{what} is a {type(key).__name__}; lmsan uses Ed25519 or ECDSA P-256", path)


def generate_key(path: str | Path, kind: str = "ed25519", force: bool = False) -> KeyInfo:
    """Create a key pair: `path` (private PEM, 0600) and `path`.pub. Refuses to overwrite."""
    p = Path(path)
    if kind not in KINDS:
        raise InputError(f"unknown key kind {kind!r}; choose one of {', '.join(KINDS)}")
    pub_p = pub_path_for(p)
    if not force:
        for q in (p, pub_p):
            if q.exists() or q.is_symlink():
                raise InputError("already exists; pass --force to overwrite it", q)
    if p.is_dir():
        raise InputError("is a folder, expected a key file path", p)
    if not p.parent.is_dir():
        raise InputError("folder for the key does not exist", p.parent)
    key: PrivateKey = (
        ed25519.Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        atomic_write_bytes(p, pem, mode=0o600)  # never briefly readable by others
        atomic_write_text(pub_p, public_pem(key.public_key()))
    except OSError as exc:
        raise InputError(f"cannot write key ({exc.strerror or exc})", p) from None
    return KeyInfo(p, pub_p, kind, fingerprint(key.public_key()), created=True)


def lmsan_home() -> Path:
    """`$LMSAN_HOME`, else `$XDG_CONFIG_HOME/lmsan`, else `~/.config/lmsan`."""
    if env := os.environ.get("LMSAN_HOME"):
        return Path(env)
    if xdg := os.environ.get("XDG_CONFIG_HOME"):
        return Path(xdg) / "lmsan"
    return Path.home() / ".config" / "lmsan"


def user_key_path() -> Path:
    """Where the per-user key lives (`lmsan_home()/signing_key.pem`); its folder is created
    (mode 0700) when missing."""
    home = lmsan_home()
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InputError(f"cannot create the key folder ({exc.strerror or exc})") from None
    return home / DEFAULT_KEY_NAME


def default_key() -> KeyInfo:
    """The per-user signing key, created (Ed25519, 0600) the first time it is needed."""
    home = lmsan_home()
    path = home / DEFAULT_KEY_NAME
    if path.exists():
        key = load_private_key(path)
        return KeyInfo(path, pub_path_for(path), key_kind(key), fingerprint(key.public_key()))
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InputError(
            f"cannot create the lmsan key folder ({exc.strerror or exc})", home
        ) from None
    return generate_key(path, "ed25519")


def load_private_key(path: str | Path) -> PrivateKey:
    """Read a PEM private key; refuse one that others can read (as ssh does)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("signing key not found", p)
    mode = stat.S_IMODE(p.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise InputError(
            f"private key is accessible by others (mode {mode:04o}); run: chmod 600 {p}", p
        )
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except TypeError:
        raise InputError("private key is encrypted; lmsan needs an unencrypted key", p) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(f"not a PEM private key ({exc})", p) from None
    _check_supported(key, p, "private key")
    assert isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey))
    return key


def load_public_key(path: str | Path) -> PublicKey:
    """Read a PEM public key (a `.pub` file); a private key file is accepted too."""
    p = Path(path)
    if not p.is_file():
        raise InputError("public key not found", p)
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_private_key(p).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputError(f"not a PEM public key ({exc})", p) from None
    _check_supported(key, p, "public key")
    assert isinstance(key, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey))
    return key


def parse_public_pem(text: str) -> PublicKey:
    """Parse an embedded public key; it must be in canonical PEM form. Raises FormatError."""
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise FormatError(f"not a PEM public key ({exc})") from None
    if not isinstance(key, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey)) or (
        isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1)
    ):
        raise FormatError("not an Ed25519 or ECDSA P-256 public key")
    if public_pem(key) != text:
        raise FormatError("PEM is not in canonical form (altered?)")
    return key


# --- DSSE -------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def b64decode_strict(text: str) -> bytes:
    """Standard base64 with padding; rejects any text that is not the canonical encoding."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise FormatError(f"not valid base64 ({exc})") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise FormatError("not canonical base64 (altered?)")
    return raw


def sign_raw(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify_raw(pub: PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(sig, message)
        else:
            pub.verify(sig, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def sign_envelope(
    payload: bytes, key: PrivateKey, payload_type: str = PAYLOAD_TYPE
) -> dict[str, Any]:
    pub = key.public_key()
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {
                "keyid": fingerprint(pub),
                "sig": base64.b64encode(sign_raw(key, pae(payload_type, payload))).decode("ascii"),
                "publicKey": public_pem(pub),
            }
        ],
    }


@dataclass
class EnvelopeCheck:
    """Result of checking a DSSE envelope's signatures."""

    signature_ok: bool
    fingerprint: str | None  # the key that verified (or the first signer's claimed key)
    pinned: bool  # True when checked against a key the caller gave
    problems: list[str]
    payload: bytes | None  # decoded payload when it could be decoded


def check_envelope(env: Any, pub: PublicKey | None = None) -> EnvelopeCheck:
    """Validate the envelope's structure and verify its signatures.

    Every signature entry must be well formed, its `keyid` must be the fingerprint of its
    embedded `publicKey`, and its signature must verify with that key. With `pub`, one of the
    entries must also come from that key. Never raises on malformed input: it reports problems.
    """
    problems: list[str] = []
    pinned_fp = fingerprint(pub) if pub is not None else None
    if not isinstance(env, dict):
        return EnvelopeCheck(False, None, pub is not None, ["top level is not a JSON object"], None)
    extra = sorted(set(env) - {"payloadType", "payload", "signatures"})
    if extra:
        problems.append(f"unknown envelope field(s): {', '.join(map(repr, extra))}")
    ptype = env.get("payloadType")
    if not isinstance(ptype, str):
        problems.append("field 'payloadType' is missing or not a string")
    elif ptype != PAYLOAD_TYPE:
        problems.append(f"field 'payloadType' is {ptype!r}, expected {PAYLOAD_TYPE!r}")
    payload: bytes | None = None
    raw_payload = env.get("payload")
    if not isinstance(raw_payload, str):
        problems.append("field 'payload' is missing or not a string")
    else:
        try:
            payload = b64decode_strict(raw_payload)
        except FormatError as exc:
            problems.append(f"field 'payload': {exc}")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        problems.append("field 'signatures' is missing or empty")
        sigs = []
    verified: list[str] = []
    first_fp: str | None = None
    for i, s in enumerate(sigs):
        where = f"signatures[{i}]"
        if not isinstance(s, dict):
            problems.append(f"field '{where}' is not an object")
            continue
        extra = sorted(set(s) - {"keyid", "sig", "publicKey"})
        if extra:
            problems.append(f"unknown field(s) in '{where}': {', '.join(map(repr, extra))}")
        keyid, sig_text, pem = s.get("keyid"), s.get("sig"), s.get("publicKey")
        if not isinstance(keyid, str):
            problems.append(f"field '{where}.keyid' is missing or not a string")
            continue
        first_fp = first_fp or keyid
        if not isinstance(sig_text, str):
            problems.append(f"field '{where}.sig' is missing or not a string")
            continue
        try:
            sig = b64decode_strict(sig_text)
        except FormatError as exc:
            problems.append(f"field '{where}.sig': {exc}")
            continue
        if not isinstance(pem, str):
            problems.append(f"field '{where}.publicKey' is missing or not a string")
            continue
        try:
            embedded = parse_public_pem(pem)
        except FormatError as exc:
            problems.append(f"field '{where}.publicKey': {exc}")
            continue
        if fingerprint(embedded) != keyid:
            problems.append(
                f"field '{where}.keyid' ({keyid[:16]}...) is not the fingerprint of "
                f"'{where}.publicKey' ({fingerprint(embedded)[:16]}...)"
            )
            continue
        if payload is None or not isinstance(ptype, str):
            continue  # already reported; nothing to verify against
        if not verify_raw(embedded, sig, pae(ptype, payload)):
            problems.append(
                f"bad signature: '{where}.sig' does not verify with key {keyid} "
                "(the payload or the signature was altered)"
            )
            continue
        verified.append(keyid)
    if pinned_fp is not None and verified and pinned_fp not in verified:
        problems.append(f"signed by key {verified[0]}, not by the pinned key {pinned_fp} (--pub)")
    ok = not problems and bool(verified) and (pinned_fp is None or pinned_fp in verified)
    fp = pinned_fp if (pinned_fp is not None and ok) else (verified[0] if verified else first_fp)
    return EnvelopeCheck(ok, fp, pub is not None, problems, payload)
