"""Training checkpoints through orbax, with resume; params-only checkpoints live in the model layer and are
re-exported here (:func:`save_params`, :func:`restore_params`, :func:`abstract_like`).

Restores go straight onto the target shardings (each process reads only its shards): pass abstract
``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` targets, e.g. from :func:`abstract_like` or
:func:`safety_jax.parallel.tree_shardings_for`. Directories may be local or ``gs://``-style URIs.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from safety_jax.errors import CheckpointMismatchError
from safety_jax.model.orbax_params import abstract_like, check_shapes, restore_params, save_params
from safety_jax.model.storage import to_path


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
        self.directory = to_path(directory)
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
                check_shapes(getattr(saved, "tree", saved), target, f"{self.directory} step {step}")
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
