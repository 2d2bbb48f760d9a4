"""Vaccine, Lisa and Booster as gradient functions of the engine: each update against a step computed by hand from
its formula on a tiny model, the reductions to plain SFT, Lisa's schedule, and resume with a rule's state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.data.batches import BatchIterator
from safety_jax.errors import ConfigError, DataError
from safety_jax.model.config import get_preset
from safety_jax.model.llama import forward, init_params
from safety_jax.train.defenses import (
    BoosterBatches,
    BoosterConfig,
    LisaBatches,
    LisaConfig,
    VaccineConfig,
    lisa_is_alignment,
    lisa_switches,
    make_defense_grad,
)
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer, frozen_layers, merge_params, split_trainable
from safety_jax.train.trainer import TrainConfig, TrainState, make_train_step, stack_micro_batches, train

CONFIG = get_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2)
SGD = OptimConfig(optimizer="sgd", lr=1.0, weight_decay=0.0, clip_norm=None)  # new params = params - grads

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _group(seed: int, rows: int = 4, length: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CONFIG.vocab_size, (rows, length)).astype(np.int32)
    mask = np.zeros_like(tokens)
    mask[:, length // 3:] = 1
    return {"tokens": tokens, "loss_mask": mask}


def _sft(p, batch) -> jax.Array:
    return make_sft_loss(CONFIG)(p, batch)[0]


sft_grad = jax.jit(jax.grad(_sft))


def _tree_close(a, b, *, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _tree_dist(a, b) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))))


def _step_grads(rule, params, batch, state=None):
    """The gradient the engine's jitted step applied: with SGD at lr 1, params before minus params after."""
    opt = build_optimizer(SGD, params)
    step = make_train_step(make_sft_loss(CONFIG), opt, donate=False, grad_fn=rule)
    state = state or TrainState.create(params, opt, extra=rule.init_extra(params))
    new, metrics = step(state, stack_micro_batches(batch, 1), None)
    return jax.tree.map(lambda a, b: a - b, state.params, new.params), metrics, new


# ---------------------------------------------------------------------------------------------------- Booster
def _booster_by_hand(params, align, harm, lam, alpha):
    g_align = sft_grad(params, align)
    g_harm = sft_grad(params, harm)
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(g_harm)))
    shifted = jax.tree.map(lambda p, g: p - alpha * g / (norm + 1e-7), params, g_harm)
    g_shifted = sft_grad(shifted, harm)
    return jax.tree.map(lambda a, h, s: a + lam * (h - s), g_align, g_harm, g_shifted), g_align


def test_booster_step_is_alignment_grad_plus_lambda_times_harmful_grad_change(params):
    align, harm = _group(1), _group(2)
    batch = {**align, **{f"harm_{k}": v for k, v in harm.items()}}
    expected, g_align = _booster_by_hand(params, align, harm, lam=5.0, alpha=0.1)
    applied, metrics, _ = _step_grads(make_defense_grad("booster"), params, batch)
    _tree_close(applied, expected, rtol=1e-4, atol=1e-6)
    assert _tree_dist(expected, g_align) > 1e3 * 1e-6  # the λ term is far above the tolerance
    np.testing.assert_allclose(float(metrics["loss"]), float(_sft(params, align)), rtol=1e-6)
    # the shift simulates a step of harmful fine-tuning: the harmful loss falls there
    assert float(metrics["booster/shifted_harmful_loss"]) < float(metrics["booster/harmful_loss"])
    # and with λ = 0 it is plain SFT on the alignment batch
    plain, _, _ = _step_grads(make_defense_grad("booster", BoosterConfig(lam=0.0)), params, batch)
    _tree_close(plain, g_align, rtol=1e-4, atol=1e-6)


