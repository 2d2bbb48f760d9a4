"""Analysis workloads: Wanda/Antidote scoring of every linear layer and the ΔW SVD analysis of every layer.

``wanda`` (shared/methods/04, 05): ``s_j = Σ_tokens x_j²`` (float32) for the input of every linear module over a
calibration batch, scores ``|W_ij|·sqrt(s_j)``, and per output row the top α = 0.05 marked (Antidote's mask). JAX: the
library's kernel (``defenses.antidote``) in one jitted function — a forward that reduces the four linear inputs (q/k/v
share ``attn_in``, o reads ``attn_hidden``, gate/up share ``mlp_in``, down reads ``mlp_hidden``) to Σx² inside the
layer scan, then the per-row top-α masks scored in layer chunks. PyTorch:
forward hooks on the linear modules (one per shared input, as the JAX side) and ``torch.topk`` per row, layer by
layer, as the Wanda / Antidote code does.

``svd``: ΔW = W_ft − W_pre for every linear weight of every layer; the library's ΔW column-space analysis
(``analysis.weights.column_space_overlap`` with its default method: "gram", float64 eigendecompositions of the smaller
Gram matrices of ΔW and W_pre, on CPU and GPU; float32 SVDs on TPU; energy cut-off, top-k overlap) vmapped over the
layer axis, one jitted function for all modules; PyTorch: a per-matrix loop of ``torch.linalg.svd`` over every
layer's ΔW and W_pre, then the same projections, as the study's reference code analyses weights. Throughput is in
matrices/s (ΔW matrices analysed, each with its W_pre); MFU is n/a (see README).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import Work, block, forward_flops
from context import BenchContext, jax_side, torch_side

from safety_jax.analysis.weights import column_space_overlap, module_matrix
from safety_jax.defenses.antidote import PruneConfig, calibration_stats, prune_masks
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import LINEAR_MODULES, Params

ALPHA = 0.05            # Antidote's dense ratio (per-row top fraction)
SVD_TOP_K = 10
SVD_ENERGY = 0.9
# linear module -> the captured activation that feeds it, and the HF module that carries the PyTorch hook
LINEAR_INPUTS = {"attn.q": "attn_in", "attn.k": "attn_in", "attn.v": "attn_in", "attn.o": "attn_hidden",
                 "mlp.gate": "mlp_in", "mlp.up": "mlp_in", "mlp.down": "mlp_hidden"}
HF_LINEARS = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
              "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
              "mlp.down": "mlp.down_proj"}
HOOKED = {"attn_in": "attn.q", "attn_hidden": "attn.o", "mlp_in": "mlp.gate", "mlp_hidden": "mlp.down"}


def top_k_count(n_inputs: int, alpha: float = ALPHA) -> int:
    """How many weights per output row the mask marks (Wanda's ``int(in · ratio)``)."""
    return int(n_inputs * alpha)


# ---------------------------------------------------------------------------------------------------- Wanda, JAX
def wanda_masks(params: Params, tokens: jax.Array, config: LlamaConfig, alpha: float = ALPHA) -> dict[str, jax.Array]:
    """The library's Antidote masks (``defenses.antidote``: Σx² reduced inside the layer scan, per-row top α of
    |W|·sqrt(s)) for every linear module over ``tokens: [B, T]``, HF-oriented ``[L, out, in]`` for the comparison."""
    cfg = PruneConfig(ratio=alpha, modules=tuple(f"{m}@*" for m in LINEAR_MODULES))
    batch = {"tokens": tokens, "attention_mask": jnp.ones_like(tokens)}
    masks = prune_masks(params, calibration_stats(params, config, [batch], cfg=cfg), cfg, config)
    out = {}
    for module, m in masks.items():
        group, leaf = module.split(".")
        out[module] = module_matrix({"layers": {group: {leaf: m}}}, module)
    return out


# ---------------------------------------------------------------------------------------------------- Wanda, PyTorch
def torch_wanda_masks(model: Any, ids: Any, alpha: float = ALPHA) -> dict[str, list[Any]]:
    """The same with forward hooks: per module, a list over layers of bool masks [out, in]."""
    import torch

    layers = model.model.layers
    sq: dict[tuple[int, str], Any] = {}
    handles = []

    def hook(key: tuple[int, str]):
        def accumulate(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0]
            s = x.float().square().sum(dim=tuple(range(x.ndim - 1)))
            sq[key] = sq[key] + s if key in sq else s
        return accumulate

    for i, layer in enumerate(layers):
        for name, module in HOOKED.items():
            handles.append(layer.get_submodule(HF_LINEARS[module]).register_forward_hook(hook((i, name))))
    try:
        model.model(input_ids=ids)  # the decoder only: the scores never need the LM head
    finally:
        for h in handles:
            h.remove()
    masks: dict[str, list[Any]] = {m: [] for m in LINEAR_MODULES}
    for i, layer in enumerate(layers):
        for module in LINEAR_MODULES:
            w = layer.get_submodule(HF_LINEARS[module]).weight
            scores = w.abs().float() * sq[(i, LINEAR_INPUTS[module])].sqrt()[None, :]
            mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            k = top_k_count(w.shape[1], alpha)
            if k:
                mask.scatter_(-1, torch.topk(scores, k, dim=-1, sorted=False).indices, True)
            masks[module].append(mask)
    return masks


def _mask_fraction(masks: dict[str, Any]) -> float:
    total = sum(float(np.sum(m)) for m in masks.values())
    return total / sum(float(np.size(m)) for m in masks.values())


def _compare_masks(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tolerance: float = 1e-3) -> str:
    """Masks must mark the same count per module and the same weights, but for at most a ``tolerance`` fraction
    (near-ties of the scores, whose order rounding can flip between the two implementations)."""
    differ = size = 0
    for m in LINEAR_MODULES:
        if a[m].shape != b[m].shape or a[m].sum() != b[m].sum():
            raise RuntimeError(f"wanda: {m} masks differ in shape or count ({a[m].shape}, {a[m].sum()} vs "
                               f"{b[m].shape}, {b[m].sum()})")
        differ += int(np.sum(a[m] != b[m]))
        size += a[m].size
    if differ > tolerance * size:
        raise RuntimeError(f"wanda: JAX and PyTorch masks disagree on {differ} of {size} weights")
    return f"masks agree on {1 - differ / size:.4%}"


def wanda_workload(ctx: BenchContext) -> Work:
    """Wanda/Antidote scoring on a calibration batch [B, T]; tokens = B·T; FLOPs = the decoder's forward."""
    config = ctx.config
    tokens = jnp.asarray(ctx.tokens)
    jitted = jax.jit(lambda params, tokens: wanda_masks(params, tokens, config))
    to_host = lambda masks: {m: np.asarray(v) for m, v in masks.items()}
    side = jax_side(jitted, (ctx.params, tokens), lambda f: block(f(ctx.params, tokens)),
                    check=lambda masks: _mask_fraction(to_host(masks)), artifact=to_host)

    ids = ctx.torch_tensor(ctx.tokens)
    stack = lambda masks: {m: np.stack([x.cpu().numpy() for x in v]) for m, v in masks.items()}
    t_side = torch_side(ctx, "torch", lambda: torch_wanda_masks(ctx.torch_model, ids),
                        check=lambda masks: _mask_fraction(stack(masks)), artifact=stack)
    b, t = ctx.tokens.shape
    # bfloat16 activations round differently on the two sides, so many more scores near the cut swap places
    tolerance = 5e-2 if config.compute_dtype == "bfloat16" else 1e-3
    return Work([side, t_side], b * t, forward_flops(config, b, t, lm_head=False),
                compare=functools.partial(_compare_masks, tolerance=tolerance))


# ---------------------------------------------------------------------------------------------------- ΔW SVD
def perturbed_weights(ctx: BenchContext) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """HF-oriented float32 stacks ``{module: [L, out, in]}`` of W_pre and W_ft = W_pre + ΔW, where ΔW is a small
    rank-8 update plus noise (a fine-tuning-like spectrum: a few directions well above a noise floor)."""
    rng = np.random.default_rng(ctx.seed + 3)
    pre, ft = {}, {}
    for module in LINEAR_MODULES:
        w = np.asarray(module_matrix(ctx.params, module), np.float32)
        n_layers, n_out, n_in = w.shape
        low_rank = rng.standard_normal((n_layers, n_out, 8)) @ rng.standard_normal((n_layers, 8, n_in))
        delta = 1e-3 * low_rank / np.sqrt(8) + 1e-4 * rng.standard_normal(w.shape)
        pre[module], ft[module] = w, (w + delta).astype(np.float32)
    return pre, ft


def torch_column_space_overlap(w_pre: Any, w_ft: Any, top_k: int = SVD_TOP_K,
                               energy: float = SVD_ENERGY) -> dict[str, Any]:
    """``analysis.weights.column_space_overlap`` in PyTorch for ``[L, out, in]`` stacks: one ``torch.linalg.svd`` of
    ΔW and one of W_pre per layer, in a Python loop over the layers; per-layer results stacked."""
    import torch

    tiny = torch.finfo(torch.float32).tiny

    def energy_mask(s: Any) -> Any:
        e = s.square()
        return (e.cumsum(-1) - e) / e.sum(-1, keepdim=True).clamp_min(tiny) < energy

    def one(p: Any, f: Any) -> dict[str, Any]:
        delta = f - p
        u_d, s_d, _ = torch.linalg.svd(delta, full_matrices=False)
        u_p, s_p, _ = torch.linalg.svd(p, full_matrices=False)
        keep = energy_mask(s_p)
        basis = u_p * keep[None, :]
        u = u_d[:, :top_k]
        sin = torch.linalg.vector_norm(u - basis @ (basis.T @ u), dim=0)
        tol = torch.finfo(torch.float32).eps * max(p.shape) * torch.maximum(s_p[0], s_d[0])
        sin = torch.where(s_d[:top_k] > tol, sin, torch.nan)
        prob = s_d / s_d.sum().clamp_min(tiny)
        eff_rank = torch.exp(-torch.where(prob > 0, prob * torch.log(torch.where(prob > 0, prob, 1.0)), 0.0).sum())
        return {"sin_theta": sin, "delta_singular_values": s_d, "pre_singular_values": s_p,
                "pre_energy_rank": keep.sum(), "delta_energy_rank": energy_mask(s_d).sum(),
                "delta_effective_rank": eff_rank,
                "relative_norm": torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(p).clamp_min(tiny)}

    layers = [one(p, f) for p, f in zip(w_pre, w_ft)]
    return {k: torch.stack([layer[k] for layer in layers]) for k in layers[0]}


def _spectra_checksum(stats: dict[str, dict[str, Any]]) -> float:
    """Σ over modules and layers of ΔW's top-k singular values."""
    return float(sum(np.asarray(s["delta_singular_values"])[:, :SVD_TOP_K].astype(np.float64).sum()
                     for s in stats.values()))


def _compare_spectra(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]) -> str:
    """W_pre's spectra and energy ranks must match too; the top direction's sin θ is reported, not asserted."""
    worst = 0.0
    for m in LINEAR_MODULES:
        sp_a, sp_b = a[m]["pre_singular_values"], b[m]["pre_singular_values"]
        if not np.allclose(sp_a, sp_b, rtol=1e-3, atol=1e-5 * float(np.max(sp_b))):
            raise RuntimeError(f"svd: W_pre spectra of {m} differ between JAX and PyTorch")
        worst = max(worst, float(np.nanmax(np.abs(a[m]["sin_theta"][:, 0] - b[m]["sin_theta"][:, 0]))))
    return f"sin θ₁ within {worst:.1e}"


