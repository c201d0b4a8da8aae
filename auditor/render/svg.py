"""Inline SVG pictures for the HTML report, drawn by hand: no library, no script, no network.

`seed_chart` plots one figure of every seed of one target on a log axis against its threshold;
`sign_strip` draws the sign pattern of each kept PV as a strip of unit cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from .facts import KeptPV, num

ACCEPTED = "#c62828"  # kept PV
REJECTED = "#ef6c00"  # candidate the filter rejected
PLAIN = "#78909c"  # no candidate
POS = "#1565c0"
NEG = "#f9a825"


@dataclass
class Point:
    x: int  # the seed
    y: float | None  # None: not measured (aborted seed)
    kind: str  # "accepted" | "rejected" | "none"


@dataclass
class Line:
    value: float
    label: str  # e.g. "T_L 0.1"
    passes: str  # "above" | "below": the side that passes


def _ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten within [lo, hi]; with 2x and 5x added when fewer than three fall inside."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    step = max(1, (b - a) // 6)
    ticks = [10.0**e for e in range(a, b + 1, step) if lo <= 10.0**e <= hi]
    if len(ticks) < 3:
        ticks = [m * 10.0**e for e in range(a, b + 1) for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    return ticks


def seed_chart(title: str, points: list[Point], lines: list[Line], width: int = 460,
               height: int = 220) -> str:
    """One figure per seed on a log axis, with each threshold as a dashed line; the passing
    side of the first threshold is shaded."""
    left, right, top, bottom = 58, 12, 26, 34
    pw, ph = width - left - right, height - top - bottom
    vals = [p.y for p in points if p.y is not None and p.y > 0] + [ln.value for ln in lines
                                                                   if ln.value > 0]
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="16" class="ttl">{escape(title)}</text>']
    if not vals:
        parts.append(f'<text x="{left}" y="{top + ph / 2}" class="note">not measured</text></svg>')
        return "".join(parts)
    lo, hi = min(vals) / 2.0, max(vals) * 2.0
    l_lo, l_hi = math.log10(lo), math.log10(hi)

    def ys(v: float) -> float:
        v = max(v, lo)
        return top + ph - (math.log10(v) - l_lo) / (l_hi - l_lo) * ph

    seeds = sorted({p.x for p in points}) or [0]
    n = len(seeds)

    def xs(s: int) -> float:
        i = seeds.index(s)
        return left + (pw * (i + 0.5) / n)

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>')
    if lines:
        y0 = ys(lines[0].value)
        y, h = (top, y0 - top) if lines[0].passes == "above" else (y0, top + ph - y0)
        parts.append(f'<rect x="{left}" y="{y:.1f}" width="{pw}" height="{max(h, 0):.1f}" '
                     'class="pass"/>')
    for t in _ticks(lo, hi):
        y = ys(t)
        if top <= y <= top + ph:
            parts.append(f'<line x1="{left - 4}" x2="{left}" y1="{y:.1f}" y2="{y:.1f}" '
                         'class="axis"/>')
            parts.append(f'<text x="{left - 6}" y="{y + 3:.1f}" class="tick" '
                         f'text-anchor="end">{num(t)}</text>')
    label_every = max(1, n // 12)
    for i, s in enumerate(seeds):
        if i % label_every == 0:
            parts.append(f'<text x="{xs(s):.1f}" y="{top + ph + 14}" class="tick" '
                         f'text-anchor="middle">{s}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" class="tick" '
                 'text-anchor="middle">seed</text>')
    for ln in lines:
        y = ys(ln.value)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                     'class="thr"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{y - 4:.1f}" class="thrl" '
                     f'text-anchor="end">{escape(ln.label)}</text>')
    r = 4 if n <= 60 else 2.5
    for p in points:
        x = xs(p.x)
        if p.y is None:
            parts.append(f'<text x="{x:.1f}" y="{top + ph - 4}" class="na" '
                         f'text-anchor="middle">&#215;<title>seed {p.x}: not measured'
                         '</title></text>')
            continue
        colour = {"accepted": ACCEPTED, "rejected": REJECTED}.get(p.kind, PLAIN)
        fill = colour if p.kind != "rejected" else "white"
        what = {"accepted": "kept PV", "rejected": "candidate, rejected"}.get(p.kind,
                                                                             "no candidate")
        parts.append(f'<circle cx="{x:.1f}" cy="{ys(p.y):.1f}" r="{r}" fill="{fill}" '
                     f'stroke="{colour}" stroke-width="1.5"><title>seed {p.x}: {num(p.y)} '
                     f'({what})</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def legend() -> str:
    items = [(ACCEPTED, ACCEPTED, "kept PV"), ("white", REJECTED, "candidate, rejected"),
             (PLAIN, PLAIN, "no candidate")]
    parts = ['<svg class="legend" viewBox="0 0 640 20" width="640" height="20">']
    x = 4
    for fill, stroke, label in items:
        parts.append(f'<circle cx="{x + 5}" cy="10" r="4" fill="{fill}" stroke="{stroke}" '
                     'stroke-width="1.5"/>')
        parts.append(f'<text x="{x + 14}" y="14" class="tick">{label}</text>')
        x += 24 + 7 * len(label)
    parts.append(f'<rect x="{x}" y="4" width="14" height="12" class="pass"/>'
                 f'<text x="{x + 18}" y="14" class="tick">passing side</text>'
                 f'<text x="{x + 110}" y="14" class="na">&#215;</text>'
                 f'<text x="{x + 122}" y="14" class="tick">not measured (seed aborted)</text>'
                 "</svg>")
    return "".join(parts)


def sign_strip(kept: list[KeptPV], width: int = 720) -> str:
    """Each kept PV's signs as one row: unit j is a cell, blue for >= 0, amber for < 0."""
    rows = [k for k in kept if k.signs]
    if not rows:
        return '<p class="note">The report holds no PV values.</p>'
    label_w, row_h, gap = 120, 18, 6
    d = max(len(k.signs) for k in rows)
    cell = (width - label_w) / d
    height = len(rows) * (row_h + gap) + 18
    parts = [f'<svg class="strip" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="sign patterns of the kept PVs">']
    for r, k in enumerate(rows):
        y = r * (row_h + gap)
        parts.append(f'<text x="0" y="{y + 13}" class="tick">PV {k.id} {escape(k.target)} '
                     f's{k.seed}</text>')
        j = 0
        while j < len(k.signs):  # one rectangle per run of equal signs
            e = j
            while e < len(k.signs) and k.signs[e] == k.signs[j]:
                e += 1
            colour = POS if k.signs[j] == "+" else NEG
            parts.append(f'<rect x="{label_w + j * cell:.2f}" y="{y}" '
                         f'width="{(e - j) * cell:.2f}" height="{row_h}" fill="{colour}">'
                         f'<title>units {j}-{e - 1}: {"positive" if k.signs[j] == "+" else "negative"}'
                         '</title></rect>')
            j = e
    y = len(rows) * (row_h + gap) + 12
    parts.append(f'<text x="{label_w}" y="{y}" class="tick">unit 0</text>')
    parts.append(f'<text x="{width}" y="{y}" class="tick" text-anchor="end">unit {d - 1}</text>')
    parts.append("</svg>")
    return "".join(parts)
