"""Study 1's claims and acceptance checks on synthetic metrics: every claim holds on one dict and fails on another
(and is not decided where the run cannot decide it); the statistics against hand-computed values; seeds aggregated.

``make_metrics`` builds one run's metrics (the layout ``run.py`` writes) on which every claim holds; each test then
breaks the one input its claim reads.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from experiments.study1_mechanics import claims as C
from experiments.study1_mechanics.claims import (
    JAILBREAKS,
    MLP_MODULES,
    acceptance,
    acceptance_reading,
    aggregate_seeds,
    assess_claims,
)

L, N, K = 4, 256, 10  # layers, examples per test set, ΔW directions per layer
STUDY = ("ssft", "dpo", "unlearning")
KEYS = ["separation_grows", "separation_order", "separation_lr", "delta_w_outside",
        *(f"jailbreak_{f}" for f in JAILBREAKS), "attack", "lipschitz", "interpolation", "robust_vs_ssft"]


def rates(refused: float = 0.0, harmful: float = 0.0, instruct: float = 0.95, n: int = N) -> dict:
    """One test set's evaluation; the verdicts list carries n (its codes are not read by the claims)."""
    return {"instruct_acc": instruct, "null_acc": refused, "refused": refused, "harmful": harmful, "correct": 0.0,
            "other": max(0.0, 1 - refused - harmful), "verdicts": [0] * n}


def tau_sets(jb_tau: float = 0.0, std: float = 1.0) -> dict:
    return {"safe": {"mean": [1.0] * L, "std": [std] * L}, "unsafe": {"mean": [-1.0] * L, "std": [std] * L},
            **{f: {"mean": [jb_tau] * L, "std": [std] * L} for f in JAILBREAKS}}


def attack_rows(success: float = 0.5, tau_end: float = 0.5) -> list[dict]:
    rows = [{"num_soft": 0, "steps": 0, "success": 0.0, "first_token_success": 0.0, "target_acc": 0.1,
             "tau_mean": [-1.0] * L, "tau_std": [0.5] * L}]
    for k in (1, 4):
        for i, steps in enumerate((10, 20, 30), 1):
            frac = i / 3 * (k / 4)
            rows.append({"num_soft": k, "steps": steps, "success": success * frac, "first_token_success": frac,
                         "target_acc": 0.5, "tau_mean": [-1.0 + (tau_end + 1.0) * frac] * L, "tau_std": [0.5] * L})
    return rows


def make_metrics(lrs: tuple[str, ...] = ("eta_M",)) -> dict:
    """Metrics of one run on which every claim holds: SSFT, the study's DPO and unlearning (and the contrast
    dpo_standard) at each lr name, all at one budget per lr name."""
    sep = {"ssft": 1.0, "dpo": 2.0, "unlearning": 3.0, "dpo_standard": 1.5}
    jb_harm = {"ssft": 0.4, "dpo": 0.1, "unlearning": 0.1, "dpo_standard": 0.2}
    lip = np.linspace(0.5, 1.5, 64)
    models = {"pretrained": (None, None)}
    models |= {f"{m}@{lr}": (m, lr) for lr in lrs for m in sep}
    scale = {"eta_M": 1.0, "eta_S": 0.5}
    out: dict = {"n_test": N, "attack_n": 32, "n_examples": 128, "eval": {}, "tau": {}, "separation": {},
                 "runs": {}, "delta_w": {}, "attack": {}, "lipschitz": {}, "interpolation": {}, "training": {}}
    for name, (meth, lr) in models.items():
        out["tau"][name] = tau_sets()
        out["lipschitz"][name] = {s: {"mean": float(lip.mean()), "values": lip.tolist()} for s in ("safe", "unsafe")}
        if meth is None:
            out["eval"][name] = {"safe": rates(), "unsafe": rates(harmful=0.9),
                                 **{f: rates(harmful=0.9) for f in JAILBREAKS}}
            out["separation"][name] = [0.2] * L
            continue
        out["eval"][name] = {"safe": rates(instruct=0.94, refused=0.01), "unsafe": rates(refused=0.95, harmful=0.02),
                             **{f: rates(refused=0.5, harmful=jb_harm[meth]) for f in JAILBREAKS}}
        out["separation"][name] = [sep[meth] * scale[lr]] * L
        out["runs"][name] = {"method": meth, "lr_name": lr, "lr": 1e-3 * scale[lr], "steps": 1000, "batch_size": 16,
                             "unsafe_frac": 0.5, "batch_mix": "per_example"}
        out["delta_w"][name] = {mod: {"sin_theta": [[0.95] * K] * L, "pre_energy_rank": [64] * L, "out_dim": 256,
                                      "random_baseline": math.sqrt(1 - 64 / 256), "relative_norm": [0.1] * L}
                                for mod in MLP_MODULES}
        out["attack"][name] = attack_rows()
        out["lipschitz"][name]["unsafe"] = {"mean": float(lip.mean() / 2), "values": (lip / 2).tolist()}
        out["interpolation"][name] = [{"alpha": a, "unsafe_refused": r, "safe_instruct_acc": 0.94, "separation": 1.0}
                                      for a, r in ((0.0, 0.0), (0.5, 0.3), (1.0, 0.6), (1.5, 0.9))]
    return out


