"""Two local processes (4 CPU devices each, one coordinator on 127.0.0.1) train like one 8-device process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch
import transformers
from multiprocess_run import STEPS, run_training
from safetensors.numpy import load_file

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_and_save_a_transformers_model(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(i), "2", str(port),
                               str(tmp_path / "multi")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    rows_single = run_training(0, 1, str(tmp_path / "single"))  # this process: 8 simulated devices
    multi = load_file(tmp_path / "multi" / "model" / "model.safetensors")
    single = load_file(tmp_path / "single" / "model" / "model.safetensors")
    assert multi.keys() == single.keys()
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-6, atol=1e-6, err_msg=name)

    # each process loaded its half of every global batch, and together the halves are the single run's batches
    halves = [json.load(open(tmp_path / "multi" / f"rows-{i}.json")) for i in range(2)]
    assert len(halves[0]) == len(rows_single) == STEPS
    for step in range(STEPS):
        assert len(halves[0][step]) == len(halves[1][step]) == len(rows_single[step]) // 2
        assert halves[0][step] + halves[1][step] == rows_single[step]

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "multi" / "model")
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), multi["model.embed_tokens.weight"])
    assert torch.isfinite(model(torch.arange(3, 11)[None]).logits).all()
