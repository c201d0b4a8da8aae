"""Loading an audited encoder safely: local folders only, no remote code, safetensors by default.

torch and transformers are imported lazily (inside functions) so that the torch-free path
(scan, monitor, verify) never pays for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

# model_type -> family name used by presets. Every one loads with AutoModel and takes inputs_embeds.
SUPPORTED_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "albert": "albert",
    "deberta-v2": "deberta-v2",
    "deberta": "deberta",
    "electra": "electra",
    "distilbert": "distilbert",
    "mpnet": "mpnet",
    "xlnet": "xlnet",
}

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (base encoder, no head)
    tokenizer: Any
    config: Any
    path: Path
    model_type: str
    family: str
    has_pooler: bool  # the checkpoint carries trained pooler weights
    weights_format: str  # "safetensors" or "pickle"

    @property
    def hidden_size(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or cfg.dim)


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise InputError("no config.json: not a Hugging Face model folder", model_dir)
    try:
        data = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"config.json is not valid JSON ({exc})", cfg) from None
    if not isinstance(data, dict):
        raise InputError("config.json is not a JSON object", cfg)
    mt = data.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"unsupported model_type {mt!r} in config.json; supported: "
            + ", ".join(sorted(SUPPORTED_MODEL_TYPES)),
            cfg,
        )
    if data.get("auto_map"):
        # We never execute code shipped with a model; built-in classes only.
        pass
    return data


def find_weights(model_dir: Path, allow_pickle: bool) -> tuple[str, list[Path]]:
    st = sorted(model_dir.glob("*.safetensors"))
    if st:
        return "safetensors", st
    pk = sorted(model_dir.glob("pytorch_model*.bin"))
    if pk:
        if not allow_pickle:
            raise InputError(
                "only pickle weights (pytorch_model*.bin) found; pickle can execute code when "
                "loaded. Convert to safetensors, or pass --allow-pickle to load them with "
                "torch.load(weights_only=True)",
                model_dir,
            )
        return "pickle", pk
    raise InputError("no weights found (model.safetensors or pytorch_model.bin)", model_dir)


def _weight_keys(fmt: str, files: list[Path]) -> list[str]:
    if fmt == "safetensors":
        from safetensors import safe_open

        keys: list[str] = []
        for f in files:
            try:
                with safe_open(str(f), framework="np") as h:
                    keys.extend(h.keys())
            except Exception as exc:  # noqa: BLE001 - report any header problem as bad input
                raise InputError(f"cannot read safetensors header ({exc})", f) from None
        return keys
    keys = []
    for f in files:
        keys.extend(_load_pickle(f).keys())
    return keys


def _load_pickle(f: Path) -> dict[str, Any]:
    """A pickle checkpoint's tensors through `torch.load(weights_only=True)`, which refuses any
    object other than tensors and plain containers. Any failure is an InputError naming the file;
    torch's own message is left out, since it suggests turning the restriction off."""
    import torch

    try:
        state = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - corrupt, truncated or holding objects: refuse it alike
        raise InputError(
            "cannot be loaded safely: it is not a plain tensor checkpoint (corrupt, or it holds "
            "objects other than tensors). Use safetensors weights from a trusted source",
            f,
        ) from None
    if not isinstance(state, dict):
        raise InputError("cannot be loaded safely: not a mapping of tensor names to tensors", f)
    return state


def load_encoder(
    model_dir: str | Path, allow_pickle: bool = False, device: str = "cpu"
) -> LoadedModel:
    """Load the base encoder and tokenizer of a local HF folder, frozen and in eval mode."""
    path = Path(model_dir)
    if not path.exists():
        raise InputError("model folder not found", path)
    if not path.is_dir():
        raise InputError("not a folder (expected a Hugging Face model folder)", path)
    cfg_data = read_config(path)
    fmt, files = find_weights(path, allow_pickle)

    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read config.json ({exc})", path / "config.json") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), trust_remote_code=False, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot load the tokenizer ({exc})", path) from None

    keys = _weight_keys(fmt, files)
    has_pooler = any(".pooler." in k or k.startswith("pooler.") for k in keys)
    kwargs: dict[str, Any] = dict(trust_remote_code=False, local_files_only=True)
    try:
        if fmt == "safetensors":
            model = AutoModel.from_pretrained(str(path), config=config, use_safetensors=True, **kwargs)
        else:
            state: dict[str, Any] = {}
            for f in files:
                state.update(_load_pickle(f))
            model = AutoModel.from_config(config)
            prefix = getattr(model, "base_model_prefix", "") + "."
            if prefix != "." and any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            missing, _unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if "pooler" not in k and "position_ids" not in k]
            if missing:
                raise InputError(
                    f"pickle weights lack {len(missing)} encoder tensors, e.g. {missing[0]}", path
                )
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot load the model weights ({exc})", path) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    mt = str(cfg_data["model_type"])
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        path=path,
        model_type=mt,
        family=SUPPORTED_MODEL_TYPES[mt],
        has_pooler=has_pooler and getattr(model, "pooler", None) is not None,
        weights_format=fmt,
    )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from .errors import UsageError

        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    return device
