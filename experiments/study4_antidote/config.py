"""Study 4 configuration (synthetic world): frozen dataclasses read from YAML with ``key=value`` overrides.

``load_config("demo", ["user.lrs=[1e-3, 3e-3]"])`` reads ``demo.yaml`` next to this file (or a path). Every key is
validated; an error names the field and what it accepts. The world, the model, pretraining and the alignment
(safety fine-tuning) are study 1's, read from its config ``study1`` (+ ``study1_overrides``), so both studies share
those stages in one output folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from experiments.study1_mechanics import config as study1_config
from safety_jax.configs import build
from safety_jax.configs import invalid as _fail
from safety_jax.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFENSES = ("none", "antidote", "vaccine", "lisa", "booster")
SCORES = ("wanda", "magnitude", "random")
TOKEN_MASKS = ("attention_mask", "loss_mask")
TARGETS = ("auto", "weights", "lora")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class AlignmentSpec:
    """The aligned model: study 1's fine-tuning run ``run`` ("method@lr_name", e.g. SSFT at η_M). Vaccine and
    Booster re-run that alignment with their gradient from study 1's pretrained model (``defense_args``: their
    ``make_defense_grad`` keyword arguments)."""

    run: str = "ssft@eta_M"
    defense_args: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class UserSpec:
    """The user's (harmful) fine-tuning: ``n`` examples, a fraction ``p`` of them unsafe inputs with their harmful
    completions and the rest safe operator tasks, ``epochs`` passes at learning rate ``lr`` (each list a grid axis).
    ``lora``: LoraConfig fields of a new adapter on the frozen aligned model (null: full weights)."""

    n: int = 256
    p: list[float] = dataclasses.field(default_factory=lambda: [0.2])
    lrs: list[float] = dataclasses.field(default_factory=lambda: [1e-4])
    epochs: list[int] = dataclasses.field(default_factory=lambda: [5])
    batch_size: int = 16
    schedule: str = "constant"
    weight_decay: float = 0.0
    lora: dict[str, Any] | None = None
    lisa: dict[str, Any] = dataclasses.field(default_factory=dict)  # Lisa's schedule / proximal term settings


@dataclasses.dataclass(frozen=True)
class AntidoteSpec:
    """Antidote (``defenses.antidote``): per output row, the top ``ratios`` (dense ratio α, a grid axis) of the
    ``scores`` (a grid axis; Wanda = Antidote, magnitude and random the ablations) of ``modules`` zeroed, with
    statistics over ``n_calibration`` other harmful (unsafe input, harmful completion) examples. ``target``: ``auto``
    = the user's LoRA adapters when the user fine-tuning is LoRA, else the weights. ``headline_ratio`` (default the
    first ratio) is the α compared against the other defenses."""

    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2])
    scores: list[str] = dataclasses.field(default_factory=lambda: list(SCORES))
    modules: list[str] = dataclasses.field(default_factory=lambda: ["attn.q@*", "attn.k@*", "attn.v@*"])
    n_calibration: int = 256
    batch_size: int = 64
    token_mask: str = "attention_mask"
    target: str = "auto"
    headline_ratio: float | None = None

    @property
    def headline(self) -> float:
        return self.ratios[0] if self.headline_ratio is None else self.headline_ratio


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Test sets: ``n_test`` unsafe inputs (harmful score) and ``n_test`` safe ones (task accuracy)."""

    n_test: int = 256
    batch_size: int = 256
    min_n: int = 30  # claims on fewer test examples than this are not decided


