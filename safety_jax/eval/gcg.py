"""A GCG-style discrete suffix attack (Zou et al. 2023, Algorithm 1) written for JAX.

Each step, for every prompt of the batch independently: the gradient of the target loss with respect to the one-hot
suffix tokens (through ``input_embeds``, so any Llama of the library works, synthetic or real), the ``top_k`` tokens
with the most negative gradient per suffix slot, ``num_candidates`` suffixes each differing from the current one in
one slot (slots spread evenly over the candidates, the token drawn from that slot's top-k), all candidates scored in
one vmapped forward, and the best kept when it lowers the loss. The whole optimisation is one jitted ``lax.scan``.

The target loss is the mean negative log-likelihood of the target tokens (``target_mask``, the library's
``loss_mask`` convention: token t is a target), from ``train.losses.sequence_logps`` (the head applied in chunks, so
a 128k vocabulary never materialises [B, T, V] float32 logits at once).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.errors import ConfigError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, default_positions, forward
from safety_jax.train.losses import sequence_logps


@dataclasses.dataclass(frozen=True)
class GCGConfig:
    """``steps`` optimisation steps, ``top_k`` tokens per slot, ``num_candidates`` suffixes scored per step (the
    paper: 500, 256, 512), ``seed`` of the candidate draws."""

    steps: int = 500
    top_k: int = 256
    num_candidates: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "top_k", "num_candidates"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"GCGConfig.{name}={getattr(self, name)!r}: a whole number ≥ 1")


def insert_slots(tokens: Any, attention_mask: Any, insert_at: Any, num: int, fill: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open ``num`` suffix slots before position ``insert_at[b]`` of each row (tokens from there move right; the
    rows grow to T + num). tokens, attention_mask [B, T]; insert_at [B]. Returns (tokens [B, T + num] with ``fill``
    in the slots, mask, slot positions [B, num])."""
    tokens, mask = np.asarray(tokens), np.asarray(attention_mask)
    b, t = tokens.shape
    at = np.asarray(insert_at, np.int64)
    col = np.arange(t + num)[None, :]
    src = np.where(col < at[:, None], col, col - num)
    in_slot = (col >= at[:, None]) & (col < at[:, None] + num)
    src = np.clip(src, 0, t - 1)
    new_tokens = np.where(in_slot, fill, np.take_along_axis(tokens, src, axis=1))
    new_mask = np.where(in_slot, 1, np.take_along_axis(mask, src, axis=1))
    slots = at[:, None] + np.arange(num)[None, :]
    return new_tokens.astype(np.int32), new_mask.astype(np.int32), slots.astype(np.int32)


def _losses(params: Params, embeds: jax.Array, tokens: jax.Array, mask: jax.Array, target_mask: jax.Array,
            config: LlamaConfig) -> jax.Array:
    """Mean target NLL per row [B] from input embeddings [B, T, D]."""
    positions = default_positions(mask, *mask.shape)
    hidden = forward(params, tokens, config, attention_mask=mask, positions=positions, input_embeds=embeds,
                     return_hidden=True)
    s = sequence_logps(params, hidden, tokens, target_mask, config)
    return -s.logps / jnp.maximum(s.counts, 1)


def _with_suffix(tokens: jax.Array, slots: jax.Array, suffix: jax.Array) -> jax.Array:
    return jax.vmap(lambda t, p, s: t.at[p].set(s))(tokens, slots, suffix)


@partial(jax.jit, static_argnames=("config",))
def target_loss(params: Params, tokens: jax.Array, attention_mask: jax.Array, target_mask: jax.Array, *,
                config: LlamaConfig) -> jax.Array:
    """Mean NLL of the target tokens per row [B] (the loss GCG minimises)."""
    embeds = jnp.take(params["embed"], tokens, axis=0)
    return _losses(params, embeds, tokens, attention_mask, target_mask, config)


@partial(jax.jit, static_argnames=("config",))
def score_candidates(params: Params, tokens: jax.Array, attention_mask: jax.Array, target_mask: jax.Array,
                     slots: jax.Array, candidates: jax.Array, *, config: LlamaConfig) -> jax.Array:
    """Target loss of every candidate suffix: candidates [B, C, S] written into ``slots`` [B, S] of ``tokens``
    [B, T] -> [B, C], one vmapped forward over the candidate axis."""
    def one(cand: jax.Array) -> jax.Array:  # cand [B, S]
        t = _with_suffix(tokens, slots, cand)
        return _losses(params, jnp.take(params["embed"], t, axis=0), t, attention_mask, target_mask, config)
    return jax.vmap(one, in_axes=1, out_axes=1)(candidates)


