"""Causal grouped-query attention, three interchangeable implementations behind :func:`attention`.

Shapes (einsum letters): q [B, T, N, H]; k, v [B, S, K, H] with N = K·G (grouped-query); ``q_slots: [T]`` the
cache slot of each query; ``kv_valid: [B, S]`` real (non-pad, filled) key slots. Key slot s is visible to query t
when ``s <= q_slots[t]`` and ``kv_valid[b, s]``.

- ``reference``: hand-written einsums; materialises the [B, K, G, T, S] float32 scores.
- ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention`` with a boolean [B, 1, T, S] mask. cuDNN (flash) runs on
  CUDA GPUs with bfloat16/float16 inputs only.
- ``blockwise``: flash-style online softmax, a ``lax.scan`` over key blocks inside a ``lax.map`` over query blocks;
  the backward recomputes each block's scores, so only [B, block_q, N, block_k] scores exist at a time.

Softmax statistics are float32 everywhere. A query row with no visible key (a pad query under left padding) gets
the plain mean of all S values, as ``transformers`` does, instead of a NaN.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("reference", "xla", "cudnn", "blockwise")
BLOCK_Q = 512
BLOCK_K = 512

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a fully masked row softmaxes to uniform, never NaN
_warned: set[str] = set()


def visible_mask(q_slots: jax.Array, kv_valid: jax.Array, num_keys: int) -> jax.Array:
    """[B, T, S] bool: key slot s visible to query t (causal in slot order and a real key)."""
    s_idx = jnp.arange(num_keys)
    return (s_idx[None, :] <= q_slots[:, None])[None] & kv_valid[:, None, :].astype(bool)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array,
                        kv_valid: jax.Array) -> jax.Array:
    """Einsum attention: q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H] in q's dtype."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    visible = visible_mask(q_slots, kv_valid, k.shape[1])
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def dpa_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, kv_valid: jax.Array, *,
                  implementation: str = "xla") -> jax.Array:
    """``jax.nn.dot_product_attention`` ("xla" or "cudnn") with the slot mask: shapes as :func:`reference_attention`.

    cuDNN refusing a shape at trace time (e.g. an odd sequence length with a mask while training) falls back to
    "xla" with a logged warning, so generation's decode steps keep working.
    """
    mask = visible_mask(q_slots, kv_valid, k.shape[1])[:, None]  # [B, 1, T, S]
    if implementation == "cudnn":
        _check_cudnn(q)
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        except (NotImplementedError, ValueError) as e:
            key = f"{q.shape}{k.shape}{q.dtype}"
            if key not in _warned:
                _warned.add(key)
                logger.warning("cuDNN attention refused q %s, k %s (%s); using 'xla' for this shape", q.shape,
                               k.shape, e)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _check_cudnn(q: jax.Array) -> None:
    if jax.default_backend() != "gpu":
        raise ValueError(f"LlamaConfig.attention_impl='cudnn' needs a CUDA GPU (backend: {jax.default_backend()}); "
                         "use attention_impl='xla' or 'blockwise'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"LlamaConfig.attention_impl='cudnn' needs compute_dtype bfloat16 or float16 (got {q.dtype});"
                         " set compute_dtype='bfloat16' or use attention_impl='xla'")


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, kv_valid: jax.Array, *,
                        block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> jax.Array:
    """Flash-style attention: shapes as :func:`reference_attention`.

    Key blocks wholly after a query block's last slot are skipped (``lax.cond``); they carry zero weight for every
    row that has a visible key. Fully masked rows are finite (a mean of the values they scanned) but, unlike the
    reference, not the mean over all S.
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    nq, tq = _blocks(t, block_q)
    nk, sk = _blocks(s, block_k)
    # Padding queries get slot -1 (see nothing); padding keys are neither real nor visible (weight exactly 0).
    qg = _pad_axis(q.reshape(b, t, kv, g, h), 1, nq * tq).reshape(b, nq, tq, kv, g, h).swapaxes(0, 1)
    slots_q = _pad_axis(q_slots.astype(jnp.int32), 0, nq * tq, -1).reshape(nq, tq)
    kb = _pad_axis(k, 1, nk * sk).reshape(b, nk, sk, kv, h).swapaxes(0, 1)
    vb = _pad_axis(v, 1, nk * sk).reshape(b, nk, sk, kv, h).swapaxes(0, 1)
    valid = _pad_axis(kv_valid.astype(bool), 1, nk * sk).reshape(b, nk, sk).swapaxes(0, 1)
    real = (jnp.arange(nk * sk) < s).reshape(nk, sk)
    slots_k = jnp.arange(nk * sk, dtype=jnp.int32).reshape(nk, sk)
    scale = 1.0 / math.sqrt(h)

    def one_query_block(args):
        qi, sq = args  # [B, tq, K, G, H], [tq]

        @jax.checkpoint
        def step(carry, blk):
            ki, vi, val, rl, sl = blk

            def update(carry):
                m, den, acc = carry
                sc = jnp.einsum("btkgh,bskh->btkgs", qi, ki, preferred_element_type=jnp.float32) * scale
                vis = (sl[None, :] <= sq[:, None])[None] & val[:, None, :]  # [B, tq, sk]
                sc = jnp.where(vis[:, :, None, None], sc, jnp.where(rl, _MASKED, -jnp.inf))
                # The result does not depend on the running max, so it carries no gradient.
                m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(sc, axis=-1)))
                p = jnp.exp(sc - m_new[..., None])
                corr = jnp.exp(m - m_new)
                den = den * corr + jnp.sum(p, axis=-1)
                pv = jnp.einsum("btkgs,bskh->btkgh", p.astype(vi.dtype), vi, preferred_element_type=jnp.float32)
                return m_new, den, acc * corr[..., None] + pv

            needed = sl[0] <= jnp.max(sq)
            return jax.lax.cond(needed, update, lambda c: c, carry), None

        init = (jnp.full((b, tq, kv, g), -jnp.inf, jnp.float32), jnp.zeros((b, tq, kv, g), jnp.float32),
                jnp.zeros((b, tq, kv, g, h), jnp.float32))
        (_, den, acc), _ = jax.lax.scan(step, init, (kb, vb, valid, real, slots_k))
        # Every row scans block 0, so den >= 1 (its largest term is exp(0)); the guard only keeps a NaN impossible.
        return acc / jnp.where(den > 0, den, 1.0)[..., None]

    out = jax.lax.map(one_query_block, (qg, slots_q))  # [nq, B, tq, K, G, H]
    out = out.swapaxes(0, 1).reshape(b, nq * tq, n, h)[:, :t]
    return out.astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, kv_valid: jax.Array, *,
              impl: str) -> jax.Array:
    """Dispatch on ``impl`` (one of :data:`ATTENTION_IMPLS`); shapes as :func:`reference_attention`."""
    if impl == "reference":
        return reference_attention(q, k, v, q_slots, kv_valid)
    if impl in ("xla", "cudnn"):
        return dpa_attention(q, k, v, q_slots, kv_valid, implementation=impl)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_slots, kv_valid)
    raise ValueError(f"LlamaConfig.attention_impl={impl!r}; choose one of {ATTENTION_IMPLS}")


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(number of blocks, block size) covering ``length`` with at most ``block`` per block and the least padding."""
    count = -(-length // block)
    return count, -(-length // count)


def _pad_axis(x: jax.Array, axis: int, size: int, value: float | int | bool = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)
