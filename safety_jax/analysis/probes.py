"""Logistic probes on hidden states: the "security feature classifier" of Du et al. 2024 (arXiv 2410.04524).

A probe reads one layer's state ``x: [D]`` (the last prompt token's residual stream) and predicts whether the prompt
is harmful (label 1) or benign (label 0). Features are standardised with the training set's per-dimension mean μ and
standard deviation σ (an option; identity when off), then

    z = ((x − μ) / σ) · w + b,        p(harmful | x) = sigmoid(z)
    L(w, b) = mean_i [ softplus(z_i) − y_i z_i ] + (l2 / 2) ‖w‖²        (bias not penalised)

is minimised full-batch with optax Adam from zero, inside one jitted ``lax.scan`` (deterministic: no sampling, no
random init). :func:`fit_probes` vmaps the same fit over a leading layers axis, giving a :class:`Probe` whose leaves
carry that axis; :func:`select_layer` picks the best layer on held-out data and :func:`take_layer` cuts it out.

The probe is the proxy of how intact the model's security features are (the paper reports 100 % in-domain accuracy on
AdvBench prompts vs word-substituted benign twins); once fitted it is frozen and re-applied to the states of perturbed
or fine-tuned models (``analysis/robustness.py``).
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

PROBE_FIELDS = ("weights", "bias", "mean", "scale")


@struct.dataclass
class Probe:
    """A fitted logistic probe. weights: [..., D] (standardised space), bias: [...], mean / scale: [..., D] (the
    feature standardisation; zeros / ones when off). A leading ``[L]`` axis when fitted per layer."""

    weights: jax.Array
    bias: jax.Array
    mean: jax.Array
    scale: jax.Array

    @property
    def num_layers(self) -> int | None:
        """Length of the leading layers axis, or None for a single probe."""
        return None if self.weights.ndim == 1 else int(self.weights.shape[0])


def _check(features: Any, labels: Any, ndim: int) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray(labels)
    want = "[N, D]" if ndim == 2 else "[L, N, D]"
    if x.ndim != ndim:
        raise ValueError(f"features must be {want}, got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[-2]:
        raise ValueError(f"labels must be [N] with N = {x.shape[-2]} (features {x.shape}), got shape {y.shape}")
    if x.shape[-2] < 2:
        raise ValueError("a probe needs at least 2 examples")
    yn = np.asarray(y)
    if not np.all((yn == 0) | (yn == 1)):
        raise ValueError("labels must be 0 (benign) or 1 (harmful)")
    if yn.min() == yn.max():
        raise ValueError("labels hold a single class; a probe needs both benign (0) and harmful (1) examples")
    return x, y.astype(jnp.float32)


def standardisation(features: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Per-dimension mean and std (ddof 0, floored at ``eps``) of ``features: [N, D]`` -> two ``[D]``."""
    mean = features.mean(axis=0)
    return mean, jnp.maximum(features.std(axis=0), eps)


def probe_loss(weights: jax.Array, bias: jax.Array, features: jax.Array, labels: jax.Array,
               l2: float) -> jax.Array:
    """Mean binary cross-entropy on standardised ``features: [N, D]`` plus ``l2/2 ‖w‖²`` (module docstring)."""
    z = features @ weights + bias
    return jnp.mean(jax.nn.softplus(z) - labels * z) + 0.5 * l2 * jnp.sum(weights * weights)


