"""Training losses: one ``loss_fn(params, batch, aux) -> (loss, metrics)`` per method, all on :func:`sequence_logps`.

Conventions (shared/methods/05): position t's logits predict token t+1; ``loss_mask: [B, T]`` marks *target* tokens
(``loss_mask[:, 0]`` is ignored: nothing predicts the first token); log-softmax and every reduction in float32.

Batch keys. A sequence group with prefix ``p`` is ``{p}tokens [B, T]``, ``{p}loss_mask [B, T]`` and optionally
``{p}attention_mask [B, T]`` (1 = real token), ``{p}positions [B, T]`` and ``{p}loss_normalizer []``. Groups:
``""`` (SFT data / the forget set), ``"retain_"``, ``"chosen_"``, ``"rejected_"``. Reference log-probs (summed, not
normalised) come as ``ref_{p}logps [B]`` (see :func:`precompute_reference_logps`) or, when absent, are computed from
frozen params passed as ``aux["ref_params"]`` (under ``stop_gradient``).

Sequence-level means skip filler rows where the batch has ``example_mask [B]`` (0 = filler, as ``data.batches``
makes); token-level terms rely on filler rows having an all-zero ``loss_mask``.

Gradient accumulation: the trainer *averages* loss and grads over micro-batches. Sequence-level losses (DPO, NPO, RMU,
the synthetic variants) are per-sequence means, which average correctly over equal-size micro-batches. Token-level
means (SFT, gradient ascent/difference, the retain NLL) divide their summed NLL by ``{p}loss_normalizer`` when the batch
carries it: the total number of target tokens of the whole optimizer step divided by the number of micro-batches, so
that the average over micro-batches is ``Σ NLL / Σ tokens`` (TRL/HF's fix for accumulation); see
:func:`add_loss_normalizers`. Without it, each micro-batch is normalised by its own token count.

LoRA: when ``params`` carries adapters under ``"lora"`` (``safety_jax.model.lora.combine``), pass the factory
``lora_cfg`` for the scale.

Memory: no loss materialises more than one chunk of [B, T, V] float32 logits. The model returns its final hidden
states and :func:`sequence_logps` applies the head ``logits_chunk`` tokens at a time (default: as many as fit
``LOGITS_CHUNK_BYTES``); with several chunks each runs inside a checkpointed ``lax.map``, so the backward recomputes
its logits instead of storing them all, and a batch that fits one chunk is not recomputed. ``remat`` (every factory)
is a name from ``safety_jax.model.llama.REMAT_POLICIES`` (``True`` / ``False`` = ``"full"`` / ``"none"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, forward, logits_from_hidden
from safety_jax.model.lora import LoraConfig, split

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, Mapping[str, Any] | None], tuple[jax.Array, Metrics]]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
LENGTH_NORMS = ("none", "tokens", "full")
# Float32 logits alive at a time (counted over the global batch, so each data-parallel device holds its share):
# 2048 tokens at V = 32000, 523 at Llama-3's 128256.
LOGITS_CHUNK_BYTES = 256 << 20


def default_logits_chunk(vocab_size: int) -> int:
    """Tokens per head chunk that keep one chunk's float32 logits within ``LOGITS_CHUNK_BYTES``."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


