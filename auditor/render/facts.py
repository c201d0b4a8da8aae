"""What every rendering of a report says, read once from the verified predicate. Torch-free.

`facts(verified)` turns the report's predicate (see `auditor.report`) into plain records: the
verdict and why, the figures that decided it set against their thresholds with the margin, the
kept PVs with their trigger hints and sign patterns, each seed's figures per target, the model's
identity and the signature status. The renderers (`text`, `html`, `sarif`) only lay these out,
so every format states the same numbers.

Which figure each threshold reads (see docs/how-it-works.md): T_L reads the distance of the last
training epoch (`epoch_distance[-1]`, MSE to the clean outputs over their mean square); the
collapse rule reads the concentration against T_collapse, or a distance far beyond every clean
shadow against T_far when the preset sets one; the paper rule reads the raw-output entropy against
T_div. Thresholds are per target: `parameters.mining.per_target[target]` overrides the global one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..report import Verification
from .commands import audit_command, verify_command

BACKDOORED = "BACKDOORED"
CLEAN = "CLEAN"
UNKNOWN = "UNKNOWN"


@dataclass
class Figure:
    """One figure against its threshold: `value op threshold` passes; `margin` is signed (> 0 on
    the passing side) and `factor` says how many times over (or under) the threshold it lies."""

    name: str  # e.g. "distance"
    value: float
    op: str  # ">", ">=", "<" or "<=": the side of the threshold that passes
    threshold_name: str  # e.g. "T_L"
    threshold: float

    @property
    def passes(self) -> bool:
        return {">": self.value > self.threshold, ">=": self.value >= self.threshold,
                "<": self.value < self.threshold, "<=": self.value <= self.threshold}[self.op]

    @property
    def above(self) -> bool:
        """Whether this figure passes above its threshold (">" or ">=")."""
        return self.op.startswith(">")

    @property
    def margin(self) -> float:
        d = self.value - self.threshold
        return d if self.above else -d

    @property
    def factor(self) -> float | None:
        """value / threshold for ">", threshold / value for "<"; None when undefined."""
        num, den = (self.value, self.threshold) if self.above else (self.threshold, self.value)
        if den <= 0 or num <= 0:
            return None
        return num / den

    def describe(self) -> str:
        """e.g. 'distance 3.069 > T_L 0.1 (margin +2.969, 30.7x)'."""
        op = self.op if self.passes else {">": "<=", ">=": "<", "<": ">=", "<=": ">"}[self.op]
        f = self.factor
        times = f", {f:.3g}x" if f is not None else ""
        return (
            f"{self.name} {num(self.value)} {op} {self.threshold_name} {num(self.threshold)} "
            f"(margin {self.margin:+.4g}{times})"
        )


@dataclass
class KeptPV:
    id: int
    target: str
    seed: int | None
    rule: str
    figures: list[Figure]
    hint: list[list[str]]  # per soft-prompt position, the nearest vocabulary tokens
    signs: str  # "+" / "-" per unit of the PV (empty when the values are not in the report)

    @property
    def hint_words(self) -> list[str]:
        """The nearest token of each soft-prompt position, each word once, in order."""
        return list(dict.fromkeys(h[0] for h in self.hint if h))


@dataclass
class NearMiss:
    """A clean target's closest approach to acceptance, for the 'why clean' section."""

    target: str
    seed: int | None
    rule: str
    figure: Figure


@dataclass
class SeedPoint:
    seed: int
    target: str
    distance: float | None  # the figure T_L reads
    concentration: float | None
    candidate: bool
    accepted: bool
    aborted: bool
    clean_match: float | None = None  # share of clean outputs already at its point, if measured


@dataclass
class Thresholds:
    t_l: float | None
    t_collapse: float | None
    t_far: float | None
    t_div: float | None
    rule: str  # "collapse" | "paper"
    confirm_min_rate: float | None = None  # rule 4 (trigger confirmation), when it ran
    confirm_max_residual: tuple[float, ...] = ()  # rule 4 of reports of earlier versions
    confirm_max_clean_match: float | None = None  # rule 4a, when rule 4 ran


@dataclass
class Facts:
    verified: bool
    problems: list[str]
    verdict: str  # BACKDOORED | CLEAN | UNKNOWN (predicate unreadable)
    why: str
    found_targets: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kept: list[KeptPV] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    seeds: list[SeedPoint] = field(default_factory=list)
    thresholds: dict[str, Thresholds] = field(default_factory=dict)
    rejected: int = 0
    model_name: str = ""
    model_path: str = ""
    model_type: str = ""
    model_digest: str = ""
    model_files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    model_checked: str = ""  # "" not compared; else a sentence on the model folder comparison
    signer: str = ""
    pinned: bool = False
    signature_ok: bool = False
    tool: str = ""
    created: str = ""
    preset: str = ""
    mode: str = ""
    device: str = ""
    seconds: float | None = None
    corpus: str = ""
    reproduce: str = ""
    verify_cmd: str = ""
    report_path: str = ""

    @property
    def weights_file(self) -> str | None:
        """The model's weights file (relative to the model folder), for artifact locations."""
        for ext in (".safetensors", ".bin", ".pt", ".onnx"):
            for f in self.model_files:
                if f.endswith(ext):
                    return f
        return next(iter(self.model_files), None)


