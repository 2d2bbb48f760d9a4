"""Study 1's report on fake metrics (no training): the contrast row, the seeds section and every figure; and the
synthetic-world evaluation's per-example Lipschitz values and per-direction row-space scores against numpy on a tiny
random Llama."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np
import pytest

from experiments.study1_mechanics import summary
from experiments.study1_mechanics.config import load_config
from safety_jax.data.synthetic import build_world, get_world_config
from safety_jax.model.config import get_preset

METHODS = ("ssft", "dpo", "dpo_standard", "unlearning")
LRS = ("eta_M", "eta_S")
FIGURES = ("tau_grid", "sin_theta_sorted", "row_space_directions", "lipschitz_hist", "tau_per_layer",
           "sin_theta_spectra", "accuracy_vs_alpha", "separation_vs_alpha", "attack_strength")
NEW_FIGURES = FIGURES[:4]


def quick_setup():
    cfg = load_config("quick")
    world_overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.world.overrides.items()}
    world = build_world(get_world_config(cfg.world.preset, **world_overrides))
    return cfg, world, get_preset(cfg.model.preset, **cfg.model.overrides)


def fake_metrics(n_layers: int = 2, lrs: tuple[str, ...] = LRS, *, seeds: bool = True, k: int = 4, d: int = 8,
                 n: int = 12) -> dict[str, Any]:
    """Every key summary.write reads, in run.py's layout (random numbers; standard DPO misses the refusal bar)."""
    rng = np.random.default_rng(0)
    models = ["pretrained", *(f"{m}@{lr}" for lr in lrs for m in METHODS)]
    ft = models[1:]
    vec = lambda *shape: rng.uniform(0.1, 1.0, size=shape).tolist()
    ev = {}
    for m in models:
        pre, weak = m == "pretrained", m.startswith("dpo_standard")
        ev[m] = {s: {"instruct_acc": 0.95, "null_acc": 0.1 if pre else 0.9, "refused": 0.1 if pre or weak else 0.95,
                     "harmful": 0.8 if pre else 0.03, "correct": 0.9, "other": 0.02} for s in summary.SETS}
    delta_w = {m: {mod: {"sin_theta_mean": 0.8, "sin_theta_top1": 0.9, "sin_theta_by_rank": vec(k),
                         "sin_theta": [[*vec(k - 1), None], *(vec(k) for _ in range(n_layers - 1))],
                         "random_baseline": 0.6, "pre_energy_rank": [20] * n_layers, "out_dim": 64,
                         "relative_norm": vec(n_layers), "delta_singular_values": vec(n_layers, k)}
                   for mod in summary.LINEAR_MODULES} for m in ft}
    metrics: dict[str, Any] = {
        "training": {m: {} for m in ft},
        "eval": ev,
        "boundary": {m: {kind: {"operators": {"refused": 0.5, "n": 10}, "text_family": {"refused": 0.4, "n": 6}}
                         for kind in ("safe", "unsafe")} for m in models},
        "tau": {m: {s: {"mean": (rng.normal(size=n_layers) + (1 if s != "unsafe" else -1)).tolist(),
                        "std": vec(n_layers)} for s in summary.SETS} for m in models},
        "separation": {m: [1.0 + i for i in range(n_layers)] if m != "pretrained" else [0.5] * n_layers
                       for m in models},
        "delta_w": delta_w,
        "lipschitz": {m: {s: {"mean": 1.0, "values": vec(n)} for s in ("safe", "unsafe")} for m in models},
        "row_space": {m: {mod: {s: {"mean": vec(n_layers), "per_direction": vec(n_layers, d), "rest": vec(n_layers)}
                                for s in ("safe", "unsafe")} for mod in ("mlp.gate", "mlp.up")} for m in models},
        "interpolation": {m: [{"alpha": a, "safe_instruct_acc": 0.9, "unsafe_null_acc": a / 2, "unsafe_refused": a / 2,
                               "unsafe_harmful": 1 - a / 2, "safe_correct": 0.9, "separation": a}
                              for a in (0.0, 0.5, 1.0, 1.5)] for m in ft},
        "attack": {m: [{"num_soft": ks, "steps": st, "success": 0.1 * st, "first_token_success": 0.2,
                        "target_acc": 0.5, "loss": 1.0, "tau_mean": [0.1 * st] * n_layers,
                        "tau_std": [0.1] * n_layers} for ks, st in ((0, 0), (1, 3), (1, 6))] for m in ft},
        "n_test": 32, "n_examples": n, "attack_n": 8,
        "timing": {"pretrain": 1.0, "evaluate": 2.0, "total_this_invocation": 3.0},
        "skipped_stages": [],
        "runs": {m: {"method": m.split("@")[0], "lr_name": m.split("@")[1], "lr": 1e-3, "steps": 5,
                     "batch_size": 16, "unsafe_frac": 0.5, "batch_mix": "per_example"} for m in ft},
    }
    if seeds:
        metrics["seeds"] = {
            "seeds": [0, 1, 2],
            "acceptance": [
                {"check": "ssft@eta_M: standard unsafe refused (generated)", "values": [0.9, 0.95, 1.0],
                 "mean": 0.95, "std": 0.04, "passes": 2, "n": 3, "contrast": False},
                {"check": "dpo_standard@eta_M: standard unsafe refused (generated)", "values": [0.3, 0.2, 0.4],
                 "mean": 0.3, "std": 0.08, "passes": None, "n": 3, "contrast": True}],
            "claims": [{"key": "separation_grows", "statement": "Cluster separation grows after safety fine-tuning",
                        "holds": [True, False, None],
                        "figures": {"separation ssft@eta_M": {"mean": 1.5, "std": 0.2, "values": [1.3, 1.5, 1.7]}}}],
        }
    return metrics


