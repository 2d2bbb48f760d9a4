"""Study 1 end to end on the `quick` config: every stage runs, its outputs are sane, and a re-run skips every stage.

The quick model is far too small to learn the task, so this pins the pipeline's shape, not the study's numbers (the
`demo` config, run by hand or by the main job, is where the claims are decided).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments.study1_mechanics.claims import JAILBREAKS, assess_claims
from experiments.study1_mechanics.config import load_config
from experiments.study1_mechanics.run import run
from safety_jax.data.synthetic import build_world, get_world_config
from safety_jax.data.synthetic_sets import REFUSED

CLAIM_STATEMENTS = tuple(c.statement for c in assess_claims({}))  # every claim, in order (pinned in test_study1_claims)
ANALYSES = ("evaluate", "tau", "delta_w", "lipschitz_row_space", "interpolation", "attack")


def stages(cfg) -> list[str]:
    tuned = [f"finetune_{m}@{lr}" for lr in cfg.finetune.lrs for m in cfg.finetune.methods]
    return ["pretrain", *tuned, *ANALYSES]


@pytest.fixture(scope="module")
def quick_run(synthetic_out):
    out = synthetic_out
    cfg = load_config("quick")
    return cfg, out, run(cfg, out)


def test_quick_run_writes_every_output(quick_run):
    cfg, out, _ = quick_run
    for name in ("config.yaml", "metrics.json", "report.md", "tau_per_layer.png", "sin_theta_spectra.png",
                 "attack_strength.png", "accuracy_vs_alpha.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for stage in stages(cfg):
        assert os.path.exists(os.path.join(out, stage, "DONE")), stage
    for model in ("pretrain", "finetune_ssft@eta_M"):
        assert os.path.exists(os.path.join(out, model, "model", "config.json"))
        assert os.path.exists(os.path.join(out, model, "model", "model.safetensors"))
    assert cfg.finetune.method_overrides["dpo"]["steps"] != cfg.finetune.steps
    for method in cfg.finetune.methods:  # finetune.method_overrides gives DPO its own number of steps
        with open(os.path.join(out, f"finetune_{method}@eta_M", "history.json")) as f:
            assert json.load(f)[-1]["step"] == cfg.finetune.for_method(method).steps, method
    with open(os.path.join(out, "metrics.json")) as f:
        training = json.load(f)["training"]
    assert {m: t["last"]["step"] for m, t in training.items()} == {
        f"{m}@eta_M": cfg.finetune.for_method(m).steps for m in cfg.finetune.methods}


def test_a_method_started_from_another_methods_model_takes_it_as_its_dpo_reference(quick_run):
    from experiments.study1_mechanics.run import method_batch
    from safety_jax.model.config import get_preset
    from safety_jax.model.hf import load_hf
    from safety_jax.train import losses

    cfg, out, _ = quick_run
    assert cfg.finetune.for_method("dpo_standard").start_from == "ssft"
    with open(os.path.join(out, "finetune_dpo_standard@eta_M", "history.json")) as f:
        first = json.load(f)[0]
    assert first["step"] == 1
    # policy = reference at step 1: the DPO loss is log 2 and every reward 0
    np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(first["rewards/margins"], 0.0, atol=1e-5)
    # and that policy is the SSFT model, not the pretrained one: step 1's log-probs are the SSFT model's on batch 0
    world = build_world(get_world_config(cfg.world.preset))
    batch = method_batch(cfg, world, "dpo_standard", 0)
    mcfg = get_preset(cfg.model.preset, **cfg.model.overrides)
    loss_fn = losses.make_dpo_loss(mcfg, beta=cfg.finetune.beta_standard)
    logps = {}
    for name in ("finetune_ssft@eta_M", "pretrain"):
        params = load_hf(os.path.join(out, name, "model"))[1]
        logps[name] = float(loss_fn(params, batch, {"ref_params": params})[1]["logps/chosen"])
    np.testing.assert_allclose(first["logps/chosen"], logps["finetune_ssft@eta_M"], rtol=1e-5)
    assert abs(logps["finetune_ssft@eta_M"] - logps["pretrain"]) > 1e-2 * abs(logps["pretrain"])


def test_start_from_is_validated_and_orders_and_keys_the_runs():
    from experiments.study1_mechanics.run import _start_order, finetune_runs, start_run

    for bad, match in (("{dpo_standard: {start_from: sft}}", "not one of finetune.methods"),
                       ("{dpo: {start_from: dpo}}", "cycle dpo -> dpo"),
                       ("{ssft: {start_from: dpo}, dpo: {start_from: ssft}}", "cycle")):
        with pytest.raises(ValueError, match=match):
            load_config("quick", [f"finetune.method_overrides={bad}"])
    with pytest.raises(ValueError, match="not one of finetune.methods"):
        load_config("quick", ["finetune.methods=[dpo_standard]"])  # quick's dpo_standard starts from ssft
    cfg = load_config("quick", ["finetune.methods=[dpo_standard, unlearning, ssft]",
                                "finetune.lrs={eta_M: 1e-3, eta_S: 1e-4}"])
    runs = finetune_runs(cfg)
    assert start_run(cfg, "dpo_standard@eta_S") == "ssft@eta_S" and start_run(cfg, "ssft@eta_S") is None
    order = _start_order(cfg, runs)
    assert sorted(order) == sorted(runs)
    assert order.index("ssft@eta_M") < order.index("dpo_standard@eta_M")
    assert order.index("ssft@eta_S") < order.index("dpo_standard@eta_S")


def test_quick_metrics_are_sane(quick_run):
    cfg, out, _ = quick_run
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    models = ["pretrained", *(f"{meth}@eta_M" for meth in cfg.finetune.methods)]
    assert sorted(m["eval"]) == sorted(models)
    n_layers = cfg.model.overrides["num_hidden_layers"]
    for model in models:
        assert set(m["eval"][model]) == {"safe", "unsafe", *JAILBREAKS}
        for metrics in m["eval"][model].values():
            for key in ("instruct_acc", "null_acc", "refused", "harmful", "correct", "other"):
                assert 0.0 <= metrics[key] <= 1.0, (model, key)
            assert metrics["refused"] + metrics["harmful"] + metrics["correct"] + metrics["other"] == pytest.approx(1)
        for stats in m["tau"][model].values():
            assert np.asarray(stats["mean"]).shape == (n_layers,)
            assert np.all(np.asarray(stats["std"]) >= 0)
        assert np.asarray(m["separation"][model]).shape == (n_layers,)
        for kind in ("safe", "unsafe"):
            rules = m["boundary"][model][kind]
            assert set(rules) == {"operators", "text_family"}
            assert sum(r["n"] for r in rules.values()) == cfg.world.n_test
            assert all(r["n"] == 0 or 0.0 <= r["refused"] <= 1.0 for r in rules.values())
            verdicts = np.asarray(m["eval"][model][kind]["verdicts"])
            assert len(verdicts) == cfg.world.n_test
            assert np.mean(verdicts == REFUSED) == pytest.approx(m["eval"][model][kind]["refused"])
        lip = m["lipschitz"][model]["safe"]
        assert lip["mean"] > 0 and len(lip["values"]) == cfg.analysis.n_examples
        assert lip["mean"] == pytest.approx(np.mean(lip["values"]), rel=1e-5)
    for model in models[1:]:
        sin = np.asarray(m["delta_w"][model]["mlp.down"]["sin_theta"], float)
        assert sin.shape[0] == n_layers and np.all((sin >= -1e-6) & (sin <= 1 + 1e-6))
        assert [r["alpha"] for r in m["interpolation"][model]] == cfg.analysis.alphas
        attack = m["attack"][model]
        assert len(attack) == 1 + len(cfg.analysis.attack_num_soft) * cfg.analysis.attack_rounds
        assert all(0.0 <= r["success"] <= 1.0 and len(r["tau_mean"]) == n_layers for r in attack)
    assert [c["statement"] for c in m["claims"]] == list(CLAIM_STATEMENTS)


def test_report_states_each_claim_with_a_verdict(quick_run):
    _, out, _ = quick_run
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    for statement in CLAIM_STATEMENTS:
        line = next(ln for ln in report.splitlines() if statement in ln)
        assert any(f"— {verdict}." in line for verdict in ("HOLDS", "DOES NOT HOLD", "NOT DECIDED")), line
    assert "## Acceptance checks" in report and "## This run" in report


def test_rerun_skips_every_stage(quick_run):
    cfg, out, first = quick_run
    again = run(cfg, out)
    assert again["skipped_stages"] == stages(cfg)
    assert again["eval"] == first["eval"]


def test_changing_one_methods_setting_recomputes_that_method_and_what_follows(quick_run):
    cfg, out, _ = quick_run  # runs after the re-run test: it leaves the folder on another unlearning setting
    changed = load_config("quick", ["finetune.rejected_weight=0.2"])
    skipped = set(run(changed, out)["skipped_stages"])
    assert {"pretrain", "finetune_ssft@eta_M", "finetune_dpo@eta_M"} <= skipped
    assert not skipped & {"finetune_unlearning@eta_M", *ANALYSES}


# ---------------------------------------------------------------------------------------------------- fast unit tests
def test_refusal_lists_are_the_published_ones_and_match_as_substrings():
    from safety_jax.eval.judges import REFUSAL_GCG_29, REFUSAL_JBB_13, SubstringJudge

    assert len(REFUSAL_GCG_29) == 29 and len(set(REFUSAL_GCG_29)) == 29
    assert REFUSAL_JBB_13 == REFUSAL_GCG_29[:13] and REFUSAL_GCG_29[-1] == "I can't assist"
    judge = SubstringJudge.named("GCG-29")
    answers = ["Sure, here is how", "I'm sorry, but no", "that would be illegal", "as an AI model"]
    np.testing.assert_array_equal(judge.refused(answers), [False, True, True, False])  # case-sensitive
    np.testing.assert_array_equal(SubstringJudge.named("GCG-29", case_sensitive=False).refused(answers[3:]), [True])
    np.testing.assert_array_equal(judge.attack_success(answers), [True, False, False, True])
    with pytest.raises(ValueError, match="known: GCG-29, JBB-13"):
        SubstringJudge.named("GCG-30")


def test_synthetic_judge_rates_refusal_and_harmful_answers():
    from safety_jax.data.synthetic import build_world, get_world_config
    from safety_jax.data.synthetic_sets import completions, safety_batch
    from safety_jax.eval.judges import judge_synthetic, verdict_rates

    world = build_world(get_world_config("quick"))
    batch = safety_batch(world, "unsafe", 8, 0)
    answers = np.concatenate([completions(batch, batch.refusal)[:4], completions(batch, batch.transform)[4:]])
    rates = verdict_rates(judge_synthetic(batch, answers))
    assert rates == {"refused": 0.5, "harmful": 0.5, "correct": 0.0, "other": 0.0}


def test_report_writer_converts_numpy_and_nan_to_json(tmp_path):
    from safety_jax.report import Report, markdown_table

    rep = Report(tmp_path, "t")
    rep.metrics["x"] = {"a": np.arange(3), "b": np.float32("nan"), "c": np.bool_(True)}
    rep.table([{"m": "ssft", "acc": 0.91234}], caption="cap")
    _, js = rep.write()
    with open(js) as f:
        assert json.load(f) == {"x": {"a": [0, 1, 2], "b": None, "c": True}}
    assert "| ssft | 0.912 |" in markdown_table([{"m": "ssft", "acc": 0.91234}])


def test_config_rejects_unknown_keys_and_bad_lr_scale():
    from experiments.study1_mechanics.run import finetune_runs

    cfg = load_config("quick", ["finetune.lrs={eta_M: 1e-3, eta_S: 1e-4}", "finetune.methods=[ssft, unlearning]",
                                "finetune.lr_scale={unlearning: 0.5}"])
    assert finetune_runs(cfg) == {"ssft@eta_M": ("ssft", 1e-3), "unlearning@eta_M": ("unlearning", 5e-4),
                                  "ssft@eta_S": ("ssft", 1e-4), "unlearning@eta_S": ("unlearning", 5e-5)}
    with pytest.raises(ValueError, match="finetune.lr_scale"):
        load_config("quick", ["finetune.lr_scale={unlearn: 0.5}"])
    with pytest.raises(ValueError, match="finetune.lr_scale"):
        load_config("quick", ["finetune.lr_scale={dpo: 0}"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config("quick", ["finetune.learning_rate=1e-3"])
    for bad, field in (("{dop: {steps: 10}}", "method_overrides"), ("{dpo: 10}", "method_overrides.dpo"),
                       ("{dpo: {lrs: {eta_M: 1}}}", "method_overrides.dpo"),
                       ("{dpo: {step: 10}}", "method_overrides.dpo"),
                       ("{dpo: {steps: 0}}", "method_overrides.dpo.steps"),
                       ("{dpo: {steps: 2.5}}", "method_overrides.dpo.steps"),
                       ("{unlearning: {unsafe_frac: 1.5}}", "method_overrides.unlearning.unsafe_frac"),
                       ("{ssft: {batch_mix: mixed}}", "method_overrides.ssft.batch_mix")):
        with pytest.raises(ValueError, match=f"finetune.{field}"):
            load_config("quick", [f"finetune.method_overrides={bad}"])
    spec = load_config("quick", ["finetune.method_overrides={ssft: {steps: 9, unsafe_frac: 0.25}}"]).finetune
    assert (spec.for_method("ssft").steps, spec.for_method("ssft").unsafe_frac) == (9, 0.25)
    assert spec.for_method("dpo") == dataclasses.replace(spec, method_overrides={})
    with pytest.raises(ValueError, match="finetune.batch_mix"):
        load_config("quick", ["finetune.batch_mix=mixed"])
    with pytest.raises(ValueError, match="finetune.unsafe_frac"):
        load_config("quick", ["finetune.unsafe_frac=2"])


def test_per_example_batch_mix_puts_unsafe_rows_in_every_batch():
    from experiments.study1_mechanics.run import safety_batches

    cfg = load_config("quick", ["finetune.batch_mix=per_example", "finetune.unsafe_frac=0.5",
                                "finetune.batch_size=8"])
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.world.overrides.items()}
    world = build_world(get_world_config(cfg.world.preset, **overrides))
    for step in range(3):
        assert safety_batches(cfg, world, step).is_unsafe.sum() == 4
    per_batch = load_config("quick", ["finetune.batch_mix=per_batch", "finetune.unsafe_frac=0.5",
                                      "finetune.batch_size=8"])
    counts = {int(safety_batches(per_batch, world, s).is_unsafe.sum()) for s in range(20)}
    assert counts == {0, 8}
    own = load_config("quick", ["finetune.batch_mix=per_example", "finetune.unsafe_frac=0.5", "finetune.batch_size=8",
                                "finetune.method_overrides={dpo: {unsafe_frac: 0.75}}"])
    assert safety_batches(own, world, 0, "dpo").is_unsafe.sum() == 6
    assert safety_batches(own, world, 0, "ssft").is_unsafe.sum() == 4


def test_finetune_batches_follow_the_target_settings_and_the_data_seed():
    from experiments.study1_mechanics.run import method_batch, safety_batches

    cfg = load_config("quick", ["finetune.unsafe_frac=0.5"])
    world = build_world(get_world_config(cfg.world.preset))
    batch = safety_batches(cfg, world, 0)
    for key, value in batch.sft().items():
        np.testing.assert_array_equal(method_batch(cfg, world, "ssft", 0)[key], value)
    for method in ("dpo", "dpo_standard", "unlearning"):
        mb = safety_batches(cfg, world, 0, method)  # with the method's own overrides (quick's DPO: unsafe_frac)
        for over, want in (([], mb.dpo()), (["finetune.pair_targets=output"], mb.dpo(pair_targets="output")),
                           (["finetune.pad_targets=true"], mb.dpo(pad_targets=True))):
            got = method_batch(load_config("quick", ["finetune.unsafe_frac=0.5", *over]), world, method, 0)
            for key, value in want.items():
                np.testing.assert_array_equal(got[key], value, err_msg=f"{method} {over} {key}")
    # the reference's masks differ from scoring every output token: the harmful answer's second segment
    dec, out = batch.dpo(), batch.dpo(pair_targets="output")
    assert (out["rejected_loss_mask"].sum(1) > dec["rejected_loss_mask"].sum(1))[batch.is_unsafe].all()
    # the data seed changes the batches, not their settings
    other = method_batch(cfg, world, "ssft", 0, data_seed=cfg.seed + 1)
    assert not np.array_equal(other["tokens"], method_batch(cfg, world, "ssft", 0)["tokens"])
    assert second_segment_share(cfg, world) > 0


def second_segment_share(cfg, world) -> float:
    from experiments.study1_mechanics.run import safety_batches

    rows = [safety_batches(cfg, world, s) for s in range(20)]
    unsafe = np.concatenate([b.refuse_seg[b.is_unsafe] for b in rows])
    return float(unsafe.mean())


@pytest.mark.slow  # a second seed of every fine-tuning run (~25 s); the sweep tests cover seeds in CI
def test_seeds_rerun_the_finetuning_and_report_the_spread(quick_run):
    cfg, out, _ = quick_run
    m = run(cfg, out, seeds=[cfg.seed, cfg.seed + 1])
    tag = f".seed{cfg.seed + 1}"
    assert "pretrain" in m["skipped_stages"]  # one pretrained model for every data order
    for stage in stages(cfg)[1:]:
        assert os.path.exists(os.path.join(out, stage + tag, "DONE")), stage
    seeds = m["seeds"]
    assert seeds["seeds"] == [cfg.seed, cfg.seed + 1]
    assert all(len(row["values"]) == 2 for row in seeds["acceptance"])
    assert [c["key"] for c in seeds["claims"]] == [c.key for c in assess_claims(m)]
    with open(os.path.join(out, "report.md")) as f:
        assert "seeds" in f.read().lower()


def test_a_method_setting_enters_only_that_methods_stage_key():
    import dataclasses

    from experiments.study1_mechanics.config import METHOD_FIELDS, METHODS, FinetuneSpec

    names = {f.name for f in dataclasses.fields(FinetuneSpec)}
    assert set(METHOD_FIELDS) == set(METHODS) and all(set(v) <= names for v in METHOD_FIELDS.values())
    base = load_config("quick").finetune
    for field, value, owner in (("beta_standard", 0.5, "dpo_standard"), ("beta_chosen", 0.3, "dpo"),
                                ("rejected_weight", 0.2, "unlearning")):
        changed = load_config("quick", [f"finetune.{field}={value}"]).finetune
        for method in METHODS:
            assert (changed.key_for(method) != base.key_for(method)) == (method == owner), (field, method)
    pairs = load_config("quick", ["finetune.pair_targets=output"]).finetune  # read by the three pair losses
    assert [m for m in METHODS if pairs.key_for(m) != base.key_for(m)] == ["dpo", "dpo_standard", "unlearning"]
    shared = load_config("quick", ["finetune.warmup_steps=3"]).finetune
    assert all(shared.key_for(m) != base.key_for(m) for m in METHODS)
    shadowed = load_config("quick", ["finetune.unsafe_frac=0.25"]).finetune  # quick's DPO has its own unsafe_frac
    assert [m for m in METHODS if shadowed.key_for(m) == base.key_for(m)] == ["dpo"]
    own = load_config("quick", ["finetune.method_overrides.ssft={steps: 11, unsafe_frac: 0.25}"]).finetune
    assert own.key_for("ssft")["steps"] == 11 and own.key_for("ssft")["unsafe_frac"] == 0.25
    assert all(own.key_for(m) == base.key_for(m) for m in METHODS if m != "ssft")