@dataclasses.dataclass(frozen=True)
class Study4Config:
    """One run of study 4 on the synthetic world. ``defense``: one of DEFENSES or a list of them (compared)."""

    name: str = "demo"
    seed: int = 0
    notes: str = ""
    study1: str = "demo"
    study1_overrides: list[str] = dataclasses.field(default_factory=list)
    defense: list[str] = dataclasses.field(default_factory=lambda: ["none", "antidote"])
    alignment: AlignmentSpec = dataclasses.field(default_factory=AlignmentSpec)
    user: UserSpec = dataclasses.field(default_factory=UserSpec)
    antidote: AntidoteSpec = dataclasses.field(default_factory=AntidoteSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
        if isinstance(self.defense, str):
            object.__setattr__(self, "defense", [self.defense])
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def study1_config(self) -> study1_config.StudyConfig:
        return study1_config.load_config(self.study1, self.study1_overrides)


def _numbers(field: str, values: Any, ok, want: str) -> None:
    if not isinstance(values, list) or not values:
        _fail(field, values, f"give a non-empty list of {want}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
            _fail(field, values, f"every entry must be {want}")


def validate(cfg: Study4Config) -> None:
    """Every field's type and range; an error names the field and what it accepts."""
    bad = [d for d in cfg.defense if d not in DEFENSES]
    if bad or not cfg.defense:
        _fail("defense", cfg.defense, f"choose from {', '.join(DEFENSES)} (a name or a list)")
    method, sep, lr_name = cfg.alignment.run.partition("@")
    if not sep or method not in study1_config.METHODS:
        _fail("alignment.run", cfg.alignment.run, f"'method@lr_name' with a study 1 method "
              f"({', '.join(study1_config.METHODS)}) and a name from study 1's finetune.lrs")
    u = cfg.user
    if not isinstance(u.n, int) or u.n < 1:
        _fail("user.n", u.n, "a whole number ≥ 1")
    if not isinstance(u.batch_size, int) or not 1 <= u.batch_size <= u.n:
        _fail("user.batch_size", u.batch_size, f"a whole number in [1, user.n = {u.n}]")
    _numbers("user.p", u.p, lambda v: 0 <= v <= 1, "fractions in [0, 1]")
    _numbers("user.lrs", u.lrs, lambda v: v > 0, "positive learning rates")
    _numbers("user.epochs", u.epochs, lambda v: isinstance(v, int) and v >= 1, "whole numbers ≥ 1")
    if u.schedule not in SCHEDULES:
        _fail("user.schedule", u.schedule, f"choose from {', '.join(SCHEDULES)}")
    if u.weight_decay < 0:
        _fail("user.weight_decay", u.weight_decay, "≥ 0")
    if u.lora is not None:
        from safety_jax.model.lora import LoraConfig

        if not isinstance(u.lora, dict):
            _fail("user.lora", u.lora, "a mapping of LoraConfig fields (rank, alpha, targets, …) or null")
        try:
            LoraConfig(**u.lora)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config user.lora: {e}") from None
    a = cfg.antidote
    _numbers("antidote.ratios", a.ratios, lambda v: 0 < v < 1, "dense ratios α in (0, 1)")
    if a.headline_ratio is not None and a.headline_ratio not in a.ratios:
        _fail("antidote.headline_ratio", a.headline_ratio, f"one of antidote.ratios {a.ratios}")
    if not a.scores or any(s not in SCORES for s in a.scores):
        _fail("antidote.scores", a.scores, f"a non-empty list from {', '.join(SCORES)}")
    if not a.modules or not all(isinstance(m, str) for m in a.modules):
        _fail("antidote.modules", a.modules, "a non-empty list of module rules such as 'attn.q@*'")
    for name in ("n_calibration", "batch_size"):
        if not isinstance(getattr(a, name), int) or getattr(a, name) < 1:
            _fail(f"antidote.{name}", getattr(a, name), "a whole number ≥ 1")
    if a.token_mask not in TOKEN_MASKS:
        _fail("antidote.token_mask", a.token_mask, f"choose from {', '.join(TOKEN_MASKS)}")
    if a.target not in TARGETS:
        _fail("antidote.target", a.target, f"choose from {', '.join(TARGETS)}")
    if a.target == "lora" and u.lora is None:
        _fail("antidote.target", a.target, "'lora' prunes the user's adapters: set user.lora, or use 'weights'")
    e = cfg.eval
    for name in ("n_test", "batch_size", "min_n"):
        if not isinstance(getattr(e, name), int) or getattr(e, name) < 1:
            _fail(f"eval.{name}", getattr(e, name), "a whole number ≥ 1")
    if not isinstance(cfg.study1_overrides, list):
        _fail("study1_overrides", cfg.study1_overrides, "a list of 'section.key=value' strings")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Study4Config:
    """Read a YAML config (a shipped name or a path) and apply ``key.sub=value`` overrides."""
    return build(Study4Config, study1_config.read_config(name_or_path, overrides, HERE), name_or_path)
