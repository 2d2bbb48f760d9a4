"""The training engine: accumulation, exact resume, sharded steps, and learning on real-format data."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.data.batches import BatchIterator
from safety_jax.model.config import get_preset
from safety_jax.model.llama import init_params
from safety_jax.parallel import make_mesh
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.trainer import TrainConfig, TrainState, make_train_step, stack_micro_batches, train

CONFIG = get_preset("tiny", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, vocab_size=128)


def _examples(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(8, 24))
        prompt = int(rng.integers(2, length - 2))
        tokens = rng.integers(3, CONFIG.vocab_size, length).astype(np.int32)
        tokens[prompt:] = (tokens[prompt - 1] + np.arange(length - prompt)) % CONFIG.vocab_size  # learnable rule
        mask = np.zeros(length, np.int32)
        mask[prompt:] = 1
        out.append({"tokens": tokens, "loss_mask": mask})
    return out


def _iterator(seed=0, batch_size=8):
    return BatchIterator(_examples(64), batch_size=batch_size, buckets=(32,), seed=seed, shuffle=True)


def test_grad_accumulation_matches_one_big_batch():
    params = init_params(CONFIG, jax.random.key(0))
    opt = build_optimizer(OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.0, clip_norm=None), params)
    loss = make_sft_loss(CONFIG)
    batch = next(iter(_iterator()))
    step = make_train_step(loss, opt, donate=False)
    s0 = TrainState.create(params, opt)
    one, m1 = step(s0, stack_micro_batches(batch, 1), None)
    four, m4 = step(s0, stack_micro_batches(batch, 4), None)
    # token-count normalisation across micro-batches makes both the same objective
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one.params, four.params)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    ocfg = OptimConfig(lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=2, total_steps=12)
    loss = make_sft_loss(CONFIG)
    full, _ = train(loss, build_optimizer(ocfg, params), params, _iterator(),
                    TrainConfig(steps=12, log_every=4, progress=False), out_dir=str(tmp_path / "full"))
    # the same run crashes during step 8, after its step-6 checkpoint (one every 3 steps), and is started again
    part = tmp_path / "part"

    def crash(params, step):
        if step == 8:
            raise KeyboardInterrupt("simulated kill")
        return {}

    with pytest.raises(KeyboardInterrupt):
        train(loss, build_optimizer(ocfg, params), params, _iterator(),
              TrainConfig(steps=12, save_every=3, eval_every=1, log_every=3, progress=False), out_dir=str(part),
              eval_fn=crash)
    from safety_jax.train.checkpoint import TrainCheckpointer

    with TrainCheckpointer(part / "checkpoints") as ck:
        assert ck.latest_step() == 6
    resumed, _ = train(loss, build_optimizer(ocfg, params), params, _iterator(),
                       TrainConfig(steps=12, save_every=3, log_every=3, progress=False), out_dir=str(part))
    assert int(resumed.step) == 12
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full.params,
                 resumed.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full.opt_state,
                 resumed.opt_state)


@pytest.mark.parametrize("spec", ["fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_sharded_training_matches_single_device(spec):
    # SGD: the update is linear in the gradient, so float reduction-order noise (~1e-7) stays that size. (Adam's
    # m/sqrt(v) turns the same noise on near-zero gradient entries into O(lr) steps, so its params are compared
    # through the loss trajectory instead.)
    params = init_params(CONFIG, jax.random.key(0))
    loss = make_sft_loss(CONFIG)
    mesh = make_mesh(spec)
    for ocfg, compare_params in ((OptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.0), True),
                                 (OptimConfig(lr=1e-3, weight_decay=0.1), False)):
        cfg = TrainConfig(steps=10, log_every=1, progress=False, grad_accum=2)
        single, h1 = train(loss, build_optimizer(ocfg, params), params, _iterator(batch_size=16), cfg)
        sharded, h2 = train(loss, build_optimizer(ocfg, params), params, _iterator(batch_size=16), cfg, mesh=mesh,
                            model_config=CONFIG)
        q = sharded.params["layers"]["attn"]["q"]
        assert len({s.data.shape for s in q.addressable_shards}) == 1 and q.addressable_shards[0].data.shape != q.shape
        np.testing.assert_allclose([r["loss"] for r in h2], [r["loss"] for r in h1], rtol=1e-5)
        np.testing.assert_allclose([r["grad_norm"] for r in h2][:1], [r["grad_norm"] for r in h1][:1], rtol=1e-5)
        if compare_params:
            jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                         single.params, sharded.params)


def test_sft_lowers_held_out_loss_and_logs(tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    loss = make_sft_loss(CONFIG)
    held = stack_micro_batches(next(iter(BatchIterator(_examples(16, seed=9), 16, buckets=(32,), shuffle=False))), 1)
    held_loss = jax.jit(lambda p: loss(p, jax.tree.map(lambda x: x[0], held), None)[0])
    before = float(held_loss(params))
    state, hist = train(loss, build_optimizer(OptimConfig(lr=3e-3), params), params, _iterator(),
                        TrainConfig(steps=60, log_every=20, eval_every=30, progress=False),
                        out_dir=str(tmp_path), eval_fn=lambda p, s: {"held_out_loss": held_loss(p)})
    after = float(held_loss(state.params))
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 4
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
    assert jnp.isfinite(hist[-1].get("loss", hist[-2].get("loss", 0.0)))


# ---------------------------------------------------------------------------------------------------- precision
def _update_after(config, params, steps=100, lr=1e-6):
    """Params after ``steps`` AdamW steps at ``lr`` (constant schedule, no decay or clipping) on fixed data."""
    ocfg = OptimConfig(lr=lr, weight_decay=0.0, clip_norm=None)
    state, _ = train(make_sft_loss(config), build_optimizer(ocfg, params), params, _iterator(),
                     TrainConfig(steps=steps, log_every=steps, progress=False))
    return state.params


def test_bf16_compute_with_fp32_masters_moves_weights_as_far_as_fp32(caplog):
    params = init_params(CONFIG, jax.random.key(0))
    fp32 = _update_after(CONFIG, params)
    mixed = _update_after(CONFIG.replace(compute_dtype="bfloat16"), params)
    for name in ("embed", "lm_head"):
        d32 = np.asarray(fp32[name]) - np.asarray(params[name])
        dmx = np.asarray(mixed[name], np.float32) - np.asarray(params[name])
        assert mixed[name].dtype == jnp.float32
        assert abs(np.linalg.norm(dmx) - np.linalg.norm(d32)) <= 1e-2 * np.linalg.norm(d32), name
        assert np.linalg.norm(dmx - d32) <= 0.2 * np.linalg.norm(d32), name  # the same direction, up to bf16 noise
    # pure bf16 storage: weights of magnitude >= 0.01 (bf16 spacing 6e-5 there) stay bit-identical after the same
    # 100 steps of ~1e-6 each, which fp32 masters do move; the run says so up front
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    with caplog.at_level("WARNING"):
        pure = _update_after(CONFIG.replace(param_dtype="bfloat16", compute_dtype="bfloat16"), bf16)
    big = np.abs(np.asarray(bf16["lm_head"], np.float32)) >= 0.01
    assert big.sum() > 1000
    assert np.array_equal(np.asarray(pure["lm_head"])[big], np.asarray(bf16["lm_head"])[big])
    assert np.all(np.asarray(mixed["lm_head"])[big] != np.asarray(params["lm_head"])[big])
    assert any("an update smaller than" in r.message and "param_dtype=float32" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- frozen weights
# Widths that no activation shares, so a dot whose result has a frozen weight's shape is that weight's gradient.
ODD = get_preset("tiny", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=136,
                 vocab_size=200)


def _dot_shapes(hlo: str) -> set[tuple[int, ...]]:
    shapes = set()
    for m in re.finditer(r"= f32\[([\d,]*)\]\S* (?:dot|convolution)\(", hlo):
        shapes.add(tuple(int(x) for x in m.group(1).split(",") if x))
    return shapes


def _weight_grad_shapes(module_shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """Shapes a per-layer weight gradient dot can take: the weight's, its 2-D flattening, either way round."""
    d_in, d_out = module_shape[0], int(np.prod(module_shape[1:]))
    return {tuple(module_shape), (d_in, d_out), (d_out, d_in)}


