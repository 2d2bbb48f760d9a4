"""The safety residual space (Pan et al., ICML 2025, arXiv 2502.09674): how safety fine-tuning shifts the
last-prompt-token hidden states, the components of that shift, and what they predict.

Every kernel takes stacked per-layer activations ``[L, N, D]`` (``collect_activations`` output at one position) and
is a ``jax.vmap`` over the layer axis, so one compiled program covers every layer of a 32-layer model.

- :func:`representation_shift`: ΔH = Y − X ("identity") or R = X W − X with W = argmin ‖X W − Y‖_F ("matrix",
  no bias; paper §3.1).
- :func:`shift_components`: the uncentred SVD R = U S Vᵀ; directions = rows of Vᵀ, λ_i = s_i² / (N − 1).
- :func:`effective_rank`: the smallest k whose cumulative λ share reaches τ.
- :func:`percentile_accuracy`, :func:`refusal_prediction`: project activations on a component, threshold at the
  percentile given by the positive-label rate, accuracy against refusal labels; dominant component and best-of-N.
- :func:`difference_in_means`, :func:`orthogonalize_weights`: the Arditi et al. (2024) refusal direction (float64)
  and the weight edit that equals directional ablation of it everywhere.

Orientation: an SVD fixes each direction up to sign. Here component i is oriented so that the mean shift projects
on it non-negatively (Σ_n U[n, i] ≥ 0): ``+v`` is the way fine-tuning moved the states. The reference projects on
``−v_c`` of its own SVD's arbitrary sign; a ``sign`` argument keeps that convention available.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.errors import ConfigError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params

SHIFTS = ("identity", "matrix")
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ---------------------------------------------------------------------------------------------------- the shift
def _check_pair(x: Any, y: Any) -> None:
    if x.ndim != 3 or x.shape != y.shape:
        raise ValueError(f"activations before / after must both be [L, N, D], got {x.shape} and {y.shape}")


@jax.jit
def least_squares_map(x: jax.Array, y: jax.Array) -> jax.Array:
    """W_ℓ = argmin_W ‖X_ℓ W − Y_ℓ‖_F without a bias (minimum-norm when N < D): x, y [L, N, D] -> W [L, D, D]."""
    _check_pair(x, y)
    solve = lambda a, b: jnp.linalg.lstsq(a, b)[0]
    return jax.vmap(solve)(x.astype(jnp.float32), y.astype(jnp.float32))


@partial(jax.jit, static_argnames=("variant",))
def representation_shift(x: jax.Array, y: jax.Array, variant: str = "identity") -> jax.Array:
    """The shift of the hidden states, [L, N, D] float32: ``identity`` ΔH = Y − X; ``matrix`` R = X W − X with W the
    least-squares map (its linear part; with N ≤ D and X of full row rank it equals Y − X)."""
    _check_pair(x, y)
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    if variant == "identity":
        return y - x
    if variant == "matrix":
        return jnp.einsum("lnd,lde->lne", x, least_squares_map(x, y)) - x
    raise ConfigError(f"representation shift variant {variant!r}; choose one of {SHIFTS}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Components:
    """The SVD of a shift per layer: ``directions`` [L, K, D] (unit rows of Vᵀ, oriented with the mean shift),
    ``singular_values`` [L, K] (descending), ``variances`` λ [L, K] = s² / (N − 1), ``share`` λ / Σλ [L, K]."""

    directions: jax.Array
    singular_values: jax.Array
    variances: jax.Array
    share: jax.Array


@partial(jax.jit, static_argnames=("k",))
def shift_components(shift: jax.Array, k: int | None = None) -> Components:
    """Uncentred SVD of ``shift: [L, N, D]`` per layer (paper §3.2), keeping the first ``k`` components (all
    min(N, D) when None); λ shares are over all components."""
    if shift.ndim != 3:
        raise ValueError(f"shift must be [L, N, D], got shape {shift.shape}")
    n = shift.shape[1]

    def one(r: jax.Array) -> tuple[jax.Array, jax.Array]:
        u, s, vt = jnp.linalg.svd(r, full_matrices=False)
        sign = jnp.where(u.sum(axis=0) < 0, -1.0, 1.0)
        return vt * sign[:, None], s

    vt, s = jax.vmap(one)(shift.astype(jnp.float32))
    lam = s**2 / max(n - 1, 1)
    share = lam / jnp.maximum(lam.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    k = s.shape[-1] if k is None else min(k, s.shape[-1])
    return Components(vt[:, :k], s[:, :k], lam[:, :k], share[:, :k])


def effective_rank(share: Any, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """[L, len(thresholds)] ints: per layer, the smallest k with Σ_{i<k} share_i ≥ τ (share [L, K], the λ shares
    of :class:`Components`; K + 1 when the kept components never reach τ)."""
    share = np.asarray(share, np.float64)
    cum = np.cumsum(share, axis=-1)
    out = np.empty((share.shape[0], len(thresholds)), np.int64)
    for j, tau in enumerate(thresholds):
        reached = cum >= tau - 1e-12
        out[:, j] = np.where(reached.any(-1), reached.argmax(-1) + 1, share.shape[-1] + 1)
    return out


def activation_norms(x: Any, y: Any, shift: Any) -> dict[str, np.ndarray]:
    """Mean L2 norm per layer [L] of the states before, after, and of the shift (all [L, N, D])."""
    return {name: np.asarray(jnp.linalg.norm(jnp.asarray(a, jnp.float32), axis=-1).mean(-1))
            for name, a in (("before", x), ("after", y), ("shift", shift))}


# ---------------------------------------------------------------------------------------------------- prediction
@jax.jit
def percentile_accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Accuracy of "positive iff score > the (1 − r)-quantile of the scores", r the positive rate of ``labels``, so
    as many rows are predicted positive as are positive (paper §4; the quantile interpolates linearly, as numpy's
    default). scores [..., N], labels [N] bool -> [...]."""
    labels = labels.astype(bool)
    rate = labels.mean()
    thr = jnp.quantile(scores.astype(jnp.float32), 1.0 - rate, axis=-1, keepdims=True)
    return ((scores > thr) == labels).mean(axis=-1)


