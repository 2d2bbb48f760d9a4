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