def test_booster_leaves_frozen_layer_slices_out_of_the_harmful_norm_and_shift(params):
    ocfg = OptimConfig(frozen=("mlp.down@0", "embed"))
    trainable, frozen = split_trainable(ocfg, params)
    align, harm = _group(3), _group(4)
    batch = {**align, **{f"harm_{k}": v for k, v in harm.items()}}
    loss = lambda t, b: make_sft_loss(CONFIG)(merge_params(t, frozen), b)
    rule = make_defense_grad("booster", frozen_slices=frozen_layers(ocfg, trainable))
    (_, _), got = jax.jit(lambda t: rule(loss, t, batch, jnp.int32(0), None))(trainable)
    # by hand: the harmful direction with layer 0 of mlp.down zeroed
    grad = jax.jit(jax.grad(lambda t, b: loss(t, b)[0]))
    g_align, g_harm = grad(trainable, align), grad(trainable, harm)
    direction = jax.tree.map(lambda g: g, g_harm)
    direction["layers"]["mlp"]["down"] = direction["layers"]["mlp"]["down"].at[0].set(0.0)
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(direction)))
    shifted = jax.tree.map(lambda p, g: p - 0.1 * g / (norm + 1e-7), trainable, direction)
    g_shifted = grad(shifted, harm)
    expected = jax.tree.map(lambda a, h, s: a + 5.0 * (h - s), g_align, g_harm, g_shifted)
    _tree_close(got, expected, rtol=1e-4, atol=1e-6)
    assert got["embed"] is None
    norm_all = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(g_harm)))
    unmasked = grad(jax.tree.map(lambda p, g: p - 0.1 * g / (norm_all + 1e-7), trainable, g_harm), harm)
    assert _tree_dist(unmasked, g_shifted) > 1e-4  # the mask changes the step


def test_booster_batches_add_the_harmful_stream_under_its_prefix_and_resume():
    align = BatchIterator([{"tokens": np.arange(3, 11) + i, "loss_mask": np.ones(8, np.int32)} for i in range(6)], 2)
    harm = BatchIterator([{"tokens": np.arange(5, 15) + i, "loss_mask": np.ones(10, np.int32)} for i in range(8)], 2,
                         seed=3)
    batches = BoosterBatches(align, harm)
    first = next(batches)
    assert {"tokens", "loss_mask", "harm_tokens", "harm_loss_mask"} <= set(first)
    saved = batches.state()
    a, b = next(batches), next(batches)
    batches.restore(saved)
    jax.tree.map(np.testing.assert_array_equal, (a, b), (next(batches), next(batches)))
    with pytest.raises(DataError, match="harm_tokens"):
        make_defense_grad("booster").split({"tokens": np.zeros((1, 4))})


# ---------------------------------------------------------------------------------------------------- Lisa
def test_lisa_schedule_is_100_alignment_then_900_user_steps_and_the_anchor_resets_at_each_switch():
    cfg = LisaConfig()
    steps = np.arange(2300)
    align = np.array([bool(lisa_is_alignment(int(s), cfg)) for s in steps])
    assert align[:100].all() and not align[100:1000].any() and align[1000:1100].all() and not align[1100:2000].any()
    assert np.array_equal(np.asarray(lisa_is_alignment(jnp.asarray(steps), cfg)), align)  # traced = host schedule
    assert [int(s) for s in steps if lisa_switches(int(s), cfg)] == [100, 1000, 1100, 2000, 2100]
    # one phase only: no switches
    assert not any(lisa_switches(s, LisaConfig(alignment_steps=0)) for s in range(3000))
    assert not any(lisa_is_alignment(s, LisaConfig(alignment_steps=0)) for s in range(50))


@pytest.mark.parametrize("advance", [True, False])
def test_lisa_batches_draw_each_step_from_its_phase_stream(advance):
    def stream(name):
        i = 0
        while True:
            yield {"src": name, "i": i}
            i += 1

    cfg = LisaConfig(alignment_steps=2, finetune_steps=3, user_advances_on_alignment=advance)
    got = [(b["src"], b["i"]) for b, _ in zip(LisaBatches(stream("a"), stream("u"), cfg), range(7), strict=False)]
    if advance:  # the reference's loop: a user batch is drawn (and dropped) on every alignment step
        assert got == [("a", 0), ("a", 1), ("u", 2), ("u", 3), ("u", 4), ("a", 2), ("a", 3)]
    else:
        assert got == [("a", 0), ("a", 1), ("u", 0), ("u", 1), ("u", 2), ("a", 2), ("a", 3)]


