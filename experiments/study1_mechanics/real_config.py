"""Configuration of study 1 on real models (``real.py``): frozen dataclasses read from YAML with ``key=value``
overrides, validated at load time with errors that name the field.

``load_real_config("real_llama3", ["batch_size=8", "chat.system_prompt=null"])`` reads ``real_llama3.yaml`` next to
this file (or any YAML path). Load time checks keys, types and choices (dtype, mesh syntax, strategy, prompt formats,
set and pair names); whether the checkpoints exist and the mesh fits the host's devices is checked at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from experiments.study1_mechanics.config import read_config
from safety_jax.configs import build
from safety_jax.errors import ConfigError
from safety_jax.model.llama import CAPTURE_NAMES, LINEAR_MODULES
from safety_jax.parallel import STRATEGY_RULES, parse_mesh_spec

DTYPES = ("float32", "bfloat16")
PROMPT_FORMATS = ("plain", "chat")  # the raw prompt through a text template, or the tokenizer's chat template
FEATURES = ("last", "generated")  # MLP input at the last prompt token; averaged over the generated tokens


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """One model: a local Hugging Face (or safety-jax orbax) folder and how its prompts are formatted.

    ``hub_id`` names where the folder comes from (``huggingface-cli download <hub_id> --local-dir <path>``); it is
    recorded in the report, never downloaded here. ``prompt_format="plain"`` feeds ``template.format(prompt=...)``
    through the tokenizer (its BOS added); ``"chat"`` feeds the user turn (after ``system_prompt``, when set) through
    ``apply_chat_template(..., add_generation_prompt=True)``, whose BOS is the only one."""

    path: str = ""
    hub_id: str = ""
    tokenizer: str | None = None  # tokenizer folder (default: path)
    prompt_format: str = "plain"
    template: str = "{prompt}"
    system_prompt: str | None = None

    def validate(self, where: str) -> None:
        if not isinstance(self.path, str):
            raise ConfigError(f"{where}.path={self.path!r} must be a folder path (string)")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"{where}.prompt_format={self.prompt_format!r}; choose one of {PROMPT_FORMATS}")
        bad = not isinstance(self.template, str) or "{prompt}" not in self.template
        if not bad:
            try:
                self.template.format(prompt="")
            except (KeyError, IndexError, ValueError):
                bad = True
        if bad:
            raise ConfigError(f"{where}.template={self.template!r} must be text holding '{{prompt}}' and no other "
                              "{field} (write literal braces as {{ }})")


@dataclasses.dataclass(frozen=True)
class PromptSetSpec:
    """A prompt set for ``safety_jax.data.benchmarks.load_benchmark``: a spec (``"verb_object:unsafe"``,
    ``"advbench"``, ``"alpaca:train[:520]"``), optional local files in the set's published format, and a cap."""

    spec: str = ""
    data_files: str | list[str] | None = None
    limit: int | None = None

    def validate(self, where: str) -> None:
        if not isinstance(self.spec, str) or not self.spec:
            raise ConfigError(f"{where}.spec must name a benchmark, e.g. 'verb_object:unsafe' or 'advbench'")
        if self.limit is not None and (not isinstance(self.limit, int) or isinstance(self.limit, bool)
                                       or self.limit < 1):
            raise ConfigError(f"{where}.limit={self.limit!r} must be a whole number >= 1 (or null: every example)")


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """Two sets whose class means define τ (``safe``, ``unsafe``), the ``jailbreaks`` located against them (each
    decided on: does it sit closer to the safe cluster than ``unsafe``?) and ``controls`` located but not decided
    on (e.g. the base64 encoding of the safe prompts)."""

    safe: str = ""
    unsafe: str = ""
    jailbreaks: list[str] = dataclasses.field(default_factory=list)
    controls: list[str] = dataclasses.field(default_factory=list)

    def sets(self) -> list[str]:
        return list(dict.fromkeys([self.safe, self.unsafe, *self.jailbreaks, *self.controls]))


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """Sampling for the generated-token features (the authors': temperature 0.6, top-p 0.9)."""

    max_new_tokens: int = 64
    temperature: float = 0.6
    top_p: float = 0.9


def _default_sets() -> dict[str, PromptSetSpec]:
    return {"safe": PromptSetSpec("verb_object:safe"), "unsafe": PromptSetSpec("verb_object:unsafe"),
            "unsafe_base64": PromptSetSpec("verb_object:unsafe_base64"),
            "safe_base64": PromptSetSpec("verb_object:safe_base64"),
            "advbench": PromptSetSpec("advbench"), "alpaca": PromptSetSpec("alpaca:train[:520]")}


def _default_pairs() -> dict[str, PairSpec]:
    return {"verb_object": PairSpec("safe", "unsafe", ["unsafe_base64"], ["safe_base64"]),
            "advbench_alpaca": PairSpec("alpaca", "advbench")}


