"""Options and option parsing shared by several command groups."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..threshold import Thresholds

T_MATCH_HELP = (
    "Sign-match threshold T_match in (0, 1] for this deployment: overrides the bundle's PV-set "
    "threshold (e.g. the value `lmsan threshold` chose on clean data of the deployed task)."
)
T_MATCH_FILE_HELP = (
    "The file `lmsan threshold --out` wrote for this bundle: its per-PV thresholds (--per-pv), "
    "else its single T_match. Refused for another bundle; not with --t-match."
)


def thresholds_from_options(t_match: float | None, t_match_file: Path | None) -> Thresholds:
    """The deployment's thresholds from --t-match / --t-match-file (UsageError for both, or a
    T_match out of range; InputError / FormatError naming a bad file). The result also unpacks
    as the triple (T_match, per-PV thresholds, bundle digest they were chosen for)."""
    from ..errors import UsageError
    from ..threshold import Thresholds

    if t_match is not None and t_match_file is not None:
        raise UsageError("give --t-match or --t-match-file, not both")
    if t_match_file is None:
        return Thresholds(match=t_match)
    return Thresholds.load(t_match_file)

