"""Weight-space analyses of a fine-tuning update ΔW = W_ft − W_pre (Jain et al. 2024, arXiv 2407.10264, §2, 3, 5).

Orientation. Our params store a linear map in einsum layout ``W: [in, out]`` (``y = x W``); Hugging Face / PyTorch
store ``M = Wᵀ: [out, in]`` (``y = M x``). The paper's "column space" is the column space of M, i.e. the **output
space** of the layer, and its "row space" is the **input space**. Every function here works on the HF-oriented matrix
``M: [L, out, in]`` (built by :func:`module_matrix`), so with ``M = U S Vᵀ`` the left singular vectors ``U`` live in the
output space and the right singular vectors ``V`` in the input space, exactly as in the paper. Attention weights are
flattened over heads: q, k, v become ``[L, N·H, D]`` (``[L, K·H, D]``) and o becomes ``[L, D, N·H]``, as in HF.

Every kernel is a ``jax.vmap`` over the stacked layer axis (optionally chunked with ``lax.map``), with fixed shapes:
the energy cut-off is a mask, not a slice, so each module shape compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.model.llama import LINEAR_MODULES, Params, get_layer_weight


def module_matrix(params: Params, module: str) -> jax.Array:
    """The stacked weight of ``module`` (``attn.q`` … ``mlp.down``) as HF-oriented matrices ``M: [L, out, in]``."""
    if module not in LINEAR_MODULES:
        raise ValueError(f"module {module!r} is not a linear module; choose from {LINEAR_MODULES}")
    w = get_layer_weight(params, module)
    if module in ("attn.q", "attn.k", "attn.v"):  # [L, D, heads, H] -> [L, D, heads·H]
        w = w.reshape(w.shape[0], w.shape[1], -1)
    elif module == "attn.o":  # [L, N, H, D] -> [L, N·H, D]
        w = w.reshape(w.shape[0], -1, w.shape[-1])
    return jnp.swapaxes(w, 1, 2)


def energy_mask(s: jax.Array, energy: float | jax.Array) -> jax.Array:
    """Mask [..., r] of the leading singular values (sorted descending) needed to hold ``energy`` of Σ s².

    Direction i is kept when the energy of the directions before it is still below ``energy``; so the kept set is the
    smallest prefix whose energy reaches ``energy`` (energy in (0, 1]).
    """
    dtype = jnp.promote_types(s.dtype, jnp.float32)             # float32, or float64 for float64 input
    e = jnp.square(s.astype(dtype))
    total = jnp.maximum(e.sum(axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    before = (jnp.cumsum(e, axis=-1) - e) / total
    return before < energy


def effective_rank(s: jax.Array) -> jax.Array:
    """Entropy effective rank exp(H(p)), p = s / Σ s (Roy & Vetterli 2007): ``s: [..., r]`` -> ``[...]``."""
    dtype = jnp.promote_types(s.dtype, jnp.float32)
    s = s.astype(dtype)
    p = s / jnp.maximum(s.sum(axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))


METHODS = ("auto", "gram", "svd")


def resolve_method(method: str) -> str:
    """``"gram"`` or ``"svd"``: ``"auto"`` is ``"svd"`` on TPU (no native float64) and ``"gram"`` elsewhere."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "svd" if jax.default_backend() == "tpu" else "gram"
    return method


