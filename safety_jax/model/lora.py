"""LoRA adapters (Hu et al. 2021) as a second pytree beside the frozen base params.

A linear module ``y = x W`` gains ``scale · (x A) B`` inside the same matmul (``llama._linear``), with
``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` for rsLoRA). Adapters mirror the stacked base layout, one
``{"a", "b"}`` pair per target module at ``lora["layers"][group][name]``; the weight's input axes go to ``a`` and its
output axes to ``b``::

    attn.q  W [L, D, N, H]   a [L, D, r]     b [L, r, N, H]
    attn.o  W [L, N, H, D]   a [L, N, H, r]  b [L, r, D]
    mlp.up  W [L, D, F]      a [L, D, r]     b [L, r, F]
    mlp.down W [L, F, D]     a [L, F, r]     b [L, r, D]

Initialisation follows PEFT: ``A ~ U(±1/sqrt(fan_in))`` (``kaiming_uniform_(a=sqrt(5))``) or ``N(0, 1/r)``
("gaussian"); ``B = 0``, so a fresh adapter leaves the model unchanged.

During training the adapters ride in the trainable pytree under the key :data:`LORA_KEY` (``{**params, "lora":
adapters}``; see :func:`combine` / :func:`split`); the losses pass them to ``forward(..., lora=..., lora_scale=...)``
and the optimizer puts them in their own group.

Dropout: ``LoraConfig.dropout`` is recorded (and saved) but ``llama.forward`` has no rng argument for the LoRA path
yet, so a non-zero value is rejected by the losses rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import LINEAR_MODULES, Params, layer_weight_shapes

LORA_KEY = "lora"
WEIGHTS_FILE = "lora.safetensors"
CONFIG_FILE = "lora_config.json"
INITS = ("kaiming_uniform", "gaussian")
# Number of leading (input) axes of each module's per-layer weight; the rest are output axes.
_IN_AXES = {m: 2 if m == "attn.o" else 1 for m in LINEAR_MODULES}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters, named and defaulted as PEFT's ``LoraConfig`` (r=8, lora_alpha=8, q/v projections)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.q", "attn.v")
    init: str = "kaiming_uniform"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str | list):
            object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str)
                               else tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init={self.init!r}; choose one of {INITS}")
        unknown = [t for t in self.targets if t not in LINEAR_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"LoraConfig.targets {list(self.targets)} names unknown modules {unknown}; "
                             f"known: {', '.join(LINEAR_MODULES)}")

    @property
    def scale(self) -> float:
        """``alpha / rank`` (PEFT), or ``alpha / sqrt(rank)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def adapter_shapes(config: LlamaConfig, lora_cfg: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{module: (a_shape, b_shape)}`` with the leading layers axis, for every target module."""
    shapes = layer_weight_shapes(config)
    n_layers, r = config.num_hidden_layers, lora_cfg.rank
    out = {}
    for m in lora_cfg.targets:
        k = _IN_AXES[m]
        out[m] = ((n_layers, *shapes[m][:k], r), (n_layers, r, *shapes[m][k:]))
    return out


def init_lora(config: LlamaConfig, lora_cfg: LoraConfig, key: jax.Array, *, dtype: Any = jnp.float32) -> Params:
    """Fresh adapters: ``a`` random (PEFT init), ``b`` zeros, so ``merge_lora`` of them is the identity."""
    tree: Params = {"layers": {}}
    shapes = adapter_shapes(config, lora_cfg)
    for k, (m, (a_shape, b_shape)) in zip(jax.random.split(key, len(shapes)), shapes.items(), strict=True):
        fan_in = math.prod(a_shape[1:-1])
        if lora_cfg.init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): gain·sqrt(3/fan_in) = 1/sqrt(fan_in)
            a = jax.random.uniform(k, a_shape, jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, a_shape, jnp.float32) / lora_cfg.rank
        group, name = m.split(".")
        tree["layers"].setdefault(group, {})[name] = {"a": a.astype(dtype), "b": jnp.zeros(b_shape, dtype)}
    return tree


def adapter_modules(lora: Params) -> tuple[str, ...]:
    """Module names (``attn.q``, …) that carry adapters in ``lora``."""
    return tuple(f"{g}.{n}" for g, sub in lora.get("layers", {}).items() for n in sub)


def lora_delta(lora: Params, module: str, scale: float) -> jax.Array:
    """``scale · A B`` for one module, shaped like its stacked weight ``[L, ...]`` (computed in float32)."""
    group, name = module.split(".")
    ad = lora["layers"][group][name]
    a, b = ad["a"].astype(jnp.float32), ad["b"].astype(jnp.float32)
    n_layers, r = a.shape[0], a.shape[-1]
    delta = jnp.einsum("lir,lro->lio", a.reshape(n_layers, -1, r), b.reshape(n_layers, r, -1),
                       precision=jax.lax.Precision.HIGHEST)
    return scale * delta.reshape(n_layers, *a.shape[1:-1], *b.shape[2:])


def _apply_delta(params: Params, lora: Params, lora_cfg: LoraConfig, sign: float) -> Params:
    layers = jax.tree.map(lambda x: x, params["layers"])  # copy the dict structure, share the arrays
    for m in adapter_modules(lora):
        group, name = m.split(".")
        w = layers[group][name]
        delta = lora_delta(lora, m, lora_cfg.scale)
        if delta.shape != w.shape:
            raise ValueError(f"LoRA adapter for {m} implies a weight of shape {delta.shape}, params have {w.shape}")
        layers[group][name] = (w.astype(jnp.float32) + sign * delta).astype(w.dtype)
    return {**params, "layers": layers}


def merge_lora(params: Params, lora: Params, lora_cfg: LoraConfig) -> Params:
    """Fold adapters into the base: ``W + scale · A B`` for every adapted module (other weights shared)."""
    return _apply_delta(params, lora, lora_cfg, 1.0)


def unmerge_lora(params: Params, lora: Params, lora_cfg: LoraConfig) -> Params:
    """Inverse of :func:`merge_lora`: ``W − scale · A B`` (exact up to float rounding of the weight dtype)."""
    return _apply_delta(params, lora, lora_cfg, -1.0)


def combine(params: Params, lora: Params) -> Params:
    """The trainable pytree for LoRA training: base params with the adapters under ``"lora"``."""
    return {**params, LORA_KEY: lora}


def split(params: Params) -> tuple[Params, Params | None]:
    """``(base params, adapters or None)`` from a pytree that may carry adapters under ``"lora"``."""
    if LORA_KEY not in params:
        return params, None
    base = {k: v for k, v in params.items() if k != LORA_KEY}
    return base, params[LORA_KEY]


# ---------------------------------------------------------------------------------------------------- files
def _flatten(lora: Params) -> dict[str, np.ndarray]:
    flat = {}
    for m in adapter_modules(lora):
        group, name = m.split(".")
        for ab in ("a", "b"):
            flat[f"layers.{m}.{ab}"] = np.ascontiguousarray(np.asarray(lora["layers"][group][name][ab]))
    return flat


def save_lora(path: str | os.PathLike, lora: Params, lora_cfg: LoraConfig) -> None:
    """Write ``lora.safetensors`` (keys ``layers.attn.q.a``, stacked ``[L, ...]``) and ``lora_config.json``."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(_flatten(lora), os.path.join(path, WEIGHTS_FILE), metadata={"format": "safety-jax-lora-v1"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({**dataclasses.asdict(lora_cfg), "targets": list(lora_cfg.targets)}, f, indent=2)


def load_lora(path: str | os.PathLike) -> tuple[Params, LoraConfig]:
    """Read what :func:`save_lora` wrote: ``(adapters as jax arrays, LoraConfig)``."""
    path = os.fspath(path)
    files = [os.path.join(path, f) for f in (WEIGHTS_FILE, CONFIG_FILE)]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"LoRA folder {path} lacks {missing}; write it with save_lora")
    with open(files[1]) as f:
        lora_cfg = LoraConfig(**json.load(f))
    tree: Params = {"layers": {}}
    for key, value in load_file(files[0]).items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or f"{parts[1]}.{parts[2]}" not in LINEAR_MODULES \
                or parts[3] not in ("a", "b"):
            raise ValueError(f"{files[0]}: unexpected tensor {key!r}; expected names like 'layers.attn.q.a'")
        tree["layers"].setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3]] = jnp.asarray(value)
    if sorted(adapter_modules(tree)) != sorted(lora_cfg.targets):
        raise ValueError(f"{path}: adapters for {adapter_modules(tree)} but config targets {lora_cfg.targets}")
    return tree, lora_cfg
