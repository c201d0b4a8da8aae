"""The task model: a frozen backbone, ``peft``'s prompt or prefix module, and a linear head.

- ``ptuning``: P-tuning. ``l`` trainable prompt embeddings are inserted into the input embedding
  sequence, made by ``peft``'s ``PromptEncoder`` (MLP reparametrisation, ``reparam="mlp"``) or
  ``PromptEmbedding`` (plain embeddings, the prompt tuning of Lester et al.; ``reparam="none"``).
- ``ptuning-v2``: P-tuning v2. ``peft``'s ``PrefixEncoder`` makes ``l`` key/value pairs for
  *every* layer, prepended to each self-attention's keys and values (``PrefixSelfAttention``,
  which wraps each layer's own self-attention module).

The deployed model must be exactly what the monitor reads:

- **Prompt position.** ``peft``'s own ``PeftModel`` prepends P-tuning prompts *before* ``[CLS]``.
  The bundle runtime (``lmsan export --prompt``) inserts the prompt right *after* the first
  special token, as the PV miner does, and so does the task model here: the exported bundle
  computes exactly the backbone output that the classifier reads.
- **Token types** are all 0, as in the exported graph and the audit.
- **Prefix positions.** The P-tuning v2 prefix has no position: its keys/values are concatenated
  in front of the keys/values of each layer, the attention mask is extended with ones for them,
  and the position ids of the text are not shifted.
- The backbone runs in eval mode (no dropout) and is frozen.
- **Head position** (:data:`HEAD_POSITIONS`): ``[CLS]`` (position 0) for sentence and pair
  tasks, or the ``[MASK]`` of the monitor's template (``f"{text} [MASK]"`` on the last text; the
  prompt-based classification that BToP attacks); for token classification the first sub-token
  of every whitespace word, where the monitor's ``tokens`` target also reads.

torch, transformers and peft are imported inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .encode import mask_token_of

METHODS = ("ptuning", "ptuning-v2")
REPARAMS = ("mlp", "none")
HEAD_POSITIONS = ("cls", "mask")  # the positions a sequence task's head can read
PROMPT_POSITION = "after_first_special"  # what the bundle runtime does


def head_position(kind: str, target: str) -> str:
    """The monitor target that reads the vector(s) the task head reads: ``tokens`` for token
    tasks, the head's ``target`` (cls or mask) for sequence tasks."""
    return "tokens" if kind != "sequence" else target


