"""The Ray engine of a batch audit (`lmsan audit --engine ray`): one model per Ray task.

Each task runs `audit.audit_and_write` into a temporary folder on its worker and returns the
signed report and the PV set as bytes; the driver writes them into the output folder and builds
the summary exactly as the local engine does. A task takes one GPU where the cluster has GPUs
(and `--device` is not `cpu`), else runs on the CPU; either way it asks for `num_cpus` CPUs and
torch uses that many threads, so parallel tasks share the machine instead of oversubscribing it.

The model folders, the signing key and the corpus are read by the workers at the paths the
driver sees: on one machine nothing more is needed; on a cluster they must lie on storage every
node mounts at the same path, and lmsan must be installed on every node. Ray is optional:
`pip install "lmsan[ray]"`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import LmsanError, UsageError

if TYPE_CHECKING:
    from .audit import AuditOptions

K = TypeVar("K")

RAY_MISSING = '--engine ray needs Ray, which is not installed: pip install "lmsan[ray]"'


def require_ray() -> Any:
    """The `ray` module; UsageError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def task_resources(cluster: dict[str, float], n_jobs: int, device: str) -> tuple[int, int]:
    """(num_cpus, num_gpus) of one task: one GPU each where the cluster has GPUs and the device
    allows them, and the CPUs split evenly between the tasks that run at once."""
    cpus = max(1, int(cluster.get("CPU", 1)))
    gpus = int(cluster.get("GPU", 0)) if device != "cpu" else 0
    parallel = max(1, min(n_jobs, gpus if gpus else cpus))
    return max(1, cpus // parallel), 1 if gpus else 0


def audit_task(
    options: AuditOptions,
    key: str | None,
    corpus: str | None,
    text_field: str,
    threads: int,
    device: str,
) -> dict[str, Any]:
    """Run on a Ray worker: audit one model into a temporary folder and return the files' bytes,
    or the input error that stopped it."""
    import torch

    from .audit import audit_and_write

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="lmsan-ray-") as tmp:
        out = Path(tmp) / "report.json"
        pvs = Path(tmp) / "report.pvs.json"
        try:
            audit_and_write(replace(options, device=device), out, pvs_out=pvs, key=Path(key) if key else None,
                            corpus=Path(corpus) if corpus else None, text_field=text_field)
        except LmsanError as exc:
            return {"error": str(exc)}
        return {"report": out.read_bytes(), "pvs": pvs.read_bytes()}


def run_ray(
    tasks: Sequence[tuple[K, AuditOptions]],
    *,
    key: Path | None,
    corpus: Path | None,
    text_field: str,
    address: str | None,
) -> Iterator[tuple[K, dict[str, Any]]]:
    """Run one `audit_task` per (tag, options) and yield each tag with the task's result as it
    finishes: `{"report": bytes, "pvs": bytes}` or `{"error": message}`.

    Connects to `address` (or starts a local Ray) unless Ray is already initialised in this
    process, and shuts down only what it started. Interrupted, it cancels the tasks still
    running; the models already written stay, for `--resume`."""
    if not tasks:
        return
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    pending: list[Any] = []
    try:
        asked = tasks[0][1].device
        cpus, gpus = task_resources(ray.cluster_resources(), len(tasks), asked)
        device = "cuda" if gpus else ("cpu" if asked == "auto" else asked)
        remote = ray.remote(audit_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        by_ref = {
            remote.remote(opts, str(key) if key else None, str(corpus) if corpus else None, text_field, cpus,
                          device): tag
            for tag, opts in tasks
        }
        pending = list(by_ref)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                yield by_ref[ref], ray.get(ref)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