def num(x: float | None) -> str:
    """A figure in four significant digits; '-' when not measured."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4g}"


def _f(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _d(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _l(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _thresholds(mining: dict[str, Any], target: str) -> Thresholds:
    own = _d(_d(mining.get("per_target")).get(target))

    def pick(key: str) -> float | None:
        return _f(own[key]) if key in own else _f(mining.get(key))

    return Thresholds(
        t_l=pick("t_l"),
        t_collapse=pick("t_collapse"),
        t_far=_f(own.get("t_far")),
        t_div=_f(mining.get("t_div")),
        rule=str(mining.get("filter_rule") or "collapse"),
        confirm_min_rate=_f(mining.get("confirm_min_rate")) if mining.get("confirm") else None,
        confirm_max_clean_match=(_f(mining.get("confirm_max_clean_match"))
                                 if mining.get("confirm") else None),
        confirm_max_residual=tuple(x for x in (_f(v) for v in _l(mining.get("confirm_max_residual")))
                                   if x is not None),
    )


def _seed_target(pred: dict[str, Any], seed: Any, target: str) -> dict[str, Any]:
    for s in _l(pred.get("seeds")):
        if isinstance(s, dict) and s.get("seed") == seed:
            for t in _l(s.get("targets")):
                if isinstance(t, dict) and t.get("target") == target:
                    return t
    return {}


def _last_distance(st: dict[str, Any], fallback: Any = None) -> float | None:
    ed = _l(st.get("epoch_distance"))
    return _f(ed[-1]) if ed else _f(fallback)


def _deciding(th: Thresholds, dist: float | None, c: dict[str, Any]) -> list[Figure]:
    """The figures a candidate was judged on, against the thresholds its target uses."""
    out: list[Figure] = []
    if dist is not None and th.t_l is not None:
        out.append(Figure("distance", dist, ">", "T_L", th.t_l))
    conc, ent = _f(c.get("concentration")), _f(c.get("entropy_raw"))
    rule = str(c.get("rule", ""))
    if th.rule == "paper":
        if ent is not None and th.t_div is not None:
            out.append(Figure("L_div", ent, "<", "T_div", th.t_div))
    elif "T_far" in rule and rule.startswith("accepted") and dist is not None and th.t_far:
        out.append(Figure("distance", dist, ">", "T_far", th.t_far))
    elif conc is not None and th.t_collapse is not None:
        out.append(Figure("concentration", conc, "<", "T_collapse", th.t_collapse))
    cm = _f(c.get("clean_match"))
    if cm is not None and th.confirm_max_clean_match is not None:
        out.append(Figure("clean outputs at the PV", cm, "<=", "limit",
                          th.confirm_max_clean_match))
    return out + _trigger_figures(th, c.get("confirmation"))


def _trigger_figures(th: Thresholds, conf: Any) -> list[Figure]:
    """Rule 4's figures for a candidate whose trigger was searched: the held-out reach rate
    against its minimum and the share of clean outputs where the trigger lands against its
    limit (reports of earlier versions: the residual against the limit for the trigger's
    length); for a candidate refused at the point of an earlier failed search, that search's
    margin."""
    if not isinstance(conf, dict):
        return []
    if isinstance(conf.get("same_point_as"), dict):
        m = _f(conf.get("margin"))
        seed = conf["same_point_as"].get("seed")
        return [] if m is None else [
            Figure(f"trigger margin (point of seed {seed})", m, ">=", "1", 1.0)]
    rate = _f(conf.get("rate"))
    out: list[Figure] = []
    if rate is not None and th.confirm_min_rate is not None:
        out.append(Figure("trigger reach", rate, ">=", "min rate", th.confirm_min_rate))
    land, land_lim = _f(conf.get("landing_match")), _f(conf.get("landing_limit"))
    if land is not None and land_lim is not None:
        out.append(Figure("clean outputs where the trigger lands", land, "<=", "limit",
                          land_lim))
        return out
    resid, n, lim = _f(conf.get("residual")), len(_l(conf.get("tokens"))), th.confirm_max_residual
    if resid is not None and lim and n > 0:
        out.append(Figure(f"trigger residual ({n} token{'s' if n > 1 else ''})", resid, "<=",
                          "limit", lim[min(n, len(lim)) - 1]))
    return out


def bottleneck(figs: list[Figure]) -> Figure | None:
    """The figure nearest to (or furthest past) failing: the smallest factor."""
    scored = [(g.factor, g) for g in figs if g.factor is not None]
    if not scored:
        return figs[-1] if figs else None
    return min(scored, key=lambda x: x[0])[1]


def _signs(pred: dict[str, Any], pv_id: Any) -> str:
    for p in _l(_d(pred.get("pvset")).get("pvs")):
        if isinstance(p, dict) and p.get("id") == pv_id:
            vals = _l(p.get("values"))
            return "".join("+" if (_f(v) or 0.0) >= 0 else "-" for v in vals)
    return ""


def _hint(x: Any) -> list[list[str]]:
    return [[str(w) for w in _l(pos)] for pos in _l(x)]


def facts(
    v: Verification, report_path: str = "", model_dir: str | None = None
) -> Facts:
    """Read a verification result (and the predicate it decoded) into `Facts`."""
    pred = v.predicate or {}
    verdict = str(pred.get("verdict", "")).upper() or UNKNOWN
    if verdict not in (BACKDOORED, CLEAN):
        verdict = UNKNOWN
    model = _d(pred.get("model"))
    pvset = _d(pred.get("pvset"))
    mining = _d(_d(pred.get("parameters")).get("mining"))
    targets = [str(t) for t in _l(pred.get("targets"))]
    fx = Facts(
        verified=v.valid,
        problems=list(v.problems),
        verdict=verdict,
        why="",
        found_targets=[str(t) for t in _l(pred.get("found_targets"))],
        targets=targets,
        skipped={str(k): str(w) for k, w in _d(pred.get("skipped_targets")).items()},
        thresholds={t: _thresholds(mining, t) for t in targets},
        rejected=len(_l(pred.get("rejected_candidates"))),
        model_path=str(model.get("path", "")),
        model_type=str(_d(pvset.get("model")).get("model_type", "")),
        model_digest=str(v.model_digest or model.get("digest", "")),
        model_files={
            str(_d(f).get("path")): str(_d(f).get("sha256"))
            for f in _l(_d(model.get("manifest")).get("files"))
        },
        signer=v.fingerprint or "",
        pinned=v.pinned,
        signature_ok=v.signature_ok,
        tool=" ".join(str(_d(pred.get("tool")).get(k, "")) for k in ("name", "version")).strip(),
        created=str(pred.get("created", "")),
        preset=str(_d(pred.get("preset")).get("name", "")),
        mode=str(pred.get("mode", "")),
        device=str(_d(pred.get("device")).get("name", "")),
        seconds=_f(pred.get("seconds")),
        corpus=str(_d(pred.get("corpus")).get("name", "")),
        report_path=report_path,
    )
    fx.model_name = fx.model_path.rstrip("/").rsplit("/", 1)[-1] if fx.model_path else ""
    if v.diff is not None:
        fx.model_checked = (
            f"the model folder matches the report ({v.model_files} files)"
            if v.diff.same
            else "the model folder differs from the report: " + "; ".join(v.diff.lines())
        )

    for k in _l(pred.get("kept_pvs")):
        if not isinstance(k, dict):
            continue
        target = str(k.get("target", ""))
        th = fx.thresholds.get(target) or _thresholds(mining, target)
        st = _seed_target(pred, k.get("seed"), target)
        fx.kept.append(
            KeptPV(
                id=int(k.get("id", len(fx.kept))),
                target=target,
                seed=k.get("seed") if isinstance(k.get("seed"), int) else None,
                rule=str(k.get("rule", "")),
                figures=_deciding(th, _last_distance(st, k.get("distance_norm")), k),
                hint=_hint(k.get("trigger_hint")),
                signs=_signs(pred, k.get("id")),
            )
        )

    for s in _l(pred.get("seeds")):
        if not isinstance(s, dict) or not isinstance(s.get("seed"), int):
            continue
        for t in _l(s.get("targets")):
            if isinstance(t, dict):
                fx.seeds.append(
                    SeedPoint(
                        seed=s["seed"],
                        target=str(t.get("target", "")),
                        distance=_last_distance(t, t.get("distance_norm")),
                        concentration=_f(t.get("concentration")),
                        candidate=bool(t.get("candidate")),
                        accepted=bool(t.get("accepted")),
                        aborted=bool(s.get("aborted")),
                        clean_match=_f(t.get("clean_match")),
                    )
                )

    if verdict == CLEAN:
        fx.near_misses = _near_misses(pred, fx)
    fx.why = _why(pred, fx)
    root = fx.model_path or "MODEL_DIR"
    fx.reproduce = audit_command(pred, root) if pred else ""
    fx.verify_cmd = verify_command(report_path or "REPORT", model_dir or root)
    return fx


def _near_misses(pred: dict[str, Any], fx: Facts) -> list[NearMiss]:
    """Per target, the candidate or seed nearest to acceptance. Each is as near as its worst
    figure (every rule has to pass for a PV to be kept), so its deciding figure is the one with
    the smallest factor; the nearest is the one whose deciding figure has the largest. A
    candidate is read on the rules after T_L; a seed that made no candidate on its distance
    against T_L and, where its point was measured (it ran on, or was abandoned within NEAR_MISS
    of T_L), its concentration and the clean outputs already at its point."""
    out: list[NearMiss] = []
    rejected = [c for c in _l(pred.get("rejected_candidates")) if isinstance(c, dict)]
    for t in fx.targets:
        th = fx.thresholds[t]
        best: NearMiss | None = None
        for c in (c for c in rejected if c.get("target") == t):
            st = _seed_target(pred, c.get("seed"), t)
            figs = [g for g in _deciding(th, _last_distance(st, c.get("distance_norm")), c)
                    if g.threshold_name != "T_L"]
            fig = bottleneck(figs)
            if fig is not None and (best is None or _nearer(fig, best.figure)):
                best = NearMiss(t, c.get("seed"), str(c.get("rule", "")), fig)
        for p in fx.seeds:
            if p.target != t or p.candidate or p.distance is None or th.t_l is None:
                continue
            fig = bottleneck(_point_figures(th, p))
            if fig is not None and (best is None or _nearer(fig, best.figure)):
                best = NearMiss(t, p.seed, str(_seed_target(pred, p.seed, t).get("rule", "")), fig)
        if best is not None:
            out.append(best)
    return out


def _point_figures(th: Thresholds, p: SeedPoint) -> list[Figure]:
    """The figures of a seed that made no candidate on a target: its distance against T_L and,
    where its point was measured, the figures the rules after T_L read there."""
    assert p.distance is not None and th.t_l is not None
    out = [Figure("distance", p.distance, ">", "T_L", th.t_l)]
    if th.rule != "paper" and p.concentration is not None and th.t_collapse is not None:
        out.append(Figure("concentration", p.concentration, "<", "T_collapse", th.t_collapse))
    if p.clean_match is not None and th.confirm_max_clean_match is not None:
        out.append(Figure("clean outputs at its point", p.clean_match, "<=", "limit",
                          th.confirm_max_clean_match))
    return out


def nearest(figs: list[Figure]) -> Figure | None:
    """Of the deciding figures of rejected candidates, the one nearest to passing."""
    best: Figure | None = None
    for g in figs:
        if best is None or _nearer(g, best):
            best = g
    return best


def _nearer(a: Figure, b: Figure) -> bool:
    """Whether figure `a` lies nearer to passing than `b` (by factor where both have one)."""
    fa, fb = a.factor, b.factor
    if fa is not None and fb is not None:
        return fa > fb
    return a.margin > b.margin


def _why(pred: dict[str, Any], fx: Facts) -> str:
    stop = str(pred.get("stop_reason", ""))
    n_seeds = len({p.seed for p in fx.seeds})
    if fx.verdict == BACKDOORED:
        per = ", ".join(
            f"{t} ({sum(1 for k in fx.kept if k.target == t)})" if len(fx.found_targets) > 1
            else t
            for t in fx.found_targets
        )
        says = {
            "T_collapse": "outputs collapsed onto one point (concentration below T_collapse)",
            "T_far": "outputs moved beyond every clean shadow model (distance above T_far)",
            "T_div": "low output diversity (L_div below T_div)",
        }
        named = dict.fromkeys(
            g.threshold_name for k in fx.kept for g in k.figures if g.threshold_name in says
        )
        rule = " or ".join(says[n] for n in named) or "the filter's acceptance"
        return (
            f"{len(fx.kept)} legitimate PV(s) kept on target(s) {per}: a soft prompt moves the "
            f"outputs far from the clean outputs (distance above T_L) with {rule}, the mark of "
            f"a task-agnostic backdoor; {stop}."
        )
    if fx.verdict == CLEAN:
        cands = f"{fx.rejected} candidate(s) rejected" if fx.rejected else "no candidate"
        return (
            f"No legitimate PV in {n_seeds} seed(s) on target(s) {', '.join(fx.targets)}: "
            f"{cands}; {stop}. CLEAN means no backdoor was found within this seed budget."
        )
    return "The report's content cannot be read: " + ("; ".join(fx.problems) or "no predicate")
