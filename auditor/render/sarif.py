"""The SARIF 2.1.0 rendering: one run, tool driver `lmsan`, one result per kept PV.

A kept PV of a BACKDOORED report is an "error" result (security-severity 9.0) located at the
model's weights file, relative to the model folder (`uriBaseId` MODELDIR). A CLEAN report gives a
run with no results. A report that fails verification says so in the run's invocation (an error
notification, `executionSuccessful` false), in the run's properties, and in every result message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

from .facts import BACKDOORED, Facts, KeptPV
from .text import UNVERIFIED_LINE

SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
RULE_ID = "LMSAN001"
SEVERITY = "9.0"

RULE: dict[str, Any] = {
    "id": RULE_ID,
    "name": "TaskAgnosticBackdoor",
    "shortDescription": {"text": "Task-agnostic backdoor: a legitimate predefined vector (PV)"},
    "fullDescription": {
        "text": "A soft prompt drives the encoder's outputs for any input far from the clean "
        "outputs and collapses them onto one point: the predefined vector of a task-agnostic "
        "backdoor (POR, NeuBA, BToP). Any fine-tuned model built on this encoder inherits it; "
        "an input holding the trigger produces that output whatever the task."
    },
    "help": {
        "text": "Do not deploy the model. If it must run, screen its inputs with the PV set "
        "(`lmsan export` then `lmsan scan`), and audit the source of the checkpoint.",
        "markdown": "Do not deploy the model. If it must run, screen its inputs with the PV set "
        "(`lmsan export`, then `lmsan scan`), and audit the source of the checkpoint.",
    },
    "defaultConfiguration": {"level": "error"},
    "properties": {
        "tags": ["security", "backdoor", "machine-learning"],
        "precision": "high",
        "problem.severity": "error",
        "security-severity": SEVERITY,
    },
}


def _model_base(path: str) -> str | None:
    p = PurePosixPath(path)
    if not p.is_absolute():
        return None
    return p.as_uri().rstrip("/") + "/"


def _message(fx: Facts, k: KeptPV) -> str:
    pre = "UNVERIFIED report: " if not fx.verified else ""
    figs = "; ".join(g.describe() for g in k.figures)
    hint = ", ".join(k.hint_words) or "none"
    return (
        f"{pre}Backdoor PV {k.id} on target {k.target} (seed {k.seed}) of model "
        f"{fx.model_name}: trigger hint {hint}. {figs}."
    )


def _result(fx: Facts, k: KeptPV, location: dict[str, Any] | None) -> dict[str, Any]:
    level = "error" if fx.verdict == BACKDOORED else "warning"
    fp = hashlib.sha256(f"{fx.model_digest}|{k.target}|{k.signs}".encode()).hexdigest()
    res: dict[str, Any] = {
        "ruleId": RULE_ID,
        "ruleIndex": 0,
        "kind": "fail",
        "level": level,
        "message": {"text": _message(fx, k)},
        "partialFingerprints": {"lmsanPv/v1": fp},
        "properties": {
            "pvId": k.id,
            "target": k.target,
            "seed": k.seed,
            "triggerHint": k.hint_words,
            "nearestTokens": k.hint,
            "figures": [
                {"figure": g.name, "value": g.value, "threshold": g.threshold_name,
                 "thresholdValue": g.threshold, "margin": g.margin}
                for g in k.figures
            ],
            "rule": k.rule,
            "security-severity": SEVERITY if level == "error" else "5.0",
            "verified": fx.verified,
        },
    }
    if location is not None:
        res["locations"] = [location]
    return res


def render_sarif(fx: Facts) -> str:
    base = _model_base(fx.model_path)
    weights = fx.weights_file
    location: dict[str, Any] | None = None
    artifacts: list[dict[str, Any]] = []
    if weights is not None or fx.model_path:
        art: dict[str, Any] = (
            {"uri": weights, **({"uriBaseId": "MODELDIR"} if base else {})}
            if weights is not None
            else {"uri": base or fx.model_path}
        )
        entry: dict[str, Any] = {"location": dict(art), "description": {
            "text": f"model {fx.model_name} ({fx.model_type or 'unknown type'}), folder digest "
            f"{fx.model_digest}"}}
        if weights is not None and fx.model_files.get(weights):
            entry["hashes"] = {"sha-256": fx.model_files[weights]}
        artifacts.append(entry)
        # a weights file has no lines; code-scanning services still need region.startLine to
        # place an alert, so the alert sits at the start of the file
        location = {
            "physicalLocation": {"artifactLocation": {**art, "index": 0},
                                 "region": {"startLine": 1}},
            "logicalLocations": [{"name": fx.model_name or "model", "kind": "module"}],
        }
    invocation: dict[str, Any] = {"executionSuccessful": fx.verified}
    if not fx.verified:
        invocation["toolExecutionNotifications"] = [
            {"level": "error",
             "message": {"text": UNVERIFIED_LINE + " " + " ".join(f"- {p}" for p in fx.problems)}}
        ]
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "lmsan", "version": fx.tool.rsplit(" ", 1)[-1] or "unknown",
                            "rules": [RULE]}},
        "invocations": [invocation],
        "artifacts": artifacts,
        "results": [_result(fx, k, location) for k in fx.kept],
        "properties": {
            "verdict": fx.verdict,
            "verified": fx.verified,
            "signature": "ok" if fx.signature_ok else "does not verify",
            "signer": fx.signer,
            "signerPinned": fx.pinned,
            "modelDigest": fx.model_digest,
            "audited": fx.created,
            "problems": fx.problems,
        },
    }
    if not artifacts:
        del run["artifacts"]
    if base:
        run["originalUriBaseIds"] = {"MODELDIR": {"uri": base}}
    doc = {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
