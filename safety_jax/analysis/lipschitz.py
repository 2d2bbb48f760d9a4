"""Local Lipschitzness of the model around an input (Jain et al. 2024, arXiv 2407.10264, analysis 4).

``L(x) = ‖∂ max_v logit_v(x, p) / ∂ E(x)‖_F``: the norm, over every entry of the input embeddings ``E(x): [T, D]``, of
the gradient of the largest logit at one position ``p`` (default: the last non-pad token). The paper reports it falls
for unsafe inputs after safety fine-tuning. Examples do not interact in a forward pass, so one backward pass of the
batch-summed objective yields every example's gradient.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.analysis.activations import map_batches
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, forward


def last_token_index(attention_mask: np.ndarray) -> np.ndarray:
    """Index of the last non-pad token per row of ``attention_mask: [N, T]`` (left or right padding) -> ``[N]``."""
    mask = np.asarray(attention_mask).astype(bool)
    if not mask.any(axis=1).all():
        raise ValueError("attention_mask has a row with no real token")
    return (mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)


@partial(jax.jit, static_argnames=("config", "include_position"))
def _lipschitz_batch(params: Params, tokens: jax.Array, attention_mask: jax.Array, position: jax.Array,
                     positions: jax.Array | None, *, config: LlamaConfig, include_position: bool
                     ) -> dict[str, jax.Array]:
    embeds = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32)
    rows = jnp.arange(tokens.shape[0])

    def max_logit(e: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = forward(params, tokens, config, attention_mask=attention_mask, positions=positions, input_embeds=e)
        m = jnp.max(logits[rows, position], axis=-1)  # [B]
        return m.sum(), m

    grad, m = jax.grad(max_logit, has_aux=True)(embeds)
    if not include_position:  # only the embeddings before `position` (the reference: the input without its `>`)
        grad = jnp.where(jnp.arange(tokens.shape[1])[None, :, None] < position[:, None, None], grad, 0.0)
    return {"grad_norm": jnp.sqrt(jnp.sum(jnp.square(grad), axis=(1, 2))), "max_logit": m}


def local_lipschitz(params: Params, config: LlamaConfig, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
                    *, position: np.ndarray | None = None, positions: np.ndarray | None = None,
                    include_position: bool = True, batch_size: int = 32) -> dict[str, np.ndarray]:
    """‖∂ max-logit / ∂ input embeddings‖ per example (Jain et al. 2024, analysis 4).

    tokens, attention_mask, positions: [N, T]. position: [N] index whose max logit is differentiated (default: the
    last non-pad token). ``include_position=False`` takes the norm over the embeddings before ``position`` only
    (the reference's: the input up to, not including, ``>``). Streams fixed-shape batches through one jitted
    gradient.
    Returns ``{"grad_norm": [N], "max_logit": [N]}``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T] integers, got shape {tokens.shape}")
    if attention_mask is None:
        attention_mask = np.ones(tokens.shape, np.int32)
    if position is None:
        position = last_token_index(attention_mask)
    position = np.asarray(position, np.int32)
    if position.shape != (tokens.shape[0],) or position.min() < 0 or position.max() >= tokens.shape[1]:
        raise ValueError(f"position must be [N={tokens.shape[0]}] indices in [0, {tokens.shape[1]}), "
                         f"got shape {position.shape}")
    fn = partial(_lipschitz_batch, params, config=config, include_position=include_position)
    return map_batches(fn, tokens, attention_mask, position, positions, batch_size=batch_size)
