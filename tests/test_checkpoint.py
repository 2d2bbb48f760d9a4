"""Orbax checkpoints: params round trips (onto a mesh too), orbax model folders, mismatch errors, and the training
checkpointer."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from safety_jax import parallel
from safety_jax.errors import CheckpointError
from safety_jax.model import orbax_params
from safety_jax.model.config import LlamaConfig
from safety_jax.model.io import load_model, model_format, save_model
from safety_jax.model.llama import param_shapes
from safety_jax.train import checkpoint as train_checkpoint
from safety_jax.train.checkpoint import (
    CheckpointMismatchError,
    TrainCheckpointer,
    abstract_like,
    restore_params,
    save_params,
)

CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), param_shapes(config))


def assert_bit_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_params_round_trip_is_bit_identical_on_one_device_and_on_a_mesh(tmp_path):
    params = random_params(CONFIG)
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    save_params(tmp_path / "sharded", parallel.shard_params(params, CONFIG, mesh))
    save_params(tmp_path / "plain", params)
    assert sorted(os.listdir(tmp_path)) == ["plain", "sharded"]  # no temporary folders left behind

    assert_bit_identical(restore_params(tmp_path / "plain", CONFIG), params)
    restored = restore_params(tmp_path / "sharded", CONFIG, shardings=parallel.param_sharding_fn(mesh, "fsdp_tp"))
    assert_bit_identical(restored, params)
    q = restored["layers"]["attn"]["q"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None) and q.addressable_shards[0].data.shape != q.shape
    # A checkpoint written from one layout restores onto another.
    other = parallel.make_mesh("fsdp=8")
    on_fsdp = restore_params(tmp_path / "plain", CONFIG, shardings=parallel.param_shardings(CONFIG, other, "fsdp"))
    assert on_fsdp["embed"].sharding.spec == P(None, "fsdp")
    assert_bit_identical(on_fsdp, params)


def test_save_params_refuses_to_overwrite_unless_asked(tmp_path):
    params = random_params(CONFIG)
    save_params(tmp_path / "ckpt", params)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_params(tmp_path / "ckpt", params)
    newer = random_params(CONFIG, seed=1)
    save_params(tmp_path / "ckpt", newer, overwrite=True)
    assert_bit_identical(restore_params(tmp_path / "ckpt", CONFIG), newer)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_restore_with_a_different_config_names_the_leaf(tmp_path):
    save_params(tmp_path / "ckpt", random_params(CONFIG))
    with pytest.raises(CheckpointMismatchError, match=r"leaf 'layers/mlp/(gate|up|down)' has shape"):
        restore_params(tmp_path / "ckpt", CONFIG.replace(intermediate_size=96))
    with pytest.raises(CheckpointMismatchError, match="lm_head"):
        restore_params(tmp_path / "ckpt", CONFIG.replace(tie_word_embeddings=True))
    with pytest.raises(FileNotFoundError, match="no params checkpoint"):
        restore_params(tmp_path / "missing", CONFIG)


def _train_states(params, steps: int) -> dict:
    """Training states (params, optax state with a frozen group, step, typed RNG key) after 1..steps updates."""
    opt = optax.partition({"train": optax.adamw(1e-2), "frozen": optax.set_to_zero()},
                          jax.tree.map(lambda _: "train", params) | {"embed": "frozen"})

    @jax.jit
    def update(state):
        grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), state["params"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}

    state = {"params": params, "opt_state": opt.init(params), "step": jnp.asarray(0, jnp.int32),
             "rng": jax.random.key(0)}
    out = {}
    for step in range(1, steps + 1):
        out[step] = state = update(state)
    return out


def test_train_checkpointer_keeps_k_and_restores_the_latest_exactly(tmp_path):
    params = random_params(CONFIG)
    mesh = parallel.make_mesh("fsdp=4,tensor=2")
    sharded = parallel.shard_params(params, CONFIG, mesh)
    states = _train_states(sharded, 7)
    with TrainCheckpointer(tmp_path / "run", save_every=2, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in range(1, 8):
            saved = ckpt.save(step, states[step], {"epoch": 0, "batch": step * 16, "file": "train.jsonl"})
            assert saved == (step % 2 == 0)
        assert ckpt.save(7, states[7], {"epoch": 0, "batch": 112, "file": "train.jsonl"}, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
        assert sorted(os.listdir(tmp_path / "run")) == ["6", "7"]

    ckpt = TrainCheckpointer(tmp_path / "run", save_every=2, max_to_keep=2)  # a fresh process resuming
    target = jax.eval_shape(lambda: states[7])
    target = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=x.sharding), target, states[7])
    state, meta = ckpt.restore(target_state=target)
    assert meta == {"epoch": 0, "batch": 112, "file": "train.jsonl"}
    assert jax.tree.structure(state) == jax.tree.structure(states[7])  # optax named tuples, typed key
    assert_bit_identical(jax.random.key_data(state["rng"]), jax.random.key_data(states[7]["rng"]))
    assert_bit_identical({k: v for k, v in state.items() if k != "rng"},
                         {k: v for k, v in states[7].items() if k != "rng"})
    mu = state["opt_state"].inner_states["train"].inner_state[0].mu
    assert mu["layers"]["attn"]["q"].sharding == states[7]["params"]["layers"]["attn"]["q"].sharding

    older, meta6 = ckpt.restore(6, target_state=abstract_like(states[6]))
    assert meta6["batch"] == 96 and int(older["step"]) == 6
    with pytest.raises(FileNotFoundError, match="step 2"):
        ckpt.restore(2)
    with open(tmp_path / "run" / "7" / "meta" / "metadata") as f:
        assert json.load(f)["batch"] == 112
    ckpt.close()


def test_train_checkpointer_rejects_a_state_of_another_shape(tmp_path):
    state = {"w": jnp.ones((4, 3)), "step": jnp.asarray(1)}
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, state, {"pos": 1})
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        with pytest.raises(CheckpointMismatchError, match="leaf 'w' has shape"):
            ckpt.restore(target_state={"w": jnp.ones((4, 4)), "step": jnp.asarray(1)})
        raw, meta = ckpt.restore()
        assert meta == {"pos": 1} and raw["w"].shape == (4, 3)


def test_orbax_model_folder_loads_onto_shardings_and_is_replaced_only_when_asked(tmp_path):
    params = random_params(CONFIG)
    folder = tmp_path / "model"
    save_model(folder, CONFIG, params, fmt="orbax")
    assert model_format(folder) == "orbax" and sorted(os.listdir(tmp_path)) == ["model"]
    mesh = parallel.make_mesh("fsdp=4,tensor=2")
    config, loaded = load_model(folder, shardings=parallel.param_sharding_fn(mesh, "fsdp_tp"))
    assert config == CONFIG
    assert loaded["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert_bit_identical(loaded, params)

    with pytest.raises(FileExistsError, match=f"{folder}.*overwrite=True"):
        save_model(folder, CONFIG, params, fmt="orbax")
    newer = random_params(CONFIG, seed=1)
    save_model(folder, CONFIG, newer, fmt="orbax", overwrite=True)
    assert_bit_identical(load_model(folder)[1], newer)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_mismatch_errors_are_checkpoint_errors_and_value_errors():
    assert issubclass(CheckpointMismatchError, CheckpointError) and issubclass(CheckpointError, ValueError)
    assert train_checkpoint.restore_params is orbax_params.restore_params
