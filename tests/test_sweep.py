"""Sweeps on a local Ray: one row per cell and metric, finished cells never rerun, a failing cell recorded while the
others finish, a sweep killed midway resumed, and a two-host cell (a placement group of two workers with 4 CPU
devices each) training like one 8-device process; the spec loader names file, line and key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hf_models import make_tokenizer
from safetensors.numpy import load_file

from safety_jax import sweep
from safety_jax.errors import ConfigError

ray = pytest.importorskip("ray")
VOCAB = 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer, a small SFT jsonl file and a `safety-jax train` config on the tiny preset."""
    root = tmp_path_factory.mktemp("sweep")
    make_tokenizer(VOCAB).save_pretrained(root / "tok")
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(64):
            ids = rng.integers(3, VOCAB, 6)
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids),
                                "completion": " ".join(f"w{i}" for i in ids[::-1])}) + "\n")
    _write(root / "run.yaml", f"""
method: sft
preset: tiny
tokenizer: {root / 'tok'}
data: {{path: {root / 'train.jsonl'}, template: none, max_length: 16}}
batch_size: 8
optim: {{lr: 1e-3, weight_decay: 0.0}}
train: {{steps: 4, log_every: 2, progress: false}}
""")
    return root


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    yield
    ray.shutdown()


def _spec(workspace, **fields):
    base = {"name": "lr_seed", "target": "train", "config": str(workspace / "run.yaml"),
            "grid": {"optim.lr": [1e-3, 3e-3]}, "seeds": [0, 1], "metrics": ["final.loss"],
            "plots": [{"metric": "final.loss", "x": "optim.lr"}]}
    return sweep.SweepSpec(**{**base, **fields})


def test_two_by_two_sweep_has_one_row_per_cell_and_reruns_nothing(workspace, local_ray, tmp_path):
    spec = _spec(workspace)
    out = str(tmp_path / "sweep")
    first = sweep.run_sweep(spec, out)
    assert len(first.ran) == 4 and set(first.status.values()) == {"done"}
    assert len(first.rows) == 4 and {(r["optim.lr"], r["seed"]) for r in first.rows} == {
        (lr, s) for lr in (1e-3, 3e-3) for s in (0, 1)}
    assert all(np.isfinite(r["value"]) for r in first.rows)
    for name in ("results.csv", "results.md", "results.json", "final.loss_vs_optim.lr.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # each cell trained at its own lr and seed, in its own folder
    cfgs = [json.load(open(os.path.join(out, "cells", r["cell"], "cell.json")))["overrides"] for r in first.rows]
    assert sorted((c["optim.lr"], c["seed"]) for c in cfgs) == sorted((r["optim.lr"], r["seed"]) for r in first.rows)
    again = sweep.run_sweep(spec, out)
    assert again.ran == [] and again.rows == first.rows


def test_a_failing_cell_is_reported_with_its_error_and_retried(workspace, local_ray, tmp_path):
    spec = _spec(workspace, grid={"optim.lr": [1e-3], "train.steps": [2, "many"]}, seeds=[0], plots=[])
    out = str(tmp_path / "failing")
    result = sweep.run_sweep(spec, out)
    assert sorted(result.status.values()) == ["done", "failed"]
    bad = [r for r in result.rows if r["status"] == "failed"]
    assert len(bad) == 1 and bad[0]["train.steps"] == "many" and bad[0]["metric"] == "error" and bad[0]["value"]
    assert "failed" in open(os.path.join(out, "results.md")).read()
    again = sweep.run_sweep(spec, out)  # the failed cell is retried, the finished one is not
    assert again.ran == [bad[0]["cell"]]


@pytest.mark.slow  # two Ray starts and six training cells (about a minute)
def test_a_sweep_killed_midway_reruns_only_the_unfinished_cells(workspace, tmp_path):
    spec_path = _write(tmp_path / "sweep.yaml", f"""
name: killed
target: train
config: {workspace / 'run.yaml'}
grid: {{optim.lr: [1e-3, 2e-3, 3e-3]}}
seeds: [0, 1]
metrics: [final.loss]
""")
    out = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "safety_jax.cli", "sweep", "--spec", spec_path, "--out", str(out),
                             "--num-cpus", "1"], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(
            os.path.exists(out / "cells" / d / "DONE") for d in (os.listdir(out / "cells") if (out / "cells").exists()
                                                                 else [])):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    spec = sweep.load_spec(spec_path)
    done = {c.id for c in sweep.expand(spec) if sweep.cell_status(str(out), c) == "done"}
    assert 1 <= len(done) < 6
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = sweep.run_sweep(spec, str(out))
    finally:
        ray.shutdown()
    assert set(result.ran) == {c.id for c in sweep.expand(spec)} - done
    assert set(result.status.values()) == {"done"}


