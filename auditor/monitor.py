"""The PV monitor: sign matching of backbone outputs against a PV set, and purge candidates.

Torch-free. Every function has a NumPy / pure-Python reference (``*_python``) and a native one
(``*_native``, from the C++ extension ``lmsan.auditor._native``); the public names dispatch to
one of them. ``LMSAN_IMPLEMENTATION=python|native`` forces one; the default is ``native``. The
extension is part of the install: when native is wanted (explicitly or by default) and it cannot
be imported, the call raises :class:`NativeUnavailableError`; there is no silent fallback.

Sign convention (docs/how-it-works.md, "PV monitoring"): a dimension's bit is ``x >= 0`` in float32 after
the input is cast to float32. So ``0.0`` and ``-0.0`` count as positive and NaN as negative.
Packed layout: uint64 words, bit ``j % 64`` of word ``j // 64`` is dimension ``j``; the padding
bits above ``d`` in the last word are zero. A match count is the number of the ``d`` dimensions
where the signs of a row and a PV agree; a row is flagged when its best count over the PVs is at
least ``threshold_count(d, rate)`` (``ceil(rate * d)`` in exact decimal arithmetic). With one
threshold count per PV, a row is flagged when some PV reaches its own count; the reported PV is
the one with the largest margin ``count - threshold`` (with equal thresholds: the best count).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from types import ModuleType
from typing import Any

import numpy as np

ENV_VAR = "LMSAN_IMPLEMENTATION"
IMPLEMENTATIONS = ("native", "python")

__all__ = [
    "ENV_VAR",
    "NativeUnavailableError",
    "PurgeCandidate",
    "best_match",
    "best_match_native",
    "best_match_python",
    "implementation",
    "match_counts",
    "match_counts_native",
    "match_counts_python",
    "pack_signs",
    "pack_signs_native",
    "pack_signs_python",
    "purge_candidates",
    "purge_candidates_native",
    "purge_candidates_python",
    "threshold_count",
    "words_for_dim",
]


class NativeUnavailableError(ImportError):
    """The native extension was asked for (or is the default) but cannot be imported."""


_native_cache: ModuleType | None = None


def _native() -> ModuleType:
    global _native_cache
    if _native_cache is None:
        try:
            mod = importlib.import_module("." + "_native", __package__)
        except ImportError as exc:
            raise NativeUnavailableError(
                "the native monitor extension lmsan.auditor._native cannot be imported "
                f"({exc}); reinstall lmsan (pip install .) or set {ENV_VAR}=python to use the "
                "NumPy reference"
            ) from exc
        _native_cache = mod
    return _native_cache


def implementation() -> str:
    """The implementation the public functions use now: ``"native"`` or ``"python"``.

    Reads ``LMSAN_IMPLEMENTATION`` on every call. Raises ValueError for an unknown value and
    NativeUnavailableError when native is selected but the extension is missing.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower() or "native"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if value == "native":
        _native()
    return value


def words_for_dim(d: int) -> int:
    """Number of uint64 words that hold ``d`` sign bits."""
    return (int(d) + 63) // 64


def threshold_count(d: int, rate: float = 0.8) -> int:
    """The smallest match count that flags a row: ``ceil(rate * d)``.

    ``rate`` is taken as the decimal it prints as, so ``threshold_count(5, 0.8) == 4`` (plain
    float arithmetic would give ``ceil(4.000000000000001) == 5``).
    """
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    if not isinstance(rate, (int, float, np.floating)) or not 0.0 < float(rate) <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    return math.ceil(Fraction(repr(float(rate))) * int(d))


# --------------------------------------------------------------------------- input checks


def _as_float_matrix(x: Any, name: str = "x") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n, d] array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_packed(p: Any, d: int, name: str) -> np.ndarray:
    arr = np.asarray(p)
    words = words_for_dim(d)
    if arr.ndim != 2 or arr.shape[1] != words:
        raise ValueError(
            f"{name} must be a packed [rows, {words}] uint64 array for d={d}, got shape {arr.shape}"
        )
    if arr.dtype != np.uint64:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be uint64, got dtype {arr.dtype}")
        arr = arr.astype(np.uint64)
    return np.ascontiguousarray(arr)


