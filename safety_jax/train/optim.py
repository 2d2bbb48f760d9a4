"""The optimizer from a config: parameter groups, freezing and per-(module, layer) learning-rate multipliers.

Module rules read ``MODULE@LAYERS``: MODULE is a per-layer weight (``attn.q``, …, ``mlp.down``, ``attn_norm``,
``mlp_norm``) or a top-level one (``embed``, ``final_norm``, ``lm_head``); LAYERS is ``*``, ``3``, ``0-7`` or
``1,3,5-6`` (``MODULE`` alone = every layer). Rules are validated against the params: an unknown module, a weight the
params lack (``lm_head`` with tied embeddings) or an out-of-range layer is a ``ValueError``, never a silent no-op. A
rule on a module also covers its LoRA adapters.

The transformation, for ``params`` that may carry LoRA adapters under ``"lora"``::

    zero the grads of frozen weights / layer slices   (so they do not count in the clipping norm)
    clip_by_global_norm(clip_norm)                    (the norm is kept in the state: ``last_grad_norm``)
    optax.partition({"trainable": opt, "lora": opt, "frozen": set_to_zero()})   (frozen: no update, no decay)
    multiply each update by its (module, layer) multiplier   ([L] vector on the stacked layers axis)

The multiplier scales the whole update, weight decay included, so it is a true learning-rate multiplier
(ML-LR, shared/methods/02). Freezing part of a stacked weight (``mlp.down@0-3``) sets those slices' multiplier to 0.

Training differentiates the trainable weights only: :func:`split_trainable` cuts params into a trainable tree and a
frozen tree of the same structure, each holding ``None`` where the other has the weight (a weight with any trainable
layer slice is trainable). :func:`build_optimizer` accepts either the full params or the trainable tree; the trainer
takes the trainable tree as its state and the frozen one as a constant (``train(..., frozen=...)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from safety_jax.model.llama import LINEAR_MODULES, Params
from safety_jax.model.lora import LORA_KEY

LAYER_MODULES = (*LINEAR_MODULES, "attn_norm", "mlp_norm")
TOP_MODULES = ("embed", "final_norm", "lm_head")
KNOWN_MODULES = LAYER_MODULES + TOP_MODULES
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings; defaults are the synthetic study's pretraining (AdamW (0.9, 0.95), lr 1e-3, wd 1e-4,
    clip 1.0).

    frozen / trainable: module rules; with ``trainable`` non-empty only those are trained. lr_multipliers: ``{rule:
    factor}``, later rules overriding earlier ones where they overlap. With LoRA adapters in the params the base is
    frozen unless ``train_base_with_lora``; ``lora_lr`` (default ``lr``) is the adapters' peak learning rate.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-4
    momentum: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    clip_norm: float | None = 1.0
    frozen: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ()
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    decay_norms_and_embeddings: bool = False
    train_base_with_lora: bool = False
    lora_lr: float | None = None

    def __post_init__(self) -> None:
        for name in ("frozen", "trainable"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        mults = self.lr_multipliers
        pairs = tuple(mults.items()) if isinstance(mults, Mapping) else tuple(tuple(p) for p in mults)
        object.__setattr__(self, "lr_multipliers", tuple((str(r), float(v)) for r, v in pairs))
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"OptimConfig.{name}={value!r} must be a positive number")
        if self.lora_lr is not None and not self.lora_lr > 0:
            raise ValueError(f"OptimConfig.lora_lr={self.lora_lr!r} must be a positive number (or null: lr)")
        for name in ("weight_decay", "warmup_steps", "total_steps", "min_lr_ratio", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimConfig.{name}={getattr(self, name)!r} must be >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"OptimConfig.clip_norm={self.clip_norm!r} must be positive (or null: no clipping)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"OptimConfig.optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"OptimConfig.schedule={self.schedule!r} needs total_steps > warmup_steps "
                             f"(got {self.total_steps} and {self.warmup_steps})")
        if any(v < 0 for _, v in self.lr_multipliers):
            raise ValueError(f"OptimConfig.lr_multipliers must be >= 0, got {dict(self.lr_multipliers)}")


# ---------------------------------------------------------------------------------------------------- module rules
@dataclasses.dataclass(frozen=True)
class ModuleRule:
    """A parsed ``MODULE@LAYERS`` rule; ``layers`` is None for every layer (and for top-level weights)."""

    text: str
    module: str
    layers: tuple[int, ...] | None


def _rule_error(rule: str, why: str) -> ValueError:
    return ValueError(f"module rule {rule!r} {why}; known modules: {', '.join(KNOWN_MODULES)}; layers as *, 3, 0-7 "
                      "or 1,3,5-6")


def parse_rule(rule: str, num_layers: int) -> ModuleRule:
    """Parse ``MODULE@LAYERS`` (see the module docstring) for a model of ``num_layers`` layers."""
    module, _, spec = rule.strip().partition("@")
    module, spec = module.strip(), spec.strip() or "*"
    if module not in KNOWN_MODULES:
        raise _rule_error(rule, f"names no module {module!r}")
    if spec == "*":
        return ModuleRule(rule, module, None)
    if module in TOP_MODULES:
        raise _rule_error(rule, f"gives layers to {module!r}, which is not a per-layer weight (use {module} alone)")
    layers: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise _rule_error(rule, f"has a malformed layer range {part.strip()!r}") from None
        if not 0 <= first <= last < num_layers:
            raise _rule_error(rule, f"selects layers {part.strip()} outside 0..{num_layers - 1}")
        layers.update(range(first, last + 1))
    return ModuleRule(rule, module, tuple(sorted(layers)))


def num_layers_of(params: Params) -> int:
    """Length of the stacked layers axis (read from the adapters when every base layer weight is cut out)."""
    leaves = jax.tree.leaves(params["layers"]) or jax.tree.leaves(params.get(LORA_KEY, {}))
    if not leaves:
        raise ValueError("params have no per-layer weights to read the number of layers from")
    return int(leaves[0].shape[0])


def _has_module(params: Params, module: str) -> bool:
    if module in TOP_MODULES:
        return module in params
    node = params["layers"]
    for p in module.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return False
        node = node[p]
    return True


def parse_rules(rules: Sequence[str], params: Params) -> list[ModuleRule]:
    """Parse and validate rules against ``params`` (the modules must exist there)."""
    n_layers = num_layers_of(params)
    out = []
    for rule in rules:
        parsed = parse_rule(rule, n_layers)
        if not _has_module(params, parsed.module):
            raise _rule_error(rule, f"names {parsed.module!r}, which these params lack"
                              + (" (tied word embeddings: use 'embed')" if parsed.module == "lm_head" else ""))
        out.append(parsed)
    return out


def leaf_module(path: tuple[Any, ...]) -> tuple[str, bool, bool]:
    """``(module name, is per-layer, is a LoRA adapter)`` of a params leaf path."""
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    if keys[0] == LORA_KEY:
        return ".".join(map(str, keys[2:4])), True, True
    if keys[0] == "layers":
        return ".".join(map(str, keys[1:])), True, False
    return str(keys[0]), False, False


def module_layer_values(params: Params, rules: Sequence[tuple[ModuleRule, Any]], default: Any,
                        dtype: Any = np.float32) -> Params:
    """A pytree like ``params`` holding, per leaf, an ``[L]`` array (per-layer weights and adapters) or a scalar
    (top-level weights): ``default``, overwritten by each matching rule's value in order."""
    n_layers = num_layers_of(params)

    def value(path, _):
        module, layered, _ = leaf_module(path)
        out = np.full((n_layers,) if layered else (), default, dtype)
        for rule, v in rules:
            if rule.module == module:
                if rule.layers is None or not layered:
                    out[...] = v
                else:
                    out[list(rule.layers)] = v
        return out

    return jax.tree_util.tree_map_with_path(value, params)


