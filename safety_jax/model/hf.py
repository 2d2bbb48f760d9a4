"""Hugging Face checkpoint folders ⇄ safety-jax params.

A small key table maps each HF tensor name to a params path plus the transform to the einsum layout; loading reads
safetensors shards tensor by tensor (never a whole PyTorch model), fills the stacked per-layer arrays, and places each
finished array on its sharding. Saving writes ``config.json`` plus (sharded) safetensors that
``transformers.LlamaForCausalLM.from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from safety_jax.model.config import ConfigError, LlamaConfig
from safety_jax.model.llama import Params, param_shapes


class CheckpointError(ValueError):
    """A checkpoint does not match its config or the Llama architecture."""


@dataclass(frozen=True)
class KeyRule:
    """One HF tensor family: regex on the HF name, params path, and the HF→ours / ours→HF transforms."""

    pattern: str
    path: str
    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    per_layer: bool = True


def _same(w, c):
    return w


def _t(w, c):
    return np.ascontiguousarray(w.T)


def _qkv_in(n_attr):
    def f(w, c):  # [heads*H, D] -> [D, heads, H]
        return np.ascontiguousarray(w.T).reshape(c.hidden_size, getattr(c, n_attr), c.head_dim)
    return f


def _qkv_out(w, c):  # [D, heads, H] -> [heads*H, D]
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _o_in(w, c):  # [D, N*H] -> [N, H, D]
    return np.ascontiguousarray(w.T).reshape(c.num_attention_heads, c.head_dim, c.hidden_size)


def _o_out(w, c):  # [N, H, D] -> [D, N*H]
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)


KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"model\.embed_tokens\.weight", "embed", _same, _same, per_layer=False),
    KeyRule(r"model\.norm\.weight", "final_norm", _same, _same, per_layer=False),
    KeyRule(r"lm_head\.weight", "lm_head", _t, _t, per_layer=False),
    KeyRule(r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.attn_norm", _same, _same),
    KeyRule(r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.mlp_norm", _same, _same),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.attn.q", _qkv_in("num_attention_heads"),
            _qkv_out),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.attn.k", _qkv_in("num_key_value_heads"),
            _qkv_out),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.attn.v", _qkv_in("num_key_value_heads"),
            _qkv_out),
    KeyRule(r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.attn.o", _o_in, _o_out),
    KeyRule(r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.mlp.gate", _t, _t),
    KeyRule(r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.mlp.up", _t, _t),
    KeyRule(r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.mlp.down", _t, _t),
)
_COMPILED = [(re.compile(r.pattern + r"$"), r) for r in KEY_TABLE]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _hf_name(rule: KeyRule, layer: int | None) -> str:
    name = rule.pattern.replace(r"\.", ".")
    return name.replace(r"(\d+)", str(layer)) if layer is not None else name


def _get(tree: dict, dotted: str) -> Any:
    for p in dotted.split("."):
        tree = tree[p]
    return tree


def _put(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def expected_hf_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Llama checkpoint of this config must hold, with its HF shape."""
    shapes = param_shapes(config)
    out: dict[str, tuple[int, ...]] = {}
    for rule in KEY_TABLE:
        if rule.path == "lm_head" and config.tie_word_embeddings:
            continue
        ours = _get(shapes, rule.path)
        dummy_shape = ours.shape[1:] if rule.per_layer else ours.shape
        hf_shape = rule.to_hf(np.empty(dummy_shape, np.int8), config).shape
        for layer in (range(config.num_hidden_layers) if rule.per_layer else [None]):
            out[_hf_name(rule, layer)] = tuple(hf_shape)
    return out


def _match(name: str) -> tuple[KeyRule, int | None] | None:
    for regex, rule in _COMPILED:
        m = regex.match(name)
        if m:
            return rule, (int(m.group(1)) if rule.per_layer else None)
    return None


