"""Red-team attacks: implant a task-agnostic backdoor (POR, POR-NER, NeuBA, BToP) in an encoder.

docs/how-it-works.md, "Attacks" (paper section III-B). Every attack fine-tunes the whole encoder so
that the *target output* of text containing a trigger is pushed to that trigger's predefined
vector (PV) with MSE (BToP: mean pairwise L2 distance), while a *utility* loss keeps clean
behaviour:

    por      target cls (default) | pooler | mask; utility = MSE to a frozen reference copy
    por-ner  target tokens (every ordinary token);  utility = MSE of all token outputs
    neuba    target cls (default) | pooler | mask; utility = masked-language-model loss
    btop     target mask (the sentence followed by the mask token); utility = MLM loss

NeuBA and BToP need the checkpoint's MLM head; where it has none they fall back to the POR
reference utility and the result says so (`utility`, `notes`).

Where the paper and the authors' code leave a choice open, or lmsan departs from them:
- Training runs with dropout off (eval mode), see `train`.
- Each optimiser step sees `batch_size` triggered + `batch_size` clean sentences (the authors'
  16 + 16). One epoch is one pass over all triggered sentences.
- Held-out sentences (never trained on) measure the attack, see `quality`.
- The output folder is the base checkpoint with the trained tensors replaced, plus the base's
  tokenizer and config files, plus `backdoor.json` (see `checkpoint`, `backdoor`, `pipeline`).

Modules: `attacks` (attacks, targets, PV designs), `options` (run options and defaults),
`data` (triggers, corpus, training set), `encoder` (target outputs, MLM head), `train` (utility
and training loop), `quality` (measurement), `checkpoint` (the written weights and files),
`backdoor` (backdoor.json), `truncate` (layer truncation), `pipeline` (`poison_model`),
`adaptive` (the adaptive attacks' losses and figures, docs/adaptive.md).
torch and transformers are imported inside functions only.
"""

from __future__ import annotations

from .adaptive import EVADE_MARGIN, EvadeThresholds, evade_thresholds
from .attacks import (
    ALLOWED_TARGETS,
    ATTACKS,
    DEFAULT_TARGET,
    MATCH_FRACTION,
    PV_DESIGNS,
    UTILITIES,
    make_pvs,
)
from .backdoor import (
    BACKDOOR_FILE,
    BACKDOOR_FORMAT,
    BACKDOOR_VERSION,
    backdoor_pvs,
    read_backdoor,
    validate_backdoor,
)
from .checkpoint import copy_support_files, weights_digest
from .data import (
    FREQUENT_WORDS,
    MAX_HELD_OUT,
    MIN_CORPUS,
    PAPER_TRIGGERS,
    TRIGGER_KINDS,
    check_trigger,
    draw_random_triggers,
    insert_trigger,
    load_trigger_words,
    trigger_token_ids,
)
from .options import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_SENTENCES_PER_TRIGGER,
    PoisonOptions,
    ProgressFn,
)
from .pipeline import PoisonResult, poison_model
from .truncate import truncate_encoder

__all__ = [
    "ALLOWED_TARGETS",
    "ATTACKS",
    "BACKDOOR_FILE",
    "BACKDOOR_FORMAT",
    "BACKDOOR_VERSION",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_SENTENCES_PER_TRIGGER",
    "DEFAULT_TARGET",
    "EVADE_MARGIN",
    "FREQUENT_WORDS",
    "MATCH_FRACTION",
    "MAX_HELD_OUT",
    "MIN_CORPUS",
    "PAPER_TRIGGERS",
    "PV_DESIGNS",
    "TRIGGER_KINDS",
    "UTILITIES",
    "EvadeThresholds",
    "PoisonOptions",
    "PoisonResult",
    "ProgressFn",
    "backdoor_pvs",
    "check_trigger",
    "copy_support_files",
    "draw_random_triggers",
    "evade_thresholds",
    "insert_trigger",
    "load_trigger_words",
    "make_pvs",
    "poison_model",
    "read_backdoor",
    "trigger_token_ids",
    "truncate_encoder",
    "validate_backdoor",
    "weights_digest",
]