# ---------------------------------------------------------------------------------------------------- groups
def frozen_layers(cfg: OptimConfig, params: Params) -> Params:
    """Per leaf, a bool ``[L]`` (or scalar) array: True where the weight (slice) is frozen."""
    trainable = [(r, False) for r in parse_rules(cfg.trainable, params)]
    frozen = [(r, True) for r in parse_rules(cfg.frozen, params)]
    tree = module_layer_values(params, trainable + frozen, bool(cfg.trainable), dtype=bool)
    if LORA_KEY in params and not cfg.train_base_with_lora:
        tree = {k: (v if k == LORA_KEY else jax.tree.map(np.ones_like, v)) for k, v in tree.items()}
    return tree


def param_labels(cfg: OptimConfig, params: Params) -> Params:
    """The ``optax.partition`` label of every leaf: ``"frozen"``, ``"lora"`` or ``"trainable"``."""
    def label(path, frozen):
        if np.all(frozen):
            return "frozen"
        return "lora" if leaf_module(path)[2] else "trainable"

    return jax.tree_util.tree_map_with_path(label, frozen_layers(cfg, params))


def lr_multipliers(cfg: OptimConfig, params: Params) -> Params:
    """Per leaf, the learning-rate multiplier ``[L]`` (or scalar): the rules' factors, 0 on frozen slices."""
    rules = parse_rules([r for r, _ in cfg.lr_multipliers], params)
    mults = module_layer_values(params, list(zip(rules, [v for _, v in cfg.lr_multipliers], strict=True)), 1.0)
    return jax.tree.map(lambda m, f: np.where(f, 0.0, m).astype(np.float32), mults, frozen_layers(cfg, params))


