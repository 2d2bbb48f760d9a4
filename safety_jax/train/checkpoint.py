"""Checkpoints through orbax: params on their own, and training state with resume.

Both paths write through orbax, which saves into ``<dir>.orbax-checkpoint-tmp`` and renames it into place once every
array is on disk, so a crash never leaves a half-written checkpoint under the final name. Restores go straight onto
the target shardings (each process reads only its shards): pass abstract ``jax.ShapeDtypeStruct(shape, dtype,
sharding=...)`` targets, e.g. from :func:`safety_jax.parallel.param_shardings` / ``tree_shardings_for``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params, param_shapes
from safety_jax.parallel import param_shardings


class CheckpointMismatchError(ValueError):
    """A checkpoint's leaves or shapes do not match what the caller asked to restore."""


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def _path_str(path: tuple) -> str:
    """``a/b/0/mu``: the same for a NamedTuple field and the dict key orbax saves it under."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
    return "/".join(names)


def _stored_shape(x: Any) -> tuple[int, ...]:
    """The shape orbax stores: typed PRNG keys are saved as their key data (one more trailing dim)."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape)
    return tuple(x.shape)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_path_str(p): _stored_shape(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def _check_shapes(saved: Any, target: Any, where: str) -> None:
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


# ---------------------------------------------------------------------------------------------------- params
def save_params(path: str | os.PathLike, params: Params, *, overwrite: bool = False) -> None:
    """Write ``params`` (sharded or not) as an orbax checkpoint at ``path``; blocks until it is on disk.

    Every process of a multi-host job must call it. ``overwrite`` replaces an existing checkpoint: the new one is
    written beside it and swapped in, so the old one is never removed before the new one is complete.
    """
    path = _abs(path)
    exists = os.path.exists(path)
    if exists and not overwrite:
        raise FileExistsError(f"a checkpoint already exists at {path}; pass overwrite=True to replace it")
    target = path + ".new" if exists else path
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, params, force=exists)  # force: clear a stale `.new` from an interrupted overwrite
        ckptr.wait_until_finished()
    if exists:
        if jax.process_index() == 0:
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old)
        multihost_utils.sync_global_devices("safety_jax.save_params")


def restore_params(path: str | os.PathLike, config: LlamaConfig, mesh: Mesh | None = None,
                   strategy: str = "auto") -> Params:
    """Read params saved by :func:`save_params`, checked against ``config``, straight onto their shardings.

    mesh: place each array by ``strategy``'s rules (see ``safety_jax.parallel``); without it, on one device.
    Weights are cast to ``config.param_dtype``. Raises :class:`CheckpointMismatchError` naming the leaf when the
    checkpoint's leaves or shapes differ from the config's.
    """
    path = _abs(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no params checkpoint at {path}")
    shapes = param_shapes(config)
    if mesh is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                              param_shardings(config, mesh, strategy))
    else:
        target = abstract_like(shapes)
    with ocp.StandardCheckpointer() as ckptr:
        _check_shapes(ckptr.metadata(path).item_metadata.tree, target, path)
        return ckptr.restore(path, target)


# ---------------------------------------------------------------------------------------------------- training
class TrainCheckpointer:
    """Periodic training checkpoints (``orbax.checkpoint.CheckpointManager``) with resume.

    Each checkpoint ``<directory>/<step>/`` holds ``state``, any pytree of arrays (params, optimizer state, step,
    RNG key, …), and ``meta``, a JSON-serialisable dict (data position, config, metrics). A save happens when
    ``step`` is a multiple of ``save_every`` (or on a preemption signal); the newest ``max_to_keep`` are kept
    (``None``: all). Saves are asynchronous: they return once the arrays are copied off the devices, and the next
    save (or :meth:`wait_until_finished`) waits for the write.

    Usage::

        ckpt = TrainCheckpointer(out / "ckpt", save_every=500, max_to_keep=3)
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(target_state=abstract_like(state))
        ...
        ckpt.save(step, state, {"epoch": 1, "batch": 1200})
        ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1, max_to_keep: int | None = 3,
                 async_save: bool = True) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be a positive number of steps, got {save_every}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be positive or None (keep all), got {max_to_keep}")
        self.directory = _abs(directory)
        # Every `save_every` steps, and whenever JAX reports a preemption (orbax's default also saves the first
        # step of a fresh run, which "every N steps" does not promise).
        policies = ocp.checkpoint_managers
        policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                         policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, *, force: bool = False) -> bool:
        """Save ``state`` and ``meta`` at ``step`` if it is due (or ``force``); returns whether it saved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {})))
        return bool(self._manager.save(int(step), args=args, force=force))

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step still kept, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, target_state: Any = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step`` (default: the latest).

        target_state: the state's pytree (arrays or ``ShapeDtypeStruct``s; see :func:`abstract_like`). Restored
        arrays take its structure (named tuples of optax states included), dtypes and shardings; leaves without a
        sharding land on one device. Without it, the saved tree comes back as nested dicts and lists.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no training checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; saved: {self.all_steps()}")
        self._manager.wait_until_finished()
        if target_state is None:
            state_arg = ocp.args.StandardRestore()
        else:
            target = abstract_like(target_state)
            saved = self._manager.item_metadata(step)["state"]
            if saved is not None:
                _check_shapes(getattr(saved, "tree", saved), target, f"{self.directory} step {step}")
            state_arg = ocp.args.StandardRestore(target)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=state_arg, meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta or {})

    def wait_until_finished(self) -> None:
        """Block until every pending save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["CheckpointMismatchError", "TrainCheckpointer", "abstract_like", "restore_params", "save_params"]
