"""Study 3 configuration (synthetic world): frozen dataclasses read from YAML with ``key=value`` overrides.

``load_config("demo", ["exposure.counts=[0, 40]"])`` reads ``demo.yaml`` next to this file (or a path). The world,
the model, pretraining and the safety fine-tuning runs are study 1's (its config ``study1`` + ``study1_overrides``),
so both studies share those stages in one output folder. Every field is validated before anything compiles; an error
names the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from experiments.study1_mechanics import config as study1_config
from safety_jax.analysis.residual import SHIFTS
from safety_jax.configs import build
from safety_jax.configs import check_positive as _positive
from safety_jax.configs import check_whole as _whole
from safety_jax.configs import invalid as _fail
from safety_jax.data.synthetic_sets import SAFETY_KINDS

HERE = os.path.dirname(os.path.abspath(__file__))
JAILBREAKS = tuple(k for k in SAFETY_KINDS if k.startswith("jb_"))
ATTACKS = (*JAILBREAKS, "trigger_removal", "gcg")
STARTS = ("pretrained", "aligned")
INTERVENTION_MODES = ("add", "project")


@dataclasses.dataclass(frozen=True)
class ShiftSpec:
    """Shifts between study 1 models: each pair ``[before, after]`` ("pretrained" or a study 1 run such as
    "ssft@eta_M"); ``variant`` identity (ΔH = Y − X) or matrix (least-squares map); ``top`` components tried for the
    best-of-N refusal prediction (the reference: 100); ``n_random`` random directions for its chance baseline."""

    pairs: list[list[str]] = dataclasses.field(
        default_factory=lambda: [["pretrained", "ssft@eta_M"], ["pretrained", "dpo@eta_M"]])
    variant: str = "identity"
    top: int = 100
    n_random: int = 100
    thresholds: list[float] = dataclasses.field(default_factory=lambda: [0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """The logistic probe baseline (``analysis.probes``), fitted on half the analysis set, scored on the rest."""

    l2: float = 1e-3
    steps: int = 300
    lr: float = 0.05


@dataclasses.dataclass(frozen=True)
class AttributionSpec:
    """Token relevance (integrated gradients, ``ig_steps``) on ``n`` unsafe inputs, and the promote / suppress
    heat map of the first ``components`` components of every earlier layer on the last layer's dominant one."""

    n: int = 32
    ig_steps: int = 32
    components: int = 5


@dataclasses.dataclass(frozen=True)
class InterventionSpec:
    """``mode`` "add": subtract α · σ₀ · v₀ (v₀ each layer's dominant component of the first pair, σ₀ the RMS of the
    shift along it) from the last-token state after every block during generation, for every α of ``alphas``;
    "project": subtract only the state's projection on v₀ (directional ablation at those states; α > 0 switches it
    on, its size is not used). ``n`` inputs per set."""

    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0])
    mode: str = "add"
    n: int = 64


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """Crafted attacks on the first pair's tuned model: trigger removal (``trigger_rounds`` operator rewrites that
    keep the input unsafe) and GCG suffixes (``gcg_*``: slots before ``>``, steps, top-k, candidates)."""

    trigger_rounds: int = 2
    gcg_suffix: int = 4
    gcg_steps: int = 10
    gcg_top_k: int = 16
    gcg_candidates: int = 32


@dataclasses.dataclass(frozen=True)
class ExposureSpec:
    """The exposure study: SSFT (study 1's settings) with ``counts`` training examples of each attack family
    (``families``, refusal targets) mixed in, ``rows_per_batch`` extra rows a batch, ``steps`` steps at study 1's
    eta_M, from ``start`` (study 1's pretrained model, or its first-pair tuned model, then tuned further)."""

    counts: list[int] = dataclasses.field(default_factory=lambda: [0, 10, 40, 160])
    families: list[str] = dataclasses.field(default_factory=lambda: list(ATTACKS))
    rows_per_batch: int = 4
    steps: int = 200
    start: str = "aligned"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """``n_per_set`` analysis inputs of every safety set, ``n_test`` test inputs per attack family."""

    n_per_set: int = 64
    n_test: int = 64
    batch_size: int = 256
    min_n: int = 30  # claims on fewer examples than this are not decided


