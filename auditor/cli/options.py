"""Options and option parsing shared by several command groups."""

from __future__ import annotations

from pathlib import Path

T_MATCH_HELP = (
    "Sign-match threshold T_match in (0, 1] for this deployment: overrides the bundle's PV-set "
    "threshold (e.g. the value `lmsan threshold` chose on clean data of the deployed task)."
)
T_MATCH_FILE_HELP = (
    "The file `lmsan threshold --out` wrote for this bundle: its per-PV thresholds (--per-pv), "
    "else its single T_match. Refused for another bundle; not with --t-match."
)


def thresholds_from_options(
    t_match: float | None, t_match_file: Path | None
) -> tuple[float | None, dict[int, float] | None, str | None]:
    """(T_match, per-PV thresholds, bundle digest they were chosen for) from --t-match /
    --t-match-file."""
    from ..bundle_runtime import check_match_threshold
    from ..errors import UsageError
    from ..threshold import load_threshold_file

    if t_match is not None and t_match_file is not None:
        raise UsageError("give --t-match or --t-match-file, not both")
    check_match_threshold(t_match)
    if t_match_file is None:
        return t_match, None, None
    dt = load_threshold_file(t_match_file)
    return dt.match_threshold, dt.per_pv_thresholds, dt.bundle_digest
