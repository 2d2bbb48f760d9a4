"""Device meshes, logical-axis sharding rules, and sharded placement of params, batches and training state.

A mesh has three named axes (``data``, ``fsdp``, ``tensor``) built from a spec such as ``"data=2,fsdp=2,tensor=2"``.
Every array names its dims with logical axes (``batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, layers``;
see ``llama.param_logical_axes``) and a strategy is a small table from logical to mesh axes (the MaxText recipe):

    dp       batch→data                                           (params replicated)
    fsdp     batch→(data, fsdp); embed→fsdp
    tp       batch→data; heads, kv_heads, mlp, vocab→tensor
    fsdp_tp  both of the above (alias: hybrid)
    auto     the same as fsdp_tp: every rule whose mesh axis has size > 1 applies

Mesh axes of size 1 are dropped from every rule. A dim whose size its mesh axes do not divide is replicated
instead (logged once). Everything is placed with
``NamedSharding`` and run through ``jax.jit(..., in_shardings=..., out_shardings=...)``; multi-host runs start with
:func:`initialize_distributed` (``jax.distributed.initialize``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import LAYER_WEIGHTS, Params, forward, param_logical_axes, param_shapes
from safety_jax.model.orbax_params import path_names
from safety_jax.model.sharding import Constrain, use_activation_sharding

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")

Rules = dict[str, tuple[str, ...]]

_DP: Rules = {"batch": ("data",)}
_FSDP: Rules = {"batch": ("data", "fsdp"), "embed": ("fsdp",)}
_TP: Rules = {"batch": ("data",), "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
              "vocab": ("tensor",)}
_FSDP_TP: Rules = {**_TP, **_FSDP}

# strategy -> logical axis -> mesh axes (logical axes not listed are replicated)
STRATEGY_RULES: dict[str, Rules] = {"dp": _DP, "fsdp": _FSDP, "tp": _TP, "fsdp_tp": _FSDP_TP, "hybrid": _FSDP_TP,
                                    "auto": _FSDP_TP}

# Number of leading (after ``layers``) weight axes a LoRA ``a`` matrix contracts, per module (see ``llama._linear``).
_LORA_IN_AXES = {"attn.o": 2}

_logged: set[str] = set()


def _info_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


# ---------------------------------------------------------------------------------------------------- meshes
def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}`` for ``num_devices=8`` (one ``-1`` absorbs
    the rest; missing axes have size 1; the sizes must multiply to ``num_devices``)."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: {part!r} is not 'axis=size' with axis one of {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size {value!r} of axis {name!r} is not an integer") from None
        if size == 0 or size < -1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}; use a positive size or -1")
        sizes[name] = size
    wild = [n for n, s in sizes.items() if s == -1]
    if len(wild) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {wild}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if wild:
        if num_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: the fixed axes ({fixed} devices) do not divide the "
                             f"{num_devices} available devices, so '{wild[0]}=-1' cannot absorb the rest")
        sizes[wild[0]] = num_devices // fixed
    full = {name: sizes.get(name, 1) for name in MESH_AXES}
    if math.prod(full.values()) != num_devices:
        raise ValueError(f"mesh spec {spec!r} asks for {math.prod(full.values())} devices but {num_devices} are "
                         "available; make the sizes multiply to the device count or give one axis as -1")
    return full


def make_mesh(spec: str, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices (or ``devices``) from a spec like ``"data=2,fsdp=2,tensor=2"``.

    Axes are ``AxisType.Auto``: shardings come from ``in_shardings``/``out_shardings`` and the compiler propagates
    them, rather than JAX's explicit sharding-in-types mode.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def mesh_context(mesh: Mesh) -> Any:
    """Context manager making ``mesh`` current (``jax.set_mesh``; the mesh itself on JAX versions without it)."""
    set_mesh = getattr(jax, "set_mesh", None)
    return set_mesh(mesh) if set_mesh is not None else mesh


def initialize_distributed(**kwargs: Any) -> bool:
    """Call ``jax.distributed.initialize(**kwargs)`` when this is one process of a multi-process job.

    A job is multi-process when ``kwargs`` are given or the environment names a coordinator or several processes
    (``JAX_COORDINATOR_ADDRESS``, Slurm / Open MPI with more than one task, multi-host TPU workers). Returns whether
    JAX is now running distributed. Call it before anything touches the devices.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    multi = bool(kwargs) or any((
        "JAX_COORDINATOR_ADDRESS" in env,
        count("SLURM_NTASKS") > 1 and "SLURM_PROCID" in env,
        count("OMPI_COMM_WORLD_SIZE") > 1,
        "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""),
        "MEGASCALE_COORDINATOR_ADDRESS" in env,
    ))
    if not multi:
        return False
    jax.distributed.initialize(**kwargs)
    logger.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


