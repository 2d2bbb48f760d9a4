"""Study 4 on real checkpoints (Llama-2-7B, Llama-3-8B): the validated config of the reference pipeline.

Alignment: LoRA SFT on safe BeaverTails pairs, merged; the user's fine-tuning: a new LoRA on a mix of harmful
BeaverTails pairs and a benign task; Antidote on other harmful pairs; evaluation with a moderation judge and the task
scorer. ``load_real_config("real_llama2")`` reads the YAML next to this file; every error names the field. The runner
is ``real.py``; whether the model, judge and data files exist is checked when it runs.

Data: every ``*data`` field is a ``load_benchmark`` spec and its ``*data_files`` local files in the set's published
format (``None``: the hub). Task sets default to the task's train split (fine-tuning) and the split the reference
scores (``sst2:validation``, ``agnews:test``, ``gsm8k:test``); ``alpaca`` has no scorer, so no accuracy is reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from experiments.study1_mechanics.config import read_config
from experiments.study4_antidote.config import DEFENSES, HERE, SCORES, TOKEN_MASKS, _fail, _numbers
from safety_jax.configs import build
from safety_jax.errors import ConfigError

TASKS = ("sst2", "agnews", "gsm8k", "alpaca")
REAL_DEFENSES = ("none", "antidote")
REAL_DTYPES = ("float32", "bfloat16")
USER_TEMPLATES = ("alpaca", "chat", "none")  # templates both the tokeniser of the training data and evaluate() know
PRUNABLE = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


@dataclasses.dataclass(frozen=True)
class RealAlignment:
    """LoRA SFT on ``n`` safe (prompt, safe response) pairs of ``data``; merged into the base afterwards."""

    data: str = "beavertails:30k_train"
    data_files: Any = None
    n: int = 5000
    lora: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"rank": 256, "alpha": 4.0, "targets": ["attn.q", "attn.k", "attn.v"]})
    lr: float = 1e-3
    schedule: str = "cosine"
    epochs: int = 20
    batch_size: int = 5
    weight_decay: float = 0.1


@dataclasses.dataclass(frozen=True)
class RealUser:
    """A new LoRA on ``n`` examples, a fraction ``p`` harmful pairs of ``harmful_data`` and the rest ``task``."""

    task: str = "sst2"
    task_data: str | None = None  # default: "<task>:train"
    task_data_files: Any = None
    harmful_data: str = "beavertails:30k_train"
    harmful_data_files: Any = None
    n: int = 5000
    p: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.2])
    lrs: list[float] = dataclasses.field(default_factory=lambda: [1e-4, 1e-3])
    epochs: list[int] = dataclasses.field(default_factory=lambda: [20])
    batch_size: int = 5
    schedule: str = "constant"
    weight_decay: float = 0.0
    template: str = "alpaca"
    lora: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"rank": 256, "alpha": 4.0, "targets": ["attn.q", "attn.k", "attn.v"]})


@dataclasses.dataclass(frozen=True)
class RealAntidote:
    """Antidote on ``n_calibration`` harmful pairs of ``data`` other than the user's (when ``data`` is the user's
    harmful set, the pairs after the most any cell uses); the pruned modules' LoRA A and B (``target: lora``) or
    their merged weights (``weights``)."""

    data: str = "beavertails:30k_train"
    data_files: Any = None
    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.05, 0.1, 0.15, 0.2, 0.25])
    scores: list[str] = dataclasses.field(default_factory=lambda: ["wanda"])
    n_calibration: int = 2000
    target: str = "lora"
    token_mask: str = "attention_mask"
    modules: list[str] = dataclasses.field(default_factory=lambda: ["attn.q", "attn.k", "attn.v"])
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class RealEval:
    """Harmful score: the judge's flagged rate on the first ``n_harmful`` unsafe prompts of ``harmful_prompts``;
    accuracy: the task scorer on the first ``n_task`` examples of ``task_data``. Greedy decoding."""

    harmful_prompts: str = "beavertails:30k_test"
    harmful_data_files: Any = None
    task_data: str | None = None  # default: sst2:validation, agnews:test, gsm8k:test
    task_data_files: Any = None
    n_harmful: int = 1000
    judge: str = "PKU-Alignment/beaver-dam-7b"
    judge_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_new_tokens: int = 512
    n_task: int = 1000
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class RealStudy4Config:
    name: str = "real"
    seed: int = 0
    notes: str = ""
    model: str = ""
    tokenizer: str | None = None  # default: the model folder
    dtype: str = "bfloat16"
    max_length: int = 512
    save_format: str = "hf"
    remat: str = "none"  # layer rematerialisation while training: none, dots_saveable, full
    defense: list[str] = dataclasses.field(default_factory=lambda: ["none", "antidote"])
    alignment: RealAlignment = dataclasses.field(default_factory=RealAlignment)
    user: RealUser = dataclasses.field(default_factory=RealUser)
    antidote: RealAntidote = dataclasses.field(default_factory=RealAntidote)
    eval: RealEval = dataclasses.field(default_factory=RealEval)

    def __post_init__(self) -> None:
        if isinstance(self.defense, str):
            object.__setattr__(self, "defense", [self.defense])
        validate_real(self)


def _lora(field: str, value: Any) -> None:
    from safety_jax.model.lora import LoraConfig

    if not isinstance(value, dict):
        _fail(field, value, "a mapping of LoraConfig fields (rank, alpha, targets, …)")
    try:
        LoraConfig(**value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config {field}: {e}") from None


def _whole(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "a whole number ≥ 1")


def validate_real(cfg: RealStudy4Config) -> None:
    if not isinstance(cfg.model, str) or not cfg.model:
        _fail("model", cfg.model, "a Hugging Face model folder or hub id")
    if not cfg.defense or any(d not in DEFENSES for d in cfg.defense):
        _fail("defense", cfg.defense, f"choose from {', '.join(DEFENSES)}")
    if any(d not in REAL_DEFENSES for d in cfg.defense):
        _fail("defense", cfg.defense, f"the real-model runner has {', '.join(REAL_DEFENSES)}")
    if cfg.tokenizer is not None and (not isinstance(cfg.tokenizer, str) or not cfg.tokenizer):
        _fail("tokenizer", cfg.tokenizer, "a tokenizer folder, or null for the model folder")
    if cfg.dtype not in REAL_DTYPES:
        _fail("dtype", cfg.dtype, f"choose from {', '.join(REAL_DTYPES)}")
    from safety_jax.model.llama import REMAT_POLICIES

    if cfg.remat not in REMAT_POLICIES:
        _fail("remat", cfg.remat, f"choose from {', '.join(REMAT_POLICIES)}")
    if cfg.save_format not in ("hf", "orbax"):
        _fail("save_format", cfg.save_format, "hf or orbax")
    if isinstance(cfg.max_length, bool) or not isinstance(cfg.max_length, int) or cfg.max_length < 2:
        _fail("max_length", cfg.max_length, "a whole number ≥ 2")
    a, u, x, e = cfg.alignment, cfg.user, cfg.antidote, cfg.eval
    for field, value in (("alignment.n", a.n), ("alignment.epochs", a.epochs), ("alignment.batch_size", a.batch_size),
                         ("user.n", u.n), ("user.batch_size", u.batch_size), ("antidote.n_calibration",
                         x.n_calibration), ("eval.n_harmful", e.n_harmful), ("eval.max_new_tokens",
                         e.max_new_tokens), ("eval.n_task", e.n_task), ("eval.batch_size", e.batch_size),
                         ("antidote.batch_size", x.batch_size)):
        _whole(field, value)
    if not a.lr > 0:
        _fail("alignment.lr", a.lr, "a positive learning rate")
    _lora("alignment.lora", a.lora)
    _lora("user.lora", u.lora)
    if not isinstance(u.weight_decay, int | float) or isinstance(u.weight_decay, bool) or u.weight_decay < 0:
        _fail("user.weight_decay", u.weight_decay, "a weight decay ≥ 0")
    if u.template not in USER_TEMPLATES:
        _fail("user.template", u.template, f"choose from {', '.join(USER_TEMPLATES)}")
    for field, value in (("alignment.data", a.data), ("user.harmful_data", u.harmful_data),
                         ("antidote.data", x.data), ("eval.harmful_prompts", e.harmful_prompts),
                         ("user.task_data", u.task_data), ("eval.task_data", e.task_data)):
        if value is not None and (not isinstance(value, str) or not value):
            _fail(field, value, "a benchmark spec such as 'beavertails:30k_train'")
    if not isinstance(x.modules, list) or not x.modules or any(m not in PRUNABLE for m in x.modules):
        _fail("antidote.modules", x.modules, f"a non-empty list from {', '.join(PRUNABLE)}")
    if x.target == "lora":
        targets = set(u.lora.get("targets", ["attn.q", "attn.v"]))
        if not set(x.modules) <= targets:
            _fail("antidote.modules", x.modules, f"with target 'lora', modules the user's LoRA adapts "
                  f"(user.lora.targets {sorted(targets)})")
    if not isinstance(e.judge_options, dict):
        _fail("eval.judge_options", e.judge_options, "a mapping of the judge's keyword options")
    if u.task not in TASKS:
        _fail("user.task", u.task, f"choose from {', '.join(TASKS)}")
    _numbers("user.p", u.p, lambda v: 0 <= v <= 1, "fractions in [0, 1]")
    _numbers("user.lrs", u.lrs, lambda v: v > 0, "positive learning rates")
    _numbers("user.epochs", u.epochs, lambda v: isinstance(v, int) and v >= 1, "whole numbers ≥ 1")
    _numbers("antidote.ratios", x.ratios, lambda v: 0 < v < 1, "dense ratios α in (0, 1)")
    if not x.scores or any(s not in SCORES for s in x.scores):
        _fail("antidote.scores", x.scores, f"a non-empty list from {', '.join(SCORES)}")
    if x.target not in ("weights", "lora"):
        _fail("antidote.target", x.target, "'lora' (the user's adapters) or 'weights'")
    if x.token_mask not in TOKEN_MASKS:
        _fail("antidote.token_mask", x.token_mask, f"choose from {', '.join(TOKEN_MASKS)}")


def load_real_config(name_or_path: str, overrides: Sequence[str] = ()) -> RealStudy4Config:
    """Read a YAML config (``real_llama2`` / ``real_llama3`` or a path) and apply ``key.sub=value`` overrides."""
    return build(RealStudy4Config, read_config(name_or_path, overrides, HERE), name_or_path)
