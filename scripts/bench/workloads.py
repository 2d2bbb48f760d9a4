"""Benchmark workloads: each builds a :class:`common.Work` — one piece of work done in JAX and in PyTorch.

Inference (this file): ``forward``, ``generate``. Training (``train_workloads``): ``sft``, ``dpo``. Analysis
(``analysis_workloads``): ``wanda``, ``svd``. :data:`WORKLOADS` is the registry ``run.py`` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from analysis_workloads import svd_workload, wanda_workload
from common import Side, Work, block, device_peak_memory_mb, forward_flops
from context import BenchContext, jax_side, torch_side
from train_workloads import dpo_workload, sft_workload

from safety_jax.model.generate import generate
from safety_jax.model.llama import forward

__all__ = ["WORKLOADS", "BenchContext"]


def _inference_torch_sides(ctx: BenchContext, fn: Callable[[Any], Any], check: Callable[[Any], float]) -> list[Side]:
    """The eager PyTorch side (and a torch.compile side when asked for) of an inference workload."""
    return [torch_side(ctx, name, lambda m=model: fn(m), check) for name, model in ctx.torch_models()]


def forward_workload(ctx: BenchContext) -> Work:
    """Logits for a [B, T] batch."""
    config = ctx.config
    tokens = jnp.asarray(ctx.tokens)
    fwd = jax.jit(lambda params, tokens: forward(params, tokens, config))
    side = jax_side(fwd, (ctx.params, tokens), lambda f: block(f(ctx.params, tokens)),
                    check=lambda out: float(jnp.mean(out[:, -1])))
    t_tokens = ctx.torch_tensor(ctx.tokens)
    sides = [side, *_inference_torch_sides(ctx, lambda m: m(input_ids=t_tokens).logits,
                                           lambda out: float(out[:, -1].float().mean()))]
    b, t = ctx.tokens.shape
    return Work(sides, b * t, forward_flops(config, b, t))


def generate_workload(ctx: BenchContext) -> Work:
    """Prefill the batch, then decode ``new_tokens`` tokens greedily (no early stop); tokens = new tokens."""
    import torch

    config = ctx.config
    b, t = ctx.tokens.shape
    n = ctx.new_tokens
    prompt = jnp.asarray(ctx.tokens)
    mask = jnp.ones_like(prompt)
    holder: dict[str, Any] = {}

    def run_jax() -> None:
        holder["out"] = block(generate(ctx.params, config, prompt, mask, max_new_tokens=n, eos_token_ids=(),
                                       pad_token_id=0)[0])

    t_tokens = ctx.torch_tensor(ctx.tokens)

    def torch_gen(model: Any) -> Any:
        return model.generate(input_ids=t_tokens, attention_mask=torch.ones_like(t_tokens), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)[:, t:]

    # generate() jits its prefill and decode loop internally: compile time is its first call minus the median, and
    # memory the device's lifetime peak where JAX keeps one (GPU/TPU).
    sides = [Side("jax", run_jax, lambda: float(np.asarray(holder["out"])[:, 0].sum()),
                  memory_mb=device_peak_memory_mb)]
    sides += _inference_torch_sides(ctx, torch_gen, lambda out: float(out[:, 0].sum()))
    flops = forward_flops(config, b, t) + sum(forward_flops(config, b, 1, context=t + i) for i in range(n))
    return Work(sides, b * n, flops)


WORKLOADS: dict[str, Callable[[BenchContext], Work]] = {
    "forward": forward_workload,
    "generate": generate_workload,
    "sft": sft_workload,
    "dpo": dpo_workload,
    "wanda": wanda_workload,
    "svd": svd_workload,
}
