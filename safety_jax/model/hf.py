"""Hugging Face checkpoint folders ⇄ safety-jax params.

A key table maps each HF tensor name to a params path plus its layout: how the HF tensor's dims split and permute
into ours. Loading checks every tensor's name and shape from the safetensors headers first, then builds each params
array: with ``shardings``, through ``jax.make_array_from_callback``, each device's block read straight from its HF
slices (so no process holds more than its own shards); without, whole on the default device. Saving writes
``config.json``, ``generation_config.json`` (the token ids ``generate`` stops and pads on) and (sharded) safetensors
that ``transformers.LlamaForCausalLM.from_pretrained`` reads, streaming one tensor at a time; in a multi-process job
each tensor is gathered and process 0 writes.

``load_hf(path, head="score")`` reads a ``LlamaForSequenceClassification`` folder instead: the decoder (``model.*``)
plus the classification head ``score.weight [num_labels, D]`` as ``params["score"]: [D, num_labels]``, and no
``lm_head`` (see ``safety_jax.model.classifier``).

Hugging Face folders are local: safetensors reads local files (use the orbax format for ``gs://`` paths).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from safety_jax.errors import CheckpointError, ConfigError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, param_shapes
from safety_jax.model.storage import (
    PathLike,
    Shardings,
    check_destination,
    is_main_process,
    local_path,
    read_config,
    resolve_shardings,
    save_tokenizer,
    staging_path,
    swap_in,
    write_json,
)

Groups = tuple[tuple[int, ...], ...]
Index = tuple[slice, ...]


@dataclass(frozen=True)
class KeyRule:
    """One HF tensor family: regex on the HF name, params path, and layout.

    ``split(config)`` gives, per HF dim, the sizes it splits into; ours is the split HF tensor transposed by
    ``perm`` (``ours = hf.reshape(flat(split)).transpose(perm)``). Per-layer rules fill one slot of a stacked
    ``[layers, ...]`` array.
    """

    pattern: str
    path: str
    split: Callable[[LlamaConfig], Groups]
    perm: tuple[int, ...]
    per_layer: bool = True

    def hf_shape(self, c: LlamaConfig) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.split(c))

    def to_ours(self, w: np.ndarray, c: LlamaConfig) -> np.ndarray:
        return np.ascontiguousarray(w.reshape([s for g in self.split(c) for s in g]).transpose(self.perm))

    def to_hf(self, w: np.ndarray, c: LlamaConfig) -> np.ndarray:
        return np.ascontiguousarray(w.transpose(np.argsort(self.perm)).reshape(self.hf_shape(c)))


def _dims(*names: str) -> Callable[[LlamaConfig], Groups]:
    """HF dims named by config fields; ``"a*b"`` is one HF dim that splits into two of ours."""
    return lambda c: tuple(tuple(getattr(c, f) for f in n.split("*")) for n in names)


_ID1, _ID2, _T = (0,), (0, 1), (1, 0)
_V, _D, _F = "vocab_size", "hidden_size", "intermediate_size"
_NH, _KH = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
_LAYER = r"model\.layers\.(\d+)\."
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"model\.embed_tokens\.weight", "embed", _dims(_V, _D), _ID2, per_layer=False),
    KeyRule(r"model\.norm\.weight", "final_norm", _dims(_D), _ID1, per_layer=False),
    KeyRule(r"lm_head\.weight", "lm_head", _dims(_V, _D), _T, per_layer=False),
    KeyRule(_LAYER + r"input_layernorm\.weight", "layers.attn_norm", _dims(_D), _ID1),
    KeyRule(_LAYER + r"post_attention_layernorm\.weight", "layers.mlp_norm", _dims(_D), _ID1),
    KeyRule(_LAYER + r"self_attn\.q_proj\.weight", "layers.attn.q", _dims(_NH, _D), (2, 0, 1)),  # [D, N, H]
    KeyRule(_LAYER + r"self_attn\.k_proj\.weight", "layers.attn.k", _dims(_KH, _D), (2, 0, 1)),
    KeyRule(_LAYER + r"self_attn\.v_proj\.weight", "layers.attn.v", _dims(_KH, _D), (2, 0, 1)),
    KeyRule(_LAYER + r"self_attn\.o_proj\.weight", "layers.attn.o", _dims(_D, _NH), (1, 2, 0)),  # [N, H, D]
    KeyRule(_LAYER + r"mlp\.gate_proj\.weight", "layers.mlp.gate", _dims(_F, _D), _T),
    KeyRule(_LAYER + r"mlp\.up_proj\.weight", "layers.mlp.up", _dims(_F, _D), _T),
    KeyRule(_LAYER + r"mlp\.down_proj\.weight", "layers.mlp.down", _dims(_D, _F), _T),
)
_COMPILED = [(re.compile(r.pattern + r"$"), r) for r in KEY_TABLE]
SCORE_TENSOR = "score.weight"  # the head of transformers' *ForSequenceClassification: [num_labels, D], no bias
HEADS = ("lm_head", "score")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


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


def score_rule(num_labels: int) -> KeyRule:
    """The sequence-classification head: HF ``score.weight [num_labels, D]`` -> ours ``score [D, num_labels]``."""
    return KeyRule(r"score\.weight", "score", lambda c: ((num_labels,), (c.hidden_size,)), _T, per_layer=False)


def _rules(config: LlamaConfig, head: str = "lm_head", num_labels: int | None = None) -> Iterator[KeyRule]:
    """The rules a checkpoint of this config uses: the decoder plus its head, ``lm_head`` (absent when the embeddings
    are tied) or, for a ``num_labels``-way classifier, ``score``."""
    if head == "score":
        if num_labels is None:
            raise ValueError("a classifier's rules need num_labels")
        return iter([*(r for r in KEY_TABLE if r.path != "lm_head"), score_rule(num_labels)])
    return (r for r in KEY_TABLE if not (r.path == "lm_head" and config.tie_word_embeddings))


def _layers(rule: KeyRule, config: LlamaConfig) -> range | list[None]:
    return range(config.num_hidden_layers) if rule.per_layer else [None]


def expected_hf_tensors(config: LlamaConfig, head: str = "lm_head", num_labels: int | None = None
                        ) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Llama checkpoint of this config must hold, with its HF shape (``head="score"``: a
    ``num_labels``-way ``LlamaForSequenceClassification``)."""
    return {_hf_name(rule, layer): rule.hf_shape(config) for rule in _rules(config, head, num_labels)
            for layer in _layers(rule, config)}


