"""The encoder side of an attack: the target output of a batch (cls, pooler, mask, tokens), the
checkpoint's MLM head for the MLM utility, BERT-style masking and PV sign agreement.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError


def load_mlm(path: Path, fmt: str, files: list[Path]) -> tuple[Any | None, str]:
    """The checkpoint as AutoModelForMaskedLM, or (None, why) when it has no usable MLM head."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    kwargs: dict[str, Any] = dict(
        trust_remote_code=False, local_files_only=True, output_loading_info=True
    )
    try:
        config = AutoConfig.from_pretrained(
            str(path), trust_remote_code=False, local_files_only=True
        )
        if fmt == "safetensors":
            mlm, info = AutoModelForMaskedLM.from_pretrained(
                str(path), config=config, use_safetensors=True, **kwargs
            )
        else:
            state: dict[str, Any] = {}
            for f in files:
                state.update(torch.load(str(f), map_location="cpu", weights_only=True))
            mlm, info = AutoModelForMaskedLM.from_pretrained(
                str(path), config=config, state_dict=state, use_safetensors=False, **kwargs
            )
    except (ValueError, KeyError) as exc:
        return None, f"this architecture has no masked-LM class ({str(exc).splitlines()[0]})"
    prefix = getattr(mlm, "base_model_prefix", "")
    missing = [
        k
        for k in info.get("missing_keys", [])
        if not (prefix and k.startswith(prefix + ".")) and not k.endswith("decoder.weight")
    ]
    if missing:
        return None, "the checkpoint carries no MLM head weights (missing " + ", ".join(
            sorted(missing)[:3]
        ) + (" ..." if len(missing) > 3 else "") + ")"
    return mlm, ""


def share_base(enc: Any, mlm: Any) -> None:
    """Make `enc` (AutoModel, may have a pooler) use the parameters of `mlm.base_model`, so that
    one optimiser step trains both views of the same weights."""
    for name, p in mlm.base_model.named_parameters():
        mod_path, _, attr = name.rpartition(".")
        try:
            dst = enc.get_submodule(mod_path) if mod_path else enc
        except AttributeError:
            raise InputError(f"encoder and MLM model disagree on parameter {name!r}") from None
        old = getattr(dst, attr, None)
        if old is None or tuple(old.shape) != tuple(p.shape):
            raise InputError(f"encoder and MLM model disagree on parameter {name!r}")
        setattr(dst, attr, p)


def _target_rows(tokenizer: Any, enc_batch: Any, target: str) -> Any:
    """Index (rows, cols) of the target position(s) in a tokenized batch."""
    import torch

    ids = enc_batch["input_ids"]
    if target == "cls":
        cls_id = getattr(tokenizer, "cls_token_id", None)
        if cls_id is None:
            cols = torch.zeros(ids.shape[0], dtype=torch.long)
        else:
            hit = ids == cls_id
            cols = torch.where(hit.any(1), hit.int().argmax(1), torch.zeros_like(ids[:, 0]))
        return torch.arange(ids.shape[0]), cols
    if target == "mask":
        hit = ids == tokenizer.mask_token_id
        if not bool(hit.any(1).all()):
            raise InputError("a templated input lost its mask token (increase --max-length)")
        # the template puts the mask last: take the last mask of each row
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        cols = torch.where(hit, pos, torch.full_like(pos, -1)).max(1).values
        return torch.arange(ids.shape[0]), cols
    if target == "tokens":
        special = enc_batch["special_tokens_mask"].bool()
        ordinary = enc_batch["attention_mask"].bool() & ~special
        rows, cols = ordinary.nonzero(as_tuple=True)
        return rows, cols
    raise AssertionError(target)


def _extract(out: Any, rows_cols: Any, target: str) -> Any:
    if target == "pooler":
        return out.pooler_output
    rows, cols = rows_cols
    return out.last_hidden_state[rows, cols]


class TargetReader:
    """Tokenize + forward + pick the target output; one place for every attack."""

    def __init__(self, tokenizer: Any, target: str, max_length: int, device: str) -> None:
        self.tok = tokenizer
        self.target = target
        self.max_length = max_length
        self.device = device
        self.mask = getattr(tokenizer, "mask_token", None)

    def texts(self, sentences: Sequence[str]) -> list[str]:
        """Apply the prompt template for the mask target: the sentence, then the mask token.
        Long sentences lose words from their end so that the mask survives truncation."""
        if self.target != "mask":
            return list(sentences)
        out = []
        for s in sentences:
            words = s.split()
            t = f"{' '.join(words)} {self.mask}"
            while len(words) > 1 and len(self.tok(t)["input_ids"]) > self.max_length:
                words = words[: max(1, len(words) - max(1, len(words) // 4))]
                t = f"{' '.join(words)} {self.mask}"
            out.append(t)
        return out

    def encode(self, texts: Sequence[str]) -> Any:
        return self.tok(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )

    def forward(self, model: Any, batch: Any) -> Any:
        feed = {k: v.to(self.device) for k, v in batch.items() if k != "special_tokens_mask"}
        return model(**feed)

    def outputs(self, model: Any, sentences: Sequence[str]) -> tuple[Any, Any]:
        """Target outputs of `sentences` and the row (sentence index) of each output."""
        batch = self.encode(self.texts(sentences))
        out = self.forward(model, batch)
        rc = None if self.target == "pooler" else _target_rows(self.tok, batch, self.target)
        f = _extract(out, rc, self.target)
        if self.target == "tokens":
            assert rc is not None
            return f, rc[0].to(self.device)
        import torch

        return f, torch.arange(len(sentences), device=self.device)

    def collect(self, model: Any, sentences: Sequence[str], chunk: int = 64) -> Any:
        """Target outputs of many sentences, concatenated (tokens: all ordinary tokens)."""
        import torch

        parts = []
        for i in range(0, len(sentences), chunk):
            f, _ = self.outputs(model, sentences[i : i + chunk])
            parts.append(f.float())
        return torch.cat(parts) if parts else torch.zeros(0)


def mlm_mask(batch: Any, tokenizer: Any, gen: Any) -> tuple[Any, Any]:
    """BERT-style masking: 15% of ordinary tokens; 80% [MASK], 10% random, 10% kept."""
    import torch

    ids = batch["input_ids"].clone()
    labels = ids.clone()
    ordinary = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()
    prob = torch.full(ids.shape, 0.15)
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ordinary
    if not bool(chosen.any()):  # at least one masked token per batch
        r, c = ordinary.nonzero(as_tuple=True)
        k = int(torch.randint(len(r), (1,), generator=gen))
        chosen[r[k], c[k]] = True
    labels[~chosen] = -100
    u = torch.rand(ids.shape, generator=gen)
    ids[chosen & (u < 0.8)] = tokenizer.mask_token_id
    rand_pos = chosen & (u >= 0.8) & (u < 0.9)
    ids[rand_pos] = torch.randint(len(tokenizer), ids.shape, generator=gen)[rand_pos]
    return ids, labels


def agreement(f: Any, pvs: Any) -> Any:
    """Share of dimensions where sign(f) >= 0 agrees with sign(pv) >= 0, shape (N, n_pvs)."""
    fb = (f >= 0).float()
    pb = (pvs >= 0).float()
    d = f.shape[1]
    return (fb @ pb.T + (1 - fb) @ (1 - pb).T) / d
