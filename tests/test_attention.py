"""The attention implementations against the reference einsums: kernels, the model, the KV-cache path, remat."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.model import attention as A
from safety_jax.model.config import ConfigError, get_preset
from safety_jax.model.llama import REMAT_POLICIES, forward, forward_cached, init_cache, param_shapes
from safety_jax.train.losses import make_sft_loss

pytestmark = pytest.mark.usefixtures("fast_compiles")

# GQA (4 query heads on 2 kv heads) so the grouped paths are exercised.
CONFIG = get_preset("tiny")
IMPLS = ("xla", "blockwise")


def _rel(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.abs(a - b).max() / np.abs(b).max())


def _qkv(seed: int, b: int, t: int, s: int, n: int = 4, k: int = 2, h: int = 8):
    rng = np.random.default_rng(seed)
    shapes = ((b, t, n, h), (b, s, k, h), (b, s, k, h))
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)


def _np_params(config, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 + 0.1 * rng.standard_normal(s.shape)) if "norm" in jax.tree_util.keystr(path)
                                    else 0.08 * rng.standard_normal(s.shape), jnp.float32), param_shapes(config))


def _left_padded(seed: int, b: int = 3, t: int = 13):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CONFIG.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :4] = 0
    mask[2, :9] = 0
    tokens[mask == 0] = 0
    return tokens, mask


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("blocks", [(4, 3), (512, 512)])
def test_kernels_match_reference_with_left_padding_and_gqa(blocks):
    """xla: every row (fully masked pad rows average all values, as the reference); blockwise: every real row, and
    pad rows finite. Multi-block case: 13 queries in blocks of 4 and 13 keys in blocks of 3 (both padded)."""
    q, k, v = _qkv(0, 2, 13, 13)
    valid = np.ones((2, 13), bool)
    valid[1, :5] = False
    slots = jnp.arange(13)
    real_rows = valid[:, :, None, None] & np.ones(q.shape, bool)
    ref = A.reference_attention(q, k, v, slots, valid)
    assert _rel(A.dpa_attention(q, k, v, slots, valid), ref) <= 1e-5
    out = A.blockwise_attention(q, k, v, slots, valid, block_q=blocks[0], block_k=blocks[1])
    assert _rel(out, ref, real_rows) <= 1e-5 and np.isfinite(np.asarray(out)).all()

    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * real_rows, jnp.float32)
    grads = {name: jax.grad(lambda *x, f=f: jnp.sum(f(*x) * w), argnums=(0, 1, 2))(q, k, v) for name, f in (
        ("ref", lambda q, k, v: A.reference_attention(q, k, v, slots, valid)),
        ("xla", lambda q, k, v: A.dpa_attention(q, k, v, slots, valid)),
        ("blockwise", lambda q, k, v: A.blockwise_attention(q, k, v, slots, valid, block_q=blocks[0],
                                                            block_k=blocks[1])))}
    for name in ("xla", "blockwise"):
        for g, r in zip(grads[name], grads["ref"], strict=True):
            assert _rel(g, r) <= 1e-5 and np.isfinite(np.asarray(g)).all(), name


def test_blockwise_decode_query_against_a_partly_filled_cache():
    """One query at slot 6 of a 16-slot cache (slots 7.. unfilled): key blocks after it are skipped."""
    q, k, v = _qkv(2, 2, 1, 16)
    valid = np.zeros((2, 16), bool)
    valid[:, :7] = True
    valid[0, :2] = False
    slots = jnp.array([6])
    ref = A.reference_attention(q, k, v, slots, valid)
    assert _rel(A.blockwise_attention(q, k, v, slots, valid, block_q=4, block_k=4), ref) <= 1e-5
    assert _rel(A.dpa_attention(q, k, v, slots, valid), ref) <= 1e-5


def test_blockwise_gradient_holds_no_full_score_buffer():
    """The compiled gradient of blockwise attention (T = S = 64 in blocks of 16) has no float32 buffer as large as
    the [B, N, T, S] scores; the reference path's does (so the check can see one)."""
    q, k, v = _qkv(4, 2, 64, 64)
    valid = np.ones((2, 64), bool)
    full = 2 * 4 * 64 * 64

    def largest(f) -> int:
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
        hlo = step.lower(q, k, v).compile().as_text()
        return max(math.prod(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo))

    blockwise = lambda q, k, v: A.blockwise_attention(q, k, v, jnp.arange(64), valid, block_q=16, block_k=16)
    assert largest(blockwise) < full
    assert largest(lambda q, k, v: A.reference_attention(q, k, v, jnp.arange(64), valid)) >= full


