"""What every workload shares: one random model (the same weights on both sides), the batch, and side builders."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from common import Side, compiled_memory_mb, torch_run_peak_mb

from safety_jax.model.config import LlamaConfig
from safety_jax.model.hf import params_from_hf_state_dict


@dataclasses.dataclass
class BenchContext:
    """One random model shared by both sides (same weights), plus the batch."""

    config: LlamaConfig
    params: Any                 # JAX params converted from the torch model's state dict
    torch_model: Any            # transformers.LlamaForCausalLM in eval mode, on ``device``
    tokens: np.ndarray          # [B, T] int32
    new_tokens: int
    torch_compile: bool
    device: str                 # "cuda" or "cpu" (the PyTorch side; JAX uses its default device)
    seed: int = 0

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
        return cls(config, params, model, tokens, new_tokens, torch_compile, device, seed)

    # ------------------------------------------------------------------ PyTorch helpers
    def sync(self) -> None:
        """Wait for queued PyTorch work (CUDA); nothing to wait for on CPU."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def torch_tensor(self, x: np.ndarray, dtype: Any = None) -> Any:
        """A numpy array on the PyTorch device (int arrays as int64, as transformers expects token ids)."""
        import torch

        if dtype is None:
            dtype = torch.long if np.issubdtype(x.dtype, np.integer) else torch.float32
        return torch.tensor(np.asarray(x), dtype=dtype, device=self.device)  # a copy: x may be read-only

    def torch_models(self, train: bool = False) -> list[tuple[str, Any]]:
        """``[("torch", model), ("torch.compile", compiled)]`` (the latter only with ``--torch-compile``).

        ``train=True`` gives private copies in train mode, so optimizer steps cannot change the shared weights that
        later workloads (and the JAX params) start from.
        """
        import torch

        base = copy.deepcopy(self.torch_model).train() if train else self.torch_model
        models = [("torch", base)]
        if self.torch_compile:
            other = copy.deepcopy(self.torch_model).train() if train else self.torch_model
            models.append(("torch.compile", torch.compile(other)))
        return models


def torch_side(ctx: BenchContext, name: str, fn: Callable[[], Any], check: Callable[[Any], float] | None = None,
               artifact: Callable[[Any], Any] | None = None, *, no_grad: bool = True) -> Side:
    """A PyTorch side: ``fn()`` does the work (under ``torch.no_grad`` unless ``no_grad=False``) and its result from
    the first call feeds ``check`` / ``artifact``; the run synchronises the device before returning."""
    import torch

    holder: dict[str, Any] = {}

    def run() -> None:
        with torch.set_grad_enabled(not no_grad):
            holder["out"] = fn()
        ctx.sync()

    return Side(name, run,
                first_output=(lambda: check(holder["out"])) if check else None,
                artifact=(lambda: artifact(holder["out"])) if artifact else None,
                memory_mb=lambda: torch_run_peak_mb(run))


def jax_side(jitted: Any, example_args: tuple, call: Callable[[Any], Any], check: Callable[[Any], float] | None = None,
             artifact: Callable[[Any], Any] | None = None) -> Side:
    """A JAX side compiled ahead of time: ``prepare`` lowers and compiles ``jitted`` for ``example_args`` (timed as
    compile time); ``call(compiled)`` runs it once and returns the blocked output; memory is XLA's buffer plan."""
    holder: dict[str, Any] = {}

    def prepare() -> None:
        holder["fn"] = jitted.lower(*example_args).compile()

    def run() -> None:
        holder["out"] = call(holder["fn"])

    return Side("jax", run, prepare=prepare,
                first_output=(lambda: check(holder["out"])) if check else None,
                artifact=(lambda: artifact(holder["out"])) if artifact else None,
                memory_mb=lambda: compiled_memory_mb(holder["fn"]))
