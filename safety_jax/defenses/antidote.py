"""Antidote (Huang et al. 2025) and Wanda pruning: calibration statistics streamed inside the layer scan, per-row masks
of the Wanda score, applied to full weights or to LoRA adapters.

For a linear weight W with inputs x (shared/methods/04, 05):

- statistics ``s_j = Σ_tokens x_j²`` in float32 over the calibration tokens (``forward(capture_reduce=...)``: one
  ``[L, in]`` vector per module input, never an ``[L, B, T, F]`` buffer), all from the *unpruned* model;
- score ``S_ij = |W_ij| · sqrt(s_j)`` (Wanda); ablations: ``magnitude`` ``|W_ij|``, ``random``;
- per output row, the top ``ratio`` fraction of scores (Antidote's dense ratio α: those weights are zeroed) or the
  bottom fraction (Wanda sparsification); ties broken by the lower input index (a stable order);
- ``W ← W ⊙ (1 − M)``.

Our weights are stored ``[L, in..., out...]`` (``model.llama``), so an output row is one index of the trailing axes
and its comparison group is every input index. LoRA: ``A [L, in, r]`` takes the module input, ``B [L, r, out]`` the
intermediate ``x·A`` (captured as ``lora_mid.<module>``); both are pruned before merging.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.errors import ConfigError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import LORA_MID, Params, forward, get_layer_weight
from safety_jax.train.optim import parse_rule

# The forward intermediate feeding each linear module (its x), and how many leading weight axes it contracts.
MODULE_INPUTS: dict[str, str] = {"attn.q": "attn_in", "attn.k": "attn_in", "attn.v": "attn_in",
                                 "attn.o": "attn_hidden", "mlp.gate": "mlp_in", "mlp.up": "mlp_in",
                                 "mlp.down": "mlp_hidden"}
IN_AXES: dict[str, int] = {m: 2 if m == "attn.o" else 1 for m in MODULE_INPUTS}
SCORES = ("wanda", "magnitude", "random")
MODES = ("top", "bottom")
TARGETS = ("weights", "lora")
TOKEN_MASKS = ("attention_mask", "loss_mask")
Masks = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ratio: α, the fraction of each output row selected (Antidote zeroes the top α scores,
    ``mode="bottom"`` the lowest, as Wanda sparsification); modules: rules ``MODULE@LAYERS`` as the optimizer's
    (``attn.q@*``, ``mlp.down@10-20``); target: full ``weights`` or the ``lora`` adapter's A and B; token_mask: which
    tokens the statistics sum over; layer_chunk: layers scored at once (bounds the [chunk, out, in] scores)."""

    ratio: float = 0.05
    modules: tuple[str, ...] = ("attn.q@*", "attn.k@*", "attn.v@*")
    score: str = "wanda"
    mode: str = "top"
    target: str = "weights"
    token_mask: str = "attention_mask"
    seed: int = 0
    layer_chunk: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.modules, str | list):
            object.__setattr__(self, "modules", (self.modules,) if isinstance(self.modules, str)
                               else tuple(self.modules))
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"PruneConfig.ratio={self.ratio}: the dense ratio α is a fraction in [0, 1]")
        for field, value, allowed in (("score", self.score, SCORES), ("mode", self.mode, MODES),
                                      ("target", self.target, TARGETS),
                                      ("token_mask", self.token_mask, TOKEN_MASKS)):
            if value not in allowed:
                raise ConfigError(f"PruneConfig.{field}={value!r}; choose one of {allowed}")
        if not self.modules:
            raise ConfigError("PruneConfig.modules is empty; name rules such as 'attn.q@*'")
        if self.layer_chunk < 1:
            raise ConfigError(f"PruneConfig.layer_chunk must be >= 1, got {self.layer_chunk}")


def selected_layers(cfg: PruneConfig, config: LlamaConfig) -> dict[str, np.ndarray]:
    """``{module: [L] bool}`` of the layers each module is pruned in (rules for one module are united)."""
    n = config.num_hidden_layers
    out: dict[str, np.ndarray] = {}
    for rule in cfg.modules:
        parsed = parse_rule(rule, n)
        if parsed.module not in MODULE_INPUTS:
            raise ConfigError(f"PruneConfig.modules: {rule!r} names {parsed.module!r}; prunable modules are "
                              f"{', '.join(MODULE_INPUTS)}")
        sel = out.setdefault(parsed.module, np.zeros(n, bool))
        sel[list(range(n)) if parsed.layers is None else list(parsed.layers)] = True
    return out


