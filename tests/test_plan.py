"""`safety-jax plan`: per-device memory of one step from shardings and XLA's estimate, without weights."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from safety_jax import cli
from safety_jax.model.config import get_preset
from safety_jax.model.llama import param_shapes
from safety_jax.train.plan import plan_step, tree_bytes
from safety_jax.train.run import load_run_config

TINY = ["preset=tiny", "data.max_length=64"]


def _plan(*overrides: str, compile: bool = False, **kwargs):
    return plan_step(load_run_config(None, [*TINY, *overrides]), mesh_spec="fsdp=8", batch_size=8,
                     compile=compile, **kwargs)


@pytest.fixture(scope="module")
def full(fast_compiles):
    return _plan(compile=True)


def test_params_bytes_per_device_are_the_total_over_the_fsdp_axis(full):
    config = get_preset("tiny")
    total = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(param_shapes(config)))
    params = full.tree("params")
    assert params.total == total
    # every weight has an embed (fsdp) dim; tiny's 64 divides by 8, so nothing is replicated
    assert config.hidden_size % 8 == 0 and params.per_device == total // 8
    assert full.tree("frozen weights").total == 0
    assert full.num_devices == 8 and full.simulated and full.mesh["fsdp"] == 8


def test_adamw_state_is_twice_the_trainable_params(full):
    params, opt = full.tree("params"), full.tree("optimizer state")
    assert abs(opt.total - 2 * params.total) <= 64  # mu + nu, plus the step counters and the clipping norm
    assert abs(opt.per_device - 2 * params.per_device) <= 64


def test_xla_estimate_is_reported_and_matches_the_shardings(full):
    assert full.xla is not None and full.xla["argument"] > 0 and full.xla["temp"] > 0
    assert full.xla["argument"] == pytest.approx(full.analytic_per_device, rel=0.01)
    assert full.per_device_total == full.xla_total > full.analytic_per_device


def test_lora_plan_trains_only_the_adapters_and_freezes_the_base():
    plan = _plan("lora={rank: 4, targets: [attn.q, attn.v]}")
    config = get_preset("tiny")
    base = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(param_shapes(config)))
    n, r, d, h = config.num_hidden_layers, 4, config.hidden_size, config.head_dim
    adapters = 4 * n * ((d * r + r * config.num_attention_heads * h) + (d * r + r * config.num_key_value_heads * h))
    assert plan.tree("params").total == adapters
    assert plan.tree("frozen weights").total == base
    assert abs(plan.tree("optimizer state").total - 2 * adapters) <= 64
    assert plan.xla is None and plan.per_device_total == plan.analytic_per_device


def test_reference_params_and_precomputed_log_probs():
    kept = _plan("method=dpo", "data.kind=preference", "precompute_reference=false")
    assert kept.tree("reference").total == kept.tree("params").total and kept.tree("reference").counted
    pre = _plan("method=dpo", "data.kind=preference")
    with pytest.raises(KeyError):
        pre.tree("reference")
    # 2 groups x 4 int32 [8, 64] arrays + example_mask + 2 float32 reference log-probs [8]
    assert pre.tree("batch").total == (2 * 4 * 8 * 64 + 8 + 2 * 8) * 4


def test_tree_bytes_counts_each_shard():
    mesh = jax.make_mesh((8,), ("fsdp",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    tree = {"a": jax.ShapeDtypeStruct((16, 3), np.float32, sharding=sh), "b": jax.ShapeDtypeStruct((5,), np.int32)}
    t = tree_bytes("x", tree)
    assert (t.total, t.per_device, t.leaves) == (16 * 3 * 4 + 20, 2 * 3 * 4 + 20, 2)


def test_batch_that_the_mesh_cannot_split_is_a_clear_error():
    with pytest.raises(Exception, match="multiple of 8"):
        plan_step(load_run_config(None, TINY), mesh_spec="fsdp=8", batch_size=4, compile=False)


def test_cli_prints_the_table_and_json(capsys, fast_compiles):
    cli.main(["plan", *TINY, "--mesh", "fsdp=8", "--batch", "8", "--seq", "32"])
    out = capsys.readouterr().out
    assert "per-device total:" in out and "GiB" in out and "simulated" in out and "temporaries" in out
    cli.main(["plan", *TINY, "lora={rank: 2}", "--mesh", "fsdp=8", "--batch", "8", "--seq", "32", "--json",
              "--no-compile"])
    data = json.loads(capsys.readouterr().out)
    assert data["seq_len"] == 32 and data["xla"] is None and data["per_device_total"] > 0
    assert {t["name"] for t in data["trees"]} >= {"params", "optimizer state", "frozen weights", "batch"}


def test_mesh_device_count_and_host_device_simulation(monkeypatch):
    assert cli.mesh_device_count("data=2,fsdp=4") == 8
    assert cli.mesh_device_count("fsdp=-1") is None and cli.mesh_device_count(None) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=2")
    assert not cli.simulate_host_devices(16)  # this process's backends already exist
    monkeypatch.setattr(cli, "_backends_started", lambda: False)
    assert cli.simulate_host_devices(16)
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=16"
