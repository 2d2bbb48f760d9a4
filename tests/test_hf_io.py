"""Hugging Face folder I/O: round trips through transformers, sharded files, loads straight onto a mesh, safe
replacement of folders, and clear errors."""

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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from safety_jax import forward, load_hf, parallel, save_hf
from safety_jax.errors import CheckpointError
from safety_jax.model import hf
from safety_jax.model.storage import is_uri, local_path, to_path


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


def _assert_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("strategy,spec", [("fsdp", "fsdp=8"), ("tp", "data=2,tensor=4"),
                                           ("fsdp_tp", "fsdp=4,tensor=2")])
def test_sharded_load_equals_the_unsharded_load(hf_folder, strategy, spec):
    _, path = hf_folder
    config, plain = load_hf(path)
    mesh = parallel.make_mesh(spec)
    _, sharded = load_hf(path, shardings=parallel.param_sharding_fn(mesh, strategy))
    _assert_equal(sharded, plain)
    want = parallel.param_shardings(config, mesh, strategy)
    jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim) or pytest.fail(f"{x.sharding} != {sh}"),
                 sharded, want)
    q = sharded["layers"]["attn"]["q"]
    assert q.addressable_shards[0].data.shape != q.shape  # really split


def _odd_shardings(config, mesh):
    """Replicated everywhere except splits inside the HF dims that fuse heads and head_dim (strided HF slices)."""
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), parallel.param_shardings(config, mesh, "dp"))
    attn = shardings["layers"]["attn"]
    attn["q"] = NamedSharding(mesh, P(None, None, "fsdp", "tensor"))  # [L, D, N, H]: N and H both split
    attn["k"] = NamedSharding(mesh, P(None, "fsdp", None, "tensor"))
    attn["o"] = NamedSharding(mesh, P(None, "tensor", "fsdp", None))  # [L, N, H, D]
    if "lm_head" in shardings:  # untied
        shardings["lm_head"] = NamedSharding(mesh, P("tensor", "fsdp"))
    return shardings


def test_sharded_load_reads_only_each_devices_slices(hf_folder, monkeypatch):
    _, path = hf_folder
    config, plain = load_hf(path)
    mesh = parallel.make_mesh("fsdp=2,tensor=4")
    shardings = _odd_shardings(config, mesh)
    reads = []
    real = hf._read_slice

    def recording(handle, name, index):
        out = real(handle, name, index)
        reads.append((name, out.size))
        return out

    monkeypatch.setattr(hf, "_read_slice", recording)
    _, sharded = load_hf(path, shardings=shardings, config=config)
    _assert_equal(sharded, plain)
    jax.tree.map(lambda x, sh: x.sharding == sh or pytest.fail(f"{x.sharding} != {sh}"), sharded, shardings)
    full = hf.expected_hf_tensors(config)
    largest = {}  # HF name -> elements of one device's block of it
    for rule in hf.KEY_TABLE:
        if rule.path == "lm_head" and config.tie_word_embeddings:
            continue
        leaf = hf._get(sharded, rule.path)
        shard = leaf.sharding.shard_shape(leaf.shape)
        per_tensor = int(np.prod(shard[1:] if rule.per_layer else shard))
        for layer in (range(config.num_hidden_layers) if rule.per_layer else [None]):
            largest[hf._hf_name(rule, layer)] = per_tensor
    assert reads and {name for name, _ in reads} == set(full)
    for name, size in reads:
        assert size <= largest[name], (name, size, largest[name])
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert max(size for name, size in reads if name == q0) < int(np.prod(full[q0])) / 4


def test_save_hf_gathers_tensor_by_tensor_and_only_process_0_writes(hf_folder, tmp_path, monkeypatch):
    _, path = hf_folder
    mesh = parallel.make_mesh("fsdp=4,tensor=2")
    config, sharded = load_hf(path, shardings=parallel.param_sharding_fn(mesh, "fsdp_tp"))
    gathered = []
    real_host = hf._host
    monkeypatch.setattr(hf, "_is_local", lambda x: False)  # as if each array spanned several processes
    monkeypatch.setattr(hf, "_host", lambda x: gathered.append(x.shape) or real_host(x))
    save_hf(config, sharded, tmp_path / "gathered", max_shard_bytes=50_000)
    expected = hf.expected_hf_tensors(config)
    assert len(gathered) == len(expected)  # one gather per HF tensor: a layer at a time, never a whole stack
    assert sorted(int(np.prod(s)) for s in gathered) == sorted(int(np.prod(s)) for s in expected.values())
    _assert_equal(load_hf(tmp_path / "gathered")[1], load_hf(path)[1])

    monkeypatch.setattr(hf, "is_main_process", lambda: False)
    save_hf(config, sharded, tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["gathered"]  # a process other than 0 writes nothing


def test_save_hf_replaces_only_model_folders_and_only_when_asked(hf_folder, tmp_path):
    _, path = hf_folder
    config, params = load_hf(path)
    user = tmp_path / "notes"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a model folder"):
            save_hf(config, params, user, overwrite=overwrite)
    assert (user / "keep.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf(config, params, empty)  # an empty folder holds nothing to lose
    with pytest.raises(FileExistsError, match=f"{empty}.*overwrite=True"):
        save_hf(config, params, empty)
    newer = jax.tree.map(lambda x: x * 2, params)
    save_hf(config, newer, empty, overwrite=True, max_shard_bytes=50_000)
    _assert_equal(load_hf(empty)[1], newer)
    assert not (empty / "model.safetensors").exists()  # the old single file went with the old folder
    assert sorted(os.listdir(tmp_path)) == ["empty", "notes"]  # nothing left beside


def test_paths_keep_uris_and_hf_folders_must_be_local(tmp_path, monkeypatch):
    assert str(to_path("gs://bucket/run/ckpt")) == "gs://bucket/run/ckpt"
    assert str(to_path("gs://bucket/run") / "params") == "gs://bucket/run/params"
    assert is_uri("gs://b/x") and not is_uri(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert str(to_path("rel/model")) == str(tmp_path / "rel" / "model")
    with pytest.raises(CheckpointError, match="gs://bucket/model.*local disk"):
        local_path("gs://bucket/model", "a Hugging Face folder")
    with pytest.raises(CheckpointError, match="gs://bucket/model.*orbax"):
        load_hf("gs://bucket/model")