def claim(metrics: dict, key: str) -> C.Claim:
    found = {c.key: c for c in assess_claims(metrics)}
    assert list(found) == KEYS
    return found[key]


# ---------------------------------------------------------------------------------------------------- statistics
def test_statistics_match_hand_computed_values():
    assert C.normal_sf(C.Z_ONE_SIDED) == pytest.approx(0.05, abs=1e-12)
    assert C.wilson(0, 10)[1] == pytest.approx(C.Z_WILSON**2 / (10 + C.Z_WILSON**2))  # upper bound at k = 0
    np.testing.assert_allclose(C.wilson(5, 10), (0.2366, 0.7634), atol=1e-4)
    z, p = C.prop_greater(30, 100, 20, 100)  # pooled 0.25: se = sqrt(0.25 · 0.75 · 0.02)
    assert z == pytest.approx(0.1 / math.sqrt(0.25 * 0.75 * 0.02)) and p == pytest.approx(0.05123, abs=1e-4)
    assert C.prop_greater(0, 32, 0, 32) == (0.0, 1.0)
    assert C.sign_test(10, 10) == 2**-10 and C.sign_test(0, 10) == 1.0
    assert C.sign_test(8, 10) == pytest.approx((45 + 10 + 1) / 1024)
    a = np.linspace(1, 2, 50)
    lo, hi = C.bootstrap_ratio(a / 2, a)
    assert lo < 0.5 < hi < 0.6 and C.bootstrap_ratio(a / 2, a) == (lo, hi)  # seeded: the same interval twice


def test_every_claim_holds_on_the_holding_metrics_and_has_figures():
    metrics = make_metrics(("eta_M", "eta_S"))
    got = assess_claims(metrics)
    assert [c.key for c in got] == KEYS
    assert {c.key: c.holds for c in got} == dict.fromkeys(KEYS, True)
    assert all(c.figures and "HOLDS." in c.line() for c in got)


def test_missing_inputs_leave_every_claim_not_decided_without_a_crash():
    for metrics, decidable in (({}, []), ({"separation": {"pretrained": [0.1]}}, []),
                               ({"eval": make_metrics()["eval"]}, ["robust_vs_ssft"])):  # needs eval alone
        got = assess_claims(metrics)
        assert [c.key for c in got] == KEYS
        assert [c.key for c in got if c.holds is not None] == decidable
        assert all("NOT DECIDED" in c.line() for c in got if c.key not in decidable)
    broken = make_metrics()
    broken["attack"]["ssft@eta_M"] = [{"num_soft": 0, "steps": 0}, {"num_soft": 1, "steps": 10}]  # no success
    c = claim(broken, "attack")
    assert c.holds is None and "KeyError" in c.reading


# ---------------------------------------------------------------------------------------------------- claims 1-3
def test_separation_grows_only_beyond_the_uncertainty_of_tau():
    m = make_metrics()
    assert claim(m, "separation_grows").holds
    m["separation"]["ssft@eta_M"] = [0.25] * L  # 0.05 above pretrained, standard error ~0.09 each
    c = claim(m, "separation_grows")
    assert c.holds is False and "ssft@eta_M did not widen" in c.reading
    m = make_metrics()
    m["separation"]["dpo_standard@eta_M"] = [0.0] * L  # a contrast does not decide
    assert claim(m, "separation_grows").holds
    del m["tau"]["pretrained"]
    assert claim(m, "separation_grows").holds is None