def test_lisa_gradient_adds_rho_times_drift_from_the_anchor_after_the_first_tenth(params):
    batch = _group(6)
    anchor = jax.tree.map(lambda p: p + 0.01 * jnp.sign(p) + 0.003, params)
    rule = make_defense_grad("lisa", LisaConfig(rho=1.0), total_steps=100)
    g = sft_grad(params, batch)
    loss = lambda p, b: make_sft_loss(CONFIG)(p, b)
    run = jax.jit(lambda s: rule(loss, params, batch, s, {"anchor": anchor}))
    (_, metrics), late = run(jnp.int32(11))  # 11 > 0.1 · 100
    _tree_close(late, jax.tree.map(lambda gi, p, a: gi + 1.0 * (p - a), g, params, anchor))
    drift = sum(float(jnp.sum((p - a) ** 2)) for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
    np.testing.assert_allclose(float(metrics["lisa/proximal"]), drift / 2, rtol=1e-5)
    (_, early_metrics), early = run(jnp.int32(10))  # not yet: the reference starts once *more* than 10 % are done
    _tree_close(early, g)
    assert float(early_metrics["lisa/proximal"]) == 0.0
    no_rho = make_defense_grad("lisa", LisaConfig(rho=0.0), total_steps=100)
    _tree_close(jax.jit(lambda s: no_rho(loss, params, batch, s, {"anchor": anchor})[1])(jnp.int32(50)), g)


def test_lisa_steps_in_the_engine_anchor_to_the_weights_at_the_last_switch(params):
    cfg = LisaConfig(alignment_steps=2, finetune_steps=2, rho=3.0, proximal_after=0.0)
    rule = make_defense_grad("lisa", cfg, total_steps=5)
    opt = build_optimizer(OptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.0, clip_norm=None), params)
    step = make_train_step(make_sft_loss(CONFIG), opt, donate=False, grad_fn=rule)
    state = TrainState.create(params, opt, extra=rule.init_extra(params))
    batches = [_group(10 + i) for i in range(5)]
    before, anchor = [], params
    for i, batch in enumerate(batches):
        before.append(state.params)
        if i in (2, 4):  # the switches
            anchor = state.params
        new, _ = step(state, stack_micro_batches(batch, 1), None)
        expected = jax.tree.map(lambda p, g, a: p - 0.5 * (g + 3.0 * (p - a)), state.params,
                                sft_grad(state.params, batch), anchor)
        _tree_close(new.params, expected, rtol=1e-5, atol=1e-6)
        _tree_close(new.extra["anchor"], anchor, rtol=0, atol=0)
        state = new
    assert _tree_dist(before[4], params) > 1e-3  # the anchor moved, so the check above is not vacuous


def test_a_run_with_a_stateful_rule_resumes_bit_identically_and_refuses_another_rule(tmp_path, params):
    examples = [_group(20 + i, rows=1) for i in range(16)]
    examples = [{k: v[0] for k, v in ex.items()} for ex in examples]

    def data():
        return LisaBatches(BatchIterator(examples[:8], 2, seed=1), BatchIterator(examples[8:], 2, seed=2),
                           LisaConfig(alignment_steps=2, finetune_steps=3))

    cfg = LisaConfig(alignment_steps=2, finetune_steps=3)
    ocfg = OptimConfig(lr=1e-2)
    run = lambda out, steps, rule=None, **kw: train(
        make_sft_loss(CONFIG), build_optimizer(ocfg, params), params, data(),
        TrainConfig(steps=steps, save_every=3, log_every=3, progress=False), out_dir=str(out),
        grad_fn=rule or make_defense_grad("lisa", cfg, total_steps=8), **kw)
    full, history = run(tmp_path / "full", 8)
    assert "lisa/proximal" in history[-1] and 0 < history[-1]["lisa/alignment_step"] < 1
    run(tmp_path / "part", 3)  # stopped after its step-3 checkpoint, then continued to 8
    resumed, _ = run(tmp_path / "part", 8)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (full.params, full.extra), (resumed.params, resumed.extra))
    with pytest.raises(ConfigError, match="grad_fn.rho"):
        run(tmp_path / "part", 10, make_defense_grad("lisa", LisaConfig(alignment_steps=2, finetune_steps=3, rho=2.0),
                                                     total_steps=8))


