"""Training workloads: one optimizer step of SFT and of DPO, in JAX (the library's jitted train step) and in PyTorch
(a transformers model, the same loss written as TRL / HF write it, ``torch.optim.AdamW``).

Both sides start from the same weights and batch, use AdamW with the same lr, betas, eps and weight decay (on every
weight: ``decay_norms_and_embeddings=True`` on the JAX side, one parameter group on the PyTorch side) and clip the
gradient's global norm to 1.0. The equal-work check is the first step's loss (computed before the update).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import Side, Work, block, forward_flops, train_flops
from context import BenchContext, jax_side, torch_side

from safety_jax.train.losses import make_dpo_loss, make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.trainer import TrainState, make_train_step, stack_micro_batches

OPTIM = OptimConfig(optimizer="adamw", lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                    decay_norms_and_embeddings=True)
DPO_BETA = 0.1


def completion_mask(ctx: BenchContext) -> np.ndarray:
    """Loss mask [B, T]: 1 on completion tokens; each row's prompt is a random eighth to half of the sequence."""
    b, t = ctx.tokens.shape
    prompt = np.random.default_rng(ctx.seed + 1).integers(max(t // 8, 1), t // 2 + 1, b)
    return (np.arange(t)[None, :] >= prompt[:, None]).astype(np.int32)


def _torch_optimizer(model: Any) -> Any:
    """AdamW with :data:`OPTIM`'s settings; the fused kernel where this PyTorch has one for the device."""
    import torch

    kw = dict(lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps, weight_decay=OPTIM.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), foreach=True, **kw)


def _torch_train_sides(ctx: BenchContext, loss_fn: Any) -> list[Side]:
    """One optimizer step per run: ``loss_fn(model)`` → backward → clip → AdamW; check = the step's loss."""
    import torch

    sides = []
    for name, model in ctx.torch_models(train=True):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _torch_optimizer(model)

        def step(model=model, params=params, opt=opt) -> Any:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, OPTIM.clip_norm, foreach=True)
            opt.step()
            return loss.detach()

        sides.append(torch_side(ctx, name, step, check=lambda loss: float(loss), no_grad=False))
    return sides


def _jax_train_side(ctx: BenchContext, loss_fn: Any, batch: dict[str, np.ndarray], aux: Any) -> Side:
    """The library's jitted step (donating its state; each run feeds the returned state back)."""
    optimizer = build_optimizer(OPTIM, ctx.params)
    step = make_train_step(loss_fn, optimizer)
    state = TrainState.create(jax.tree.map(jnp.array, ctx.params), optimizer)
    batch = {k: jnp.asarray(v) for k, v in stack_micro_batches(batch, 1).items()}
    holder = {"state": state}

    def call(compiled: Any) -> Any:
        holder["state"], metrics = compiled(holder["state"], batch, aux)
        return block((holder["state"], metrics))[1]

    # The example state is only lowered (shapes), never donated: the first real call donates holder["state"].
    return jax_side(step, (state, batch, aux), call, check=lambda metrics: float(metrics["loss"]))


# ---------------------------------------------------------------------------------------------------- SFT
def sft_workload(ctx: BenchContext) -> Work:
    """One SFT step: completion-only mean token cross-entropy (float32 log-softmax, labels shifted), AdamW."""
    import torch

    config = ctx.config
    mask = completion_mask(ctx)
    side = _jax_train_side(ctx, make_sft_loss(config), {"tokens": ctx.tokens, "loss_mask": mask}, None)

    ids = ctx.torch_tensor(ctx.tokens)
    # HF's causal-LM loss layout: labels shifted left, -100 where no loss (prompt, and the last position).
    labels = np.where(mask[:, 1:] > 0, ctx.tokens[:, 1:], -100)
    labels = ctx.torch_tensor(np.pad(labels, ((0, 0), (0, 1)), constant_values=-100))
    n_target = float(mask[:, 1:].sum())

    def loss_fn(model: Any) -> Any:
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                                ignore_index=-100, reduction="sum")
        return nll / n_target

    b, t = ctx.tokens.shape
    return Work([side, *_torch_train_sides(ctx, loss_fn)], b * t, train_flops(config, b, t))


# ---------------------------------------------------------------------------------------------------- DPO
def preference_pairs(ctx: BenchContext) -> dict[str, np.ndarray]:
    """B (chosen, rejected) pairs [B, T]: a shared prompt, then different random completions."""
    mask = completion_mask(ctx)
    rng = np.random.default_rng(ctx.seed + 2)
    rejected = np.where(mask > 0, rng.integers(3, ctx.config.vocab_size, ctx.tokens.shape), ctx.tokens)
    return {"chosen_tokens": ctx.tokens, "chosen_loss_mask": mask,
            "rejected_tokens": rejected.astype(np.int32), "rejected_loss_mask": mask}


def dpo_workload(ctx: BenchContext) -> Work:
    """One DPO step (sigmoid, β = 0.1): policy and frozen reference forward on chosen and rejected (concatenated
    along the batch, as TRL's ``concatenated_forward``), reference log-probs computed inside the step, policy
    backward. tokens = 2·B·T (both sequences of each pair); FLOPs = policy fwd+bwd + reference fwd."""
    import torch

    config = ctx.config
    batch = preference_pairs(ctx)
    # Reference = the step-0 weights, a separate copy the step neither donates nor updates.
    side = _jax_train_side(ctx, make_dpo_loss(config, beta=DPO_BETA), batch, {"ref_params": ctx.params})

    ids = ctx.torch_tensor(np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]))
    mask = ctx.torch_tensor(np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])[:, 1:],
                            torch.float32)
    b = ctx.tokens.shape[0]
    reference = ctx.torch_model  # eval mode, only ever run under no_grad

    def logps(model: Any) -> Any:
        """Summed completion log-probs [2B]: log_softmax in float32, gathered at the next token."""
        logits = model(input_ids=ids).logits[:, :-1].float()
        lp = torch.gather(logits.log_softmax(-1), -1, ids[:, 1:, None])[..., 0]
        return (lp * mask).sum(-1)

    def loss_fn(model: Any) -> Any:
        with torch.no_grad():
            ref = logps(reference)
        pol = logps(model)
        z = DPO_BETA * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))
        return -torch.nn.functional.logsigmoid(z).mean()

    t = ctx.tokens.shape[1]
    flops = train_flops(config, 2 * b, t) + forward_flops(config, 2 * b, t)
    return Work([side, *_torch_train_sides(ctx, loss_fn)], 2 * b * t, flops, expect=math.log(2))
