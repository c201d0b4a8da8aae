"""torch side of the export: the backbone as an ONNX graph that takes embeddings.

torch and transformers are imported inside functions: importing lmsan.export is cheap.

The exported graph takes ``inputs_embeds`` float32 [batch, seq, emb] (word embeddings only;
the model adds position and token-type embeddings itself) and ``attention_mask`` int64
[batch, seq], and returns ``last_hidden_state`` [batch, seq, d] (+ ``pooler_output`` [batch, d]).
Token types are passed as zeros where the model has them (single segment: a pair's second
sentence is also type 0, as in the audit, which tokenizes without token types). RoBERTa-style
models derive positions from ``inputs_embeds`` as ``padding_idx + 1 + arange(seq)``, which
equals the positions of the input_ids path for right-padded rows: the runtime pads on the right.

The TorchScript exporter (``dynamo=False``) is used: it handles BERT-like encoders with dynamic
batch and sequence axes without extra dependencies. It traces the graph, so the example input
has a padded row (an all-ones mask lets transformers skip the masking code, which would then be
missing from the graph); every export is validated against torch afterwards anyway.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

DEFAULT_OPSET = 17


def make_wrapper(model: Any, with_pooler: bool) -> Any:
    """An nn.Module(inputs_embeds, attention_mask) -> (last_hidden_state[, pooler_output])."""
    import torch

    params = inspect.signature(model.forward).parameters
    type_vocab = int(getattr(model.config, "type_vocab_size", 0) or 0)
    pass_types = "token_type_ids" in params and type_vocab > 0

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs_embeds: Any, attention_mask: Any) -> Any:
            kwargs: dict[str, Any] = {
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
            }
            if pass_types:
                kwargs["token_type_ids"] = torch.zeros_like(attention_mask)
            out = self.model(**kwargs, return_dict=True)
            if with_pooler:
                return out.last_hidden_state, out.pooler_output
            return out.last_hidden_state

    wrapper = Backbone()
    wrapper.eval()  # torch.onnx.export restores the wrapper's mode recursively: keep it eval
    return wrapper


def export_onnx(
    model: Any, path: Path, embedding_size: int, with_pooler: bool, opset: int = DEFAULT_OPSET
) -> list[str]:
    """Export the backbone to ``path``; returns the output names."""
    import torch

    wrapper = make_wrapper(model, with_pooler)
    outputs = ["last_hidden_state"] + (["pooler_output"] if with_pooler else [])
    g = torch.Generator().manual_seed(0)
    example = torch.randn(2, 7, embedding_size, generator=g) * 0.02
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # a padded row: the traced graph must keep the attention-mask path
    dyn: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "last_hidden_state": {0: "batch", 1: "sequence"},
    }
    if with_pooler:
        dyn["pooler_output"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example, mask),
            str(path),
            input_names=["inputs_embeds", "attention_mask"],
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model.eval()
    return outputs


def torch_forward(model: Any, x: Any, mask: Any, with_pooler: bool) -> tuple[Any, Any | None]:
    """Reference outputs of the torch backbone on numpy inputs (float32 numpy out)."""
    import torch

    wrapper = make_wrapper(model, with_pooler)
    with torch.no_grad():
        out = wrapper(torch.from_numpy(x), torch.from_numpy(mask))
    if with_pooler:
        return out[0].float().numpy(), out[1].float().numpy()
    return out.float().numpy(), None


def torch_forward_ids(model: Any, ids: Any, mask: Any) -> Any:
    """last_hidden_state of the model's ordinary input_ids path (token types zero)."""
    import torch

    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
    }
    if "token_type_ids" in params and int(getattr(model.config, "type_vocab_size", 0) or 0) > 0:
        kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])
    with torch.no_grad():
        return model(**kwargs, return_dict=True).last_hidden_state.float().numpy()