@pytest.mark.slow  # three fresh Ray workers, each importing JAX and compiling (about 50 s)
def test_a_two_host_cell_trains_like_one_eight_device_process(workspace, tmp_path):
    mesh = {"mesh": "fsdp=8", "train.steps": 3}
    one = _spec(workspace, name="one", grid={}, seeds=[], plots=[], overrides=mesh,
                resources=sweep.Resources(cpu_devices=8))
    two = _spec(workspace, name="two", grid={}, seeds=[], plots=[], overrides=mesh,
                resources=sweep.Resources(hosts=2, strategy="PACK", cpu_devices=4))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    try:
        results = {s.name: sweep.run_sweep(s, str(tmp_path / s.name)) for s in (one, two)}
    finally:
        ray.shutdown()
    weights = {}
    for name, res in results.items():
        assert set(res.status.values()) == {"done"}, open(
            os.path.join(tmp_path, name, "cells", res.ran[0], "FAILED")).read() if os.path.exists(
            os.path.join(tmp_path, name, "cells", res.ran[0], "FAILED")) else res.status
        weights[name] = load_file(os.path.join(tmp_path, name, "cells", res.ran[0], "run", "model",
                                               "model.safetensors"))
    for key in weights["one"]:
        np.testing.assert_allclose(weights["two"][key], weights["one"][key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_spec_errors_name_the_file_line_and_key(tmp_path):
    path = _write(tmp_path / "bad.yaml", "name: x\ntarget: train\nconfig: run.yaml\ngrdi: {a: [1]}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 4: unknown key 'grdi'"):
        sweep.load_spec(path)
    path = _write(tmp_path / "bad_res.yaml", "name: x\ntarget: train\nconfig: c\nresources:\n  cpu: 2\n")
    with pytest.raises(ConfigError, match=r"bad_res.yaml, line 5: unknown key 'resources.cpu'"):
        sweep.load_spec(path)
    path = _write(tmp_path / "broken.yaml", "name: x\ngrid: {a: [1, 2}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml, line 2"):
        sweep.load_spec(path)
    with pytest.raises(ConfigError, match="grid.lr"):
        sweep.SweepSpec(name="x", target="train", config="c", grid={"lr": 1e-3})
    with pytest.raises(ConfigError, match="target"):
        sweep.SweepSpec(name="x", target="study9", config="c")


def test_cells_cross_grid_cells_and_seeds_with_stable_ids():
    spec = sweep.SweepSpec(name="x", target="study1", config="quick", overrides={"finetune.steps": 5},
                           grid={"a": [1, 2]}, cells=[{"b": "u"}, {"b": "v"}], seeds=[0, 1, 2])
    cells = sweep.expand(spec)
    assert len(cells) == 12 and len({c.id for c in cells}) == 12
    assert cells[0].overrides == {"finetune.steps": 5, "a": 1, "b": "u", "seed": 0}
    assert [c.id for c in sweep.expand(spec)] == [c.id for c in cells]
    assert sweep.flatten_metrics({"a": {"b": 1, "c": [1, 2], "d": "s"}, "e": True}) == {"a.b": 1.0, "e": 1.0}


@pytest.mark.slow  # four study-1 quick runs (a few minutes on 2 cores)
def test_the_shipped_study1_sweep_runs_on_a_local_ray(tmp_path):
    spec = sweep.load_spec(os.path.join(ROOT, "experiments", "sweeps", "study1_lr_seed.yaml"))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    try:
        result = sweep.run_sweep(spec, str(tmp_path / "s1"))
    finally:
        ray.shutdown()
    assert set(result.status.values()) == {"done"} and len(result.ran) == 4
    assert len(result.rows) == 4 * len(spec.metrics) and all(np.isfinite(r["value"]) for r in result.rows)
    assert len(list((tmp_path / "s1").glob("*_vs_finetune.lrs.eta_M.png"))) == len(spec.plots)