def _index_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, from the index or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(path)):
        raise CheckpointError(f"{path} holds only PyTorch pickle weights; safety-jax loads safetensors only. Convert "
                              "them once with transformers (`save_pretrained(..., safe_serialization=True)`).")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def iter_hf_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of a checkpoint folder, one at a time (bf16 comes back as ml_dtypes)."""
    files = _index_files(path)
    by_file: dict[str, list[str]] = {}
    for name, fname in files.items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in by_file.items():
        with safe_open(fname, framework="flax") as f:
            for name in sorted(names):
                yield name, np.asarray(f.get_tensor(name))


def load_hf(path: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
            strategy: str = "fsdp", config: LlamaConfig | None = None) -> tuple[LlamaConfig, Params]:
    """Load a local HF Llama folder into ``(config, params)``.

    dtype: parameter dtype (``float32``/``bfloat16``; default: keep float32). mesh: place each array straight onto
    its sharding under ``strategy``'s logical-axis rules (see ``safety_jax.parallel``).
    """
    path = os.fspath(path)
    if config is None:
        config = LlamaConfig.from_hf_file(path)
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    expected = expected_hf_tensors(config)
    shapes = param_shapes(config)
    shardings = None
    if mesh is not None:
        from safety_jax.parallel import param_shardings
        shardings = param_shardings(config, mesh, strategy)
    target_dtype = np.dtype(ml_dtypes.bfloat16) if config.param_dtype == "bfloat16" else np.dtype(config.param_dtype)
    buffers: dict[str, np.ndarray] = {}
    filled: dict[str, set[int]] = {}
    seen: set[str] = set()
    params: Params = {}

    def finish(rule_path: str) -> None:
        arr = buffers.pop(rule_path)
        sharding = _get(shardings, rule_path) if shardings is not None else None
        _put(params, rule_path, jax.device_put(arr, sharding) if sharding is not None else jax.numpy.asarray(arr))

    for name, tensor in iter_hf_tensors(path):
        if _IGNORED.match(name):
            continue
        hit = _match(name)
        if hit is None:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise CheckpointError(f"checkpoint tensor '{name}' is not part of a Llama model; is this a Llama "
                                  "checkpoint?")
        rule, layer = hit
        if rule.path == "lm_head" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the (identical) head anyway
        if layer is not None and layer >= config.num_hidden_layers:
            raise CheckpointError(f"checkpoint tensor '{name}': layer {layer} but config.json has "
                                  f"num_hidden_layers={config.num_hidden_layers}")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{expected[name]}; the checkpoint does not match its config")
        seen.add(name)
        ours = rule.to_ours(tensor.astype(np.float32) if tensor.dtype != target_dtype else tensor, config)
        ours = ours.astype(target_dtype)
        full = _get(shapes, rule.path).shape
        if rule.per_layer:
            buf = buffers.get(rule.path)
            if buf is None:
                buf = buffers[rule.path] = np.empty(full, target_dtype)
            buf[layer] = ours
            done = filled.setdefault(rule.path, set())
            done.add(layer)
            if len(done) == config.num_hidden_layers:
                finish(rule.path)
        else:
            buffers[rule.path] = ours
            finish(rule.path)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint at {path} is missing tensor(s) {missing[:5]}{more}")
    return config, params


def params_to_hf_tensors(config: LlamaConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) for every tensor, in the HF layout and the params' dtype."""
    for rule in KEY_TABLE:
        if rule.path == "lm_head" and config.tie_word_embeddings:
            continue
        arr = np.asarray(jax.device_get(_get(params, rule.path)))
        if rule.per_layer:
            for layer in range(config.num_hidden_layers):
                yield _hf_name(rule, layer), rule.to_hf(arr[layer], config)
        else:
            yield _hf_name(rule, None), rule.to_hf(arr, config)


def params_from_hf_state_dict(config: LlamaConfig, state: dict[str, np.ndarray]) -> Params:
    """Params from an in-memory mapping HF name -> array (tests and small conversions)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf_dict(), f)
        return load_hf(tmp, config=config)[1]


def save_hf(config: LlamaConfig, params: Params, path: str | os.PathLike, *, max_shard_bytes: int = 2 << 30,
            tokenizer: Any = None) -> None:
    """Write an HF Llama folder (config.json + safetensors, sharded with an index above ``max_shard_bytes``).

    The folder is written next to its destination and renamed into place, so a crash never leaves half a checkpoint.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf_dict(), f, indent=2)
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in params_to_hf_tensors(config, params):
            if size and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(a.nbytes for s in shards for a in s.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["CheckpointError", "ConfigError", "KEY_TABLE", "expected_hf_tensors", "iter_hf_tensors", "load_hf",
           "params_from_hf_state_dict", "params_to_hf_tensors", "save_hf"]
