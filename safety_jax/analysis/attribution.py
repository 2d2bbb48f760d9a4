"""Attribution of a residual component's projection (Pan et al. 2025, §5): to input tokens, and to the components of
earlier layers.

The reference attributes with AttnLRP. Here the documented substitutes are gradient × input (Shrikumar et al. 2016)
and integrated gradients (Sundararajan et al. 2017, Eq. 1 with a Riemann midpoint sum, which satisfies
completeness: Σ_t IG_t ≈ f(x) − f(x')). The attributed function is

    f(x) = ⟨h_ℓ(x)[p], v⟩,

the projection of the hidden state after block ℓ (``resid_post``) at the last prompt token p on a direction v (a
residual component). Component-to-component scores take the same gradient × input in the component basis of an
earlier layer: for source component j at layer ℓ' and the target f, s_j = ⟨h_ℓ', v_j⟩ · ⟨∂f/∂h_ℓ', v_j⟩ (positive:
v_j promotes the target, negative: it suppresses it), with ∂f/∂h_ℓ' for every ℓ' from one backward pass through
``forward(perturb=...)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, forward


def last_positions(attention_mask: Any) -> jax.Array:
    """[B] index of each row's last real token (left- or right-padded masks [B, T])."""
    m = jnp.asarray(attention_mask, jnp.int32)
    return (m.shape[1] - 1 - jnp.argmax(m[:, ::-1], axis=1)).astype(jnp.int32)


def _projection(params: Params, embeds: jax.Array, mask: jax.Array, config: LlamaConfig, layer: int,
                direction: jax.Array, perturb: jax.Array | None = None) -> jax.Array:
    """f per row [B]: ⟨resid_post[layer] at the last real token, direction⟩ from input embeddings [B, T, D]."""
    pos = last_positions(mask)[:, None]
    kw = {"perturb": {"resid_post": perturb}} if perturb is not None else {}
    _, cap = forward(params, jnp.zeros(mask.shape, jnp.int32), config, attention_mask=mask, input_embeds=embeds,
                     capture="resid_post", capture_positions=pos, **kw)
    h = cap["resid_post"][layer, :, 0].astype(jnp.float32)  # [B, D]
    return h @ direction.astype(jnp.float32)


def _embed(params: Params, tokens: jax.Array, config: LlamaConfig) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0).astype(config.dtype)


@partial(jax.jit, static_argnames=("config", "layer"))
def projection(params: Params, tokens: jax.Array, attention_mask: jax.Array, direction: jax.Array, *,
               config: LlamaConfig, layer: int) -> jax.Array:
    """f(x) per row [B] (see the module docstring); tokens, attention_mask [B, T]; direction [D]."""
    return _projection(params, _embed(params, tokens, config), attention_mask, config, layer, direction)


@partial(jax.jit, static_argnames=("config", "layer"))
def gradient_x_input(params: Params, tokens: jax.Array, attention_mask: jax.Array, direction: jax.Array, *,
                     config: LlamaConfig, layer: int) -> jax.Array:
    """Relevance of each input token to f: ⟨∂f/∂e_t, e_t⟩ [B, T] float32 (0 on padding)."""
    e = _embed(params, tokens, config)
    f = lambda x: _projection(params, x, attention_mask, config, layer, direction).sum()
    g = jax.grad(f)(e)
    rel = jnp.einsum("btd,btd->bt", g.astype(jnp.float32), e.astype(jnp.float32))
    return rel * attention_mask.astype(jnp.float32)


@partial(jax.jit, static_argnames=("config", "layer", "steps"))
def integrated_gradients(params: Params, tokens: jax.Array, attention_mask: jax.Array, direction: jax.Array,
                         baseline: jax.Array | None = None, *, config: LlamaConfig, layer: int, steps: int = 32,
                         baseline_token: int = 0) -> tuple[jax.Array, jax.Array]:
    """Integrated gradients of f along the straight path from ``baseline`` embeddings [B, T, D] (default: the
    embedding of ``baseline_token`` at every position — not zeros: RMSNorm makes f jump at the zero vector, which
    breaks completeness) to the input's: IG_t = ⟨e_t − e'_t, (1/m) Σ_k ∂f/∂e_t(e' + (k − ½)/m · (e − e'))⟩
    (midpoint rule, ``steps`` = m, one gradient per step through a scan).
    Returns (IG [B, T], f(x) − f(x') [B]) — completeness: IG sums to it."""
    e = _embed(params, tokens, config).astype(jnp.float32)
    if baseline is None:
        baseline = _embed(params, jnp.full(tokens.shape, baseline_token, jnp.int32), config)
    e0 = baseline.astype(jnp.float32)
    f = lambda x: _projection(params, x.astype(config.dtype), attention_mask, config, layer, direction)
    grad = jax.grad(lambda x: f(x).sum())

    def step(acc: jax.Array, k: jax.Array) -> tuple[jax.Array, None]:
        a = (k + 0.5) / steps
        return acc + grad(e0 + a * (e - e0)).astype(jnp.float32), None

    total, _ = jax.lax.scan(step, jnp.zeros_like(e), jnp.arange(steps, dtype=jnp.float32))
    ig = jnp.einsum("btd,btd->bt", (e - e0), total / steps) * attention_mask.astype(jnp.float32)
    return ig, f(e) - f(e0)


@partial(jax.jit, static_argnames=("config", "layer"))
def component_scores(params: Params, tokens: jax.Array, attention_mask: jax.Array, direction: jax.Array,
                     sources: jax.Array, *, config: LlamaConfig, layer: int) -> jax.Array:
    """Promote / suppress scores of earlier components on a target component: s[ℓ', j] = mean over rows of
    ⟨h_ℓ', v_j⟩ · ⟨∂f/∂h_ℓ', v_j⟩ at the last real token (module docstring), f = the projection on ``direction``
    [D] after block ``layer``. sources [L, K, D]: each layer's components. Returns [L, K] float32 (zero for
    ℓ' ≥ layer, which cannot influence the target's state through the stream before it)."""
    b, t = tokens.shape
    e = _embed(params, tokens, config)
    zeros = jnp.zeros((config.num_hidden_layers, b, t, config.hidden_size), jnp.float32)
    pos = last_positions(attention_mask)
    g = jax.grad(lambda p: _projection(params, e, attention_mask, config, layer, direction, p).sum())(zeros)
    _, cap = forward(params, tokens, config, attention_mask=attention_mask, capture="resid_post",
                     capture_positions=pos[:, None])
    h = cap["resid_post"][:, :, 0].astype(jnp.float32)  # [L, B, D]
    g_last = jnp.take_along_axis(g, pos[None, :, None, None], axis=2)[:, :, 0]  # [L, B, D]
    s = jnp.einsum("lbd,lkd->lbk", h, sources) * jnp.einsum("lbd,lkd->lbk", g_last, sources)
    earlier = (jnp.arange(config.num_hidden_layers) < layer).astype(jnp.float32)[:, None]
    return s.mean(axis=1) * earlier


def top_tokens(relevance: Any, k: int, editable: Any = None) -> np.ndarray:
    """[B, k] positions of the ``k`` most relevant tokens per row (among ``editable`` [B, T] where given), most
    relevant first; rows with fewer editable tokens repeat -1."""
    r = np.asarray(relevance, np.float64).copy()
    if editable is not None:
        r[~np.asarray(editable, bool)] = -np.inf
    order = np.argsort(-r, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(r, order, axis=1) > -np.inf, order, -1)
