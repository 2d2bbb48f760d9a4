"""Tests of the benchmark's scaling sweep (scripts/bench/sweep.py), run in-process on tiny models: one record per
point × workload × side, the equal-work checks at every point, points over the memory budget skipped without being
built, a failing point recorded while the sweep goes on, and the JSON / Markdown / PNG outputs. Timings are not
checked."""

from __future__ import annotations

import json
import os
import struct
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench")
SMALL = "tiny:num_hidden_layers=1"      # a second, smaller size than the tiny preset
COMMON = ["--batch", "2", "--reps", "1", "--warmup", "1", "--threads", "1", "--no-memory"]


@pytest.fixture(scope="module")
def sweep_module():
    sys.path.insert(0, BENCH)
    try:
        import sweep

        yield sweep
    finally:
        sys.path.remove(BENCH)


@pytest.fixture(scope="module")
def forward_sweep(sweep_module, tmp_path_factory, fast_compiles):
    """Forward on two tiny sizes at two sequence lengths; bench_100m over --max-gb (skipped, never built)."""
    sweep = sweep_module
    out = tmp_path_factory.mktemp("sweep-forward")
    built: list[int] = []
    build = sweep.BenchContext.build

    def recording_build(config, *args):
        built.append(config.num_params())
        return build(config, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep.BenchContext, "build", recording_build)
        data = sweep.main(["--presets", f"{SMALL},tiny,bench_100m", "--seq", "16,32", "--workloads", "forward",
                           "--max-gb", "0.5", "--out", str(out), *COMMON])
    return data, out, built


@pytest.fixture(scope="module")
def sft_sweep(sweep_module, tmp_path_factory, fast_compiles):
    """One SFT point on tiny; the smaller size's SFT fails (out of memory, simulated) and the sweep goes on."""
    sweep = sweep_module
    out = tmp_path_factory.mktemp("sweep-sft")
    sft = sweep.WORKLOADS["sft"]

    def failing_sft(ctx):
        if ctx.config.num_hidden_layers == 1:
            raise MemoryError("simulated: no memory for the optimizer state")
        return sft(ctx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sweep.WORKLOADS, "sft", failing_sft)
        data = sweep.main(["--presets", f"{SMALL},tiny", "--seq", "16", "--workloads", "sft", "--out", str(out),
                           *COMMON])
    return data, out


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_one_record_per_point_workload_and_side(forward_sweep):
    data, out, _ = forward_sweep
    with open(out / "sweep.json") as f:
        assert json.load(f)["points"] == json.loads(json.dumps(data["points"], default=str))
    points = data["points"]
    keys = [(p["preset"], p["batch"], p["seq"], p["workload"], p["side"]) for p in points]
    expected = {(preset, 2, seq, "forward", side) for preset in (SMALL, "tiny", "bench_100m") for seq in (16, 32)
                for side in ("jax", "torch")}
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    meta = data["meta"]
    assert meta["jax"] and meta["torch"] and meta["machine"] and len(meta["load_average"]) == 2
    assert meta["memory_budget"].startswith("--max-gb 0.50")


def test_measured_points_pass_the_equal_work_check(forward_sweep):
    points = forward_sweep[0]["points"]
    ok = [p for p in points if p["status"] == "ok"]
    assert {p["preset"] for p in ok} == {SMALL, "tiny"} and len(ok) == 8
    by_key = {(p["preset"], p["seq"], p["side"]): p for p in ok}
    for p in ok:
        assert p["tokens_per_s"] > 0 and p["peak_mem_mb"] is None and p["mfu"] > 0  # --no-memory
        torch_side = by_key[(p["preset"], p["seq"], "torch")]
        assert p["jax_over_torch"] == pytest.approx(p["tokens_per_s"] / torch_side["tokens_per_s"])
        assert p["check_value"] == pytest.approx(torch_side["check_value"], rel=1e-4, abs=1e-4)
    params = {p["preset"]: p["params"] for p in points}
    assert params[SMALL] < params["tiny"] < params["bench_100m"]