def _compiled_step(params, ocfg, lora_cfg=None):
    from safety_jax.train.optim import split_trainable

    loss = make_sft_loss(ODD, lora_cfg=lora_cfg)
    trainable, frozen = split_trainable(ocfg, params)
    opt = build_optimizer(ocfg, trainable)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, ODD.vocab_size, (2, 10)).astype(np.int32)
    batch = stack_micro_batches({"tokens": tokens, "loss_mask": np.ones_like(tokens)}, 1)
    step = make_train_step(loss, opt, donate=False)
    state = TrainState.create(trainable, opt)
    hlo = step.lower(state, batch, None, frozen).compile().as_text()
    _, metrics = step(state, batch, None, frozen)
    return hlo, metrics, loss, trainable, frozen, batch


def _hand_grad_norm(loss, trainable, frozen, batch):
    from safety_jax.train.optim import merge_params

    mb = jax.tree.map(lambda x: x[0], batch)
    mb = {**mb, "loss_normalizer": jnp.sum(jnp.asarray(mb["loss_mask"])[:, 1:]).astype(jnp.float32)}
    grads = jax.grad(lambda t: loss(merge_params(t, frozen), mb, None)[0])(trainable)
    return np.sqrt(sum(float(jnp.sum(g.astype(jnp.float32) ** 2)) for g in jax.tree.leaves(grads)))


