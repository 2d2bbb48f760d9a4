"""Study 3's synthetic pipeline end to end on the quick config: outputs, claims in the report, the analyses' shapes,
study 1's stages shared (not copied), a rerun that runs no stage; and the config's validation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments.study1_mechanics import run as study1
from experiments.study3_residual import run as study3
from experiments.study3_residual import synthetic
from experiments.study3_residual.config import load_config
from safety_jax.data.synthetic import build_world, get_world_config
from safety_jax.data.synthetic_sets import safety_batch
from safety_jax.errors import ConfigError
from safety_jax.stages import Stages


@pytest.fixture(scope="module")
def quick(synthetic_out, fast_compiles):
    out = synthetic_out
    return out, study3.run(load_config("quick"), out)


def test_quick_run_writes_report_plots_claims_and_metrics(quick):
    out, metrics = quick
    folder = os.path.join(out, study3.STUDY)
    for name in ("report.md", "metrics.json", "config.yaml", "accuracy_per_layer.png", "effective_rank.png",
                 "spectra.png", "activation_norms.png", "attribution_heatmap.png", "intervention.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    report = open(os.path.join(folder, "report.md")).read()
    assert {c["key"] for c in metrics["claims"]} == {"low_rank", "dominant_predicts_late", "intervention_monotone",
                                                     "exposure_helps", "trigger_hardest"}
    for c in metrics["claims"]:
        assert c["verdict"] in report and c["statement"] in report
    assert json.load(open(os.path.join(folder, "metrics.json")))["claims"] == json.loads(json.dumps(metrics["claims"]))


def test_analyses_have_the_configured_shapes(quick):
    _, metrics = quick
    cfg = load_config("quick")
    n_layers = cfg.study1_config().model.overrides["num_hidden_layers"]
    assert list(metrics["pairs"]) == ["pretrained->ssft@eta_M", "pretrained->dpo@eta_M"]
    for r in metrics["pairs"].values():
        share = np.asarray(r["share"])
        assert share.shape[0] == n_layers and np.all(np.diff(share, axis=1) <= 1e-6)
        assert np.asarray(r["effective_rank"]).shape == (n_layers, len(cfg.shift.thresholds))
        assert len(r["dominant_acc"]) == len(r["random_acc_q95"]) == n_layers
        assert r["n"] == 7 * cfg.eval.n_per_set
    assert [row["alpha"] for row in metrics["intervention"]] == cfg.intervention.alphas
    assert [row["count"] for row in metrics["exposure"]] == cfg.exposure.counts
    for row in metrics["exposure"]:
        assert set(cfg.exposure.families) <= set(row) and row["gcg"]["n"] == cfg.eval.n_test
    assert np.asarray(metrics["attribution"]["heat"]).shape == (n_layers, cfg.attribution.components)


def test_study1_stages_are_shared_and_a_rerun_runs_nothing(quick):
    out, metrics = quick
    cfg1 = load_config("quick").study1_config()
    s1 = study1.study1_models(cfg1, Stages(out), ["ssft@eta_M", "dpo@eta_M"])
    st = Stages(out)
    assert st.is_done("pretrain", s1.pre_key) and st.is_done("finetune_ssft@eta_M", s1.keys["ssft@eta_M"])
    again = study3.run(load_config("quick"), out)
    assert again["ran_stages"] == [] and again["claims"] == metrics["claims"]


def test_config_errors_name_the_field():
    for override, field in (("shift.variant=affine", "shift.variant"), ("exposure.counts=[0, 0]", "exposure.counts"),
                            ("shift.pairs=[[ssft@eta_M, pretrained]]", "shift.pairs"),
                            ("exposure.families=[pair]", "exposure.families"), ("intervention.alphas=[-1]",
                                                                                  "intervention.alphas")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config("quick", [override])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("quick", ["attack.suffix=3"])
    for name in ("quick", "demo"):
        assert load_config(name).name == name


def test_with_ops_rebuilds_a_batch_and_the_rewriter_keeps_inputs_unsafe():
    world = build_world(get_world_config("quick"))
    batch = safety_batch(world, "unsafe", 32, 0, second_segment_refusal=0.3)
    same = synthetic.with_ops(world, batch, batch.ops)
    for field in ("tokens", "refusal", "transform", "refuse_seg", "is_unsafe"):
        np.testing.assert_array_equal(getattr(same, field), getattr(batch, field), err_msg=field)
    safe = safety_batch(world, "safe", 8, 1)
    swapped = synthetic.with_ops(world, safe, batch.ops[:8][:, ::-1].copy())
    want = [bool(world.unsafe[g, int(b != 0)][o].any()) for g, b, o in zip(safe.grammar, safe.branch, swapped.ops)]
    assert swapped.is_unsafe.tolist() == want
    prompts, mask = synthetic.left_padded_prompts(batch)
    rewrite = synthetic.operator_rewriter(world, batch)
    start = int(np.argmax(mask[0]))
    for t, _, _ in rewrite(prompts[0], mask[0], np.zeros_like(mask[0], bool), start + 1, 0):
        ops = t[start + 1:start + 1 + batch.ops.shape[1]]
        assert world.unsafe[batch.grammar[0], int(batch.branch[0] != 0)][ops].any()


def test_dominant_intervention_edits_the_last_token_after_every_block():
    dirs, scale = np.eye(4, 8, dtype=np.float32), np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    add = synthetic.dominant_intervention(dirs, scale, 0.5)
    assert [(iv.kind, iv.site, iv.tokens) for iv in add] == [("add", "resid_post", "last_prompt"),
                                                             ("add", "resid_post", "generated")]
    np.testing.assert_allclose(np.asarray(add[0].coeff), -0.5 * scale)
    proj = synthetic.dominant_intervention(dirs, scale, 0.5, "project")
    assert {iv.kind for iv in proj} == {"project_out"}