def _column_space_one(w_pre: jax.Array, w_ft: jax.Array, energy: jax.Array, top_k: int) -> dict[str, jax.Array]:
    """One layer by float32 thin SVDs: w_pre, w_ft [out, in] (HF orientation)."""
    w_pre = w_pre.astype(jnp.float32)
    delta = w_ft.astype(jnp.float32) - w_pre
    u_d, s_d, _ = jnp.linalg.svd(delta, full_matrices=False)
    u_p, s_p, _ = jnp.linalg.svd(w_pre, full_matrices=False)
    keep = energy_mask(s_p, energy)
    basis = u_p * keep[None, :]                                # [out, r]: masked pretrained column-space basis
    u = u_d[:, :top_k]                                         # [out, k]: ΔW's top left singular vectors
    outside = u - basis @ (basis.T @ u)                        # (I − U_pre U_preᵀ) u_i
    sin = jnp.linalg.norm(outside, axis=0)
    # Directions of a (numerically) zero update are arbitrary: report NaN rather than a meaningless angle.
    tol = jnp.finfo(jnp.float32).eps * max(w_pre.shape) * jnp.maximum(s_p[0], s_d[0])
    sin = jnp.where(s_d[:top_k] > tol, sin, jnp.nan)
    return {
        "sin_theta": sin,
        "delta_singular_values": s_d,
        "pre_singular_values": s_p,
        "pre_energy_rank": keep.sum().astype(jnp.int32),
        "delta_energy_rank": energy_mask(s_d, energy).sum().astype(jnp.int32),
        "delta_effective_rank": effective_rank(s_d),
        "relative_norm": jnp.linalg.norm(delta) / jnp.maximum(jnp.linalg.norm(w_pre), jnp.finfo(jnp.float32).tiny),
    }