@dataclasses.dataclass(frozen=True)
class Study3Config:
    """One run of study 3 on the synthetic world."""

    name: str = "demo"
    seed: int = 0
    notes: str = ""
    study1: str = "demo"
    study1_overrides: list[str] = dataclasses.field(default_factory=list)
    shift: ShiftSpec = dataclasses.field(default_factory=ShiftSpec)
    probe: ProbeSpec = dataclasses.field(default_factory=ProbeSpec)
    attribution: AttributionSpec = dataclasses.field(default_factory=AttributionSpec)
    intervention: InterventionSpec = dataclasses.field(default_factory=InterventionSpec)
    attack: AttackSpec = dataclasses.field(default_factory=AttackSpec)
    exposure: ExposureSpec = dataclasses.field(default_factory=ExposureSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def study1_config(self) -> study1_config.StudyConfig:
        return study1_config.load_config(self.study1, self.study1_overrides)

    def study1_runs(self) -> list[str]:
        """The study 1 runs the pairs name (everything but "pretrained"), in order."""
        return list(dict.fromkeys(m for pair in self.shift.pairs for m in pair if m != "pretrained"))


def validate(cfg: Study3Config) -> None:
    """Every field's type and range (study 1's run names are checked against its config when the study starts)."""
    s = cfg.shift
    if not isinstance(s.pairs, list) or not s.pairs:
        _fail("shift.pairs", s.pairs, "a non-empty list of [before, after] model names")
    for pair in s.pairs:
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(m, str) for m in pair) \
                or pair[0] == pair[1] or pair[1] == "pretrained":
            _fail("shift.pairs", s.pairs, "each pair [before, after]: two different names, 'pretrained' or a "
                  "study 1 run 'method@lr_name' (e.g. ['pretrained', 'ssft@eta_M']); the after model is a run")
        for m in pair:
            method, sep, _ = m.partition("@")
            if m != "pretrained" and (not sep or method not in study1_config.METHODS):
                _fail("shift.pairs", s.pairs, f"{m!r} is neither 'pretrained' nor 'method@lr_name' with a study 1 "
                      f"method ({', '.join(study1_config.METHODS)})")
    if s.variant not in SHIFTS:
        _fail("shift.variant", s.variant, f"choose from {', '.join(SHIFTS)}")
    _whole("shift.top", s.top)
    _whole("shift.n_random", s.n_random)
    if not s.thresholds or any(isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 1
                               for t in s.thresholds):
        _fail("shift.thresholds", s.thresholds, "a non-empty list of shares in (0, 1]")
    if isinstance(cfg.probe.l2, bool) or not isinstance(cfg.probe.l2, int | float) or cfg.probe.l2 < 0:
        _fail("probe.l2", cfg.probe.l2, "a number ≥ 0")
    _whole("probe.steps", cfg.probe.steps)
    _positive("probe.lr", cfg.probe.lr)
    a = cfg.attribution
    for name in ("n", "ig_steps", "components"):
        _whole(f"attribution.{name}", getattr(a, name))
    iv = cfg.intervention
    if not iv.alphas or any(isinstance(x, bool) or not isinstance(x, int | float) or x < 0 for x in iv.alphas):
        _fail("intervention.alphas", iv.alphas, "a non-empty list of numbers ≥ 0 (0 = no intervention)")
    _whole("intervention.n", iv.n)
    if iv.mode not in INTERVENTION_MODES:
        _fail("intervention.mode", iv.mode, f"choose from {', '.join(INTERVENTION_MODES)}")
    at = cfg.attack
    _whole("attack.trigger_rounds", at.trigger_rounds)
    for name in ("gcg_suffix", "gcg_steps", "gcg_top_k", "gcg_candidates"):
        _whole(f"attack.{name}", getattr(at, name))
    ex = cfg.exposure
    if not ex.counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in ex.counts) \
            or len(set(ex.counts)) != len(ex.counts):
        _fail("exposure.counts", ex.counts, "a non-empty list of distinct whole numbers ≥ 0 (0 = no exposure)")
    if not ex.families or any(f not in ATTACKS for f in ex.families):
        _fail("exposure.families", ex.families, f"a non-empty list from {', '.join(ATTACKS)}")
    _whole("exposure.rows_per_batch", ex.rows_per_batch)
    _whole("exposure.steps", ex.steps)
    if ex.start not in STARTS:
        _fail("exposure.start", ex.start, f"choose from {', '.join(STARTS)}")
    e = cfg.eval
    for name in ("n_per_set", "n_test", "batch_size", "min_n"):
        _whole(f"eval.{name}", getattr(e, name))
    if not isinstance(cfg.study1_overrides, list):
        _fail("study1_overrides", cfg.study1_overrides, "a list of 'section.key=value' strings")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Study3Config:
    """Read a YAML config (a shipped name or a path) and apply ``key.sub=value`` overrides."""
    return build(Study3Config, study1_config.read_config(name_or_path, overrides, HERE), name_or_path)
