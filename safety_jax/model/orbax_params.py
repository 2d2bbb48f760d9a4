"""Params as an orbax checkpoint: save (sharded or not) and restore straight onto target shardings.

Orbax saves into ``<dir>.orbax-checkpoint-tmp`` and renames it into place once every array is on disk, so a crash
never leaves a half-written checkpoint under the final name. Restores read only each process's shards. Paths may be
local or ``gs://``-style URIs.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from safety_jax.errors import CheckpointMismatchError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, param_shapes
from safety_jax.model.storage import PathLike, Shardings, is_main_process, resolve_shardings, to_path


def path_names(path: tuple) -> tuple[str, ...]:
    """The names along a pytree key path: the same for a NamedTuple field and the dict key orbax saves it under."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
    return tuple(names)


def _path_str(path: tuple) -> str:
    """``a/b/0/mu``."""
    return "/".join(path_names(path))


def _stored_shape(x: Any) -> tuple[int, ...]:
    """The shape orbax stores: typed PRNG keys are saved as their key data (one more trailing dim)."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape)
    return tuple(x.shape)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_path_str(p): _stored_shape(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def check_shapes(saved: Any, target: Any, where: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first leaf whose presence or shape differs."""
    have, want = _leaf_shapes(saved), _leaf_shapes(target)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointMismatchError(
            f"checkpoint {where}: leaves do not match the target; missing from the checkpoint: {missing}, "
            f"not in the target: {extra} (was it saved with a different config, e.g. tie_word_embeddings?)")
    for name in want:
        if have[name] != want[name]:
            raise CheckpointMismatchError(
                f"checkpoint {where}: leaf '{name}' has shape {have[name]} but the target expects {want[name]}; "
                "the checkpoint was saved with a different config")


def abstract_like(tree: Any, default_sharding: jax.sharding.Sharding | None = None) -> Any:
    """Abstract restore targets for a pytree of arrays or ``ShapeDtypeStruct``s, keeping each leaf's sharding.

    Leaves without one get ``default_sharding`` (default: the first local device).
    """
    default = default_sharding or SingleDeviceSharding(jax.local_devices()[0])

    def one(x: Any) -> Any:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def save_params(path: PathLike, params: Params, *, overwrite: bool = False) -> None:
    """Write ``params`` (sharded or not) as an orbax checkpoint at ``path``; blocks until it is on disk.

    Every process of a multi-host job must call it. ``overwrite`` replaces an existing checkpoint: the new one is
    written beside it and swapped in, so the old one is never removed before the new one is complete.
    """
    path = to_path(path)
    exists = path.exists()
    if exists and not overwrite:
        raise FileExistsError(f"a checkpoint already exists at {path}; pass overwrite=True to replace it")
    target = path.parent / (path.name + ".new") if exists else path
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, params, force=exists)  # force: clear a stale `.new` from an interrupted overwrite
        ckptr.wait_until_finished()
    if exists:
        if is_main_process():
            old = path.parent / (path.name + ".old")
            if old.exists():
                old.rmtree()
            path.rename(old)
            target.rename(path)
            old.rmtree()
        multihost_utils.sync_global_devices("safety_jax.save_params")


def restore_params(path: PathLike, config: LlamaConfig, *, shardings: Shardings = None) -> Params:
    """Read params saved by :func:`save_params`, checked against ``config``, straight onto their shardings.

    shardings: a params-shaped pytree of ``jax.sharding.Sharding`` or a function ``config -> pytree`` (e.g.
    ``safety_jax.parallel.param_sharding_fn(mesh, strategy)``); without it, on one device. Weights are cast to
    ``config.param_dtype``. Raises :class:`CheckpointMismatchError` naming the leaf when the checkpoint's leaves or
    shapes differ from the config's.
    """
    path = to_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no params checkpoint at {path}")
    shapes = param_shapes(config)
    tree = resolve_shardings(shardings, config)
    if tree is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, tree)
    else:
        target = abstract_like(shapes)
    with ocp.StandardCheckpointer() as ckptr:
        check_shapes(ckptr.metadata(path).item_metadata.tree, target, str(path))
        return ckptr.restore(path, target)


__all__ = ["CheckpointMismatchError", "abstract_like", "check_shapes", "restore_params", "save_params"]
