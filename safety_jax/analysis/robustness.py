"""Module robustness analysis and the proxy-guided search of Du et al. 2024 (arXiv 2410.04524, "Module Robustness
Analysis"; reconstructed, see shared/methods/02).

A frozen security-feature probe (``analysis/probes.py``) reads the last prompt token's residual stream at one layer.
For every module (type m, layer l) — a slice ``params["layers"][m][l]`` — a controlled perturbation is applied to that
slice only and the probe's accuracy and mean margin are recomputed on the proxy data:

    (a) Gaussian:   W_l ← W_l + ε ‖W_l‖_F · G / ‖G‖_F,   G ~ N(0, I), seeded by (seed, module index, layer)
    (b) fine-tune:  k optimizer steps on benign data with the optimizer restricted to the rule ``m@l``
                    (``train/optim.py``'s rule syntax: every other weight is frozen)

R(m, l) is how little the proxy moves: the accuracy drop (ties: the margin drop) ranks modules from most to least
robust. The Gaussian case is batched: for one module type, the perturbed forwards of ``chunk`` layers run vmapped at
once and the chunks stream in a ``lax.map`` (``chunk=1``: one copy of one stacked weight at a time, for large models).

Proxy-guided search (ours, spec item 4): take modules in robustness order and add each while the probe accuracy with
every chosen module perturbed together stays ≥ ``min_accuracy``; the chosen set is Mods_Robust.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.analysis.probes import Probe, probe_logits
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import LINEAR_MODULES, Params, forward
from safety_jax.train.optim import LAYER_MODULES

PERTURBATIONS = ("gaussian", "finetune")
Module = tuple[str, int]  # (module type, layer)


def module_rule(module: str, layer: int) -> str:
    """The optimizer rule of one (module type, layer) slice, e.g. ``attn.q@3``."""
    return f"{module}@{layer}"


def _check_modules(params: Params, modules: Sequence[str]) -> None:
    for m in modules:
        node = params["layers"]
        for part in m.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"module {m!r} is not a per-layer weight of these params; known: "
                                 f"{', '.join(LINEAR_MODULES)}")
            node = node[part]


def get_module(params: Params, module: str) -> jax.Array:
    """The stacked weight ``[L, ...]`` of a module type (``attn.q``, ``mlp.down``, …)."""
    node = params["layers"]
    for part in module.split("."):
        node = node[part]
    return node


def set_module(params: Params, module: str, value: jax.Array) -> Params:
    """``params`` with the stacked weight of ``module`` replaced (dicts copied on the path, other leaves shared)."""
    def put(node: Mapping[str, Any], parts: list[str]) -> dict[str, Any]:
        out = dict(node)
        out[parts[0]] = value if len(parts) == 1 else put(node[parts[0]], parts[1:])
        return out

    return {**params, "layers": put(params["layers"], module.split("."))}


def noise_key(seed: int, module: str, layer: Any) -> jax.Array:
    """The key of one slice's Gaussian draw: the same noise for a slice however the perturbations are batched."""
    idx = LAYER_MODULES.index(module)
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), idx), layer)


def gaussian_delta(w: jax.Array, eps: float, key: jax.Array) -> jax.Array:
    """ε ‖w‖_F · G / ‖G‖_F for one slice ``w`` (computed in float32, returned in ``w``'s dtype)."""
    g = jax.random.normal(key, w.shape, jnp.float32)
    wf = w.astype(jnp.float32)
    return (eps * jnp.linalg.norm(wf) * g / jnp.linalg.norm(g)).astype(w.dtype)


def perturb_slice(params: Params, module: str, layer: Any, eps: float, seed: int) -> Params:
    """Params with Gaussian noise of relative Frobenius size ``eps`` on ``params["layers"][module][layer]`` only."""
    w = get_module(params, module)
    delta = gaussian_delta(w[layer], eps, noise_key(seed, module, layer))
    return set_module(params, module, w.at[layer].add(delta))


def perturb_selection(params: Params, selection: Mapping[str, Any], eps: float, seed: int) -> Params:
    """Every selected slice perturbed together: ``selection[module]`` is an ``[L]`` 0/1 mask; each slice gets the
    noise :func:`perturb_slice` would give it alone."""
    out = params
    for module, mask in selection.items():
        w = get_module(params, module)
        layers = jnp.arange(w.shape[0])
        delta = jax.vmap(lambda wl, i, m=module: gaussian_delta(wl, eps, noise_key(seed, m, i)))(w, layers)
        keep = jnp.asarray(mask).astype(bool).reshape((-1,) + (1,) * (w.ndim - 1))
        out = set_module(out, module, jnp.where(keep, w + delta, w))
    return out


