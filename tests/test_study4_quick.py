"""Study 4's synthetic pipeline end to end on the quick config: outputs, counts that match a recount of the stored
verdicts, a rerun that runs no stage, and study 1's stages shared (same names and fingerprints) rather than copied."""

from __future__ import annotations

import json
import os

import pytest

from experiments.study4_antidote import run as study4
from experiments.study4_antidote.config import load_config
from safety_jax.data.synthetic_sets import CORRECT, HARMFUL
from safety_jax.stages import Stages


@pytest.fixture(scope="module")
def quick(synthetic_out):
    out = synthetic_out
    return out, study4.run(load_config("quick"), out)


def test_quick_run_writes_table_plots_claims_and_metrics(quick):
    out, metrics = quick
    folder = os.path.join(out, study4.STUDY)
    for name in ("report.md", "metrics.json", "results.md", "alpha.png", "lr.png", "config.yaml"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    report = open(os.path.join(folder, "report.md")).read()
    keys = {c["key"] for c in metrics["claims"]}
    assert keys == {"harmful_ft_raises", "antidote_lowers", "alpha_tradeoff", "wanda_beats_ablations",
                    "antidote_every_lr"}
    for c in metrics["claims"]:
        assert c["verdict"] in report and c["statement"] in report
    cfg = load_config("quick")
    n_cells = len(cfg.user.p) * len(cfg.user.lrs) * len(cfg.user.epochs)
    others = [d for d in cfg.defense if d not in ("none", "antidote")]
    assert set(others) == {"vaccine", "lisa", "booster"}  # quick wires every defense through the pipeline
    per_cell = 1 + len(cfg.antidote.ratios) * len(cfg.antidote.scores) + len(others)
    realigned = [f"aligned_{d}" for d in others if d in study4.ALIGNMENT_DEFENSES]  # Vaccine's / Booster's
    assert len(metrics["rows"]) == 1 + len(realigned) + n_cells * per_cell
    assert {r["defense"] for r in metrics["rows"]} == {"aligned", "none", "antidote", *others, *realigned}


def test_harmful_scores_match_a_recount_of_the_verdicts(quick):
    out, metrics = quick
    for row in metrics["rows"]:
        assert row["harmful_k"] == sum(v == HARMFUL for v in row["verdicts_unsafe"])
        assert row["task_k"] == sum(v == CORRECT for v in row["verdicts_safe"])
        assert row["harmful_n"] == len(row["verdicts_unsafe"]) == load_config("quick").eval.n_test
    table = open(os.path.join(out, study4.STUDY, "results.md")).read().splitlines()[2:]
    assert len(table) == len(metrics["rows"])
    for line, row in zip(table, metrics["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[6]) == pytest.approx(100 * row["harmful_k"] / row["harmful_n"], abs=0.05)
    stored = json.load(open(os.path.join(out, "study4_eval_aligned", "result.json")))
    assert stored["harmful_k"] == metrics["rows"][0]["harmful_k"]


def test_rerun_runs_no_stage(quick):
    out, first = quick
    again = study4.run(load_config("quick"), out)
    assert again["ran_stages"] == []
    assert [r["harmful_k"] for r in again["rows"]] == [r["harmful_k"] for r in first["rows"]]


def test_alignment_is_study_1s_stages_with_study_1s_fingerprints(quick, monkeypatch):
    """Study 1's runner, asked for its models in the same folder, would find exactly the stages study 4 made."""
    from experiments.study1_mechanics import run as study1

    out, _ = quick
    asked: dict[str, bool] = {}

    class Probe(Stages):
        def model(self, name, depends_on, config, world, fn, **kw):
            asked[name] = self.is_done(name, depends_on)
            if name == "finetune_ssft@eta_M":
                raise StopIteration  # study 4's aligned model: nothing further to compare
            return study1.init_params(config, study1.jax.random.key(0))

    monkeypatch.setattr(study1, "Stages", Probe)
    with pytest.raises(StopIteration):
        study1.run(load_config("quick").study1_config(), out)
    assert asked["pretrain"] and asked["finetune_ssft@eta_M"]