def test_separation_order_is_decided_at_equal_budgets_only():
    m = make_metrics()
    assert claim(m, "separation_order").holds
    m["separation"] |= {"ssft@eta_M": [0.3, 0.5, 0.3, 0.5], "dpo@eta_M": [5.0, 7.0, 5.0, 7.0],
                        "unlearning@eta_M": [1.0, 2.0, 1.0, 2.0]}
    c = claim(m, "separation_order")
    assert c.holds is False and "dpo (6) > unlearning (1.5) > ssft (0.4)" in c.evidence
    m["separation"]["dpo@eta_M"] = [1.6] * L  # above unlearning by 0.1, within its uncertainty
    assert claim(m, "separation_order").holds is None


def test_separation_order_reports_each_update_size_when_the_budgets_differ():
    m = make_metrics()
    m["separation"] |= {"ssft@eta_M": [0.3, 0.5], "dpo@eta_M": [5.0, 7.0], "unlearning@eta_M": [1.0, 2.0]}
    for model, v in {"ssft@eta_M": 0.2, "dpo@eta_M": 0.4, "unlearning@eta_M": 0.1}.items():
        for mod in MLP_MODULES:
            m["delta_w"][model][mod]["relative_norm"] = [v, 3 * v]
    m["runs"]["dpo@eta_M"]["steps"] = 2000
    m["runs"]["unlearning@eta_M"]["lr"] = 5e-4
    c = claim(m, "separation_order")
    assert c.holds is None and "NOT DECIDED" in c.line()
    assert "dpo (6) > unlearning (1.5) > ssft (0.4)" in c.evidence
    assert "dpo@eta_M 0.80, ssft@eta_M 0.40, unlearning@eta_M 0.20" in c.reading
    assert "dpo@eta_M lr 0.001, steps 2000" in c.reading and "unlearning@eta_M lr 0.0005" in c.reading
    del m["runs"]
    assert claim(m, "separation_order").holds is None


def test_separation_lr_needs_two_learning_rates():
    c = claim(make_metrics(), "separation_lr")
    assert c.holds is None and "one learning rate" in c.reading
    m = make_metrics(("eta_M", "eta_S"))
    assert claim(m, "separation_lr").holds
    m["separation"]["dpo@eta_S"] = [2.5] * L  # η_S above η_M
    c = claim(m, "separation_lr")
    assert c.holds is False and "dpo: η_M 2 ± " in c.evidence


# ---------------------------------------------------------------------------------------------------- claim 4
def test_delta_w_is_decided_against_a_random_direction_not_the_threshold():
    m = make_metrics()
    assert claim(m, "delta_w_outside").holds
    # the demo's picture: sin θ 0.71-0.74, above 1/√2 but below a random direction's 0.85 (rank 72 of 256)
    rng = np.random.default_rng(0)
    for model in m["delta_w"]:
        for mod in MLP_MODULES:
            sin = rng.uniform(0.71, 0.74, (L, K))
            sin[0, -1] = np.nan  # a direction the analysis could not compute
            m["delta_w"][model][mod] |= {"sin_theta": sin.tolist(), "pre_energy_rank": [72] * L}
    c = claim(m, "delta_w_outside")
    assert c.holds is False
    assert "more inside the pretrained 90 %-energy span than a random direction" in c.reading
    assert "evidence against the paper's reading" in c.reading and "clears the 1/√2 threshold" in c.reading
    assert "in 9/9 (model, module) pairs" in c.evidence and "vs random 0.848" in c.evidence
    assert c.figures["ssft@eta_M/sin_minus_random"] == pytest.approx(0.725 - math.sqrt(1 - 72 / 256), abs=0.01)


def test_delta_w_needs_a_majority_of_significant_layers():
    m = make_metrics()
    sin = np.full((L, K), 0.95)
    sin[:3, :5] = 0.5  # three of four layers: only half their directions above random (still mean excess > 0)
    m["delta_w"]["dpo@eta_M"]["mlp.up"]["sin_theta"] = sin.tolist()
    c = claim(m, "delta_w_outside")
    assert c.holds is False and "1/4 layers above random" in c.evidence
    few = make_metrics()  # 3 directions a layer cannot reach p < 0.05 (1/8): not decided, not failed
    for model in few["delta_w"]:
        for mod in MLP_MODULES:
            few["delta_w"][model][mod]["sin_theta"] = [[0.95] * 3] * L
    assert claim(few, "delta_w_outside").holds is None
    old = make_metrics()
    for model in old["delta_w"]:
        for mod in MLP_MODULES:
            del old["delta_w"][model][mod]["sin_theta"]
    assert claim(old, "delta_w_outside").holds is None


