"""Safe resume: a `safety-jax train` killed at random moments ends bit-identical to an uninterrupted run, never logs a
step twice, refuses to continue under changed settings, and a diverging run stops before saving NaN params."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from hf_models import make_tokenizer

from safety_jax.data.batches import BatchIterator
from safety_jax.errors import ConfigError, NonFiniteError
from safety_jax.model.config import get_preset
from safety_jax.model.hf import save_hf
from safety_jax.model.llama import init_params
from safety_jax.train.checkpoint import TrainCheckpointer
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.trainer import TrainConfig, train

VOCAB = 64
STEPS = 40


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    config = get_preset("tiny", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64)
    save_hf(config, init_params(config, jax.random.key(0)), root / "model", tokenizer=make_tokenizer(VOCAB))
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(64):
            ids = rng.integers(3, VOCAB, 5)
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids),
                                "completion": " ".join(f"w{i}" for i in ids[::-1])}) + "\n")
    return root


def _args(workspace, out, *extra):
    return [sys.executable, "-m", "safety_jax.cli", "train", "--config", "", "method=sft",
            f"model={workspace / 'model'}", f"out={out}", "data.path=train.jsonl", "data.template=none",
            "data.max_length=32", "batch_size=8", "optim.lr=3e-3", f"train.steps={STEPS}", "train.save_every=1",
            "train.log_every=1", "train.progress=false", *extra]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _run(workspace, out, *extra):
    return subprocess.run(_args(workspace, out, *extra), capture_output=True, text=True, env=_env(), timeout=600,
                          cwd=workspace)


@pytest.mark.slow  # nine CLI processes (~90 s on 2 cores); test_trainer's in-process resume test runs in CI
def test_killed_runs_resume_bit_identical_without_duplicated_steps(workspace):
    ref = workspace / "uninterrupted"
    res = _run(workspace, ref)
    assert res.returncode == 0, res.stderr[-3000:]
    out = workspace / "killed"
    rng = np.random.default_rng(0)
    kills = torn = 0
    for _ in range(5):  # SIGKILL a few steps into training, at a random moment (most land inside a checkpoint write)
        before = _logged_steps(out)
        proc = subprocess.Popen(_args(workspace, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=_env(), cwd=workspace)
        wait_for = int(rng.integers(1, 8))
        while proc.poll() is None and _logged_steps(out) < before + wait_for:
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.05)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        torn += any("tmp" in p.name for p in (out / "checkpoints").iterdir())
    assert kills == 5 and _logged_steps(out) < STEPS
    assert torn >= 1  # at least one kill landed inside a checkpoint write (its temporary folder was left behind)
    res = _run(workspace, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model" / "model.safetensors").read_bytes() == (ref / "model" / "model.safetensors").read_bytes()
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1)), steps

    # the same folder under another learning rate is refused, naming the field
    res = _run(workspace, out, "optim.lr=1e-3")
    assert res.returncode != 0 and "optim.lr: 0.003 -> 0.001" in res.stderr, res.stderr[-2000:]
    assert "train.resume=force" in res.stderr
    res = _run(workspace, out, "optim.lr=1e-3", "train.resume=force", f"train.steps={STEPS + 2}")
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_run_stops_on_the_first_nonfinite_loss_and_keeps_finite_checkpoints(tmp_path):
    # On this model even lr 1e3 stays finite (RMSNorm bounds the activations and Adam moves a weight by at most lr a
    # step), so the non-finite loss comes from the data: batch 7 holds a token id past the vocabulary, which the
    # embedding gather turns into NaN (a library call without model_config skips the id check that catches it).
    config = get_preset("tiny", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    examples = [{"tokens": rng.integers(3, VOCAB, 12).astype(np.int32), "loss_mask": np.ones(12, np.int32)}
                for _ in range(64)]
    it = BatchIterator(examples, 8, (16,), shuffle=False)
    poisoned = (batch if i != 6 else {**batch, "tokens": np.where(batch["tokens"] == batch["tokens"][0, 3],
                                                                   VOCAB + 5, batch["tokens"])}
                for i, batch in enumerate(it))
    ocfg = OptimConfig(lr=1e3, weight_decay=0.0)
    with pytest.raises(NonFiniteError, match=r"^step 7: the loss or the gradient norm is not finite.*step 5\) holds"):
        train(make_sft_loss(config), build_optimizer(ocfg, params), params, poisoned,
              TrainConfig(steps=50, save_every=5, log_every=10, progress=False), out_dir=str(tmp_path))
    with TrainCheckpointer(tmp_path / "checkpoints") as ck:
        assert ck.all_steps() == [5]
        state, _ = ck.restore()
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))
    assert not (tmp_path / "metrics.jsonl").exists()  # its first log step (10) came after the bad step


def test_an_existing_checkpoint_is_refused_with_resume_never(tmp_path):
    config = get_preset("tiny", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64)
    params = init_params(config, jax.random.key(0))
    examples = [{"tokens": np.arange(3, 15, dtype=np.int32), "loss_mask": np.ones(12, np.int32)}] * 8
    opt = build_optimizer(OptimConfig(), params)
    train(make_sft_loss(config), opt, params, BatchIterator(examples, 8, (16,)),
          TrainConfig(steps=2, progress=False), out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="train.resume=never"):
        train(make_sft_loss(config), opt, params, BatchIterator(examples, 8, (16,)),
              TrainConfig(steps=3, progress=False, resume="never"), out_dir=str(tmp_path))
