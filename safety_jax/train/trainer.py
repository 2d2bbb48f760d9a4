"""The training engine: a jitted step over the trainable weights only, and a plain loop around it.

The step takes a train state (step, the *trainable* params, optimizer state, PRNG key data), a batch stacked
``[n_micro, micro_batch, ...]``, static auxiliary data (e.g. frozen reference params) and the frozen params, and
returns the new state and metrics averaged over micro-batches. Only ``state.params`` is differentiated: frozen weights
(a LoRA base, frozen modules — see ``optim.split_trainable``) enter the loss as constants, so the compiled step holds
no weight-gradient matmul, accumulator or norm term for them. Master params keep their storage dtype (float32 by
default) while ``config.compute_dtype`` sets the matmul dtype inside the model (mixed precision as in MaxText and
Levanter); ``TrainConfig.matmul_precision`` sets XLA's matmul precision.

A step whose loss or gradient is not finite leaves the params unchanged (its gradients and update are zeroed; the
optimizer's moments only decay) and records its number in ``state.nonfinite_step``; the loop checks it whenever it
syncs with the host (logging, checkpointing, evaluation) and stops with :class:`~safety_jax.errors.NonFiniteError`
before anything is written, so no checkpoint holds NaN params or comes from after the bad step.

The loop logs metrics to JSONL and TensorBoard event files, shows a progress bar, runs eval callbacks, and saves
orbax checkpoints (trainable params, optimizer state, step, RNG, data position and a fingerprint of the run's config)
every N steps. A re-run resumes exactly — refusing a checkpoint written under another fingerprint — and never logs a
step twice.

A gradient function (:class:`GradFn`; ``make_train_step(..., grad_fn=...)``, ``train(..., grad_fn=...)``) replaces
``jax.value_and_grad(loss)`` inside the same step — accumulation, clipping, masks, sharding and checkpoints unchanged —
for defenses that change the update rule rather than the loss (Vaccine, Lisa, Booster: ``train.defenses``). What such
a rule carries from step to step (Lisa's anchor weights) lives in ``TrainState.extra`` and is checkpointed with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from safety_jax.errors import ConfigError, DataError, NonFiniteError
from safety_jax.model.llama import REMAT_POLICIES
from safety_jax.model.sharding import Constrain, use_activation_sharding
from safety_jax.train.losses import LossFn, add_loss_normalizers
from safety_jax.train.optim import last_grad_norm, merge_params

log = logging.getLogger(__name__)
Batch = Mapping[str, Any]

MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
RESUME_MODES = ("auto", "force", "never")
# TrainConfig fields that may change between a run and its resumption (they change no number the run computes).
RESUMABLE_FIELDS = ("steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "progress", "resume")


@struct.dataclass
class TrainState:
    """Everything a step changes: step count, trainable params, optimizer state, PRNG key data, the first step
    whose loss or gradient was not finite (0 while every step was), and the gradient function's own state
    (``extra``: ``None`` unless the :class:`GradFn` keeps one)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_step: jax.Array
    extra: Any = None

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, seed: int = 0,
               extra: Any = None) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)), nonfinite_step=jnp.zeros((), jnp.int32),
                   extra=extra)