def _match(name: str) -> tuple[KeyRule, int | None] | None:
    for regex, rule in _COMPILED:
        m = regex.match(name)
        if m:
            return rule, (int(m.group(1)) if rule.per_layer else None)
    return None


# ---------------------------------------------------------------------------------------------------- reading
def _index_files(path: epath.Path) -> dict[str, str]:
    """tensor name -> safetensors file, from the index or the single file."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: str(path / v) for k, v in weight_map.items()}
    if single.exists():
        with safe_open(str(single), framework="numpy") as f:
            return {k: str(single) for k in f.keys()}
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if any(p.name.endswith((".bin", ".pt", ".pth")) for p in path.iterdir()):
        raise CheckpointError(f"{path} holds only PyTorch pickle weights; safety-jax loads safetensors only. Convert "
                              "them once with transformers (`save_pretrained(..., safe_serialization=True)`).")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def iter_hf_tensors(path: PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of a checkpoint folder, one at a time (bf16 comes back as ml_dtypes)."""
    by_file: dict[str, list[str]] = {}
    for name, fname in _index_files(local_path(path, "a Hugging Face folder")).items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in by_file.items():
        with safe_open(fname, framework="numpy") as f:
            for name in sorted(names):
                yield name, f.get_tensor(name)


def _num_labels(path: epath.Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """The classes of a sequence-classification checkpoint: the rows of its ``score.weight``."""
    if SCORE_TENSOR not in shapes:
        raise CheckpointError(f"{path} has no '{SCORE_TENSOR}': head='score' loads a *ForSequenceClassification "
                              "checkpoint; load a causal LM with the default head='lm_head'")
    shape = shapes[SCORE_TENSOR]
    if len(shape) != 2:
        raise CheckpointError(f"checkpoint tensor '{SCORE_TENSOR}' has shape {shape}; expected [num_labels, hidden]")
    return shape[0]


def _check_tensors(path: epath.Path, config: LlamaConfig, shapes: dict[str, tuple[int, ...]], head: str = "lm_head"
                   ) -> None:
    """Raise :class:`CheckpointError` naming the tensor when the folder's tensors do not match ``config``."""
    num_labels = _num_labels(path, shapes) if head == "score" else None
    expected = expected_hf_tensors(config, head, num_labels)
    seen = set()
    for name, shape in shapes.items():
        if _IGNORED.match(name):
            continue
        if name == SCORE_TENSOR:
            if head != "score":
                raise CheckpointError(f"checkpoint tensor '{name}' is a sequence-classification head: {path} is a "
                                      "*ForSequenceClassification checkpoint; load it with head='score' "
                                      "(safety_jax.model.classifier.load_classifier)")
            hit: tuple[KeyRule, int | None] | None = (score_rule(num_labels or 0), None)
        else:
            hit = _match(name)
        if hit is None:
            raise CheckpointError(f"checkpoint tensor '{name}' is not part of a Llama model; is this a Llama "
                                  "checkpoint?")
        rule, layer = hit
        if rule.path == "lm_head" and (config.tie_word_embeddings or head == "score"):
            continue  # some tied checkpoints store the (identical) head anyway; a classifier does not use it
        if layer is not None and layer >= config.num_hidden_layers:
            raise CheckpointError(f"checkpoint tensor '{name}': layer {layer} but config.json has "
                                  f"num_hidden_layers={config.num_hidden_layers}")
        if shape != expected[name]:
            raise CheckpointError(f"checkpoint tensor '{name}' has shape {shape}, config.json implies "
                                  f"{expected[name]}; the checkpoint does not match its config")
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint at {path} is missing tensor(s) {missing[:5]}{more}")


def _read_slice(handle: Any, name: str, index: Index) -> np.ndarray:
    """``handle.get_slice(name)[index]``: only that block of the tensor is read from the file."""
    return handle.get_slice(name)[index]


def _pieces(group: tuple[int, ...], slices: list[slice]) -> list[tuple[slice, tuple[int, ...]]]:
    """(HF slice, its shape split like ``group``) reads that cover ``slices`` of the split dims of one HF dim."""
    if len(group) == 1:
        s = slices[0]
        return [(s, (s.stop - s.start,))]
    if len(group) != 2:
        raise NotImplementedError(f"an HF dim split into {len(group)} dims")
    (sa, sb), inner = slices, group[1]
    if (sb.start, sb.stop) == (0, inner):  # whole inner dim: one contiguous run
        return [(slice(sa.start * inner, sa.stop * inner), (sa.stop - sa.start, inner))]
    return [(slice(a * inner + sb.start, a * inner + sb.stop), (1, sb.stop - sb.start))
            for a in range(sa.start, sa.stop)]


def _read_block(read: Callable[[Index], np.ndarray], groups: Groups, perm: tuple[int, ...], index: Index
                ) -> np.ndarray:
    """Our block ``index`` of one HF tensor (laid out by ``groups``/``perm``), read as HF slices no larger than it."""
    split: list[slice] = [slice(0)] * len(perm)
    for i, s in enumerate(index):
        split[perm[i]] = s
    per_dim, axes, k = [], [], 0
    for g in groups:
        per_dim.append(_pieces(g, split[k:k + len(g)]))
        axes.append(k)
        k += len(g)

    def build(j: int, chosen: tuple[tuple[slice, tuple[int, ...]], ...]) -> np.ndarray:
        if j == len(per_dim):
            return read(tuple(s for s, _ in chosen)).reshape([n for _, shape in chosen for n in shape])
        parts = [build(j + 1, (*chosen, piece)) for piece in per_dim[j]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axes[j])

    return build(0, ()).transpose(perm)


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return x if x.dtype == dtype else x.astype(np.float32).astype(dtype)


def _leaf_block(rule: KeyRule, config: LlamaConfig, shape: tuple[int, ...], index: Index, dtype: np.dtype,
                handle_of: Callable[[str], Any]) -> np.ndarray:
    """Block ``index`` (of the params leaf of ``rule``, shape ``shape``) read from the checkpoint, in ``dtype``."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(tuple(index) + (slice(None),) * len(shape), shape))
    groups = rule.split(config)

    def one(layer: int | None, sub: Index) -> np.ndarray:
        name = _hf_name(rule, layer)
        handle = handle_of(name)
        return np.ascontiguousarray(_cast(_read_block(lambda i: _read_slice(handle, name, i), groups, rule.perm, sub),
                                          dtype))

    if rule.per_layer:
        return np.stack([one(layer, index[1:]) for layer in range(*index[0].indices(shape[0]))])
    return one(None, index)


def load_hf(path: PathLike, *, dtype: str | None = None, shardings: Shardings = None,
            config: LlamaConfig | None = None, head: str = "lm_head") -> tuple[LlamaConfig, Params]:
    """Load a local HF Llama folder into ``(config, params)``.

    dtype: parameter dtype (``float32``/``bfloat16``; default: keep float32). shardings: where each array goes, a
    params-shaped pytree of ``jax.sharding.Sharding`` or a function ``config -> pytree`` (e.g.
    ``safety_jax.parallel.param_sharding_fn(mesh, strategy)``); each device's block is read straight from the files.
    Without it, the arrays land on the default device. config: use this instead of the folder's ``config.json``.
    head: ``"lm_head"`` (a causal LM) or ``"score"`` (a ``LlamaForSequenceClassification``: ``params["score"]``
    ``[D, num_labels]`` instead of ``lm_head``, which is not read even when the folder has one; ``score`` is not
    sharded, it lands whole on the default device).
    """
    if head not in HEADS:
        raise ValueError(f"load_hf: head={head!r}; choose one of {HEADS}")
    folder = local_path(path, "a Hugging Face folder")
    if config is None:
        config = read_config(folder)
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    files = _index_files(folder)
    target = np.dtype(ml_dtypes.bfloat16) if config.param_dtype == "bfloat16" else np.dtype(config.param_dtype)
    shardings_tree = resolve_shardings(shardings, config)
    shapes = param_shapes(config)
    params: Params = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in sorted(set(files.values()))}
        hf_shapes = {n: tuple(handles[f].get_slice(n).get_shape()) for n, f in files.items()}
        _check_tensors(folder, config, hf_shapes, head)
        num_labels = _num_labels(folder, hf_shapes) if head == "score" else None
        if num_labels is not None:
            shapes["score"] = jax.ShapeDtypeStruct((config.hidden_size, num_labels), config.weight_dtype)

        def handle_of(name: str) -> Any:
            return handles[files[name]]

        for rule in _rules(config, head, num_labels):
            shape = tuple(_get(shapes, rule.path).shape)
            reads: dict[tuple, np.ndarray] = {}  # devices holding the same block (replicas) share one read

            def block(index: Index, rule: KeyRule = rule, shape: tuple[int, ...] = shape,
                      reads: dict[tuple, np.ndarray] = reads) -> np.ndarray:
                key = tuple((s.start, s.stop) for s in index)
                if key not in reads:
                    reads[key] = _leaf_block(rule, config, shape, index, target, handle_of)
                return reads[key]

            sharding = (_get(shardings_tree, rule.path) if shardings_tree is not None and rule.path != "score"
                        else None)
            if sharding is None:
                arr = jax.numpy.asarray(block(()))
            else:
                arr = jax.make_array_from_callback(shape, sharding, block)
            _put(params, rule.path, arr)
    return config, params


def params_from_hf_state_dict(config: LlamaConfig, state: dict[str, np.ndarray]) -> Params:
    """Params from an in-memory mapping HF name -> array (tests and small conversions)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, f"{tmp}/model.safetensors")
        return load_hf(tmp, config=config)[1]


