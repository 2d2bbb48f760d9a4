"""Smoke test of the JAX-vs-PyTorch benchmark: every workload runs in-process on the tiny preset, both sides do the
same work (the equal-work checks raise otherwise), and the tables list every workload. Timings are not checked."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, fast_compiles):
    """One in-process run of every workload (XLA's slow optimisation passes off: timings do not matter here)."""
    sys.path.insert(0, BENCH)
    try:
        import run
        from workloads import WORKLOADS

        out = tmp_path_factory.mktemp("bench")
        # One thread per pool: in-process, torch's OpenMP pool cannot be told to sleep when idle any more, and
        # spinning pools on a shared CI machine turn a seconds-long test into minutes (see scripts/bench/README.md).
        text = run.main(["--preset", "tiny", "--batch", "2", "--seq", "32", "--new-tokens", "4", "--reps", "1",
                         "--warmup", "1", "--threads", "1", "--out", str(out)])
        with open(out / "bench.json") as f:
            data = json.load(f)
        yield text, data, list(WORKLOADS)
    finally:
        sys.path.remove(BENCH)


def test_every_workload_runs_on_both_sides_and_is_tabled(bench):
    text, data, workloads = bench
    assert set(workloads) >= {"forward", "generate", "sft", "dpo", "wanda", "svd"}
    for wl in workloads:
        sides = {r["side"] for r in data["results"] if r["workload"] == wl}
        assert sides == {"jax", "torch"}, wl
        assert f"| {wl} | jax |" in text and f"| {wl} | torch |" in text
        assert any(line.startswith(f"{wl}: JAX ") for line in text.splitlines()), wl


def test_equal_work_checks_hold(bench):
    _, data, _ = bench
    res = {(r["workload"], r["side"]): r for r in data["results"]}
    for (wl, side), r in res.items():
        if side == "jax" and r["check_value"] is not None:
            torch_value = res[(wl, "torch")]["check_value"]
            tol = 1e-4 * max(1.0, abs(torch_value))
            assert abs(r["check_value"] - torch_value) <= tol, (wl, r["check_value"], torch_value)
    assert res[("dpo", "jax")]["check_value"] == pytest.approx(math.log(2), rel=1e-5)
    assert res[("dpo", "torch")]["check_value"] == pytest.approx(math.log(2), rel=1e-5)
    assert res[("wanda", "jax")]["note"].startswith("masks agree")
    assert res[("wanda", "jax")]["check_value"] == pytest.approx(res[("wanda", "torch")]["check_value"], abs=0)


def test_svd_reports_matrices_and_no_mfu(bench):
    _, data, _ = bench
    svd = [r for r in data["results"] if r["workload"] == "svd"]
    assert all(r["unit"] == "matrices" and r["mfu"] is None for r in svd)
    assert all(r["tokens"] == 2 * 7 for r in svd)  # tiny: 2 layers x 7 linear modules


def test_kernel_timings_cover_matmuls_and_svds(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import kernel_timings

        rows = kernel_timings.main(["--preset", "tiny", "--batch", "2", "--seq", "8", "--reps", "1",
                                    "--threads", "1", "--out", str(tmp_path)])
    finally:
        sys.path.remove(BENCH)
    assert sum(r["kernel"].startswith("SVD") for r in rows) == 2 and all("scipy gesdd ms" in r for r in rows[-2:])
    assert len(rows) == len(kernel_timings.kernel_cases("tiny", 2, 8))
    for r in rows:
        assert r["jax ms"] > 0 and r["torch ms"] > 0 and math.isclose(r["JAX/torch"], r["torch ms"] / r["jax ms"])
    assert (tmp_path / "kernels.md").read_text().count("\n| ") == len(rows) + 1