class GradFn(Protocol):
    """How a step turns one micro-batch into gradients, in place of ``jax.value_and_grad(loss, has_aux=True)``.

    ``grad_fn(loss, params, batch, step, extra) -> ((loss_value, metrics), grads)``: ``loss(params, batch) ->
    (loss_value, metrics)`` is the run's loss bound to its frozen weights and aux, ``params`` the trainable tree,
    ``batch`` one micro-batch, ``step`` the 0-based number of the step being taken ([] int32) and ``extra`` the
    rule's state. ``grads`` has the structure and dtypes of ``params``; ``metrics`` holds ``"loss"``.

    Optional methods: ``init_extra(params) -> extra`` (the state a fresh run starts from; arrays must not alias
    ``params``, which the step donates), ``step_extra(extra, params, step) -> extra`` (called once per step, before
    the micro-batches) and ``describe() -> dict`` (JSON settings added to the checkpoint fingerprint, so a resume
    under another rule is refused; empty for the plain gradient). A plain function has none of them: its ``extra``
    is ``None``.
    """

    def __call__(self, loss: Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]], params: Any,
                 batch: Batch, step: jax.Array, extra: Any) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
        ...


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings (the optimizer lives in ``OptimConfig``, the data in ``DataConfig``).

    matmul_precision: XLA's matmul precision for the step (``None``: the backend's default; ``"highest"`` for fp32
    parity checks). remat: the layer rematerialisation policy the losses are built with (``safety-jax train`` passes
    it to the loss; ``none``, ``dots_saveable``, ``full``). resume: ``auto`` continues a checkpoint in the output
    folder whose config fingerprint matches and refuses one that does not; ``force`` continues it anyway; ``never``
    refuses any existing checkpoint.
    """

    steps: int = 100
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0           # 0 = no periodic eval
    save_every: int = 0           # 0 = only at the end (when an output folder is given)
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    matmul_precision: str | None = None
    remat: str = "none"
    resume: str = "auto"

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("grad_accum", 1), ("log_every", 1), ("eval_every", 0), ("save_every", 0),
                          ("keep_checkpoints", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"train.{name}={value!r} must be an integer >= {low}")
        if not isinstance(self.progress, bool):
            raise ConfigError(f"train.progress={self.progress!r} must be true or false")
        for name, allowed in (("matmul_precision", MATMUL_PRECISIONS), ("remat", REMAT_POLICIES),
                              ("resume", RESUME_MODES)):
            value = getattr(self, name)
            if value not in allowed and not (name == "matmul_precision" and value is None):
                raise ConfigError(f"train.{name}={value!r}; choose one of {', '.join(allowed)}")


def stack_micro_batches(batch: Batch, grad_accum: int) -> dict[str, Any]:
    """Shape a ``[B, ...]`` batch for the step: ``[grad_accum, B / grad_accum, ...]`` (scalars are left alone).

    Batches already stacked (their ``tokens``-like arrays have 3 dims) are kept as they are.
    """
    seq_key = next((k for k in batch if k.endswith("tokens")), None)
    if seq_key is not None and np.ndim(batch[seq_key]) == 3:
        return dict(batch)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = v
            continue
        if v.shape[0] % grad_accum:
            raise ConfigError(f"batch['{k}'] has {v.shape[0]} rows, not divisible by train.grad_accum={grad_accum}")
        out[k] = v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
    return out


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, state_shardings: Any = None,
                    donate: bool = True, matmul_precision: str | None = None,
                    activation_sharding: Constrain | None = None, grad_fn: GradFn | None = None) -> Callable:
    """``step(state, batch, aux, frozen) -> (state, metrics)``, jitted once per batch shape.

    batch: arrays stacked ``[n_micro, micro_batch, ...]``; the loss and gradients are the mean over micro-batches
    (token means normalised over the whole step: ``losses.add_loss_normalizers``). frozen: the weights cut out of
    ``state.params`` (``optim.split_trainable``), or ``None``. ``metrics["grad_norm"]`` is the norm clipping used.
    activation_sharding: the mesh constraint of the model's activations (``parallel.activation_constraint``).
    grad_fn: the gradient of each micro-batch (:class:`GradFn`; default ``jax.value_and_grad`` of ``loss_fn``).
    """
    step_extra = getattr(grad_fn, "step_extra", None)

    def step(state: TrainState, batch: Batch, aux: Any = None,
             frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        batch = add_loss_normalizers(batch)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        batch["dropout_rng"] = jax.random.key_data(jax.random.split(step_key, n_micro))
        bound_loss = lambda tr, mb: loss_fn(merge_params(tr, frozen), mb, aux)
        extra = state.extra if step_extra is None else step_extra(state.extra, state.params, state.step)
        if grad_fn is None:
            micro_grad = jax.value_and_grad(bound_loss, has_aux=True)
        else:
            micro_grad = lambda tr, mb: grad_fn(bound_loss, tr, mb, state.step, extra)

        if n_micro == 1:
            (_, metrics), grads = micro_grad(state.params, jax.tree.map(lambda x: x[0], batch))
        else:
            def micro(acc, mb):
                (_, metrics), grads = micro_grad(state.params, mb)
                return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), metrics

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            grads, metrics = jax.lax.scan(micro, zeros, batch)
            grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), grads, state.params)
            metrics = jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32)), metrics)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        # A non-finite step changes no weight: its gradients and update are zeroed (a select fused into tensors the
        # step writes anyway; keeping the old state beside the new one would cost a copy of it).
        finite = jnp.isfinite(optax.global_norm(grads)) & jnp.isfinite(metrics.get("loss", 0.0))
        zero_unless_finite = lambda tree: jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), tree)
        updates, opt_state = optimizer.update(zero_unless_finite(grads), state.opt_state, state.params)
        params = optax.apply_updates(state.params, zero_unless_finite(updates))
        recorded = last_grad_norm(opt_state)
        metrics["grad_norm"] = optax.global_norm(grads) if recorded is None else recorded
        metrics["grad_norm"] = jnp.where(finite, metrics["grad_norm"], jnp.nan)
        first_bad = jnp.where((state.nonfinite_step == 0) & ~finite, state.step + 1, state.nonfinite_step)
        new_rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=new_rng,
                             nonfinite_step=first_bad, extra=extra), metrics

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, None)

    def traced(*args: Any) -> Any:  # the settings that shape what is traced: matmul precision, activation sharding
        with contextlib.ExitStack() as stack:
            if matmul_precision is not None:
                stack.enter_context(jax.default_matmul_precision(matmul_precision))
            stack.enter_context(use_activation_sharding(activation_sharding))
            return step(*args)

    return jax.jit(traced, **kwargs)


# ---------------------------------------------------------------------------------------------------- logging
class MetricsLogger:
    """Metrics to ``metrics.jsonl`` and TensorBoard event files in an output folder (either may be absent).

    ``resume_step``: the step a resumed run continues after; rows logged past it by the interrupted run are dropped
    from ``metrics.jsonl`` and purged from TensorBoard, so no step is ever logged twice.
    """

    def __init__(self, out_dir: str | None, *, tensorboard: bool = True, resume_step: int | None = None):
        self.path = None
        self.tb = None
        if not out_dir or jax.process_index() != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(self.path):
            _truncate_jsonl(self.path, resume_step or 0)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge)
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


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Keep the rows of ``path`` up to ``last_step`` (a torn last line is dropped); rewritten atomically."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(row.get("step", 0)) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- the loop
def train(loss_fn: LossFn, optimizer: optax.GradientTransformation, params: Any, batches: Any, cfg: TrainConfig, *,
          frozen: Any = None, aux: Any = None, out_dir: str | None = None,
          eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None, mesh: jax.sharding.Mesh | None = None,
          model_config: Any = None, strategy: str = "auto", state: TrainState | None = None,
          fingerprint: Mapping[str, Any] | None = None, donate_params: bool = False,
          grad_fn: GradFn | None = None) -> tuple[TrainState, list[dict[str, float]]]:
    """Run ``cfg.steps`` optimizer steps and return the final state and the logged metrics.

    params: the trainable tree (``optim.split_trainable``; whole params when nothing is frozen) and ``frozen`` the
    rest; ``state.params`` of the result is the trainable tree (``optim.merge_params`` gives the model).
    batches: an iterator of batch dicts (``[B, ...]`` split into ``cfg.grad_accum`` micro-batches, or already
    stacked); when it has ``state()`` / ``restore()`` (``data.batches.BatchIterator``) its position is checkpointed.
    In a multi-process job each batch is this process's share of the rows (see ``BatchIterator(process_index=...)``).
    out_dir: where metrics, TensorBoard events and checkpoints go; a checkpoint there is resumed when its
    ``fingerprint`` (a JSON dict of the settings that define the run) matches, see ``TrainConfig.resume``.
    eval_fn(params, step) -> metrics, called every ``cfg.eval_every`` steps and at the end, after the final save.
    model_config: the ``LlamaConfig`` (token ids are checked against its vocabulary; shardings need it).
    donate_params: let the first step reuse the memory of ``params`` (they are invalid afterwards) instead of
    training on a copy.
    grad_fn: a :class:`GradFn` in place of ``jax.value_and_grad(loss_fn)`` (``defenses.make_defense_grad``); its
    ``init_extra`` starts ``state.extra`` and its ``describe()`` joins the fingerprint under ``"grad_fn"``.
    """
    from safety_jax.train.checkpoint import TrainCheckpointer

    if mesh is None and jax.process_count() > 1:
        raise ConfigError("a multi-process run needs a mesh (mesh: data=..,fsdp=..) to place its batches")
    if state is None:
        trainable = params if donate_params else jax.tree.map(jnp.array, params)
        warn_low_precision_masters(trainable)
        init_extra = getattr(grad_fn, "init_extra", None)
        state = TrainState.create(trainable, optimizer, cfg.seed,
                                  extra=None if init_extra is None else init_extra(trainable))
    state_sh = batch_axes = constraint = None
    if mesh is not None:
        from safety_jax.parallel import activation_constraint, batch_sharding, tree_shardings_for

        constraint = activation_constraint(mesh, strategy)
        state_sh = tree_shardings_for(state, model_config, mesh, strategy)
        state = jax.device_put(state, state_sh)
        if frozen is not None:
            frozen = jax.device_put(frozen, tree_shardings_for(frozen, model_config, mesh, strategy))
        if aux is not None:
            aux = jax.device_put(aux, tree_shardings_for(aux, model_config, mesh, strategy))
        batch_axes = batch_sharding(mesh, strategy, ndim=1).spec[0]
    ckpt = None
    resume_step = None
    described = grad_fn.describe() if hasattr(grad_fn, "describe") else None
    if described:
        fingerprint = {**dict(fingerprint or {}), "grad_fn": described}
    fingerprint = run_fingerprint(cfg, fingerprint)
    if out_dir:
        ckpt = TrainCheckpointer(os.path.join(out_dir, "checkpoints"), save_every=cfg.save_every or cfg.steps,
                                 max_to_keep=cfg.keep_checkpoints)
        if ckpt.latest_step() is not None:
            try:
                state, data_pos = _resume(ckpt, state, fingerprint, cfg)
            except BaseException:
                ckpt.close()
                raise
            if hasattr(batches, "restore") and data_pos is not None:
                batches.restore(data_pos)
            resume_step = int(state.step)
            log.info("resumed from step %d", resume_step)
    step_fn = make_train_step(loss_fn, optimizer, state_shardings=state_sh, matmul_precision=cfg.matmul_precision,
                              activation_sharding=constraint, grad_fn=grad_fn)
    logger = MetricsLogger(out_dir, resume_step=resume_step)
    history: list[dict[str, float]] = []
    it: Iterator = iter(batches)
    start = int(state.step)
    bar = _progress(cfg, start)
    window: list[dict[str, jax.Array]] = []
    save_every = cfg.save_every or cfg.steps
    t0 = time.perf_counter()
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = stack_micro_batches(next(it), cfg.grad_accum)
            if model_config is not None:
                _check_token_ids(batch, model_config.vocab_size, step)
            if mesh is not None:
                batch = _place_batch(batch, mesh, batch_axes)
            state, metrics = step_fn(state, batch, aux, frozen)
            window.append(metrics)
            last = step == cfg.steps
            due_log = step % cfg.log_every == 0 or last
            due_save = ckpt is not None and (step % save_every == 0 or last)
            due_eval = eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
            if due_log or due_save or due_eval:
                _raise_if_nonfinite(state, ckpt)
            if due_log:  # the host syncs: logging, saving and evaluation steps only
                host = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
                host["steps_per_s"] = len(window) / (time.perf_counter() - t0)
                window, t0 = [], time.perf_counter()
                logger.log(step, host)
                history.append({"step": step, **host})
                if bar is not None:
                    bar.set_postfix({k: f"{host[k]:.4g}" for k in ("loss", "grad_norm") if k in host})
            if ckpt is not None:
                data_pos = batches.state() if hasattr(batches, "state") else None
                ckpt.save(step, state, {"data": data_pos, "step": step, "fingerprint": fingerprint}, force=last)
            if due_eval:
                ev = dict(eval_fn(merge_params(state.params, frozen), step))
                logger.log(step, ev, prefix="eval")
                history.append({"step": step, **{f"eval/{k}": float(v) for k, v in ev.items()}})
            if bar is not None:
                bar.update(1)
    finally:  # a crash still leaves every checkpoint already started complete on disk
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
        logger.close()
    return state, history


def _resume(ckpt: Any, state: TrainState, fingerprint: dict[str, Any], cfg: TrainConfig) -> tuple[TrainState, Any]:
    """Restore the newest checkpoint after checking that it was written by the same run."""
    if cfg.resume == "never":
        raise ConfigError(f"{ckpt.directory} already holds a checkpoint (step {ckpt.latest_step()}) and "
                          "train.resume=never; choose another output folder or set train.resume=auto")
    restored, meta = ckpt.restore(target_state=state)
    saved = meta.get("fingerprint")
    if cfg.resume != "force" and saved is not None and saved != fingerprint:
        changed = fingerprint_diff(saved, fingerprint)
        raise ConfigError(f"the checkpoint in {ckpt.directory} (step {int(restored.step)}) was written by a run "
                          f"with other settings: {'; '.join(changed)}. Use another output folder, restore those "
                          "settings, or set train.resume=force to continue it under the new ones")
    if int(restored.nonfinite_step):
        raise NonFiniteError(f"the checkpoint in {ckpt.directory} records a non-finite step "
                             f"{int(restored.nonfinite_step)}")
    return restored, meta.get("data")


def run_fingerprint(cfg: TrainConfig, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON dict a checkpoint is stamped with: ``settings`` (the caller's description of the run: model, data,
    loss, optimizer, ...) plus every ``TrainConfig`` field that changes the numbers (all but ``RESUMABLE_FIELDS``)."""
    train_fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RESUMABLE_FIELDS}
    merged = {**dict(settings or {}), "train": {**dict((settings or {}).get("train", {})), **train_fields}}
    for key in RESUMABLE_FIELDS:
        merged["train"].pop(key, None)
    return json.loads(json.dumps(merged, default=str))


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["optim.lr: 0.001 -> 0.0003", ...]`` for every dotted field that differs between two nested dicts."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _raise_if_nonfinite(state: TrainState, ckpt: Any) -> None:
    bad = int(state.nonfinite_step)
    if bad:
        kept = ckpt.latest_step() if ckpt is not None else None
        where = f"; the last checkpoint (step {kept}) holds the last finite params" if kept else ""
        raise NonFiniteError(f"step {bad}: the loss or the gradient norm is not finite (the update was skipped and "
                             f"training stopped{where}); lower optim.lr, set optim.clip_norm, or check the data")