def _one_hot_grad(params: Params, tokens: jax.Array, mask: jax.Array, target_mask: jax.Array, slots: jax.Array,
                  suffix: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """(loss [B], ∂loss_b/∂onehot_b [B, S, V]) with the suffix as one-hot rows times the embedding matrix."""
    embed = params["embed"]
    base = jnp.take(embed, tokens, axis=0)

    def f(onehot: jax.Array) -> jax.Array:
        # the matmul runs in the embedding's dtype (no float32 copy of a [V, D] table), accumulating in float32
        rows = lambda o: jnp.einsum("sv,vd->sd", o.astype(embed.dtype), embed, preferred_element_type=jnp.float32)
        e = jax.vmap(lambda x, p, o: x.at[p].set(rows(o).astype(x.dtype)))(base, slots, onehot)
        return _losses(params, e, tokens, mask, target_mask, config)

    onehot = jax.nn.one_hot(suffix, embed.shape[0], dtype=jnp.float32)
    loss, vjp = jax.vjp(f, onehot)
    (g,) = vjp(jnp.ones_like(loss))  # rows are independent: row b of g is ∂loss_b/∂onehot_b
    return loss, g


@partial(jax.jit, static_argnames=("config", "gcg"))
def _gcg(params: Params, tokens: jax.Array, mask: jax.Array, target_mask: jax.Array, slots: jax.Array,
         allowed: jax.Array, key: jax.Array, *, config: LlamaConfig, gcg: GCGConfig) -> dict[str, jax.Array]:
    b, s = slots.shape
    c, k = gcg.num_candidates, gcg.top_k
    suffix0 = jnp.take_along_axis(tokens, slots, axis=1)

    def step(carry, key):
        suffix, best = carry
        t = _with_suffix(tokens, slots, suffix)
        loss, g = _one_hot_grad(params, t, mask, target_mask, slots, suffix, config)
        score = jnp.where(allowed[None, None, :], -g, -jnp.inf)
        top = jax.lax.top_k(score, k)[1]  # [B, S, k]
        slot = jnp.broadcast_to((jnp.arange(c) * s) // c, (b, c))  # slots spread evenly over the candidates
        pick = jax.random.randint(key, (b, c), 0, k)
        new_tok = top[jnp.arange(b)[:, None], slot, pick]  # [B, C]
        cand = jnp.broadcast_to(suffix[:, None, :], (b, c, s))
        cand = jnp.where(jnp.arange(s)[None, None, :] == slot[..., None], new_tok[..., None], cand)
        cand_loss = score_candidates(params, t, mask, target_mask, slots, cand, config=config)
        i = jnp.argmin(cand_loss, axis=1)
        cand_best = jnp.take_along_axis(cand_loss, i[:, None], axis=1)[:, 0]
        better = cand_best < loss
        suffix = jnp.where(better[:, None], cand[jnp.arange(b), i], suffix)
        return (suffix, jnp.minimum(loss, cand_best)), loss

    keys = jax.random.split(key, gcg.steps)
    (suffix, final), history = jax.lax.scan(step, (suffix0, jnp.full((b,), jnp.inf)), keys)
    return {"suffix": suffix, "loss": final, "history": history}


@dataclasses.dataclass(frozen=True)
class GCGResult:
    """``suffix`` [B, S] token ids, ``tokens`` [B, T] with the suffix written in, ``loss`` [B] (final target NLL),
    ``history`` [steps, B] (the loss at the start of each step; non-increasing)."""

    suffix: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    history: np.ndarray


def gcg_attack(params: Params, config: LlamaConfig, tokens: Any, attention_mask: Any, target_mask: Any, slots: Any,
               gcg: GCGConfig = GCGConfig(), *, allowed: Any = None) -> GCGResult:
    """Optimise the suffix tokens at ``slots`` [B, S] of ``tokens`` [B, T] (the prompt, its suffix slots and the
    target completion; :func:`insert_slots` opens the slots) to make the ``target_mask`` tokens likely.
    allowed: [V] bool, the tokens a suffix may use (default all)."""
    tokens, slots = jnp.asarray(tokens, jnp.int32), jnp.asarray(slots, jnp.int32)
    if slots.ndim != 2 or slots.shape[0] != tokens.shape[0]:
        raise ValueError(f"slots must be [B={tokens.shape[0]}, S], got shape {slots.shape}")
    v = config.vocab_size
    allowed = jnp.ones((v,), bool) if allowed is None else jnp.asarray(allowed, bool)
    if allowed.shape != (v,) or int(allowed.sum()) < gcg.top_k:
        raise ConfigError(f"gcg allowed tokens: a [V={v}] mask with at least top_k={gcg.top_k} tokens allowed")
    out = _gcg(params, tokens, jnp.asarray(attention_mask, jnp.int32), jnp.asarray(target_mask, jnp.int32), slots,
               allowed, jax.random.key(gcg.seed), config=config, gcg=gcg)
    final = _with_suffix(tokens, slots, out["suffix"])
    return GCGResult(np.asarray(out["suffix"]), np.asarray(final), np.asarray(out["loss"]),
                     np.asarray(out["history"]))