# ---------------------------------------------------------------------------------------------------- rules
def rules_for(strategy: str, mesh: Mesh) -> Rules:
    """The logical→mesh axis table of ``strategy``, keeping only the axes of this mesh with size > 1."""
    if strategy not in STRATEGY_RULES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {sorted(STRATEGY_RULES)}")
    shape = dict(mesh.shape)
    return {name: tuple(a for a in axes if shape.get(a, 1) > 1) for name, axes in STRATEGY_RULES[strategy].items()}


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec (one entry per dim) for an array whose dims are named ``axes`` (``None`` = never sharded).

    With ``shape``, a dim its mesh axes do not divide is replicated (logged once). A mesh axis already used by an
    earlier dim is not used again.
    """
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(axes):
        mesh_axes = tuple(a for a in rules.get(name, ()) if a not in used) if name is not None else ()
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and shape is not None and shape[i] % size:
            _info_once(f"dim '{name}' of size {shape[i]} is not divisible by mesh axes {mesh_axes} (size {size}); "
                       "replicating it")
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _named(mesh: Mesh, axes: Sequence[str | None], rules: Rules, shape: Sequence[int] | None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


# ---------------------------------------------------------------------------------------------------- params / state
def param_shardings(config: LlamaConfig, mesh: Mesh, strategy: str = "auto") -> Params:
    """The params pytree with a ``NamedSharding`` at each leaf."""
    rules = rules_for(strategy, mesh)
    return jax.tree.map(lambda axes, s: _named(mesh, axes, rules, s.shape), param_logical_axes(config),
                        param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def param_sharding_fn(mesh: Mesh, strategy: str = "auto") -> Callable[[LlamaConfig], Params]:
    """``config -> param_shardings(config, mesh, strategy)``: the ``shardings=`` argument of the model loaders
    (``load_hf``, ``load_model``, ``restore_params``), which read the config from the folder first."""
    rules_for(strategy, mesh)  # an unknown strategy fails here, not inside the loader
    return lambda config: param_shardings(config, mesh, strategy)


def _check_same_tree(params: Any, shardings: Any, what: str) -> None:
    got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    if got != want:
        raise ValueError(f"{what} do not match the config: unexpected leaves {sorted(got - want)}, missing leaves "
                         f"{sorted(want - got)}")


def shard_params(params: Params, config: LlamaConfig, mesh: Mesh, strategy: str = "auto") -> Params:
    """Place ``params`` on ``mesh`` under ``strategy``'s rules."""
    shardings = param_shardings(config, mesh, strategy)
    _check_same_tree(params, shardings, "params")
    return jax.device_put(params, shardings)


def _known_leaf_axes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """params path (and LoRA ``module/a``, ``module/b`` path) -> logical axes."""
    table: dict[tuple[str, ...], tuple[str | None, ...]] = {}
    for path, axes in jax.tree_util.tree_flatten_with_path(param_logical_axes(config),
                                                           is_leaf=lambda x: isinstance(x, tuple))[0]:
        table[path_names(path)] = axes
    for module, axes in LAYER_WEIGHTS.items():
        if module.endswith("norm"):
            continue
        n_in = _LORA_IN_AXES.get(module, 1)
        prefix = ("layers", *module.split("."))
        table[(*prefix, "a")] = ("layers", *axes[:n_in], None)
        table[(*prefix, "b")] = ("layers", None, *axes[n_in:])
    return table


def tree_shardings_for(tree: Any, config: LlamaConfig, mesh: Mesh, strategy: str = "auto") -> Any:
    """Shardings for any pytree whose leaves mirror params: optimizer states, gradients, LoRA adapters.

    A leaf whose path ends with a params path (``…mu['layers']['attn']['q']``) or a LoRA path
    (``…['layers']['attn']['q']['a']``) and has that many dims gets the matching logical axes; everything else
    (step counts, scalars, factored statistics) is replicated. Works on arrays and ``jax.ShapeDtypeStruct`` leaves.
    """
    rules = rules_for(strategy, mesh)
    table = _known_leaf_axes(config)
    longest = max(len(k) for k in table)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple, leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        names = path_names(path)
        for n in range(min(longest, len(names)), 0, -1):
            axes = table.get(names[-n:])
            if axes is not None:
                return _named(mesh, axes, rules, shape) if len(axes) == len(shape) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