def test_points_over_the_budget_are_skipped_unbuilt(forward_sweep):
    data, _, built = forward_sweep
    skipped = [p for p in data["points"] if p["status"] == "skipped"]
    assert {p["preset"] for p in skipped} == {"bench_100m"} and len(skipped) == 4
    for p in skipped:
        assert p["tokens_per_s"] is None and p["estimate_gb"] > 0.5 and "--max-gb 0.50 GB" in p["error"]
    params = {p["preset"]: p["params"] for p in data["points"]}
    assert sorted(built) == sorted([params[SMALL], params["tiny"]])  # one model per size; bench_100m never built


def test_markdown_table_and_summary(forward_sweep):
    data, out, _ = forward_sweep
    text = (out / "sweep.md").read_text()
    assert "| preset | params M | batch | seq | workload | side | tokens/s | peak MB | JAX/torch |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| preset")]
    assert len(rows) == len(data["points"])
    assert sum(f"| {SMALL} | 0.079 | 2 | 16 | forward | jax |" in r for r in rows) == 1
    assert sum("| bench_100m |" in r and "skipped: estimated" in r for r in rows) == 4
    for side in ("jax", "torch"):
        assert f"- forward / {side} at B2×T16: {SMALL} → tiny (params ×1.58): tokens/s ×" in text


def test_png_is_written(forward_sweep):
    _, out, _ = forward_sweep
    width, height = _png_size(out / "sweep.png")
    assert width > 500 and height > 500


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(sft_sweep):
    data, out = sft_sweep
    status = {(p["preset"], p["side"]): p for p in data["points"]}
    assert len(data["points"]) == 4
    for side in ("jax", "torch"):
        assert status[(SMALL, side)]["status"] == "failed"
        assert "MemoryError: simulated" in status[(SMALL, side)]["error"]
        assert status[("tiny", side)]["status"] == "ok"
    jax_sft, torch_sft = status[("tiny", "jax")], status[("tiny", "torch")]
    assert jax_sft["check_value"] == pytest.approx(torch_sft["check_value"], rel=1e-4)  # first-step loss
    assert torch_sft["jax_over_torch"] == 1.0
    assert "failed: MemoryError" in (out / "sweep.md").read_text()
    _png_size(out / "sweep.png")


def test_point_context_has_the_tokens_build_draws(sweep_module):
    import torch

    from safety_jax.model.config import get_preset

    config = get_preset("tiny")
    torch.manual_seed(0)
    base = sweep_module.BenchContext.build(config, 1, 8, 4, 0, False)
    direct = sweep_module.BenchContext.build(config, 3, 24, 4, 0, False)
    assert (sweep_module.point_context(base, 3, 24).tokens == direct.tokens).all()


def test_memory_estimate_orders_workloads_and_sizes(sweep_module):
    from safety_jax.model.config import get_preset

    est = sweep_module.estimate_memory
    small, big = get_preset("tiny"), get_preset("bench_100m")
    assert est(big, 4, 256, "sft").device > est(big, 4, 256, "forward").device
    assert est(big, 4, 256, "sft").device > 2 * 4 * 4 * big.num_params()  # two sides of params, grads, moments
    assert est(big, 4, 256, "forward").device > est(small, 4, 256, "forward").device
    assert est(big, 8, 256, "forward").device > est(big, 4, 256, "forward").device
    bf16 = big.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    assert est(bf16, 4, 256, "sft").device < est(big, 4, 256, "sft").device
    assert sweep_module.host_available_bytes() > 0


@pytest.mark.parametrize("argv, message", [
    (["--presets", "tiny,huge"], "unknown preset 'huge'; choose from"),
    (["--workloads", "forward,decode"], "unknown workload(s) ['decode']; choose from"),
    (["--presets", "tiny:layers=1"], "bad override 'layers=1'"),
    (["--batch", "4,0"], "--batch: '0' is not a positive integer"),
    (["--max-gb", "-1"], "--max-gb must be positive"),
])
def test_bad_arguments_are_refused_before_building(sweep_module, capsys, argv, message):
    with pytest.raises(SystemExit):
        sweep_module.parse_args(argv)
    assert message in capsys.readouterr().err