def _lora_node(lora: Params, module: str) -> Mapping[str, jax.Array]:
    group, leaf = module.split(".")
    node = (lora or {}).get("layers", {}).get(group, {}).get(leaf)
    if node is None:
        raise ConfigError(f"PruneConfig.target='lora' prunes {module}, which the adapters do not cover")
    return node


def stat_names(cfg: PruneConfig, config: LlamaConfig) -> tuple[str, ...]:
    """The forward intermediates whose Σ x² the configured pruning needs."""
    names = []
    for module in selected_layers(cfg, config):
        names.append(MODULE_INPUTS[module])
        if cfg.target == "lora":
            names.append(LORA_MID + module)
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------------- statistics
@jax.jit
def _add(a: dict, b: dict) -> dict:
    return jax.tree.map(jnp.add, a, b)


def calibration_stats(params: Params, config: LlamaConfig, batches: Iterable[Mapping[str, Any]], *,
                      cfg: PruneConfig, lora: Params | None = None, lora_scale: float = 1.0) -> dict[str, jax.Array]:
    """Stream calibration batches (dicts of ``tokens``, ``attention_mask`` and, for ``token_mask="loss_mask"``,
    ``loss_mask``, each [B, T]) through the unpruned model: ``{input name: Σ x² [L, ...]}`` float32, plus
    ``"tokens"`` and ``"samples"`` counts. One compiled forward per batch shape; sums stay on device."""
    names = stat_names(cfg, config)
    if cfg.target == "lora" and lora is None:
        raise ConfigError("PruneConfig.target='lora' needs the adapters (lora=)")
    reduce = dict.fromkeys(names, "sum_sq")

    @jax.jit
    def one(params, lora, tokens, attention_mask, mask):
        _, sums = forward(params, tokens, config, attention_mask=attention_mask, lora=lora, lora_scale=lora_scale,
                          capture_reduce=reduce, reduce_mask=mask, return_hidden=True)
        sums = dict(sums)
        sums["tokens"] = jnp.sum(mask.astype(jnp.float32))
        sums["samples"] = jnp.sum(jnp.any(mask > 0, axis=1).astype(jnp.float32))
        return sums

    total = None
    for i, batch in enumerate(batches):
        if cfg.token_mask not in batch:
            raise ConfigError(f"calibration batch {i} has no {cfg.token_mask!r} (PruneConfig.token_mask); it has "
                              f"{sorted(batch)}")
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        attn = jnp.asarray(batch.get("attention_mask", np.ones(tokens.shape)), jnp.int32)
        mask = jnp.asarray(batch[cfg.token_mask], jnp.float32) * attn
        sums = one(params, lora, tokens, attn, mask)
        total = sums if total is None else _add(total, sums)
    if total is None:
        raise ConfigError("calibration_stats got no batches")
    return total


# ---------------------------------------------------------------------------------------------------- masks
def row_mask(score: jax.Array, k: int, mode: str) -> jax.Array:
    """score [out, in] -> bool [out, in]: per output row the ``k`` highest (``top``) or lowest (``bottom``) scores,
    ties to the lower input index."""
    if k == 0:
        return jnp.zeros(score.shape, bool)
    key = score if mode == "top" else -score
    _, idx = jax.lax.top_k(key, k)
    return jnp.zeros(score.shape, bool).at[jnp.arange(score.shape[0])[:, None], idx].set(True)


def _module_masks(w: jax.Array, s: jax.Array | None, n_in_axes: int, ratio: float, score: str, mode: str,
                  key: jax.Array, chunk: int) -> jax.Array:
    """w [L, in..., out...], s [L, in...] -> bool mask of w's shape, scored layer chunk by layer chunk."""
    shape = w.shape
    n_in = math.prod(shape[1:1 + n_in_axes])
    k = int(math.floor(ratio * n_in))
    wf = jnp.abs(w.astype(jnp.float32)).reshape(shape[0], n_in, -1)
    sf = None if s is None else jnp.sqrt(s.astype(jnp.float32).reshape(shape[0], n_in))
    keys = jax.random.split(key, shape[0])

    def one(args):
        w_l, s_l, key_l = args
        if score == "wanda":
            sc = w_l * s_l[:, None]
        elif score == "magnitude":
            sc = w_l
        else:
            sc = jax.random.uniform(key_l, w_l.shape)
        return row_mask(sc.T, k, mode).T

    s_arg = sf if sf is not None else jnp.zeros((shape[0], n_in), jnp.float32)
    masks = jax.lax.map(one, (wf, s_arg, keys), batch_size=chunk)
    return masks.reshape(shape)


_module_masks_jit = jax.jit(_module_masks, static_argnames=("n_in_axes", "ratio", "score", "mode", "chunk"))


