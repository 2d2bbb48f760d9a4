"""The `safety-jax` command line: convert (HF ⇄ orbax) and generate, run as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from hf_models import make_hf_model, make_tokenizer

from safety_jax.model.generate import generate
from safety_jax.model.io import load_model


def _cli(*args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    res = subprocess.run([sys.executable, "-m", "safety_jax.cli", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = make_hf_model("llama3")
    path = tmp_path_factory.mktemp("cli") / "hf"
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.mark.slow  # three CLI processes (~25 s); test_hf covers the conversion in-process
def test_convert_round_trip_and_generate(hf_folder, tmp_path):
    orbax_dir, back = tmp_path / "orbax", tmp_path / "hf_again"
    _cli("convert", "--src", str(hf_folder), "--dst", str(orbax_dir), "--to", "orbax")
    assert (orbax_dir / "params").is_dir() and (orbax_dir / "tokenizer.json").exists()
    _cli("convert", "--src", str(orbax_dir), "--dst", str(back), "--to", "hf")
    config, p0 = load_model(hf_folder)
    _, p1 = load_model(orbax_dir)
    _, p2 = load_model(back)
    for other in (p1, p2):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p0, other)

    out = _cli("generate", "--model", str(orbax_dir), "--prompt", "w5 w9 w11", "--prompt", "w7",
               "--max-new-tokens", "6")
    tok = make_tokenizer(config.vocab_size)
    ids = tok(["w5 w9 w11"], return_tensors="np")["input_ids"]
    new, n = generate(p0, config, ids, max_new_tokens=6, eos_token_ids=(2,), pad_token_id=0)
    expected = tok.decode(np.asarray(new)[0, : int(n[0])], skip_special_tokens=True)
    assert f"### w5 w9 w11\n{expected}\n" in out
    assert "### w7\n" in out


@pytest.mark.parametrize("command", ["train", "plan"])
def test_multi_process_flags_are_listed(command, capsys):
    from safety_jax import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--coordinator-address", "--num-processes", "--process-id"):
        assert flag in out


@pytest.mark.parametrize(("args", "message"), [
    (["--num-processes", "0"], "--num-processes: 0 must be at least 1"),
    (["--num-processes", "two"], "--num-processes: 'two' is not an integer"),
    (["--process-id", "-1", "--num-processes", "2"], "--process-id: -1 must be at least 0"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 must be below --num-processes 2"),
    (["--process-id", "1"], "--process-id 1 needs --num-processes"),
    (["--num-processes", "2"], "--num-processes 2 needs --coordinator-address"),
])
def test_bad_process_flags_are_argparse_errors(args, message, capsys, monkeypatch):
    from safety_jax import cli

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_PROCID",
                 "OMPI_COMM_WORLD_RANK", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                 "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", "run.yaml", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_process_flags_default_to_the_environment(monkeypatch, capsys):
    from safety_jax import cli

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    args = cli.build_parser().parse_args(["train", "--config", "run.yaml"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == ("10.0.0.1:1234", 4, 3)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "0")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--config", "run.yaml"])
    assert "must be at least 1" in capsys.readouterr().err


def test_single_process_run_does_not_initialise_distributed(monkeypatch):
    from safety_jax import cli, parallel

    calls = []
    monkeypatch.setattr(parallel, "initialize_distributed", lambda **kw: calls.append(kw) or False)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", "mpi")  # only read when a CPU client is created
    try:
        cli._init_distributed(cli.build_parser().parse_args(["train", "--config", "x"]))
        assert jax.config.jax_cpu_collectives_implementation == "mpi"  # one process: left alone
        cli._init_distributed(cli.build_parser().parse_args(
            ["train", "--config", "x", "--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "1"]))
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    assert calls == [{}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}]
