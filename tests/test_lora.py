"""LoRA adapters: PEFT layout and init, merge = forward with adapters, training with a frozen base, file round trip."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safety_jax.model.config import get_preset
from safety_jax.model.llama import LINEAR_MODULES, forward, param_shapes
from safety_jax.model.lora import (
    LoraConfig,
    adapter_shapes,
    combine,
    init_lora,
    load_lora,
    merge_lora,
    save_lora,
    split,
    unmerge_lora,
)
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer

CONFIG = get_preset("tiny")  # D=64, N=4, K=2, H=16, F=176, L=2
L_, D, N, K, H, F = 2, 64, 4, 2, 16, 176


pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 + 0.1 * rng.standard_normal(s.shape)) if "norm" in jax.tree_util.keystr(path)
                                    else 0.08 * rng.standard_normal(s.shape), jnp.float32), param_shapes(CONFIG))


def random_adapters(lora_cfg, seed=1):
    """Adapters with non-zero B so the LoRA path actually changes the model."""
    lora = init_lora(CONFIG, lora_cfg, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
        if jax.tree_util.keystr(path).endswith("['b']") else x, lora)


_forward = jax.jit(lambda p, t, lora, scale: forward(p, t, CONFIG, lora=lora, lora_scale=scale), static_argnums=3)
TOKENS = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (2, 24)).astype(np.int32)


def test_adapter_shapes_and_init_follow_peft():
    lora_cfg = LoraConfig(rank=4, alpha=8, targets=LINEAR_MODULES)
    shapes = adapter_shapes(CONFIG, lora_cfg)
    assert shapes["attn.q"] == ((L_, D, 4), (L_, 4, N, H))
    assert shapes["attn.k"] == ((L_, D, 4), (L_, 4, K, H))
    assert shapes["attn.o"] == ((L_, N, H, 4), (L_, 4, D))
    assert shapes["mlp.up"] == ((L_, D, 4), (L_, 4, F))
    assert shapes["mlp.down"] == ((L_, F, 4), (L_, 4, D))
    lora = init_lora(CONFIG, lora_cfg, jax.random.PRNGKey(0))
    for group, name in (m.split(".") for m in LINEAR_MODULES):
        a, b = (np.asarray(lora["layers"][group][name][k]) for k in ("a", "b"))
        bound = 1 / math.sqrt(math.prod(a.shape[1:-1]))  # kaiming_uniform_(a=√5): U(±1/√fan_in)
        assert not b.any() and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert lora_cfg.scale == 2.0 and LoraConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    gauss = init_lora(CONFIG, LoraConfig(rank=4, init="gaussian"), jax.random.PRNGKey(0))
    assert abs(float(jnp.std(gauss["layers"]["attn"]["q"]["a"])) - 0.25) < 0.03  # N(0, 1/r)


def test_fresh_adapters_leave_the_model_unchanged(params):
    lora_cfg = LoraConfig(rank=4, alpha=16.0, targets=LINEAR_MODULES)
    lora = init_lora(CONFIG, lora_cfg, jax.random.PRNGKey(0))
    base = _forward(params, TOKENS, None, 1.0)
    np.testing.assert_array_equal(np.asarray(_forward(params, TOKENS, lora, lora_cfg.scale)), np.asarray(base))


def test_merged_model_logits_equal_forward_with_adapters(params):
    lora_cfg = LoraConfig(rank=4, alpha=16.0, targets=LINEAR_MODULES)
    lora = random_adapters(lora_cfg)
    with_adapters = np.asarray(_forward(params, TOKENS, lora, lora_cfg.scale))
    merged = merge_lora(params, lora, lora_cfg)
    merged_logits = np.asarray(_forward(merged, TOKENS, None, 1.0))
    base_logits = np.asarray(_forward(params, TOKENS, None, 1.0))
    assert np.abs(with_adapters - base_logits).max() > 1e-2  # the adapters matter
    assert np.abs(merged_logits - with_adapters).max() <= 1e-5 * max(1.0, np.abs(with_adapters).max())
    restored = unmerge_lora(merged, lora, lora_cfg)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert merged["embed"] is params["embed"]  # untouched weights are shared, not copied


def test_training_with_frozen_base_changes_only_the_adapters(params):
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("attn.q", "attn.v", "mlp.down"))
    trainable = combine(params, init_lora(CONFIG, lora_cfg, jax.random.PRNGKey(0)))
    loss_fn = make_sft_loss(CONFIG, lora_cfg=lora_cfg)
    batch = {"tokens": TOKENS, "loss_mask": np.ones_like(TOKENS)}
    tx = build_optimizer(OptimConfig(lr=1e-2, weight_decay=0.1), trainable)

    @jax.jit
    def step(p, s):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, None)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    state, p, losses = tx.init(trainable), trainable, []
    for _ in range(5):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    base, lora = split(p)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.abs(np.asarray(x["b"])).max() > 0 for g in lora["layers"].values() for x in g.values())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    lora_cfg = LoraConfig(rank=3, alpha=6.0, targets=("attn.o", "mlp.gate"), init="gaussian")
    lora = jax.tree.map(lambda x: x.astype(dtype), random_adapters(lora_cfg))
    save_lora(tmp_path / "adapter", lora, lora_cfg)
    loaded, loaded_cfg = load_lora(tmp_path / "adapter")
    assert loaded_cfg == lora_cfg
    assert jax.tree.structure(loaded) == jax.tree.structure(lora)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lora), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
                                      np.asarray(b).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32))
    assert not list(tmp_path.glob("adapter/*.bin")) and not list(tmp_path.glob("adapter/*.pt"))


def test_lora_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown modules \['attn\.qq'\]; known: attn\.q"):
        LoraConfig(targets=("attn.qq",))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(FileNotFoundError, match="save_lora"):
        load_lora(tmp_path)


def test_lora_dropout_is_seeded_and_off_without_rng(params):
    lora_cfg = LoraConfig(rank=4, alpha=8, dropout=0.5, targets=("attn.q", "mlp.down"))
    lora = random_adapters(lora_cfg)
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % CONFIG.vocab_size
    kw = dict(lora=lora, lora_scale=lora_cfg.scale)
    plain = forward(params, tokens, CONFIG, **kw)
    no_rng = forward(params, tokens, CONFIG, lora_dropout=0.5, **kw)
    k1 = jax.random.key_data(jax.random.key(1))
    k2 = jax.random.key_data(jax.random.key(2))
    a = forward(params, tokens, CONFIG, lora_dropout=0.5, dropout_rng=k1, **kw)
    b = forward(params, tokens, CONFIG, lora_dropout=0.5, dropout_rng=k1, **kw)
    c = forward(params, tokens, CONFIG, lora_dropout=0.5, dropout_rng=k2, **kw)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(no_rng))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - plain).max()) > 1e-4 and float(jnp.abs(a - c).max()) > 1e-4
    # without adapters, dropout has nothing to act on
    base = forward(params, tokens, CONFIG)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(forward(params, tokens, CONFIG, lora_dropout=0.5,
                                                                       dropout_rng=k1)))
