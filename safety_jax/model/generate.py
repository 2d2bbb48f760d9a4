"""Batched autoregressive generation: one jitted prefill, then a KV-cache decode step inside a ``lax.while_loop``.

Prompts are left-padded ``[B, P]`` with an attention mask; positions follow the transformers convention
(``cumsum(mask) - 1``), so outputs match ``LlamaForCausalLM.generate`` token for token under greedy decoding, and
under sampling when both draw the same Gumbel noise (``sample_next`` is the Gumbel-max form of categorical sampling).

What keeps it fast at scale:

- the KV cache ``[L, B, S, K, H]`` lives inside the jitted loop and each layer writes its new keys/values in place
  (``forward_cached``): no step copies it; on a mesh it is split along batch and KV heads like the activations;
- the prefill attends within the prompt and projects only its last position to the vocabulary;
- temperature, top-k, top-p, the EOS ids and the number of new tokens are traced values, and prompt lengths and
  ``max_new_tokens`` are padded up to power-of-two buckets, so a sweep compiles once per (batch, bucket) pair;
- ``generate_text`` tokenises (chat templates exactly as ``apply_chat_template(..., add_generation_prompt=True)``),
  groups prompts of similar length into fixed-size batches and shows progress.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from safety_jax.data.batches import default_buckets, pick_bucket
from safety_jax.model.config import LlamaConfig
from safety_jax.model.interventions import TOKEN_SELECTORS, Intervention
from safety_jax.model.llama import Params, default_positions, forward_cached, init_cache
from safety_jax.model.sharding import Constrain, use_activation_sharding

MIN_BUCKET = 16
EOS_SLOTS = 4  # EOS ids are padded (with -1) to a multiple of this, so their number rarely changes the shapes


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` is greedy decoding (argmax).

    Order as transformers applies its warpers: temperature, then top-k, then top-p (nucleus: keep the most likely
    tokens whose probability mass before them is below ``top_p``).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int | np.integer) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))

    def traced(self) -> dict[str, jax.Array]:
        """The settings as arrays, so changing them reuses the compiled loop."""
        size = -(-max(1, len(self.eos_token_ids)) // EOS_SLOTS) * EOS_SLOTS
        eos = [*self.eos_token_ids, *[-1] * (size - len(self.eos_token_ids))]
        return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p), "eos": jnp.asarray(eos, jnp.int32),
                "pad": jnp.int32(self.pad_token_id), "max_new_tokens": jnp.int32(self.max_new_tokens)}


def _as_traced(sampling: SamplingConfig | Mapping[str, Any]) -> Mapping[str, Any]:
    return sampling.traced() if isinstance(sampling, SamplingConfig) else sampling


def sample_next(logits: jax.Array, key: jax.Array, sampling: SamplingConfig | Mapping[str, Any]) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V]: greedy when temperature is 0, else Gumbel-max sampling
    (``argmax(l + Gumbel(key))``, the same draw as ``jax.random.categorical``) of the temperature / top-k / top-p
    filtered logits ``l``. Settings may be traced (one sort of the vocabulary serves both filters)."""
    s = _as_traced(sampling)
    temperature, top_k, top_p = s["temperature"], s["top_k"], s["top_p"]

    def greedy(logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(logits: jax.Array) -> jax.Array:
        neg = jnp.finfo(jnp.float32).min
        scaled = logits.astype(jnp.float32) / temperature
        desc = -jnp.sort(-scaled, axis=-1)
        vocab = scaled.shape[-1]
        kth = jnp.take(desc, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]
        kth = jnp.where(top_k > 0, kth, neg)
        desc = jnp.where(desc < kth, neg, desc)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = (mass_before < top_p) | (top_p >= 1.0)  # the first token always stays
        cutoff = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
        filtered = jnp.where((scaled < kth) | (scaled < cutoff), neg, scaled)
        gumbel = jax.random.gumbel(key, filtered.shape, jnp.float32)
        return jnp.argmax(filtered + gumbel, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


# ---------------------------------------------------------------------------------------------------- interventions
def _resolve(iv: Intervention, phase: str, prompt_mask: jax.Array) -> Intervention:
    """The intervention with its token selector turned into a positions mask for the prefill or a decode step."""
    b, p = prompt_mask.shape
    if phase == "prefill":
        masks = {"prompt": prompt_mask, "last_prompt": jnp.zeros((b, p)).at[:, -1].set(1.0),
                 "generated": jnp.zeros((b, p))}
        if iv.tokens == "all":
            return iv
        return iv.replace(tokens="all", positions=masks[iv.tokens].astype(jnp.float32))
    if iv.tokens == "generated" or (iv.tokens == "all" and iv.positions is None):
        return iv.replace(tokens="all", positions=None)
    return iv.replace(tokens="all", positions=jnp.zeros((b, 1), jnp.float32))  # prompt-only edits: off in decode


def _check_interventions(interventions: Sequence[Intervention], batch: int, prompt_len: int) -> None:
    for iv in interventions:
        if iv.tokens not in TOKEN_SELECTORS:
            raise ValueError(f"intervention tokens={iv.tokens!r}; choose one of {TOKEN_SELECTORS}")
        if iv.positions is not None and tuple(iv.positions.shape) != (batch, prompt_len):
            raise ValueError(f"an intervention's positions mask in generate() covers the prompt: shape "
                             f"{(batch, prompt_len)} expected, got {tuple(iv.positions.shape)} (for generated tokens "
                             "use positions='generated')")


def _left_pad_interventions(interventions: Sequence[Intervention], extra: int) -> tuple[Intervention, ...]:
    if not extra:
        return tuple(interventions)
    return tuple(iv if iv.positions is None else iv.replace(positions=jnp.pad(iv.positions, ((0, 0), (extra, 0))))
                 for iv in interventions)


# ---------------------------------------------------------------------------------------------------- the loop
@functools.partial(jax.jit, static_argnames=("config", "new_bucket", "lora_scale", "activation_sharding"))
def _generate(params: Params, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array,
              settings: Mapping[str, jax.Array], interventions: tuple[Intervention, ...], lora: Params | None, *,
              config: LlamaConfig, new_bucket: int, lora_scale: float,
              activation_sharding: Constrain | None) -> tuple[jax.Array, jax.Array]:
    with use_activation_sharding(activation_sharding):
        return _generate_body(params, prompt, prompt_mask, key, settings, interventions, lora, config, new_bucket,
                              lora_scale)


def _generate_body(params, prompt, prompt_mask, key, settings, interventions, lora, config, new_bucket,
                   lora_scale):
    b, p = prompt.shape
    n_new, eos, pad = settings["max_new_tokens"], settings["eos"], settings["pad"]
    cache = init_cache(config, b, p + new_bucket)
    positions = default_positions(prompt_mask, b, p)
    pre_ivs = tuple(_resolve(iv, "prefill", prompt_mask) for iv in interventions)
    dec_ivs = tuple(_resolve(iv, "decode", prompt_mask) for iv in interventions)
    logits, cache = forward_cached(params, prompt, config, cache, positions=positions, attention_mask=prompt_mask,
                                   interventions=pre_ivs, lora=lora, lora_scale=lora_scale, last_only=True,
                                   prefill=True)
    first = sample_next(logits, jax.random.fold_in(key, 0), settings)
    out = jnp.full((b, new_bucket), pad, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < n_new) & ~jnp.all(done)

    def step(state):
        i, token, pos, done, out, cache = state
        logits, cache = forward_cached(params, token[:, None], config, cache, positions=pos[:, None],
                                       interventions=dec_ivs, lora=lora, lora_scale=lora_scale, last_only=True)
        nxt = sample_next(logits, jax.random.fold_in(key, i), settings)
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, nxt, pos + 1, done | jnp.isin(nxt, eos), out, cache

    state = (jnp.int32(1), first, jnp.max(positions, axis=-1) + 1, done, out, cache)
    _, _, _, _, out, _ = jax.lax.while_loop(cond, step, state)
    is_eos = jnp.isin(out, eos) & (jnp.arange(new_bucket) < n_new)
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n_new)
    return out, lengths


def length_bucket(n: int, limit: int) -> int:
    """The power-of-two bucket (from 16) a length is padded to; lengths past ``limit`` use themselves."""
    return pick_bucket(n, default_buckets(max(limit, n), MIN_BUCKET))


def generate(params: Params, config: LlamaConfig, prompt_tokens: Any, prompt_mask: Any = None, *,
             sampling: SamplingConfig | None = None, rng: jax.Array | None = None,
             interventions: Sequence[Intervention] = (), lora: Params | None = None, lora_scale: float = 1.0,
             activation_sharding: Constrain | None = None, **sampling_kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """Generate continuations of left-padded prompts.

    prompt_tokens: [B, P] ints, left-padded; prompt_mask: [B, P] (1 = real token; default all ones).
    sampling: a :class:`SamplingConfig`, or its fields as keyword arguments (``max_new_tokens=32, temperature=0.7``);
    EOS ids default to the model config's (several allowed, e.g. Llama-3-Instruct's ``<|eot_id|>`` and
    ``<|end_of_text|>``). rng: a PRNG key for sampling (default: fresh OS entropy; pass one to reproduce).
    interventions: edits of the stream (``make_intervention``), restricted with ``positions="last_prompt"``,
    ``"prompt"``, ``"generated"`` or a [B, P] mask over the prompt; they follow the decoded tokens.
    lora: adapter pytree (``model.lora``) applied in every step. activation_sharding: the constraint that places the
    cache and activations on a mesh (``parallel.activation_constraint(mesh, strategy)``, with params already placed
    by ``parallel.shard_params``); it is a static argument, so pass the same object each call.
    Returns ``(new_tokens [B, max_new_tokens], lengths [B])`` where positions after a row's EOS hold
    ``pad_token_id`` and ``lengths`` counts tokens up to and including EOS.
    """
    if sampling is None:
        sampling_kwargs.setdefault("eos_token_ids", config.eos_ids)
        if config.pad_token_id is not None:
            sampling_kwargs.setdefault("pad_token_id", config.pad_token_id)
        sampling = SamplingConfig(**sampling_kwargs)
    elif sampling_kwargs:
        raise ValueError("pass either sampling= or sampling keyword arguments, not both")
    prompt_tokens = np.asarray(prompt_tokens)
    if prompt_tokens.ndim != 2 or not np.issubdtype(prompt_tokens.dtype, np.number):
        raise ValueError(f"prompt_tokens must be [batch, prompt_len] integers, got shape {prompt_tokens.shape}")
    prompt_mask = np.ones_like(prompt_tokens) if prompt_mask is None else np.asarray(prompt_mask)
    if prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} differs from prompt_tokens {prompt_tokens.shape}")
    if np.any(prompt_mask[:, -1] == 0):
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all ones")
    b, p = prompt_tokens.shape
    interventions = tuple(interventions)
    _check_interventions(interventions, b, p)
    limit = config.max_position_embeddings
    p_bucket, n_bucket = length_bucket(p, limit), length_bucket(sampling.max_new_tokens, limit)
    extra = p_bucket - p
    tokens = np.pad(prompt_tokens.astype(np.int32), ((0, 0), (extra, 0)), constant_values=sampling.pad_token_id)
    mask = np.pad(prompt_mask.astype(np.int32), ((0, 0), (extra, 0)))
    rng = jax.random.key(secrets.randbits(32)) if rng is None else rng
    out, lengths = _generate(params, jnp.asarray(tokens), jnp.asarray(mask), rng, sampling.traced(),
                             _left_pad_interventions(interventions, extra), lora, config=config,
                             new_bucket=n_bucket, lora_scale=float(lora_scale),
                             activation_sharding=activation_sharding)
    return out[:, :sampling.max_new_tokens], lengths


# ---------------------------------------------------------------------------------------------------- text
def encode_prompts(tokenizer: Any, prompts: Sequence[Any], *, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt: plain strings through the tokenizer (its special tokens, e.g. BOS, added as
    transformers does), or with ``chat=True`` message lists (or single user strings) through
    ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)`` — the template's BOS only, never twice."""
    ids = []
    for p in prompts:
        if chat:
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            ids.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)))
        else:
            if not isinstance(p, str):
                raise ValueError(f"prompt {p!r} is not a string; pass chat=True for message lists")
            ids.append(list(tokenizer(p)["input_ids"]))
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[B, length]`` (default: the longest) -> (tokens, mask)."""
    length = max(len(s) for s in sequences) if length is None else length
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        if s:
            tokens[i, length - len(s):], mask[i, length - len(s):] = s, 1
    return tokens, mask


def tokenizer_stop_ids(config: LlamaConfig, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids to stop on: the model config's plus the tokenizer's EOS (and, when the vocabulary has them,
    ``<|eot_id|>`` / ``<|eom_id|>`` / ``<|end_of_text|>``, Llama-3's end-of-turn tokens)."""
    ids = set(config.eos_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>") if t in vocab)
    return tuple(sorted(ids))


def generate_tokens(params: Params, config: LlamaConfig, sequences: Sequence[Sequence[int]], *,
                    pad_token_id: int, batch_size: int = 32, rng: jax.Array | None = None, progress: bool = False,
                    interventions: Sequence[Intervention] = (), lora: Params | None = None, lora_scale: float = 1.0,
                    activation_sharding: Constrain | None = None, **sampling_kwargs: Any) -> list[list[int]]:
    """Generate for token-id prompts of any lengths, ``batch_size`` at a time, in input order.

    Prompts are grouped by length (longest first) into fixed-size batches; the last batch is filled with copies of
    its last prompt, so every batch has one shape per length bucket. Batch ``j``'s key is ``fold_in(rng, j)``.
    Interventions must not carry per-example masks (use token selectors). Returns each prompt's new tokens, up to
    and including its EOS.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(iv.positions is not None for iv in interventions):
        raise ValueError("per-example intervention masks cannot follow batching; use positions='last_prompt', "
                         "'prompt' or 'generated', or call generate() directly")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("an empty prompt has no last token to continue from")
    rng = jax.random.key(secrets.randbits(32)) if rng is None else rng
    batch_size = min(batch_size, 1 << (len(sequences) - 1).bit_length())  # small calls: the next power of two
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[list[int]] = [[] for _ in sequences]
    starts = range(0, len(order), batch_size)
    for j, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not progress)):
        idx = order[start:start + batch_size]
        rows = [sequences[i] for i in idx]
        rows += [rows[-1]] * (batch_size - len(rows))
        tokens, mask = left_pad(rows, pad_token_id)
        out, lengths = generate(params, config, tokens, mask, rng=jax.random.fold_in(rng, j),
                                interventions=interventions, lora=lora, lora_scale=lora_scale,
                                activation_sharding=activation_sharding, pad_token_id=pad_token_id, **sampling_kwargs)
        out, lengths = np.asarray(out), np.asarray(lengths)
        for r, i in enumerate(idx):
            results[i] = out[r, :lengths[r]].tolist()
    return results


def generate_text(params: Params, config: LlamaConfig, tokenizer: Any, prompts: Sequence[Any], *, chat: bool = False,
                  batch_size: int = 32, rng: jax.Array | None = None, progress: bool = False,
                  interventions: Sequence[Intervention] = (), lora: Params | None = None, lora_scale: float = 1.0,
                  activation_sharding: Constrain | None = None, **sampling_kwargs: Any) -> list[str]:
    """Generate answers for text prompts (strings, or chat message lists with ``chat=True``) and decode the new
    text (special tokens skipped). Stops on :func:`tokenizer_stop_ids` unless ``eos_token_ids`` is given; other
    arguments as :func:`generate_tokens`."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    sampling_kwargs.setdefault("eos_token_ids", tokenizer_stop_ids(config, tokenizer))
    sequences = encode_prompts(tokenizer, prompts, chat=chat)
    new = generate_tokens(params, config, sequences, pad_token_id=int(tokenizer.pad_token_id), batch_size=batch_size,
                          rng=rng, progress=progress, interventions=interventions, lora=lora, lora_scale=lora_scale,
                          activation_sharding=activation_sharding, **sampling_kwargs)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]