def _check_token_ids(batch: Batch, vocab_size: int, step: int) -> None:
    for key, value in batch.items():
        if key.endswith("tokens") and np.size(value):
            lo, hi = int(np.min(value)), int(np.max(value))
            if lo < 0 or hi >= vocab_size:
                raise DataError(f"batch of step {step}: batch['{key}'] holds token id {hi if hi >= vocab_size else lo}"
                                f" outside the model's vocabulary [0, {vocab_size}); use the model's own tokenizer "
                                "(or resize its embeddings) and a pad id inside the vocabulary")


def warn_low_precision_masters(params: Any) -> None:
    """Log a warning when trainable params are stored in a 16-bit float dtype: updates smaller than half a unit in
    the last place of a weight are rounded away (a bf16 weight of 0.02 ignores updates below ~6e-5)."""
    low = [x for x in jax.tree.leaves(params) if hasattr(x, "dtype") and x.dtype in (jnp.bfloat16, jnp.float16)]
    if not low:
        return
    dtype = low[0].dtype
    typical = float(jnp.mean(jnp.abs(max(low, key=lambda x: x.size)), dtype=jnp.float32))  # one cheap reduction
    ulp = float(jnp.spacing(jnp.asarray(typical, dtype)).astype(jnp.float32)) if typical > 0 else 0.0
    log.warning("training %s master weights (param_dtype=%s): an update smaller than %.2g — half the spacing of "
                "%s at the typical weight magnitude %.3g — leaves a weight unchanged; keep param_dtype=float32 "
                "(compute_dtype=bfloat16 keeps the matmuls fast)", jnp.dtype(dtype).name, jnp.dtype(dtype).name,
                ulp / 2, jnp.dtype(dtype).name, typical)


def _place_batch(batch: Batch, mesh: jax.sharding.Mesh, batch_axes: Any) -> dict[str, jax.Array]:
    """Place a ``[n_micro, B_local, ...]`` batch on the mesh, rows split over the batch axes. Each process gives its
    own rows (``jax.make_array_from_process_local_data``); single-process, the local rows are the batch."""
    P = jax.sharding.PartitionSpec
    procs = jax.process_count()
    micro = np.shape(next(v for k, v in batch.items() if k.endswith("tokens")))[1] * procs
    axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,) if batch_axes else ()
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if micro % ways:
        raise ConfigError(f"micro-batch of {micro} rows cannot be split over the batch mesh axes {axes} ({ways} "
                          f"ways): make batch_size / train.grad_accum a multiple of {ways}")

    def put(v: Any) -> jax.Array:
        v = np.asarray(v)
        if v.ndim >= 2:
            sharding = jax.sharding.NamedSharding(mesh, P(None, batch_axes))
            return jax.make_array_from_process_local_data(sharding, v, (v.shape[0], v.shape[1] * procs, *v.shape[2:]))
        return jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, P()), v, v.shape)

    return {k: put(v) for k, v in batch.items()}


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
