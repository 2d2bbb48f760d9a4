"""Llama configuration: a frozen, hashable dataclass (usable as a static jit argument) and named presets.

Reads Hugging Face ``config.json`` files in both layouts: the older one with ``rope_theta`` / ``rope_scaling`` at the
top level (as published Llama-2/3 checkpoints have it) and the newer ``rope_parameters`` block that current
``transformers`` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from safety_jax.errors import ConfigError
from safety_jax.model.attention import ATTENTION_IMPLS

LAYER_LOOPS = ("auto", "scan", "unrolled")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-2 / Llama-3 decoder plus the dtypes it runs in.

    ``param_dtype`` is the storage dtype of the weights; ``compute_dtype`` is the dtype matmuls run in. Norms,
    softmax and log-softmax always run in float32.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention_impl: str = "xla"  # safety_jax.model.attention.ATTENTION_IMPLS; a runtime choice, not saved to HF
    # How the decoder layers run (runtime choices, not saved to HF; identical numbers): "scan" = one ``lax.scan``
    # over the stacked layer axis (compile time independent of depth; ``scan_unroll`` layers per iteration),
    # "unrolled" = a Python loop over static layer slices (one program per layer: longer compiles, but XLA:CPU
    # compiles the backward of a flat program well — see scripts/bench/README.md), "auto" = "unrolled" on CPU,
    # "scan" elsewhere.
    layer_loop: str = "scan"
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field when the configuration is inconsistent."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"LlamaConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("LlamaConfig.rms_norm_eps and rope_theta must be positive")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"LlamaConfig.{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"LlamaConfig.attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if self.layer_loop not in LAYER_LOOPS:
            raise ConfigError(f"LlamaConfig.layer_loop={self.layer_loop!r}; choose one of {LAYER_LOOPS}")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ConfigError(f"LlamaConfig.scan_unroll={self.scan_unroll!r} must be a positive integer")

    # ------------------------------------------------------------------ derived
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def dtype(self) -> Any:
        """The compute dtype as a jnp dtype."""
        return DTYPES[self.compute_dtype]

    @property
    def weight_dtype(self) -> Any:
        """The parameter storage dtype as a jnp dtype."""
        return DTYPES[self.param_dtype]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def num_params(self) -> int:
        """Number of parameters (embeddings and head included)."""
        d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.head_dim)
        per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * per_layer + d + head

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Build from the dict of a Hugging Face ``config.json`` (Llama-2 or Llama-3 family)."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in (None, "llama") or (archs and not any(a.startswith("Llama") for a in archs)):
            raise ConfigError(
                f"config.json: model_type={model_type!r}, architectures={archs!r}; safety-jax loads Llama models "
                "only (model_type 'llama', architectures ['LlamaForCausalLM'])")
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads"):
            if required not in d:
                raise ConfigError(f"config.json: missing field '{required}'")
        rope_params = dict(d.get("rope_parameters") or {})
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("config.json: attention_bias/mlp_bias=true is not supported (Llama has no biases)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act={d['hidden_act']!r}; only 'silu' is supported")
        kwargs = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling_from_dict(scaling) if scaling else None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, **overrides: Any) -> LlamaConfig:
        """Read a ``config.json`` file, or the one inside a checkpoint folder."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"no config.json at {path}: point to a Hugging Face Llama checkpoint folder")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of a Hugging Face ``LlamaConfig`` (older top-level rope layout, read by every version)."""
        d: dict[str, Any] = dict(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id, hidden_act="silu", attention_bias=False, mlp_bias=False,
            torch_dtype=self.param_dtype,
        )
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return d


def _rope_scaling_from_dict(d: dict[str, Any]) -> RopeScaling:
    rope_type = d.get("rope_type", d.get("type"))
    if rope_type != "llama3":
        raise ConfigError(f"config.json: rope_scaling type {rope_type!r} is not supported; only 'llama3' is")
    try:
        return RopeScaling(
            factor=float(d["factor"]), low_freq_factor=float(d["low_freq_factor"]),
            high_freq_factor=float(d["high_freq_factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"config.json: rope_scaling is missing field {e.args[0]!r}") from None


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # ~ the reference minGPT of the synthetic study (6 layers, 6 heads, width 192, MLP 768).
    "synthetic": LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                             num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                             rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "llama3_8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                             rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(),
                             bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
    # ~100M and ~1B configurations for benchmarks (Llama-3 shaped).
    "bench_100m": LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                              num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096),
    "bench_1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
}


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """A named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