# ---------------------------------------------------------------------------------------------------- claim 5
@pytest.mark.parametrize("family", JAILBREAKS)
def test_each_jailbreak_family_is_decided_on_the_models_that_refuse(family):
    m = make_metrics()
    c = claim(m, f"jailbreak_{family}")
    assert c.holds and f"`{family}`" in c.statement and "ssft@eta_M, dpo@eta_M, unlearning@eta_M" in c.evidence
    assert "dpo_standard" not in c.evidence  # a contrast
    for model in ("ssft@eta_M", "dpo@eta_M", "unlearning@eta_M"):
        m["eval"][model][family]["harmful"] = 0.03  # vs 0.02 on standard unsafe: not significant
    c = claim(m, f"jailbreak_{family}")
    assert c.holds is False and "the refusal generalises to this family" in c.reading
    m = make_metrics()
    for model in m["tau"]:
        m["tau"][model][family]["mean"] = [-1.5] * L  # further from the safe cluster than standard unsafe
    c = claim(m, f"jailbreak_{family}")
    assert c.holds is False and "τ above standard unsafe in 0/3 models" in c.evidence


def test_jailbreaks_are_not_decided_when_no_model_refuses_and_refusing_nothing_does_not_count():
    m = make_metrics()
    for model in ("ssft@eta_M", "dpo@eta_M", "unlearning@eta_M"):
        m["eval"][model]["unsafe"] |= {"refused": 0.0, "harmful": 0.9}
    c = claim(m, "jailbreak_jb_text")
    assert c.holds is None and "no study model refuses ≥ 90%" in c.reading and "ssft@eta_M 0%" in c.reading
    m = make_metrics()
    m["eval"]["ssft@eta_M"]["unsafe"] |= {"refused": 0.89, "harmful": 0.0}
    m["eval"]["ssft@eta_M"]["jb_text"]["harmful"] = 0.0  # would pull the pooled rate down if it counted
    c = claim(m, "jailbreak_jb_text")
    assert c.holds and "Models refusing ≥ 90% of standard unsafe inputs: dpo@eta_M, unlearning@eta_M " in c.evidence
    assert "jb_text 52/512" in c.evidence


# ---------------------------------------------------------------------------------------------------- claim 6
def test_attack_needs_success_beyond_the_unattacked_inputs_and_tau_rising():
    m = make_metrics()
    c = claim(m, "attack")
    assert c.holds and "success 0/32 = 0.0% [0.0%, 10.7%] unattacked → 16/32" in c.evidence
    for model in m["attack"]:
        m["attack"][model] = attack_rows(success=0.0)  # τ still moves toward the safe cluster
    c = claim(m, "attack")
    assert c.holds is False and "no attack succeeded" in c.reading and "although τ moved" in c.reading
    for model in m["attack"]:
        m["attack"][model] = attack_rows(success=0.0, tau_end=-1.0)
    c = claim(m, "attack")
    assert c.holds is False and "τ did not move significantly" in c.reading
    m = make_metrics()
    m["attack"]["unlearning@eta_M"] = attack_rows(tau_end=-1.0)  # succeeds, τ flat
    c = claim(m, "attack")
    assert c.holds is False and "τ did not rise significantly on unlearning@eta_M" in c.reading


# ---------------------------------------------------------------------------------------------------- claim 7
def test_lipschitz_falls_for_unsafe_inputs_beyond_a_bootstrap_interval():
    m = make_metrics()
    c = claim(m, "lipschitz")
    assert c.holds and "unsafe × 0.5 [" in c.evidence and "safe × 1 [" in c.evidence
    assert "1000-resample bootstrap" in c.evidence and c.evidence == claim(m, "lipschitz").evidence
    vals = np.linspace(0.5, 1.5, 64)
    m["lipschitz"]["dpo@eta_M"]["unsafe"] = {"mean": float(vals.mean() * 0.97), "values": (vals * 0.97).tolist()}
    c = claim(m, "lipschitz")
    assert c.holds is False and c.figures["dpo@eta_M/unsafe_ratio"] == pytest.approx(0.97)
    old = make_metrics()  # older runs: one float per set, means compared without a test
    old["lipschitz"] = {model: {s: v["mean"] for s, v in sets.items()} for model, sets in old["lipschitz"].items()}
    c = claim(old, "lipschitz")
    assert c.holds and "without a test" in c.evidence
    old["lipschitz"]["ssft@eta_M"]["unsafe"] = 1.1
    assert claim(old, "lipschitz").holds is False