def svd_workload(ctx: BenchContext) -> Work:
    """ΔW analysis of every linear weight of every layer; items = L × 7 matrices; MFU n/a."""
    import torch

    pre, ft = perturbed_weights(ctx)
    j_pre = {m: jnp.asarray(v) for m, v in pre.items()}
    j_ft = {m: jnp.asarray(v) for m, v in ft.items()}
    # The library's default method; "gram" traces its float64 kernel under jax.enable_x64 inside this jit.
    analyse = jax.jit(lambda p, f: {m: column_space_overlap(p[m], f[m], top_k=SVD_TOP_K, energy=SVD_ENERGY)
                                    for m in LINEAR_MODULES})
    to_host = lambda stats: jax.tree.map(np.asarray, stats)
    side = jax_side(analyse, (j_pre, j_ft), lambda f: block(f(j_pre, j_ft)),
                    check=lambda s: _spectra_checksum(to_host(s)), artifact=to_host)

    t_pre = {m: ctx.torch_tensor(v, torch.float32) for m, v in pre.items()}
    t_ft = {m: ctx.torch_tensor(v, torch.float32) for m, v in ft.items()}
    t_host = lambda stats: {m: {k: v.cpu().numpy() for k, v in s.items()} for m, s in stats.items()}
    analyse_torch = lambda: {m: torch_column_space_overlap(t_pre[m], t_ft[m]) for m in LINEAR_MODULES}
    t_side = torch_side(ctx, "torch", analyse_torch, check=lambda s: _spectra_checksum(t_host(s)),
                        artifact=t_host)
    n_matrices = ctx.config.num_hidden_layers * len(LINEAR_MODULES)
    return Work([side, t_side], n_matrices, None, unit="matrices", rtol=1e-4, compare=_compare_spectra)
