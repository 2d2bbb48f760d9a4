"""Benchmark workloads: each returns ``(sides, tokens, flops)`` for one piece of work done in JAX and in PyTorch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import Side, block, forward_flops

from safety_jax.model.config import LlamaConfig
from safety_jax.model.generate import generate
from safety_jax.model.hf import params_from_hf_state_dict
from safety_jax.model.llama import forward


@dataclasses.dataclass
class BenchContext:
    """One random model shared by both sides (same weights), plus the batch."""

    config: LlamaConfig
    params: Any
    torch_model: Any
    tokens: np.ndarray          # [B, T]
    new_tokens: int
    torch_compile: bool
    device: str

    @classmethod
    def build(cls, config: LlamaConfig, batch: int, seq: int, new_tokens: int, seed: int,
              torch_compile: bool) -> BenchContext:
        import torch
        import transformers

        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "torch_dtype"})
        tdt = torch.bfloat16 if config.param_dtype == "bfloat16" else torch.float32
        model = transformers.LlamaForCausalLM(hf_cfg).eval()
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        params = params_from_hf_state_dict(config, state)
        model = model.to(device=device, dtype=tdt)
        tokens = np.random.default_rng(seed).integers(3, config.vocab_size, (batch, seq)).astype(np.int32)
        return cls(config, params, model, tokens, new_tokens, torch_compile, device)


def _torch_sides(ctx: BenchContext, fn: Callable[[Any], Any], check: Callable[[Any], float]) -> list[Side]:
    """The eager PyTorch side (and a torch.compile side when asked for and it compiles)."""
    import torch

    sync = torch.cuda.synchronize if ctx.device == "cuda" else (lambda: None)
    out: list[Side] = []
    models = [("torch", ctx.torch_model)]
    if ctx.torch_compile:
        models.append(("torch.compile", torch.compile(ctx.torch_model)))
    for name, model in models:
        holder: dict[str, Any] = {}

        def run(model=model, holder=holder):
            with torch.no_grad():
                holder["out"] = fn(model)
            sync()

        out.append(Side(name, run, lambda holder=holder: check(holder["out"])))
    return out


def forward_workload(ctx: BenchContext):
    """Logits for a [B, T] batch."""
    import torch

    config = ctx.config
    tokens = jnp.asarray(ctx.tokens)
    fwd = jax.jit(forward, static_argnames=("config",))
    holder: dict[str, Any] = {}

    def run_jax():
        holder["out"] = block(fwd(ctx.params, tokens, config))

    t_tokens = torch.as_tensor(ctx.tokens, dtype=torch.long, device=ctx.device)
    sides = [Side("jax", run_jax, lambda: float(jnp.mean(holder["out"][:, -1])))]
    sides += _torch_sides(ctx, lambda m: m(input_ids=t_tokens).logits,
                          lambda out: float(out[:, -1].float().mean()))
    b, t = ctx.tokens.shape
    return sides, b * t, forward_flops(config, b, t)


def generate_workload(ctx: BenchContext):
    """Prefill the batch, then decode ``new_tokens`` tokens greedily (no early stop); tokens = new tokens."""
    import torch

    config = ctx.config
    b, t = ctx.tokens.shape
    n = ctx.new_tokens
    prompt = jnp.asarray(ctx.tokens)
    mask = jnp.ones_like(prompt)
    holder: dict[str, Any] = {}

    def run_jax():
        holder["out"] = block(generate(ctx.params, config, prompt, mask, max_new_tokens=n, eos_token_ids=(),
                                       pad_token_id=0)[0])

    t_tokens = torch.as_tensor(ctx.tokens, dtype=torch.long, device=ctx.device)

    def torch_gen(model):
        return model.generate(input_ids=t_tokens, attention_mask=torch.ones_like(t_tokens), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)[:, t:]

    sides = [Side("jax", run_jax, lambda: float(np.asarray(holder["out"])[:, 0].sum()))]
    sides += _torch_sides(ctx, torch_gen, lambda out: float(out[:, 0].sum()))
    flops = forward_flops(config, b, t) + sum(forward_flops(config, b, 1, context=t + i) for i in range(n))
    return sides, b * n, flops


WORKLOADS: dict[str, Callable[[BenchContext], tuple[list[Side], int, float]]] = {
    "forward": forward_workload,
    "generate": generate_workload,
}
