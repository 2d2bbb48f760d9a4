"""Optimisation attacks on the model's inputs.

Adversarial soft tokens (Jain et al. 2024, arXiv 2407.10264, analysis 6): insert ``k`` free embedding vectors before an
anchor token of each prompt (the ``>`` that ends the input in the synthetic world; the assistant header in a chat
template) and optimise them to maximise the likelihood of a target completion. Updates are normalised-gradient steps
``soft ← soft − lr · g / ‖g‖`` (the norm taken over each example's ``[k, D]`` block), each followed by a projection of
every soft vector onto the ball whose radius is the mean token-embedding norm. The whole optimisation is one jitted
``lax.scan`` over steps. Callers judge success from the returned layout (teacher-forced accuracy, generation, τ).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, default_positions, forward


def mean_embedding_norm(params: Params) -> jax.Array:
    """Mean L2 norm of the rows of the token-embedding matrix (the soft-token radius)."""
    return jnp.mean(jnp.linalg.norm(params["embed"].astype(jnp.float32), axis=-1))


@struct.dataclass
class SoftTokenLayout:
    """Where each position of the lengthened sequence ``[B, T + k]`` comes from.

    src: index into the original ``[B, T]`` sequence (undefined on soft slots); is_soft: soft-vector slots;
    soft_slot: which of the ``k`` soft vectors sits at a slot (clipped to [0, k) elsewhere).
    """

    src: jax.Array
    is_soft: jax.Array
    soft_slot: jax.Array


def soft_token_layout(anchor_idx: Any, seq_len: int, num_soft: int) -> SoftTokenLayout:
    """Layout for ``num_soft`` vectors inserted right before ``anchor_idx: [B]`` in sequences of length ``seq_len``."""
    anchor = jnp.asarray(anchor_idx, jnp.int32)[:, None]
    j = jnp.arange(seq_len + num_soft, dtype=jnp.int32)[None, :]
    is_soft = (j >= anchor) & (j < anchor + num_soft)
    src = jnp.where(j < anchor, j, j - num_soft)
    src = jnp.clip(src, 0, seq_len - 1)
    return SoftTokenLayout(src=src, is_soft=is_soft, soft_slot=jnp.clip(j - anchor, 0, num_soft - 1))


def insert_soft_tokens(embeds: jax.Array, soft: jax.Array, layout: SoftTokenLayout) -> jax.Array:
    """``embeds: [B, T, D]`` with ``soft: [B, k, D]`` inserted per ``layout`` -> ``[B, T + k, D]``."""
    shifted = jnp.take_along_axis(embeds, layout.src[..., None], axis=1)
    placed = jnp.take_along_axis(soft.astype(embeds.dtype), layout.soft_slot[..., None], axis=1)
    return jnp.where(layout.is_soft[..., None], placed, shifted)


def _shift(x: jax.Array, layout: SoftTokenLayout, soft_value: Any) -> jax.Array:
    """A [B, T] per-token array moved into the lengthened layout, ``soft_value`` on the soft slots."""
    return jnp.where(layout.is_soft, jnp.asarray(soft_value, x.dtype), jnp.take_along_axis(x, layout.src, axis=1))


def _target_nll(params: Params, config: LlamaConfig, tokens: jax.Array, input_embeds: jax.Array,
                attention_mask: jax.Array, positions: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of the target tokens per example -> [B] (next-token prediction)."""
    logits = forward(params, tokens, config, attention_mask=attention_mask, positions=positions,
                     input_embeds=input_embeds)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = target_mask[:, 1:].astype(jnp.float32)
    return -(token_logp * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


def _project(soft: jax.Array, max_norm: jax.Array) -> jax.Array:
    norms = jnp.linalg.norm(soft, axis=-1, keepdims=True)
    return soft * jnp.minimum(1.0, max_norm / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))


