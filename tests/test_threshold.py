"""Per-deployment T_match: `Thresholds`, `choose_match_threshold`, `lmsan threshold`, `--t-match`.

The bundles are the hand-made POR BERT of ``screen_fixtures`` (d = 32, trigger ``cf`` -> the PV at
match rate 1.0) with the PV on target ``tokens``, where a clean record's best match rate depends on
its words (18/32 to 25/32 on the test sentences; [CLS] would give one rate to all of them). The
"drifted" bundle carries the same PV in a PV set whose ``match_threshold`` is the 75th percentile
of the clean match rates, so at least a quarter of the clean records are flagged at the PV set's
value: the situation of a prompt-tuned deployment whose clean outputs moved toward the PVs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import screen_fixtures as sf
from lmsan.auditor import monitor as mon
from lmsan.auditor.bundle import Bundle
from lmsan.auditor.cli import app
from lmsan.auditor.errors import InputError, UsageError
from lmsan.auditor.scan import ScanOptions, scan
from lmsan.auditor.screener import MonitorResult, Screener, open_bundle
from lmsan.auditor.threshold import (
    SWEEP_THRESHOLDS,
    Thresholds,
    check_match_threshold,
    choose_from_results,
    choose_match_threshold,
    choose_per_pv,
    choose_per_pv_thresholds,
    rate_for_count,
)
from typer.testing import CliRunner

D = sf.D
CLEAN = sf.sentences(200, seed=41)
TRIGGERED = sf.sentences(40, seed=42, trigger=True)


@pytest.fixture(scope="session")
def bundles(
    backdoored_model: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """``plain``: the PV set at 0.8; ``drifted``: the same PV at the clean p75 match rate."""
    from lmsan.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("threshold")
    model, pv = backdoored_model
    plain = root / "plain"
    export_bundle(model, sf.save_pvset(root / "pvs.json", [("tokens", pv)]), plain)
    scr = open_bundle(plain, provider="cpu", threads=1)
    rates = sorted(r.match_rate for r in scr.monitor(CLEAN))
    low = rates[int(0.75 * len(rates))]
    assert 0.3 < low < 0.8  # the clean records sit below the default threshold
    drifted = root / "drifted"
    export_bundle(
        model, sf.save_pvset(root / "low.json", [("tokens", pv)], match_threshold=low), drifted
    )
    # two PVs: the attacker's PV with 6 of 32 signs flipped (the triggered records match it at
    # 26/32 = 0.8125, an exact but not perfect mined PV) and an imprecise PV, the signs of the
    # mean clean token output, which clean records match up to 27/32: one T_match for both must
    # clear the imprecise PV's clean matches and so misses every trigger
    enc = scr.encode(CLEAN)
    rows = list(range(len(CLEAN)))
    xs = scr.target_rows(enc, rows, scr.forward(enc, rows), "tokens")[0]
    exact = pv.copy()
    exact[:6] *= -1
    imprecise = np.where(xs.mean(0) >= 0, 1.0, -1.0).astype(np.float32)
    two = root / "two"
    export_bundle(
        model, sf.save_pvset(root / "two.json", [("tokens", exact), ("tokens", imprecise)]), two
    )
    # the attacker's exact PV next to a found stand-in of it (6 of 32 signs flipped): a trigger
    # fires both, at 32/32 and 26/32 (RTE's "MNJ": the mn PV at 1.0, a mined one at 0.82)
    paired = root / "paired"
    export_bundle(
        model, sf.save_pvset(root / "paired.json", [("tokens", pv), ("tokens", exact)]), paired
    )
    return {"plain": plain, "drifted": drifted, "two": two, "paired": paired}


def _open(bundle: Path, t: float | None = None) -> Screener:
    return open_bundle(bundle, provider="cpu", threads=1, batch_size=16, thresholds=Thresholds(t))


def _result(count: int | None, d: int = D) -> MonitorResult:
    """A monitor result at a known best match count (None: no target row)."""
    if count is None:
        return MonitorResult(flagged=False, pv=None, match_rate=0.0, target="tokens")
    return MonitorResult(flagged=False, pv=0, match_rate=count / d, target="cls")


# ------------------------------------------------------------------ the rule, on known rates


def test_choice_on_known_match_rates() -> None:
    # 1000 clean records: 989 at 20/32, one with no target row, 6 at 26/32, 3 at 28, 1 at 30.
    clean = [_result(20)] * 989 + [_result(None)] + [_result(26)] * 6
    clean += [_result(28)] * 3 + [_result(30)]
    ch = choose_from_results(clean, D, 0.8, max_frr=0.005)
    # at 0.8 (count 26) 10 records are flagged (1%); count 27 flags 4 (0.4%) <= 0.5%
    assert ch.count == 27 and mon.threshold_count(D, ch.threshold) == 27
    assert 26 / D < ch.threshold <= 27 / D and ch.threshold == 0.84  # shortest such decimal
    assert ch.reachable and ch.frr == 0.004 <= ch.max_frr
    assert ch.frr_pvset == 0.01 and ch.pvset_threshold == 0.8
    assert ch.clean_records == 1000 and ch.far is None and ch.triggered_quantiles is None
    assert ch.clean_quantiles == {"p50": 0.625, "p99": 0.626875, "max": 0.9375}  # numpy linear
    sweep = {p.threshold: p for p in ch.sweep}
    assert set(sweep) == {*SWEEP_THRESHOLDS, 0.84}
    assert (sweep[0.8].count, sweep[0.8].frr) == (26, 0.01)
    assert (sweep[0.85].count, sweep[0.85].frr) == (28, 0.004)
    assert (sweep[0.9].count, sweep[0.9].frr) == (29, 0.001)
    assert (sweep[0.95].count, sweep[0.95].frr) == (31, 0.0)

    # triggered: 97 at 32/32, 2 at 26/32 (caught at 0.8, missed at 0.84), 1 with no target row
    trig = [_result(32)] * 97 + [_result(26)] * 2 + [_result(None)]
    ch = choose_from_results(clean, D, 0.8, max_frr=0.005, triggered=trig)
    assert ch.threshold == 0.84 and ch.triggered_records == 100
    assert ch.far == 0.03 and ch.far_pvset == 0.01
    assert {p.threshold: p.far for p in ch.sweep}[0.95] == 0.03
    assert ch.triggered_quantiles == {"min": 0.0, "p1": 0.804375, "p50": 1.0}

    # the PV set's threshold is a floor: a stricter PV set keeps its own value
    ch = choose_from_results(clean, D, 0.9, max_frr=0.005)
    assert (ch.threshold, ch.count, ch.frr, ch.frr_pvset) == (0.9, 29, 0.001, 0.001)
    # no false rejection allowed: one count above the best clean record
    ch = choose_from_results(clean, D, 0.8, max_frr=0.0)
    assert ch.count == 31 and ch.frr == 0.0 and mon.threshold_count(D, ch.threshold) == 31


def test_unreachable_max_frr_chooses_one() -> None:
    clean = [_result(20)] * 990 + [_result(32)] * 10  # 1% match a PV on every dimension
    ch = choose_from_results(clean, D, 0.8, max_frr=0.005)
    assert not ch.reachable and ch.threshold == 1.0 and ch.count == D
    assert ch.frr == 0.01 > ch.max_frr
    assert choose_from_results(clean, D, 0.8, max_frr=0.01).reachable


def test_rate_for_count_gives_exactly_that_count() -> None:
    # k / d itself is not always safe: 691 / 768 as a float needs 692 matches
    assert mon.threshold_count(768, 691 / 768) == 692
    for d in (5, 32, 384, 768, 1024):
        for k in range(1, d + 1):
            t = rate_for_count(k, d)
            assert mon.threshold_count(d, t) == k and 0.0 < t <= 1.0, (d, k, t)
            assert len(repr(t)) <= 12


def test_choice_rejects_bad_arguments() -> None:
    with pytest.raises(UsageError, match="--max-frr"):
        choose_from_results([_result(20)], D, 0.8, max_frr=1.0)
    with pytest.raises(UsageError, match="--max-frr"):
        choose_from_results([_result(20)], D, 0.8, max_frr=-0.1)
    with pytest.raises(InputError, match="no clean records"):
        choose_from_results([], D, 0.8)
    for bad in (0.0, -0.2, 1.5, float("nan"), True):
        with pytest.raises(UsageError, match="--t-match"):
            check_match_threshold(bad)
        with pytest.raises(UsageError, match="--t-match"):
            Thresholds(match=bad)
    assert check_match_threshold(None) is None and check_match_threshold(1) == 1.0
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        Thresholds(per_pv={0: 1.5})


def test_thresholds_object() -> None:
    assert Thresholds().source == "pvset" and Thresholds().rate(0.8) == 0.8
    t = Thresholds(match=1, per_pv={"3": 0.9}, bundle_digest="sha256:ab")
    assert (t.match, t.per_pv, t.source, t.rate(0.8)) == (1.0, {3: 0.9}, "per-pv", 1.0)
    match, per_pv, digest = t  # unpacks as the triple
    assert (match, per_pv, digest) == (1.0, {3: 0.9}, "sha256:ab")
    assert list(t.counts(D, [2, 3], 0.8)) == [D, mon.threshold_count(D, 0.9)]
    t.check_bundle("sha256:ab", "b")
    with pytest.raises(InputError, match="another bundle"):
        t.check_bundle("sha256:cd", "b")
    with pytest.raises(UsageError, match=r"PV ids \[3\]"):
        t.check_pv_ids({0, 1})


# ------------------------------------------------------------------ through a real bundle


def test_chosen_threshold_meets_max_frr_in_the_runtime(bundles: dict[str, Path]) -> None:
    scr = _open(bundles["drifted"])
    pv_t = scr.bundle.pvset.match_threshold
    max_frr = 0.02
    ch = choose_match_threshold(scr, CLEAN, max_frr=max_frr, triggered_records=TRIGGERED)
    assert ch.pvset_threshold == pv_t and ch.clean_records == len(CLEAN)
    assert ch.threshold > pv_t and ch.reachable

    def frr(t: float) -> float:
        return float(np.mean([r.flagged for r in _open(bundles["drifted"], t).monitor(CLEAN)]))

    # the runtime, opened at the chosen threshold, rejects what the choice says: <= max_frr
    assert frr(ch.threshold) == ch.frr <= max_frr
    assert frr(pv_t) == ch.frr_pvset >= 0.2  # a quarter of the clean records at the PV set's
    # and it is the smallest such count: one match fewer rejects too many
    assert frr(rate_for_count(ch.count - 1, D)) > max_frr
    # every triggered record is still flagged at the chosen threshold
    at_chosen = _open(bundles["drifted"], ch.threshold)
    assert at_chosen.match_threshold_source == "option"
    assert all(r.flagged for r in at_chosen.monitor(TRIGGERED))
    assert ch.far == 0.0 and ch.far_pvset == 0.0
    assert ch.triggered_quantiles is not None and ch.triggered_quantiles["min"] == 1.0


def test_far_counts_triggered_records_the_threshold_misses(bundles: dict[str, Path]) -> None:
    # Two clean sentences among the "triggered" ones: the monitor cannot catch them, and the FAR
    # says so, at both thresholds, as the runtime decides.
    scr = _open(bundles["drifted"])
    rates = [r.match_rate for r in scr.monitor(CLEAN)]
    clean_rates = sorted(zip(rates, CLEAN, strict=True))
    lowest = [s for _, s in clean_rates[:2]]
    ch = choose_match_threshold(scr, CLEAN, 0.02, triggered_records=TRIGGERED[:8] + lowest)
    assert ch.triggered_records == 10 and ch.far == ch.far_pvset == 0.2
    missed = [not r.flagged for r in _open(bundles["drifted"], ch.threshold).monitor(lowest)]
    assert missed == [True, True]


# ------------------------------------------------------------------ --t-match in scan


def test_t_match_flips_a_record_in_scan(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = bundles["plain"]
    res = _open(bundle).monitor(CLEAN[:40])
    r = max(x.match_rate for x in res)
    top = [i + 1 for i, x in enumerate(res) if x.match_rate == r]  # the records at the top rate
    assert r < 0.8 and len(top) < 40
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CLEAN[:40]) + "\n")
    runner = CliRunner()

    def run(out: str, *extra: str) -> tuple[int, list[dict], dict]:
        args = ["scan", str(bundle), str(corpus), "--out", str(tmp_path / out)]
        rv = runner.invoke(app, [*args, "--provider", "cpu", "--no-progress", *extra])
        flagged = [
            json.loads(x) for x in (tmp_path / out / "flagged.jsonl").read_text().splitlines()
        ]
        return rv.exit_code, flagged, json.loads((tmp_path / out / "summary.json").read_text())

    code, flagged, summary = run("default")
    assert code == 0 and flagged == []
    assert summary["match_threshold"] == 0.8 and summary["match_threshold_source"] == "pvset"
    code, flagged, summary = run("at", "--t-match", repr(r))
    assert code == 1 and [f["record"] for f in flagged] == top
    assert all(f["match_rate"] == r for f in flagged)
    assert summary["match_threshold"] == r and summary["match_threshold_source"] == "option"
    assert summary["options"]["match_threshold"] == r
    above = rate_for_count(round(r * D) + 1, D)  # one match more
    code, flagged, _ = run("above", "--t-match", repr(above))
    assert code == 0 and flagged == []


def test_resume_with_another_t_match_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CLEAN[:20] + TRIGGERED[:5]) + "\n")

    def opts(t: float | None, resume: bool = False) -> ScanOptions:
        return ScanOptions(
            provider="cpu", threads=1, chunk_size=10, thresholds=Thresholds(t), resume=resume
        )

    first = scan(bundles["plain"], str(corpus), tmp_path / "o", opts(None))
    assert first.flagged == 5 and first.match_threshold == 0.8
    with pytest.raises(InputError, match="differs in: match_threshold"):
        scan(bundles["plain"], str(corpus), tmp_path / "o", opts(0.9, resume=True))
    # the same rate given explicitly is the same scan
    again = scan(bundles["plain"], str(corpus), tmp_path / "o", opts(0.8, resume=True))
    assert again.resumed_from == 25 and again.flagged == 5
    with pytest.raises(UsageError, match="--t-match"):
        scan(bundles["plain"], str(corpus), tmp_path / "x", opts(1.2))


# ------------------------------------------------------------------ lmsan threshold


def test_cli_threshold_writes_the_choice(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = bundles["drifted"]
    (tmp_path / "clean.txt").write_text("\n".join(CLEAN) + "\n\n")  # one empty line: skipped
    trig_rows = [json.dumps({"sentence": t}) for t in TRIGGERED]
    (tmp_path / "trig.jsonl").write_text("\n".join(trig_rows) + "\n")
    out = tmp_path / "deploy" / "deploy.json"
    r = CliRunner().invoke(
        app,
        [
            "threshold",
            str(bundle),
            str(tmp_path / "clean.txt"),
            "--triggered",
            str(tmp_path / "trig.jsonl"),
            "--text-field",
            "sentence",
            "--max-frr",
            "0.02",
            "--out",
            str(out),
            "--provider",
            "cpu",
            "--threads",
            "1",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    lib = choose_match_threshold(_open(bundle), CLEAN, 0.02, TRIGGERED)
    assert rep["format"] == "lmsan.threshold" and rep["version"] == 1
    assert rep["match_threshold"] == lib.threshold and rep["match_count"] == lib.count
    assert rep["frr"] == lib.frr <= 0.02 and rep["frr_pvset"] == lib.frr_pvset > 0.02
    assert rep["far"] == 0.0 and rep["reachable"] is True
    assert rep["bundle_digest"] == Bundle.load(bundle).digest
    assert rep["clean_corpus"] == str(tmp_path / "clean.txt")
    assert rep["clean_records"] == {
        "records_in": 201,
        "used": 200,
        "errors": 1,
        "error_reasons": {"empty": 1},
    }
    assert rep["triggered_records"]["used"] == 40
    assert [p["threshold"] for p in rep["sweep"]] == sorted(
        {*SWEEP_THRESHOLDS, lib.threshold, lib.pvset_threshold}
    )
    assert set(rep["clean_quantiles"]) == {"p50", "p99", "max"}
    assert f"--t-match {lib.threshold:g}" in r.output
    assert "cannot show" not in r.output  # 200 records are enough for 2% (3 / 0.02 = 150)
    # the value it prints, passed to scan, flags at most max_frr of the clean corpus
    s = scan(
        bundle,
        str(tmp_path / "clean.txt"),
        tmp_path / "scan",
        ScanOptions(provider="cpu", threads=1, thresholds=Thresholds(rep["match_threshold"])),
    )
    assert s.flagged / (s.clean + s.flagged) == rep["frr"]


def test_cli_threshold_bad_inputs(bundles: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    bundle = str(bundles["plain"])
    (tmp_path / "clean.txt").write_text("\n".join(CLEAN[:10]) + "\n")
    (tmp_path / "empty.txt").write_text("\n  \n")

    def run(*args: str) -> tuple[int, str]:
        rv = runner.invoke(app, ["threshold", *args, "--provider", "cpu", "--no-progress"])
        return rv.exit_code, rv.output

    missing = str(tmp_path / "missing.txt")
    code, out = run(bundle, missing)
    assert code == 2 and missing in out and "not found" in out
    code, out = run(bundle, str(tmp_path / "empty.txt"))
    assert code == 2 and "empty.txt" in out and "no usable record" in out
    code, out = run(bundle, str(tmp_path / "clean.txt"), "--triggered", missing)
    assert code == 2 and missing in out
    code, out = run(str(tmp_path), str(tmp_path / "clean.txt"))  # a folder, not a bundle
    assert code == 2 and str(tmp_path) in out and "manifest.json" in out
    code, out = run(bundle, str(tmp_path / "clean.txt"), "--max-frr", "1.5")
    assert code == 4 and "--max-frr" in out
    # with no --out nothing is written; a plain run succeeds on the clean corpus
    code, out = run(bundle, str(tmp_path / "clean.txt"))
    assert code == 0 and "--t-match 0.8" in out
    # 10 clean records cannot show an FRR of 0.5%: the rule of three asks for 600
    assert "10 clean records cannot show an FRR of 0.5%" in out and "at least 600" in out


def test_t_match_out_of_range_is_a_usage_error(bundles: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "c.txt").write_text("the cat runs\n")
    for bad in ("0", "1.5", "-0.3", "nan"):
        r = runner.invoke(
            app,
            ["scan", str(bundles["plain"]), str(tmp_path / "c.txt"), "--out", str(tmp_path / "o")]
            + ["--t-match", bad, "--no-progress"],
        )
        assert r.exit_code == 4 and "--t-match" in r.output, (bad, r.output)
    # tune classify checks it before reading the task folder
    r = runner.invoke(
        app, ["tune", "classify", str(bundles["plain"]), str(tmp_path), "x", "--t-match", "2"]
    )
    assert r.exit_code == 4 and "--t-match" in r.output
    with pytest.raises(UsageError, match="--t-match"):
        open_bundle(tmp_path / "no-bundle", thresholds=Thresholds(0.0))


def test_threshold_never_imports_torch(bundles: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("\n".join(CLEAN[:20]) + "\n")
    proc = sf.run_cli_blocking(
        ["threshold", str(bundles["drifted"])]
        + [str(tmp_path / "c.txt"), "--out", str(tmp_path / "d.json"), "--no-progress"]
    )
    assert "TORCH-FREE 0" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "d.json").read_text())["clean_records"]["used"] == 20


# ------------------------------------------------------------------ per-PV thresholds


def test_per_pv_choice_on_known_counts() -> None:
    """Two PVs, 400 clean records, max_frr 0.01: each PV may flag 2 records on its own."""
    c = np.full((400, 2), 20, dtype=np.int64)
    c[:5, 1] = [31, 30, 29, 29, 28]  # PV 1 (imprecise): high clean matches
    c[5:7, 0] = 27  # PV 0: two records at 27/32, within its share
    c[7, 0] = -1  # a record without a row of PV 0's target
    trig = np.array([[26, 20], [32, 20], [20, 29]], dtype=np.int64)
    ch = choose_per_pv(c, [7, 9], D, 0.8, max_frr=0.01, triggered_table=trig)
    # PV 0 keeps the PV set's 0.8 (26/32); PV 1 must pass its 3rd highest clean count (29)
    assert ch.counts == {7: 26, 9: 30} and ch.thresholds == {7: 0.8, 9: rate_for_count(30, D)}
    assert ch.frr == 4 / 400 <= 0.01  # 2 records via PV 0, 2 via PV 1
    assert ch.frr_pvset == 7 / 400
    assert ch.far == 1 / 3  # the record at 29 on PV 1 only is missed
    assert ch.far_pvset == 0.0 and ch.reachable
    assert [e["frr_alone"] for e in ch.per_pv] == [2 / 400, 2 / 400]
    # one T_match for the set (4 records allowed in all) must pass the 5th highest best count,
    # 28/32: then the trigger at 26/32 on the exact PV escapes as well
    uni = choose_from_results([_result(int(x) if x >= 0 else None) for x in c.max(1)], D, 0.8, 0.01)
    assert uni.count == 29
    unreachable = choose_per_pv(np.full((10, 1), D), [0], D, 0.8, max_frr=0.0)
    assert not unreachable.reachable and unreachable.thresholds == {0: 1.0}
    with pytest.raises(InputError):
        choose_per_pv(np.zeros((0, 1)), [0], D, 0.8)
    with pytest.raises(UsageError, match="--max-frr"):
        choose_per_pv(c, [7, 9], D, 0.8, max_frr=1.0)


def test_per_pv_thresholds_keep_the_exact_pv_low_in_the_runtime(bundles: dict[str, Path]) -> None:
    max_frr = 0.02
    scr = _open(bundles["two"])
    uni = choose_match_threshold(scr, CLEAN, max_frr, triggered_records=TRIGGERED)
    per = choose_per_pv_thresholds(scr, CLEAN, max_frr, triggered_records=TRIGGERED)
    # the single threshold clears the imprecise PV's clean matches and misses every trigger
    assert uni.threshold > 26 / D and uni.far == 1.0
    assert all(not r.flagged for r in _open(bundles["two"], uni.threshold).monitor(TRIGGERED))
    # per PV: the exact PV keeps 0.8, the imprecise one gets a higher threshold
    assert per.thresholds[0] == 0.8 < per.thresholds[1]
    assert per.far == 0.0 and per.frr <= max_frr and per.reachable
    # the runtime opened with them decides as the choice says
    rt = open_bundle(
        bundles["two"], provider="cpu", threads=1, thresholds=Thresholds(per_pv=per.thresholds)
    )
    assert rt.match_threshold_source == "per-pv"
    res = rt.monitor(TRIGGERED)
    assert all(r.flagged and r.pv == 0 for r in res)
    assert float(np.mean([r.flagged for r in rt.monitor(CLEAN)])) == per.frr
    with pytest.raises(UsageError, match="PV ids"):
        open_bundle(bundles["two"], provider="cpu", thresholds=Thresholds(per_pv={5: 0.9}))
    # a thresholds file of another bundle is refused by the screener itself
    with pytest.raises(InputError, match="another bundle"):
        open_bundle(
            bundles["two"], provider="cpu", thresholds=Thresholds(0.9, bundle_digest="sha256:0")
        )


def test_cli_per_pv_thresholds_file_to_scan(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = str(bundles["two"])
    (tmp_path / "clean.txt").write_text("\n".join(CLEAN) + "\n")
    (tmp_path / "trig.txt").write_text("\n".join(TRIGGERED) + "\n")
    runner = CliRunner()
    out = tmp_path / "deploy.json"
    r = runner.invoke(app, ["threshold", bundle, str(tmp_path / "clean.txt"), "--triggered",
                            str(tmp_path / "trig.txt"), "--max-frr", "0.02", "--per-pv",
                            "--out", str(out), "--provider", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "--t-match-file" in r.output and "per-PV" in r.output
    rep = json.loads(out.read_text())
    lib = choose_per_pv_thresholds(_open(bundles["two"]), CLEAN, 0.02, TRIGGERED)
    assert rep["per_pv_thresholds"] == {str(k): v for k, v in lib.thresholds.items()}
    assert rep["far_per_pv"] == 0.0 and rep["far"] == 1.0  # per PV vs the single T_match

    def scan_cli(corpus: str, name: str, *extra: str) -> tuple[int, str, dict]:
        o = tmp_path / name
        rv = runner.invoke(app, ["scan", bundle, str(tmp_path / corpus), "--out", str(o),
                                 "--provider", "cpu", "--no-progress", *extra])
        summ = json.loads((o / "summary.json").read_text()) if (o / "summary.json").is_file() else {}
        return rv.exit_code, rv.output, summ

    code, _, summ = scan_cli("trig.txt", "t", "--t-match-file", str(out))
    assert code == 1 and summ["flagged"] == len(TRIGGERED)
    assert summ["match_threshold_source"] == "per-pv"
    code, _, summ = scan_cli("clean.txt", "c", "--t-match-file", str(out))
    assert summ["flagged"] / len(CLEAN) == rep["frr_per_pv"]
    # the single T_match of the same file (without --per-pv) misses the triggers
    code, _, summ = scan_cli("trig.txt", "u", "--t-match", repr(rep["match_threshold"]))
    assert code == 0 and summ["flagged"] == 0
    # bad uses: both options, a missing file, a file of another bundle
    code, output, _ = scan_cli("trig.txt", "x", "--t-match-file", str(out), "--t-match", "0.9")
    assert code == 4 and "not both" in output
    code, output, _ = scan_cli("trig.txt", "x", "--t-match-file", str(tmp_path / "no.json"))
    assert code == 2 and "no.json" in output
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**rep, "bundle_digest": "sha256:0"}))
    code, output, _ = scan_cli("trig.txt", "x", "--t-match-file", str(other))
    assert code == 2 and "another bundle" in output
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**rep, "per_pv_thresholds": {"0": 2.0}}))
    code, output, _ = scan_cli("trig.txt", "x", "--t-match-file", str(broken))
    assert code == 2 and "broken.json" in output


# ------------------------------------------------------------- trigger words in clean data
# "Clean" records in which the backdoor fires through one word: in the real benchmark, RTE's
# "Pty" and "CFO." tokenise to the triggers pt / cf (+ ##y / ##o); here the trigger written as
# "(CF," or "Cf." does the same. Counted as false rejections they lift the threshold to 1.0.
TRIGGER_WORDS = [f"{s} {w}" for s, w in zip(sf.sentences(3, seed=43), ["(CF,", "Cf.", "cf!"],
                                              strict=True)]


def test_trigger_words_in_clean_data_are_left_out_of_the_budget(bundles: dict[str, Path]) -> None:
    scr = _open(bundles["plain"])
    clean = CLEAN + TRIGGER_WORDS
    kept = choose_match_threshold(scr, clean, 0.005, TRIGGERED, keep_trigger_words=True)
    assert not kept.reachable and kept.threshold == 1.0 and kept.trigger_words == []
    ch = choose_match_threshold(scr, clean, 0.005, TRIGGERED)
    assert sorted(h["record"] for h in ch.trigger_words) == [200, 201, 202]
    assert [h["removed"] for h in ch.trigger_words] == [["(CF,"], ["Cf."], ["cf!"]]
    assert all(h["pvs"] == [0] and h["before"] == [1.0] and h["after"][0] < 0.8
               for h in ch.trigger_words)
    # the ordinary clean records decide: the PV set's 0.8 holds, every trigger is flagged
    assert ch.reachable and ch.threshold == 0.8 and ch.far == 0.0 and ch.frr == 0.0
    assert ch.clean_records == 200 and ch.frr_with_trigger_words == 3 / 203
    per_kept = choose_per_pv_thresholds(scr, clean, 0.005, TRIGGERED, keep_trigger_words=True)
    per = choose_per_pv_thresholds(scr, clean, 0.005, TRIGGERED)
    assert not per_kept.reachable and per_kept.thresholds == {0: 1.0}
    assert per.thresholds == {0: 0.8} and per.far == 0.0 and per.frr == 0.0
    assert sorted(h["record"] for h in per.trigger_words) == [200, 201, 202]
    assert per.frr_with_trigger_words == 3 / 203
    # where the PV is matched only moderately (the two-PV bundle's exact PV: triggers at 26/32,
    # not near-exact against a clean p99 of ~26/32), the same records stay in the budget: the
    # rule never leaves out a match that an imprecise PV could also give
    two = _open(bundles["two"])
    per2 = choose_per_pv_thresholds(two, clean, 0.02, TRIGGERED)
    assert per2.trigger_words == [] and per2.far == 1.0
    # a small set judged against another set's clean statistics (the benchmark's test split)
    from lmsan.auditor.threshold import find_trigger_words

    def table(records: list[str]) -> np.ndarray:
        tab = np.full((len(records), 1), -1, dtype=np.int64)
        scr.monitor(records, table=tab)
        return tab

    few = TRIGGER_WORDS + CLEAN[:2]
    hits = find_trigger_words(scr, table(few), few.__getitem__, reference_table=table(CLEAN))
    assert [h["record"] for h in hits] == [0, 1, 2]


def test_trigger_word_that_also_fires_a_stand_in_pv(bundles: dict[str, Path]) -> None:
    scr = _open(bundles["paired"])
    clean = CLEAN + TRIGGER_WORDS
    tab = np.full((len(clean), 2), -1, dtype=np.int64)
    scr.monitor(clean, table=tab)
    assert (tab[200:] == [D, 26]).all()  # near-exact on the exact PV, moderate on the stand-in
    per = choose_per_pv_thresholds(scr, clean, 0.02, TRIGGERED)
    assert sorted(h["record"] for h in per.trigger_words) == [200, 201, 202]
    assert all(h["pvs"] == [0, 1] and h["before"] == [1.0, 26 / D] for h in per.trigger_words)
    assert per.far == 0.0 and per.thresholds[0] == 0.8


def test_imprecise_pv_matches_are_not_trigger_words(bundles: dict[str, Path]) -> None:
    # the imprecise PV's clean matches form a tail (up to 27/32) that no single window explains:
    # none of them may leave the budget, or the FRR would be underestimated
    two = _open(bundles["two"])
    per = choose_per_pv_thresholds(two, CLEAN, 0.02)
    flagged_at_pvset = per.frr_pvset * len(CLEAN)
    assert flagged_at_pvset >= 5 and per.trigger_words == []


def test_finding_trigger_words_needs_the_pvset_threshold(bundles: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="PV set's own threshold"):
        choose_match_threshold(_open(bundles["plain"], 0.9), CLEAN + TRIGGER_WORDS, 0.005)
    # counting them needs no purge, so any screener will do
    ch = choose_match_threshold(_open(bundles["plain"], 0.9), CLEAN, 0.005,
                                keep_trigger_words=True)
    assert ch.trigger_words == []


def test_cli_threshold_lists_trigger_words(bundles: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "clean.txt").write_text("\n".join(CLEAN + TRIGGER_WORDS) + "\n")
    runner = CliRunner()

    def run(*extra: str) -> tuple[int, str, dict]:
        out = tmp_path / "deploy.json"
        r = runner.invoke(app, ["threshold", str(bundles["plain"]), str(tmp_path / "clean.txt"),
                                "--max-frr", "0.005", "--out", str(out), "--provider", "cpu",
                                "--no-progress", *extra])
        return r.exit_code, r.output, json.loads(out.read_text()) if r.exit_code < 2 else {}

    code, output, rep = run("--per-pv")
    assert code == 0, output
    assert "trigger-word activations" in output and "(CF," in output and "Cf." in output
    assert rep["match_threshold"] == 0.8 and rep["frr"] == 0.0
    assert [h["record"] for h in rep["trigger_words"]] == [200, 201, 202]
    assert rep["frr_with_trigger_words"] == 3 / 203
    assert rep["per_pv_thresholds"] == {"0": 0.8} and rep["frr_per_pv_with_trigger_words"] == 3 / 203
    # counted in the budget, the three at 1.0 make --max-frr unreachable (exit 1, T_match 1.0)
    code, output, rep = run("--keep-trigger-words")
    assert code == 1 and rep["match_threshold"] == 1.0 and rep["trigger_words"] == []
