"""Prompt-tuned downstream models on a frozen (possibly backdoored) backbone, and their defence
(docs/how-it-works.md; the paper's sections V-A and V-B).

A task model is a frozen backbone, ``peft``'s P-tuning prompt or P-tuning v2 prefix, and a
linear head (:mod:`.model`); it is trained on a task (:mod:`.data`, :mod:`.train`), saved as a
task folder (:mod:`.store`), and deployed protected: the bundle written by
``lmsan tune export`` (:mod:`lmsan.export.task_bundle`) computes the backbone output the head
reads, and :class:`DefendedClassifier` monitors, purges and classifies with it (:mod:`.predict`).

Importing this package never imports torch, transformers or peft; the functions that need them
import them when called.
"""

from __future__ import annotations

from .data import (
    TASKS,
    TOPIC_CLASSES,
    Example,
    TaskData,
    load_conll04,
    load_rte,
    load_task,
    load_wordnet_topic,
    subsample,
)
from .encode import Batch, apply_mask_template, encode_records, mask_token_of, word_first_tokens
from .metrics import entity_spans, evaluate_clean, span_f1
from .model import (
    HEAD_POSITIONS,
    METHODS,
    PROMPT_POSITION,
    REPARAMS,
    TaskModelHandle,
    head_position,
)
from .predict import (
    ClassifiedTexts,
    DefendedClassifier,
    DefendedPrediction,
    classify_texts,
    predict,
)
from .prompts import PromptExport, extract_prompt
from .store import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HEAD_FILE,
    TASK_FILE,
    TASK_FORMAT,
    TASK_VERSION,
    load_task_model,
    read_prompt_embeddings_numpy,
    read_task_meta,
    save_task_model,
)
from .train import ProgressFn, TrainConfig, TrainedTask, train_task_folder, train_task_model

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "HEAD_FILE",
    "HEAD_POSITIONS",
    "METHODS",
    "PROMPT_POSITION",
    "REPARAMS",
    "TASKS",
    "TASK_FILE",
    "TASK_FORMAT",
    "TASK_VERSION",
    "TOPIC_CLASSES",
    "Batch",
    "ClassifiedTexts",
    "DefendedClassifier",
    "DefendedPrediction",
    "Example",
    "ProgressFn",
    "PromptExport",
    "TaskData",
    "TaskModelHandle",
    "TrainConfig",
    "TrainedTask",
    "apply_mask_template",
    "classify_texts",
    "encode_records",
    "entity_spans",
    "evaluate_clean",
    "extract_prompt",
    "head_position",
    "load_conll04",
    "load_rte",
    "load_task",
    "load_task_model",
    "load_wordnet_topic",
    "mask_token_of",
    "predict",
    "read_prompt_embeddings_numpy",
    "read_task_meta",
    "save_task_model",
    "span_f1",
    "subsample",
    "train_task_folder",
    "train_task_model",
    "word_first_tokens",
]
