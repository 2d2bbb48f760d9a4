"""Optimizer groups, freezing, per-(module, layer) learning-rate multipliers and the rule parser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safety_jax.model.config import get_preset
from safety_jax.model.llama import param_shapes
from safety_jax.model.lora import LoraConfig, combine, init_lora
from safety_jax.train.optim import (
    KNOWN_MODULES,
    OptimConfig,
    build_optimizer,
    learning_rate_schedule,
    lr_multipliers,
    param_labels,
    parse_rule,
    parse_rules,
)

CONFIG = get_preset("tiny")  # 2 layers, untied lm_head


pytestmark = pytest.mark.usefixtures("fast_compiles")


def np_params(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape) + 1.0, jnp.float32),
                        param_shapes(CONFIG))


def random_grads(params, rng):
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def run(cfg, params, grads_fn, steps):
    """``steps`` jitted optimizer steps; grads_fn(step) gives the gradient pytree."""
    tx = build_optimizer(cfg, params)
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    for i in range(steps):
        params, state = step(params, state, grads_fn(i))
    return params


def first_update(cfg, params, grads):
    tx = build_optimizer(cfg, params)
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------------- rules
@pytest.mark.parametrize("rule,module,layers", [
    ("attn.q@*", "attn.q", None), ("mlp.down@3", "mlp.down", (3,)), ("attn.o@0-7", "attn.o", tuple(range(8))),
    ("mlp.up@1,3,5-6", "mlp.up", (1, 3, 5, 6)), ("attn_norm", "attn_norm", None), ("embed", "embed", None),
    (" mlp.gate @ 2 ", "mlp.gate", (2,))])
def test_parse_rule_forms(rule, module, layers):
    parsed = parse_rule(rule, num_layers=8)
    assert (parsed.module, parsed.layers) == (module, layers)


def test_unknown_module_in_a_rule_is_a_clear_error():
    params = np_params()
    with pytest.raises(ValueError, match=r"'mlp\.dwn@1' names no module 'mlp\.dwn'; known modules: attn\.q, .*down"):
        parse_rules(["mlp.dwn@1"], params)
    with pytest.raises(ValueError, match="mlp.dwn@1"):
        build_optimizer(OptimConfig(lr_multipliers={"mlp.dwn@1": 0.1}), params)
    with pytest.raises(ValueError, match="attn.qq"):
        build_optimizer(OptimConfig(frozen=("attn.qq",)), params)
    assert set(KNOWN_MODULES) >= {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
                                  "attn_norm", "mlp_norm", "embed", "final_norm", "lm_head"}


@pytest.mark.parametrize("rule,match", [("attn.q@2", "outside 0..1"), ("attn.q@1-0", "outside"),
                                        ("attn.q@a-b", "malformed"), ("embed@1", "not a per-layer weight")])
def test_bad_layers_in_a_rule_are_errors(rule, match):
    with pytest.raises(ValueError, match=match):
        parse_rules([rule], np_params())


def test_lm_head_rule_on_tied_params_is_an_error():
    params = {k: v for k, v in np_params().items() if k != "lm_head"}
    with pytest.raises(ValueError, match="tied word embeddings"):
        parse_rules(["lm_head"], params)


def test_optim_config_validates_and_is_hashable():
    cfg = OptimConfig(lr_multipliers={"attn.q@0": 0.5}, frozen=["embed"])
    assert cfg.lr_multipliers == (("attn.q@0", 0.5),) and cfg.frozen == ("embed",)
    hash(cfg)
    with pytest.raises(ValueError, match="optimizer"):
        OptimConfig(optimizer="lion")
    with pytest.raises(ValueError, match="total_steps"):
        OptimConfig(schedule="cosine", warmup_steps=10, total_steps=5)


# ------------------------------------------------------------------------------------------- freezing, multipliers
def test_adamw_steps_keep_frozen_weights_and_zero_multiplier_slices_bit_identical():
    params = np_params()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, frozen=("attn.k", "embed", "mlp.up@1"),
                      lr_multipliers={"mlp.down@1": 0.0, "attn.q@0": 0.1})
    rng = np.random.default_rng(0)
    new = run(cfg, params, lambda i: random_grads(params, rng), 20)
    lay, new_lay = params["layers"], new["layers"]
    assert same(new["embed"], params["embed"]) and same(new_lay["attn"]["k"], lay["attn"]["k"])
    assert same(new_lay["mlp"]["up"][1], lay["mlp"]["up"][1]) and not same(new_lay["mlp"]["up"][0], lay["mlp"]["up"][0])
    assert same(new_lay["mlp"]["down"][1], lay["mlp"]["down"][1])
    assert not same(new_lay["mlp"]["down"][0], lay["mlp"]["down"][0])
    for name in ("lm_head", "final_norm"):
        assert not same(new[name], params[name])
    step_q0 = np.abs(np.asarray(new_lay["attn"]["q"][0] - lay["attn"]["q"][0])).mean()
    step_q1 = np.abs(np.asarray(new_lay["attn"]["q"][1] - lay["attn"]["q"][1])).mean()
    assert 0.05 < step_q0 / step_q1 < 0.2  # multiplier 0.1 on layer 0


def test_sgd_multiplier_half_moves_a_module_exactly_half_as_far():
    zeros = jax.tree.map(jnp.zeros_like, np_params())
    grads = random_grads(zeros, np.random.default_rng(1))
    base = OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.0, clip_norm=None)
    full = run(base, zeros, lambda i: grads, 20)
    half = run(OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.0, clip_norm=None,
                           lr_multipliers={"attn.q@*": 0.5, "mlp.down@1": 0.5}), zeros, lambda i: grads, 20)
    np.testing.assert_array_equal(np.asarray(half["layers"]["attn"]["q"]),
                                  0.5 * np.asarray(full["layers"]["attn"]["q"]))
    np.testing.assert_array_equal(np.asarray(half["layers"]["mlp"]["down"][1]),
                                  0.5 * np.asarray(full["layers"]["mlp"]["down"][1]))
    assert same(half["layers"]["mlp"]["down"][0], full["layers"]["mlp"]["down"][0])
    assert same(half["layers"]["attn"]["k"], full["layers"]["attn"]["k"])


def test_multiplier_scales_weight_decay_and_norms_and_embeddings_are_not_decayed():
    params = np_params()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    cfg = OptimConfig(lr=0.1, weight_decay=0.1, clip_norm=None, lr_multipliers={"attn.q@0": 0.5})
    updates = first_update(cfg, params, zero_grads)
    np.testing.assert_allclose(np.asarray(updates["lm_head"]), -0.01 * np.asarray(params["lm_head"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["layers"]["attn"]["q"][0]),
                               -0.005 * np.asarray(params["layers"]["attn"]["q"][0]), rtol=1e-6)
    for leaf in (updates["embed"], updates["final_norm"], updates["layers"]["attn_norm"]):
        assert not np.any(np.asarray(leaf))
    decay_all = OptimConfig(lr=0.1, weight_decay=0.1, decay_norms_and_embeddings=True)
    updates = first_update(decay_all, params, zero_grads)
    np.testing.assert_allclose(np.asarray(updates["embed"]), -0.01 * np.asarray(params["embed"]), rtol=1e-6)


def test_frozen_gradients_do_not_count_in_the_clipping_norm():
    params = np_params()
    grads = random_grads(params, np.random.default_rng(2))
    huge = {**grads, "embed": grads["embed"] * 1e6}
    cfg = OptimConfig(optimizer="sgd", lr=1.0, weight_decay=0.0, clip_norm=1.0, frozen=("embed",))
    a, b = first_update(cfg, params, grads), first_update(cfg, params, huge)
    assert jax.tree.all(jax.tree.map(same, a, b))


def test_trainable_rules_train_only_those_slices():
    params = np_params()
    rng = np.random.default_rng(3)
    new = run(OptimConfig(trainable=("mlp.down@1",)), params, lambda i: random_grads(params, rng), 3)
    changed = jax.tree.map(lambda a, b: not same(a, b), new, params)
    assert changed["layers"]["mlp"]["down"] and sum(jax.tree.leaves(changed)) == 1
    assert same(new["layers"]["mlp"]["down"][0], params["layers"]["mlp"]["down"][0])


def test_lora_adapters_form_their_own_group_and_the_base_is_frozen():
    params = np_params()
    lora_cfg = LoraConfig(rank=2, targets=("attn.q", "mlp.down"))
    both = combine(params, init_lora(CONFIG, lora_cfg, jax.random.PRNGKey(0)))
    labels = param_labels(OptimConfig(), both)
    assert set(jax.tree.leaves(labels["lora"])) == {"lora"}
    assert set(jax.tree.leaves({k: v for k, v in labels.items() if k != "lora"})) == {"frozen"}
    labels = param_labels(OptimConfig(train_base_with_lora=True), both)
    assert labels["layers"]["attn"]["q"] == "trainable"
    mults = lr_multipliers(OptimConfig(frozen=("attn.q@0",), lr_multipliers={"mlp.down@1": 0.3}), both)
    np.testing.assert_array_equal(mults["lora"]["layers"]["attn"]["q"]["a"], [0.0, 1.0])
    np.testing.assert_allclose(mults["lora"]["layers"]["mlp"]["down"]["b"], [1.0, 0.3])


def test_adafactor_runs_and_respects_freezing():
    params = np_params()
    rng = np.random.default_rng(4)
    new = run(OptimConfig(optimizer="adafactor", lr=1e-2, frozen=("mlp.gate",)), params,
              lambda i: random_grads(params, rng), 2)
    assert same(new["layers"]["mlp"]["gate"], params["layers"]["mlp"]["gate"])
    assert not same(new["layers"]["mlp"]["up"], params["layers"]["mlp"]["up"])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay_schedule(schedule):
    cfg = OptimConfig(lr=1.0, schedule=schedule, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.5) < 1e-6 and abs(float(lr(10)) - 1.0) < 1e-6
    end, mid = float(lr(110)), float(lr(60))
    expected_mid = {"cosine": 0.55, "linear": 0.55, "constant": 1.0}[schedule]
    assert abs(end - (1.0 if schedule == "constant" else 0.1)) < 1e-6 and abs(mid - expected_mid) < 1e-6
