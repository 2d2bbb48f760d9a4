"""A pure-functional Llama (2 and 3) decoder in JAX.

Params are a plain nested dict with every per-layer weight stacked on a leading ``layers`` axis; the forward pass is a
``jax.lax.scan`` over that axis. Weight layout (einsum letters: d=embed, n=heads, k=kv heads, h=head dim, f=mlp,
v=vocab)::

    embed            [V, D]
    layers/attn_norm [L, D]          layers/mlp_norm [L, D]
    layers/attn/q    [L, D, N, H]    layers/attn/k   [L, D, K, H]    layers/attn/v [L, D, K, H]
    layers/attn/o    [L, N, H, D]
    layers/mlp/gate  [L, D, F]       layers/mlp/up   [L, D, F]       layers/mlp/down [L, F, D]
    final_norm       [D]
    lm_head          [D, V]          (absent when tie_word_embeddings)

Numerics follow ``transformers``' LlamaForCausalLM: rotate-half RoPE (with Llama-3 frequency scaling), RMSNorm and
softmax in float32, matmuls in ``config.compute_dtype``. ``config.attention_impl`` picks the attention kernel
(``safety_jax.model.attention``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.model.attention import attention
from safety_jax.model.config import LlamaConfig
from safety_jax.model.interventions import Intervention, apply_interventions, check_forward_interventions
from safety_jax.model.sharding import constrain

Params = dict[str, Any]

# Intermediates ``forward(..., capture=...)`` can return, each stacked over layers as [L, B, T, ...].
CAPTURE_NAMES = (
    "resid_pre",    # block input (residual stream before the block)          [L, B, T, D]
    "attn_in",      # RMS-normalised attention input (feeds q/k/v)             [L, B, T, D]
    "attn_hidden",  # attention-weighted values, input of the output proj.     [L, B, T, N, H]
    "attn_out",     # attention output added to the stream                     [L, B, T, D]
    "resid_mid",    # stream after attention, before the MLP                   [L, B, T, D]
    "mlp_in",       # RMS-normalised MLP input (feeds gate/up)                 [L, B, T, D]
    "mlp_hidden",   # silu(gate) * up, input of the down projection            [L, B, T, F]
    "mlp_out",      # MLP output added to the stream                           [L, B, T, D]
    "resid_post",   # block output (residual stream after the block)           [L, B, T, D]
)

# (module path inside ``layers``, logical axes without the leading layers axis)
LAYER_WEIGHTS: dict[str, tuple[str, ...]] = {
    "attn_norm": ("embed",),
    "attn.q": ("embed", "heads", "head_dim"),
    "attn.k": ("embed", "kv_heads", "head_dim"),
    "attn.v": ("embed", "kv_heads", "head_dim"),
    "attn.o": ("heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "mlp.gate": ("embed", "mlp"),
    "mlp.up": ("embed", "mlp"),
    "mlp.down": ("mlp", "embed"),
}
# Logical axes of the activations the model pins to the mesh (``model.sharding.constrain``).
ACT_EMBED = ("batch", "seq", None)
ACT_MLP = ("batch", "seq", "mlp")
ACT_HEADS = ("batch", "seq", "heads", None)
ACT_KV = ("batch", "seq", "kv_heads", None)
ACT_CACHE = ("layers", "batch", None, "kv_heads", None)  # the KV cache [L, B, S, K, H]
LINEAR_MODULES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
LORA_MID = "lora_mid."  # capture ``lora_mid.<module>``: the adapter intermediate x·A [L, B, T, r] (needs lora=)
REDUCTIONS = ("sum", "sum_sq")  # ``capture_reduce`` kinds: Σ_tokens x, Σ_tokens x² (float32)
PERTURB_SITES = ("attn_out", "mlp_out", "resid_post")

# ``remat=`` names: what each decoder block keeps for the backward pass (the rest is recomputed).
#   none           everything (no rematerialisation)
#   dots_saveable  the weight matmul outputs (jax's dots_with_no_batch_dims_saveable: attention's batched
#                  score/value dots are recomputed, so no [B, N, T, S] buffer is kept per layer)
#   full           only the block input
REMAT_POLICIES = ("none", "dots_saveable", "full")


def layer_weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer weight (without the layers axis)."""
    d, n, k, h, f = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                     config.intermediate_size)
    return {"attn_norm": (d,), "attn.q": (d, n, h), "attn.k": (d, k, h), "attn.v": (d, k, h), "attn.o": (n, h, d),
            "mlp_norm": (d,), "mlp.gate": (d, f), "mlp.up": (d, f), "mlp.down": (f, d)}


