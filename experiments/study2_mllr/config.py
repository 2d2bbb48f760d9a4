"""Study 2 configuration (synthetic world): frozen dataclasses read from YAML with ``key=value`` overrides.

``load_config("demo", ["benign.lr=3e-3"])`` reads ``demo.yaml`` next to this file (or a path). The world, the model,
pretraining and the safety-tuned model are study 1's (config ``study1`` + ``study1_overrides``, run ``base_run``), so
both studies share those stages in one output folder. Every field marked "ours" is a reconstruction (the paper's
method section is not available, see shared/methods/02); its default is the spec's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from experiments.study1_mechanics import config as study1_config
from safety_jax.configs import build
from safety_jax.configs import check_positive as _positive
from safety_jax.configs import check_whole as _whole
from safety_jax.configs import invalid as _fail
from safety_jax.model.llama import LINEAR_MODULES

HERE = os.path.dirname(os.path.abspath(__file__))
PLANS = ("uniform", "mllr", "swat")
PERTURBATIONS = ("gaussian", "finetune")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """The security-feature classifier: logistic regression (L2, optax) on the residual stream after block ``layer``
    at the last prompt token (``>``) of ``n_train`` unsafe + ``n_train`` safe inputs; ``layer="best"`` picks the
    best-separating layer on ``n_val`` held-out pairs (ours: the spec's default); accuracy reported on ``n_test``."""

    n_train: int = 256
    n_val: int = 128
    n_test: int = 256
    layer: str | int = "best"
    l2: float = 1e-3
    steps: int = 500
    lr: float = 0.05
    min_accuracy: float = 0.95  # acceptance: held-out accuracy


@dataclasses.dataclass(frozen=True)
class RobustnessSpec:
    """Module robustness (ours): ``perturbation`` gaussian (relative Frobenius size ``eps``) or finetune
    (``finetune_steps`` SGD steps at ``finetune_lr`` on safe operator tasks, restricted to the module) on each of
    ``modules`` × every layer; the proxy-guided search keeps adding modules in robustness order while the probe
    accuracy with all chosen ones perturbed together stays ≥ the unperturbed accuracy − ``max_drop`` (Gaussian joint
    perturbations)."""

    perturbation: str = "gaussian"
    eps: float = 0.2
    modules: list[str] = dataclasses.field(default_factory=lambda: list(LINEAR_MODULES))
    chunk: int = 8
    finetune_steps: int = 5
    finetune_lr: float = 1e-2
    max_drop: float = 0.05
    stop_at_first_failure: bool = True


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """ML-LR: the modules outside Mods_Robust at ``gamma ×`` the base lr (``reverse``: Mods_Robust slowed instead);
    SWAT: Mods_Robust alone for ``warmup_frac`` of the steps, then all parameters (ours: γ, the warm-up share)."""

    gamma: float = 0.1
    reverse: bool = False
    warmup_frac: float = 0.5


@dataclasses.dataclass(frozen=True)
class BenignSpec:
    """Benign fine-tuning of the safety-tuned model: ``n`` safe operator tasks (answers on the whole output),
    ``epochs`` passes of batch ``batch_size`` at ``lr``, under each of ``plans``."""

    n: int = 256
    epochs: int = 5
    batch_size: int = 16
    lr: float = 3e-3
    schedule: str = "constant"
    weight_decay: float = 0.0
    plans: list[str] = dataclasses.field(default_factory=lambda: list(PLANS))


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Test sets: ``n_test`` inputs of every safety set (safe, unsafe, each jailbreak family)."""

    n_test: int = 256
    batch_size: int = 256
    min_n: int = 30  # claims on fewer test examples than this are not decided
    permutations: int = 2000  # the regularity claim's permutation baseline


@dataclasses.dataclass(frozen=True)
class Study2Config:
    """One run of study 2 on the synthetic world."""

    name: str = "demo"
    seed: int = 0
    notes: str = ""
    study1: str = "demo"
    study1_overrides: list[str] = dataclasses.field(default_factory=list)
    base_run: str = "ssft@eta_M"
    probe: ProbeSpec = dataclasses.field(default_factory=ProbeSpec)
    robustness: RobustnessSpec = dataclasses.field(default_factory=RobustnessSpec)
    plan: PlanSpec = dataclasses.field(default_factory=PlanSpec)
    benign: BenignSpec = dataclasses.field(default_factory=BenignSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def study1_config(self) -> study1_config.StudyConfig:
        return study1_config.load_config(self.study1, self.study1_overrides)


def validate(cfg: Study2Config) -> None:
    """Every field's type and range; an error names the field and what it accepts."""
    method, sep, _ = cfg.base_run.partition("@")
    if not sep or method not in study1_config.METHODS:
        _fail("base_run", cfg.base_run, f"'method@lr_name' with a study 1 method ({', '.join(study1_config.METHODS)})"
              " and a name from study 1's finetune.lrs")
    p = cfg.probe
    for name in ("n_train", "n_val", "n_test", "steps"):
        _whole(f"probe.{name}", getattr(p, name))
    if p.layer != "best":
        _whole("probe.layer", p.layer, 0) if not isinstance(p.layer, str) else _fail(
            "probe.layer", p.layer, "'best' (the best layer on held-out data) or a layer index")
    _positive("probe.lr", p.lr)
    if isinstance(p.l2, bool) or not isinstance(p.l2, int | float) or p.l2 < 0:
        _fail("probe.l2", p.l2, "a number ≥ 0")
    if not 0 < p.min_accuracy <= 1:
        _fail("probe.min_accuracy", p.min_accuracy, "a fraction in (0, 1]")
    r = cfg.robustness
    if r.perturbation not in PERTURBATIONS:
        _fail("robustness.perturbation", r.perturbation, f"choose from {', '.join(PERTURBATIONS)}")
    _positive("robustness.eps", r.eps)
    _positive("robustness.finetune_lr", r.finetune_lr)
    _whole("robustness.chunk", r.chunk)
    _whole("robustness.finetune_steps", r.finetune_steps)
    if not isinstance(r.modules, list) or not r.modules or any(m not in LINEAR_MODULES for m in r.modules):
        _fail("robustness.modules", r.modules, f"a non-empty list from {', '.join(LINEAR_MODULES)}")
    if isinstance(r.max_drop, bool) or not isinstance(r.max_drop, int | float) or not 0 <= r.max_drop <= 1:
        _fail("robustness.max_drop", r.max_drop, "a fraction in [0, 1] of probe accuracy")
    pl = cfg.plan
    if not 0 <= pl.gamma:
        _fail("plan.gamma", pl.gamma, "a learning-rate factor ≥ 0 (the paper's idea: < 1)")
    if not 0 < pl.warmup_frac < 1:
        _fail("plan.warmup_frac", pl.warmup_frac, "a fraction in (0, 1) of the fine-tuning steps")
    b = cfg.benign
    _whole("benign.n", b.n)
    _whole("benign.epochs", b.epochs)
    if isinstance(b.batch_size, bool) or not isinstance(b.batch_size, int) or not 1 <= b.batch_size <= b.n:
        _fail("benign.batch_size", b.batch_size, f"a whole number in [1, benign.n = {b.n}]")
    _positive("benign.lr", b.lr)
    if b.schedule not in SCHEDULES:
        _fail("benign.schedule", b.schedule, f"choose from {', '.join(SCHEDULES)}")
    if b.weight_decay < 0:
        _fail("benign.weight_decay", b.weight_decay, "≥ 0")
    if not b.plans or any(x not in PLANS for x in b.plans) or "uniform" not in b.plans:
        _fail("benign.plans", b.plans, f"a list from {', '.join(PLANS)} that includes uniform (the baseline)")
    steps = b.epochs * (b.n // b.batch_size)
    if "swat" in b.plans and not 1 <= int(round(pl.warmup_frac * steps)) < steps:
        _fail("plan.warmup_frac", pl.warmup_frac, f"gives no warm-up step or no second phase over {steps} steps")
    e = cfg.eval
    for name in ("n_test", "batch_size", "min_n", "permutations"):
        _whole(f"eval.{name}", getattr(e, name))
    if not isinstance(cfg.study1_overrides, list):
        _fail("study1_overrides", cfg.study1_overrides, "a list of 'section.key=value' strings")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Study2Config:
    """Read a YAML config (a shipped name or a path) and apply ``key.sub=value`` overrides."""
    return build(Study2Config, study1_config.read_config(name_or_path, overrides, HERE), name_or_path)