def decays(path: tuple[Any, ...], cfg: OptimConfig) -> bool:
    """Whether weight decay applies: not to norms and embeddings unless ``decay_norms_and_embeddings``."""
    module = leaf_module(path)[0]
    return cfg.decay_norms_and_embeddings or not (module.endswith("norm") or module == "embed")


# ---------------------------------------------------------------------------------------------------- transforms
def trainable_mask(cfg: OptimConfig, params: Params) -> Params:
    """Per leaf, a Python bool: True when any slice of the weight is trained (False: the whole weight is frozen)."""
    return jax.tree.map(lambda f: not bool(np.all(f)), frozen_layers(cfg, params))


def split_trainable(cfg: OptimConfig, params: Params) -> tuple[Params, Params]:
    """``(trainable, frozen)``: two trees shaped like ``params``, each with ``None`` where the other holds the leaf."""
    mask = trainable_mask(cfg, params)
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def merge_params(trainable: Params, frozen: Params | None) -> Params:
    """Inverse of :func:`split_trainable` (``frozen=None``: ``trainable`` is already whole)."""
    if frozen is None:
        return trainable
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


class GradNormState(NamedTuple):
    """The global norm of the last gradients the optimizer received (after frozen slices were zeroed)."""

    grad_norm: jax.Array


def clip_by_global_norm_recorded(max_norm: float | None) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (or no clipping for ``None``) that keeps the norm it used in its state."""
    def init_fn(params):
        return GradNormState(jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None):
        norm = optax.global_norm(updates)
        if max_norm:  # optax.clip_by_global_norm's arithmetic, so clipped runs are bit-identical to it
            updates = jax.tree.map(lambda u: jnp.where(norm < max_norm, u, (u / norm.astype(u.dtype)) * max_norm),
                                   updates)
        return updates, GradNormState(norm.astype(jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def last_grad_norm(opt_state: Any) -> jax.Array | None:
    """The norm :func:`clip_by_global_norm_recorded` stored in an optimizer state (None when there is none)."""
    found = [s.grad_norm for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GradNormState))
             if isinstance(s, GradNormState)]
    return found[0] if found else None


def _broadcast(m: np.ndarray, x: jax.Array) -> jax.Array:
    return jnp.asarray(m, x.dtype).reshape(m.shape + (1,) * (x.ndim - m.ndim))


def scale_by_layer_multipliers(multipliers: Params) -> optax.GradientTransformation:
    """Multiply each update by its multiplier (an ``[L]`` array broadcast on the leading layers axis, or a scalar)."""
    def update_fn(updates, state, params=None):
        scaled = jax.tree.map(lambda u, m: u if np.all(m == 1) else u * _broadcast(m, u), updates, multipliers)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def mask_frozen_grads(frozen: Params) -> optax.GradientTransformation:
    """Zero the gradients of frozen weights and layer slices (``where``, so a NaN there cannot leak)."""
    def update_fn(updates, state, params=None):
        def mask(u, f):
            if not np.any(f):
                return u
            if np.all(f):
                return jnp.zeros_like(u)
            return jnp.where(_broadcast(f, u).astype(bool), jnp.zeros_like(u), u)

        return jax.tree.map(mask, updates, frozen), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def learning_rate_schedule(cfg: OptimConfig, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then constant, cosine or linear decay to ``min_lr_ratio · peak``
    at ``total_steps``."""
    peak = cfg.lr if peak is None else peak
    end, n_decay = peak * cfg.min_lr_ratio, max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, n_decay, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, n_decay)
    else:
        decay = optax.constant_schedule(peak)
    if cfg.warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), decay], [cfg.warmup_steps])


def _base_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    def decay_mask(p):
        return jax.tree_util.tree_map_with_path(lambda path, _: decays(path, cfg), p)

    if cfg.optimizer == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask)
    if cfg.optimizer == "sgd":  # coupled decay, as torch.optim.SGD: g + wd·w, then momentum
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.sgd(schedule, momentum=cfg.momentum or None))
    return optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask)


def build_optimizer(cfg: OptimConfig, params: Params) -> optax.GradientTransformation:
    """The optax transformation for ``params`` (plain params, or with adapters under ``"lora"``), or for the
    trainable tree of :func:`split_trainable` (frozen leaves cut out as ``None``)."""
    frozen = frozen_layers(cfg, params)
    labels = param_labels(cfg, params)
    mults = lr_multipliers(cfg, params)
    schedule = learning_rate_schedule(cfg)
    lora_schedule = learning_rate_schedule(cfg, cfg.lora_lr) if cfg.lora_lr is not None else schedule
    groups = {"trainable": _base_optimizer(cfg, schedule), "lora": _base_optimizer(cfg, lora_schedule),
              "frozen": optax.set_to_zero()}
    chain = [mask_frozen_grads(frozen), clip_by_global_norm_recorded(cfg.clip_norm),
             optax.partition(groups, labels), scale_by_layer_multipliers(mults)]
    return optax.chain(*chain)