def test_cudnn_off_gpu_and_unknown_impl_are_clear_errors():
    q, k, v = _qkv(3, 1, 4, 4)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="attention_impl='cudnn' needs a CUDA GPU"):
            A.attention(q, k, v, jnp.arange(4), np.ones((1, 4), bool), impl="cudnn")
    with pytest.raises(ConfigError, match="attention_impl"):
        CONFIG.replace(attention_impl="flash")
    assert "attention_impl" not in CONFIG.replace(attention_impl="blockwise").to_hf_dict()


# ---------------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def params():
    return _np_params(CONFIG)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_reference_path(params, impl):
    tokens, mask = _left_padded(0)
    run = lambda cfg: forward(params, tokens, cfg, attention_mask=mask, capture="attn_hidden")
    ref_logits, ref_cap = run(CONFIG.replace(attention_impl="reference"))
    logits, cap = run(CONFIG.replace(attention_impl=impl))
    real = mask.astype(bool)
    assert _rel(logits, ref_logits, real) <= 1e-5
    for layer in range(CONFIG.num_hidden_layers):
        assert _rel(cap["attn_hidden"][layer], ref_cap["attn_hidden"][layer], real) <= 1e-5, layer
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("impl", ("reference", *IMPLS))
def test_forward_cached_prefill_and_decode_match_the_full_forward(params, impl):
    """Prefill a left-padded prompt, then feed 3 known tokens one at a time: every step's logits equal the
    reference full-sequence forward at that position."""
    cfg = CONFIG.replace(attention_impl=impl)
    tokens, mask = _left_padded(1, t=12)
    p, n_new = 9, 3
    full = np.asarray(forward(params, tokens, CONFIG.replace(attention_impl="reference"), attention_mask=mask))
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    step = jax.jit(lambda tok, cache, pos, m: forward_cached(params, tok, cfg, cache, positions=pos,
                                                             attention_mask=m))
    cache = init_cache(cfg, 3, p + n_new)
    logits, cache = step(tokens[:, :p], cache, positions[:, :p], mask[:, :p])
    real = mask[:, :p].astype(bool)
    assert _rel(logits, full[:, :p], real) <= 1e-5
    for i in range(p, p + n_new):
        logits, cache = step(tokens[:, i:i + 1], cache, positions[:, i:i + 1], mask[:, i:i + 1])
        assert _rel(logits[:, 0], full[:, i]) <= 1e-5, i


# ---------------------------------------------------------------------------------------------------- remat
def test_remat_policies_change_no_value():
    cfg = CONFIG.replace(attention_impl="blockwise")
    params = _np_params(cfg, 1)
    tokens, mask = _left_padded(2)
    loss_mask = mask.copy()
    loss_mask[:, :5] = 0
    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}

    def value_and_grad(remat):
        loss_fn = make_sft_loss(cfg, remat=remat)
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch)[0]))(params)

    results = {name: value_and_grad(name) for name in (*REMAT_POLICIES, True, False)}
    base_loss, base_grads = results["none"]
    for name, (loss, grads) in results.items():
        assert abs(float(loss) - float(base_loss)) <= 1e-6 * abs(float(base_loss)), name
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads), strict=True):
            assert _rel(g, r) <= 1e-6, name
    with pytest.raises(ValueError, match="dots_saveable"):
        forward(params, tokens, cfg, remat="dots")