def prune_masks(params: Params, stats: Mapping[str, jax.Array] | None, cfg: PruneConfig, config: LlamaConfig, *,
                lora: Params | None = None) -> Masks:
    """``{name: bool mask}`` (True = selected, zeroed by :func:`apply_masks`) for every configured module: names
    ``attn.q`` … for full weights, ``attn.q.a`` / ``attn.q.b`` for LoRA; layers outside the rules stay False."""
    if cfg.score == "wanda" and stats is None:
        raise ConfigError("score='wanda' needs calibration statistics (calibration_stats); use score='magnitude' "
                          "for a data-free ablation")
    key = jax.random.key(cfg.seed)
    out: Masks = {}
    for i, (module, layers) in enumerate(selected_layers(cfg, config).items()):
        sel = jnp.asarray(layers)
        x_name = MODULE_INPUTS[module]
        if cfg.target == "weights":
            parts = [(module, get_layer_weight(params, module), x_name, IN_AXES[module])]
        else:
            node = _lora_node(lora, module)
            parts = [(f"{module}.a", node["a"], x_name, IN_AXES[module]),
                     (f"{module}.b", node["b"], LORA_MID + module, 1)]
        for j, (name, w, s_name, n_in) in enumerate(parts):
            s = None if stats is None else stats.get(s_name)
            if cfg.score == "wanda" and s is None:
                raise ConfigError(f"calibration statistics lack {s_name!r} (needed by {name}); compute them with the "
                                  "same PruneConfig")
            m = _module_masks_jit(w, s, n_in_axes=n_in, ratio=cfg.ratio, score=cfg.score, mode=cfg.mode,
                                  key=jax.random.fold_in(key, 2 * i + j), chunk=cfg.layer_chunk)
            out[name] = m & sel.reshape((-1,) + (1,) * (m.ndim - 1))
    return out


def apply_masks(params: Params, masks: Masks, *, lora: Params | None = None) -> Params:
    """Zero the selected weights: ``W ⊙ (1 − M)`` — of ``params`` (names ``attn.q`` …) or, for names ``attn.q.a`` /
    ``.b``, of ``lora`` (then the pruned adapters are returned)."""
    lora_names = [n for n in masks if n.count(".") == 2]
    tree = lora if lora_names else params
    if lora_names and lora is None:
        raise ConfigError("masks name LoRA adapters (attn.q.a …); pass lora=")
    out = jax.tree.map(lambda x: x, tree)  # a new nested dict, leaves shared
    for name, m in masks.items():
        parts = name.split(".")
        node = out["layers"]
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = jnp.where(m, jnp.zeros((), node[parts[-1]].dtype), node[parts[-1]])
    return out


def antidote(params: Params, config: LlamaConfig, batches: Iterable[Mapping[str, Any]], cfg: PruneConfig, *,
             lora: Params | None = None, lora_scale: float = 1.0) -> tuple[Params, Masks, dict[str, jax.Array]]:
    """Statistics on ``batches`` (the re-alignment set of harmful pairs) → masks → pruned params (``target=
    "weights"``) or pruned adapters (``"lora"``). Returns (pruned tree, masks, statistics)."""
    stats = None
    if cfg.score == "wanda":
        stats = calibration_stats(params, config, batches, cfg=cfg, lora=lora, lora_scale=lora_scale)
    masks = prune_masks(params, stats, cfg, config, lora=lora)
    return apply_masks(params, masks, lora=lora if cfg.target == "lora" else None), masks, stats or {}


# ---------------------------------------------------------------------------------------------------- files
def save_masks(path: str | os.PathLike, masks: Masks, stats: Mapping[str, jax.Array] | None = None) -> None:
    """Masks (uint8) and statistics (float32) in one safetensors file, written atomically."""
    from safetensors.numpy import save_file

    tensors = {f"mask/{k}": np.asarray(v, np.uint8) for k, v in masks.items()}
    tensors.update({f"stat/{k}": np.asarray(v, np.float32).reshape(np.shape(v)) for k, v in (stats or {}).items()})
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)


def load_masks(path: str | os.PathLike) -> tuple[Masks, dict[str, jax.Array]]:
    """What :func:`save_masks` wrote: (masks as bool arrays, statistics)."""
    from safetensors.numpy import load_file

    data = load_file(os.fspath(path))
    masks = {k[5:]: jnp.asarray(v.astype(bool)) for k, v in data.items() if k.startswith("mask/")}
    stats = {k[5:]: jnp.asarray(v) for k, v in data.items() if k.startswith("stat/")}
    return masks, stats
