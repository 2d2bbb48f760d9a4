"""The training engine: a jitted step (gradient accumulation as a scan over micro-batches) and a plain loop.

The step takes a train state, a batch stacked ``[n_micro, micro_batch, ...]`` and static auxiliary data (frozen
reference params), and returns the new state and metrics averaged over micro-batches. Master params stay in their
storage dtype (float32 by default) while ``config.compute_dtype`` sets the matmul dtype inside the model. With a mesh,
state and batch are sharded by the logical-axis rules of ``safety_jax.parallel``.

The loop logs metrics to JSONL and TensorBoard event files, shows a progress bar, runs eval callbacks, and saves
orbax checkpoints (params, optimizer state, step, RNG and the data iterator position) every N steps, resuming exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from safety_jax.train.losses import LossFn, add_loss_normalizers

log = logging.getLogger(__name__)
Batch = Mapping[str, Any]


@struct.dataclass
class TrainState:
    """Everything a step changes: step count, params (trainable and frozen), optimizer state, PRNG key data."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings (the optimizer lives in ``OptimConfig``, the data in ``DataConfig``)."""

    steps: int = 100
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0           # 0 = no periodic eval
    save_every: int = 0           # 0 = only at the end (when an output folder is given)
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True


def _split_micro(batch: Batch, n_micro: int) -> dict[str, Any]:
    """[B, ...] -> [n_micro, B / n_micro, ...] for arrays with a batch axis (scalars are left alone)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = v
            continue
        if v.shape[0] % n_micro:
            raise ValueError(f"batch['{k}'] has {v.shape[0]} rows, not divisible by grad_accum={n_micro}")
        out[k] = v.reshape(n_micro, v.shape[0] // n_micro, *v.shape[1:])
    return out


def stack_micro_batches(batch: Batch, grad_accum: int) -> dict[str, Any]:
    """Shape a batch for the step: ``[n_micro, micro, ...]`` plus the loss normalisers of SFT-style losses.

    Batches already stacked (their ``tokens``-like arrays have 3 dims) are kept as they are.
    """
    seq_key = next((k for k in batch if k.endswith("tokens")), None)
    stacked = seq_key is not None and np.ndim(batch[seq_key]) == 3
    out = dict(batch) if stacked else _split_micro(batch, grad_accum)
    return add_loss_normalizers(out)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    state_shardings: Any = None, batch_sharding: Any = None, donate: bool = True) -> Callable:
    """``step(state, batch, aux) -> (state, metrics)``, jitted once for a given batch shape.

    batch: arrays stacked ``[n_micro, micro_batch, ...]``; the loss and gradients are the mean over micro-batches
    (losses normalise token means globally through ``loss_normalizer``, see ``losses.add_loss_normalizers``).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, aux: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        n_micro = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, mb):
            grads_acc, = carry
            (loss, metrics), grads = grad_fn(state.params, mb, aux)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
            return (grads_acc,), metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        batch = {**batch, "dropout_rng": jax.random.key_data(jax.random.split(step_key, n_micro))}
        (grads,), metrics = jax.lax.scan(micro, (zeros,), batch)
        grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32)), metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=new_rng), metrics

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        kwargs["in_shardings"] = (state_shardings, batch_sharding, None)
        kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, **kwargs)


