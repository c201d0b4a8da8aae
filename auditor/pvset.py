"""The PV set file: the versioned output of `lmsan audit` and the input of `export`/`scan`.

A signed audit report carries a PV set too; `report.load_pvset` reads either.

Torch-free. Layout (JSON)::

    {"format": "lmsan.pvset", "version": 1,
     "hidden_size": 384, "match_threshold": 0.8,
     "model": {"digest": "sha256:...", "model_type": "bert"},
     "pvs": [{"id": 0, "target": "cls", "values": [...], "signs": "<hex of packed words>",
              "seed": 3, "source": "mined"}]}

`signs` is the bit-packed `sign(values) >= 0`: little-endian uint64 words, bit j of word j//64
is dimension j, written as hex. It is redundant with `values` and checked on read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, InputError, check_header
from .fsutil import atomic_write_text

FORMAT = "lmsan.pvset"
VERSION = 1
# The encoder outputs a PV can live on: the [CLS] vector, the [MASK] vector of the templated
# input, every ordinary token's vector, and the pooler output. The one list of them.
TARGETS = ("cls", "mask", "tokens", "pooler")


def pack_signs_reference(x: np.ndarray) -> np.ndarray:
    """NumPy packing of `x >= 0` of a [n, d] float array into uint64 [n, ceil(d/64)] (bit j of
    word w = unit 64 w + j): the monitor's reference, so the PV set file and the kernel can never
    disagree on the layout."""
    from .monitor import pack_signs_python

    return pack_signs_python(x)


def signs_to_hex(packed_row: np.ndarray) -> str:
    return np.asarray(packed_row, dtype="<u8").tobytes().hex()


def hex_to_signs(text: str, words: int) -> np.ndarray:
    raw = bytes.fromhex(text)
    if len(raw) != words * 8:
        raise ValueError(f"expected {words * 8} bytes of packed signs, got {len(raw)}")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


@dataclass
class PV:
    id: int
    target: str
    values: np.ndarray  # float32 [d]
    seed: int | None = None
    source: str = "mined"  # "mined" or "attacker" (added for a best-case evaluation)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def packed(self) -> np.ndarray:
        return pack_signs_reference(self.values[None, :])[0]


@dataclass
class PVSet:
    hidden_size: int
    pvs: list[PV]
    match_threshold: float = 0.8
    model: dict[str, Any] = field(default_factory=dict)

    def for_target(self, target: str) -> list[PV]:
        return [p for p in self.pvs if p.target == target]

    def targets(self) -> list[str]:
        return sorted({p.target for p in self.pvs}, key=TARGETS.index)

    def matrix(self, target: str | None = None) -> np.ndarray:
        pvs = self.pvs if target is None else self.for_target(target)
        if not pvs:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        return np.stack([p.values for p in pvs]).astype(np.float32)

    def retargeted(self, target: str, duplicate_agreement: float = 0.95,
                   also_keep: tuple[str, ...] = ()) -> PVSet:
        """Every PV matched at one position ``target`` (a prompt-tuned head's position).

        A task-agnostic trigger drives the whole sequence to its PV, so a PV mined on one
        position also marks triggered outputs at the others: on the 3-layer NeuBA model the PV
        mined on ``mask`` agrees with triggered [CLS] outputs at 0.995, the one mined on ``cls``
        at 0.81 only. Pooler PVs are dropped (they live in tanh(W h + b) space, not the hidden
        space of cls/mask/tokens). A PV whose signs agree with an already kept one at
        ``duplicate_agreement`` or more is dropped as a duplicate; PVs mined on ``target`` itself
        are kept first. Each kept PV records its original target in ``info["mined_on"]``.

        ``also_keep``: PVs mined on these targets stay matched where they were mined as well
        (with their ids; duplicates there merged the same way), and their copies at ``target``
        get fresh ids after the set's largest (``info["copy_of"]`` names the original). A token
        head uses ``("cls",)``: a trigger that drives [CLS] onto its PV moves the token outputs
        only part of the way."""
        if target not in TARGETS or target == "pooler":
            raise InputError(f"cannot retarget PVs to {target!r}; choose cls, mask or tokens")
        if not 0.5 < duplicate_agreement <= 1.0:
            raise InputError("duplicate_agreement must be in (0.5, 1]")
        order = sorted(
            (p for p in self.pvs if p.target != "pooler"),
            key=lambda p: (p.target != target, p.id),
        )
        kept: list[PV] = []
        for p in order:
            s = p.values >= 0
            if any(np.mean(s == (k.values >= 0)) >= duplicate_agreement for k in kept):
                continue
            info = {**p.info, "mined_on": p.info.get("mined_on", p.target)}
            kept.append(PV(id=p.id, target=target, values=p.values.copy(), seed=p.seed,
                           source=p.source, info=info))
        kept.sort(key=lambda p: p.id)
        stay: list[PV] = []
        for t in also_keep:
            if t not in TARGETS or t in ("pooler", target):
                raise InputError(f"also_keep: {t!r} is not a position other than {target!r}")
            for p in sorted(self.for_target(t), key=lambda p: p.id):
                s = p.values >= 0
                if any(np.mean(s == (k.values >= 0)) >= duplicate_agreement for k in stay
                       if k.target == t):
                    continue
                stay.append(PV(id=p.id, target=t, values=p.values.copy(), seed=p.seed,
                               source=p.source, info={**p.info, "mined_on": t}))
        if stay:
            taken = {p.id for p in stay}
            next_id = max(p.id for p in self.pvs) + 1
            for i, p in enumerate(kept):
                if p.id in taken:
                    kept[i] = PV(id=next_id, target=p.target, values=p.values, seed=p.seed,
                                 source=p.source, info={**p.info, "copy_of": p.id})
                    next_id += 1
            kept = sorted(stay + kept, key=lambda p: p.id)
        return PVSet(hidden_size=self.hidden_size, pvs=kept,
                     match_threshold=self.match_threshold, model=dict(self.model))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "hidden_size": self.hidden_size,
            "match_threshold": self.match_threshold,
            "model": self.model,
            "pvs": [
                {
                    "id": p.id,
                    "target": p.target,
                    "seed": p.seed,
                    "source": p.source,
                    "values": [float(v) for v in p.values],
                    "signs": signs_to_hex(p.packed),
                    "info": p.info,
                }
                for p in self.pvs
            ],
        }

    def save(self, path: str | Path) -> None:
        try:
            atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")
        except OSError as exc:
            raise InputError(f"cannot write the PV set ({exc.strerror or exc})", path) from None

    @classmethod
    def from_json(cls, data: Any, path: str | Path | None = None) -> PVSet:
        def bad(msg: str) -> FormatError:
            return FormatError(f"invalid PV set: {msg}", path)

        check_header(data, FORMAT, VERSION, bad)
        d = data.get("hidden_size")
        if not isinstance(d, int) or d <= 0:
            raise bad("field 'hidden_size' must be a positive integer")
        thr = data.get("match_threshold", 0.8)
        if not isinstance(thr, (int, float)) or not 0 < thr <= 1:
            raise bad("field 'match_threshold' must be in (0, 1]")
        raw = data.get("pvs")
        if not isinstance(raw, list):
            raise bad("field 'pvs' must be a list")
        pvs = []
        words = (d + 63) // 64
        for i, e in enumerate(raw):
            if not isinstance(e, dict):
                raise bad(f"pvs[{i}] is not an object")
            if e.get("target") not in TARGETS:
                raise bad(f"pvs[{i}].target is {e.get('target')!r}, expected one of {TARGETS}")
            vals = e.get("values")
            if not isinstance(vals, list) or len(vals) != d:
                raise bad(f"pvs[{i}].values must be a list of {d} numbers")
            try:
                arr = np.asarray(vals, dtype=np.float32)
            except (TypeError, ValueError):
                raise bad(f"pvs[{i}].values holds a non-number") from None
            if not np.all(np.isfinite(arr)):
                raise bad(f"pvs[{i}].values holds a non-finite number")
            pv = PV(
                id=int(e.get("id", i)),
                target=e["target"],
                values=arr,
                seed=e.get("seed"),
                source=str(e.get("source", "mined")),
                info=dict(e.get("info") or {}),
            )
            if "signs" in e:
                try:
                    signs = hex_to_signs(str(e["signs"]), words)
                except ValueError as exc:
                    raise bad(f"pvs[{i}].signs: {exc}") from None
                if not np.array_equal(signs, pv.packed):
                    raise bad(f"pvs[{i}].signs does not match pvs[{i}].values")
            pvs.append(pv)
        return cls(hidden_size=d, pvs=pvs, match_threshold=float(thr), model=dict(data.get("model") or {}))

    @classmethod
    def load(cls, path: str | Path) -> PVSet:
        """Read a PV set file (`report.load_pvset` also reads the one in a signed report)."""
        p = Path(path)
        if not p.is_file():
            raise InputError("PV set file not found", p)
        try:
            data = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"not valid JSON ({exc})", p) from None
        return cls.from_json(data, p)
