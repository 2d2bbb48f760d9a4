"""Study 2's quick pipeline on study 1's quick stages: every output, the plans, the shared stages, a rerun runs no
stage; config errors name their field."""

from __future__ import annotations

import json
import os

import jax
import pytest

from experiments.study1_mechanics import run as study1
from experiments.study2_mllr import run as study2
from experiments.study2_mllr.config import load_config
from safety_jax.errors import ConfigError
from safety_jax.stages import Stages
from safety_jax.train import plans


@pytest.fixture(scope="module")
def quick(synthetic_out):
    before = jax.config.read("jax_disable_most_optimizations")  # many small programs: compile them fast
    jax.config.update("jax_disable_most_optimizations", True)
    out = synthetic_out
    cfg = load_config("quick")
    try:
        yield cfg, out, study2.run(cfg, out)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def test_quick_pipeline_writes_the_heat_map_mods_robust_table_and_claims(quick):
    cfg, out, metrics = quick
    folder = os.path.join(out, study2.STUDY)
    for name in ("report.md", "metrics.json", "results.md", "robustness_heatmap.png", "mods_robust.json",
                 "plan_mllr.json", "plan_swat.json"):
        assert os.path.exists(os.path.join(folder, name)), name
    assert [r["plan"] for r in metrics["rows"]] == ["aligned", "uniform", "mllr", "swat"]
    for r in metrics["rows"]:
        assert set(r["sets"]) == set(metrics["sets"]) and 0 <= r["probe_accuracy"] <= 1
    rob = metrics["robustness"]
    n_layers = metrics["num_layers"]
    assert len(rob["accuracy"]) == len(cfg.robustness.modules) and len(rob["accuracy"][0]) == n_layers
    assert len(rob["order"]) == len(cfg.robustness.modules) * n_layers
    saved = json.load(open(os.path.join(folder, "mods_robust.json")))
    assert saved["mods_robust"] == rob["mods_robust"] == rob["order"][:len(rob["mods_robust"])]
    mllr = plans.load_plan(os.path.join(folder, "plan_mllr.json"))
    assert [list(x) for x in mllr.mods_robust] == rob["mods_robust"] and mllr.gamma == cfg.plan.gamma
    swat = plans.load_plan(os.path.join(folder, "plan_swat.json"))
    assert swat.warmup_steps == round(cfg.plan.warmup_frac * metrics["steps"])
    assert [c["key"] for c in metrics["claims"]] == ["probe_separates", "benign_ft_raises", "mllr_lowers",
                                                    "swat_lowers", "robustness_regular"]
    report = open(os.path.join(folder, "report.md")).read()
    assert "Mods_Robust" in report and all(c["verdict"] in report for c in metrics["claims"])


def test_the_safety_tuned_model_is_study1s_stage_and_a_rerun_runs_no_stage(quick):
    cfg, out, _ = quick
    cfg1 = cfg.study1_config()
    pre_key = {k: v for k, v in __import__("dataclasses").asdict(cfg1).items()
               if k in ("seed", "world", "model", "pretrain")}
    keys = study1.finetune_keys(cfg1, pre_key, cfg1.seed)
    assert Stages(out).is_done(f"finetune_{cfg.base_run}", keys[cfg.base_run])
    again = study2.run(cfg, out)
    assert again["ran_stages"] == []


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="robustness.modules"):
        load_config("quick", ["robustness.modules=[attn.x]"])
    with pytest.raises(ConfigError, match="benign.plans"):
        load_config("quick", ["benign.plans=[mllr]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("quick", ["plan.gama=0.1"])
    for name in ("quick", "demo"):
        load_config(name)