# ---------------------------------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh, strategy: str = "auto", ndim: int = 2, *,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array with ``ndim`` dims: split along batch, replicated elsewhere (with
    ``shape``, a batch its mesh axes do not divide is replicated)."""
    return _named(mesh, ("batch",) + (None,) * (ndim - 1), rules_for(strategy, mesh), shape)


def shard_batch(batch: Any, mesh: Mesh, strategy: str = "auto") -> Any:
    """Place every array of a batch pytree on ``mesh``, split along its leading (batch) dim.

    Multi-process: each process passes its own rows and gets back the global array
    (``jax.make_array_from_process_local_data``).
    """
    def put(x: Any) -> jax.Array:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if jax.process_count() > 1:
            global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            sharding = batch_sharding(mesh, strategy, x.ndim, shape=global_shape)
            return jax.make_array_from_process_local_data(sharding, np.asarray(x), global_shape)
        return jax.device_put(x, batch_sharding(mesh, strategy, x.ndim, shape=x.shape))

    return jax.tree.map(put, batch)


@functools.lru_cache(maxsize=64)
def activation_constraint(mesh: Mesh, strategy: str = "auto") -> Constrain:
    """The ``model.sharding`` constraint for ``strategy`` on ``mesh``: each activation's logical axes through the
    rules table (a dim its mesh axes do not divide stays replicated). One object per (mesh, strategy), so jitted
    functions that take it as a static argument (``generate``) compile once."""
    rules = rules_for(strategy, mesh)

    def fn(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, _named(mesh, axes, rules, x.shape))

    return fn


# ---------------------------------------------------------------------------------------------------- forward
def sharded_forward(config: LlamaConfig, mesh: Mesh, strategy: str = "auto", **forward_kwargs: Any) -> Callable:
    """``llama.forward`` jitted with params on ``strategy``'s shardings and batch inputs split along batch.

    Returns ``fn(params, tokens, attention_mask=None, positions=None, lora=None)`` giving what ``forward`` gives
    (logits ``[B, T, V]``, plus captures ``[L, B, ...]`` when ``capture=`` is among ``forward_kwargs``).
    ``forward_kwargs`` (``capture``, ``remat``, ``lora_scale``, ``interventions``, …) are fixed when this is built.
    One ``jax.jit`` per distinct (input shapes, LoRA structure); JAX caches the compilations behind each.
    """
    rules = rules_for(strategy, mesh)
    p_shardings = param_shardings(config, mesh, strategy)
    capture = forward_kwargs.get("capture")
    capture = (capture,) if isinstance(capture, str) else tuple(capture or ())
    jitted: dict[Any, Callable] = {}

    constraint = activation_constraint(mesh, strategy)

    def run(params, tokens, attention_mask, positions, lora):
        with use_activation_sharding(constraint):
            return forward(params, tokens, config, attention_mask=attention_mask, positions=positions, lora=lora,
                           **forward_kwargs)

    def build(tokens_shape: tuple[int, ...], has_mask: bool, has_pos: bool, lora: Any) -> Callable:
        b, t = tokens_shape
        tok = _named(mesh, ("batch", "seq"), rules, tokens_shape)
        lora_sh = tree_shardings_for(lora, config, mesh, strategy) if lora is not None else None
        logits = _named(mesh, ("batch", "seq", "vocab"), rules, (b, t, config.vocab_size))
        out: Any = logits
        if capture:
            caps = {name: NamedSharding(mesh, logical_to_spec(("layers", "batch"), rules, mesh,
                                                              (config.num_hidden_layers, b)))
                    for name in capture}
            out = (logits, caps)
        return jax.jit(run, in_shardings=(p_shardings, tok, tok if has_mask else None, tok if has_pos else None,
                                          lora_sh), out_shardings=out)

    def fn(params: Params, tokens: jax.Array, attention_mask: jax.Array | None = None,
           positions: jax.Array | None = None, lora: Params | None = None):
        key = (tuple(tokens.shape), attention_mask is not None, positions is not None,
               jax.tree.structure(lora) if lora is not None else None,
               tuple(np.shape(x) for x in jax.tree.leaves(lora)))
        if key not in jitted:
            jitted[key] = build(tuple(tokens.shape), attention_mask is not None, positions is not None, lora)
        return jitted[key](params, tokens, attention_mask, positions, lora)

    return fn


__all__ = ["LOGICAL_AXES", "MESH_AXES", "STRATEGY_RULES", "activation_constraint", "batch_sharding",
           "initialize_distributed", "logical_to_spec", "make_mesh", "mesh_context", "param_sharding_fn",
           "param_shardings", "parse_mesh_spec", "rules_for", "shard_batch", "shard_params", "sharded_forward",
           "tree_shardings_for"]
