"""`lmsan audit` over many models: find the encoders, audit each, sum the verdicts up.

`resolve_inputs` decides, without torch, whether the command audits one model folder into one
report (`--out`) or a batch into a folder (`--out-dir`), and checks every path first. A batch
finds every encoder folder under the paths it is given (a folder with `config.json` and weights,
including the Hugging Face cache layout `models--ORG--NAME/snapshots/REV/`, named `ORG/NAME@REV`)
and skips, with the reason, any folder that looks like a model but cannot be audited.

`run_batch` audits each model with `audit.audit_and_write` (one after the other, or one Ray task
each: `batch_ray`), writes one signed report and PV set per model into the output folder, the
renderings asked for beside each report, and the summary: `summary.json` and `summary.sarif` (one
SARIF run merging the per-model runs). With `resume`, a model whose report is there, verifies
against the signing key and matches the model folder (same model digest) is not audited again.

Exit code of a batch: 1 if any model is backdoored, else 2 if any failed with an input error,
else 3 if no model was audited, else 0.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .batch_summary import (
    SUMMARY_JSON,
    batch_exit_code,
    error_row,
    report_row,
    summary_doc,
    write_summaries,
)
from .errors import InputError, LmsanError, UsageError
from .fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from .modelio import find_weights, read_config

if TYPE_CHECKING:
    from .audit import AuditOptions, AuditOutput

ENGINES = ("local", "ray")
HF_PREFIX = "models--"
# folders of a Hugging Face cache that never hold a model folder
_NOT_MODEL_DIRS = frozenset({"blobs", "refs", ".no_exist"})
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_RESERVED_STEMS = frozenset({"summary"})

Progress = Callable[[dict[str, Any]], None]


# --- finding the models -------------------------------------------------------------------------


@dataclass
class ModelEntry:
    """A model folder to audit; `problem` is set when it was named on the command line but
    cannot be audited (it then counts as an input error)."""

    name: str
    path: Path
    problem: str | None = None


@dataclass
class Skipped:
    """A folder found under a root that looks like a model but is not an auditable encoder."""

    name: str
    path: Path
    reason: str


@dataclass
class Discovery:
    models: list[ModelEntry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class Inputs:
    """What the paths of `lmsan audit` mean: one model folder (`single`), or a batch."""

    single: Path | None = None
    discovery: Discovery | None = None


def _reason(exc: LmsanError) -> str:
    """The message of an error without the path it starts with."""
    text = str(exc)
    if exc.path and text.startswith(exc.path + ": "):
        return text[len(exc.path) + 2:]
    return text


def check_encoder(path: Path, allow_pickle: bool) -> None:
    """Raise InputError unless `path` is a model folder lmsan can audit: it exists, holds a
    `config.json` of a supported model type, and weights it may load. Torch-free."""
    if not path.exists():
        raise InputError("model folder not found", path)
    if not path.is_dir():
        raise InputError("not a folder (expected a Hugging Face model folder)", path)
    read_config(path)
    find_weights(path, allow_pickle)


def hf_cache_name(path: Path) -> str | None:
    """`ORG/NAME@REV` for a snapshot folder `.../models--ORG--NAME/snapshots/REV`, else None."""
    parts = Path(os.path.abspath(path)).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith(HF_PREFIX):
        repo = parts[-3][len(HF_PREFIX):].replace("--", "/")
        return f"{repo}@{parts[-1]}" if repo else None
    return None


def _looks_like_model(names: list[str]) -> bool:
    return "config.json" in names or any(
        fnmatch.fnmatch(n, pat) for n in names for pat in _WEIGHT_PATTERNS
    )


def _model_dirs(root: Path, exclude: set[str]) -> Iterator[Path]:
    """Every folder under `root` (itself included) that looks like a model, in sorted order.

    Links are followed (a Hugging Face cache links its files into `blobs/`), each real folder is
    visited once, hidden folders and the cache's `blobs`/`refs` are passed over, and nothing
    below a model folder is searched (a sentence-transformers folder keeps its pooling
    `config.json` in a subfolder)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in exclude:
            dirnames[:] = []
            continue
        seen.add(real)
        if _looks_like_model(filenames):
            dirnames[:] = []
            yield Path(dirpath)
            continue
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and d not in _NOT_MODEL_DIRS
        )