# ---------------------------------------------------------------------------------------------------- Vaccine
def _ce_by_hand(p, batch, delta):
    """Mean completion cross-entropy from the model's logits, each layer's attention output shifted by delta."""
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:]
    logp = jax.nn.log_softmax(forward(p, tokens, CONFIG, perturb={"attn_out": delta})[:, :-1], axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(target * mask) / jnp.sum(mask)


def test_vaccine_step_is_the_gradient_at_attention_outputs_shifted_by_rho_along_their_normalised_gradient(params):
    batch = _group(8)
    zeros = jnp.zeros((CONFIG.num_hidden_layers, 4, 12, CONFIG.hidden_size), jnp.float32)

    @jax.jit
    def by_hand(p, rho):
        g = jax.grad(_ce_by_hand, argnums=2)(p, batch, zeros)  # ∂L/∂h_l for every layer, [L, B, T, D]
        norm = jnp.sqrt(jnp.sum(g ** 2))                       # one norm over all layers
        return jax.grad(_ce_by_hand)(p, batch, rho * g / (norm + 1e-7)), norm

    expected, norm = by_hand(params, 2.0)
    applied, metrics, _ = _step_grads(make_defense_grad("vaccine", model_config=CONFIG), params, batch)
    _tree_close(applied, expected, rtol=1e-4, atol=1e-6)
    plain = sft_grad(params, batch)
    assert _tree_dist(expected, plain) > 1e3 * 1e-6  # the perturbation changes the step far beyond the tolerance
    np.testing.assert_allclose(float(metrics["vaccine/hidden_grad_norm"]), float(norm), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(_sft(params, batch)), rtol=1e-6)
    assert float(metrics["vaccine/perturbed_loss"]) > float(metrics["loss"])  # an ascent direction of the loss
    # ρ = 0 is plain SFT
    zero, _, _ = _step_grads(make_defense_grad("vaccine", VaccineConfig(rho=0.0), model_config=CONFIG), params, batch)
    _tree_close(zero, plain, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- configs
def test_configs_have_the_papers_defaults_and_reject_bad_values():
    assert VaccineConfig().rho == 2.0 and LisaConfig().rho == 1.0
    assert (LisaConfig().alignment_steps, LisaConfig().finetune_steps, LisaConfig().proximal_after) == (100, 900, 0.1)
    assert (BoosterConfig().lam, BoosterConfig().alpha) == (5.0, 0.1)
    for bad, match in ((lambda: VaccineConfig(rho=-1.0), "vaccine.rho"),
                       (lambda: LisaConfig(alignment_steps=0, finetune_steps=0), "both 0"),
                       (lambda: LisaConfig(proximal_after=10), "fraction"),
                       (lambda: BoosterConfig(alpha="0.1"), "booster.alpha"),
                       (lambda: make_defense_grad("sam"), "known: none, vaccine, lisa, booster"),
                       (lambda: make_defense_grad("lisa"), "total_steps"),
                       (lambda: make_defense_grad("vaccine"), "model_config"),
                       (lambda: make_defense_grad("booster", LisaConfig()), "BoosterConfig")):
        with pytest.raises(ConfigError, match=match):
            bad()


def test_none_is_plain_value_and_grad(params):
    batch = _group(7)
    applied, _, _ = _step_grads(make_defense_grad("none"), params, batch)
    _tree_close(applied, sft_grad(params, batch), rtol=1e-4, atol=1e-6)
