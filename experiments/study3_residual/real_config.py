"""Study 3 on real models: configuration (frozen dataclasses from YAML, ``key=value`` overrides, validated before
anything loads or compiles).

A base chat model, its safety-tuned versions — local folders, or training runs of the library's trainer
(``safety_jax.train.run.RunConfig`` fields: SSFT / DPO on jailbreak-exposed data) started from the base and computed
as stages — and prompt sets read through ``safety_jax.data.benchmarks`` (StrongREJECT, AdvBench, OR-Bench, … from
the hub or local files in their published formats), each marked harmful or benign.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from experiments.study1_mechanics.config import read_config
from experiments.study1_mechanics.real_config import CheckpointSpec, PromptSetSpec, check_mesh_spec
from experiments.study3_residual.config import INTERVENTION_MODES, InterventionSpec, ProbeSpec, ShiftSpec
from safety_jax.analysis.residual import SHIFTS
from safety_jax.configs import build
from safety_jax.errors import ConfigError
from safety_jax.eval.judges import REFUSAL_LISTS
from safety_jax.model.config import DTYPES
from safety_jax.parallel import STRATEGY_RULES

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class TunedSpec:
    """A safety-tuned model: ``path`` (a local folder), or ``train`` (``RunConfig`` fields; ``model`` and ``out``
    are filled in: the base folder and the stage folder)."""

    path: str = ""
    train: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Study3RealConfig:
    """``sets``: prompt sets by name, ``harmful`` / ``benign`` the names in each class; prompts are cut to
    ``max_chars`` characters (the reference: 256). Refusal labels: greedy answers (``max_new_tokens``) judged by the
    substring list ``judge``. ``shift``: as the synthetic study (its ``pairs`` are not read: each tuned model is
    paired with the base). ``intervention``: the α sweep of the synthetic study on the first ``n`` harmful and benign
    prompts (refusal rates, and the perplexity of each model's own α = 0 answers to the benign ones); empty
    ``alphas`` skips it."""

    name: str = "real"
    seed: int = 0
    notes: str = ""
    base: CheckpointSpec = dataclasses.field(default_factory=lambda: CheckpointSpec(prompt_format="chat"))
    tuned: dict[str, TunedSpec] = dataclasses.field(default_factory=dict)
    sets: dict[str, PromptSetSpec] = dataclasses.field(default_factory=dict)
    harmful: list[str] = dataclasses.field(default_factory=list)
    benign: list[str] = dataclasses.field(default_factory=list)
    max_chars: int = 256
    dtype: str = "bfloat16"
    mesh: str | None = "fsdp=-1"
    strategy: str = "auto"
    batch_size: int = 32
    max_new_tokens: int = 64
    judge: str = "GCG-29"
    shift: ShiftSpec = dataclasses.field(default_factory=ShiftSpec)
    probe: ProbeSpec = dataclasses.field(default_factory=ProbeSpec)
    intervention: InterventionSpec = dataclasses.field(default_factory=lambda: InterventionSpec(alphas=[]))
    min_n: int = 30

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_config(self, name: str, out: str) -> Any:
        """The ``RunConfig`` of tuned model ``name``'s training (from the base folder into ``out``)."""
        from safety_jax.train.run import RunConfig

        try:
            return RunConfig(**{**self.tuned[name].train, "model": self.base.path, "out": out})
        except TypeError as e:
            raise ConfigError(f"config tuned.{name}.train: {e}") from None


def validate(cfg: Study3RealConfig) -> None:
    def fail(field: str, value: Any, want: str) -> None:
        raise ConfigError(f"config {field}={value!r}: {want}")

    cfg.base.validate("base")
    if not cfg.tuned:
        fail("tuned", cfg.tuned, "name at least one safety-tuned model ({name: {path: ...}} or {name: {train: ...}})")
    for name, t in cfg.tuned.items():
        if bool(t.path) == (t.train is not None):
            fail(f"tuned.{name}", dataclasses.asdict(t), "give exactly one of path (a folder) or train (RunConfig "
                 "fields of the run that tunes the base model)")
        if t.train is not None:
            if not isinstance(t.train, dict) or {"model", "preset", "out"} & set(t.train):
                fail(f"tuned.{name}.train", t.train, "a mapping of RunConfig fields without model / preset / out "
                     "(the base model and the stage folder are filled in)")
            cfg.run_config(name, "unused")
    for name, s in cfg.sets.items():
        s.validate(f"sets.{name}")
    for cls in ("harmful", "benign"):
        names = getattr(cfg, cls)
        if not names or any(n not in cfg.sets for n in names):
            fail(cls, names, f"a non-empty list of names from sets ({', '.join(cfg.sets) or 'none given'})")
    if set(cfg.harmful) & set(cfg.benign):
        fail("benign", cfg.benign, "a set cannot be both harmful and benign")
    for name in ("max_chars", "batch_size", "max_new_tokens", "min_n"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(name, value, "a whole number ≥ 1")
    if cfg.dtype not in DTYPES:
        fail("dtype", cfg.dtype, f"choose one of {DTYPES}")
    if cfg.mesh is not None:
        check_mesh_spec(cfg.mesh, "mesh")
    if cfg.strategy not in STRATEGY_RULES:
        fail("strategy", cfg.strategy, f"choose one of {sorted(STRATEGY_RULES)}")
    if cfg.judge not in REFUSAL_LISTS:
        fail("judge", cfg.judge, f"a refusal list: {', '.join(REFUSAL_LISTS)}")
    iv = cfg.intervention
    if any(isinstance(a, bool) or not isinstance(a, int | float) or a < 0 for a in iv.alphas):
        fail("intervention.alphas", iv.alphas, "a list of numbers ≥ 0 (0 = no intervention; empty = no sweep)")
    if iv.mode not in INTERVENTION_MODES:
        fail("intervention.mode", iv.mode, f"choose from {', '.join(INTERVENTION_MODES)}")
    if isinstance(iv.n, bool) or not isinstance(iv.n, int) or iv.n < 1:
        fail("intervention.n", iv.n, "a whole number ≥ 1")
    if cfg.shift.variant not in SHIFTS:
        fail("shift.variant", cfg.shift.variant, f"choose from {', '.join(SHIFTS)}")


def load_real_config(name_or_path: str, overrides: Sequence[str] = ()) -> Study3RealConfig:
    """Read a YAML config (a shipped name such as ``real_llama3`` or a path) and apply ``key.sub=value`` overrides."""
    return build(Study3RealConfig, read_config(name_or_path, overrides, HERE), name_or_path)