def _name_under(root: Path, folder: Path) -> str:
    hf = hf_cache_name(folder)
    if hf:
        return hf
    rel = folder.relative_to(root).as_posix()
    return Path(os.path.abspath(root)).name if rel == "." else rel


def discover(
    paths: Sequence[Path], allow_pickle: bool, exclude: Sequence[Path] = ()
) -> Discovery:
    """The encoders named by `paths`: a model folder (one with `config.json`) is taken as it is;
    any other folder is searched for model folders. Torch-free."""
    out = Discovery()
    done: set[str] = set()
    ex = {os.path.realpath(p) for p in exclude}
    for p in paths:
        if (p / "config.json").is_file():
            folders, explicit = [p], True
        else:
            folders, explicit = list(_model_dirs(p, ex)), False
        for folder in folders:
            real = os.path.realpath(folder)
            if real in done:
                continue
            done.add(real)
            name = (hf_cache_name(folder) or Path(os.path.abspath(folder)).name) if explicit \
                else _name_under(p, folder)
            try:
                check_encoder(folder, allow_pickle)
            except InputError as exc:
                if explicit:
                    out.models.append(ModelEntry(name, folder, problem=str(exc)))
                else:
                    out.skipped.append(Skipped(name, folder, _reason(exc)))
                continue
            out.models.append(ModelEntry(name, folder))
    return out


