"""Plain-text and Markdown renderings of a report's `Facts`.

The Markdown form fits a pull-request comment: the verdict line, why, the deciding figures against
their thresholds with the margin, the kept PVs with their trigger hints, and the commands that
verify and reproduce the audit.
"""

from __future__ import annotations

import re

from .facts import BACKDOORED, CLEAN, Facts, KeptPV, num

UNVERIFIED = "UNVERIFIED"
UNVERIFIED_LINE = (
    "UNVERIFIED REPORT: it fails verification; its content may be forged or altered and must "
    "not be trusted."
)


def signature_line(fx: Facts) -> str:
    if not fx.signature_ok:
        return "does not verify"
    how = "pinned with --pub" if fx.pinned else "key embedded in the report; pin it with --pub"
    return f"ok, signer key {fx.signer} ({how})"


def audited_line(fx: Facts) -> str:
    secs = f" in {fx.seconds:.1f}s" if fx.seconds is not None else ""
    on = f" on {fx.device}" if fx.device else ""
    return (
        f"{fx.created} by {fx.tool}, preset {fx.preset or '-'}, mode {fx.mode or '-'}{on}{secs}"
    )


def verdict_words(fx: Facts) -> str:
    found = f" on target(s) {', '.join(fx.found_targets)}" if fx.found_targets else ""
    head = f"{UNVERIFIED} " if not fx.verified else ""
    return f"{head}verdict: {fx.verdict}{found}"


def pv_title(k: KeptPV) -> str:
    seed = f"seed {k.seed}" if k.seed is not None else "seed -"
    return f"PV {k.id} target {k.target} {seed}"


def hint_text(k: KeptPV) -> str:
    return ", ".join(k.hint_words) or "-"


def render_text(fx: Facts) -> str:
    out: list[str] = []
    if not fx.verified:
        bar = "!" * 78
        out += [bar, UNVERIFIED_LINE]
        out += [f"  - {p}" for p in fx.problems]
        out += [bar, ""]
    out.append(f"lmsan audit report -- {verdict_words(fx)}")
    out.append("")
    rows = [
        ("model", f"{fx.model_name} ({fx.model_type or 'unknown type'})"),
        ("model path", fx.model_path),
        ("model digest", fx.model_digest),
        ("signature", signature_line(fx)),
        ("audited", audited_line(fx)),
        ("corpus", fx.corpus),
    ]
    if fx.model_checked:
        rows.append(("model folder", fx.model_checked))
    out += [f"{k:<13} {v}" for k, v in rows]
    out += ["", "Why", f"  {fx.why}"]
    if fx.kept:
        out += ["", "Deciding figures (kept PVs)"]
        for k in fx.kept:
            out.append(f"  {pv_title(k)}")
            out += [f"    {g.describe()}" for g in k.figures]
            out.append(f"    trigger hint: {hint_text(k)}")
            if k.hint:
                alts = "; ".join(f"{i}: {' '.join(h)}" for i, h in enumerate(k.hint))
                out.append(f"    nearest tokens per soft-prompt position: {alts}")
    if fx.near_misses:
        out += ["", "Closest approach to acceptance (per target)"]
        for m in fx.near_misses:
            out.append(f"  {m.target} seed {m.seed}: {m.figure.describe()}")
    for t, why in fx.skipped.items():
        out.append(f"  target {t} skipped: {why}")
    out += ["", "Verify and reproduce", f"  {fx.verify_cmd}"]
    if fx.reproduce:
        out.append(f"  {fx.reproduce}")
    if not fx.verified:
        out += ["", UNVERIFIED_LINE]
    return "\n".join(out) + "\n"


_MD_SPECIAL = re.compile(r"([\\`*\[\]|~]|(?<![0-9A-Za-z])_)")


def md_escape(s: str) -> str:
    """Text that Markdown shows literally, also inside a table cell."""
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", s).replace("\n", " ")


def md_code(s: str) -> str:
    """An inline code span holding `s` (backticks in `s` get a longer fence)."""
    fence = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s.replace('|', '&#124;').replace(chr(10), ' ')}{pad}{fence}"


def render_md(fx: Facts) -> str:
    out: list[str] = []
    if not fx.verified:
        out += [f"> [!CAUTION]\n> **{UNVERIFIED_LINE}**"]
        out += [f"> - {md_escape(p)}" for p in fx.problems]
        out.append("")
    mark = {BACKDOORED: "BACKDOORED", CLEAN: "CLEAN"}.get(fx.verdict, fx.verdict)
    found = f" on target(s) {', '.join(map(md_code, fx.found_targets))}" if fx.found_targets else ""
    pre = f"{UNVERIFIED} " if not fx.verified else ""
    out.append(f"### lmsan audit: {pre}**{mark}**{found}")
    out.append("")
    out.append(
        f"Model {md_code(fx.model_name)} ({md_escape(fx.model_type or 'unknown type')}), "
        f"digest {md_code(fx.model_digest)}; signature {md_escape(signature_line(fx))}."
    )
    out += ["", f"**Why.** {md_escape(fx.why)}"]
    if fx.kept:
        out += ["", "#### Deciding figures", "",
                "| PV | target | seed | figure | value | threshold | margin |",
                "|---:|---|---:|---|---:|---:|---:|"]
        for k in fx.kept:
            for g in k.figures:
                f = g.factor
                times = f" ({f:.3g}x)" if f is not None else ""
                out.append(
                    f"| {k.id} | {md_code(k.target)} | {k.seed} | {g.name} {g.op} "
                    f"{g.threshold_name} | {num(g.value)} | {num(g.threshold)} | "
                    f"{g.margin:+.4g}{times} |"
                )
        out += ["", "#### Kept PVs and trigger hints", "",
                "| PV | target | seed | trigger hint (nearest token per soft-prompt position) |",
                "|---:|---|---:|---|"]
        for k in fx.kept:
            words = " ".join(md_code(w) for w in k.hint_words) or "-"
            out.append(f"| {k.id} | {md_code(k.target)} | {k.seed} | {words} |")
    if fx.near_misses:
        out += ["", "#### Closest approach to acceptance", "",
                "| target | seed | figure | value | threshold | margin |",
                "|---|---:|---|---:|---:|---:|"]
        for m in fx.near_misses:
            g = m.figure
            out.append(
                f"| {md_code(m.target)} | {m.seed} | {g.name} {g.op} {g.threshold_name} | "
                f"{num(g.value)} | {num(g.threshold)} | {g.margin:+.4g}"
                + (f" ({g.factor:.3g}x)" if g.factor is not None else "") + " |"
            )
    if fx.skipped:
        out.append("")
        out += [f"- target {md_code(t)} skipped: {md_escape(w)}" for t, w in fx.skipped.items()]
    out += ["", "<details><summary>Audit details</summary>", "",
            "| | |", "|---|---|",
            f"| model path | {md_code(fx.model_path)} |",
            f"| audited | {md_escape(audited_line(fx))} |",
            f"| corpus | {md_code(fx.corpus)} |"]
    if fx.model_checked:
        out.append(f"| model folder | {md_escape(fx.model_checked)} |")
    out += ["", "</details>", "", "#### Verify and reproduce", "", "```sh", fx.verify_cmd]
    if fx.reproduce:
        out.append(fx.reproduce)
    out.append("```")
    if not fx.verified:
        out += ["", f"**{UNVERIFIED_LINE}**"]
    return "\n".join(out) + "\n"
