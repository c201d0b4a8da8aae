"""Continue an audit from its own earlier report: `lmsan audit --continue-from REPORT`.

A long audit (30 seeds of a large encoder on a CPU) may have to run in parts. Parts run as
separate audits are not one audit: every candidate a seed makes enters the path loss of the
seeds after it, so a part that starts with an empty history trains its seeds differently. A
continued audit starts where the earlier report ended with that report's history: every
candidate it recorded enters the path loss, in seed order, before the next seed trains, and the
earlier seeds are carried into the new report. Its figures are those of one uninterrupted audit
(bit for bit with `--seeds-per-pass 1`; lockstep passes group seeds differently and agree to
float rounding).

Only an audit that can be continued is: the earlier report must verify (signature, structure, the
model folder unchanged), be a detect-mode audit that ended clean, and have run with the same
corpus, targets, base seed, first seed and mining parameters as the new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InputError, UsageError
from .filtering import TargetStats


@dataclass
class Continuation:
    path: Path
    sha256: str
    fingerprint: str | None
    predicate: dict[str, Any]
    seeds: list[Any]  # SeedResult, in seed order

    def record(self) -> dict[str, Any]:
        """What the new report says about the report it continues."""
        return {"report": self.path.name, "sha256": self.sha256, "signer": self.fingerprint,
                "seeds": [s.seed for s in self.seeds]}


def load_continuation(path: str | Path, model_dir: str | Path) -> Continuation:
    """Read and verify the earlier report of the audit of `model_dir`; InputError when it does
    not verify, UsageError when it is no audit that can be continued."""
    from .report import read_report_bytes, verify_report_bytes

    p = Path(path)
    raw = read_report_bytes(p)
    v = verify_report_bytes(raw, p, model_dir=model_dir)
    if not v.valid:
        raise InputError("cannot continue from this report: it does not verify ("
                         + "; ".join(v.problems or ["signature invalid"]) + ")", p)
    pred = v.predicate or {}
    if pred.get("mode") != "detect":
        raise UsageError(f"{p}: only a detect-mode audit can be continued")
    if pred.get("verdict") != "clean":
        raise UsageError(f"{p}: that audit already ended {pred.get('verdict')}; "
                         "there is nothing to continue")
    seeds = [_seed_result(d) for d in pred.get("seeds", [])]
    if not seeds:
        raise UsageError(f"{p}: the report records no seeds")
    return Continuation(p, hashlib.sha256(raw).hexdigest(), v.fingerprint, pred, seeds)


def _seed_result(d: dict[str, Any]) -> Any:
    from .mining import SeedResult

    names = {f.name for f in fields(SeedResult)}
    kw = {k: v for k, v in d.items() if k in names and k != "targets"}
    tnames = {f.name for f in fields(TargetStats)}
    kw["targets"] = [TargetStats(**{k: v for k, v in t.items() if k in tnames})
                     for t in d.get("targets", [])]
    kw.setdefault("prompt", None)
    return SeedResult(**kw)


def check_same_audit(c: Continuation, *, targets: list[str], corpus_digest: str,
                     mining: dict[str, Any], first_seed: int, seed: int, max_seeds: int) -> None:
    """UsageError naming the first setting in which the new audit differs from the earlier one."""
    params = c.predicate.get("parameters", {})
    was = {"targets": c.predicate.get("targets"),
           "corpus digest": c.predicate.get("corpus", {}).get("digest"),
           "first seed": params.get("first_seed"), "seed": params.get("seed")}
    now = {"targets": targets, "corpus digest": corpus_digest, "first seed": first_seed,
           "seed": seed}
    for k in was:
        if was[k] != now[k]:
            raise UsageError(f"{c.path}: cannot continue: the {k} differs "
                             f"(earlier {was[k]!r}, now {now[k]!r})")
    old, new = _canon(params.get("mining", {})), _canon(mining)
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            raise UsageError(f"{c.path}: cannot continue: mining parameter {k} differs "
                             f"(earlier {old.get(k)!r}, now {new.get(k)!r})")
    expected = list(range(first_seed, first_seed + len(c.seeds)))
    if [s.seed for s in c.seeds] != expected:
        raise UsageError(f"{c.path}: cannot continue: its seeds are not {first_seed}.."
                         f"{expected[-1]} in order")
    if max_seeds <= len(c.seeds):
        raise UsageError(f"{c.path}: that audit already ran {len(c.seeds)} seeds; "
                         f"--max-seeds {max_seeds} asks for no more")


def _canon(d: dict[str, Any]) -> dict[str, Any]:
    """The mining parameters as the report stores them (JSON: tuples are lists)."""
    from .audit import _finite

    return json.loads(json.dumps(_finite(d)))