@partial(jax.jit, static_argnames=("sign",))
def component_scores(acts: jax.Array, directions: jax.Array, sign: float = 1.0) -> jax.Array:
    """Projections ``sign · ⟨h_n, v_k⟩`` of activations [L, N, D] on each layer's directions [L, K, D] -> [L, K, N]."""
    return sign * jnp.einsum("lnd,lkd->lkn", acts.astype(jnp.float32), directions.astype(jnp.float32))


def refusal_prediction(acts: Any, directions: Any, labels: Any, *, top: int = 100, sign: float = 1.0
                       ) -> dict[str, np.ndarray]:
    """Refusal prediction from the residual components per layer (paper §4).

    acts [L, N, D]; directions [L, K, D]; labels [N] (1 = refused). Returns ``dominant`` [L] (component 0's
    percentile-threshold accuracy), ``best`` [L] and ``best_index`` [L] (the best of the first ``top`` components:
    a maximum over ``top`` tries, so compare it with the same maximum over random directions), ``per_component``
    [L, min(top, K)]."""
    labels = jnp.asarray(labels, bool)
    dirs = jnp.asarray(directions)[:, :top]
    acc = np.asarray(percentile_accuracy(component_scores(jnp.asarray(acts), dirs, sign), labels))
    return {"dominant": acc[:, 0], "best": acc.max(-1), "best_index": acc.argmax(-1), "per_component": acc}


def random_directions(key: jax.Array, num_layers: int, k: int, d: int) -> jax.Array:
    """[L, k, D] unit directions drawn uniformly on the sphere: the chance baseline of :func:`refusal_prediction`."""
    v = jax.random.normal(key, (num_layers, k, d), jnp.float32)
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def cosine(a: Any, b: Any) -> np.ndarray:
    """Cosine similarity along the last axis (e.g. a probe's direction [L, D] and the dominant direction [L, D])."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


# ---------------------------------------------------------------------------------------------------- directions
def difference_in_means(harmful: Any, harmless: Any) -> np.ndarray:
    """The refusal direction per layer (Arditi et al. 2024): mean of harmful minus mean of harmless activations,
    computed in float64 on the host. harmful [L, N1, D] (or [L, N1, P, D] for several post-instruction positions,
    averaged too), harmless likewise -> [L, D] float64 (not normalised)."""
    h, b = np.asarray(harmful, np.float64), np.asarray(harmless, np.float64)
    if h.ndim < 3 or h.ndim != b.ndim or h.shape[0] != b.shape[0] or h.shape[-1] != b.shape[-1]:
        raise ValueError(f"harmful / harmless must be [L, N, (P,) D] with the same L and D, got {h.shape}, {b.shape}")
    axes = tuple(range(1, h.ndim - 1))
    return h.mean(axis=axes) - b.mean(axis=axes)


def orthogonalize_weights(params: Params, direction: Any, config: LlamaConfig) -> Params:
    """Weight orthogonalisation (Arditi et al. 2024, §4.1): W ← W − r̂ r̂ᵀ W for every matrix that writes to the
    residual stream — the embedding, attention-out and MLP-down of every layer — so no hidden state has a component
    along r̂; equal to ``interventions.directional_ablation(r̂, L)`` at every layer and position.

    direction [D] (one direction for the whole model). A model with tied embeddings would change its unembedding
    too, and is refused."""
    if config.tie_word_embeddings:
        raise ConfigError("orthogonalize_weights: the model ties its embeddings, so editing them would also change the "
                          "output head; untie them first (copy embed into lm_head) or use directional_ablation")
    r = jnp.asarray(direction, jnp.float32)
    if r.shape != (config.hidden_size,):
        raise ValueError(f"direction must be [D={config.hidden_size}], got shape {r.shape}")
    r = r / jnp.linalg.norm(r)

    def out_proj(w: jax.Array) -> jax.Array:  # the last axis of w is the residual (output) dimension
        wf = w.astype(jnp.float32)
        return (wf - jnp.einsum("...d,d,e->...e", wf, r, r)).astype(w.dtype)

    layers = dict(params["layers"])
    layers["attn"] = {**layers["attn"], "o": out_proj(layers["attn"]["o"])}
    layers["mlp"] = {**layers["mlp"], "down": out_proj(layers["mlp"]["down"])}
    return {**params, "embed": out_proj(params["embed"]), "layers": layers}
