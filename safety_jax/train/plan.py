"""Per-device memory of one training step, planned without weights or data.

    safety-jax plan --config run.yaml [key=value ...] [--mesh fsdp=8] [--batch 8 --seq 2048] [--json]

Everything the step of ``safety-jax train`` would receive is built abstractly (``jax.ShapeDtypeStruct`` leaves
carrying their ``NamedSharding``): the trainable params, the optimizer state, the frozen weights, the DPO / NPO
reference and the batch. Each tree's bytes per device come from its leaves' shardings (``shard_shape``); the step
is then lowered and compiled, and XLA's own estimate (``compiled.memory_analysis()``: arguments, outputs, donated
aliases, temporaries, generated code) gives the activations and the total. A ``model:`` folder is read for its
``config.json`` only; a ``preset:`` needs nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from safety_jax.data.text import DataConfig
from safety_jax.errors import ConfigError
from safety_jax.model.config import LlamaConfig, get_preset
from safety_jax.model.llama import param_shapes
from safety_jax.model.lora import LoraConfig, combine, init_lora, split
from safety_jax.parallel import activation_constraint, batch_sharding, make_mesh, tree_shardings_for
from safety_jax.train.losses import make_loss
from safety_jax.train.optim import OptimConfig, build_optimizer, split_trainable
from safety_jax.train.run import PRECOMPUTED_REFERENCE, PREFERENCE_METHODS, RunConfig, checkpoint_dtype, sub_config
from safety_jax.train.trainer import TrainConfig, TrainState, make_train_step

GIB = 1024**3
SEQUENCE_FIELDS = ("tokens", "loss_mask", "attention_mask", "positions")
XLA_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


@dataclasses.dataclass(frozen=True)
class TreeBytes:
    """Size of one input tree of the step: all devices together and on one device (from its shardings)."""

    name: str
    total: int
    per_device: int
    leaves: int
    note: str = ""
    counted: bool = True  # False when its buffers are those of another row (not added to the analytic total)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The memory plan of one training step (sizes in bytes; ``xla`` per device, None without compiling)."""

    model: str
    num_params: int
    method: str
    lora: str | None
    mesh: dict[str, int]
    strategy: str
    platform: str
    num_devices: int
    simulated: bool
    batch_size: int
    seq_len: int
    grad_accum: int
    param_dtype: str
    compute_dtype: str
    remat: str
    trees: tuple[TreeBytes, ...]
    xla: dict[str, int] | None = None

    @property
    def analytic_per_device(self) -> int:
        """Bytes per device of the step's inputs (activations and temporaries excluded)."""
        return sum(t.per_device for t in self.trees if t.counted)

    @property
    def xla_total(self) -> int | None:
        """XLA's per-device estimate: arguments + outputs − donated aliases + temporaries + generated code."""
        if self.xla is None:
            return None
        x = self.xla
        return x["argument"] + x["output"] - x["alias"] + x["temp"] + x["generated_code"]

    @property
    def per_device_total(self) -> int:
        """XLA's estimate when compiled, else the analytic inputs alone (a lower bound)."""
        total = self.xla_total
        return self.analytic_per_device if total is None else total

    def tree(self, name: str) -> TreeBytes:
        """The row called ``name`` (``params``, ``optimizer state``, ``frozen weights``, ``reference``, ``batch``)."""
        for t in self.trees:
            if t.name == name:
                return t
        raise KeyError(f"no tree {name!r} in this plan; it has {[t.name for t in self.trees]}")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(analytic_per_device=self.analytic_per_device, xla_total=self.xla_total,
                   per_device_total=self.per_device_total)
        return out

    def format(self) -> str:
        """A small aligned table and the line ``per-device total: X GiB``."""
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        where = f"{self.num_devices} {'simulated ' if self.simulated else ''}{self.platform.upper()} device(s)"
        micro = self.batch_size // self.grad_accum
        lines = [f"plan: {self.model} ({self.num_params / 1e9:.3g} B params), method {self.method}"
                 + (f", LoRA {self.lora}" if self.lora else ", full fine-tuning"),
                 f"mesh {mesh} (strategy {self.strategy}) on {where}",
                 f"batch {self.batch_size} x seq {self.seq_len} (grad_accum {self.grad_accum}, micro-batch {micro}), "
                 f"param_dtype {self.param_dtype}, compute_dtype {self.compute_dtype}, remat {self.remat}"]
        if self.simulated:
            lines.append("devices simulated on the host CPU: the sizes are those of the real mesh, the XLA estimate "
                         "is the CPU compiler's")
        rows = [(t.name, human_bytes(t.total), human_bytes(t.per_device), t.note) for t in self.trees]
        rows.append(("inputs (analytic)", "", human_bytes(self.analytic_per_device), "activations not included"))
        head = ("tree", "all devices", "per device", "")
        lines += ["", *_table([head, *rows])]
        if self.xla is not None:
            x = self.xla
            xrows = [("arguments", human_bytes(x["argument"]), ""), ("outputs", human_bytes(x["output"]), ""),
                     ("aliased (donated)", human_bytes(x["alias"]), "outputs reusing argument buffers"),
                     ("temporaries", human_bytes(x["temp"]), "activations, gradients, optimizer scratch"),
                     ("generated code", human_bytes(x["generated_code"]), "")]
            lines += ["", *_table([("XLA estimate", "per device", ""), *xrows])]
            lines += ["", f"per-device total: {_gib(self.per_device_total)} GiB "
                          "(XLA: arguments + outputs - aliased + temporaries + code)"]
        else:
            lines += ["", f"per-device total: {_gib(self.per_device_total)} GiB (inputs only; not compiled, so "
                          "activations and temporaries are not included)"]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}" if n >= GIB // 1000 else f"{n / GIB:.6f}"