class MetricsLogger:
    """Metrics to ``metrics.jsonl`` and TensorBoard event files in an output folder (either may be absent)."""

    def __init__(self, out_dir: str | None, *, tensorboard: bool = True):
        self.path = None
        self.tb = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.path = os.path.join(out_dir, "metrics.jsonl")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
                except ImportError:  # optional
                    log.info("tensorboardX not installed: metrics go to metrics.jsonl only")

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(loss_fn: LossFn, optimizer: optax.GradientTransformation, params: Any, batches: Any, cfg: TrainConfig, *,
          aux: Any = None, out_dir: str | None = None, eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None,
          mesh: jax.sharding.Mesh | None = None, model_config: Any = None, strategy: str = "auto",
          state: TrainState | None = None) -> tuple[TrainState, list[dict[str, float]]]:
    """Run ``cfg.steps`` optimizer steps and return the final state and the logged metrics.

    batches: an iterator of batch dicts (``[B, ...]`` split into ``cfg.grad_accum`` micro-batches, or already
    stacked); when it has ``state()`` / ``restore()`` (``data.batches.BatchIterator``) its position is checkpointed.
    out_dir: where metrics, TensorBoard events and checkpoints go; an existing checkpoint there is resumed.
    eval_fn(params, step) -> metrics, called every ``cfg.eval_every`` steps and at the end.
    """
    from safety_jax.train.checkpoint import TrainCheckpointer

    if state is None:  # the step donates its state: work on a copy so the caller's params stay valid
        state = TrainState.create(jax.tree.map(jnp.array, params), optimizer, cfg.seed)
    state_sh = batch_axes = None
    if mesh is not None:
        from safety_jax.parallel import batch_sharding, tree_shardings_for

        state_sh = tree_shardings_for(state, model_config, mesh, strategy)
        state = jax.device_put(state, state_sh)
        batch_axes = batch_sharding(mesh, strategy, ndim=1).spec[0]
    ckpt = None
    if out_dir:
        save_every = cfg.save_every or cfg.steps
        ckpt = TrainCheckpointer(os.path.join(out_dir, "checkpoints"), save_every=save_every,
                                 max_to_keep=cfg.keep_checkpoints)
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(target_state=state)
            if hasattr(batches, "restore") and meta.get("data") is not None:
                batches.restore(meta["data"])
            log.info("resumed from step %d", int(state.step))
    step_fn = make_train_step(loss_fn, optimizer, state_shardings=state_sh)
    logger = MetricsLogger(out_dir)
    history: list[dict[str, float]] = []
    it: Iterator = iter(batches)
    start = int(state.step)
    bar = _progress(cfg, start)
    window: list[dict[str, jax.Array]] = []
    t0 = time.perf_counter()
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = stack_micro_batches(next(it), cfg.grad_accum)
            if mesh is not None:
                batch = _shard_stacked_batch(batch, mesh, batch_axes)
            state, metrics = step_fn(state, batch, aux)
            window.append(metrics)
            if step % cfg.log_every == 0 or step == cfg.steps:  # the only host sync: every log_every steps
                host = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
                host["steps_per_s"] = len(window) / (time.perf_counter() - t0)
                window, t0 = [], time.perf_counter()
                logger.log(step, host)
                history.append({"step": step, **host})
                if bar is not None:
                    bar.set_postfix({k: f"{host[k]:.4g}" for k in ("loss", "grad_norm") if k in host})
            if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                ev = dict(eval_fn(state.params, step))
                logger.log(step, ev, prefix="eval")
                history.append({"step": step, **{f"eval/{k}": float(v) for k, v in ev.items()}})
            if ckpt is not None:
                data_pos = batches.state() if hasattr(batches, "state") else None
                ckpt.save(step, state, {"data": data_pos, "step": step}, force=step == cfg.steps)
            if bar is not None:
                bar.update(1)
    finally:  # a crash still leaves every checkpoint already started complete on disk
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
        logger.close()
    return state, history


def _shard_stacked_batch(batch: Batch, mesh: jax.sharding.Mesh, batch_axes: Any) -> dict[str, jax.Array]:
    """Place a ``[n_micro, B, ...]`` batch on the mesh, splitting B over the batch axes."""
    _check_batch_divides(batch, mesh, batch_axes)
    P = jax.sharding.PartitionSpec

    def put(v: Any) -> jax.Array:
        spec = P(None, batch_axes) if np.ndim(v) >= 2 else P()
        return jax.device_put(v, jax.sharding.NamedSharding(mesh, spec))

    return {k: put(v) for k, v in batch.items()}


def _check_batch_divides(batch: Batch, mesh: jax.sharding.Mesh, batch_axes: Any) -> None:
    axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,) if batch_axes else ()
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    micro = np.shape(next(v for k, v in batch.items() if k.endswith("tokens")))[1]
    if micro % ways:
        raise ValueError(f"micro-batch of {micro} rows cannot be split over the batch mesh axes {axes} ({ways} ways): "
                         f"make batch_size / grad_accum a multiple of {ways}")


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
