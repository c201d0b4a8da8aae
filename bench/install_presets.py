"""Copy the presets `bench/zoo.py calibrate` wrote (bench/results/zoo_presets.json) into the
package's shipped presets (auditor/data/presets.json): entries of the same name, and those the
file lists under "supersedes", are replaced; the others (tiny-bert-demo, the generic default)
stay. Thresholds are rounded to 6 significant digits; the full evidence travels with each
preset. A replaced entry keeps its clean-match limit (rule 4a), which calibration does not set.

    python bench/install_presets.py [bench/results/zoo_presets.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _round(v: object) -> object:
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/results/zoo_presets.json"
    dst = ROOT / "auditor/data/presets.json"
    doc = json.loads(src.read_text())
    new = doc["presets"]
    data = json.loads(dst.read_text())
    names = {p["name"] for p in new} | set(doc.get("supersedes", []))
    kept = [p for p in data["presets"] if p["name"] not in names]
    old = {p["name"]: p["values"] for p in data["presets"]}
    for p in new:
        p["values"] = _round(p["values"])
        # set by hand, not by calibration: rule 4a's clean-match limit of a replaced entry
        lim = old.get(p["name"], {}).get("confirm_max_clean_match")
        if lim is not None:
            p["values"].setdefault("confirm_max_clean_match", lim)
        p["evidence"]["file"] = str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src)
    data["presets"] = kept + new
    dst.write_text(json.dumps(data, indent=1) + "\n")
    for p in new:
        print(p["name"], json.dumps(p["values"]))


if __name__ == "__main__":
    main()