def _fit_one(x: jax.Array, y: jax.Array, *, l2: float, steps: int, lr: float, standardize: bool) -> Probe:
    d = x.shape[-1]
    if standardize:
        mean, scale = standardisation(x)
    else:
        mean, scale = jnp.zeros((d,), jnp.float32), jnp.ones((d,), jnp.float32)
    xs = (x - mean) / scale
    opt = optax.adam(lr)
    params = (jnp.zeros((d,), jnp.float32), jnp.zeros((), jnp.float32))
    grad = jax.grad(lambda p: probe_loss(p[0], p[1], xs, y, l2))

    def step(carry, _):
        p, s = carry
        updates, s = opt.update(grad(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return Probe(weights=params[0], bias=params[1], mean=mean, scale=scale)


@partial(jax.jit, static_argnames=("l2", "steps", "lr", "standardize"))
def _fit_jit(x, y, *, l2, steps, lr, standardize):
    return _fit_one(x, y, l2=l2, steps=steps, lr=lr, standardize=standardize)


@partial(jax.jit, static_argnames=("l2", "steps", "lr", "standardize"))
def _fit_layers_jit(x, y, *, l2, steps, lr, standardize):
    return jax.vmap(lambda xl: _fit_one(xl, y, l2=l2, steps=steps, lr=lr, standardize=standardize))(x)


def _check_settings(l2: float, steps: int, lr: float) -> None:
    if not l2 >= 0:
        raise ValueError(f"probe l2={l2!r} must be >= 0")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"probe steps={steps!r} must be a positive integer")
    if not lr > 0:
        raise ValueError(f"probe lr={lr!r} must be positive")


def fit_probe(features: Any, labels: Any, *, l2: float = 1e-3, steps: int = 500, lr: float = 0.05,
              standardize: bool = True) -> Probe:
    """Fit one probe on ``features: [N, D]`` (any float dtype, computed in fp32) and ``labels: [N]`` (1 = harmful)."""
    _check_settings(l2, steps, lr)
    x, y = _check(features, labels, 2)
    return _fit_jit(x, y, l2=float(l2), steps=int(steps), lr=float(lr), standardize=bool(standardize))


def fit_probes(features: Any, labels: Any, *, l2: float = 1e-3, steps: int = 500, lr: float = 0.05,
               standardize: bool = True) -> Probe:
    """One probe per layer, vmapped: ``features: [L, N, D]``, ``labels: [N]`` -> a Probe with leaves ``[L, ...]``."""
    _check_settings(l2, steps, lr)
    x, y = _check(features, labels, 3)
    return _fit_layers_jit(x, y, l2=float(l2), steps=int(steps), lr=float(lr), standardize=bool(standardize))


def _layered(probe: Probe, features: Any) -> jax.Array:
    x = jnp.asarray(features, jnp.float32)
    want = x.ndim - 1 if probe.weights.ndim == 1 else x.ndim - 2
    if want not in (0, 1) or x.shape[-1] != probe.weights.shape[-1]:
        raise ValueError(f"features {x.shape} do not match the probe (weights {probe.weights.shape}): a single probe "
                         "reads [..., N, D] or [D], a per-layer probe [L, N, D]")
    if probe.weights.ndim == 2 and x.shape[0] != probe.weights.shape[0]:
        raise ValueError(f"features have {x.shape[0]} layers, the probe {probe.weights.shape[0]}")
    return x


def probe_logits(probe: Probe, features: Any) -> jax.Array:
    """Logits z (harmful > 0): ``[..., N, D] -> [..., N]`` for one probe; ``[L, N, D] -> [L, N]`` per layer."""
    x = _layered(probe, features)
    if probe.weights.ndim == 2:
        xs = (x - probe.mean[:, None, :]) / probe.scale[:, None, :]
        return jnp.einsum("lnd,ld->ln", xs, probe.weights) + probe.bias[:, None]
    return ((x - probe.mean) / probe.scale) @ probe.weights + probe.bias


def probe_accuracy(probe: Probe, features: Any, labels: Any) -> jax.Array:
    """Fraction of examples with ``(z > 0) == label`` (per layer for a per-layer probe)."""
    y = jnp.asarray(labels).astype(bool)
    return jnp.mean((probe_logits(probe, features) > 0) == y, axis=-1)


def probe_margin(probe: Probe, features: Any, labels: Any) -> jax.Array:
    """Mean signed margin ``mean_i (2 y_i − 1) z_i`` in logit units (positive: on the right side on average)."""
    sign = 2.0 * jnp.asarray(labels, jnp.float32) - 1.0
    return jnp.mean(sign * probe_logits(probe, features), axis=-1)


def probe_direction(probe: Probe) -> jax.Array:
    """The unit normal of the decision boundary in the raw feature space, ``w / σ`` normalised: ``[D]`` (``[L, D]``
    per layer). It points towards "harmful"."""
    raw = probe.weights / probe.scale
    return raw / jnp.maximum(jnp.linalg.norm(raw, axis=-1, keepdims=True), 1e-12)


def take_layer(probe: Probe, layer: int) -> Probe:
    """The single probe of ``layer`` from a per-layer probe."""
    if probe.weights.ndim != 2:
        raise ValueError("take_layer needs a per-layer probe (from fit_probes)")
    if not 0 <= layer < probe.weights.shape[0]:
        raise ValueError(f"layer {layer} outside 0..{probe.weights.shape[0] - 1}")
    return jax.tree.map(lambda a: a[layer], probe)


def select_layer(probe: Probe, features: Any, labels: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """The best layer of a per-layer probe on held-out ``features: [L, N, D]``: highest accuracy, ties broken by the
    larger mean margin, then the earlier layer. Returns ``(layer, accuracies [L], margins [L])``."""
    if probe.weights.ndim != 2:
        raise ValueError("select_layer needs a per-layer probe (from fit_probes)")
    acc = np.asarray(probe_accuracy(probe, features, labels), np.float64)
    margin = np.asarray(probe_margin(probe, features, labels), np.float64)
    order = np.lexsort((np.arange(len(acc)), -margin, -acc))
    return int(order[0]), acc, margin


def save_probe(probe: Probe, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> None:
    """Write the probe's four arrays (float32) to a safetensors file, atomically; ``metadata`` is stored as JSON."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(np.asarray(getattr(probe, k), np.float32)) for k in PROBE_FIELDS}
    tmp = f"{path}.tmp"
    save_file(arrays, tmp, metadata={"probe": json.dumps(metadata or {})})
    os.replace(tmp, path)


def load_probe(path: str | os.PathLike[str]) -> tuple[Probe, dict[str, Any]]:
    """Read a probe written by :func:`save_probe`: ``(probe, metadata)``."""
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="numpy") as f:
        missing = [k for k in PROBE_FIELDS if k not in f.keys()]
        if missing:
            raise ValueError(f"{path} is not a probe file: it lacks {missing}")
        arrays = {k: jnp.asarray(f.get_tensor(k)) for k in PROBE_FIELDS}
        meta = json.loads((f.metadata() or {}).get("probe", "{}"))
    return Probe(**arrays), meta
