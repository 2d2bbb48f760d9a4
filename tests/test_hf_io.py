"""Hugging Face folder I/O: round trips through transformers, sharded files, and clear errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import hf_forward, make_hf_model
from safetensors.numpy import load_file, save_file

from safety_jax import forward, load_hf, save_hf
from safety_jax.model.hf import CheckpointError


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def hf_folder(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_load_then_save_round_trips_through_transformers(hf_folder, tmp_path):
    model, path = hf_folder
    config, params = load_hf(path)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (2, 40))
    ours = np.asarray(forward(params, jnp.asarray(tokens), config))
    ref, _ = hf_forward(model, tokens)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    out = tmp_path / "saved"
    save_hf(config, params, out, max_shard_bytes=50_000)  # force several shards + an index
    assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    again, _ = hf_forward(reloaded, tokens)
    np.testing.assert_array_equal(again, ref)
    config2, params2 = load_hf(out)
    assert config2.replace() == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bfloat16_load_and_save(hf_folder, tmp_path):
    _, path = hf_folder
    config, params = load_hf(path, dtype="bfloat16")
    assert params["embed"].dtype == jnp.bfloat16
    save_hf(config, params, tmp_path / "bf16")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    w = reloaded.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(w, np.asarray(params["embed"].astype(jnp.float32)))


def _copy_folder(src, dst, edit):
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    tensors, cfg = edit(tensors, cfg)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_missing_tensor_is_named(hf_folder, tmp_path):
    _, path = hf_folder
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _copy_folder(path, tmp_path / "bad", lambda t, c: ({k: v for k, v in t.items() if k != name}, c))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_hf(bad)


def test_wrong_shape_is_named(hf_folder, tmp_path):
    _, path = hf_folder
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(t, c):
        t = dict(t)
        t[name] = np.zeros((t[name].shape[0] + 1, t[name].shape[1]), np.float32)
        return t, c

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + ".*shape"):
        load_hf(_copy_folder(path, tmp_path / "bad", edit))


def test_non_llama_architecture_is_refused(hf_folder, tmp_path):
    _, path = hf_folder
    bad = _copy_folder(path, tmp_path / "bad",
                       lambda t, c: (t, {**c, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="model_type"):
        load_hf(bad)


def test_unknown_tensor_is_named(hf_folder, tmp_path):
    _, path = hf_folder
    bad = _copy_folder(path, tmp_path / "bad",
                       lambda t, c: ({**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(4, np.float32)}, c))
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        load_hf(bad)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(make_hf_model("llama2").config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_hf(tmp_path)