@jax.custom_batching.custom_vmap
def _eigh_per_matrix(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` that stays one LAPACK call per matrix under ``vmap``.

    On CPU a batched call splits its batch into tasks on XLA's intra-op thread pool and blocks until they finish; when
    every pool thread is inside such a call (two vmapped eighs at once on two cores already do it), nothing runs the
    tasks and the program hangs. Single-matrix calls run inline, and independent ones still run in parallel.
    """
    lam, vec = jnp.linalg.eigh(g)
    return lam, vec


@_eigh_per_matrix.def_vmap
def _eigh_per_matrix_vmap(axis_size: int, in_batched: list[bool],
                          g: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple[bool, bool]]:
    if not in_batched[0]:
        return _eigh_per_matrix(g), (False, False)
    if jax.default_backend() != "cpu":                         # cuSOLVER's batched eigh has no such pool
        lam, vec = jnp.linalg.eigh(g)
        return (lam, vec), (True, True)
    parts = [_eigh_per_matrix(g[i]) for i in range(axis_size)]
    return (jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts])), (True, True)


def _gram_spectrum(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values ``[r]`` (descending) and the eigenvectors of the smaller Gram matrix of ``m: [out, in]``:
    U ``[out, r]`` from M Mᵀ when out ≤ in, V ``[in, r]`` from Mᵀ M otherwise."""
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    lam, vec = _eigh_per_matrix(g)                             # ascending
    return jnp.sqrt(jnp.maximum(lam[::-1], 0.0)), vec[:, ::-1]


def _column_space_gram_one(w_pre: jax.Array, w_ft: jax.Array, energy: jax.Array,
                           top_k: int) -> dict[str, jax.Array]:
    """One layer from the eigendecompositions of the Gram matrices in float64 (traced with x64 enabled)."""
    if jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise RuntimeError("the gram method must be traced with float64 enabled (jax.enable_x64(True))")
    f64 = jnp.float64
    p = w_pre.astype(f64)
    d = w_ft.astype(f64) - p                                   # exact unless the exponents differ by > 29
    n_out, n_in = p.shape
    s_d, vec_d = _gram_spectrum(d)
    s_p, vec_p = _gram_spectrum(p)
    tol = jnp.finfo(jnp.float32).eps * max(n_out, n_in) * jnp.maximum(s_p[0], s_d[0])
    keep = energy_mask(s_p, energy)
    inverse = lambda s: jnp.where(s > tol, 1.0 / jnp.where(s > tol, s, 1.0), 0.0)   # 1/σ, 0 at (numerical) zeros
    if n_out <= n_in:                                          # eigh of M Mᵀ gave the left singular vectors
        u = vec_d[:, :top_k]
        basis = vec_p * keep[None, :]
        outside = u - basis @ (basis.T @ u)
    else:                                                      # U = M V / σ, zero where σ is (numerically) zero
        u = (d @ vec_d[:, :top_k]) * inverse(s_d[:top_k])[None, :]
        # U_keep U_keepᵀ u with U_keep = P V_keep / σ_keep, without forming the [out, r] basis:
        # P V_keep diag(1/σ_keep²) V_keepᵀ Pᵀ u.
        weight = jnp.where(keep, jnp.square(inverse(s_p)), 0.0)
        coef = (vec_p.T @ (p.T @ u)) * weight[:, None]         # [r, k]
        outside = u - p @ (vec_p @ coef)
    sin = jnp.where(s_d[:top_k] > tol, jnp.linalg.norm(outside, axis=0), jnp.nan)
    return {
        "sin_theta": sin.astype(jnp.float32),
        "delta_singular_values": s_d.astype(jnp.float32),
        "pre_singular_values": s_p.astype(jnp.float32),
        "pre_energy_rank": keep.sum().astype(jnp.int32),
        "delta_energy_rank": energy_mask(s_d, energy).sum().astype(jnp.int32),
        "delta_effective_rank": effective_rank(s_d).astype(jnp.float32),
        "relative_norm": (jnp.linalg.norm(d) / jnp.maximum(jnp.linalg.norm(p), jnp.finfo(jnp.float32).tiny)
                          ).astype(jnp.float32),
    }


@partial(jax.jit, static_argnames=("top_k", "layer_batch", "method"))
def _column_space_kernel(w_pre: jax.Array, w_ft: jax.Array, energy: jax.Array, *, top_k: int,
                         layer_batch: int | None, method: str) -> dict[str, jax.Array]:
    one_layer = _column_space_gram_one if method == "gram" else _column_space_one
    one = lambda ws: one_layer(ws[0], ws[1], energy, top_k)
    if layer_batch is None:
        return jax.vmap(one)((w_pre, w_ft))
    return jax.lax.map(one, (w_pre, w_ft), batch_size=layer_batch)


def column_space_overlap(w_pre: Any, w_ft: Any, *, top_k: int = 10, energy: float = 0.9,
                         layer_batch: int | None = None, method: str = "auto") -> dict[str, jax.Array]:
    """How far ΔW = W_ft − W_pre writes outside the pretrained weight's column space (Jain et al. 2024, analysis 2).

    w_pre, w_ft: ``[L, out, in]`` HF-oriented matrices (see :func:`module_matrix`). For each layer: the left singular
    vectors of ΔW; for each of its top ``top_k`` left singular vectors u_i (output space), ``sin θ_i = ‖(I − U Uᵀ)
    u_i‖`` where U holds the pretrained weight's top left singular vectors carrying ``energy`` of Σ s². sin θ ≈ 1: the
    update writes into directions W_pre does not use. (The reference script indexes rows of U and decomposes W_ft
    instead of ΔW; this is the computation the paper describes.)

    Returns ``sin_theta [L, k]`` (NaN where ΔW's i-th singular value is numerically zero: at most float32 eps ·
    max(out, in) · the larger top singular value of ΔW and W_pre), ``delta_singular_values [L, r]``,
    ``pre_singular_values [L, r]``, ``pre_energy_rank [L]`` (size of U), ``delta_energy_rank [L]``,
    ``delta_effective_rank [L]`` (entropy effective rank) and ``relative_norm [L]`` (‖ΔW‖_F / ‖W_pre‖_F), with
    r = min(out, in) and k = min(top_k, r); float32 and int32 whatever the method.

    ``method``: ``"svd"``: float32 thin SVDs of ΔW and W_pre. ``"gram"``: the eigendecomposition of the smaller Gram
    matrix, G = M Mᵀ (out ≤ in: its eigenvectors are U) or G = Mᵀ M (out > in: its eigenvectors are V and U = M V / σ),
    with σ = sqrt(λ). The Gram matrices, ``eigh`` and M V / σ run in float64, where every product of float32 entries is
    exact and only the accumulation rounds, at float64 precision. So the squared condition number of G costs float64
    digits, not float32 ones: an eigenvalue error of ~n·eps64·σ₁² moves σ_i by ~n·eps64·σ₁²/σ_i, below a float32 SVD's
    ~eps32·σ₁ for every σ_i above the NaN tolerance, and the results match a float64 SVD of the same float32 inputs to
    float32 accuracy. Per layer it costs two Gram products and two symmetric eigendecompositions of the smaller side
    instead of two SVDs (on CPU about half the time of the float32 SVDs). The one difference from SVD is degenerate:
    with W_pre rank-deficient, out > in and an ``energy`` (e.g. 1.0) that keeps its zero singular values, SVD completes
    U with arbitrary orthonormal columns, which then enter the basis; gram leaves those columns out (zero), and
    ``pre_energy_rank`` still counts them. ``"auto"`` (default): ``"svd"`` on TPU (no native float64), ``"gram"``
    otherwise (by ``jax.default_backend()``).

    The gram kernel is traced under ``jax.enable_x64(True)``; this works from host code and inside an outer
    ``jax.jit`` (or ``vmap``) trace alike, since the float64 part is a nested jitted call whose inputs and outputs are
    float32 / int32. ``layer_batch`` processes that many layers at a time (``lax.map``) instead of all at once
    (``vmap``), which bounds the working memory: for gram, the float64 copies of W_pre and ΔW plus the Gram matrices
    of ``layer_batch`` layers, about 2·out·in·8 bytes per layer (~0.9 GB for a 14336 × 4096 Llama-3-8B MLP matrix).
    """
    method = resolve_method(method)
    w_pre, w_ft = jnp.asarray(w_pre), jnp.asarray(w_ft)
    if w_pre.ndim != 3 or w_pre.shape != w_ft.shape:
        raise ValueError(f"w_pre and w_ft must be [L, out, in] of one shape, got {w_pre.shape} and {w_ft.shape}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    top_k = max(1, min(int(top_k), min(w_pre.shape[1:])))
    energy = jnp.float32(energy)
    if method == "gram":
        with jax.enable_x64(True):
            return _column_space_kernel(w_pre, w_ft, energy, top_k=top_k, layer_batch=layer_batch, method=method)
    return _column_space_kernel(w_pre, w_ft, energy, top_k=top_k, layer_batch=layer_batch, method=method)


@dataclasses.dataclass(frozen=True)
class DeltaWReport:
    """:func:`column_space_overlap` of one module as host arrays (shapes as documented there)."""

    module: str
    sin_theta: np.ndarray
    delta_singular_values: np.ndarray
    pre_singular_values: np.ndarray
    pre_energy_rank: np.ndarray
    delta_energy_rank: np.ndarray
    delta_effective_rank: np.ndarray
    relative_norm: np.ndarray

    def rows(self) -> list[dict[str, Any]]:
        """One record per (layer, i): module, layer, i, sin_theta, singular_value — for tables and JSON."""
        n_layers, k = self.sin_theta.shape
        return [{"module": self.module, "layer": layer, "i": i, "sin_theta": float(self.sin_theta[layer, i]),
                 "singular_value": float(self.delta_singular_values[layer, i])}
                for layer in range(n_layers) for i in range(k)]


def delta_weight_analysis(pre: Params, ft: Params, *, modules: Sequence[str] = LINEAR_MODULES, top_k: int = 10,
                          energy: float = 0.9, layer_batch: int | None = None,
                          method: str = "auto") -> dict[str, DeltaWReport]:
    """:func:`column_space_overlap` (``method`` as there) for every linear module (MLP and attention) of two param
    trees."""
    resolve_method(method)                                     # fail before any work
    out = {}
    for module in modules:
        stats = column_space_overlap(module_matrix(pre, module), module_matrix(ft, module), top_k=top_k,
                                     energy=energy, layer_batch=layer_batch, method=method)
        out[module] = DeltaWReport(module=module, **{k: np.asarray(v) for k, v in jax.device_get(stats).items()})
    return out


@jax.jit
def _row_space_basis(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    _, s, vh = jax.vmap(lambda m: jnp.linalg.svd(m, full_matrices=False))(w.astype(jnp.float32))
    return s, vh


def row_space_basis(w: Any) -> tuple[jax.Array, jax.Array]:
    """Singular values ``s: [L, r]`` and right singular vectors ``vh: [L, r, in]`` (input space) of ``w: [L, out, in]``.

    Compute once per weight and reuse for every input set.
    """
    w = jnp.asarray(w)
    if w.ndim != 3:
        raise ValueError(f"w must be HF-oriented matrices [L, out, in], got shape {w.shape}")
    return _row_space_basis(w)


@partial(jax.jit, static_argnames=("top_k", "per_direction"))
def _row_space_alignment(x: jax.Array, s: jax.Array, vh: jax.Array, top_k: int, per_direction: bool) -> jax.Array:
    def one(x_l, s_l, vh_l):
        weight = jnp.where(jnp.arange(s_l.shape[0]) < top_k, s_l, 0.0)
        x_hat = x_l / jnp.maximum(jnp.linalg.norm(x_l, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        cos = jnp.abs(x_hat @ vh_l.T)                                   # [N, r]; rows of vh are unit vectors
        if per_direction:
            return cos * (weight / weight.sum())[None, :]               # [N, r]: the terms of the sum below
        return cos @ weight / weight.sum()
    return jax.vmap(one)(x.astype(jnp.float32), s, vh)


def row_space_alignment(x: Any, s: Any, vh: Any, *, top_k: int | None = None,
                        per_direction: bool = False) -> jax.Array:
    """Singular-value-weighted alignment of inputs with a weight's row space (Jain et al. 2024, analysis 3).

    ``score(x) = Σ_i s_i |cos(x, v_i)| / Σ_i s_i`` over the ``top_k`` (default: all) right singular vectors v_i of the
    HF-oriented weight (from :func:`row_space_basis`, e.g. of the pretrained ``mlp.gate`` / ``mlp.up``).
    x: ``[L, N, in]`` per-layer inputs (e.g. ``mlp_in`` at the ``>`` position) or ``[N, in]`` for every layer.
    Returns ``[L, N]``; compare the distributions for safe and unsafe inputs. With ``per_direction`` returns the terms
    ``s_i |cos(x, v_i)| / Σ_j s_j`` as ``[L, N, r]`` instead (0 beyond ``top_k``), whose sum over the last axis is the
    score.
    """
    s, vh = jnp.asarray(s), jnp.asarray(vh)
    x = jnp.asarray(x)
    if x.ndim == 2:
        x = jnp.broadcast_to(x, (s.shape[0], *x.shape))
    if x.ndim != 3 or x.shape[0] != s.shape[0] or x.shape[-1] != vh.shape[-1]:
        raise ValueError(f"x must be [L={s.shape[0]}, N, in={vh.shape[-1]}] or [N, in], got {x.shape}")
    top_k = s.shape[1] if top_k is None else max(1, min(int(top_k), s.shape[1]))
    return _row_space_alignment(x, s, vh, top_k, per_direction)


@jax.jit
def interpolate_params(pre: Params, ft: Params, alpha: float | jax.Array) -> Params:
    """``pre + α · (ft − pre)`` leaf by leaf, computed in float32 and cast back (Jain et al. 2024, analysis 5).

    α = 0 gives the pretrained model, α = 1 the fine-tuned one; α > 1 extrapolates along ΔW. α is traced, so sweeping
    it does not recompile.
    """
    def mix(p: jax.Array, f: jax.Array) -> jax.Array:
        p32 = p.astype(jnp.float32)
        return (p32 + alpha * (f.astype(jnp.float32) - p32)).astype(p.dtype)
    return jax.tree.map(mix, pre, ft)
