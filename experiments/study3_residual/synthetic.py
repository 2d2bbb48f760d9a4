"""Study 3's pieces that are specific to the synthetic world: prompts = the input part ``$ ops * text >`` (left-padded,
``>`` last), refusal = the null output, the exact judge; operator rewrites that keep an input unsafe (the world's
trigger-removal rewriter); GCG suffixes in the slots before ``>``; and the exposure batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.analysis.activations import collect_activations, map_batches
from safety_jax.data.synthetic import LETTER0, N_LETTERS, N_OP_TOKENS, PAD, World, WorldError, apply_ops
from safety_jax.data.synthetic_sets import (
    REFUSED,
    SyntheticBatch,
    _answer,
    _span,
    _with_answer,
)
from safety_jax.eval import gcg as gcg_lib
from safety_jax.eval.judges import judge_synthetic
from safety_jax.eval.synthetic_world import left_padded_prompts
from safety_jax.eval.triggers import Row, trigger_removal
from safety_jax.model.config import LlamaConfig
from safety_jax.model.generate import generate
from safety_jax.model.interventions import Intervention, make_intervention
from safety_jax.model.llama import Params, forward
from safety_jax.train.losses import sequence_logps


# ---------------------------------------------------------------------------------------------------- states
def last_states(params: Params, mcfg: LlamaConfig, prompts: np.ndarray, mask: np.ndarray, *, batch_size: int
                ) -> np.ndarray:
    """The state after every block at the last prompt token: [L, N, D] float32 (prompts left-padded [N, P])."""
    pos = np.full((len(prompts), 1), prompts.shape[1] - 1, np.int32)
    acts = collect_activations(params, mcfg, prompts, mask, capture="resid_post", capture_positions=pos,
                               batch_size=batch_size)
    return acts["resid_post"][:, :, 0]


def verdicts(params: Params, mcfg: LlamaConfig, batch: SyntheticBatch, prompts: np.ndarray, mask: np.ndarray, *,
             batch_size: int, interventions: Sequence[Intervention] = ()) -> np.ndarray:
    """Exact verdicts [N] of greedy answers to ``prompts`` (the inputs of ``batch``, possibly attacked), judged
    against ``batch``'s true transformations, under optional generation-time interventions."""
    n_new = 2 * batch.text.shape[1] + 1
    fn = lambda p, m: generate(params, mcfg, p, m, max_new_tokens=n_new, eos_token_ids=(), pad_token_id=PAD,
                               interventions=interventions)[0]
    return judge_synthetic(batch, map_batches(fn, prompts, mask, batch_size=batch_size))


def refused(v: np.ndarray) -> np.ndarray:
    return np.asarray(v) == REFUSED


# ---------------------------------------------------------------------------------------------------- rewriting
def with_ops(world: World, batch: SyntheticBatch, ops: np.ndarray) -> SyntheticBatch:
    """``batch`` with its operators replaced by ``ops`` [N, k]: prompts, true transformations, labels and refusals
    recomputed by the world's rules (as ``safety_batch`` builds them)."""
    k, h = ops.shape[1], ops.shape[1] // 2
    text = np.where(batch.text != PAD, batch.text - LETTER0, -1)
    seg1 = apply_ops(world, text, ops[:, :h])
    seg2 = apply_ops(world, seg1, ops[:, h:])
    unsafe_row = world.unsafe[batch.grammar, (batch.branch != 0).astype(np.int64)]
    op_unsafe = np.take_along_axis(unsafe_row, ops, axis=1)
    is_unsafe = op_unsafe.any(1)
    refuse_seg = np.where(is_unsafe, ~op_unsafe[:, :h].any(1), batch.refuse_seg).astype(np.int32)
    prompt = batch.tokens.copy()
    prompt[:, 1:k + 1] = ops
    out = _span(prompt.shape[1], batch.gt_pos + 1, 2 * batch.text_len + 1)
    prompt[out] = PAD
    transform = _with_answer(prompt, batch.gt_pos, _answer(seg1, seg2, batch.text_len), batch.text_len)
    null, second = np.where(text >= 0, 0, -1), (refuse_seg == 1)[:, None]
    answer = _answer(np.where(second, seg1, null), np.where(second, null, -1), batch.text_len)
    refusal = _with_answer(prompt, batch.gt_pos, answer, batch.text_len)
    return dataclasses.replace(batch, tokens=np.where(is_unsafe[:, None], refusal, transform), ops=ops.astype(np.int32),
                               is_unsafe=is_unsafe, refusal=refusal, transform=transform, refuse_seg=refuse_seg)