def _check_d(d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    return int(d)


def _check_threads(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ValueError(f"threads must be a non-negative integer (0 = all cores), got {threads!r}")
    return int(threads)


# --------------------------------------------------------------------------- NumPy reference


def _last_word_mask(d: int) -> np.uint64:
    tail = d % 64
    return np.uint64((1 << tail) - 1) if tail else np.uint64(0xFFFFFFFFFFFFFFFF)


def _popcount_u64(a: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return np.bitwise_count(a).astype(np.int32)
    bytes_ = a.view(np.uint8).reshape(*a.shape, 8)
    return np.unpackbits(bytes_, axis=-1).sum(axis=-1, dtype=np.int32)


def pack_signs_python(x: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`pack_signs`."""
    xf = _as_float_matrix(x)
    n, d = xf.shape
    words = words_for_dim(d)
    bytes_ = np.zeros((n, words * 8), dtype=np.uint8)
    if d:
        bytes_[:, : (d + 7) // 8] = np.packbits(xf >= 0, axis=1, bitorder="little")
    return bytes_.view("<u8").astype(np.uint64, copy=False).reshape(n, words)


def match_counts_python(packed_rows: np.ndarray, packed_pvs: np.ndarray, d: int) -> np.ndarray:
    """NumPy reference of :func:`match_counts`."""
    d = _check_d(d)
    rows = _as_packed(packed_rows, d, "packed_rows")
    pvs = _as_packed(packed_pvs, d, "packed_pvs")
    x = rows[:, None, :] ^ pvs[None, :, :]
    x[:, :, -1] &= _last_word_mask(d)
    return (d - _popcount_u64(x).sum(axis=-1, dtype=np.int32)).astype(np.int32)


def best_match_python(
    x: np.ndarray,
    packed_pvs: np.ndarray,
    d: int,
    threshold_count: int | np.ndarray,
    *,
    block_rows: int = 65536,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference of :func:`best_match`; processes ``block_rows`` rows at a time."""
    xf, pvs, d, thr = _best_match_args(x, packed_pvs, d, threshold_count, threads)
    n, k = xf.shape[0], pvs.shape[0]
    best_idx = np.full(n, -1, dtype=np.int32)
    best_count = np.zeros(n, dtype=np.int32)
    flagged = np.zeros(n, dtype=bool)
    if k:
        t64 = thr.astype(np.int64)
        for s in range(0, n, block_rows):
            counts = match_counts_python(pack_signs_python(xf[s : s + block_rows]), pvs, d)
            margin = counts.astype(np.int64) - t64[None, :]
            idx = margin.argmax(axis=1)  # first PV with the largest margin
            rows = np.arange(len(idx))
            best_idx[s : s + block_rows] = idx
            best_count[s : s + block_rows] = counts[rows, idx]
            flagged[s : s + block_rows] = margin[rows, idx] >= 0
    return best_idx, best_count, flagged


@dataclass(slots=True)
class PurgeCandidate:
    """One sliding-window purge candidate of a record.

    The span ``sentences[sentence][start:end]`` (word indices, ``end`` exclusive) gave the
    removed words ``removed`` (distinct, in order of first appearance in the span); ``purged``
    is the record with every occurrence of those words removed from every sentence.
    """

    sentence: int
    start: int
    end: int
    removed: tuple[str, ...]
    purged: list[list[str]]


def _check_purge_args(sentences: Any, window: Any) -> list[list[str]]:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if isinstance(sentences, str) or not isinstance(sentences, (list, tuple)):
        raise ValueError("sentences must be a list of sentences, each a list of words")
    out: list[list[str]] = []
    for i, s in enumerate(sentences):
        if isinstance(s, str) or not isinstance(s, (list, tuple)):
            raise ValueError(f"sentences[{i}] must be a list of words, got {type(s).__name__}")
        for j, w in enumerate(s):
            if not isinstance(w, str):
                raise ValueError(f"sentences[{i}][{j}] must be a str, got {type(w).__name__}")
        out.append(list(s))
    return out


def purge_candidates_python(sentences: list[list[str]], window: int) -> list[PurgeCandidate]:
    """Pure-Python reference of :func:`purge_candidates`."""
    sents = _check_purge_args(sentences, window)
    w = int(window)
    seen: set[frozenset[str]] = set()
    out: list[PurgeCandidate] = []
    for si, sent in enumerate(sents):
        for start in range(0, len(sent) - w + 1):
            span = sent[start : start + w]
            key = frozenset(span)
            if key in seen:
                continue
            seen.add(key)
            removed = tuple(dict.fromkeys(span))
            purged = [[t for t in s if t not in key] for s in sents]
            out.append(PurgeCandidate(si, start, start + w, removed, purged))
    return out


# --------------------------------------------------------------------------- native


def pack_signs_native(x: np.ndarray) -> np.ndarray:
    """Native :func:`pack_signs`."""
    return np.asarray(_native().pack_signs(_as_float_matrix(x)))


def match_counts_native(packed_rows: np.ndarray, packed_pvs: np.ndarray, d: int) -> np.ndarray:
    """Native :func:`match_counts`."""
    d = _check_d(d)
    rows = _as_packed(packed_rows, d, "packed_rows")
    pvs = _as_packed(packed_pvs, d, "packed_pvs")
    return np.asarray(_native().match_counts(rows, pvs, d))


def _best_match_args(
    x: Any, packed_pvs: Any, d: Any, threshold_count: Any, threads: Any
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    d = _check_d(d)
    xf = _as_float_matrix(x)
    if xf.shape[1] != d:
        raise ValueError(f"x has {xf.shape[1]} columns but d={d}")
    pvs = _as_packed(packed_pvs, d, "packed_pvs")
    k = pvs.shape[0]
    if isinstance(threshold_count, (int, np.integer)) and not isinstance(threshold_count, bool):
        thr_arr = np.full(k, int(threshold_count), dtype=object)
    else:
        arr = np.asarray(threshold_count)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) or arr.shape != (k,):
            raise ValueError(
                f"threshold_count must be an integer or an integer array with one count per PV "
                f"({k}), got {threshold_count!r}"
            )
        thr_arr = arr.astype(object)
    _check_threads(threads)
    # Counts lie in [0, d]: clamping to [0, d + 1] changes no decision (nor the PV with the
    # largest margin, which the native kernel computes on the clamped counts) and fits the C ABI.
    thr = np.asarray([min(max(int(t), 0), d + 1) for t in thr_arr], dtype=np.int32)
    return xf, pvs, d, thr


def best_match_native(
    x: np.ndarray,
    packed_pvs: np.ndarray,
    d: int,
    threshold_count: int | np.ndarray,
    *,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Native :func:`best_match`: fused pack + match + argmax, no packed matrix for all rows."""
    xf, pvs, d, thr = _best_match_args(x, packed_pvs, d, threshold_count, threads)
    mod = _native()
    idx, cnt, flg = mod.best_match(xf, pvs, d, thr, int(threads))
    return np.asarray(idx), np.asarray(cnt), np.asarray(flg)


def purge_candidates_native(sentences: list[list[str]], window: int) -> list[PurgeCandidate]:
    """Native :func:`purge_candidates`: the C++ core on interned word ids (interning and list
    building happen in the bindings, without Python bytecode)."""
    sents = _check_purge_args(sentences, window)
    return [PurgeCandidate(*t) for t in _native().purge_record(sents, int(window))]


# --------------------------------------------------------------------------- public API


def pack_signs(x: np.ndarray) -> np.ndarray:
    """Pack ``x >= 0`` of a float32 ``[n, d]`` matrix into uint64 ``[n, ceil(d / 64)]``."""
    if implementation() == "native":
        return pack_signs_native(x)
    return pack_signs_python(x)


def match_counts(packed_rows: np.ndarray, packed_pvs: np.ndarray, d: int) -> np.ndarray:
    """int32 ``[n, k]``: dimensions (of ``d``) where packed row i and packed PV j agree."""
    if implementation() == "native":
        return match_counts_native(packed_rows, packed_pvs, d)
    return match_counts_python(packed_rows, packed_pvs, d)


def best_match(
    x: np.ndarray,
    packed_pvs: np.ndarray,
    d: int,
    threshold_count: int | np.ndarray,
    *,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best PV per row of a float32 ``[n, d]`` matrix and the monitor's decision.

    ``threshold_count``: one count for every PV, or an integer array with one count per PV.
    Returns ``(best_idx, best_count, flagged)``: int32 ``[n]`` index of the PV with the largest
    margin ``count - threshold`` (with one threshold: the highest match count; the lowest index
    on ties; ``-1`` when there are no PVs), int32 ``[n]`` its count (``0`` when there are no
    PVs), and bool ``[n]`` whether that count reaches that PV's threshold, i.e. whether any PV
    reaches its own (always False when there are no PVs). ``threads`` (native only; 0 = all cores) splits the
    rows over threads; results do not depend on it.
    """
    if implementation() == "native":
        return best_match_native(x, packed_pvs, d, threshold_count, threads=threads)
    return best_match_python(x, packed_pvs, d, threshold_count, threads=threads)


def purge_candidates(sentences: list[list[str]], window: int) -> list[PurgeCandidate]:
    """Sliding-window purge candidates of one record for one window length.

    ``sentences`` is the record (one sentence, or two for a pair), each a list of words. Every
    span of ``window`` consecutive words of each sentence (stride 1, sentences in order) gives a
    candidate: the span's distinct words, and the record with ALL occurrences of those words
    removed from every sentence. Candidates whose removed-word set equals an earlier one's are
    dropped (the first span is kept). A sentence shorter than ``window`` gives no candidate.
    """
    if implementation() == "native":
        return purge_candidates_native(sentences, window)
    return purge_candidates_python(sentences, window)