def last_token_states(params: Params, config: LlamaConfig, tokens: jax.Array, attention_mask: jax.Array,
                      last_idx: jax.Array, layer: int) -> jax.Array:
    """The residual stream after block ``layer`` at each row's last prompt token: ``[B]`` indices -> ``[B, D]``."""
    _, cap = forward(params, tokens, config, attention_mask=attention_mask, capture="resid_post",
                     capture_positions=last_idx[:, None])
    return cap["resid_post"][layer, :, 0].astype(jnp.float32)


@partial(jax.jit, static_argnames=("config", "module", "layer", "chunk"))
def _gaussian_logits(params, probe, tokens, mask, last_idx, eps, seed, layers, *, config, module, layer, chunk):
    def one(i):
        return probe_logits(probe, last_token_states(perturb_slice(params, module, i, eps, seed), config, tokens,
                                                     mask, last_idx, layer))
    return jax.lax.map(one, layers, batch_size=chunk)


@partial(jax.jit, static_argnames=("config", "layer"))
def _logits(params, probe, tokens, mask, last_idx, *, config, layer):
    return probe_logits(probe, last_token_states(params, config, tokens, mask, last_idx, layer))


@partial(jax.jit, static_argnames=("config", "layer"))
def _selection_logits(params, probe, tokens, mask, last_idx, selection, eps, seed, *, config, layer):
    return probe_logits(probe, last_token_states(perturb_selection(params, selection, eps, seed), config, tokens,
                                                 mask, last_idx, layer))


@dataclasses.dataclass(frozen=True)
class ProxyData:
    """Probe inputs: ``tokens`` / ``attention_mask`` ``[N, T]``, ``last_idx`` ``[N]`` (the last prompt token) and
    ``labels`` ``[N]`` (1 = harmful)."""

    tokens: np.ndarray
    attention_mask: np.ndarray
    last_idx: np.ndarray
    labels: np.ndarray

    def batches(self, batch_size: int) -> Iterable[tuple[np.ndarray, ...]]:
        for s in range(0, len(self.labels), batch_size):
            yield (self.tokens[s:s + batch_size], self.attention_mask[s:s + batch_size],
                   self.last_idx[s:s + batch_size])


def _scores(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool)
    return (np.mean((logits > 0) == y, axis=-1),
            np.mean((2.0 * y - 1.0) * logits, axis=-1))