@dataclasses.dataclass(frozen=True)
class StubClaim:
    key: str
    statement: str
    holds: bool | None
    evidence: str
    reading: str
    figures: dict[str, Any]


def stub_claims(monkeypatch) -> None:
    """The claims interface of the rewrite (holds may be None, contrast rows with pass None), independent of it."""
    def acceptance(metrics):
        rows = []
        for m in summary._finetuned(metrics):
            contrast = m.startswith("dpo_standard")
            refused = metrics["eval"][m]["unsafe"]["refused"]
            rows.append({"check": f"{m}: standard unsafe refused (generated)", "value": refused, "target": ">= 0.9",
                         "pass": None if contrast else refused >= 0.9, "contrast": contrast})
        return rows

    claims = [StubClaim("separation_grows", "Cluster separation grows after safety fine-tuning", True, "ev.", "r.",
                        {"x": 1.0}),
              StubClaim("separation_lr", "Separation is larger at η_M than at η_S", None, "ev.", "r.", {})]
    monkeypatch.setattr(summary, "assess_claims", lambda metrics: claims)
    monkeypatch.setattr(summary, "acceptance", acceptance)
    monkeypatch.setattr(summary, "acceptance_reading", lambda metrics, checks: "")


def write_report(tmp_path, metrics) -> str:
    cfg, world, mcfg = quick_setup()
    summary.write(str(tmp_path), cfg, world, mcfg, metrics)
    with open(tmp_path / "report.md") as f:
        return f.read()


def section(report: str, title: str) -> str:
    start = report.index(f"\n## {title}")
    end = report.find("\n## ", start + 1)
    return report[start:end if end > 0 else None]


def contrast_lines(report: str) -> list[str]:
    """The acceptance table's rows of standard DPO."""
    return [ln for ln in section(report, "Acceptance checks").splitlines() if re.match(r"\| dpo_standard@\w+: ", ln)]


def assert_figures(tmp_path, report: str, names=FIGURES) -> None:
    for name in names:
        assert os.path.getsize(tmp_path / f"{name}.png") > 0, name
        assert f"({name}.png)" in report, name


def test_report_with_the_new_claims_interface(tmp_path, monkeypatch):
    stub_claims(monkeypatch)
    report = write_report(tmp_path, fake_metrics())
    lines = contrast_lines(report)
    assert len(lines) == 2 and not any("FAIL" in ln or "PASS" in ln for ln in lines)
    assert report.index("**Contrast: standard DPO**") < report.index(lines[0])
    assert "| ssft@eta_M: standard unsafe refused (generated) | 0.950 | >= 0.9 | PASS |" in report
    assert "Separation is larger at η_M than at η_S — NOT DECIDED" in report
    assert "## Over data orders (seeds 0, 1, 2)" in report
    assert re.search(r"\| ssft@eta_M: standard unsafe refused \(generated\) \| 0\.950 ± 0\.040 \| .* \| 2/3 \|",
                     report)
    assert re.search(r"\| dpo_standard@eta_M: .* \| contrast \|", report)
    assert "| Cluster separation grows after safety fine-tuning | 1/3 (1 not decided) |" in report
    assert "| separation_grows | separation ssft@eta_M | 1.500 ± 0.200 |" in report
    assert "| unlearning@eta_S | unlearning | eta_S | 0.001 | 5 | 16 | 50% | per_example |" in report
    assert_figures(tmp_path, report)
    assert "skipped" not in report


def test_report_with_the_run_claims(tmp_path):
    """The claims module as it stands decides on the same metrics; standard DPO still gets no FAIL mark."""
    report = write_report(tmp_path, fake_metrics())
    lines = contrast_lines(report)
    assert lines and not any("FAIL" in ln for ln in lines)
    assert "## Over data orders (seeds 0, 1, 2)" in report
    assert_figures(tmp_path, report)


