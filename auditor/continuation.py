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

An audit that stopped early (Ctrl-C, a time limit, a crash) leaves `REPORT.partial.jsonl`: a
header with its settings and the model digest, then its finished seeds. `--continue-from` takes
that file too: the model folder must hash to the header's digest and the settings must match, as
for a report. The file is not signed (it is the audit's own working file); the new report
records its name and SHA-256 with no signer.
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
    """The earlier audit a new one goes on from: a signed report or a stopped audit's partial
    seed file (`fingerprint` None)."""

    path: Path
    sha256: str
    fingerprint: str | None
    predicate: dict[str, Any]
    seeds: list[Any]  # SeedResult, in seed order

    def record(self) -> dict[str, Any]:
        """What the new report says about the report it continues."""
        return {"report": self.path.name, "sha256": self.sha256, "signer": self.fingerprint,
                "seeds": [s.seed for s in self.seeds]}


PARTIAL_FORMAT = "lmsan.audit.partial"


def partial_header(settings: dict[str, Any], model_dir: str | Path,
                   ignore: list[Path]) -> dict[str, Any]:
    """The first line of a partial seed file: the audit's settings and the model digest (the
    files `ignore` left out when they lie in the model folder)."""
    return {"format": PARTIAL_FORMAT, "version": 1, **settings,
            "model_digest": _model_digest(model_dir, ignore)}


def _model_digest(model_dir: str | Path, ignore: list[Path]) -> str:
    from .manifest import model_manifest, relative_inside

    root = Path(model_dir)
    skip = [r for r in (relative_inside(p, root) for p in ignore) if r is not None]
    return "sha256:" + model_manifest(root, ignore=skip).digest


def load_partial(path: Path, model_dir: str | Path) -> Continuation:
    """The finished seeds of a stopped audit, from its partial seed file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from None
    lines = raw.decode("utf-8", errors="replace").splitlines()
    try:
        head = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("format") != PARTIAL_FORMAT:
        raise InputError("not a partial seed file of lmsan audit (its first line must be the "
                         f"{PARTIAL_FORMAT} header)", path)
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # a line cut off when the audit stopped: that seed runs again
                break
            raise InputError(f"line {i} is not JSON", path) from None
    if head.get("model_digest") != _model_digest(model_dir, [path]):
        raise InputError(f"the seeds in this file were mined from another model: the folder "
                         f"{model_dir} no longer hashes to {head.get('model_digest')}", path)
    if head.get("mode") != "detect":
        raise UsageError(f"{path}: only a detect-mode audit can be continued")
    seeds = [_seed_result(d) for d in rows]
    if not seeds:
        raise UsageError(f"{path}: the file records no finished seed; start the audit over")
    kept = [s.seed for s in seeds if any(t.accepted for t in s.targets)]
    if kept:
        raise UsageError(f"{path}: that audit kept a PV at seed {kept[0]} (its verdict is "
                         "BACKDOORED); there is nothing to continue: run it again without "
                         "--continue-from for the report")
    pred = {"mode": "detect", "targets": head.get("targets"), "seeds": rows,
            "corpus": {"digest": head.get("corpus_digest")},
            "parameters": {"first_seed": head.get("first_seed"), "seed": head.get("seed"),
                           "mining": head.get("mining", {})}}
    return Continuation(path, hashlib.sha256(raw).hexdigest(), None, pred, seeds)


def load_continuation(path: str | Path, model_dir: str | Path) -> Continuation:
    """Read and verify the earlier report of the audit of `model_dir` (or the partial seed file
    of a stopped one); InputError when it does not verify, UsageError when it is no audit that
    can be continued."""
    from .report import read_report_bytes, verify_report_bytes

    p = Path(path)
    if p.name.endswith(".partial.jsonl"):
        return load_partial(p, model_dir)
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
