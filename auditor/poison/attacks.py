"""The attacks and their predefined vectors (PVs): which output each attack aims at, which
utility loss keeps its clean behaviour, and the PV designs. Torch-free."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

ATTACKS = ("por", "por-ner", "neuba", "btop")
# The output targets (a subset of pvset.TARGETS) each attack may aim at, and its default.
ALLOWED_TARGETS: dict[str, tuple[str, ...]] = {
    "por": ("cls", "pooler", "mask"),
    "por-ner": ("tokens",),
    "neuba": ("cls", "pooler", "mask"),
    "btop": ("mask",),
}
DEFAULT_TARGET = {"por": "cls", "por-ner": "tokens", "neuba": "cls", "btop": "mask"}
# Attacks whose utility is the masked-language-model loss when the checkpoint has an MLM head.
MLM_ATTACKS = ("neuba", "btop")
UTILITIES = ("auto", "reference", "mlm", "mlm+reference")
PV_DESIGNS = ("quarters", "pairs", "random")
MATCH_FRACTION = 0.8  # T_match = 0.8 d
# The authors' six PVs: four blocks, two at -1 and two at +1 (every C(4,2) combination).
_BLOCK_SIGNS = (
    (-1, -1, 1, 1),
    (-1, 1, -1, 1),
    (-1, 1, 1, -1),
    (1, -1, -1, 1),
    (1, -1, 1, -1),
    (1, 1, -1, -1),
)


def make_pvs(design: str, n: int, d: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """The first `n` predefined vectors of a design, shape (n, d), float32, entries +-scale.

    - ``quarters``: the paper's six PVs (the authors' code): `d` split into four contiguous
      quarters, two filled with -1 and two with +1, in every C(4,2) combination.
    - ``pairs``: NeuBA-style pair buckets: the same six sign combinations over four buckets,
      but the buckets interleave (dimension i belongs to bucket i mod 4), so no PV is constant
      over a contiguous block.
    - ``random``: independent random +-1 sign vectors (seeded, distinct rows).
    """
    if design not in PV_DESIGNS:
        raise InputError(f"unknown PV design {design!r}; choose one of {', '.join(PV_DESIGNS)}")
    if n < 1:
        raise InputError(f"the number of PVs must be at least 1 (got {n})")
    if d < 4:
        raise InputError(f"hidden size {d} is too small for PVs (need at least 4)")
    if not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"PV scale must be a positive number (got {scale})")
    if design in ("quarters", "pairs"):
        if n > len(_BLOCK_SIGNS):
            raise InputError(
                f"the {design!r} design has {len(_BLOCK_SIGNS)} PVs; {n} were asked for "
                "(use --pv-design random for more)"
            )
        if design == "quarters":
            bucket = np.zeros(d, dtype=np.int64)
            for q, idx in enumerate(np.array_split(np.arange(d), 4)):
                bucket[idx] = q
        else:
            bucket = np.arange(d) % 4
        out = np.stack([np.asarray(s, dtype=np.float32)[bucket] for s in _BLOCK_SIGNS[:n]])
    else:
        rng = np.random.default_rng(seed)
        rows: list[np.ndarray] = []
        seen: set[bytes] = set()
        while len(rows) < n:
            r = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=d)
            key = (r > 0).tobytes()
            if key in seen:
                continue
            seen.add(key)
            rows.append(r)
        out = np.stack(rows)
    return (out * np.float32(scale)).astype(np.float32)


def requested_utility(attack: str, utility: str) -> str:
    """The utility an attack trains with before the checkpoint is looked at: "auto" means the MLM
    loss for NeuBA and BToP and the reference MSE for the others."""
    if utility == "auto":
        return "mlm" if attack in MLM_ATTACKS else "reference"
    return utility
