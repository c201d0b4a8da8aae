"""The summary of a batch audit: one row per model, `summary.json`, and `summary.sarif`.

A row is read back from the model's signed report through `render` (so the summary states what
the report says): the verdict, the figure that decided it against its threshold with the margin,
the audit's seconds, the files. `summary.sarif` is one SARIF run merging the runs that
`render.render(report, "sarif")` gives for each model. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import EXIT_CLEAN, EXIT_ERROR, EXIT_FOUND, EXIT_NOTHING
from .fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from .render import Facts

SUMMARY_FORMAT = "lmsan.audit-summary"
SUMMARY_VERSION = 1
SUMMARY_JSON = "summary.json"
SUMMARY_SARIF = "summary.sarif"


def deciding_figure(fx: Facts) -> dict[str, Any] | None:
    """The figure that decided the verdict, against its threshold: for a backdoored model the
    figure of its first kept PV that passed by the least; for a clean one the rejected figure
    that came nearest to its threshold."""
    from .render.facts import bottleneck, nearest

    fig = None
    if fx.kept and fx.kept[0].figures:
        fig = bottleneck(fx.kept[0].figures)
    elif fx.near_misses:
        fig = nearest([m.figure for m in fx.near_misses])
    if fig is None:
        return None
    return {"figure": fig.name, "value": fig.value, "op": fig.op,
            "threshold": fig.threshold_name, "threshold_value": fig.threshold,
            "margin": fig.margin, "text": fig.describe()}


def report_row(
    name: str, path: Path, report: Path, pvs: Path, *, resumed: bool,
    renderings: dict[str, Path],
) -> dict[str, Any]:
    """The summary row of the model `name` (folder `path`) from its signed report."""
    from .render import load_verified, report_facts

    fx = report_facts(load_verified(report))
    return {
        "name": name,
        "path": str(path),
        "status": fx.verdict.lower() if fx.verified else "error",
        "verdict": fx.verdict,
        "found_targets": fx.found_targets,
        "figure": deciding_figure(fx),
        "seconds": fx.seconds,
        "report": str(report),
        "pvs": str(pvs),
        "renderings": {k: str(v) for k, v in renderings.items()},
        "model_digest": fx.model_digest,
        "resumed": resumed,
        "error": None if fx.verified else "; ".join(fx.problems),
    }


def error_row(name: str, path: Path, message: str) -> dict[str, Any]:
    """The summary row of a model that failed with an input error."""
    return {"name": name, "path": str(path), "status": "error", "verdict": None,
            "found_targets": [], "figure": None, "seconds": None, "report": None, "pvs": None,
            "renderings": {}, "model_digest": None, "resumed": False, "error": message}


def batch_exit_code(rows: Sequence[dict[str, Any]]) -> int:
    """1 if any model is backdoored, else 2 if any failed, else 3 if none was audited, else 0."""
    status = [r["status"] for r in rows]
    if "backdoored" in status:
        return EXIT_FOUND
    if "error" in status:
        return EXIT_ERROR
    if not status:
        return EXIT_NOTHING
    return EXIT_CLEAN


def merge_sarif(runs: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One SARIF log with one run from the one-run logs of several models: artifacts and results
    concatenated (artifact indices shifted, each model's base URI id renamed `MODEL<n>`), one
    invocation per model, and each model's run properties under `properties.models`."""
    from .render.sarif import RULE, SCHEMA

    merged: dict[str, Any] = {
        "tool": {"driver": {"name": "lmsan", "version": __version__, "rules": [RULE]}},
        "invocations": [], "artifacts": [], "results": [], "originalUriBaseIds": {},
        "properties": {"models": []},
    }
    for i, (name, doc) in enumerate(runs):
        run = doc["runs"][0]
        if i == 0:
            merged["tool"] = run["tool"]
        base_id = f"MODEL{i}"
        offset = len(merged["artifacts"])

        def rebase(loc: dict[str, Any], base_id: str = base_id, offset: int = offset) -> None:
            if loc.get("uriBaseId") == "MODELDIR":
                loc["uriBaseId"] = base_id
            if "index" in loc:
                loc["index"] += offset

        for art in run.get("artifacts", []):
            rebase(art["location"])
            merged["artifacts"].append(art)
        for res in run.get("results", []):
            for loc in res.get("locations", []):
                rebase(loc["physicalLocation"]["artifactLocation"])
            res.setdefault("properties", {})["model"] = name
            merged["results"].append(res)
        for inv in run.get("invocations", []):
            inv.setdefault("properties", {})["model"] = name
            merged["invocations"].append(inv)
        if "MODELDIR" in run.get("originalUriBaseIds", {}):
            merged["originalUriBaseIds"][base_id] = run["originalUriBaseIds"]["MODELDIR"]
        merged["properties"]["models"].append({"model": name, **run.get("properties", {})})
    for key in ("artifacts", "originalUriBaseIds", "invocations"):
        if not merged[key]:
            del merged[key]
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [merged]}


def summary_doc(
    rows: list[dict[str, Any]], skipped: list[dict[str, str]], out_dir: Path
) -> dict[str, Any]:
    """The content of summary.json: rows in discovery order, the skipped folders, counts and
    the batch's exit code."""
    status = [r["status"] for r in rows]
    return {
        "format": SUMMARY_FORMAT,
        "version": SUMMARY_VERSION,
        "tool": {"name": "lmsan", "version": __version__},
        "out_dir": str(out_dir),
        "exit_code": batch_exit_code(rows),
        "counts": {"models": len(rows), "backdoored": status.count("backdoored"),
                   "clean": status.count("clean"), "error": status.count("error"),
                   "resumed": sum(1 for r in rows if r["resumed"]), "skipped": len(skipped)},
        "models": rows,
        "skipped": skipped,
    }


def write_summaries(
    rows: list[dict[str, Any]], skipped: list[dict[str, str]], out_dir: Path
) -> tuple[Path, Path]:
    """Write summary.json and summary.sarif (the SARIF runs of the reports, merged) into
    `out_dir`."""
    from .render import load_verified, render

    js = atomic_write_json(out_dir / SUMMARY_JSON, summary_doc(rows, skipped, out_dir))
    runs = [(r["name"], json.loads(render(load_verified(r["report"]), "sarif")))
            for r in rows if r["report"]]
    sarif = atomic_write_text(out_dir / SUMMARY_SARIF,
                              json.dumps(merge_sarif(runs), indent=2, ensure_ascii=False) + "\n")
    return js, sarif