def proxy_scores(params: Params, config: LlamaConfig, probe: Probe, data: ProxyData, layer: int, *,
                 batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean margin) of the frozen probe on the states of ``params``."""
    z = np.concatenate([np.asarray(_logits(params, probe, *map(jnp.asarray, b), config=config, layer=layer))
                        for b in data.batches(batch_size)])
    acc, margin = _scores(z, data.labels)
    return float(acc), float(margin)


def gaussian_robustness(params: Params, config: LlamaConfig, probe: Probe, data: ProxyData, layer: int, *,
                        modules: Sequence[str] = LINEAR_MODULES, eps: float = 0.2, seed: int = 0, chunk: int = 8,
                        batch_size: int = 256) -> dict[str, np.ndarray]:
    """Probe accuracy and margin with each (module, layer) slice perturbed alone: ``{"accuracy", "margin"}`` of shape
    ``[M, L]`` (rows in ``modules`` order), plus the unperturbed ``base_accuracy`` / ``base_margin``."""
    _check_modules(params, modules)
    if not eps > 0:
        raise ValueError(f"robustness eps={eps!r} must be positive (the relative Frobenius size of the noise)")
    n_layers = config.num_hidden_layers
    layers = jnp.arange(n_layers)
    logits = np.zeros((len(modules), n_layers, len(data.labels)), np.float32)
    start = 0
    for b in data.batches(batch_size):
        tok, m, idx = map(jnp.asarray, b)
        for i, module in enumerate(modules):
            logits[i, :, start:start + len(idx)] = np.asarray(_gaussian_logits(
                params, probe, tok, m, idx, jnp.float32(eps), seed, layers, config=config, module=module,
                layer=layer, chunk=max(1, min(chunk, n_layers))))
        start += len(idx)
    acc, margin = _scores(logits, data.labels)
    base_acc, base_margin = proxy_scores(params, config, probe, data, layer, batch_size=batch_size)
    return {"accuracy": acc, "margin": margin, "base_accuracy": base_acc, "base_margin": base_margin}


def finetune_robustness(params: Params, config: LlamaConfig, probe: Probe, data: ProxyData, layer: int,
                        finetune: Callable[[Params, str], Params], *, modules: Sequence[str] = LINEAR_MODULES,
                        batch_size: int = 256) -> dict[str, np.ndarray]:
    """As :func:`gaussian_robustness` with perturbation (b): ``finetune(params, rule)`` returns the params after k
    benign steps with the optimizer restricted to ``rule`` (``module@layer``); one slice at a time."""
    _check_modules(params, modules)
    acc = np.zeros((len(modules), config.num_hidden_layers))
    margin = np.zeros_like(acc)
    for i, module in enumerate(modules):
        for lay in range(config.num_hidden_layers):
            acc[i, lay], margin[i, lay] = proxy_scores(finetune(params, module_rule(module, lay)), config, probe,
                                                       data, layer, batch_size=batch_size)
    base_acc, base_margin = proxy_scores(params, config, probe, data, layer, batch_size=batch_size)
    return {"accuracy": acc, "margin": margin, "base_accuracy": base_acc, "base_margin": base_margin}


def robustness_order(result: Mapping[str, Any], modules: Sequence[str]) -> list[Module]:
    """Modules from most to least robust: smallest accuracy drop first, then smallest margin drop, then layer /
    module order."""
    acc, margin = np.asarray(result["accuracy"]), np.asarray(result["margin"])
    cells = [(i, lay) for i in range(len(modules)) for lay in range(acc.shape[1])]
    cells.sort(key=lambda c: (-acc[c], -margin[c], c[1], c[0]))
    return [(modules[i], lay) for i, lay in cells]


def proxy_guided_search(params: Params, config: LlamaConfig, probe: Probe, data: ProxyData, layer: int,
                        order: Sequence[Module], *, min_accuracy: float, eps: float = 0.2, seed: int = 0,
                        stop_at_first_failure: bool = True, batch_size: int = 256
                        ) -> tuple[list[Module], list[float]]:
    """Mods_Robust: modules of ``order`` added one by one while the probe accuracy with every chosen module's
    Gaussian perturbation applied together stays ≥ ``min_accuracy`` (a module that breaks it ends the search, or is
    skipped with ``stop_at_first_failure=False``). Returns (chosen modules, the accuracy after each accepted one)."""
    modules = sorted({m for m, _ in order}, key=LAYER_MODULES.index)
    _check_modules(params, modules)
    chosen: list[Module] = []
    accs: list[float] = []
    for cand in order:
        trial = chosen + [cand]
        selection = {m: jnp.asarray([float((m, lay) in trial) for lay in range(config.num_hidden_layers)])
                     for m in modules}
        z = np.concatenate([np.asarray(_selection_logits(params, probe, *map(jnp.asarray, b), selection,
                                                         jnp.float32(eps), seed, config=config, layer=layer))
                            for b in data.batches(batch_size)])
        acc = float(_scores(z, data.labels)[0])
        if acc >= min_accuracy:
            chosen, accs = trial, accs + [acc]
        elif stop_at_first_failure:
            break
    return chosen, accs


def finetune_slice(params: Params, rule: str, loss_fn: Any, batches: Iterable[Mapping[str, np.ndarray]], *,
                   steps: int, lr: float, optimizer: str = "sgd", seed: int = 0) -> Params:
    """Perturbation (b): ``steps`` optimizer steps of ``loss_fn`` on benign ``batches`` with every weight but the
    rule's slices frozen (``OptimConfig(trainable=(rule,))``; no clipping, no decay). Returns the whole params."""
    from safety_jax.train.optim import OptimConfig, build_optimizer, merge_params, split_trainable
    from safety_jax.train.trainer import TrainConfig, train

    ocfg = OptimConfig(optimizer=optimizer, lr=lr, trainable=(rule,), clip_norm=None, weight_decay=0.0)
    trainable, frozen = split_trainable(ocfg, params)
    state, _ = train(loss_fn, build_optimizer(ocfg, trainable), trainable, iter(batches),
                     TrainConfig(steps=steps, log_every=steps, seed=seed), frozen=frozen)
    return merge_params(state.params, frozen)
