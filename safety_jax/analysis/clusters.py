"""Cluster separation of safe and unsafe activations (Jain et al. 2024, arXiv 2407.10264, analysis 1: τ).

Features are per-layer activations ``f: [L, N, F]`` (in the paper: the MLP hidden activation after the nonlinearity,
averaged over the ``>`` position and the next 9, see ``activations.window_mean_positions``). With class means
μ_safe, μ_unsafe of a reference safe and unsafe set,

    τ(x) = ‖f(x) − μ_unsafe‖₂ − ‖f(x) − μ_safe‖₂          (positive: closer to the safe cluster)

per layer and example. Everything is vectorised over layers and examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


def _as_features(x: Any, name: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 3:
        raise ValueError(f"{name} must be features [L, N, F], got shape {x.shape}")
    return x


def class_means(safe: Any, unsafe: Any) -> tuple[jax.Array, jax.Array]:
    """Per-layer class means of reference sets: ``safe: [L, Ns, F]``, ``unsafe: [L, Nu, F]`` -> two ``[L, F]``."""
    safe, unsafe = _as_features(safe, "safe"), _as_features(unsafe, "unsafe")
    if safe.shape[0] != unsafe.shape[0] or safe.shape[2] != unsafe.shape[2]:
        raise ValueError(f"safe {safe.shape} and unsafe {unsafe.shape} features disagree on [L, ., F]")
    return safe.mean(axis=1), unsafe.mean(axis=1)


@jax.jit
def _tau(features: jax.Array, mu_safe: jax.Array, mu_unsafe: jax.Array) -> jax.Array:
    d_unsafe = jnp.linalg.norm(features - mu_unsafe[:, None, :], axis=-1)
    d_safe = jnp.linalg.norm(features - mu_safe[:, None, :], axis=-1)
    return d_unsafe - d_safe


def tau(features: Any, mu_safe: Any, mu_unsafe: Any) -> jax.Array:
    """τ = ‖f − μ_unsafe‖ − ‖f − μ_safe‖ per layer and example: ``features: [L, N, F]``, means ``[L, F]`` -> ``[L, N]``.

    Positive τ means the example sits closer to the safe cluster (Jain et al. 2024, analysis 1).
    """
    features = _as_features(features, "features")
    mu_safe, mu_unsafe = jnp.asarray(mu_safe, jnp.float32), jnp.asarray(mu_unsafe, jnp.float32)
    expected = (features.shape[0], features.shape[2])
    if mu_safe.shape != expected or mu_unsafe.shape != expected:
        raise ValueError(f"class means must be [L, F] = {expected}, got {mu_safe.shape} and {mu_unsafe.shape}")
    return _tau(features, mu_safe, mu_unsafe)


def tau_summary(tau_values: Any) -> dict[str, jax.Array]:
    """Mean and population (ddof=0) std of τ over examples: ``[L, N]`` -> ``{"mean": [L], "std": [L]}``."""
    t = jnp.asarray(tau_values, jnp.float32)
    return {"mean": t.mean(axis=1), "std": t.std(axis=1)}


def tau_table(sets: Mapping[str, Any], mu_safe: Any, mu_unsafe: Any) -> dict[str, dict[str, jax.Array]]:
    """:func:`tau_summary` for each named feature set (safe, unsafe, each jailbreak, ...): ``{name: {mean, std}}``."""
    return {name: tau_summary(tau(f, mu_safe, mu_unsafe)) for name, f in sets.items()}


def cluster_accuracy(safe: Any, unsafe: Any, mu_safe: Any, mu_unsafe: Any) -> jax.Array:
    """Nearest-class-mean accuracy per layer over pooled ``safe: [L, Ns, F]`` and ``unsafe: [L, Nu, F]`` -> ``[L]``.

    An example is classified safe when τ ≥ 0 (ties go to safe) and unsafe when τ < 0.
    """
    tau_safe, tau_unsafe = tau(safe, mu_safe, mu_unsafe), tau(unsafe, mu_safe, mu_unsafe)
    correct = jnp.sum(tau_safe >= 0, axis=1) + jnp.sum(tau_unsafe < 0, axis=1)
    return correct / (tau_safe.shape[1] + tau_unsafe.shape[1])