def resolve_inputs(
    paths: Sequence[Path],
    *,
    out_dir: Path | None,
    one_model_files: bool,
    engine: str,
    allow_pickle: bool,
    batch_flags: Sequence[str] = (),
) -> Inputs:
    """Check the paths (torch-free) and decide between one model and a batch.

    One model: a single model folder and no `out_dir`; it is checked as the audit would check it.
    A batch otherwise: it needs `out_dir`, and takes no per-model file names (`one_model_files`:
    --out or --pvs-out was given). `batch_flags` names the batch-only options given (refused
    for one model). Raises InputError for a path that is missing or not a folder,
    UsageError for contradicting options."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}")
    if not paths:
        raise UsageError("give at least one model folder")
    for p in paths:
        if not p.exists():
            raise InputError("model folder not found", p)
        if not p.is_dir():
            raise InputError("not a folder (expected a Hugging Face model folder)", p)
    if len(paths) == 1 and out_dir is None:
        p = paths[0]
        if (p / "config.json").is_file():
            if batch_flags:
                raise UsageError(f"{batch_flags[0]} works with --out-dir DIR only")
            check_encoder(p, allow_pickle)
            return Inputs(single=p)
        found = discover([p], allow_pickle)
        if not found.models and not found.skipped:
            raise InputError(
                "no config.json: not a Hugging Face model folder, and no model folder below it", p
            )
        raise UsageError(
            f"{p} holds {len(found.models)} model folder(s) to audit and "
            f"{len(found.skipped)} to skip: give --out-dir DIR to audit them"
        )
    if out_dir is None:
        raise UsageError("several models write their reports into a folder: give --out-dir DIR")
    if one_model_files:
        raise UsageError("--out and --pvs-out name one model's files; with --out-dir each model "
                         "gets its own files in that folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("not a folder (--out-dir)", out_dir)
    found = discover(paths, allow_pickle, exclude=[out_dir])
    real_out = os.path.realpath(out_dir)
    for m in found.models:
        real = os.path.realpath(m.path)
        if real_out == real or real_out.startswith(real + os.sep):
            raise UsageError(f"--out-dir {out_dir} lies inside the model folder {m.path}: the "
                             "reports would change the model they describe")
    return Inputs(discovery=found)


# --- the jobs and their files -------------------------------------------------------------------


def safe_stem(name: str) -> str:
    """A file name stem for a model name: `/` becomes `--`, anything but letters, digits and
    `._@+-` becomes `_`, no leading dot or dash, at most 150 characters."""
    stem = re.sub(r"[^A-Za-z0-9._@+-]", "_", name.replace("/", "--")).lstrip(".-")
    return stem[:150] or "model"


@dataclass
class Job:
    index: int
    entry: ModelEntry
    report: Path
    pvs: Path


def plan_jobs(models: Sequence[ModelEntry], out_dir: Path) -> list[Job]:
    """One job per model with its report `<stem>.json` and PV set `<stem>.pvs.json` in
    `out_dir`; stems are unique (`-2`, `-3`, ... in discovery order) and never `summary`."""
    used: set[str] = set(_RESERVED_STEMS)
    jobs = []
    for i, m in enumerate(models):
        base = safe_stem(m.name)
        stem, n = base, 1
        while stem.lower() in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem.lower())
        jobs.append(Job(i, m, out_dir / f"{stem}.json", out_dir / f"{stem}.pvs.json"))
    return jobs


def write_renderings(report: Path, formats: Sequence[str]) -> dict[str, Path]:
    """Render the verified report at `report` in each format and write it beside the report
    (`report.html`, ...)."""
    from .render import SUFFIXES, load_verified, render

    out: dict[str, Path] = {}
    if not formats:
        return out
    verified = load_verified(report)
    for fmt in dict.fromkeys(formats):
        path = report.with_suffix(SUFFIXES[fmt])
        atomic_write_text(path, render(verified, fmt))
        out[fmt] = path
    return out


def finished(job: Job, pub: Any) -> bool:
    """The job's report and PV set are there, the report verifies against `pub` and matches
    the model folder as it is now (same model digest)."""
    from .render import load_verified

    if not (job.report.is_file() and job.pvs.is_file()):
        return False
    try:
        v = load_verified(job.report, model_dir=job.entry.path, pub=pub)
    except LmsanError:
        return False
    diff = v.verification.diff
    return v.valid and diff is not None and diff.same


@dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    skipped: list[Skipped]
    exit_code: int
    summary_json: Path
    summary_sarif: Path
    key_path: Path | None
    key_created: bool = False


# --- running ------------------------------------------------------------------------------------


@dataclass
class BatchSettings:
    """What every model of a batch shares: the audit options (`options.model_dir` is replaced
    per model), the signing key, the corpus, the renderings and whether to resume."""

    options: AuditOptions
    out_dir: Path
    key: Path | None = None
    corpus: Path | None = None
    text_field: str = "text"
    formats: list[str] = field(default_factory=list)
    resume: bool = False
    engine: str = "local"
    address: str | None = None


def _row(job: Job, *, resumed: bool, formats: Sequence[str]) -> dict[str, Any]:
    return report_row(job.entry.name, job.entry.path, job.report, job.pvs, resumed=resumed,
                      renderings=write_renderings(job.report, formats))


@dataclass
class Outcome:
    """How one job ended: files in place (`error` None), or an input error."""

    error: str | None = None
    report_bytes: bytes | None = None  # set by engines that audit elsewhere (Ray)
    pvs_bytes: bytes | None = None


def _run_local(
    jobs: list[Job], s: BatchSettings, progress: Progress | None, total: int
) -> Iterator[tuple[Job, Outcome]]:
    from .audit import audit_and_write

    for job in jobs:
        if progress:
            progress({"event": "model_start", "name": job.entry.name, "index": job.index,
                      "total": total, "seeds": s.options.resolved_max_seeds()})
        try:
            audit_and_write(replace(s.options, model_dir=job.entry.path), job.report,
                                  pvs_out=job.pvs, key=s.key, corpus=s.corpus,
                                  text_field=s.text_field, progress=progress)
        except UsageError:
            raise
        except LmsanError as exc:
            yield job, Outcome(error=str(exc))
            continue
        yield job, Outcome()


def run_batch(inputs: Discovery, s: BatchSettings, progress: Progress | None = None) -> BatchResult:
    """Audit every model of `inputs` into `s.out_dir` and write the summary; see the module
    docstring. `progress(event)` receives `model_start` / `model_end` events and, with the local
    engine, the seed events of the audit running."""
    from .corpus import load_corpus
    from .signing import default_key, load_private_key

    s.options.check()
    load_corpus(s.corpus, text_field=s.text_field)  # a bad corpus fails before any model
    key_created = False
    pub = None
    if any(m.problem is None for m in inputs.models):  # no key is made for nothing to sign
        if s.key is None:
            info = default_key()
            s = replace(s, key=info.path)
            key_created = info.created
        assert s.key is not None
        pub = load_private_key(s.key).public_key()
    if s.engine == "ray":
        from .batch_ray import require_ray

        require_ray()
    elif s.options.device != "auto":
        from .modelio import resolve_device

        resolve_device(s.options.device)  # --device cuda without CUDA: a usage error, once
    try:
        s.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder ({exc.strerror or exc})", s.out_dir) from None

    jobs = plan_jobs(inputs.models, s.out_dir)
    skipped = [{"name": x.name, "path": str(x.path), "reason": x.reason} for x in inputs.skipped]
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    todo = []
    for job in jobs:
        if job.entry.problem is not None:
            rows[job.index] = error_row(job.entry.name, job.entry.path, job.entry.problem)
        elif s.resume and finished(job, pub):
            rows[job.index] = _row(job, resumed=True, formats=s.formats)
        else:
            todo.append(job)
            continue
        if progress:
            progress({"event": "model_end", "row": rows[job.index]})

    def partial() -> list[dict[str, Any]]:
        return [r for r in rows if r is not None]

    if s.engine == "ray":
        from .batch_ray import run_ray

        outcomes: Iterator[tuple[Job, Outcome]] = (
            (job, Outcome(error=r.get("error"), report_bytes=r.get("report"),
                          pvs_bytes=r.get("pvs")))
            for job, r in run_ray([(j, replace(s.options, model_dir=j.entry.path)) for j in todo],
                                  key=s.key, corpus=s.corpus, text_field=s.text_field,
                                  address=s.address)
        )
    else:
        outcomes = _run_local(todo, s, progress, len(jobs))
    for job, oc in outcomes:
        if oc.error is None and oc.report_bytes is not None:
            atomic_write_bytes(job.pvs, oc.pvs_bytes or b"")
            atomic_write_bytes(job.report, oc.report_bytes)
        if oc.error is not None:
            rows[job.index] = error_row(job.entry.name, job.entry.path, oc.error)
        else:
            rows[job.index] = _row(job, resumed=False, formats=s.formats)
        if progress:
            progress({"event": "model_end", "row": rows[job.index]})
        atomic_write_json(s.out_dir / SUMMARY_JSON, summary_doc(partial(), skipped, s.out_dir))
    done = partial()
    js, sarif = write_summaries(done, skipped, s.out_dir)
    return BatchResult(done, inputs.skipped, batch_exit_code(done), js, sarif, s.key, key_created)


def audit_single(
    options: AuditOptions,
    out: Path,
    *,
    pvs_out: Path | None = None,
    key: Path | None = None,
    corpus: Path | None = None,
    text_field: str = "text",
    formats: Sequence[str] = (),
    progress: Progress | None = None,
) -> tuple[AuditOutput, dict[str, Path]]:
    """One model into one report (`lmsan audit MODEL --out FILE`): `audit_and_write`, then the
    renderings asked for beside the report."""
    from .audit import audit_and_write

    done = audit_and_write(options, out, pvs_out=pvs_out, key=key, corpus=corpus,
                           text_field=text_field, progress=progress)
    return done, write_renderings(out, formats)