def test_lora_step_has_no_frozen_weight_gradient_and_reports_the_adapter_grad_norm():
    from safety_jax.model.llama import layer_weight_shapes
    from safety_jax.model.lora import LoraConfig, combine, init_lora

    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("attn.q", "attn.v"))
    params = combine(init_params(ODD, jax.random.key(0)), init_lora(ODD, lora_cfg, jax.random.key(1)))
    params["lora"] = jax.tree.map(lambda x: x + 0.01, params["lora"])  # non-zero B: every adapter gets a gradient
    hlo, metrics, loss, trainable, frozen, batch = _compiled_step(params, OptimConfig(), lora_cfg)
    assert jax.tree.leaves(frozen) and set(trainable) == {"lora"} or all(
        v is None for k, v in trainable.items() if k != "lora" for v in jax.tree.leaves(v, is_leaf=lambda x: x is None))
    shapes = layer_weight_shapes(ODD)
    forbidden = set().union(*(_weight_grad_shapes(shapes[m]) for m in ("mlp.gate", "mlp.up", "mlp.down", "attn.o",
                                                                       "attn.q", "attn.v")))
    forbidden |= _weight_grad_shapes((ODD.hidden_size, ODD.vocab_size))  # lm_head
    assert not _dot_shapes(hlo) & forbidden, sorted(_dot_shapes(hlo) & forbidden)
    np.testing.assert_allclose(float(metrics["grad_norm"]), _hand_grad_norm(loss, trainable, frozen, batch),
                               rtol=1e-5)
    # the check is not vacuous: full fine-tuning's step does hold those weight-gradient dots
    full_hlo = _compiled_step(init_params(ODD, jax.random.key(0)), OptimConfig())[0]
    assert _dot_shapes(full_hlo) & _weight_grad_shapes(shapes["mlp.gate"])


def test_frozen_modules_are_not_differentiated_and_grad_norm_covers_the_trainable_ones():
    from safety_jax.model.llama import layer_weight_shapes

    ocfg = OptimConfig(frozen=("mlp.gate", "mlp.up", "mlp.down", "lm_head"))
    hlo, metrics, loss, trainable, frozen, batch = _compiled_step(init_params(ODD, jax.random.key(0)), ocfg)
    shapes = layer_weight_shapes(ODD)
    forbidden = set().union(*(_weight_grad_shapes(shapes[m]) for m in ("mlp.gate", "mlp.up", "mlp.down")))
    forbidden |= _weight_grad_shapes((ODD.hidden_size, ODD.vocab_size))
    assert not _dot_shapes(hlo) & forbidden, sorted(_dot_shapes(hlo) & forbidden)
    assert trainable["lm_head"] is None and frozen["layers"]["attn"]["q"] is None
    np.testing.assert_allclose(float(metrics["grad_norm"]), _hand_grad_norm(loss, trainable, frozen, batch),
                               rtol=1e-5)
