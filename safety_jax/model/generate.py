"""Batched autoregressive generation: one jitted prefill, then a KV-cache decode step inside a ``lax.while_loop``.

Prompts are left-padded ``[B, P]`` with an attention mask; positions follow the transformers convention
(``cumsum(mask) - 1``), so outputs match ``LlamaForCausalLM.generate`` token for token under greedy decoding. The
decode step is compiled once for the whole loop; generation stops early when every row has emitted an EOS token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.model.config import LlamaConfig
from safety_jax.model.interventions import Intervention
from safety_jax.model.llama import Params, default_positions, forward_cached, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` is greedy decoding (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"SamplingConfig.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("SamplingConfig: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


def sample_next(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Pick next tokens from float32 logits [B, V] (greedy, or temperature / top-k / top-p sampling)."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before > sampling.top_p  # the first token is always kept
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "lora_scale"))
def _generate(params: Params, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array, config: LlamaConfig,
              sampling: SamplingConfig, interventions: tuple[Intervention, ...], lora: Params | None,
              lora_scale: float) -> tuple[jax.Array, jax.Array]:
    b, p = prompt.shape
    n_new = sampling.max_new_tokens
    cache = init_cache(config, b, p + n_new)
    positions = default_positions(prompt_mask, b, p)
    logits, cache = forward_cached(params, prompt, config, cache, positions=positions, attention_mask=prompt_mask,
                                   interventions=interventions, lora=lora, lora_scale=lora_scale)
    eos = jnp.asarray(sampling.eos_token_ids or (-1,), jnp.int32)
    next_pos = jnp.max(positions, axis=-1) + 1  # [B]
    first = sample_next(logits[:, -1], jax.random.fold_in(key, 0), sampling)
    out = jnp.full((b, n_new), sampling.pad_token_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < n_new) & ~jnp.all(done)

    def step(state):
        i, token, pos, done, out, cache = state
        logits, cache = forward_cached(params, token[:, None], config, cache, positions=pos[:, None],
                                       interventions=interventions, lora=lora, lora_scale=lora_scale)
        nxt = sample_next(logits[:, -1], jax.random.fold_in(key, i), sampling)
        nxt = jnp.where(done, sampling.pad_token_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, nxt, pos + 1, done | jnp.isin(nxt, eos), out, cache

    state = (jnp.int32(1), first, next_pos, done, out, cache)
    _, _, _, _, out, _ = jax.lax.while_loop(cond, step, state)
    is_eos = jnp.isin(out, eos)
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n_new)
    return out, lengths


def generate(params: Params, config: LlamaConfig, prompt_tokens: Any, prompt_mask: Any = None, *,
             sampling: SamplingConfig | None = None, rng: jax.Array | None = None,
             interventions: Sequence[Intervention] = (), lora: Params | None = None, lora_scale: float = 1.0,
             **sampling_kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """Generate continuations of left-padded prompts.

    prompt_tokens: [B, P] ints, left-padded; prompt_mask: [B, P] (1 = real token; default all ones).
    sampling: a :class:`SamplingConfig`, or its fields as keyword arguments (``max_new_tokens=32, temperature=0.7``);
    EOS ids default to the model config's. Returns ``(new_tokens [B, max_new_tokens], lengths [B])`` where
    positions after a row's EOS hold ``pad_token_id`` and ``lengths`` counts tokens up to and including EOS.
    """
    if sampling is None:
        sampling_kwargs.setdefault("eos_token_ids", config.eos_ids)
        if config.pad_token_id is not None:
            sampling_kwargs.setdefault("pad_token_id", config.pad_token_id)
        sampling = SamplingConfig(**sampling_kwargs)
    elif sampling_kwargs:
        raise ValueError("pass either sampling= or sampling keyword arguments, not both")
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [batch, prompt_len], got shape {prompt_tokens.shape}")
    prompt_mask = jnp.ones_like(prompt_tokens) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    if prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} differs from prompt_tokens {prompt_tokens.shape}")
    if np.any(np.asarray(prompt_mask)[:, -1] == 0):
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all ones")
    rng = jax.random.key(0) if rng is None else rng
    return _generate(params, prompt_tokens, prompt_mask, rng, config, sampling, tuple(interventions), lora,
                     lora_scale)


def generate_text(params: Params, config: LlamaConfig, tokenizer: Any, prompts: Sequence[str], *,
                  rng: jax.Array | None = None, **sampling_kwargs: Any) -> list[str]:
    """Tokenise prompts with a transformers tokenizer (left padding), generate, and decode the new text."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    enc = tokenizer(list(prompts), return_tensors="np", padding=True)
    if tokenizer.eos_token_id is not None:
        sampling_kwargs.setdefault("eos_token_ids", tuple(sorted({*config.eos_ids, tokenizer.eos_token_id})))
    sampling_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out, lengths = generate(params, config, enc["input_ids"], enc["attention_mask"], rng=rng, **sampling_kwargs)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(out, lengths)]