def _prefix_attention_class() -> Any:
    import torch

    class PrefixSelfAttention(torch.nn.Module):
        """A BERT-style self-attention with prefix keys/values in front of its own (P-tuning v2).

        Wraps the original module (same weights); the prefix for this layer is read from
        ``state.kv[layer]`` ([2, l, d]: keys, values) at every call, so training can feed the
        prefix encoder's output and the export can bake a constant."""

        def __init__(self, inner: Any, layer: int, state: Any) -> None:
            super().__init__()
            self.inner = inner
            self.layer = layer
            self.state = state  # a plain object, not a module

        def forward(
            self, hidden_states: Any, attention_mask: Any = None, *args: Any, **kw: Any
        ) -> Any:
            inner = self.inner
            B, S, _ = hidden_states.shape
            h, hd = inner.num_attention_heads, inner.attention_head_size

            def heads(x: Any) -> Any:
                return x.view(x.shape[0], -1, h, hd).transpose(1, 2)

            q = heads(inner.query(hidden_states))
            k = heads(inner.key(hidden_states))
            v = heads(inner.value(hidden_states))
            kv = self.state.kv
            lp = 0
            if kv is not None:
                pk = kv[self.layer, 0]  # [l, d]
                pv = kv[self.layer, 1]
                lp = pk.shape[0]
                k = torch.cat([heads(pk.unsqueeze(0)).expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([heads(pv.unsqueeze(0)).expand(B, -1, -1, -1), v], dim=2)
            scores = torch.matmul(q, k.transpose(-1, -2)) * inner.scaling
            if attention_mask is not None:
                m = attention_mask
                if m.dtype == torch.bool:
                    m = torch.zeros_like(m, dtype=scores.dtype).masked_fill(
                        ~m, torch.finfo(scores.dtype).min
                    )
                if lp:
                    m = torch.nn.functional.pad(m, (lp, 0), value=0.0)
                scores = scores + m
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, h * hd)
            return out, None

    return PrefixSelfAttention


class _PrefixState:
    kv: Any = None


def build_task_model(
    backbone: Any,
    method: str,
    n_labels: int,
    kind: str,
    peft_config: Any,
    init_rows: Any | None,
) -> Any:
    """The torch module: frozen backbone + peft prompt/prefix module + linear head."""
    import torch

    class TaskModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
            self.method = method
            self.kind = kind
            self.peft_config = peft_config
            cfg = backbone.config
            self.d = int(cfg.hidden_size)
            self.n_tokens = int(peft_config.num_virtual_tokens)
            self.prefix_state = _PrefixState()
            self.fixed: Any = None  # a constant prompt / prefix (loaded or baked)
            from peft import PeftType

            self.prompt_module: Any
            if method == "ptuning":
                if peft_config.peft_type == PeftType.P_TUNING:
                    from peft.tuners.p_tuning import PromptEncoder

                    self.prompt_module = PromptEncoder(peft_config)
                else:
                    from peft.tuners.prompt_tuning import PromptEmbedding

                    self.prompt_module = PromptEmbedding(
                        peft_config, backbone.get_input_embeddings()
                    )
                if init_rows is not None:
                    with torch.no_grad():
                        self.prompt_module.embedding.weight.copy_(init_rows)
            else:
                from peft.tuners.prefix_tuning import PrefixEncoder

                self.prompt_module = PrefixEncoder(peft_config)
                cls = _prefix_attention_class()
                for i, layer in enumerate(backbone.encoder.layer):
                    inner = layer.attention.self
                    if isinstance(inner, cls):
                        raise InputError("the backbone already carries prefix attention")
                    layer.attention.self = cls(inner, i, self.prefix_state)
            self.head = torch.nn.Linear(self.d, n_labels)

        # -- the prompt as used at run time
        def prompt_output(self) -> Any:
            """P-tuning: [l, emb]; P-tuning v2: [l, layers*2*d] (peft's save layout)."""
            if self.fixed is not None:
                return self.fixed
            idx = torch.arange(self.n_tokens, device=self.head.weight.device)
            if self.method == "ptuning":
                return self.prompt_module(idx)
            return self.prompt_module(idx.unsqueeze(0))[0]

        def set_prefix(self) -> None:
            if self.method == "ptuning-v2":
                n_layers = len(self.backbone.encoder.layer)
                self.prefix_state.kv = (
                    self.prompt_output()
                    .view(self.n_tokens, n_layers, 2, self.d)
                    .permute(1, 2, 0, 3)
                )  # [layers, 2, l, d]

        def hidden(self, ids: Any, mask: Any) -> Any:
            """The backbone's last hidden state as deployed (prompt inserted after [CLS])."""
            emb = self.backbone.get_input_embeddings()(ids)
            if self.method == "ptuning":
                p = self.prompt_output().to(emb.dtype)
                B = emb.shape[0]
                emb = torch.cat([emb[:, :1], p.unsqueeze(0).expand(B, -1, -1), emb[:, 1:]], dim=1)
                ones = torch.ones(B, p.shape[0], dtype=mask.dtype, device=mask.device)
                mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
            else:
                self.set_prefix()
            kw: dict[str, Any] = {"inputs_embeds": emb, "attention_mask": mask}
            if int(getattr(self.backbone.config, "type_vocab_size", 0) or 0) > 0:
                kw["token_type_ids"] = torch.zeros_like(mask)
            return self.backbone(**kw, return_dict=True).last_hidden_state

        def prompt_len_in_sequence(self) -> int:
            return self.n_tokens if self.method == "ptuning" else 0

        def forward(self, ids: Any, mask: Any, pos: Any = None) -> Any:
            """``pos``: per row, the position the head reads (sequence tasks; in the token
            sequence before the prompt; None = [CLS])."""
            hs = self.hidden(ids, mask)
            if self.kind == "sequence":
                if pos is None:
                    return self.head(hs[:, 0])
                pos = pos.to(hs.device)
                shift = self.prompt_len_in_sequence()
                pos = torch.where(pos >= 1, pos + shift, pos)
                return self.head(hs[torch.arange(hs.shape[0], device=hs.device), pos])
            return self.head(hs)  # [B, S', classes]; token positions shifted by the prompt

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            self.backbone.eval()  # no dropout in the frozen backbone, ever
            return self

    return TaskModel()



@dataclass
class TaskModelHandle:
    """A trained (or loaded) task model with everything needed to run and save it."""

    module: Any  # the torch TaskModel
    tokenizer: Any
    task: str
    kind: str
    labels: list[str]
    method: str
    backbone_dir: Path
    backbone_digest: str
    pad_id: int
    info: dict[str, Any] = field(default_factory=dict)
    target: str = "cls"

    @property
    def mask_token(self) -> tuple[str, int] | None:
        """(token, id) for target mask; None for target cls."""
        return mask_token_of(self.tokenizer) if self.target == "mask" else None

    @property
    def prompt_length(self) -> int:
        return int(self.module.n_tokens)


def load_backbone(backbone_dir: str | Path) -> tuple[Any, Any, str, int]:
    from transformers.utils import logging as hf_logging

    from ..manifest import model_manifest
    from ..modelio import load_encoder

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    loaded = load_encoder(backbone_dir, allow_pickle=False, device="cpu")
    model = loaded.model
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "layer"):
        raise InputError(
            f"prompt tuning supports BERT-style encoders (encoder.layer[i].attention.self); "
            f"got {loaded.model_type}",
            backbone_dir,
        )
    pad = getattr(loaded.tokenizer, "pad_token_id", None)
    if not isinstance(pad, int):
        raise InputError("the tokenizer has no pad token", backbone_dir)
    if getattr(loaded.tokenizer, "backend_tokenizer", None) is None:
        raise InputError("the tokenizer has no fast (tokenizers) version", backbone_dir)
    return model, loaded.tokenizer, "sha256:" + model_manifest(backbone_dir).digest, int(pad)
