"""Study 4's claims on crafted counts, each in both directions and undecided where its premise is missing."""

from __future__ import annotations

from experiments.study4_antidote import claims

N = 200
CELL = {"p": 0.2, "lr": 1e-3, "epochs": 5}


def _row(defense: str, harmful: int, task: int = 150, **extra):
    return {"defense": defense, "harmful_k": harmful, "harmful_n": N, "task_k": task, "task_n": N, **extra}


def _metrics(*, none=180, lisa=150, wanda=(10, 2), magnitude=(60, 2), random=(170, 100), task=(120, 20),
             aligned=10):
    rows = [_row("aligned", aligned), _row("none", none, **CELL), _row("lisa", lisa, **CELL)]
    for score, (lo, hi) in (("wanda", wanda), ("magnitude", magnitude), ("random", random)):
        rows.append(_row("antidote", lo, task[0], score=score, ratio=0.05, **CELL))
        rows.append(_row("antidote", hi, task[1], score=score, ratio=0.2, **CELL))
    return {"rows": rows, "grid": {"p": [0.2], "lrs": [1e-3], "epochs": [5], "ratios": [0.05, 0.2],
                                   "scores": ["wanda", "magnitude", "random"]},
            "n_test": N, "min_n": 20, "headline_ratio": 0.05, "defenses": ["none", "antidote", "lisa"]}


def _verdicts(metrics):
    return {c.key: c.holds for c in claims.decide(metrics)}


def test_every_claim_holds_on_the_paper_shape():
    assert _verdicts(_metrics()) == dict.fromkeys(
        ("harmful_ft_raises", "antidote_lowers", "alpha_tradeoff", "wanda_beats_ablations", "antidote_every_lr"), True)


def test_each_claim_fails_when_its_numbers_go_the_other_way():
    assert _verdicts(_metrics(none=14))["harmful_ft_raises"] is False  # 7 % vs 5 %: not significant
    got = _verdicts(_metrics(wanda=(178, 2)))
    assert got["antidote_lowers"] is False and got["wanda_beats_ablations"] is False
    assert got["antidote_every_lr"] is False  # lisa fails (75 %) and Antidote (89 %) is not below it
    assert _verdicts(_metrics(task=(120, 118)))["alpha_tradeoff"] is False  # accuracy does not fall
    assert _verdicts(_metrics(magnitude=(12, 2)))["wanda_beats_ablations"] is False


def test_claims_without_their_premise_are_not_decided():
    unbroken = _verdicts(_metrics(none=12, lisa=11))
    assert unbroken["antidote_lowers"] is None and unbroken["antidote_every_lr"] is None
    # Lisa keeps the harmful score at the aligned model's: no other defense fails, nothing to compare
    assert _verdicts(_metrics(lisa=11))["antidote_every_lr"] is None
    small = _metrics()
    small["min_n"] = N + 1
    assert set(_verdicts(small).values()) == {None}
