"""`safety-jax train` end to end on small local jsonl files: SFT learns, DPO separates its pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hf_models import make_tokenizer

from safety_jax.model.config import get_preset
from safety_jax.model.hf import save_hf
from safety_jax.model.llama import init_params
from safety_jax.train.run import load_run_config

VOCAB = 64


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny random model folder with its tokenizer, and SFT / preference jsonl files (a copy task)."""
    import jax

    root = tmp_path_factory.mktemp("train_cli")
    config = get_preset("tiny", vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    save_hf(config, init_params(config, jax.random.key(0)), root / "model", tokenizer=make_tokenizer(VOCAB))
    rng = np.random.default_rng(0)

    def copy_rows(n):
        rows = []
        for _ in range(n):
            ids = rng.integers(3, VOCAB, 6)
            rows.append({"prompt": _words(ids), "completion": _words(ids[::-1]),
                         "chosen": _words(ids[::-1]), "rejected": _words(rng.integers(3, VOCAB, 6))})
        return rows

    _write_jsonl(root / "train.jsonl", copy_rows(256))
    _write_jsonl(root / "held_out.jsonl", copy_rows(32))
    return root


def _train(workspace, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    res = subprocess.run([sys.executable, "-m", "safety_jax.cli", "train", "--config", "", *args],
                         capture_output=True, text=True, env=env, timeout=600, cwd=workspace)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def _metrics(path):
    return [json.loads(line) for line in open(path)]


def test_sft_from_cli_lowers_held_out_loss(workspace):
    out = workspace / "sft"
    _train(workspace, "method=sft", f"model={workspace / 'model'}", f"out={out}", "data.path=train.jsonl",
           "data.template=none", "data.max_length=64", "eval_data.path=held_out.jsonl", "eval_data.template=none",
           "eval_data.max_length=64", "batch_size=16", "optim.lr=3e-3", "optim.weight_decay=0.0",
           "train.steps=120", "train.eval_every=60", "train.log_every=20", "train.progress=false")
    rows = _metrics(out / "metrics.jsonl")
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < 0.75 * _first_eval(workspace, out), evals
    assert (out / "model" / "model.safetensors").exists() and (out / "config.yaml").exists()


def _first_eval(workspace, out):
    """Held-out loss of the untrained model: the same loss, computed in-process."""
    import jax

    from safety_jax.data.batches import BatchIterator
    from safety_jax.data.text import DataConfig, load_examples
    from safety_jax.model.io import load_model, load_tokenizer
    from safety_jax.train.losses import make_sft_loss
    from safety_jax.train.trainer import stack_micro_batches

    config, params = load_model(workspace / "model")
    tok = load_tokenizer(workspace / "model")
    ex = load_examples(DataConfig(path=str(workspace / "held_out.jsonl"), template="none", max_length=64), tok)
    loss = make_sft_loss(config)
    vals = [float(loss(params, jax.tree.map(lambda x: x[0], stack_micro_batches(b, 1)), None)[0])
            for b in BatchIterator(ex, 16, (64,), shuffle=False, drop_last=False, num_epochs=1)]
    return float(np.mean(vals))


def test_dpo_from_cli_separates_training_pairs(workspace):
    out = workspace / "dpo"
    _train(workspace, "method=dpo", f"model={workspace / 'model'}", f"out={out}", "data.path=train.jsonl",
           "data.kind=preference", "data.template=none", "data.max_length=64", "batch_size=16", "loss.beta=0.1",
           "optim.lr=2e-3", "optim.weight_decay=0.0", "train.steps=60", "train.log_every=10",
           "train.progress=false", "eval_data.path=held_out.jsonl", "eval_data.kind=preference",
           "eval_data.template=none", "eval_data.max_length=64")
    rows = _metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "train/rewards/accuracies" in r]
    assert train_rows[-1]["train/rewards/accuracies"] > 0.9, train_rows[-1]
    assert train_rows[-1]["train/rewards/margins"] > train_rows[0]["train/rewards/margins"]
    evals = [r for r in rows if "eval/loss" in r]  # the reference log-probs reach the held-out loss
    assert len(evals) == 1 and evals[0]["step"] == 60 and evals[0]["eval/loss"] < np.log(2)


@pytest.mark.parametrize("method", [pytest.param("npo", marks=pytest.mark.slow), "dpo"])
def test_reference_methods_evaluate_with_reference_params(workspace, method):
    out = workspace / f"{method}_ref_params"
    kind = "preference" if method == "dpo" else "prompt_completion"
    _train(workspace, f"method={method}", f"model={workspace / 'model'}", f"out={out}", "data.path=train.jsonl",
           f"data.kind={kind}", "data.template=none", "data.max_length=64", "batch_size=16",
           "precompute_reference=false", "train.steps=4", "train.eval_every=2", "train.progress=false",
           "eval_data.path=held_out.jsonl", f"eval_data.kind={kind}", "eval_data.template=none",
           "eval_data.max_length=64")
    evals = [r["eval/loss"] for r in _metrics(out / "metrics.jsonl") if "eval/loss" in r]
    assert len(evals) == 2 and np.all(np.isfinite(evals))


def test_run_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        load_run_config(None, ["modle=x"])
    with pytest.raises(ValueError, match="method"):
        load_run_config(None, ["method=sgd", "preset=tiny"])


def test_precomputed_reference_log_probs_train_like_the_reference_params(workspace):
    from safety_jax.train.run import run

    losses = {}
    for pre in (True, False):
        out = workspace / f"dpo_pre_{pre}"
        run(load_run_config(None, [
            "method=dpo", f"model={workspace / 'model'}", f"out={out}", f"data.path={workspace / 'train.jsonl'}",
            "data.kind=preference", "data.template=none", "data.max_length=64", "batch_size=16", "optim.lr=2e-3",
            f"precompute_reference={str(pre).lower()}", "train.steps=4", "train.log_every=1", "train.progress=false",
            "train.matmul_precision=highest"]))
        losses[pre] = [r["train/loss"] for r in _metrics(out / "metrics.jsonl")]
    assert abs(losses[True][0] - np.log(2)) < 1e-6  # policy = reference at step 1
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