# ---------------------------------------------------------------------------------------------------- writing
def _is_local(x: Any) -> bool:
    """Whether all of ``x`` is on this process's devices (or on the host)."""
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def _host(x: Any) -> np.ndarray:
    """``x`` as one numpy array on this host, gathered from every process when it is not all addressable here."""
    if _is_local(x):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@jax.jit
def _layer(x: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def params_to_hf_tensors(config: LlamaConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) for every tensor, in the HF layout and the params' dtype.

    A leaf not all on this process is gathered one layer at a time (every process must iterate in step).
    """
    for rule in _rules(config):
        leaf = _get(params, rule.path)
        whole = _is_local(leaf)
        arr = _host(leaf) if whole else None
        for layer in _layers(rule, config):
            if layer is None:
                part = arr if whole else _host(leaf)
            else:
                part = arr[layer] if whole else _host(_layer(leaf, np.int32(layer)))
            yield _hf_name(rule, layer), rule.to_hf(part, config)


def _plan_files(config: LlamaConfig, params: Params, max_shard_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
    """The tensors of each safetensors file, in :func:`params_to_hf_tensors` order."""
    files: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for rule in _rules(config):
        dtype = np.dtype(_get(params, rule.path).dtype)
        shape = rule.hf_shape(config)
        nbytes = math.prod(shape) * dtype.itemsize
        for layer in _layers(rule, config):
            if size and size + nbytes > max_shard_bytes:
                files.append([])
                size = 0
            files[-1].append((_hf_name(rule, layer), shape, dtype))
            size += nbytes
    return files


def _header(specs: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    """A safetensors header (length prefix included) for tensors written back to back in ``specs`` order."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        if dtype.name not in _ST_DTYPES:
            raise CheckpointError(f"tensor '{name}' has dtype {dtype.name}; safetensors export supports "
                                  f"{sorted(_ST_DTYPES)}: cast the params first")
        end = offset + math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def generation_config_dict(config: LlamaConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of ``generation_config.json``: the config's bos / eos / pad ids (eos a list when there are several,
    as Llama-3-Instruct's ``[128001, 128009]``; an id that is None is left out), then ``extra`` (e.g. ``do_sample``,
    ``temperature``, ``top_p`` of the model a checkpoint was tuned from), which transformers' ``generate`` reads as
    its defaults."""
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
    return {**{k: v for k, v in ids.items() if v is not None}, **(extra or {})}


def save_hf(config: LlamaConfig, params: Params, path: PathLike, *, max_shard_bytes: int = 2 << 30,
            tokenizer: Any = None, overwrite: bool = False, generation_config: dict[str, Any] | None = None) -> None:
    """Write an HF Llama folder (config.json, generation_config.json, safetensors, sharded with an index above
    ``max_shard_bytes``).

    ``generation_config.json`` holds the bos / eos / pad ids of ``config``, so transformers' ``generate`` stops where
    ``safety_jax.model.generate`` does, plus the fields of ``generation_config`` (see :func:`generation_config_dict`).
    The folder is written beside its destination and renamed into place, so a crash never leaves half a checkpoint.
    An existing destination must be empty, or a model folder replaced with ``overwrite=True`` (the old one is
    removed only once the new one is in place). Multi-process: every process calls it; arrays are gathered tensor
    by tensor and process 0 writes.
    """
    dest = local_path(path, "a Hugging Face folder")
    check_destination(dest, overwrite)
    main = is_main_process()
    tmp = staging_path(dest)
    if main:
        if tmp.exists():
            tmp.rmtree()
        tmp.mkdir(parents=True)
    try:
        plan = _plan_files(config, params, max_shard_bytes)
        names = (["model.safetensors"] if len(plan) == 1 else
                 [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
        tensors = params_to_hf_tensors(config, params)
        for fname, specs in zip(names, plan):
            with (tmp / fname).open("wb") if main else contextlib.nullcontext() as f:
                if main:
                    f.write(_header(specs))
                for name, shape, dtype in specs:
                    got, arr = next(tensors)
                    if (got, arr.shape, arr.dtype) != (name, shape, dtype):
                        raise CheckpointError(f"tensor '{got}' is {arr.shape} {arr.dtype}, expected '{name}' "
                                              f"{shape} {dtype}")
                    if main:
                        f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
        if main:
            write_json(tmp / "config.json", config.to_hf_dict())
            write_json(tmp / "generation_config.json", generation_config_dict(config, generation_config))
            if len(plan) > 1:
                weight_map = {name: fname for fname, specs in zip(names, plan) for name, _, _ in specs}
                total = sum(math.prod(s) * d.itemsize for specs in plan for _, s, d in specs)
                write_json(tmp / "model.safetensors.index.json",
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
            swap_in(tmp, dest)
    except BaseException:
        if main and tmp.exists():
            tmp.rmtree()
        raise
    multihost_utils.sync_global_devices("safety_jax.save_hf")


__all__ = ["CheckpointError", "ConfigError", "HEADS", "KEY_TABLE", "KeyRule", "SCORE_TENSOR", "expected_hf_tensors",
           "generation_config_dict", "iter_hf_tensors", "load_hf", "params_from_hf_state_dict",
           "params_to_hf_tensors", "save_hf", "score_rule"]