def human_bytes(n: int) -> str:
    """``12.3 GiB``, ``456 MiB``, ``7.8 KiB``, ``12 B``."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if abs(n) < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)), r[-1]]
        out.append("  ".join(cells).rstrip())
    return out


# ---------------------------------------------------------------------------------------------------- sizes
def tree_bytes(name: str, tree: Any, **kwargs: Any) -> TreeBytes:
    """Bytes of a tree of arrays / ``ShapeDtypeStruct`` s with shardings (a leaf without one counts whole)."""
    total = per_device = 0
    leaves = jax.tree.leaves(tree)
    for leaf in leaves:
        itemsize = np.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * itemsize
        sharding = getattr(leaf, "sharding", None)
        shard = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        per_device += math.prod(shard) * itemsize
    return TreeBytes(name, total, per_device, len(leaves), **kwargs)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def memory_stats(compiled: Any) -> dict[str, int]:
    """``compiled.memory_analysis()`` as ``{argument, output, alias, temp, generated_code, peak}`` bytes."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend gives no memory analysis of compiled programs; rerun with --no-compile")
    out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in XLA_FIELDS}
    out["peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return out


# ---------------------------------------------------------------------------------------------------- the step
def model_config(cfg: RunConfig) -> tuple[LlamaConfig, str]:
    """The architecture (from ``config.json`` or the preset) with the run's dtypes, and a name for it."""
    if cfg.model is not None:
        config = LlamaConfig.from_hf_file(cfg.model, param_dtype=cfg.param_dtype)
        compute = cfg.compute_dtype or checkpoint_dtype(cfg.model) or "float32"
        name = cfg.model
    else:
        config = get_preset(cfg.preset, param_dtype=cfg.param_dtype)
        compute = cfg.compute_dtype or "float32"
        name = cfg.preset
    return config.replace(compute_dtype=compute), name


def pick_devices(num: int | None) -> tuple[list[jax.Device], bool]:
    """``num`` devices of the default backend, else of the host CPU; and whether they are simulated (several CPU
    devices in one process)."""
    devices = jax.devices()
    if num is not None and len(devices) < num:
        cpus = jax.devices("cpu")
        if len(cpus) < num:
            raise ConfigError(f"the mesh needs {num} devices but {len(devices)} {devices[0].platform} and "
                              f"{len(cpus)} CPU device(s) exist; run `safety-jax plan` (which simulates CPU devices "
                              f"when jax is not yet imported) or set XLA_FLAGS=--xla_force_host_platform_device_count"
                              f"={num} before importing jax")
        devices = cpus
    devices = devices[:num] if num is not None else devices
    local = [d for d in devices if d.process_index == jax.process_index()]
    return devices, devices[0].platform == "cpu" and len(local) > 1


def _batch_shapes(method: str, precomputed: bool, grad_accum: int, micro: int, seq: int) -> dict[str, Any]:
    """The arrays a stacked ``BatchIterator`` batch has for ``method`` (``[grad_accum, micro, seq]`` int32)."""
    prefixes = ("chosen_", "rejected_") if method in PREFERENCE_METHODS else ("",)
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    batch = {p + f: jax.ShapeDtypeStruct((grad_accum, micro, seq), i32) for p in prefixes for f in SEQUENCE_FIELDS}
    batch["example_mask"] = jax.ShapeDtypeStruct((grad_accum, micro), i32)
    if precomputed:
        for p in PRECOMPUTED_REFERENCE[method]:
            batch[f"ref_{p}logps"] = jax.ShapeDtypeStruct((grad_accum, micro), f32)
    return batch


def _lora_name(lora_cfg: LoraConfig | None) -> str | None:
    if lora_cfg is None:
        return None
    return f"rank {lora_cfg.rank} on {','.join(lora_cfg.targets)}"


def plan_step(cfg: RunConfig, *, batch_size: int | None = None, seq_len: int | None = None,
              mesh_spec: str | None = None, compile: bool = True) -> StepPlan:
    """Plan one step of the run ``cfg`` (``batch_size``/``seq_len``/``mesh_spec`` override its own)."""
    train_cfg = sub_config(TrainConfig, cfg.train, "train", seed=cfg.seed)
    optim_cfg = sub_config(OptimConfig, cfg.optim, "optim", total_steps=train_cfg.steps)
    data_cfg = sub_config(DataConfig, {"path": "", **cfg.data}, "data")
    lora_cfg = sub_config(LoraConfig, cfg.lora, "lora") if cfg.lora is not None else None
    batch_size = cfg.batch_size if batch_size is None else batch_size
    seq_len = data_cfg.max_length if seq_len is None else seq_len
    if batch_size < 1:
        raise ConfigError(f"plan: batch size {batch_size} must be a positive integer")
    if seq_len < 2:
        raise ConfigError(f"plan: sequence length {seq_len} must be at least 2 (a token and its target)")
    ga = train_cfg.grad_accum
    if batch_size % ga:
        raise ConfigError(f"plan: batch size {batch_size} is not a multiple of train.grad_accum={ga}")
    micro = batch_size // ga

    config, name = model_config(cfg)
    spec = mesh_spec or cfg.mesh or "data=1"
    devices, simulated = pick_devices(_spec_device_count(spec))
    mesh = make_mesh(spec, devices=devices)

    params = param_shapes(config)
    if lora_cfg is not None:
        params = combine(params, jax.eval_shape(lambda: init_lora(config, lora_cfg, jax.random.key(0))))
    trainable, frozen = split_trainable(optim_cfg, params)
    optimizer = build_optimizer(optim_cfg, trainable)
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, 0), trainable)

    loss_kwargs = dict(cfg.loss)
    if train_cfg.remat != "none":
        loss_kwargs["remat"] = train_cfg.remat
    if lora_cfg is not None:
        loss_kwargs["lora_cfg"] = lora_cfg
    loss_fn = make_loss(cfg.method, config, **loss_kwargs)
    precomputed = cfg.method in PRECOMPUTED_REFERENCE and cfg.precompute_reference
    aux = None
    if cfg.method in PRECOMPUTED_REFERENCE and not cfg.precompute_reference:
        aux = {"ref_params": split(params)[0]}

    state_sh = tree_shardings_for(state, config, mesh, cfg.strategy)
    state = _with_shardings(state, state_sh)
    frozen = _with_shardings(frozen, tree_shardings_for(frozen, config, mesh, cfg.strategy))
    if aux is not None:
        aux = _with_shardings(aux, tree_shardings_for(aux, config, mesh, cfg.strategy))
    batch_axes = batch_sharding(mesh, cfg.strategy, ndim=1).spec[0]
    _check_batch_split(micro, mesh, batch_axes)
    rows = NamedSharding(mesh, PartitionSpec(None, batch_axes))
    batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rows)
             for k, s in _batch_shapes(cfg.method, precomputed, ga, micro, seq_len).items()}

    trees = [tree_bytes("params", state.params, note="trained (master weights)"),
             tree_bytes("optimizer state", (state.opt_state, state.step, state.rng, state.nonfinite_step),
                        note=f"{optim_cfg.optimizer} (+ step, rng)"),
             tree_bytes("frozen weights", frozen, note="constants of the step")]
    if aux is not None:
        shared = lora_cfg is not None
        trees.append(tree_bytes("reference", aux, counted=not shared,
                                note="the frozen base itself" if shared else "a copy of the base weights"))
    trees.append(tree_bytes("batch", batch, note="precomputed reference log-probs" if precomputed else ""))

    xla = None
    if compile:
        step = make_train_step(loss_fn, optimizer, state_shardings=state_sh,
                               matmul_precision=train_cfg.matmul_precision,
                               activation_sharding=activation_constraint(mesh, cfg.strategy))
        xla = memory_stats(step.lower(state, batch, aux, frozen).compile())

    return StepPlan(model=name, num_params=config.num_params(), method=cfg.method, lora=_lora_name(lora_cfg),
                    mesh=dict(mesh.shape), strategy=cfg.strategy, platform=devices[0].platform,
                    num_devices=len(devices), simulated=simulated, batch_size=batch_size, seq_len=seq_len,
                    grad_accum=ga, param_dtype=config.param_dtype, compute_dtype=config.compute_dtype,
                    remat=train_cfg.remat, trees=tuple(trees), xla=xla)


def _check_batch_split(micro: int, mesh: Mesh, batch_axes: Any) -> None:
    axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,) if batch_axes else ()
    ways = math.prod(mesh.shape[a] for a in axes)
    if micro % ways:
        raise ConfigError(f"plan: a micro-batch of {micro} rows cannot be split over the batch mesh axes {axes} "
                          f"({ways} ways); make batch_size / train.grad_accum a multiple of {ways}")


def _spec_device_count(spec: str) -> int | None:
    """Devices a mesh spec asks for (None when an axis is ``-1``: all devices there are)."""
    sizes = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        _, _, value = part.partition("=")
        try:
            sizes.append(int(value))
        except ValueError:
            return None  # make_mesh names the malformed part
    return None if any(s < 1 for s in sizes) else math.prod(sizes)


__all__ = ["StepPlan", "TreeBytes", "memory_stats", "model_config", "pick_devices", "plan_step", "tree_bytes"]