# ---------------------------------------------------------------------------------------------------- claim 8
def test_interpolation_raises_refusal_beyond_alpha_one_unless_at_the_ceiling():
    m = make_metrics()
    c = claim(m, "interpolation")
    assert c.holds and "77/128" in c.evidence and "at α = 1.5" in c.evidence
    m["interpolation"]["dpo@eta_M"][-1]["unsafe_refused"] = 0.62  # flat beyond α = 1
    assert claim(m, "interpolation").holds is False
    m = make_metrics()
    for model in m["interpolation"]:
        m["interpolation"][model][2]["unsafe_refused"] = m["interpolation"][model][3]["unsafe_refused"] = 1.0
    c = claim(m, "interpolation")
    assert c.holds is None and "ceiling" in c.reading
    m["interpolation"]["ssft@eta_M"][2]["unsafe_refused"] = 0.9  # one model not at the ceiling, and it rises
    assert claim(m, "interpolation").holds is None  # the others still cannot show it
    m["interpolation"]["ssft@eta_M"][3]["unsafe_refused"] = 0.9
    assert claim(m, "interpolation").holds is False


# ---------------------------------------------------------------------------------------------------- claim 9
def test_dpo_and_unlearning_are_more_robust_than_ssft_per_learning_rate():
    m = make_metrics(("eta_M", "eta_S"))
    c = claim(m, "robust_vs_ssft")
    assert c.holds and "at eta_M: lower than SSFT in 6/6 pairs" in c.evidence and "Budgets differ" not in c.evidence
    for f in C.ROBUST_FAMILIES[:2]:  # 4 of 6 pairs at eta_S no longer lower: a minority is
        for meth in ("dpo", "unlearning"):
            m["eval"][f"{meth}@eta_S"][f]["harmful"] = 0.4
    c = claim(m, "robust_vs_ssft")
    assert c.holds is False and "at eta_S: lower than SSFT in 2/6 pairs" in c.evidence
    m = make_metrics()
    for f in C.ROBUST_FAMILIES:
        m["eval"]["ssft@eta_M"][f]["harmful"] = 0.0
    c = claim(m, "robust_vs_ssft")
    assert c.holds is None and "(floor)" in c.evidence
    m = make_metrics()
    m["runs"]["dpo@eta_M"]["steps"] = 2000
    assert "Budgets differ from SSFT's (or are not recorded) for dpo@eta_M" in claim(m, "robust_vs_ssft").evidence
    for name in ("eval",):
        del m[name]["ssft@eta_M"]
    c = claim(m, "robust_vs_ssft")
    assert c.holds is None and "no SSFT model" in c.reading


# ---------------------------------------------------------------------------------------------------- acceptance
def ev(instruct: float, refused: float) -> dict:
    return {"safe": {"instruct_acc": instruct, "refused": 0.0},
            "unsafe": {"instruct_acc": 0.95, "refused": refused, "harmful": 0.6 if refused == 0 else 0.0}}


def test_acceptance_holds_the_study_methods_to_the_bar_and_shows_standard_dpo_as_a_contrast():
    metrics = {"eval": {"pretrained": ev(0.95, 0.0), "ssft@eta_M": ev(0.90, 0.90), "dpo@eta_M": ev(0.89, 0.89),
                        "unlearning@eta_M": ev(0.95, 0.95), "dpo_standard@eta_M": ev(0.5, 0.0)}}
    rows = {r["check"]: r for r in acceptance(metrics)}
    assert all("contrast" in r for r in rows.values())
    got = {k: r["pass"] for k, r in rows.items() if not k.startswith("pretrained")}
    assert got == {"ssft@eta_M: standard unsafe refused (generated)": True,  # at the bar's edges
                   "ssft@eta_M: safe instruct accuracy drop": True,
                   "dpo@eta_M: standard unsafe refused (generated)": False,
                   "dpo@eta_M: safe instruct accuracy drop": False,
                   "unlearning@eta_M: standard unsafe refused (generated)": True,
                   "unlearning@eta_M: safe instruct accuracy drop": True,
                   "dpo_standard@eta_M: standard unsafe refused (generated)": None,
                   "dpo_standard@eta_M: safe instruct accuracy drop": None}
    assert [r["contrast"] for r in rows.values()] == [False] * 9 + [True] * 2
    assert [r["meets"] for r in rows.values() if r["contrast"]] == [False, False]
    reading = acceptance_reading(metrics, list(rows.values()))
    assert reading.index("dpo@eta_M refuses only 89%") < reading.index("Contrast (standard DPO")
    assert "dpo_standard@eta_M lost 45 points of safe instruct accuracy (0.95 → 0.50)" in reading