@partial(jax.jit, static_argnames=("config", "num_soft", "steps"))
def _attack(params: Params, tokens: jax.Array, attention_mask: jax.Array, target_mask: jax.Array,
            anchor_idx: jax.Array, init: jax.Array | None, key: jax.Array, lr: jax.Array, max_norm: jax.Array | None,
            *, config: LlamaConfig, num_soft: int, steps: int) -> dict[str, Any]:
    layout = soft_token_layout(anchor_idx, tokens.shape[1], num_soft)
    embeds = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32)
    radius = mean_embedding_norm(params) if max_norm is None else max_norm
    if init is None:
        direction = jax.random.normal(key, (tokens.shape[0], num_soft, embeds.shape[-1]), jnp.float32)
        init = 0.5 * radius * direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    new_tokens = _shift(tokens, layout, 0)
    new_mask = _shift(attention_mask.astype(jnp.int32), layout, 1)
    new_target = _shift(target_mask.astype(jnp.int32), layout, 0)
    new_positions = default_positions(new_mask, *new_mask.shape)
    loss_fn = lambda soft: _target_nll(params, config, new_tokens, insert_soft_tokens(embeds, soft, layout), new_mask,
                                       new_positions, new_target)

    def step(soft: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        per_example, vjp = jax.vjp(loss_fn, soft)
        (g,) = vjp(jnp.ones_like(per_example))  # examples are independent: row b holds ∂ loss_b / ∂ soft_b
        g_norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=(1, 2), keepdims=True))
        updated = _project(soft - lr * g / jnp.maximum(g_norm, jnp.finfo(jnp.float32).tiny), radius)
        # Iteration `steps` only measures the final loss: one extra gradient at run time, one body to compile.
        return jnp.where(i < steps, updated, soft), per_example

    soft, losses = jax.lax.scan(step, _project(init.astype(jnp.float32), radius), jnp.arange(steps + 1))
    return {"soft": soft, "losses": losses,
            "input_embeds": insert_soft_tokens(embeds, soft, layout), "attention_mask": new_mask,
            "positions": new_positions, "tokens": new_tokens, "target_mask": new_target, "soft_mask": layout.is_soft,
            "anchor_idx": anchor_idx + num_soft, "max_norm": radius}


@dataclasses.dataclass(frozen=True)
class SoftTokenResult:
    """Outcome of :func:`soft_token_attack`. Shapes: B examples, k soft vectors, T' = T + k.

    soft: [B, k, D] optimised vectors; losses: [steps + 1, B] target NLL before each step and after the last;
    input_embeds, attention_mask, positions, tokens (0 on soft slots, a placeholder), target_mask, soft_mask: [B, T']
    (input_embeds [B, T', D]) — pass ``tokens, attention_mask=, positions=, input_embeds=`` to ``forward`` to evaluate;
    anchor_idx: [B] anchor position in the lengthened sequence; max_norm: the soft-vector radius.
    """

    soft: jax.Array
    losses: jax.Array
    input_embeds: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    tokens: jax.Array
    target_mask: jax.Array
    soft_mask: jax.Array
    anchor_idx: jax.Array
    max_norm: jax.Array


def soft_token_attack(params: Params, config: LlamaConfig, tokens: Any, attention_mask: Any, anchor_idx: Any,
                      target_mask: Any, *, num_soft: int = 1, steps: int = 100, lr: float = 0.1,
                      max_norm: float | None = None, init: Any = None, key: jax.Array | None = None) -> SoftTokenResult:
    """Optimise ``num_soft`` embedding vectors inserted before ``anchor_idx`` to elicit a target completion.

    tokens, attention_mask: [B, T] prompt followed by the target completion (teacher forcing); anchor_idx: [B] index of
    the token the soft vectors go before (e.g. ``>``); target_mask: [B, T] 1 on the target tokens whose log-likelihood
    is maximised. Each step: ``soft ← Π(soft − lr · g/‖g‖)`` with g the gradient of the example's mean target NLL
    and Π the projection of every soft vector onto ‖·‖ ≤ ``max_norm`` (default: the mean token-embedding norm).
    init: [B, k, D] starting vectors (default: random directions at half the radius, from ``key``). Positions are
    recomputed for the lengthened sequence (``cumsum(mask) − 1``, i.e. an arange without padding).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] integers, got shape {tokens.shape}")
    b, t = tokens.shape
    attention_mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    target_mask = jnp.asarray(target_mask)
    anchor_idx = jnp.asarray(anchor_idx, jnp.int32)
    if attention_mask.shape != (b, t) or target_mask.shape != (b, t) or anchor_idx.shape != (b,):
        raise ValueError(f"attention_mask and target_mask must be [B, T] = {(b, t)} and anchor_idx [B] = ({b},); got "
                         f"{attention_mask.shape}, {target_mask.shape}, {anchor_idx.shape}")
    if num_soft < 1 or steps < 0:
        raise ValueError(f"num_soft must be >= 1 and steps >= 0, got num_soft={num_soft}, steps={steps}")
    if not bool(np.all(np.asarray(anchor_idx) <= np.argmax(np.asarray(target_mask) > 0, axis=1))):
        raise ValueError("anchor_idx must come at or before the first target token of each row")
    d = params["embed"].shape[1]
    if init is not None:
        init = jnp.asarray(init, jnp.float32)
        if init.shape != (b, num_soft, d):
            raise ValueError(f"init must be [B, k, D] = {(b, num_soft, d)}, got {init.shape}")
    out = _attack(params, tokens, attention_mask, target_mask, anchor_idx, init,
                  jax.random.PRNGKey(0) if key is None else key, jnp.float32(lr),
                  None if max_norm is None else jnp.float32(max_norm), config=config, num_soft=num_soft, steps=steps)
    return SoftTokenResult(**out)
