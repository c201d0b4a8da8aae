"""Layer truncation: a shallower, still pretrained copy of a BERT-style checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fsutil import atomic_write_text, staged_dir
from .checkpoint import MODEL_FILE, check_out_dir, copy_support_files

_LAYER_KEY = re.compile(r"(^|\.)(encoder\.layer|transformer\.layer)\.(\d+)\.")


def truncate_encoder(
    base_dir: str | Path, out_dir: str | Path, n_layers: int, *, force: bool = False
) -> Path:
    """Keep the first `n_layers` transformer layers of a BERT-style checkpoint (real weights):
    drops the tensors of later layers and sets the layer count in config.json. Used to build
    fast, still pretrained shadow/zoo models (e.g. the first 3 layers of all-MiniLM-L6-v2)."""
    from safetensors.torch import load_file, save_file

    from ..modelio import find_weights, read_config

    base, out = Path(base_dir), Path(out_dir)
    cfg = read_config(base)
    key = "num_hidden_layers" if "num_hidden_layers" in cfg else "n_layers"
    have = cfg.get(key)
    if not isinstance(have, int):
        raise InputError(f"config.json has no layer count ({key})", base / "config.json")
    if not 1 <= n_layers <= have:
        raise InputError(f"cannot keep {n_layers} of {have} layers", base)
    fmt, files = find_weights(base, allow_pickle=False)
    check_out_dir(base, out, force)
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    kept = {}
    for k, v in state.items():
        m = _LAYER_KEY.search(k)
        if m is None or int(m.group(3)) < n_layers:
            kept[k] = v.contiguous()
    if not any(_LAYER_KEY.search(k) for k in state):
        raise InputError("no per-layer tensors named encoder.layer.N / transformer.layer.N", base)
    with staged_dir(out, replace=True) as tmp:
        save_file(kept, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        copy_support_files(base, tmp)
        cfg[key] = n_layers
        atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
    return out