@dataclasses.dataclass(frozen=True)
class RealStudyConfig:
    """Study 1 on a base model and its chat model (Jain et al. 2024, §6): τ per layer on each pair of prompt sets,
    for both models and both feature kinds, and ΔW = W_chat − W_base of the MLP matrices.

    ``mesh``: a ``parallel.make_mesh`` spec (``"fsdp=-1"``: every device), or null for the default device;
    ``strategy``: its sharding rules. ``batch_size``: prompts per forward / generation batch. ``capture``: the
    per-layer activation taken as the feature (``mlp_in``: the RMS-normalised MLP input). ``top_k``, ``energy``,
    ``layer_batch``: ΔW's top directions, the pretrained energy cut, and layers SVD-ed at a time (bounds memory)."""

    name: str = "real"
    seed: int = 0
    notes: str = ""
    base: CheckpointSpec = dataclasses.field(default_factory=CheckpointSpec)
    chat: CheckpointSpec = dataclasses.field(default_factory=lambda: CheckpointSpec(prompt_format="chat"))
    dtype: str = "bfloat16"
    mesh: str | None = "fsdp=-1"
    strategy: str = "auto"
    batch_size: int = 32
    capture: str = "mlp_in"
    sets: dict[str, PromptSetSpec] = dataclasses.field(default_factory=_default_sets)
    pairs: dict[str, PairSpec] = dataclasses.field(default_factory=_default_pairs)
    generation: GenerationSpec = dataclasses.field(default_factory=GenerationSpec)
    modules: list[str] = dataclasses.field(default_factory=lambda: ["mlp.gate", "mlp.up", "mlp.down"])
    top_k: int = 10
    energy: float = 0.9
    layer_batch: int | None = 4

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r} must be an integer")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; choose one of {DTYPES}")
        if self.mesh is not None:
            check_mesh_spec(self.mesh, "mesh")
        if self.strategy not in STRATEGY_RULES:
            raise ConfigError(f"strategy={self.strategy!r}; choose one of {sorted(STRATEGY_RULES)}")
        if self.capture not in CAPTURE_NAMES or self.capture in ("attn_hidden",):
            raise ConfigError(f"capture={self.capture!r}; choose a [L, B, T, width] activation of "
                              f"{[c for c in CAPTURE_NAMES if c != 'attn_hidden']}")
        for name in ("batch_size", "top_k"):
            _positive_int(getattr(self, name), name)
        if self.layer_batch is not None:
            _positive_int(self.layer_batch, "layer_batch")
        if not 0.0 < float(self.energy) <= 1.0:
            raise ConfigError(f"energy={self.energy!r} must lie in (0, 1]")
        bad = [m for m in self.modules if m not in LINEAR_MODULES]
        if bad or not self.modules:
            raise ConfigError(f"modules={self.modules!r}: give linear modules among {LINEAR_MODULES}")
        self.base.validate("base")
        self.chat.validate("chat")
        for name, s in self.sets.items():
            s.validate(f"sets.{name}")
        g = self.generation
        _positive_int(g.max_new_tokens, "generation.max_new_tokens")
        if not float(g.temperature) >= 0:
            raise ConfigError(f"generation.temperature={g.temperature!r} must be >= 0 (0: greedy)")
        if not 0 < float(g.top_p) <= 1:
            raise ConfigError(f"generation.top_p={g.top_p!r} must lie in (0, 1]")
        if not self.pairs:
            raise ConfigError("pairs is empty: give at least one {name: {safe: <set>, unsafe: <set>}}")
        for name, p in self.pairs.items():
            unknown = [s for s in p.sets() if s not in self.sets]
            if unknown or not p.safe or not p.unsafe:
                raise ConfigError(f"pairs.{name}: names sets {unknown or [p.safe, p.unsafe]} that are not in sets "
                                  f"({', '.join(self.sets)}); safe and unsafe are required")
            if p.safe == p.unsafe:
                raise ConfigError(f"pairs.{name}: safe and unsafe are both {p.safe!r}")

    def used_sets(self) -> list[str]:
        """The sets some pair reads, in the order of ``sets``."""
        used = {s for p in self.pairs.values() for s in p.sets()}
        return [s for s in self.sets if s in used]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a whole number >= 1")


def check_mesh_spec(spec: Any, where: str = "mesh") -> None:
    """Syntax of a mesh spec (axes, sizes, one -1 at most), independent of this host's device count."""
    if not isinstance(spec, str):
        raise ConfigError(f"{where}={spec!r} must be a spec like 'fsdp=-1' or 'data=2,fsdp=4' (or null)")
    sizes = [p.partition("=")[2].strip() for p in spec.split(",") if p.strip()]
    fixed = math.prod(int(s) for s in sizes if s.isdigit() and int(s) > 0)
    try:  # with the fixed sizes' product as the device count, only a malformed spec can fail
        parse_mesh_spec(spec, fixed)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_real_config(name_or_path: str, overrides: Sequence[str] = ()) -> RealStudyConfig:
    """Read a YAML config (``real_llama2`` / ``real_llama3`` or a path) and apply ``key.sub=value`` overrides."""
    return build(RealStudyConfig, read_config(name_or_path, overrides), name_or_path)


__all__ = ["FEATURES", "CheckpointSpec", "GenerationSpec", "PairSpec", "PromptSetSpec", "RealStudyConfig",
           "check_mesh_spec", "load_real_config"]
