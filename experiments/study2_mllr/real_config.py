"""Study 2 on real checkpoints (Llama-2-7B-chat): the validated config of the real pipeline (``real.py``).

Probe data: AdvBench harmful behaviours and benign twins made by substituting a few words (``twins: substitute``,
ours: a fixed list, since the paper's is unpublished) or harmless instructions of another set (``twins:
instructions``). Benign fine-tuning: Alpaca or GSM8K. Evaluation: the harmful prompts' attack success (a refusal
list judge: success = not refused; or a moderation judge folder) and, for GSM8K, the task accuracy.
``load_real_config("real_llama2")`` reads the YAML next to this file; every error names the field. Every ``*data``
field is a ``data.benchmarks.load_benchmark`` spec and its ``*data_files`` local files in that set's format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from experiments.study1_mechanics.config import read_config
from experiments.study2_mllr.config import HERE, PLANS, SCHEDULES
from safety_jax.configs import build
from safety_jax.configs import invalid as _fail
from safety_jax.model.llama import LINEAR_MODULES

TASKS = ("alpaca", "gsm8k")
TWINS = ("substitute", "instructions")
TEMPLATES = ("chat", "alpaca", "none")
REAL_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RealProbe:
    """``n`` harmful prompts of ``harmful`` and as many benign twins, split into train / val / test pairs."""

    harmful: str = "advbench"
    harmful_data_files: Any = None
    n: int = 520
    twins: str = "substitute"
    benign: str = "alpaca:train"  # the harmless instructions of twins=instructions
    benign_data_files: Any = None
    val_frac: float = 0.2
    test_frac: float = 0.2
    layer: str | int = "best"
    l2: float = 1e-3
    steps: int = 500
    lr: float = 0.05
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class RealRobustness:
    """Gaussian perturbations of relative size ``eps`` on every (module, layer) of ``modules``, ``chunk`` layers
    vmapped at once (1: one stacked weight copy at a time); the search keeps the probe accuracy ≥ the unperturbed
    accuracy − ``max_drop``."""

    eps: float = 0.2
    modules: list[str] = dataclasses.field(default_factory=lambda: list(LINEAR_MODULES))
    chunk: int = 1
    max_drop: float = 0.05
    stop_at_first_failure: bool = True


@dataclasses.dataclass(frozen=True)
class RealBenign:
    """Full-weight fine-tuning on ``n`` examples of ``task`` under each of ``plans`` (ML-LR's ``gamma`` /
    ``reverse``, SWAT's ``warmup_frac``)."""

    task: str = "alpaca"
    data: str | None = None  # default "<task>:train"
    data_files: Any = None
    n: int = 5000
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    plans: list[str] = dataclasses.field(default_factory=lambda: list(PLANS))
    gamma: float = 0.1
    reverse: bool = False
    warmup_frac: float = 0.5
    remat: str = "full"


@dataclasses.dataclass(frozen=True)
class RealEval:
    """Harmful prompts (``harmful``: attack success = the judge's harmful rate; a refusal list counts answers not
    refused) and, for GSM8K, ``n_task`` test questions."""

    harmful: str = "advbench"
    harmful_data_files: Any = None
    n_harmful: int = 520
    judge: str = "GCG-29"
    judge_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    task_data: str | None = None  # default gsm8k:test
    task_data_files: Any = None
    n_task: int = 500
    max_new_tokens: int = 256
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class RealStudy2Config:
    name: str = "real_llama2"
    seed: int = 0
    model: str = "meta-llama/Llama-2-7b-chat-hf"
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    max_length: int = 512
    template: str = "chat"
    probe: RealProbe = dataclasses.field(default_factory=RealProbe)
    robustness: RealRobustness = dataclasses.field(default_factory=RealRobustness)
    benign: RealBenign = dataclasses.field(default_factory=RealBenign)
    eval: RealEval = dataclasses.field(default_factory=RealEval)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(field: str, value: Any, ok: Any, want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        _fail(field, value, want)


def validate(cfg: RealStudy2Config) -> None:
    """Every field's type and range (whether folders and files exist is checked when the runner starts)."""
    if cfg.dtype not in REAL_DTYPES:
        _fail("dtype", cfg.dtype, f"choose from {', '.join(REAL_DTYPES)}")
    if cfg.template not in TEMPLATES:
        _fail("template", cfg.template, f"choose from {', '.join(TEMPLATES)}")
    _check("max_length", cfg.max_length, lambda v: isinstance(v, int) and v >= 8, "a whole number ≥ 8")
    p = cfg.probe
    _check("probe.n", p.n, lambda v: isinstance(v, int) and v >= 6, "a whole number ≥ 6 (train, val, test pairs)")
    if p.twins not in TWINS:
        _fail("probe.twins", p.twins, f"choose from {', '.join(TWINS)}")
    for name in ("val_frac", "test_frac"):
        _check(f"probe.{name}", getattr(p, name), lambda v: 0 < v < 0.5, "a fraction in (0, 0.5)")
    if p.layer != "best" and (isinstance(p.layer, bool) or not isinstance(p.layer, int) or p.layer < 0):
        _fail("probe.layer", p.layer, "'best' (chosen on the validation pairs) or a layer index")
    _check("probe.l2", p.l2, lambda v: v >= 0, "a number ≥ 0")
    _check("probe.steps", p.steps, lambda v: isinstance(v, int) and v >= 1, "a whole number ≥ 1")
    _check("probe.lr", p.lr, lambda v: v > 0, "a positive number")
    _check("probe.batch_size", p.batch_size, lambda v: isinstance(v, int) and v >= 1, "a whole number ≥ 1")
    r = cfg.robustness
    _check("robustness.eps", r.eps, lambda v: v > 0, "a positive number")
    _check("robustness.chunk", r.chunk, lambda v: isinstance(v, int) and v >= 1, "a whole number ≥ 1")
    _check("robustness.max_drop", r.max_drop, lambda v: 0 <= v <= 1, "a fraction in [0, 1] of probe accuracy")
    if not isinstance(r.modules, list) or not r.modules or any(m not in LINEAR_MODULES for m in r.modules):
        _fail("robustness.modules", r.modules, f"a non-empty list from {', '.join(LINEAR_MODULES)}")
    b = cfg.benign
    if b.task not in TASKS:
        _fail("benign.task", b.task, f"choose from {', '.join(TASKS)}")
    for name in ("n", "epochs", "batch_size"):
        _check(f"benign.{name}", getattr(b, name), lambda v: isinstance(v, int) and v >= 1, "a whole number ≥ 1")
    _check("benign.lr", b.lr, lambda v: v > 0, "a positive number")
    _check("benign.gamma", b.gamma, lambda v: v >= 0, "a learning-rate factor ≥ 0")
    _check("benign.warmup_frac", b.warmup_frac, lambda v: 0 < v < 1, "a fraction in (0, 1)")
    if b.schedule not in SCHEDULES:
        _fail("benign.schedule", b.schedule, f"choose from {', '.join(SCHEDULES)}")
    if not b.plans or any(x not in PLANS for x in b.plans) or "uniform" not in b.plans:
        _fail("benign.plans", b.plans, f"a list from {', '.join(PLANS)} that includes uniform (the baseline)")
    e = cfg.eval
    for name in ("n_harmful", "n_task", "max_new_tokens", "batch_size"):
        _check(f"eval.{name}", getattr(e, name), lambda v: isinstance(v, int) and v >= 1, "a whole number ≥ 1")
    if not isinstance(e.judge, str) or not e.judge:
        _fail("eval.judge", e.judge, "a refusal list name (GCG-29, JBB-13) or a moderation judge folder")


def load_real_config(name_or_path: str, overrides: Sequence[str] = ()) -> RealStudy2Config:
    """Read a real-model YAML config (a shipped name or a path) and apply ``key.sub=value`` overrides."""
    return build(RealStudy2Config, read_config(name_or_path, overrides, HERE), name_or_path)