# ---------------------------------------------------------------------------------------------------- log-probs
def _at_least_f32(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _logit_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One read of logits [..., V] against targets [...]: the target log-prob, the mean logit over the vocabulary
    and the argmax hit (1.0 / 0.0), each [...] in (at least) float32; the last two carry no gradient."""
    logits = _at_least_f32(logits)
    target = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    lp = target - jax.nn.logsumexp(logits, axis=-1)
    mean = jax.lax.stop_gradient(jnp.mean(logits, axis=-1))
    hit = jax.lax.stop_gradient((jnp.argmax(logits, axis=-1) == targets).astype(lp.dtype))
    return lp, mean, hit


def token_logps(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``out[b, t] = log softmax(logits[b, t-1])[tokens[b, t]]`` in (at least) float32, ``out[:, 0] = 0``: aligned
    with tokens. For callers holding full logits; the losses use :func:`sequence_logps`.

    logits: [B, T, V]; tokens: [B, T] -> [B, T].
    """
    lp, _, _ = _logit_stats(logits[:, :-1], tokens[:, 1:])
    return jnp.pad(lp, ((0, 0), (1, 0)))


def target_mask(loss_mask: jax.Array) -> jax.Array:
    """``loss_mask`` as float32 with position 0 zeroed (no logits predict the first token)."""
    return jnp.asarray(loss_mask, jnp.float32).at[:, 0].set(0.0)


class SequenceLogps(NamedTuple):
    """Per-sequence sums over the target tokens (:func:`target_mask` weights ``m``), each [B] float32."""

    logps: jax.Array       # Σ_t m_t · log p(tokens[t] | tokens[<t])
    counts: jax.Array      # Σ_t m_t
    logit_sums: jax.Array  # Σ_t m_t · mean_v logits[t-1, v]   (no gradient)
    hits: jax.Array        # Σ_t m_t · [argmax_v logits[t-1, v] = tokens[t]]   (no gradient)


def sequence_logps(params: Params, hidden: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                   config: LlamaConfig, *, chunk: int | None = None) -> SequenceLogps:
    """Target log-probs, the mean logit and the argmax hits of every sequence in one pass over the head, ``chunk``
    tokens (about ``B × chunk // B``, whole rows of a sequence slice so batch sharding is kept) at a time.

    params: base params holding ``lm_head`` (or the tied ``embed``); hidden: [B, T, D] final normed hidden states
    (``forward(..., return_hidden=True)``); tokens, loss_mask: [B, T]; chunk: tokens per chunk (None: the
    :func:`default_logits_chunk` of the vocabulary). With several chunks each one's logits are recomputed in the
    backward, so at most one chunk of [B, ·, V] float32 logits is alive at a time.
    """
    chunk = default_logits_chunk(config.vocab_size) if chunk is None else chunk
    b, t = tokens.shape
    d = hidden.shape[-1]
    n = -(-t // max(1, chunk // b))  # the fewest chunks of at most max(1, chunk // B) positions
    tc = -(-t // n)                  # spread evenly: less than n padded positions in all
    # Position t predicts tokens[t + 1]; the last position predicts nothing (target 0, weight 0).
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, n * tc - t + 1)))
    h = jnp.pad(hidden, ((0, 0), (0, n * tc - t), (0, 0)))
    h = h.reshape(b, n, tc, d).swapaxes(0, 1)
    targets = targets.reshape(b, n, tc).swapaxes(0, 1)

    def one_chunk(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        hc, yc = xs
        return _logit_stats(logits_from_hidden(params, hc, config), yc)

    # One chunk: its logits are the whole (bounded) buffer, kept for the backward instead of recomputed.
    stats = jax.lax.map(jax.checkpoint(one_chunk) if n > 1 else one_chunk, (h, targets))  # each [n, B, tc]
    lp, mean, hit = (jnp.pad(x.swapaxes(0, 1).reshape(b, n * tc)[:, : t - 1], ((0, 0), (1, 0))) for x in stats)
    m = target_mask(loss_mask)
    return SequenceLogps(jnp.sum(lp * m, axis=-1), jnp.sum(m, axis=-1), jnp.sum(mean * m, axis=-1),
                         jnp.sum(hit * m, axis=-1))


def masked_mean_logits(logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean logit over the vocabulary and the positions that predict a target token (TRL's ``logits/chosen``), for
    callers holding full logits [B, T, V]; the losses get it from :func:`sequence_logps`."""
    m = target_mask(loss_mask)[:, 1:]
    per_pos = jnp.mean(_at_least_f32(logits[:, :-1]), axis=-1)
    return jnp.sum(per_pos * m) / jnp.maximum(jnp.sum(m), 1.0)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.sum(num) / jnp.maximum(jnp.sum(den), 1.0)


def example_mean(x: jax.Array, batch: Batch) -> jax.Array:
    """Mean of a per-sequence quantity [B] over real examples: ``example_mask`` (0 on filler rows) weights it."""
    if "example_mask" not in batch:
        return jnp.mean(x)
    w = jnp.asarray(batch["example_mask"], jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def add_loss_normalizers(micro_batches: Mapping[str, Any]) -> dict[str, Any]:
    """For batches stacked ``[n_micro, B, T]``: add ``{p}loss_normalizer [n_micro]`` = total target tokens / n_micro
    for every ``{p}loss_mask``, so averaging token-mean losses over micro-batches gives ``Σ NLL / Σ tokens``.

    Traceable: the train step calls it on the global (sharded) batch, so every host divides by the same count."""
    out = dict(micro_batches)
    for key, mask in micro_batches.items():
        if key.endswith("loss_mask"):
            n_micro = mask.shape[0]
            total = jnp.sum(jnp.asarray(mask)[:, :, 1:].astype(jnp.float32))
            out[key[: -len("loss_mask")] + "loss_normalizer"] = jnp.full((n_micro,), total / n_micro, jnp.float32)
    return out


# ---------------------------------------------------------------------------------------------------- the model call
def _check_lora(lora_cfg: LoraConfig | None) -> None:
    """LoRA dropout draws from ``batch["dropout_rng"]`` (raw key data the trainer adds per micro-batch)."""


def _group_inputs(batch: Batch, prefix: str) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    if prefix + "tokens" not in batch:
        raise KeyError(f"batch lacks '{prefix}tokens' (keys: {sorted(batch)})")
    return batch[prefix + "tokens"], batch.get(prefix + "attention_mask"), batch.get(prefix + "positions")


def _check_chunk(logits_chunk: int | None) -> None:
    if logits_chunk is None:
        return
    if isinstance(logits_chunk, bool) or not isinstance(logits_chunk, int) or logits_chunk < 1:
        raise ValueError(f"logits_chunk={logits_chunk!r} must be a positive integer (tokens per head chunk)")


def _hidden(params: Params, tokens, attention_mask, positions, config: LlamaConfig, lora_cfg: LoraConfig | None,
            remat: bool | str, **kw) -> Any:
    """``forward(..., return_hidden=True)`` of the base params with their adapters: [B, T, D] (and captures)."""
    base, lora = split(params)
    if lora is not None and lora_cfg is None:
        raise ValueError("params carry LoRA adapters: build the loss with lora_cfg=LoraConfig(...) for the scale")
    scale = lora_cfg.scale if lora is not None else 1.0
    rng = kw.pop("dropout_rng", None)
    dropout = lora_cfg.dropout if (lora is not None and rng is not None) else 0.0
    return forward(base, tokens, config, attention_mask=attention_mask, positions=positions, lora=lora,
                   lora_scale=scale, remat=remat, lora_dropout=dropout, dropout_rng=rng if dropout else None,
                   return_hidden=True, **kw)


def _group_logps(params: Params, tokens, loss_mask, attention_mask, positions, config: LlamaConfig,
                 lora_cfg: LoraConfig | None, remat: bool | str, chunk: int,
                 dropout_rng: jax.Array | None = None, perturb: Mapping[str, jax.Array] | None = None) -> SequenceLogps:
    """:func:`sequence_logps` of one group through the model (adapters included; ``perturb`` as ``forward``'s)."""
    hidden = _hidden(params, tokens, attention_mask, positions, config, lora_cfg, remat, dropout_rng=dropout_rng,
                     perturb=perturb)
    return sequence_logps(split(params)[0], hidden, tokens, loss_mask, config, chunk=chunk)


def _pair_inputs(batch: Batch, a: str, b: str) -> tuple[jax.Array, jax.Array, Any, Any]:
    """Concatenate two groups along the batch (one forward, as TRL's ``concatenated_forward``), right-padding the
    shorter one; padding sits after every real token, so causal attention never sees it."""
    ta, tb = batch[a + "tokens"], batch[b + "tokens"]
    t = max(ta.shape[1], tb.shape[1])

    def pad(x):
        return jnp.pad(jnp.asarray(x), ((0, 0), (0, t - x.shape[1])))

    tokens = jnp.concatenate([pad(ta), pad(tb)])
    mask = jnp.concatenate([pad(batch[a + "loss_mask"]), pad(batch[b + "loss_mask"])])
    attn = pos = None
    if a + "attention_mask" in batch or b + "attention_mask" in batch:
        attn = jnp.concatenate([pad(batch.get(g + "attention_mask", jnp.ones(x.shape, jnp.int32)))
                                for g, x in ((a, ta), (b, tb))])
    if a + "positions" in batch or b + "positions" in batch:
        pos = jnp.concatenate([pad(batch.get(g + "positions", jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)))
                               for g, x in ((a, ta), (b, tb))])
    return tokens, mask, attn, pos


def _missing_ref(key: str) -> ValueError:
    return ValueError(f"reference log-probs missing: put batch['{key}'] (precompute_reference_logps) or pass frozen "
                      "params as aux['ref_params']")


# ---------------------------------------------------------------------------------------------------- SFT and GA / GD
def _token_nll(params: Params, batch: Batch, prefix: str, config, lora_cfg, remat,
               chunk: int) -> tuple[jax.Array, Metrics]:
    """Summed completion NLL / normaliser (``{p}loss_normalizer`` or this batch's target-token count).

    ``{p}perturb`` in the batch (``{site: [L, B, T, D]}``) shifts the group's hidden outputs (Vaccine)."""
    tokens, attn, pos = _group_inputs(batch, prefix)
    out = _group_logps(params, tokens, batch[prefix + "loss_mask"], attn, pos, config, lora_cfg, remat, chunk,
                       batch.get("dropout_rng"), batch.get(prefix + "perturb"))
    count = jnp.sum(out.counts)
    denom = batch.get(prefix + "loss_normalizer", jnp.maximum(count, 1.0))
    return -jnp.sum(out.logps) / denom, {"num_target_tokens": count, "token_accuracy": _ratio(out.hits, out.counts)}


def make_sft_loss(config: LlamaConfig, *, lora_cfg: LoraConfig | None = None, remat: bool | str = False,
                  logits_chunk: int | None = None) -> LossFn:
    """SFT: mean token cross-entropy over completion tokens, ``−Σ_t m_t log p(x_t | x_<t) / Σ_t m_t``.

    Batch: ``tokens``, ``loss_mask`` (+ ``attention_mask``, ``positions``, ``loss_normalizer``)."""
    _check_lora(lora_cfg)
    _check_chunk(logits_chunk)

    def loss_fn(params: Params, batch: Batch, aux: Mapping[str, Any] | None = None) -> tuple[jax.Array, Metrics]:
        loss, m = _token_nll(params, batch, "", config, lora_cfg, remat, logits_chunk)
        return loss, {"loss": loss, **m}

    return loss_fn


def make_gradient_ascent_loss(config: LlamaConfig, *, forget_weight: float = 1.0, retain_weight: float = 0.0,
                              lora_cfg: LoraConfig | None = None, remat: bool | str = False,
                              logits_chunk: int | None = None) -> LossFn:
    """Gradient ascent / difference (open-unlearning GradAscent, GradDiff): ``−γ·NLL(forget) + α·NLL(retain)``, both
    mean token NLL; γ = ``forget_weight``, α = ``retain_weight`` (0: pure gradient ascent, no retain data needed).

    Batch: the forget group ``tokens``, ``loss_mask``, … and, when α ≠ 0, ``retain_tokens``, ``retain_loss_mask``, …"""
    _check_lora(lora_cfg)
    _check_chunk(logits_chunk)

    def loss_fn(params: Params, batch: Batch, aux: Mapping[str, Any] | None = None) -> tuple[jax.Array, Metrics]:
        forget_nll, _ = _token_nll(params, batch, "", config, lora_cfg, remat, logits_chunk)
        loss = -forget_weight * forget_nll
        metrics = {"forget_nll": forget_nll}
        if retain_weight:
            retain_nll, _ = _token_nll(params, batch, "retain_", config, lora_cfg, remat, logits_chunk)
            loss = loss + retain_weight * retain_nll
            metrics["retain_nll"] = retain_nll
        return loss, {"loss": loss, **metrics}

    return loss_fn


def make_gradient_difference_loss(config: LlamaConfig, *, forget_weight: float = 1.0, retain_weight: float = 1.0,
                                  lora_cfg: LoraConfig | None = None, remat: bool | str = False,
                                  logits_chunk: int | None = None) -> LossFn:
    """Gradient difference: :func:`make_gradient_ascent_loss` with a retain term (open-unlearning γ = α = 1)."""
    return make_gradient_ascent_loss(config, forget_weight=forget_weight, retain_weight=retain_weight,
                                     lora_cfg=lora_cfg, remat=remat, logits_chunk=logits_chunk)


# ---------------------------------------------------------------------------------------------------- DPO
def dpo_loss_from_logps(chosen: jax.Array, rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array, *,
                        beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                        beta_rejected: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO losses [B] and the rewards ``β_w·(log π − log π_ref)`` on chosen / ``β_l·(…)`` on rejected.

    With Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) (TRL, Rafailov et al. 2023 eq. 7):
    sigmoid ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)`` (ε = label_smoothing, cDPO); hinge ``relu(1 − βΔ)`` (SLiC);
    ipo ``(Δ − 1/(2β))²`` (Azar et al. 2023 eq. 17; pass length-normalised log-probs). ``beta_rejected`` (the
    synthetic study's β_l) replaces βΔ by ``β_w·r_w − β_l·r_l``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"DPO loss_type={loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    beta_l = beta if beta_rejected is None else beta_rejected
    r_w, r_l = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "ipo":
        if beta_rejected is not None:
            raise ValueError("the IPO loss has a single beta; beta_rejected applies to sigmoid and hinge only")
        losses = (r_w - r_l - 1.0 / (2.0 * beta)) ** 2
    else:
        z = beta * r_w - beta_l * r_l
        if loss_type == "sigmoid":
            losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
        else:
            losses = jax.nn.relu(1.0 - z)
    return losses, jax.lax.stop_gradient(beta * r_w), jax.lax.stop_gradient(beta_l * r_l)


def _pair_logps(params, batch, config, lora_cfg, remat, chunk) -> tuple[jax.Array, ...]:
    """Summed log-probs and counts of the chosen and rejected groups in one forward, plus the two mean logits."""
    tokens, mask, attn, pos = _pair_inputs(batch, "chosen_", "rejected_")
    out = _group_logps(params, tokens, mask, attn, pos, config, lora_cfg, remat, chunk, batch.get("dropout_rng"))
    b = batch["chosen_tokens"].shape[0]
    mean_logits = (_ratio(out.logit_sums[:b], out.counts[:b]), _ratio(out.logit_sums[b:], out.counts[b:]))
    return out.logps[:b], out.logps[b:], out.counts[:b], out.counts[b:], *mean_logits


def _pair_ref_logps(batch, aux, config, lora_cfg, remat, chunk) -> tuple[jax.Array, jax.Array]:
    if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
        return jax.lax.stop_gradient(batch["ref_chosen_logps"]), jax.lax.stop_gradient(batch["ref_rejected_logps"])
    if aux is None or "ref_params" not in aux:
        raise _missing_ref("ref_chosen_logps")
    out = _pair_logps(jax.lax.stop_gradient(aux["ref_params"]), batch, config, lora_cfg, remat, chunk)
    return jax.lax.stop_gradient(out[0]), jax.lax.stop_gradient(out[1])


def make_dpo_loss(config: LlamaConfig, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  beta_rejected: float | None = None, length_norm: str | None = None, rpo_alpha: float = 0.0,
                  lora_cfg: LoraConfig | None = None, remat: bool | str = False,
                  logits_chunk: int | None = None) -> LossFn:
    """DPO with TRL's loss types and metric names (see :func:`dpo_loss_from_logps`).

    rpo_alpha: TRL's ``rpo_alpha`` (Pang et al. 2024, RPO): adds ``α · NLL(chosen)``, the chosen completion's token
    NLL averaged over every chosen completion token of the batch (an SFT anchor on the preferred answer); 0 = plain DPO.

    length_norm: how per-sequence log-probs are scaled before Δ — ``"none"`` (summed, TRL sigmoid/hinge),
    ``"tokens"`` (÷ completion tokens; TRL's IPO, the default for ipo), ``"full"`` (÷ the number of predicted positions
    T−1, the synthetic study's "divided by the full length"). Rewards and ``logps/*`` metrics are on the scaled values.

    Batch: ``chosen_tokens``, ``chosen_loss_mask``, ``rejected_tokens``, ``rejected_loss_mask`` (+ their
    ``attention_mask`` / ``positions``) and ``ref_chosen_logps``, ``ref_rejected_logps`` — or aux ``ref_params``.
    """
    _check_lora(lora_cfg)
    _check_chunk(logits_chunk)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"DPO loss_type={loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    length_norm = length_norm or ("tokens" if loss_type == "ipo" else "none")
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"DPO length_norm={length_norm!r}; choose one of {LENGTH_NORMS}")
    if not rpo_alpha >= 0.0:
        raise ValueError(f"DPO rpo_alpha={rpo_alpha} must be >= 0 (0 disables the chosen-NLL term)")

    def normalise(x, counts, full_len):
        if length_norm == "tokens":
            return x / jnp.maximum(counts, 1.0)
        return x / full_len if length_norm == "full" else x

    def loss_fn(params: Params, batch: Batch, aux: Mapping[str, Any] | None = None) -> tuple[jax.Array, Metrics]:
        pc, pr, nc, nr, logits_c, logits_r = _pair_logps(params, batch, config, lora_cfg, remat, logits_chunk)
        rc, rr = _pair_ref_logps(batch, aux, config, lora_cfg, remat, logits_chunk)
        full_c, full_r = batch["chosen_tokens"].shape[1] - 1, batch["rejected_tokens"].shape[1] - 1
        extra = {}
        if rpo_alpha:  # chosen-token NLL averaged over the batch's chosen tokens, before any length normalisation
            w = jnp.asarray(batch.get("example_mask", jnp.ones_like(nc)), jnp.float32)
            extra["nll_loss"] = -jnp.sum(w * pc) / jnp.maximum(jnp.sum(w * nc), 1.0)
        pc, rc = normalise(pc, nc, full_c), normalise(rc, nc, full_c)
        pr, rr = normalise(pr, nr, full_r), normalise(rr, nr, full_r)
        losses, rew_c, rew_r = dpo_loss_from_logps(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                   label_smoothing=label_smoothing, beta_rejected=beta_rejected)
        mean = lambda x: example_mean(jax.lax.stop_gradient(x), batch)
        loss = example_mean(losses, batch)
        if rpo_alpha:
            loss = loss + rpo_alpha * extra["nll_loss"]
            extra["nll_loss"] = jax.lax.stop_gradient(extra["nll_loss"])
        return loss, {
            "loss": loss, **extra, "rewards/chosen": mean(rew_c), "rewards/rejected": mean(rew_r),
            "rewards/margins": mean(rew_c - rew_r), "rewards/accuracies": mean((rew_c > rew_r) * 1.0),
            "logps/chosen": mean(pc), "logps/rejected": mean(pr),
            "logits/chosen": jax.lax.stop_gradient(logits_c), "logits/rejected": jax.lax.stop_gradient(logits_r)}

    return loss_fn


def make_synthetic_dpo_loss(config: LlamaConfig, *, beta_chosen: float = 0.1, beta_rejected: float = 0.01,
                            lora_cfg: LoraConfig | None = None, remat: bool | str = False,
                            logits_chunk: int | None = None) -> LossFn:
    """The synthetic study's DPO (Jain et al. 2024, ``dpo/trainer_dpo.py``): ``−log σ(β_w·r_w − β_l·r_l)`` with
    ``r = (log π − log π_ref) / (T−1)``, the summed log-likelihood over the full target length."""
    return make_dpo_loss(config, beta=beta_chosen, beta_rejected=beta_rejected, loss_type="sigmoid",
                         length_norm="full", lora_cfg=lora_cfg, remat=remat, logits_chunk=logits_chunk)


# ---------------------------------------------------------------------------------------------------- NPO
def npo_loss_from_nll(nll: jax.Array, ref_nll: jax.Array, *, beta: float) -> jax.Array:
    """NPO per sequence (Zhang et al. 2024 eq. 3, open-unlearning): ``−(2/β) log σ(β·(NLL_θ − NLL_ref))`` on summed
    NLLs; equals ``(2/β) log 2`` at θ = ref and tends to gradient ascent as β → 0."""
    return -(2.0 / beta) * jax.nn.log_sigmoid(beta * (nll - ref_nll))


def make_npo_loss(config: LlamaConfig, *, beta: float = 0.1, forget_weight: float = 1.0, retain_weight: float = 0.0,
                  lora_cfg: LoraConfig | None = None, remat: bool | str = False,
                  logits_chunk: int | None = None) -> LossFn:
    """NPO on the forget set (mean over sequences), optionally ``+ α·NLL(retain)`` (NPO+RT; open-unlearning α = 1).

    Batch: ``tokens``, ``loss_mask`` (+ …) of the forget set; ``ref_logps`` [B] or aux ``ref_params``; retain group
    ``retain_*`` when ``retain_weight`` ≠ 0."""
    _check_lora(lora_cfg)
    _check_chunk(logits_chunk)

    def loss_fn(params: Params, batch: Batch, aux: Mapping[str, Any] | None = None) -> tuple[jax.Array, Metrics]:
        tokens, attn, pos = _group_inputs(batch, "")
        group = lambda p: _group_logps(p, tokens, batch["loss_mask"], attn, pos, config, lora_cfg, remat,
                                       logits_chunk).logps
        logps = group(params)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif aux is not None and "ref_params" in aux:
            ref = group(jax.lax.stop_gradient(aux["ref_params"]))
        else:
            raise _missing_ref("ref_logps")
        ref = jax.lax.stop_gradient(ref)
        npo = example_mean(npo_loss_from_nll(-logps, -ref, beta=beta), batch)
        loss = forget_weight * npo
        metrics = {"npo_loss": npo, "forget_nll": -example_mean(jax.lax.stop_gradient(logps), batch),
                   "forget_log_ratio": example_mean(jax.lax.stop_gradient(logps - ref), batch)}
        if retain_weight:
            retain_nll, _ = _token_nll(params, batch, "retain_", config, lora_cfg, remat, logits_chunk)
            loss = loss + retain_weight * retain_nll
            metrics["retain_nll"] = retain_nll
        return loss, {"loss": loss, **metrics}

    return loss_fn


# ---------------------------------------------------------------------------------------------------- RMU
def rmu_control_vector(hidden_size: int, steering_coeff: float, seed: int = 0) -> np.ndarray:
    """The fixed RMU target ``c·u/‖u‖`` with ``u ~ U[0, 1)^D`` (Li et al. 2024, WMDP): [D] float32."""
    u = np.random.default_rng(seed).random(hidden_size)
    return (steering_coeff * u / np.linalg.norm(u)).astype(np.float32)


def activation_mse(acts: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Per sequence ``Σ_t m_t · mean_d (a_td − y_td)² / Σ_t m_t`` [B] (open-unlearning's RMU
    ``compute_activation_loss`` before its batch mean). acts: [B, T, D]; target: broadcastable to acts; mask: [B, T].
    """
    sq = jnp.mean((_at_least_f32(acts) - _at_least_f32(target)) ** 2, axis=-1)
    m = jnp.asarray(mask, jnp.float32)
    return jnp.sum(sq * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def layer_activations(params: Params, batch: Batch, prefix: str, layer: int, config: LlamaConfig, *,
                      lora_cfg: LoraConfig | None = None, remat: bool | str = False) -> jax.Array:
    """Block output (``resid_post``) of ``layer`` for a group: [B, T, D] float32, running only layers 0..layer."""
    base, lora = split(params)
    cut = lambda tree: jax.tree.map(lambda w: w[: layer + 1], tree)
    sub = {**base, "layers": cut(base["layers"])}
    if lora is not None:
        sub["lora"] = {**lora, "layers": cut(lora["layers"])}
    tokens, attn, pos = _group_inputs(batch, prefix)
    _, cap = _hidden(sub, tokens, attn, pos, config, lora_cfg, remat, capture="resid_post")
    return cap["resid_post"][-1].astype(jnp.float32)


def make_rmu_loss(config: LlamaConfig, *, layer: int = 7, steering_coeff: float = 20.0, alpha: float = 100.0,
                  seed: int = 0, control_vector: np.ndarray | None = None, lora_cfg: LoraConfig | None = None,
                  remat: bool | str = False, logits_chunk: int | None = None) -> LossFn:
    """RMU (Li et al. 2024, WMDP; open-unlearning masking): at ``layer``'s output,
    ``MSE(h_θ(forget), c·u/‖u‖) + α·MSE(h_θ(retain), h_frozen(retain))``, each over the ``loss_mask`` positions.

    Defaults follow the WMDP script (layer 7, c = 20, α = 100). Train only chosen MLP weights (e.g. OptimConfig
    ``trainable=("mlp.down@5-7",)``). Batch: forget ``tokens``, ``loss_mask``; ``retain_tokens``,
    ``retain_loss_mask``; and ``ref_retain_activations [B, T, D]`` or aux ``ref_params``. ``logits_chunk`` is
    accepted for a uniform factory interface and unused (RMU reads no logits).
    """
    _check_lora(lora_cfg)
    _check_chunk(logits_chunk)
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"RMU layer={layer} out of range for {config.num_hidden_layers} layers")
    if control_vector is None:
        control_vector = rmu_control_vector(config.hidden_size, steering_coeff, seed)
    target = jnp.asarray(control_vector, jnp.float32)

    def loss_fn(params: Params, batch: Batch, aux: Mapping[str, Any] | None = None) -> tuple[jax.Array, Metrics]:
        acts = layer_activations(params, batch, "", layer, config, lora_cfg=lora_cfg, remat=remat)
        forget = example_mean(activation_mse(acts, target, batch["loss_mask"]), batch)
        retain_acts = layer_activations(params, batch, "retain_", layer, config, lora_cfg=lora_cfg, remat=remat)
        if "ref_retain_activations" in batch:
            ref = batch["ref_retain_activations"]
        elif aux is not None and "ref_params" in aux:
            ref = layer_activations(aux["ref_params"], batch, "retain_", layer, config, lora_cfg=lora_cfg)
        else:
            raise ValueError("RMU needs the frozen model's retain activations: batch['ref_retain_activations'] or "
                             "aux['ref_params']")
        retain = example_mean(activation_mse(retain_acts, jax.lax.stop_gradient(ref), batch["retain_loss_mask"]), batch)
        loss = forget + alpha * retain
        norm = jnp.sum(jnp.linalg.norm(jax.lax.stop_gradient(acts), axis=-1) * batch["loss_mask"]) / jnp.maximum(
            jnp.sum(batch["loss_mask"]), 1)
        return loss, {"loss": loss, "rmu/forget_loss": forget, "rmu/retain_loss": retain,
                      "rmu/forget_activation_norm": norm}

    return loss_fn


# -------------------------------------------------------------------------------------------- synthetic unlearning
def make_synthetic_unlearning_loss(config: LlamaConfig, *, chosen_weight: float = 1.0, rejected_weight: float = 0.1,
                                   lora_cfg: LoraConfig | None = None, remat: bool | str = False,
                                   logits_chunk: int | None = None) -> LossFn:
    """The synthetic study's unlearning (Jain et al. 2024, ``unlearn/trainer_unlearn.py``):
    ``mean_b [w_c·ℓ(chosen) − w_r·ℓ(rejected)]``, ℓ = summed completion NLL / (T−1), w_c = 1, w_r = 0.1.

    Batch: ``chosen_tokens``, ``chosen_loss_mask``, ``rejected_tokens``, ``rejected_loss_mask`` (+ …)."""
    _check_lora(lora_cfg)
    _check_chunk(logits_chunk)

    def loss_fn(params: Params, batch: Batch, aux: Mapping[str, Any] | None = None) -> tuple[jax.Array, Metrics]:
        pc, pr, *_ = _pair_logps(params, batch, config, lora_cfg, remat, logits_chunk)
        nll_c = -pc / (batch["chosen_tokens"].shape[1] - 1)
        nll_r = -pr / (batch["rejected_tokens"].shape[1] - 1)
        loss = example_mean(chosen_weight * nll_c - rejected_weight * nll_r, batch)
        return loss, {"loss": loss, "nll/chosen": example_mean(jax.lax.stop_gradient(nll_c), batch),
                      "nll/rejected": example_mean(jax.lax.stop_gradient(nll_r), batch)}

    return loss_fn


# ---------------------------------------------------------------------------------------------------- reference pass
def precompute_reference_logps(params: Params, config: LlamaConfig, batches: Iterable[Batch], *,
                               lora_cfg: LoraConfig | None = None,
                               logits_chunk: int | None = None) -> list[dict[str, Any]]:
    """One jitted pass of the frozen reference over the data: each batch comes back with ``ref_{p}logps [B]``
    (summed log-probs, numpy float32) added for every group ``p`` in ``chosen_``, ``rejected_`` and ``""`` present.

    Compiled once per batch shape (across calls too); the results stay on the device until the pass ends (one host
    transfer, no per-batch sync)."""
    _check_chunk(logits_chunk)
    out = []
    for batch in batches:
        new = dict(batch)
        for prefix in ("chosen_", "rejected_", ""):
            if prefix + "tokens" in batch:
                tokens, attn, pos = _group_inputs(batch, prefix)
                new[f"ref_{prefix}logps"] = _reference_logps(params, tokens, batch[prefix + "loss_mask"], attn, pos,
                                                             config, lora_cfg, logits_chunk)
        out.append(new)
    return jax.tree.map(np.asarray, jax.device_get(out))


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _reference_logps(params, tokens, loss_mask, attn, pos, config, lora_cfg, logits_chunk) -> jax.Array:
    return _group_logps(params, tokens, loss_mask, attn, pos, config, lora_cfg, False, logits_chunk).logps


LOSSES: dict[str, Callable[..., LossFn]] = {
    "sft": make_sft_loss, "dpo": make_dpo_loss, "synthetic_dpo": make_synthetic_dpo_loss,
    "gradient_ascent": make_gradient_ascent_loss, "gradient_difference": make_gradient_difference_loss,
    "npo": make_npo_loss, "rmu": make_rmu_loss, "synthetic_unlearning": make_synthetic_unlearning_loss,
}


def make_loss(name: str, config: LlamaConfig, **kwargs: Any) -> LossFn:
    """The loss called ``name`` (a key of :data:`LOSSES`) built with its factory's keyword options."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name](config, **kwargs)
