"""The training engine: accumulation, exact resume, sharded steps, and learning on real-format data."""

from __future__ import annotations

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
    params = init_params(CONFIG, jax.random.key(0))
    ocfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    loss = make_sft_loss(CONFIG)
    cfg = TrainConfig(steps=10, log_every=5, progress=False, grad_accum=2)
    single, _ = train(loss, build_optimizer(ocfg, params), params, _iterator(batch_size=16), cfg)
    mesh = make_mesh(spec)
    sharded, _ = train(loss, build_optimizer(ocfg, params), params, _iterator(batch_size=16), cfg, mesh=mesh,
                       model_config=CONFIG)
    q = sharded.params["layers"]["attn"]["q"]
    assert len({s.data.shape for s in q.addressable_shards}) == 1 and q.addressable_shards[0].data.shape != q.shape
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
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
