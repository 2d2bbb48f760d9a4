"""Study 1 configuration: typed, frozen dataclasses read from YAML with dotted ``key=value`` overrides.

``load_config("demo", ["pretrain.steps=300", "finetune.lrs={eta_M: 3e-4}"])`` reads ``demo.yaml`` next to this file
(or any YAML path), applies the overrides (values parsed as YAML) and validates every key: an unknown key is an error
that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from safety_jax.configs import apply_overrides, build, read_yaml
from safety_jax.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))


METHODS = ("ssft", "dpo", "dpo_standard", "unlearning")
# The finetune fields only one method reads (every other field is shared by all methods).
METHOD_FIELDS = {"ssft": (), "dpo": ("beta_chosen", "beta_rejected", "pair_targets"),
                 "dpo_standard": ("beta_standard", "rpo_alpha", "pair_targets"),
                 "unlearning": ("rejected_weight", "pair_targets")}
BATCH_MIXES = ("per_batch", "per_example")  # fine-tuning batches: all-safe / all-unsafe, or mixed rows
PAIR_TARGETS = ("decision", "output")  # DPO / unlearning scored on the deciding segment and *^, or every output token
# The finetune fields that hold every run's list or rates, which a method cannot override.
NOT_OVERRIDABLE = frozenset({"methods", "lrs", "lr_scale", "method_overrides", "method_lrs", "lr_steps"})


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """The synthetic world: a preset of ``data.synthetic`` plus field overrides, and the test-set size."""

    preset: str = "demo"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    n_test: int = 256          # examples per test set
    grammars: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A ``model.config`` preset plus field overrides (vocab_size stays the preset's 64 >= the world's 59 ids)."""

    preset: str = "synthetic"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """Pretraining (reference: AdamW (0.9, 0.95), wd 1e-4, lr 1e-3, warmup + cosine, clip 1, batch 512, 100k steps)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    save_every: int = 0        # orbax checkpoints every N steps, to resume an interrupted stage (0: none)


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    """Safety fine-tuning: each method at each learning rate. ``batch_mix="per_batch"`` (the study's): each batch is
    all-unsafe w.p. ``unsafe_frac``, else all-safe; ``"per_example"``: every batch holds ``unsafe_frac`` unsafe rows.
    ``lr_scale`` multiplies every named learning rate of one method (default 1: the study uses one η for all methods);
    ``method_overrides`` gives one method its own value of any other field, e.g. ``{dpo: {steps: 2000, unsafe_frac:
    0.5625}}`` (:meth:`for_method` resolves them). DPO: the study's asymmetric variant (β_w, β_l, length-normalised by
    T−1) and standard sigmoid DPO (β, summed log-probs); unlearning ℓ(chosen) − ``rejected_weight``·ℓ(rejected). SSFT
    trains a refusal on its null segment and ``*^`` and a safe answer on its whole output; DPO and unlearning score both
    completions on the segment that decides (the refusal's) and ``*^`` only (``pair_targets="decision"``, the reference,
    which sets the other segment to PAD) or on all their output tokens (``"output"``); ``pad_targets`` trains on every
    position of the output region instead. ``second_segment_refusal``: the share of unsafe training rows whose first
    half of operators is ``(`` and whose refusal lies in the second segment (the reference's 0.2). ``method_lrs``
    restricts a method to some of the named learning rates (e.g. a contrast run at η_M only); ``lr_steps`` gives the
    runs at one named learning rate their own number of steps (e.g. shorter η_S runs), in place of ``steps`` and its
    overrides. ``start_from`` (usually set per method): ``"pretrained"``, or the method whose fine-tuned model (at the
    same named learning rate) this method starts from and, for DPO, takes as its frozen reference — the DPO paper's
    recipe when the preferred completions are not the model's own: first fit them by maximum likelihood (here SSFT,
    whose targets are exactly DPO's chosen completions), then run DPO from there."""

    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    lrs: dict[str, float] = dataclasses.field(default_factory=lambda: {"eta_M": 1e-4, "eta_S": 1e-5})
    lr_scale: dict[str, float] = dataclasses.field(default_factory=dict)  # method -> factor on every named lr
    steps: int = 200
    method_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # method -> {field: value}
    batch_size: int = 32
    unsafe_frac: float = 0.2
    batch_mix: str = "per_batch"   # or "per_example"
    schedule: str = "cosine"   # warmup then cosine decay to 1 % (the reference); or "constant"
    warmup_steps: int = 0
    decay_steps: int = 0       # the cosine reaches its floor at this step, then stays (0: at the last step)
    min_lr: float | None = None  # the floor (null: 1 % of the peak); the reference decays to 1e-6 by step 8000
    weight_decay: float = 1e-4
    beta_chosen: float = 0.1
    beta_rejected: float = 0.01
    beta_standard: float = 0.1
    rpo_alpha: float = 0.0      # standard DPO only: + α·NLL(chosen) (TRL's rpo_alpha); 0 = plain DPO
    rejected_weight: float = 0.1
    pad_targets: bool = False   # also train on PAD targets (the study's cross-entropy ignores them)
    pair_targets: str = "decision"  # DPO / unlearning: "decision" (the reference) or "output"
    second_segment_refusal: float = 0.2  # unsafe training rows refused in the second segment (the reference's)
    method_lrs: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # method -> lr names it runs at
    lr_steps: dict[str, int] = dataclasses.field(default_factory=dict)  # lr name -> steps of its runs (default steps)
    start_from: str = "pretrained"  # or a method: start from its model (at the same named lr); DPO's reference too

    def for_method(self, method: str) -> FinetuneSpec:
        """This spec with ``method``'s overrides applied (and no overrides left)."""
        return dataclasses.replace(self, **self.method_overrides.get(method, {}), method_overrides={})

    def steps_at(self, method: str, lr_name: str) -> int:
        """Steps of ``method``'s run at the named learning rate: ``lr_steps[lr_name]``, else its ``steps``."""
        return self.lr_steps.get(lr_name, self.for_method(method).steps)

    def key_for(self, method: str) -> dict[str, Any]:
        """The fields one method's fine-tuning depends on (its stage's cache key): the shared ones and its own
        (``METHOD_FIELDS``), after its overrides; not the run lists, learning rates or other methods' settings."""
        others = {f for m, fields in METHOD_FIELDS.items() if m != method for f in fields} - set(METHOD_FIELDS[method])
        skip = others | NOT_OVERRIDABLE
        return {k: v for k, v in dataclasses.asdict(self.for_method(method)).items() if k not in skip}

    def validate(self, where: str = "finetune") -> None:
        """Errors naming the field for values no run can use (``where`` prefixes the field names)."""
        if self.batch_mix not in BATCH_MIXES:
            raise ValueError(f"{where}.batch_mix={self.batch_mix!r}; choose one of {BATCH_MIXES}")
        if not 0.0 <= self.unsafe_frac <= 1.0:
            raise ValueError(f"{where}.unsafe_frac={self.unsafe_frac} must be in [0, 1]")
        if not 0.0 <= self.second_segment_refusal <= 1.0:
            raise ValueError(f"{where}.second_segment_refusal={self.second_segment_refusal} must be in [0, 1]")
        if self.pair_targets not in PAIR_TARGETS:
            raise ValueError(f"{where}.pair_targets={self.pair_targets!r}; choose one of {PAIR_TARGETS}")
        if not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            raise ValueError(f"{where}.decay_steps={self.decay_steps!r} must be a whole number ≥ 0 (0: the last step)")
        if self.min_lr is not None and not float(self.min_lr) >= 0:
            raise ValueError(f"{where}.min_lr={self.min_lr!r} must be ≥ 0 (or null: 1 % of the peak)")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}.{name}={value!r} must be a whole number ≥ 1")
        if self.schedule != "constant" and (self.decay_steps or self.steps) <= self.warmup_steps:
            raise ValueError(f"{where}.warmup_steps={self.warmup_steps} must be below decay_steps (or steps when "
                             f"decay_steps is 0), got {self.decay_steps or self.steps}")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Evaluation batch size (one compile per kernel; the last batch is padded)."""

    batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class AnalysisSpec:
    """Analyses of Jain et al. 2024: τ window, ΔW spectra, α-interpolation, Lipschitzness, soft-token attacks."""

    tau_width: int = 10
    top_k: int = 10
    energy: float = 0.9
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    n_examples: int = 128      # examples per set for Lipschitzness and α-interpolation
    attack_n: int = 64         # unsafe examples attacked
    attack_num_soft: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    attack_rounds: int = 3
    attack_steps_per_round: int = 20
    attack_lr: float = 0.1
    lipschitz_include_gt: bool = True  # the norm includes ">"'s own embedding (false: the reference's, without it)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One run of study 1. ``notes`` says what a small config shrank (printed in the report)."""

    name: str = "demo"
    seed: int = 0
    notes: str = ""
    world: WorldSpec = dataclasses.field(default_factory=WorldSpec)
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    pretrain: PretrainSpec = dataclasses.field(default_factory=PretrainSpec)
    finetune: FinetuneSpec = dataclasses.field(default_factory=FinetuneSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    analysis: AnalysisSpec = dataclasses.field(default_factory=AnalysisSpec)

    def __post_init__(self) -> None:
        unknown = [m for m in self.finetune.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"finetune.methods: unknown {unknown}; known: {', '.join(METHODS)}")
        bad = {m: v for m, v in self.finetune.lr_scale.items() if m not in METHODS or not float(v) > 0}
        if bad:
            raise ValueError(f"finetune.lr_scale: {bad} — keys must be methods ({', '.join(METHODS)}), values > 0")
        f = self.finetune
        f.validate()
        for method, fields in f.method_overrides.items():
            where = f"finetune.method_overrides.{method}"
            if method not in METHODS:
                raise ValueError(f"finetune.method_overrides: unknown method {method!r}; known: {', '.join(METHODS)}")
            if not isinstance(fields, dict):
                raise ValueError(f"{where}: expected a mapping of finetune fields, got {fields!r}")
            known = {fd.name for fd in dataclasses.fields(FinetuneSpec)} - NOT_OVERRIDABLE
            bad = sorted(set(fields) - known)
            if bad:
                raise ValueError(f"{where}: cannot override {bad}; overridable: {sorted(known)}")
            f.for_method(method).validate(where)
        for method in f.methods:  # start_from names a method this config runs, without cycles
            seen, m = [method], f.for_method(method).start_from
            while m != "pretrained":
                if m not in f.methods:
                    raise ValueError(f"finetune: {seen[-1]} starts from {m!r}, which is not one of finetune.methods "
                                     f"({', '.join(f.methods)}); use 'pretrained' or one of those")
                if m in seen:
                    raise ValueError(f"finetune.start_from: cycle {' -> '.join([*seen, m])}")
                seen.append(m)
                m = f.for_method(m).start_from
        if not self.finetune.lrs:
            raise ValueError("finetune.lrs is empty: give at least one {name: learning rate}")
        bad = {k: v for k, v in f.lr_steps.items() if k not in f.lrs or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"finetune.lr_steps: {bad} — keys must be names in finetune.lrs ({', '.join(f.lrs)}), "
                             "values whole numbers ≥ 1")
        for method, names in f.method_lrs.items():
            if method not in METHODS or not isinstance(names, list) or not set(names) <= set(f.lrs) or not names:
                raise ValueError(f"finetune.method_lrs.{method}={names!r}: keys must be methods "
                                 f"({', '.join(METHODS)}), values non-empty lists of names in finetune.lrs "
                                 f"({', '.join(f.lrs)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_path(name_or_path: str, folder: str = HERE) -> str:
    """A shipped config name (``demo`` / ``quick`` / …: the YAML of that name in ``folder``, by default this study's)
    or a path."""
    if os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(folder, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
        raise ConfigError(f"no config {name_or_path!r}: not a file, and not one of {known}")
    return path


def read_config(name_or_path: str, overrides: Sequence[str] = (), folder: str = HERE) -> dict[str, Any]:
    """A YAML config (a shipped name in ``folder`` or a path) as a mapping that knows its keys' lines
    (:func:`safety_jax.configs.read_yaml`), with ``key.sub=value`` overrides (values parsed as YAML) applied."""
    return apply_overrides(read_yaml(config_path(name_or_path, folder)), overrides)


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a YAML config and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    return build(StudyConfig, read_config(name_or_path, overrides), name_or_path)