def param_shapes(config: LlamaConfig) -> Params:
    """The params pytree with ``jax.ShapeDtypeStruct`` leaves (no memory allocated)."""
    dt = config.weight_dtype
    n_layers = config.num_hidden_layers
    layers: dict[str, Any] = {}
    for name, shape in layer_weight_shapes(config).items():
        _set_path(layers, name, jax.ShapeDtypeStruct((n_layers, *shape), dt))
    tree: Params = {"embed": jax.ShapeDtypeStruct((config.vocab_size, config.hidden_size), dt), "layers": layers,
                    "final_norm": jax.ShapeDtypeStruct((config.hidden_size,), dt)}
    if not config.tie_word_embeddings:
        tree["lm_head"] = jax.ShapeDtypeStruct((config.hidden_size, config.vocab_size), dt)
    return tree


def param_logical_axes(config: LlamaConfig) -> Params:
    """The params pytree with a tuple of logical axis names at each leaf (used by ``parallel``)."""
    layers: dict[str, Any] = {}
    for name, axes in LAYER_WEIGHTS.items():
        _set_path(layers, name, ("layers", *axes))
    tree: Params = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("embed",)}
    if not config.tie_word_embeddings:
        tree["lm_head"] = ("embed", "vocab")
    return tree


def init_params(config: LlamaConfig, key: jax.Array, *, initializer_range: float = 0.02) -> Params:
    """Random params: normal(0, initializer_range) matrices, unit norm weights (the HF initialisation)."""
    return _init_params(config, key, initializer_range)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: LlamaConfig, key: jax.Array, initializer_range: float) -> Params:
    shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(flat))
    out = []
    for (path, leaf), k in zip(flat, keys):
        if "norm" in jax.tree_util.keystr(path):
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            out.append((initializer_range * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------------- building blocks
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to the input dtype before scaling (as transformers does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [H/2] in float32, with Llama-3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, H] for integer positions [B, T] (float32)."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x: [B, T, heads, H]."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _lora_delta(x: jax.Array, lora_m: dict | None, n_in: int, scale: float,
                dropout: tuple[float, jax.Array] | None = None,
                keep_mid: Callable[[jax.Array], None] | None = None) -> jax.Array | float:
    if lora_m is None:
        return 0.0
    if dropout is not None:  # inverted dropout on the adapter input only (PEFT's lora_dropout)
        rate, key = dropout
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    z = token_matmul(x, lora_m["a"].astype(x.dtype), n_in)                       # [B, T, r]
    if keep_mid is not None:
        keep_mid(z)
    return scale * token_matmul(z, lora_m["b"].astype(x.dtype), 1)


def token_matmul(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """``x: [B, T, *in] · w: [*in, *out] -> [B, T, *out]`` as one 2-D matmul ``[B·T, Π in] @ [Π in, Π out]``.

    The same contraction as the einsum it replaces, written over the flattened tokens: XLA:CPU then lowers the
    backward's weight gradient ``xᵀ dy`` as a plain GEMM instead of first copying an operand into a transposed
    ``[F, B, T]`` layout (those copies cost the synthetic studies' training step about a third of its time). The
    reshapes are bitcasts; under sharding the merged token axis keeps the batch's (major) sharding and a merged
    ``heads·head_dim`` axis the heads' sharding.
    """
    lead, ins, outs = x.shape[:-n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
    if tuple(w.shape[:n_in]) != tuple(ins):
        raise ValueError(f"token_matmul: x's last {n_in} dims {tuple(ins)} do not match w's leading {w.shape[:n_in]}")
    k = math.prod(ins)
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *outs)


def _linear(x: jax.Array, w: jax.Array, eq: str, lora_m: dict | None, lora_scale: float,
            dropout: tuple[float, jax.Array] | None = None,
            keep_mid: Callable[[jax.Array], None] | None = None) -> jax.Array:
    """``einsum(eq, x, w)`` plus the LoRA path ``scale · (dropout(x) A) B`` when adapters are given (``keep_mid``
    receives the adapter intermediate ``dropout(x) A`` [B, T, r])."""
    ins, out = eq.split("->")
    x_eq, w_eq = ins.split(",")
    n_in = len(x_eq) - 2                                    # x is [b, t, *in]; w is [*in, *out]
    if not (x_eq.startswith("bt") and w_eq.startswith(x_eq[2:]) and out == "bt" + w_eq[n_in:]):
        raise ValueError(f"_linear: {eq!r} is not of the form 'bt<in>,<in><out>->bt<out>'")
    y = token_matmul(x, w.astype(x.dtype), n_in)
    if lora_m is not None:
        y = y + _lora_delta(x, lora_m, n_in, lora_scale, dropout, keep_mid)
    return y


def remat_policy(remat: bool | str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy of a ``remat`` name (``True``/``False`` = "full"/"none"); None = no remat."""
    name = ("full" if remat else "none") if isinstance(remat, bool) else remat
    if name == "none":
        return None
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"remat={remat!r}; choose one of {REMAT_POLICIES} (or True / False for 'full' / 'none')")


def logits_from_hidden(params: Params, hidden: jax.Array, config: LlamaConfig) -> jax.Array:
    """Float32 logits [..., V] of final normed hidden states [..., D]: the ``lm_head`` (or tied ``embed``) matmul in
    the compute dtype with float32 accumulation."""
    x = hidden.astype(config.dtype)
    if config.tie_word_embeddings:
        return jnp.einsum("...d,vd->...v", x, params["embed"].astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", x, params["lm_head"].astype(x.dtype), preferred_element_type=jnp.float32)


def _reduce_tokens(x: jax.Array, mask: jax.Array | None, how: str) -> jax.Array:
    """x: [B, T, ...] -> [...] float32, summed over the tokens where ``mask`` [B, T] is non-zero."""
    xf = x.astype(jnp.float32)
    if how == "sum_sq":
        xf = xf * xf
    w = jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.einsum("bt,bt...->...", w, xf)


def _gather_positions(x: jax.Array, idx: jax.Array | None) -> jax.Array:
    """x: [B, T, ...], idx: [B, P] -> [B, P, ...] (identity when idx is None)."""
    if idx is None:
        return x
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


# ---------------------------------------------------------------------------------------------------- the decoder
def _decoder(params: Params, tokens: jax.Array, config: LlamaConfig, *, positions: jax.Array,
             kv_valid: jax.Array, q_slots: jax.Array, cache: dict | None, capture: Sequence[str],
             capture_positions: jax.Array | None, interventions: Sequence[Intervention], lora: Params | None,
             lora_scale: float, remat: bool | str, input_embeds: jax.Array | None, lora_dropout: float = 0.0,
             dropout_rng: jax.Array | None = None, attend_cache: bool = True,
             reduce: Mapping[str, str] | None = None, reduce_mask: jax.Array | None = None,
             perturb: Mapping[str, jax.Array] | None = None):
    """The layer scan. With ``cache`` ({k, v: [L, B, S, K, H], index}) the cache rides in the scan carry and each
    layer writes its new keys/values with one ``dynamic_update_slice`` (in place: no per-step copy of the cache);
    ``attend_cache=False`` (a prefill into an empty cache) attends within the chunk only instead of over all S slots.
    ``reduce`` / ``reduce_mask``: per name a reduction over the masked tokens taken inside the scan ([L, ...]);
    ``perturb``: per site an [L, B, T, D] tensor added there.
    Returns (final normed hidden [B, T, D], captured, updated cache or None)."""
    dtype = config.dtype
    if input_embeds is not None:
        x = input_embeds.astype(dtype)
    else:
        x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    cos, sin = rope_cos_sin(positions, config)
    eps = config.rms_norm_eps
    lora_layers = (lora or {}).get("layers", {})
    iv_static = tuple(interventions)
    reduce = dict(reduce or {})

    def block(carry, layer):
        x, kv = carry
        w, lw, ivs = layer["w"], layer["lora"], layer["iv"]
        ivp = tuple(zip(iv_static, ivs))

        def drop(i: int) -> tuple[float, jax.Array] | None:
            if layer["rng"] is None:
                return None
            return lora_dropout, jax.random.fold_in(jax.random.wrap_key_data(layer["rng"]), i)

        caps: dict[str, jax.Array] = {}

        def perturbed(value: jax.Array, site: str) -> jax.Array:
            delta = layer["perturb"].get(site)
            return value if delta is None else value + delta.astype(value.dtype)

        def keep(name, value):
            if name in capture:
                caps[name] = _gather_positions(value, capture_positions)
            if name in reduce:
                caps[name] = _reduce_tokens(value, reduce_mask, reduce[name])

        def mid(module: str) -> Callable[[jax.Array], None] | None:
            name = f"{LORA_MID}{module}"
            return (lambda z: keep(name, z)) if name in capture or name in reduce else None

        x = constrain(apply_interventions(x, ivp, "resid_pre"), ACT_EMBED)
        keep("resid_pre", x)
        h = rms_norm(x, w["attn_norm"], eps)
        keep("attn_in", h)
        la = lw.get("attn", {})
        q = _linear(h, w["attn"]["q"], "btd,dnh->btnh", la.get("q"), lora_scale, drop(0), mid("attn.q"))
        k = _linear(h, w["attn"]["k"], "btd,dkh->btkh", la.get("k"), lora_scale, drop(1), mid("attn.k"))
        v = _linear(h, w["attn"]["v"], "btd,dkh->btkh", la.get("v"), lora_scale, drop(2), mid("attn.v"))
        q, k = constrain(apply_rope(q, cos, sin), ACT_HEADS), constrain(apply_rope(k, cos, sin), ACT_KV)
        v = constrain(v, ACT_KV)
        if kv is not None:
            li, start, zero = layer["index"], kv["index"], jnp.int32(0)
            at = (li, zero, start, zero, zero)
            k_all = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype)[None], at)
            v_all = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype)[None], at)
            kv = {"k": constrain(k_all, ACT_CACHE), "v": constrain(v_all, ACT_CACHE), "index": start}
            if attend_cache:
                k = jax.lax.dynamic_index_in_dim(kv["k"], li, 0, keepdims=False).astype(dtype)
                v = jax.lax.dynamic_index_in_dim(kv["v"], li, 0, keepdims=False).astype(dtype)
        attn = attention(q, k, v, q_slots, kv_valid, impl=config.attention_impl)
        keep("attn_hidden", attn)
        attn_out = _linear(attn, w["attn"]["o"], "btnh,nhd->btd", la.get("o"), lora_scale, drop(3), mid("attn.o"))
        attn_out = perturbed(apply_interventions(attn_out, ivp, "attn_out"), "attn_out")
        keep("attn_out", attn_out)
        x = x + attn_out
        keep("resid_mid", x)
        h = rms_norm(x, w["mlp_norm"], eps)
        keep("mlp_in", h)
        lm = lw.get("mlp", {})
        gate = _linear(h, w["mlp"]["gate"], "btd,df->btf", lm.get("gate"), lora_scale, drop(4), mid("mlp.gate"))
        up = _linear(h, w["mlp"]["up"], "btd,df->btf", lm.get("up"), lora_scale, drop(5), mid("mlp.up"))
        gate, up = constrain(gate, ACT_MLP), constrain(up, ACT_MLP)
        hidden = jax.nn.silu(gate) * up
        keep("mlp_hidden", hidden)
        mlp_out = _linear(hidden, w["mlp"]["down"], "btf,fd->btd", lm.get("down"), lora_scale, drop(6),
                          mid("mlp.down"))
        mlp_out = perturbed(apply_interventions(mlp_out, ivp, "mlp_out"), "mlp_out")
        keep("mlp_out", mlp_out)
        x = constrain(x + mlp_out, ACT_EMBED)
        x = perturbed(apply_interventions(x, ivp, "resid_post"), "resid_post")
        keep("resid_post", x)
        return (x, kv), caps

    policy = remat_policy(remat)
    if policy is not None:
        block = jax.checkpoint(block, policy=policy)

    n_layers = config.num_hidden_layers
    per_layer_iv = tuple({"direction": iv.direction, "coeff": iv.coeff, "layers": iv.layers} for iv in iv_static)
    xs: dict[str, Any] = {"w": params["layers"], "lora": lora_layers, "iv": per_layer_iv, "rng": None,
                          "index": jnp.arange(n_layers, dtype=jnp.int32), "perturb": dict(perturb or {})}
    if lora and lora_dropout > 0.0 and dropout_rng is not None:
        xs["rng"] = jax.random.key_data(jax.random.split(_as_key(dropout_rng), n_layers))
    kv = None
    if cache is not None:
        kv = {"k": cache["k"], "v": cache["v"], "index": jnp.asarray(cache["index"], jnp.int32)}
    (x, kv), captured = run_layers(block, (x, kv), xs, n_layers, config)
    return rms_norm(x, params["final_norm"], eps), captured, kv


def layer_loop(config: LlamaConfig) -> str:
    """``config.layer_loop`` resolved for the default backend: "auto" = "unrolled" on CPU, "scan" elsewhere."""
    if config.layer_loop != "auto":
        return config.layer_loop
    return "unrolled" if jax.default_backend() == "cpu" else "scan"


def run_layers(block: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, n_layers: int,
               config: LlamaConfig) -> tuple[Any, Any]:
    """``lax.scan(block, carry, xs)`` over the layer axis, or the same loop unrolled over static layer slices
    (``config.layer_loop``); the per-layer outputs are stacked ``[L, ...]`` either way."""
    if layer_loop(config) == "scan":
        return jax.lax.scan(block, carry, xs, unroll=min(config.scan_unroll, n_layers))
    outs = []
    for i in range(n_layers):
        carry, out = block(carry, jax.tree.map(lambda a, i=i: a[i], xs))
        outs.append(out)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def default_positions(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Positions as transformers derives them: ``cumsum(mask) - 1`` (pads get 0), or ``arange`` without a mask."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.where(attention_mask.astype(bool), pos, 0)


def _capturable(name: str, lora: Params | None) -> bool:
    if name.startswith(LORA_MID):
        group, _, leaf = name[len(LORA_MID):].partition(".")
        return leaf in (lora or {}).get("layers", {}).get(group, {})
    return name in CAPTURE_NAMES


def _check_inputs(tokens: jax.Array, config: LlamaConfig, attention_mask, positions, capture,
                  capture_reduce: Mapping[str, str] = {}, reduce_mask=None, perturb: Mapping[str, Any] = {},
                  lora: Params | None = None) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq] integers, got shape {tokens.shape}")
    for name, arr in (("attention_mask", attention_mask), ("positions", positions), ("reduce_mask", reduce_mask)):
        if arr is not None and tuple(arr.shape) != tuple(tokens.shape):
            raise ValueError(f"{name} must have the shape of tokens {tuple(tokens.shape)}, got {tuple(arr.shape)}")
    unknown = [c for c in (*capture, *capture_reduce) if not _capturable(c, lora)]
    if unknown:
        raise ValueError(f"capture names {unknown} unknown; choose from {CAPTURE_NAMES} or {LORA_MID}<module> for "
                         "a module the adapters cover")
    bad = {k: v for k, v in capture_reduce.items() if v not in REDUCTIONS}
    if bad:
        raise ValueError(f"capture_reduce {bad}: reductions are {REDUCTIONS}")
    want = (config.num_hidden_layers, *tokens.shape, config.hidden_size)
    for site, delta in perturb.items():
        if site not in PERTURB_SITES:
            raise ValueError(f"perturb site {site!r}; choose from {PERTURB_SITES}")
        if tuple(delta.shape) != want:
            raise ValueError(f"perturb[{site!r}] must be [L, B, T, D] = {want}, got {tuple(delta.shape)}")


def forward(params: Params, tokens: jax.Array, config: LlamaConfig, *, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None, capture: Sequence[str] | str | None = None,
            capture_positions: jax.Array | None = None, interventions: Sequence[Intervention] = (),
            lora: Params | None = None, lora_scale: float = 1.0, remat: bool | str = False,
            input_embeds: jax.Array | None = None, lora_dropout: float = 0.0, dropout_rng: jax.Array | None = None,
            return_hidden: bool = False, capture_reduce: Mapping[str, str] | None = None,
            reduce_mask: jax.Array | None = None, perturb: Mapping[str, jax.Array] | None = None):
    """Run the decoder on ``tokens: [B, T]``.

    attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right). positions: [B, T] RoPE positions
    (default: ``cumsum(mask) - 1``). capture: names from ``CAPTURE_NAMES``; each comes back stacked ``[L, B, T, ...]``,
    or ``[L, B, P, ...]`` when ``capture_positions: [B, P]`` picks positions inside the computation.
    interventions: :class:`Intervention` edits of the stream. lora: adapter pytree (see ``safety_jax.model.lora``).
    input_embeds: [B, T, D] to replace the token embeddings (soft-token attacks, gradients w.r.t. embeddings).
    lora_dropout / dropout_rng: dropout on the adapters' inputs during training (off without an rng).
    remat: a name from ``REMAT_POLICIES`` (``True`` / ``False`` = "full" / "none").
    return_hidden: return the final normed hidden states [B, T, D] (compute dtype) instead of the logits, for
    losses that apply the head chunk by chunk (:func:`logits_from_hidden`).
    capture_reduce: ``{name: "sum" | "sum_sq"}``: the named intermediate reduced over tokens inside the layer scan,
    float32 ``[L, ...]`` (e.g. Wanda's Σ x² per input feature without an [L, B, T, F] buffer); ``reduce_mask``
    [B, T] picks the tokens (default: ``attention_mask``, else all). Names as ``capture``, plus
    ``lora_mid.<module>`` (the adapter intermediate x·A) when ``lora`` covers the module.
    perturb: ``{site: [L, B, T, D]}`` added at ``attn_out`` / ``mlp_out`` / ``resid_post`` of every layer (zeros
    change nothing; its gradient is ∂loss/∂(that hidden output), as Vaccine needs).

    Returns float32 logits [B, T, V] (or the hidden states), paired with ``captured`` (captures and reductions by
    name) when ``capture`` or ``capture_reduce`` is given.
    """
    if isinstance(capture, str):
        capture = (capture,)
    capture = tuple(capture or ())
    capture_reduce = dict(capture_reduce or {})
    perturb = dict(perturb or {})
    _check_inputs(tokens, config, attention_mask, positions, capture, capture_reduce, reduce_mask, perturb, lora)
    if reduce_mask is None:
        reduce_mask = attention_mask
    check_forward_interventions(interventions)
    b, t = tokens.shape
    if positions is None:
        positions = default_positions(attention_mask, b, t)
    kv_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    hidden, captured, _ = _decoder(
        params, tokens, config, positions=positions, kv_valid=kv_valid, q_slots=jnp.arange(t), cache=None,
        capture=capture, capture_positions=capture_positions, interventions=tuple(interventions), lora=lora,
        lora_scale=lora_scale, remat=remat, input_embeds=input_embeds, lora_dropout=lora_dropout,
        dropout_rng=dropout_rng, reduce=capture_reduce, reduce_mask=reduce_mask, perturb=perturb)
    out = hidden if return_hidden else logits_from_hidden(params, hidden, config)
    return (out, captured) if capture or capture_reduce else out


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, jax.Array]:
    """An empty KV cache: k, v [L, B, S, K, H] (logical axes ``ACT_CACHE``, so on a mesh it is split along batch
    and KV heads like the activations); mask [B, S] of filled, non-pad slots; index of the next slot."""
    dtype = dtype or config.dtype
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": constrain(jnp.zeros(shape, dtype), ACT_CACHE), "v": constrain(jnp.zeros(shape, dtype), ACT_CACHE),
            "mask": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def forward_cached(params: Params, tokens: jax.Array, config: LlamaConfig, cache: dict[str, jax.Array], *,
                   positions: jax.Array, attention_mask: jax.Array | None = None,
                   interventions: Sequence[Intervention] = (), lora: Params | None = None,
                   lora_scale: float = 1.0, last_only: bool = False,
                   prefill: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run ``tokens: [B, T]`` at cache slots ``index .. index+T-1`` (a prefill when T > 1, a decode step when T = 1).

    The cache is updated in place inside the layer scan (donate it to the jitted caller to reuse its buffer).
    last_only: project only the last position to the vocabulary (logits [B, V]; a prefill needs no more).
    prefill: the cache is empty and ``tokens`` fill it from slot 0, so attention runs within the chunk
    ([B, T, T] scores) instead of over all S slots.
    Returns float32 logits [B, T, V] (or [B, V] with ``last_only``) and the updated cache.
    """
    check_forward_interventions(interventions)
    b, t = tokens.shape
    index = cache["index"]
    new_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    kv_valid = jax.lax.dynamic_update_slice_in_dim(cache["mask"], new_mask, index, 1)
    q_slots = index + jnp.arange(t)
    if prefill:
        q_slots, attn_valid = jnp.arange(t), new_mask
    else:
        attn_valid = kv_valid
    hidden, _, kv = _decoder(
        params, tokens, config, positions=positions, kv_valid=attn_valid, q_slots=q_slots,
        cache=cache, capture=(), capture_positions=None, interventions=tuple(interventions), lora=lora,
        lora_scale=lora_scale, remat=False, input_embeds=None, attend_cache=not prefill)
    new_cache = {"k": kv["k"], "v": kv["v"], "mask": kv_valid, "index": index + t}
    if last_only:
        hidden = hidden[:, -1]
    return logits_from_hidden(params, hidden, config), new_cache


# ---------------------------------------------------------------------------------------------------- helpers
def _as_key(rng: jax.Array) -> jax.Array:
    """A typed PRNG key from a typed key or raw uint32 key data."""
    return rng if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def get_layer_weight(params: Params, module: str) -> jax.Array:
    """The stacked weight of a module named like ``attn.q`` or ``mlp.down`` ([L, ...])."""
    node = params["layers"]
    for p in module.split("."):
        node = node[p]
    return node