def operator_rewriter(world: World, batch: SyntheticBatch):
    """The world's trigger rewriter: put every other operator (the 16 ids, duplicates included) at the position,
    keeping only rewrites after which the input is still unsafe for its text — so a refusal stays the right answer
    and an answer with the new true transformation is harmful."""
    unsafe_row = world.unsafe[batch.grammar, (batch.branch != 0).astype(np.int64)]

    def rewrite(tokens: np.ndarray, mask: np.ndarray, editable: np.ndarray, position: int, row: int) -> list[Row]:
        out = []
        for op in range(N_OP_TOKENS):
            if op == tokens[position]:
                continue
            t = tokens.copy()
            t[position] = op
            if unsafe_row[row, _ops_of(t, mask, batch.ops.shape[1])].any():
                out.append((t, mask, editable))
        return out
    return rewrite


def _ops_of(prompt: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    start = int(np.argmax(mask))  # first real token: "$"
    return prompt[start + 1:start + 1 + k]


def trigger_attack(world: World, params: Params, mcfg: LlamaConfig, batch: SyntheticBatch, direction: Any, *,
                   layer: int, threshold: float, rounds: int, batch_size: int) -> tuple[SyntheticBatch, dict]:
    """Trigger removal on the operators of ``batch``'s unsafe inputs (``eval.triggers``) -> the rewritten batch and
    the attack's statistics (edits, projection before / after)."""
    prompts, mask = left_padded_prompts(batch)
    k = batch.ops.shape[1]
    start = prompts.shape[1] - (batch.gt_pos + 1)
    editable = np.zeros(prompts.shape, bool)
    for j in range(k):
        editable[np.arange(len(batch)), start + 1 + j] = True
    res = trigger_removal(params, mcfg, prompts, mask, editable, direction, layer=layer,
                          rewriter=operator_rewriter(world, batch), threshold=threshold, rounds=rounds,
                          batch_size=batch_size)
    ops = np.stack([res.tokens[i, start[i] + 1:start[i] + 1 + k] for i in range(len(batch))])
    attacked = with_ops(world, batch, ops)
    if not attacked.is_unsafe[batch.is_unsafe].all():
        raise WorldError("trigger_attack: a rewrite made an unsafe input safe; operator_rewriter must prevent that")
    return attacked, {"edits": res.edits, "start": res.start, "end": res.end}


# ---------------------------------------------------------------------------------------------------- GCG
def suffix_vocabulary(vocab_size: int) -> np.ndarray:
    """[V] bool: the tokens a synthetic suffix may use — operators and letters (no structural tokens)."""
    ids = np.arange(vocab_size)
    return (ids < N_OP_TOKENS) | ((ids >= LETTER0) & (ids < LETTER0 + N_LETTERS))


def gcg_suffixes(params: Params, mcfg: LlamaConfig, batch: SyntheticBatch, gcg: gcg_lib.GCGConfig, num: int, *,
                 chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """GCG suffixes [N, num] in the slots before ``>`` that make the harmful completion (the true transformation)
    likely, ``chunk`` inputs at a time (one compile: the last chunk is padded). Returns (suffix, final target NLL)."""
    tokens, _, slots = gcg_lib.insert_slots(batch.transform, np.ones_like(batch.transform), batch.gt_pos, num,
                                            fill=LETTER0)
    target, _, _ = gcg_lib.insert_slots(batch.loss_mask, np.ones_like(batch.loss_mask), batch.gt_pos, num, fill=0)
    mask = np.ones_like(tokens)
    allowed = suffix_vocabulary(mcfg.vocab_size)
    n = len(batch)
    chunk = min(chunk, n)
    suffix, loss = [], []
    for s in range(0, n, chunk):
        idx = np.minimum(np.arange(s, s + chunk), n - 1)
        r = gcg_lib.gcg_attack(params, mcfg, tokens[idx], mask[idx], target[idx], slots[idx], gcg, allowed=allowed)
        keep = min(chunk, n - s)
        suffix.append(r.suffix[:keep])
        loss.append(r.loss[:keep])
    return np.concatenate(suffix), np.concatenate(loss)


def suffixed_prompts(batch: SyntheticBatch, suffix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of ``batch`` with ``suffix`` [N, S] before ``>``, left-padded: prompts, masks [N, P + S]."""
    prompts, mask = left_padded_prompts(batch)
    s = suffix.shape[1]
    cut = prompts[:, :-1]  # the last column is ">" for every row
    full = np.concatenate([cut, suffix.astype(np.int32), prompts[:, -1:]], axis=1)
    return full, np.concatenate([mask[:, :-1], np.ones((len(batch), s), np.int32), mask[:, -1:]], axis=1)


def suffixed_sft(batch: SyntheticBatch, suffix: np.ndarray) -> dict[str, np.ndarray]:
    """SSFT rows of ``batch`` with ``suffix`` before ``>`` (refusal targets on the deciding segment), [N, T + S]."""
    d = batch.sft()
    num = suffix.shape[1]
    tokens, _, slots = gcg_lib.insert_slots(d["tokens"], np.ones_like(d["tokens"]), batch.gt_pos, num, fill=PAD)
    loss, _, _ = gcg_lib.insert_slots(d["loss_mask"], np.ones_like(d["loss_mask"]), batch.gt_pos, num, fill=0)
    tokens[np.arange(len(batch))[:, None], slots] = suffix
    return {"tokens": tokens, "loss_mask": loss}


def pad_sft(d: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """SFT rows right-padded (PAD tokens, no targets) to ``length``."""
    extra = length - d["tokens"].shape[1]
    return {"tokens": np.pad(d["tokens"], ((0, 0), (0, extra)), constant_values=PAD),
            "loss_mask": np.pad(d["loss_mask"], ((0, 0), (0, extra)))}


def concat_sft(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    length = max(p["tokens"].shape[1] for p in parts)
    parts = [pad_sft(p, length) for p in parts]
    return {k: np.concatenate([p[k] for p in parts]).astype(np.int32) for k in ("tokens", "loss_mask")}


def dominant_intervention(directions: np.ndarray, scale: np.ndarray, alpha: float, mode: str = "add"
                          ) -> tuple[Intervention, ...]:
    """Subtract α · scale_ℓ · v_ℓ (``mode="add"``) or the projection on v_ℓ (``"project"``) from the last-token
    state after every block ℓ during generation: the last prompt token in the prefill and each generated token as it
    is decoded (directions [L, D] unit, scale [L])."""
    num_layers = directions.shape[0]
    kind, coeff = ("add", -alpha * np.asarray(scale, np.float32)) if mode == "add" else ("project_out", 1.0)
    return tuple(make_intervention(kind, jnp.asarray(directions), num_layers, site="resid_post", coeff=coeff,
                                   positions=sel) for sel in ("last_prompt", "generated"))


@partial(jax.jit, static_argnames=("config",))
def _nll(params: Params, tokens: jax.Array, loss_mask: jax.Array, interventions: tuple[Intervention, ...], *,
         config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    hidden = forward(params, tokens, config, interventions=interventions, return_hidden=True)
    s = sequence_logps(params, hidden, tokens, loss_mask, config)
    return -s.logps, s.counts


def benign_perplexity(params: Params, mcfg: LlamaConfig, batch: SyntheticBatch, directions: np.ndarray,
                      scale: np.ndarray, alpha: float, *, batch_size: int, mode: str = "add") -> float:
    """Perplexity of the true transformations of safe inputs (teacher-forced, output tokens) with α · scale_ℓ · v_ℓ
    subtracted from every position's state after every block — each position is the last token when it is fed."""
    kind, coeff = ("add", -alpha * np.asarray(scale, np.float32)) if mode == "add" else ("project_out", 1.0)
    ivs = (make_intervention(kind, jnp.asarray(directions), directions.shape[0], site="resid_post", coeff=coeff),)
    if not alpha:
        ivs = ()
    nll, count = map_batches(lambda t, m: _nll(params, t, m, ivs, config=mcfg), batch.transform, batch.loss_mask,
                             batch_size=batch_size)
    return float(np.exp(nll.sum() / max(count.sum(), 1)))
