"""The match thresholds in force for one deployment (:class:`Thresholds`) and the file
``lmsan threshold --out`` writes them to (format ``lmsan.threshold``).

Kept apart from :mod:`lmsan.auditor.threshold` (how ``lmsan threshold`` chooses them): the
screener applies thresholds, and the choosing takes a screener, so neither imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import monitor as mon
from .errors import FormatError, InputError, UsageError, check_header

FORMAT = "lmsan.threshold"
VERSION = 1


def check_match_threshold(value: float | None) -> float | None:
    """Validate a per-deployment T_match (``--t-match``): None, or a number in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise UsageError(f"--t-match {value!r}: expected a number in (0, 1]")
    t = float(value)
    if not 0.0 < t <= 1.0:  # also refuses NaN
        raise UsageError(f"--t-match {value!r}: the match threshold must be in (0, 1]")
    return t


def check_per_pv_thresholds(value: Any, where: str = "per-PV thresholds") -> dict[int, float]:
    """Validate per-PV match thresholds: a mapping PV id -> T_match in (0, 1] (JSON keys may be
    the ids as strings)."""
    if not isinstance(value, Mapping) or not value:
        raise UsageError(f"{where}: expected a non-empty mapping of PV id to a rate in (0, 1]")
    out: dict[int, float] = {}
    for k, v in value.items():
        try:
            pid = int(k)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: PV id {k!r} is not an integer") from None
        t = check_match_threshold(v)
        if t is None:
            raise UsageError(f"{where}: PV {pid} has no threshold")
        out[pid] = t
    return out


@dataclass(frozen=True)
class Thresholds:
    """The match thresholds of one deployment, validated on construction.

    ``match``: T_match for every PV (None: the PV set's ``match_threshold``); ``per_pv``: PV id ->
    T_match (``lmsan threshold --per-pv``; PVs not named keep ``match``); ``bundle_digest``: the
    bundle they were chosen for (a thresholds file names it: another bundle is refused). A record
    is flagged when some PV reaches its own threshold. Unpacks as the triple
    ``(match, per_pv, bundle_digest)``.
    """

    match: float | None = None
    per_pv: dict[int, float] | None = None
    bundle_digest: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "match", check_match_threshold(self.match))
        if self.per_pv is not None:
            object.__setattr__(self, "per_pv", check_per_pv_thresholds(self.per_pv))

    def __iter__(self) -> Iterator[Any]:
        return iter((self.match, self.per_pv, self.bundle_digest))

    @property
    def source(self) -> str:
        """Where the thresholds in force come from: ``pvset``, ``option`` or ``per-pv``."""
        if self.per_pv is not None:
            return "per-pv"
        return "pvset" if self.match is None else "option"

    def rate(self, pvset_threshold: float) -> float:
        """The single T_match in force (the PVs without a per-PV threshold use it)."""
        return float(pvset_threshold) if self.match is None else self.match

    def check_pv_ids(self, known: set[int]) -> None:
        if self.per_pv is not None and not set(self.per_pv) <= known:
            raise UsageError(
                f"per-PV thresholds name PV ids {sorted(set(self.per_pv) - known)} that the "
                f"bundle's PV set does not have (its ids: {sorted(known)})"
            )

    def counts(self, d: int, pv_ids: Sequence[int], pvset_threshold: float) -> np.ndarray:
        """The match count that flags a record, for each PV of ``pv_ids``."""
        one = mon.threshold_count(d, self.rate(pvset_threshold))
        per = self.per_pv or {}
        return np.asarray(
            [mon.threshold_count(d, per[i]) if i in per else one for i in pv_ids], dtype=np.int64
        )

    def check_bundle(self, digest: str, bundle: object) -> None:
        """Refuse a bundle other than the one the thresholds were chosen for (InputError)."""
        if self.bundle_digest is not None and self.bundle_digest != digest:
            raise InputError(
                f"the thresholds file was chosen for another bundle ({self.bundle_digest}); this "
                f"bundle is {digest}: run `lmsan threshold` on it",
                bundle,
            )

    def per_pv_json(self) -> dict[str, float] | None:
        return None if self.per_pv is None else {str(k): v for k, v in sorted(self.per_pv.items())}

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        """Read a ``lmsan threshold --out`` file: its per-PV thresholds when it has them
        (``--per-pv``), else its single ``match_threshold``. InputError / FormatError name the
        file."""
        p = Path(path)
        if not p.is_file():
            raise InputError("threshold file not found", p)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"not valid JSON ({exc})", p) from None

        def bad(msg: str) -> FormatError:
            return FormatError(f"invalid threshold file: {msg}", p)

        check_header(data, FORMAT, VERSION, bad)
        digest = data.get("bundle_digest")
        try:
            if "per_pv_thresholds" in data:
                per = check_per_pv_thresholds(data["per_pv_thresholds"], f"{p}: per_pv_thresholds")
                return cls(None, per, digest)
            if data.get("match_threshold") is None:
                raise bad("it has neither match_threshold nor per_pv_thresholds")
            return cls(check_match_threshold(data["match_threshold"]), None, digest)
        except UsageError as exc:
            raise bad(str(exc)) from None
