"""ML-LR and SWAT plans: multipliers reach the optimizer slice by slice, SWAT's warm-up leaves everything outside
Mods_Robust bit-identical, plans round-trip, and `safety-jax train` runs a saved plan's phases."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from safety_jax.errors import ConfigError
from safety_jax.model.config import get_preset
from safety_jax.model.llama import LINEAR_MODULES, init_params
from safety_jax.train import plans
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer, merge_params, split_trainable
from safety_jax.train.trainer import TrainConfig, train

CFG = get_preset("tiny", num_hidden_layers=3)
pytestmark = pytest.mark.usefixtures("fast_compiles")
PLAN = plans.Plan(kind="mllr", mods_robust=(("attn.q", 0), ("attn.q", 2), ("mlp.down", 1)),
                  modules=LINEAR_MODULES, num_layers=3, gamma=0.25, warmup_steps=2)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, (8, 10)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


def _get(tree, module):
    node = tree["layers"]
    for part in module.split("."):
        node = node[part]
    return np.asarray(node)


@jax.jit
def _grads(params, batch):
    return jax.grad(lambda p: make_sft_loss(CFG)(p, batch)[0])(params)


def _one_step_update(params, ocfg):
    opt = build_optimizer(ocfg, params)
    updates, _ = jax.jit(opt.update)(_grads(params, _batch()), opt.init(params), params)
    return updates


@pytest.mark.parametrize("reverse", [False, True])
def test_mllr_step_moves_each_slice_by_its_multiplier_times_the_base_update(reverse):
    params = init_params(CFG, jax.random.key(0))
    plan = dataclasses.replace(PLAN, reverse=reverse)
    base = OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1, clip_norm=None)
    (steps, ocfg), = plans.phases(plan, base, 10)
    assert steps == 10
    uniform, scaled = _one_step_update(params, base), _one_step_update(params, ocfg)
    robust, rest = (1.0, 0.25) if not reverse else (0.25, 1.0)
    for module in LINEAR_MODULES:
        u, s = _get(uniform, module), _get(scaled, module)
        for lay in range(3):
            factor = robust if (module, lay) in plan.mods_robust else rest
            np.testing.assert_allclose(s[lay], factor * u[lay], rtol=1e-6, atol=1e-12)
    for name in ("attn_norm", "mlp_norm"):  # weights outside the analysis keep the base learning rate
        np.testing.assert_array_equal(_get(scaled, name), _get(uniform, name))
    np.testing.assert_array_equal(np.asarray(scaled["embed"]), np.asarray(uniform["embed"]))


def test_swat_warmup_changes_nothing_outside_mods_robust_bit_identical():
    params = init_params(CFG, jax.random.key(1))
    plan = dataclasses.replace(PLAN, kind="swat")
    base = OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1)
    (warm_steps, warm), (rest_steps, full) = plans.phases(plan, base, 5)
    assert (warm_steps, rest_steps) == (2, 3) and full.trainable == () and warm.trainable == ("attn.q@0,2",
                                                                                               "mlp.down@1")
    trainable, frozen = split_trainable(warm, params)
    batches = iter([_batch()] * warm_steps)
    state, _ = train(make_sft_loss(CFG), build_optimizer(warm, trainable), trainable, batches,
                     TrainConfig(steps=warm_steps, log_every=warm_steps), frozen=frozen)
    out = merge_params(state.params, frozen)
    for module in (*LINEAR_MODULES, "attn_norm", "mlp_norm"):
        a, b = _get(params, module), _get(out, module)
        for lay in range(3):
            if (module, lay) in plan.mods_robust:
                assert not np.array_equal(a[lay], b[lay]), (module, lay)
            else:
                np.testing.assert_array_equal(a[lay], b[lay], err_msg=f"{module}@{lay}")
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(out["embed"]))


def test_plan_round_trip_rules_and_validation(tmp_path):
    plans.save_plan(PLAN, tmp_path / "plan.json", {"eps": 0.2})
    assert plans.load_plan(tmp_path / "plan.json") == PLAN
    assert json.loads((tmp_path / "plan.json").read_text())["provenance"] == {"eps": 0.2}
    assert plans.robust_rules(PLAN) == ("attn.q@0,2", "mlp.down@1")
    assert plans.mllr_multipliers(PLAN)[-2:] == (("attn.q@0,2", 1.0), ("mlp.down@1", 1.0))
    assert plans.phases(dataclasses.replace(PLAN, kind="uniform"), OptimConfig(), 7) == [(7, OptimConfig())]
    with pytest.raises(ConfigError, match="outside the analysed modules"):
        plans.Plan(mods_robust=(("attn.q", 3),), modules=("attn.q",), num_layers=3)
    with pytest.raises(ConfigError, match="warmup_steps"):
        plans.Plan(kind="swat", mods_robust=(("attn.q", 0),), modules=("attn.q",), num_layers=3)
    with pytest.raises(ConfigError, match="must be <"):
        plans.phases(dataclasses.replace(PLAN, kind="swat", warmup_steps=9), OptimConfig(), 9)
    with pytest.raises(ConfigError, match="plan kind"):
        plans.Plan(kind="lora")


def test_run_config_plan_gives_the_optimizer_phases(tmp_path):
    from safety_jax.train.run import RunConfig, plan_phases

    base = OptimConfig(lr=1e-3)
    assert plan_phases(RunConfig(preset="tiny"), base, 6) == [(6, base)]
    plans.save_plan(dataclasses.replace(PLAN, kind="swat"), tmp_path / "swat.json")
    (n1, warm), (n2, full) = plan_phases(RunConfig(preset="tiny", plan=str(tmp_path / "swat.json")), base, 6)
    assert (n1, n2) == (2, 4) and warm.trainable == plans.robust_rules(PLAN) and full.trainable == ()
    plans.save_plan(PLAN, tmp_path / "mllr.json")
    (n, ocfg), = plan_phases(RunConfig(preset="tiny", plan=str(tmp_path / "mllr.json")), base, 6)
    assert n == 6 and ocfg.lr_multipliers == plans.mllr_multipliers(PLAN)
    with pytest.raises(ConfigError, match="plan file"):
        plan_phases(RunConfig(preset="tiny", plan=str(tmp_path / "missing.json")), base, 6)


@pytest.mark.slow
def test_train_cli_runs_a_saved_swat_plan_in_two_phases(tmp_path):
    from hf_models import make_tokenizer

    from safety_jax.model.hf import save_hf
    from safety_jax.model.io import load_model
    from safety_jax.train.run import load_run_config, run

    cfg = get_preset("tiny", vocab_size=64)
    params = init_params(cfg, jax.random.key(0))
    save_hf(cfg, params, tmp_path / "model", tokenizer=make_tokenizer(64))
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.jsonl", "w") as f:
        for _ in range(32):
            ids = rng.integers(3, 64, 5)
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids),
                                "completion": " ".join(f"w{i}" for i in ids[::-1])}) + "\n")
    plan = plans.Plan(kind="swat", mods_robust=(("mlp.up", 1),), modules=LINEAR_MODULES, num_layers=2,
                      warmup_steps=2)
    plans.save_plan(plan, tmp_path / "plan.json")
    rc = load_run_config(None, [f"model={tmp_path / 'model'}", f"out={tmp_path / 'out'}", f"plan={tmp_path}/plan.json",
                                f"data.path={tmp_path}/train.jsonl", "data.template=none", "data.max_length=16",
                                "batch_size=8", "optim.lr=1e-2", "train.steps=3", "train.log_every=1",
                                "train.progress=false"])
    result = run(rc)
    assert [r["step"] for r in result["history"] if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "out" / "phase0" / "metrics.jsonl").exists()
    _, trained = load_model(tmp_path / "out" / "model")
    assert not np.array_equal(np.asarray(trained["layers"]["mlp"]["gate"]), np.asarray(params["layers"]["mlp"]["gate"]))