def test_acceptance_reading_says_how_a_dpo_run_won_its_margin():
    def last(chosen: float, rejected: float) -> dict:
        return {"last": {"step": 1000, "rewards/chosen": chosen, "rewards/rejected": rejected,
                         "rewards/accuracies": 0.92}}

    metrics = {"eval": {"pretrained": ev(0.94, 0.0), "dpo_standard@eta_M": ev(0.81, 0.0), "dpo@eta_M": ev(0.95, 0.5)},
               "training": {"dpo_standard@eta_M": last(0.205, -3.69), "dpo@eta_M": last(0.9, -0.8)}}
    checks = acceptance(metrics)
    assert [c["pass"] for c in checks if c["check"].startswith("dpo_standard")] == [None, None]
    reading = acceptance_reading(metrics, checks)
    assert ("dpo_standard@eta_M refuses 0% of standard unsafe inputs although its DPO margin grew mostly by pushing "
            "the rejected completion down (implicit rewards at step 1000: chosen +0.205, rejected -3.69") in reading
    assert "dpo@eta_M refuses 50% of standard unsafe inputs although its DPO margin grew by raising the" in reading
    assert reading.index("dpo@eta_M refuses 50%") < reading.index("Contrast") < reading.index("dpo_standard@eta_M")
    metrics["eval"]["dpo@eta_M"] = ev(0.95, 0.95)  # the study's DPO passes: only the contrast is read
    reading = acceptance_reading(metrics, acceptance(metrics))
    assert reading.startswith("Every check of the study's methods passes. Contrast (standard DPO")
    metrics["eval"]["dpo_standard@eta_M"] = ev(0.95, 0.95)
    assert acceptance_reading(metrics, acceptance(metrics)) == "Every check passes."


# ---------------------------------------------------------------------------------------------------- seeds
def test_aggregate_seeds_gives_mean_std_and_verdicts_per_seed():
    per_seed = {}
    for seed, (sep, refused) in enumerate(((1.0, 0.95), (2.0, 0.85), (3.0, 0.92))):
        m = make_metrics()
        m["separation"]["ssft@eta_M"] = [sep] * L
        m["eval"]["ssft@eta_M"]["unsafe"]["refused"] = refused
        m["eval"]["dpo_standard@eta_M"]["unsafe"]["refused"] = refused
        if seed == 1:
            m["separation"]["ssft@eta_M"] = [0.2] * L  # does not grow in this seed
        per_seed[seed + 10] = m
    agg = aggregate_seeds(copy.deepcopy(per_seed))
    assert agg["seeds"] == [10, 11, 12]
    rows = {r["check"]: r for r in agg["acceptance"]}
    r = rows["ssft@eta_M: standard unsafe refused (generated)"]
    assert r["values"] == [0.95, 0.85, 0.92] and r["passes"] == 2 and r["n"] == 3 and r["contrast"] is False
    assert r["mean"] == pytest.approx(np.mean([0.95, 0.85, 0.92]))
    assert r["std"] == pytest.approx(np.std([0.95, 0.85, 0.92], ddof=1))
    contrast = rows["dpo_standard@eta_M: standard unsafe refused (generated)"]
    assert contrast["contrast"] is True and contrast["passes"] == 2
    by_key = {c["key"]: c for c in agg["claims"]}
    assert list(by_key) == KEYS
    grows = by_key["separation_grows"]
    assert grows["holds"] == [True, False, True] and grows["statement"] == C.SEPARATION[1]
    fig = grows["figures"]["ssft@eta_M/separation"]
    assert fig["values"] == [1.0, 0.2, 3.0]
    assert fig["mean"] == pytest.approx(1.4) and fig["std"] == pytest.approx(np.std([1.0, 0.2, 3.0], ddof=1))
    assert by_key["separation_lr"]["holds"] == [None, None, None]
    jb = by_key["jailbreak_jb_text"]["figures"]["jb_text/harmful"]
    assert len(jb["values"]) == 3 and jb["std"] >= 0
