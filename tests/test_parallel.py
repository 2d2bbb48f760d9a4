"""Sharded forward on 8 simulated CPU devices against the single-device result; mesh specs and sharding rules."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from safety_jax import parallel
from safety_jax.model.config import LlamaConfig
from safety_jax.model.hf import load_hf, save_hf
from safety_jax.model.llama import forward, param_shapes

# Dims divisible by 8 (except kv heads = 4, which exercises the replicate fallback on tensor=8).
CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
BATCH, SEQ = 8, 24


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random params built in numpy (no per-leaf compilations): norms near 1, weights at a scale with peaked logits."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    leaves = [(1.0 if "norm" in jax.tree_util.keystr(p) else 0.0) + 0.08 * rng.standard_normal(s.shape)
              for p, s in paths]
    return jax.tree.unflatten(treedef, [jnp.asarray(x, s.dtype) for x, (_, s) in zip(leaves, paths)])


@pytest.fixture(scope="module")
def model():
    params = random_params(CONFIG)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0  # one left-padded row
    logits, caps = jax.jit(lambda p, t, m: forward(p, t, CONFIG, attention_mask=m, capture="resid_post"))(
        params, tokens, mask)
    return params, tokens, mask, np.asarray(logits), np.asarray(caps["resid_post"])


def _is_split(x: jax.Array) -> bool:
    return x.addressable_shards[0].data.shape != x.shape


@pytest.mark.parametrize("spec, strategy, split_leaves", [
    ("data=8", "auto", []),
    ("fsdp=8", "auto", ["embed", "q", "o", "down"]),
    ("data=2,fsdp=2,tensor=2", "auto", ["embed", "q", "k", "o", "gate", "down", "lm_head"]),
    ("data=2,fsdp=2,tensor=2", "tp", ["embed", "q", "k", "gate", "lm_head"]),
    ("tensor=8", "tp", ["q", "o", "gate", "down", "lm_head"]),
])
def test_sharded_forward_matches_single_device(model, spec, strategy, split_leaves):
    params, tokens, mask, ref_logits, ref_resid = model
    mesh = parallel.make_mesh(spec)
    sharded = parallel.shard_params(params, CONFIG, mesh, strategy)
    leaves = {"embed": sharded["embed"], "lm_head": sharded["lm_head"], **sharded["layers"]["attn"],
              **sharded["layers"]["mlp"]}
    for name in split_leaves:
        assert _is_split(leaves[name]), f"{name} is not sharded on {spec}: {leaves[name].sharding.spec}"
        assert any(a is not None for a in leaves[name].sharding.spec)
    if spec == "data=8":
        assert all(not _is_split(x) for x in jax.tree.leaves(sharded))

    fn = parallel.sharded_forward(CONFIG, mesh, strategy, capture="resid_post")
    batch = parallel.shard_batch({"tokens": tokens, "mask": mask}, mesh, strategy)
    logits, caps = fn(sharded, batch["tokens"], batch["mask"])
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(caps["resid_post"]), ref_resid, rtol=1e-5, atol=1e-5)
    if mesh.shape["data"] > 1:
        assert "data" in str(logits.sharding.spec[0]) and _is_split(logits)


def test_sharding_specs_follow_the_strategy_tables():
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    specs = {s: parallel.param_shardings(CONFIG, mesh, s) for s in ("dp", "fsdp", "tp", "fsdp_tp", "hybrid", "auto")}
    assert all(all(a is None for a in sh.spec) for sh in jax.tree.leaves(specs["dp"]))
    assert specs["fsdp"]["layers"]["attn"]["q"].spec == P(None, "fsdp", None, None)
    assert specs["tp"]["layers"]["attn"]["q"].spec == P(None, None, "tensor", None)
    assert specs["tp"]["layers"]["mlp"]["down"].spec == P(None, "tensor", None)
    assert specs["fsdp_tp"]["layers"]["attn"]["o"].spec == P(None, "tensor", None, "fsdp")
    assert specs["fsdp_tp"]["embed"].spec == P("tensor", "fsdp")
    assert specs["hybrid"] == specs["fsdp_tp"] == specs["auto"]
    assert parallel.batch_sharding(mesh, "fsdp", 2).spec == P(("data", "fsdp"), None)
    assert parallel.batch_sharding(mesh, "dp", 3).spec == P("data", None, None)


def test_indivisible_dim_is_replicated_and_logged_once(caplog):
    mesh = parallel.make_mesh("tensor=8")
    with caplog.at_level(logging.INFO, logger="safety_jax.parallel"):
        parallel._logged.clear()
        for _ in range(2):
            shardings = parallel.param_shardings(CONFIG, mesh, "tp")
    assert shardings["layers"]["attn"]["k"].spec == P(None, None, None, None)  # 4 kv heads on 8 devices
    assert shardings["layers"]["attn"]["q"].spec == P(None, None, "tensor", None)
    assert sum("kv_heads" in r.message for r in caplog.records) == 1
    assert parallel.batch_sharding(parallel.make_mesh("data=8"), "dp", 2, shape=(3, 5)).spec == P(None, None)


def test_sharded_forward_with_lora_and_an_indivisible_batch(model):
    params, tokens, _, _, _ = model
    rng = np.random.default_rng(2)
    lora = {"layers": {"attn": {"q": {"a": rng.standard_normal((2, 64, 4)), "b": rng.standard_normal((2, 4, 8, 8))}},
                       "mlp": {"down": {"a": rng.standard_normal((2, 128, 4)), "b": rng.standard_normal((2, 4, 64))}}}}
    lora = jax.tree.map(lambda x: jnp.asarray(0.05 * x, jnp.float32), lora)
    ref = jax.jit(lambda p, t, lo: forward(p, t, CONFIG, lora=lo, lora_scale=2.0))(params, tokens[:3], lora)
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    fn = parallel.sharded_forward(CONFIG, mesh, "fsdp_tp", lora_scale=2.0)
    lora_on_mesh = jax.device_put(lora, parallel.tree_shardings_for(lora, CONFIG, mesh, "fsdp_tp"))
    logits = fn(parallel.shard_params(params, CONFIG, mesh, "fsdp_tp"), tokens[:3], lora=lora_on_mesh)
    assert logits.sharding.spec == P(None, None, "tensor")  # 3 rows: batch replicated, vocab still split
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_make_mesh_parses_specs_and_names_the_problem():
    mesh = parallel.make_mesh("data=2,fsdp=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(parallel.make_mesh(" tensor = 8 ").shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    with pytest.raises(ValueError, match=r"'data=2,fsdp=2'.*4 devices but 8 are available"):
        parallel.make_mesh("data=2,fsdp=2")
    with pytest.raises(ValueError, match="model"):
        parallel.make_mesh("model=8")
    with pytest.raises(ValueError, match="only one axis may be -1"):
        parallel.make_mesh("data=-1,fsdp=-1")
    with pytest.raises(ValueError, match="cannot absorb"):
        parallel.make_mesh("data=3,fsdp=-1")
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero3'"):
        parallel.param_shardings(CONFIG, mesh, "zero3")


def test_optimizer_state_and_lora_shardings_mirror_params(model):
    params = model[0]
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    p_sh = parallel.param_shardings(CONFIG, mesh)
    opt = optax.adamw(1e-3)
    state_shapes = jax.eval_shape(opt.init, params)
    st_sh = parallel.tree_shardings_for(state_shapes, CONFIG, mesh)
    adam = st_sh[0]
    assert adam.count.spec == P()
    assert jax.tree.map(lambda s: s.spec, adam.mu) == jax.tree.map(lambda s: s.spec, p_sh)
    assert jax.tree.map(lambda s: s.spec, adam.nu) == jax.tree.map(lambda s: s.spec, p_sh)
    state = jax.jit(opt.init, out_shardings=st_sh)(parallel.shard_params(params, CONFIG, mesh))
    assert state[0].mu["layers"]["mlp"]["up"].sharding.spec == P(None, "fsdp", "tensor")

    r = 4
    lora = {"layers": {"attn": {"q": {"a": jnp.zeros((2, 64, r)), "b": jnp.zeros((2, r, 8, 8))},
                                "o": {"a": jnp.zeros((2, 8, 8, r)), "b": jnp.zeros((2, r, 64))}}}}
    lora_sh = parallel.tree_shardings_for(lora, CONFIG, mesh)
    assert lora_sh["layers"]["attn"]["q"]["a"].spec == P(None, "fsdp", None)
    assert lora_sh["layers"]["attn"]["q"]["b"].spec == P(None, None, "tensor", None)
    assert lora_sh["layers"]["attn"]["o"]["a"].spec == P(None, "tensor", None, None)
    assert lora_sh["layers"]["attn"]["o"]["b"].spec == P(None, None, "fsdp")


def test_load_hf_places_params_on_the_mesh(model, tmp_path):
    params = model[0]
    save_hf(CONFIG, params, tmp_path / "hf")
    mesh = parallel.make_mesh("fsdp=4,tensor=2")
    _, loaded = load_hf(tmp_path / "hf", shardings=parallel.param_sharding_fn(mesh, "fsdp_tp"))
    q = loaded["layers"]["attn"]["q"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None) and _is_split(q)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)


def test_initialize_distributed_is_a_no_op_on_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False


def test_mesh_context_sets_the_current_mesh():
    mesh = parallel.make_mesh("fsdp=8")
    with parallel.mesh_context(mesh):
        x = jax.device_put(jnp.zeros((8, 4)), P("fsdp"))
    assert x.sharding.spec == P("fsdp") and _is_split(x)