def test_report_on_one_lr_one_layer_and_an_older_run(tmp_path, monkeypatch):
    """One learning rate, one layer, and the layouts of older runs (Lipschitz means only, row-space [L] lists, no
    per-layer sin θ, no runs or seeds): the report is written, figures that cannot be drawn say so."""
    stub_claims(monkeypatch)
    metrics = fake_metrics(n_layers=1, lrs=("eta_M",), seeds=False)
    metrics.pop("runs")
    metrics["lipschitz"] = {m: {s: 1.0 for s in ("safe", "unsafe")} for m in metrics["lipschitz"]}
    metrics["row_space"] = {m: {mod: {s: v["mean"] for s, v in sets.items()} for mod, sets in r.items()}
                            for m, r in metrics["row_space"].items()}
    for m in metrics["delta_w"].values():
        for r in m.values():
            del r["sin_theta"]
    report = write_report(tmp_path, metrics)
    assert "Over data orders" not in report and "Budgets" not in report
    for name in ("sin_theta_sorted", "row_space_directions", "lipschitz_hist"):
        assert f"_Figure `{name}.png` skipped:" in report
        assert not os.path.exists(tmp_path / f"{name}.png")
    assert_figures(tmp_path, report, ("tau_grid", "tau_per_layer", "attack_strength"))
    # the row-space / Lipschitz table reads the old lists and floats
    row = next(ln for ln in report.splitlines() if ln.startswith("| pretrained |") and ln.endswith("| 1.000 | 1.000 |"))
    assert "–" not in row and row.count("|") == 8


# ---------------------------------------------------------------------------------------- synthetic_world
@pytest.fixture(scope="module")
def tiny_model():
    from safety_jax.data.synthetic_sets import safety_batch
    from safety_jax.model.llama import init_params

    mcfg = get_preset("synthetic", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2)
    world = build_world(get_world_config("quick"))
    sets = {kind: safety_batch(world, kind, 6, seed) for seed, kind in enumerate(("safe", "unsafe"))}
    return mcfg, init_params(mcfg, jax.random.key(0)), init_params(mcfg, jax.random.key(1)), sets


def test_row_space_per_direction_scores_sum_to_the_scalar_score(tiny_model):
    from safety_jax.analysis.activations import collect_activations
    from safety_jax.analysis.weights import module_matrix
    from safety_jax.eval.synthetic_world import row_space_by_set

    mcfg, params, pre, sets = tiny_model
    plain = row_space_by_set(params, pre, mcfg, sets, batch_size=8)
    full = row_space_by_set(params, pre, mcfg, sets, batch_size=8, per_direction=True)
    top = row_space_by_set(params, pre, mcfg, sets, batch_size=8, per_direction=True, max_directions=5)
    for module in ("mlp.gate", "mlp.up"):
        w = np.asarray(module_matrix(pre, module), np.float64)  # [L, out=64, in=32]: r = 32 directions
        for name, b in sets.items():
            x = collect_activations(params, mcfg, b.transform, capture="mlp_in",
                                    capture_positions=b.gt_pos[:, None].astype(np.int32),
                                    batch_size=8)["mlp_in"][:, :, 0].astype(np.float64)  # [L, N, in]
            want_terms, want_score = [], []
            for layer in range(mcfg.num_hidden_layers):
                _, s, vh = np.linalg.svd(w[layer], full_matrices=False)
                cos = np.abs(x[layer] @ vh.T) / np.linalg.norm(x[layer], axis=1, keepdims=True)  # [N, r]
                want_terms.append((cos * s / s.sum()).mean(axis=0))
                want_score.append((cos @ s / s.sum()).mean())
            got = full[module][name]
            assert np.shape(got["per_direction"]) == (mcfg.num_hidden_layers, 32)
            np.testing.assert_allclose(got["per_direction"], want_terms, rtol=1e-4, atol=5e-6)  # float32 SVD
            np.testing.assert_allclose(np.sum(got["per_direction"], axis=1), plain[module][name], rtol=1e-5)
            np.testing.assert_allclose(got["mean"], plain[module][name], rtol=1e-5)
            np.testing.assert_allclose(plain[module][name], want_score, rtol=1e-4)
            np.testing.assert_allclose(got["rest"], 0.0, atol=1e-12)
            cut = top[module][name]
            assert np.shape(cut["per_direction"]) == (mcfg.num_hidden_layers, 5)
            np.testing.assert_allclose(np.sum(cut["per_direction"], axis=1) + cut["rest"], plain[module][name],
                                       rtol=1e-5)


def test_lipschitz_values_are_the_per_example_norms_behind_the_mean(tiny_model):
    from safety_jax.eval.synthetic_world import lipschitz_by_set

    mcfg, params, _, sets = tiny_model
    means = lipschitz_by_set(params, mcfg, sets, batch_size=8)
    full = lipschitz_by_set(params, mcfg, sets, batch_size=8, values=True)
    for name, b in sets.items():
        assert len(full[name]["values"]) == len(b) and all(v > 0 for v in full[name]["values"])
        np.testing.assert_allclose(full[name]["mean"], np.mean(full[name]["values"]), rtol=1e-12)
        np.testing.assert_allclose(full[name]["mean"], means[name], rtol=1e-6)
