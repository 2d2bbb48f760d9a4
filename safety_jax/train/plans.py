"""Module-wise learning-rate plans: ML-LR and SWAT (Du et al. 2024, arXiv 2410.04524; reconstructed, see
shared/methods/02 items 5–6).

A plan names Mods_Robust — the (module type, layer) slices the proxy-guided search found robust
(``analysis/robustness.py``) — and how fine-tuning treats them. Everything is expressed through the engine's own
rules (``train/optim.py``), so any optimizer and loss can use a plan:

- ``uniform``: no change (the baseline).
- ``mllr``: ``optim.lr_multipliers`` — the analysed modules outside Mods_Robust at ``γ ×`` the base learning rate and
  Mods_Robust at the base rate (``reverse``: Mods_Robust at ``γ ×``, the rest at the base rate). Weights the analysis
  did not cover (norms, embeddings, other module types) keep the base rate.
- ``swat``: two phases — ``warmup_steps`` with ``optim.trainable`` = Mods_Robust (everything else frozen: cut out of the
  trained tree, so it is bit-identical after the phase), then the remaining steps on all parameters.

A plan is saved as JSON (:func:`save_plan`); ``safety-jax train`` reads it from ``plan: path`` and applies
:func:`phases` to its ``optim`` settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from safety_jax.errors import ConfigError
from safety_jax.train.optim import LAYER_MODULES, OptimConfig

KINDS = ("uniform", "mllr", "swat")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A fine-tuning plan. mods_robust: ``((module, layer), ...)``; modules: the analysed module types;
    gamma: the ML-LR factor (γ < 1 slows the modules it applies to); warmup_steps: SWAT's first phase."""

    kind: str = "mllr"
    mods_robust: tuple[tuple[str, int], ...] = ()
    modules: tuple[str, ...] = ()
    num_layers: int = 0
    gamma: float = 0.1
    reverse: bool = False
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mods_robust", tuple((str(m), int(lay)) for m, lay in self.mods_robust))
        object.__setattr__(self, "modules", tuple(self.modules))
        if self.kind not in KINDS:
            raise ConfigError(f"plan kind={self.kind!r}; choose one of {', '.join(KINDS)}")
        bad = [m for m in self.modules if m not in LAYER_MODULES]
        if bad:
            raise ConfigError(f"plan modules {bad} are not per-layer weights; known: {', '.join(LAYER_MODULES)}")
        for m, lay in self.mods_robust:
            if m not in self.modules or not 0 <= lay < self.num_layers:
                raise ConfigError(f"plan mods_robust entry ({m!r}, {lay}) is outside the analysed modules "
                                  f"{list(self.modules)} × layers 0..{self.num_layers - 1}")
        if not self.gamma >= 0:
            raise ConfigError(f"plan gamma={self.gamma!r} must be >= 0 (the learning-rate factor)")
        if self.kind == "swat" and (self.warmup_steps < 1 or not self.mods_robust):
            raise ConfigError(f"a swat plan needs warmup_steps >= 1 (got {self.warmup_steps}) and a non-empty "
                              "mods_robust (the modules trained alone in the warm-up)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mods_robust"] = [list(x) for x in self.mods_robust]
        d["modules"] = list(self.modules)
        return d


def layer_rules(cells: Sequence[tuple[str, int]], modules: Sequence[str]) -> tuple[str, ...]:
    """Optimizer rules (``attn.q@0,2``) covering exactly ``cells``, one per module type that has any."""
    out = []
    for m in modules:
        layers = sorted({lay for mm, lay in cells if mm == m})
        if layers:
            out.append(f"{m}@{','.join(map(str, layers))}")
    return tuple(out)


def robust_rules(plan: Plan) -> tuple[str, ...]:
    """Mods_Robust as optimizer rules."""
    return layer_rules(plan.mods_robust, plan.modules)


def mllr_multipliers(plan: Plan) -> tuple[tuple[str, float], ...]:
    """ML-LR's ``optim.lr_multipliers``: later rules override earlier ones, so the default of every analysed module
    comes first and Mods_Robust's factor after it."""
    rest, robust = (plan.gamma, 1.0) if not plan.reverse else (1.0, plan.gamma)
    return tuple((f"{m}@*", rest) for m in plan.modules) + tuple((r, robust) for r in robust_rules(plan))


def phases(plan: Plan, base: OptimConfig, total_steps: int) -> list[tuple[int, OptimConfig]]:
    """The plan's ``[(steps, OptimConfig), ...]`` over ``total_steps``, each config built from ``base``."""
    if plan.kind == "uniform":
        return [(total_steps, base)]
    if plan.kind == "mllr":
        return [(total_steps, dataclasses.replace(base, lr_multipliers=base.lr_multipliers
                                                  + mllr_multipliers(plan)))]
    if plan.warmup_steps >= total_steps:
        raise ConfigError(f"swat plan warmup_steps={plan.warmup_steps} must be < the run's {total_steps} steps")
    rest = total_steps - plan.warmup_steps

    def sized(cfg: OptimConfig, steps: int) -> OptimConfig:
        return dataclasses.replace(cfg, total_steps=steps, warmup_steps=min(cfg.warmup_steps, max(steps - 1, 0)))

    warm = dataclasses.replace(base, trainable=robust_rules(plan))  # base.frozen still wins where they overlap
    return [(plan.warmup_steps, sized(warm, plan.warmup_steps)), (rest, sized(base, rest))]


def save_plan(plan: Plan, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
    """Write the plan as JSON (``extra``: provenance such as the robustness settings, stored beside it)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"plan": plan.to_dict(), **({"provenance": extra} if extra else {})}, f, indent=1)
    os.replace(tmp, path)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan written by :func:`save_plan` (validated)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)["plan"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"plan file {path}: cannot read a plan ({e}); write it with train.plans.save_plan") from None
    fields = {f.name for f in dataclasses.fields(Plan)}
    if unknown := sorted(set(data) - fields):
        raise ConfigError(f"plan file {path}: unknown key(s) {unknown}; known: {sorted(fields)}")
    return Plan(**data)
