"""The HTML report: one self-contained file (inline CSS and SVG, no script, no external asset).

Sections: the verdict banner (and, for a report that fails verification, an UNVERIFIED banner
above everything), why, the model identity and signature status, the deciding figures of each
kept PV, each target's per-seed distance and concentration against T_L and T_collapse, the kept
PVs' sign patterns, the trigger hints, and the commands that verify and reproduce the audit.
"""

from __future__ import annotations

from html import escape

from .facts import Facts, Figure, num
from .svg import Line, Point, legend, seed_chart, sign_strip
from .text import UNVERIFIED, UNVERIFIED_LINE, audited_line, signature_line

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#212121;
background:#fafafa}
main{max-width:980px;margin:0 auto;padding:0 20px 40px}
h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.banner{padding:18px 20px;color:#fff;font-size:24px;font-weight:700;margin:0 -20px 12px}
.banner small{display:block;font-size:14px;font-weight:400;margin-top:4px}
.v-backdoored{background:#b71c1c}.v-clean{background:#2e7d32}.v-unknown{background:#546e7a}
.unverified{background:repeating-linear-gradient(45deg,#000 0 14px,#fdd835 14px 28px);
padding:10px;margin:0 -20px}
.unverified div{background:#fff;border:3px solid #000;padding:10px 14px;font-weight:700;
font-size:18px;color:#b71c1c}
.unverified li{font-weight:400;font-size:13px;color:#212121}
table{border-collapse:collapse;margin:6px 0}
td,th{padding:3px 10px;border-bottom:1px solid #e0e0e0;text-align:left;vertical-align:top}
th{background:#eceff1}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#2e7d32;font-weight:600}.bad{color:#b71c1c;font-weight:600}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#263238;color:#eceff1;padding:10px;overflow-x:auto;border-radius:4px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg text{font:11px system-ui,sans-serif;fill:#37474f}
svg .ttl{font-weight:600;font-size:12px}
svg .plot{fill:#fff;stroke:#b0bec5}
svg .pass{fill:#e8f5e9;stroke:none}
svg .axis{stroke:#90a4ae}
svg .thr{stroke:#b71c1c;stroke-dasharray:5 3;stroke-width:1.5}
svg .thrl{fill:#b71c1c;font-weight:600}
svg .na{fill:#90a4ae}
.note{color:#607d8b}
.tok{display:inline-block;background:#eceff1;border-radius:3px;padding:0 5px;margin:1px;
font-family:ui-monospace,Menlo,Consolas,monospace}
.tok.top{background:#ffcdd2;font-weight:600}
"""


def _e(x: object) -> str:
    return escape(str(x))


def _row(k: str, v: str) -> str:
    return f"<tr><th>{_e(k)}</th><td>{v}</td></tr>"


def _fig_cells(g: Figure) -> str:
    f = g.factor
    times = f" ({f:.3g}&#215;)" if f is not None else ""
    cls = "ok" if g.passes else "bad"
    return (f"<td>{_e(g.name)} {_e(g.op)} {_e(g.threshold_name)}</td>"
            f'<td class="n">{num(g.value)}</td><td class="n">{num(g.threshold)}</td>'
            f'<td class="n {cls}">{g.margin:+.4g}{times}</td>')


def _unverified(fx: Facts) -> str:
    items = "".join(f"<li>{_e(p)}</li>" for p in fx.problems)
    return (f'<div class="unverified"><div>{UNVERIFIED_LINE}<ul>{items}</ul></div></div>')


def _banner(fx: Facts) -> str:
    found = f" on {', '.join(fx.found_targets)}" if fx.found_targets else ""
    pre = f"{UNVERIFIED} " if not fx.verified else ""
    return (f'<div class="banner v-{_e(fx.verdict.lower())}">{pre}{_e(fx.verdict)}{_e(found)}'
            f"<small>{_e(fx.why)}</small></div>")


def _identity(fx: Facts) -> str:
    sig_cls = "ok" if fx.signature_ok else "bad"
    rows = [
        _row("model", f"<code>{_e(fx.model_name)}</code> ({_e(fx.model_type or 'unknown type')})"),
        _row("model path", f"<code>{_e(fx.model_path)}</code>"),
        _row("model digest", f"<code>{_e(fx.model_digest)}</code>"),
        _row("files", f"{len(fx.model_files)}"
             + (f", weights <code>{_e(fx.weights_file)}</code>" if fx.weights_file else "")),
        _row("report", f'<span class="{"ok" if fx.verified else "bad"}">'
             f'{"verifies" if fx.verified else "does NOT verify"}</span>'),
        _row("signature", f'<span class="{sig_cls}">{_e(signature_line(fx))}</span>'),
        _row("audited", _e(audited_line(fx))),
        _row("corpus", f"<code>{_e(fx.corpus)}</code>"),
    ]
    if fx.model_checked:
        rows.append(_row("model folder", _e(fx.model_checked)))
    return "<table>" + "".join(rows) + "</table>"


def _figures(fx: Facts) -> str:
    head = ("<tr><th>PV</th><th>target</th><th>seed</th><th>figure</th><th>value</th>"
            "<th>threshold</th><th>margin</th></tr>")
    if fx.kept:
        rows = [f"<tr><td>{k.id}</td><td>{_e(k.target)}</td><td>{_e(k.seed)}</td>"
                f"{_fig_cells(g)}</tr>" for k in fx.kept for g in k.figures]
        return f"<h2>Deciding figures</h2><table>{head}{''.join(rows)}</table>"
    if fx.near_misses:
        rows = [f"<tr><td>-</td><td>{_e(m.target)}</td><td>{_e(m.seed)}</td>"
                f"{_fig_cells(m.figure)}</tr>" for m in fx.near_misses]
        return ("<h2>Closest approach to acceptance</h2><p>Per target, the candidate that came "
                f"nearest to being kept; a negative margin is its distance from acceptance.</p>"
                f"<table>{head}{''.join(rows)}</table>")
    return ""


def _charts(fx: Facts) -> str:
    if not fx.seeds:
        return ""
    out = ["<h2>Seeds against the thresholds</h2><p>Each point is one fuzz seed. Left: the "
           "distance of the outputs from the clean outputs (what T_L reads); a seed above T_L "
           "makes a candidate. Right: how tightly the prompted outputs gather (concentration); "
           "a candidate below T_collapse collapsed, the mark of a backdoor. Both axes are "
           "logarithmic; the shaded band is the side that passes.</p>", legend()]
    for t in fx.targets or sorted({p.target for p in fx.seeds}):
        pts = [p for p in fx.seeds if p.target == t]
        th = fx.thresholds.get(t)
        kinds = ["accepted" if p.accepted else "rejected" if p.candidate else "none" for p in pts]
        dist_lines = [Line(th.t_l, f"T_L {num(th.t_l)}", "above")] if th and th.t_l else []
        if th and th.t_far:
            dist_lines.append(Line(th.t_far, f"T_far {num(th.t_far)}", "above"))
        conc_lines = ([Line(th.t_collapse, f"T_collapse {num(th.t_collapse)}", "below")]
                      if th and th.t_collapse else [])
        out.append('<div class="charts">')
        out.append(seed_chart(f"{t}: distance per seed",
                              [Point(p.seed, p.distance, k) for p, k in zip(pts, kinds, strict=True)],
                              dist_lines))
        out.append(seed_chart(f"{t}: concentration per seed",
                              [Point(p.seed, p.concentration, k) for p, k in zip(pts, kinds, strict=True)],
                              conc_lines))
        out.append("</div>")
    return "".join(out)


def _hints(fx: Facts) -> str:
    if not fx.kept:
        return ""
    rows = []
    for k in fx.kept:
        cells = "".join(
            "<td>" + "".join(f'<span class="tok{" top" if i == 0 else ""}">{_e(w)}</span>'
                             for i, w in enumerate(h)) + "</td>" for h in k.hint)
        rows.append(f"<tr><td>PV {k.id} {_e(k.target)} seed {_e(k.seed)}</td>{cells}</tr>")
    n = max((len(k.hint) for k in fx.kept), default=0)
    head = "<tr><th>PV</th>" + "".join(f"<th>position {i}</th>" for i in range(n)) + "</tr>"
    return ("<h2>Trigger hints</h2><p>The vocabulary tokens nearest to each vector of the soft "
            "prompt that produced the PV, nearest first. The trigger is not recovered exactly; "
            "words that recur across positions or PVs are the likely trigger words.</p>"
            f"<table>{head}{''.join(rows)}</table>")


def render_html(fx: Facts) -> str:
    title = f"{UNVERIFIED + ' ' if not fx.verified else ''}lmsan: {fx.verdict} {fx.model_name}"
    body = [_unverified(fx) if not fx.verified else "", _banner(fx)]
    body += ["<h2>Model and signature</h2>", _identity(fx), _figures(fx), _charts(fx)]
    if fx.kept:
        body += ["<h2>Sign patterns of the kept PVs</h2><p>Each row is one PV: a cell per output "
                 "unit, blue where the PV is positive, amber where negative. The scanner flags an "
                 "input whose output signs agree with a row above T_match.</p>",
                 sign_strip(fx.kept), _hints(fx)]
    for t, why in fx.skipped.items():
        body.append(f'<p class="note">target {_e(t)} skipped: {_e(why)}</p>')
    cmds = "\n".join(c for c in (fx.verify_cmd, fx.reproduce) if c)
    body += ["<h2>Verify and reproduce</h2>", f"<pre>{_e(cmds)}</pre>"]
    if not fx.verified:
        body.append(_unverified(fx))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "".join(body) + "</main></body></html>\n")


__all__ = ["render_html"]
