"""`lmsan keygen` and `lmsan verify`: signing keys and signed-report verification. Torch-free."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import EXIT_CLEAN, EXIT_FOUND
from .app import app, console

if TYPE_CHECKING:
    from ..report import Verification


class KeyKindOption(str, Enum):
    ed25519 = "ed25519"
    ecdsa_p256 = "ecdsa-p256"


@app.command()
def keygen(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Private key file to write (PEM, mode 0600); the public key goes to OUT.pub.",
        show_default="the per-user key, $LMSAN_HOME/signing_key.pem or "
        "~/.config/lmsan/signing_key.pem",
    ),
    kind: KeyKindOption = typer.Option(
        KeyKindOption.ed25519, "--kind", help="Signature algorithm: ed25519 or ecdsa-p256."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite an existing key (the old one is lost)."
    ),
) -> None:
    """Create a signing key pair for audit reports and print its fingerprint.

    Exit 0 created, 2 input error (a key exists there: --force replaces it), 4 usage error.
    """
    from ..signing import generate_key, user_key_path

    info = generate_key(out or user_key_path(), kind.value, force=force)
    console.print(
        f"[green]created[/] {info.kind} key [bold]{escape(str(info.path))}[/] (mode 0600)"
    )
    console.print(f"public key  {escape(str(info.pub_path))}")
    console.print(f"fingerprint [bold]{info.fingerprint}[/]")


def _signer_note(v: Verification) -> str:
    """How the signer key shown for `v` relates to the key pinned with --pub (if any)."""
    if not v.pinned:
        if v.signature_ok:
            return "[dim](key embedded in the report; pin it with --pub)[/]"
        return "[dim](key the report names; its signature does not verify)[/]"
    if v.fingerprint != v.pinned_fingerprint:
        return (
            "[red](the report's key; it does not match the key pinned with --pub, "
            f"{v.pinned_fingerprint})[/]"
        )
    if v.signature_ok:
        return "[dim](pinned with --pub)[/]"
    return "[red](the key pinned with --pub, but the signature does not verify)[/]"


@app.command()
def verify(
    report: Path = typer.Argument(..., help="The signed audit report (JSON) to check."),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="Model folder to compare with the report's manifest; each file added, removed or "
        "changed since the audit is named.",
    ),
    pub: Path | None = typer.Option(
        None,
        "--pub",
        help="Public key (PEM, e.g. signing_key.pem.pub) the report must be signed with. Without "
        "it the key embedded in the report is used: that proves the report is intact, not who "
        "signed it.",
    ),
) -> None:
    """Check a signed audit report: signature, format and, with --model, the model folder.

    Exit 0 valid, 1 invalid (bad signature, not signed by --pub, malformed field, model folder
    changed), 2 unreadable input or not a signed report, 4 usage error.
    """
    from ..report import verify_report

    v = verify_report(report, model_dir=model, pub=pub)

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("report", escape(str(report)))
    sig = "[green]ok[/]" if v.signature_ok else "[bold red]INVALID[/] (does not verify)"
    table.add_row("signature", sig)
    if v.fingerprint:
        table.add_row("signer key", f"{v.fingerprint} {_signer_note(v)}")
    if v.predicate is not None:
        pred = v.predicate
        # the predicate of a report whose signature fails is a claim, not a fact
        claim = "" if v.signature_ok else " [dim](unverified claim)[/]"
        table.add_row("model digest", f"{v.model_digest}{claim}")
        table.add_row(
            "audited", f"{escape(str(pred['model']['path']))} at {escape(pred['created'])}{claim}"
        )
        tool = pred["tool"]
        table.add_row("tool", escape(f"{tool['name']} {tool['version']}") + claim)
        if "verdict" in pred:
            if v.signature_ok:
                table.add_row("verdict", escape(str(pred["verdict"])))
            else:
                table.add_row("verdict", "[bold red]signature INVALID: verdict not trusted[/]")
    if model is not None and v.diff is not None:
        if v.diff.same:
            table.add_row("model folder", f"[green]matches[/] ({v.model_files} files)")
        else:
            n = len(v.diff.added) + len(v.diff.removed) + len(v.diff.changed)
            table.add_row("model folder", f"[red]differs[/] ({n} file(s))")
    console.print(table)

    if v.valid:
        console.print("[bold green]VALID[/]")
        raise typer.Exit(EXIT_CLEAN)
    for problem in v.problems:
        console.print(f"  [red]-[/] {escape(problem)}", highlight=False)
    console.print("[bold red]INVALID[/]")
    raise typer.Exit(EXIT_FOUND)
