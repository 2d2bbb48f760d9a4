"""Sweeps: a grid (or list) of config overrides × seeds over any study or ``safety-jax train`` config, one Ray task
per cell.

    safety-jax sweep --spec sweep.yaml [--out runs/sweep] [--address ray://head:10001]

A spec (YAML, read by :func:`safety_jax.configs.read_yaml`)::

    name: ssft_lr
    target: study1            # study1 … study4, train, or "package.module:function" (see TARGETS)
    config: quick             # the target's config name or path
    overrides: {finetune.steps: 20}
    grid: {finetune.lrs.eta_M: [1.0e-3, 3.0e-3]}
    seeds: [0, 1]             # set as `seed_key` (default `seed`) in each cell
    resources: {cpus: 1, gpus: 0, hosts: 1}
    plots: [{metric: eval.ssft@eta_M.unsafe.refused, x: finetune.lrs.eta_M}]

Each cell is the base config with its overrides; it runs in ``OUT/cells/<id>/`` (``id`` = the fingerprint of target,
config and overrides). A finished cell (``DONE``) is never rerun; a failed one records its traceback in ``FAILED``
and is retried on the next call while the other cells go on. Cells run on Ray: ``ray.init()`` starts a local Ray by
default; ``--address`` or ``RAY_ADDRESS`` sends them to a cluster. A cell with ``resources.hosts > 1`` runs as a
placement group with one worker per host; the first host's address is the ``jax.distributed`` coordinator (the
engine's multi-process path), so every host needs the same filesystem view of ``OUT``. The results land in
``OUT/results.{csv,md,json}`` (one row per cell and metric) and ``OUT/<metric>_vs_<axis>.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import itertools
import json
import logging
import math
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from safety_jax.configs import apply_overrides, build, read_yaml
from safety_jax.errors import ConfigError
from safety_jax.stages import fingerprint, write_atomic

log = logging.getLogger("safety_jax.sweep")

# target -> (config loader "module:function" taking (name_or_path, overrides), runner "module:function" taking
# (config, out) and returning the run's metrics)
TARGETS: dict[str, tuple[str, str]] = {
    "study1": ("experiments.study1_mechanics.config:load_config", "experiments.study1_mechanics.run:run"),
    "study2": ("experiments.study2_mllr.config:load_config", "experiments.study2_mllr.run:run"),
    "study3": ("experiments.study3_residual.config:load_config", "experiments.study3_residual.run:run"),
    "study4": ("experiments.study4_antidote.config:load_config", "experiments.study4_antidote.run:run"),
    "train": ("safety_jax.sweep:load_train_config", "safety_jax.sweep:run_train"),
}
PLACEMENT_STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one cell asks Ray for, per host. ``custom``: other Ray resources (e.g. ``{TPU: 4}``); ``hosts > 1``:
    one worker per bundle of a placement group with ``strategy`` (``STRICT_SPREAD`` = one per node);
    ``cpu_devices``: simulated JAX CPU devices per worker (the XLA flag; for CPU meshes); ``env``: environment of
    each worker."""

    cpus: float = 1.0
    gpus: float = 0.0
    custom: dict[str, float] = dataclasses.field(default_factory=dict)
    hosts: int = 1
    strategy: str = "STRICT_SPREAD"
    cpu_devices: int | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.cpus >= 0 or not self.gpus >= 0:
            raise ConfigError(f"sweep resources: cpus={self.cpus}, gpus={self.gpus} must be >= 0")
        if not isinstance(self.hosts, int) or self.hosts < 1:
            raise ConfigError(f"sweep resources.hosts={self.hosts!r} must be a positive integer")
        if self.strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"sweep resources.strategy={self.strategy!r}; choose one of {PLACEMENT_STRATEGIES}")

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.custom}


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep (see the module docstring). ``cells``: explicit override sets, crossed with ``grid`` (either may be
    empty); ``metrics``: the dotted metric names to tabulate (default: every numeric scalar the run returns)."""

    name: str
    target: str
    config: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seeds: list[int] = dataclasses.field(default_factory=list)
    seed_key: str = "seed"
    metrics: list[str] = dataclasses.field(default_factory=list)
    plots: list[dict[str, str]] = dataclasses.field(default_factory=list)
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.target not in TARGETS and ":" not in self.target:
            raise ConfigError(f"sweep target={self.target!r}; choose one of {sorted(TARGETS)} or give "
                              "'package.module:function' (a runner taking (config, out))")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep grid.{key}={values!r} must be a non-empty list of values")
        for i, cell in enumerate(self.cells):
            if not isinstance(cell, dict):
                raise ConfigError(f"sweep cells[{i}]={cell!r} must be a mapping of overrides")
        for plot in self.plots:
            if set(plot) != {"metric", "x"}:
                raise ConfigError(f"sweep plots entry {plot!r} needs exactly the keys metric and x")


def load_spec(path: str, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep spec (YAML) with ``key=value`` overrides."""
    return build(SweepSpec, apply_overrides(read_yaml(path), overrides), path)


# ---------------------------------------------------------------------------------------------------- cells
@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: the base config with ``overrides`` (dotted key -> value); ``axes`` are the swept ones."""

    id: str
    overrides: dict[str, Any]
    axes: dict[str, Any]


def expand(spec: SweepSpec) -> list[Cell]:
    """The sweep's cells in a stable order: grid (row-major) × explicit cells × seeds."""
    keys = list(spec.grid)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(spec.grid[k] for k in keys))]
    seeds: list[dict[str, Any]] = [{spec.seed_key: s} for s in spec.seeds] or [{}]
    cells, seen = [], set()
    for g, c, s in itertools.product(grid, spec.cells or [{}], seeds):
        axes = {**g, **c, **s}
        overrides = {**spec.overrides, **axes}
        cid = fingerprint({"target": spec.target, "config": spec.config, "overrides": overrides})
        if cid not in seen:
            seen.add(cid)
            cells.append(Cell(cid, overrides, axes))
    return cells


def _override_args(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def resolve(ref: str) -> Callable[..., Any]:
    """The function ``"package.module:function"`` names."""
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"sweep target {ref!r} cannot be imported ({e})") from None


def load_train_config(path: str, overrides: Sequence[str]) -> Any:
    """The ``train`` target's loader: ``safety-jax train``'s run config."""
    from safety_jax.train.run import load_run_config

    return load_run_config(path, list(overrides))


def run_train(cfg: Any, out: str) -> dict[str, Any]:
    """The ``train`` target's runner: ``safety-jax train`` into ``out``; metrics = the last logged row."""
    from safety_jax.train.run import run

    result = run(dataclasses.replace(cfg, out=out))
    rows = [r for r in result["history"] if "loss" in r]
    return {"final": rows[-1] if rows else {}, "model": result["model"]}


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric scalar leaf of a nested metrics dict, as ``{"a.b.c": value}`` (lists are skipped)."""
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            out.update(flatten_metrics(v, f"{prefix}{k}."))
    elif isinstance(metrics, bool):
        out[prefix[:-1]] = float(metrics)
    elif isinstance(metrics, int | float):
        out[prefix[:-1]] = float(metrics)
    return out


def cell_dir(out: str, cell: Cell) -> str:
    return os.path.join(out, "cells", cell.id)


def cell_status(out: str, cell: Cell) -> str:
    """"done", "failed" or "todo"."""
    d = cell_dir(out, cell)
    return "done" if os.path.exists(os.path.join(d, "DONE")) else (
        "failed" if os.path.exists(os.path.join(d, "FAILED")) else "todo")


def run_cell(spec: SweepSpec, cell: Cell, out: str, *, process_id: int = 0, num_processes: int = 1,
             coordinator: str | None = None) -> str:
    """Run one cell here (a Ray worker, or the caller's process): "done" or "failed" (its traceback in FAILED).
    With ``num_processes > 1`` this is process ``process_id`` of a multi-process run coordinated at
    ``coordinator``; only process 0 writes the cell's records."""
    d = cell_dir(out, cell)
    os.makedirs(d, exist_ok=True)
    lead = process_id == 0
    if lead:
        write_atomic(os.path.join(d, "cell.json"), json.dumps(
            {"target": spec.target, "config": spec.config, "overrides": cell.overrides, "axes": cell.axes}))
    try:
        if num_processes > 1:
            from safety_jax.parallel import initialize_distributed

            initialize_distributed(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        load_ref, run_ref = TARGETS.get(spec.target, (None, spec.target))
        if load_ref is None:  # "module:function": the function takes (config name or path, overrides, out)
            metrics = resolve(run_ref)(spec.config, _override_args(cell.overrides), os.path.join(d, "run"))
        else:
            cfg = resolve(load_ref)(spec.config, _override_args(cell.overrides))
            metrics = resolve(run_ref)(cfg, os.path.join(d, "run"))
    except Exception:
        if lead:
            write_atomic(os.path.join(d, "FAILED"), json.dumps({"traceback": traceback.format_exc()}))
        log.exception("cell %s failed", cell.id)
        return "failed"
    if lead:
        write_atomic(os.path.join(d, "metrics.json"), json.dumps(flatten_metrics(metrics)))
        if os.path.exists(os.path.join(d, "FAILED")):
            os.remove(os.path.join(d, "FAILED"))
        write_atomic(os.path.join(d, "DONE"), "")
    return "done"


# ---------------------------------------------------------------------------------------------------- Ray
def _worker_env(res: Resources, num_processes: int) -> dict[str, str]:
    env = dict(res.env)
    if res.cpu_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={res.cpu_devices}"
    if num_processes > 1:
        env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")  # CPU collectives across processes
    return env


def _launch(ray: Any, spec: SweepSpec, cell: Cell, out: str) -> list[Any]:
    """Start a cell's Ray task(s); returns their object refs (one per host)."""
    res = spec.resources
    task = ray.remote(run_cell)
    if res.hosts == 1:
        opts = {"num_cpus": res.cpus, "num_gpus": res.gpus, "resources": dict(res.custom), "max_retries": 0}
        env = _worker_env(res, 1)
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return [task.options(**opts).remote(spec, cell, out)]
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([res.bundle()] * res.hosts, strategy=res.strategy)
    ray.get(pg.ready())
    on = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i) for i in range(res.hosts)]
    head = ray.get(ray.remote(_address_and_port).options(num_cpus=0, scheduling_strategy=on[0]).remote())
    env = _worker_env(res, res.hosts)
    return [task.options(num_cpus=res.cpus, num_gpus=res.gpus, resources=dict(res.custom), max_retries=0,
                         scheduling_strategy=on[i], runtime_env={"env_vars": env}).remote(
        spec, cell, out, process_id=i, num_processes=res.hosts, coordinator=head) for i in range(res.hosts)]


def _address_and_port() -> str:
    """``ip:port`` of a free port on this node (the coordinator of a multi-host cell)."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


@dataclasses.dataclass
class SweepResult:
    """What one call did: each cell's status after it, and the cells it ran."""

    status: dict[str, str]
    ran: list[str]
    rows: list[dict[str, Any]]


def run_sweep(spec: SweepSpec, out: str, *, address: str | None = None, num_cpus: int | None = None,
              ray_init: dict[str, Any] | None = None) -> SweepResult:
    """Run every unfinished cell of ``spec`` on Ray (failed ones again), then write the results table and plots.

    address: a Ray cluster (``ray://host:10001``, ``auto``); default ``RAY_ADDRESS`` or a local Ray started here
    (``num_cpus`` caps it). Cells already running in another sweep process are not detected: run one sweep per OUT.
    """
    import ray

    cells = expand(spec)
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "spec.json"), json.dumps(dataclasses.asdict(spec), default=str))
    todo = [c for c in cells if cell_status(out, c) != "done"]
    log.info("sweep %s: %d cells, %d to run", spec.name, len(cells), len(todo))
    ran: list[str] = []
    if todo:
        started_here = not ray.is_initialized()
        if started_here:
            kwargs = dict(ray_init or {})
            if address is None and "RAY_ADDRESS" not in os.environ:
                kwargs.setdefault("num_cpus", num_cpus)
                kwargs.setdefault("include_dashboard", False)
            ray.init(address=address, **kwargs)
        try:
            pending = {}
            for c in todo:
                for ref in _launch(ray, spec, c, os.path.abspath(out)):
                    pending[ref] = c
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                c = pending.pop(ready[0])
                try:
                    status = ray.get(ready[0])
                except Exception as e:  # the worker died (out of memory, killed): recorded like a failed run
                    write_atomic(os.path.join(cell_dir(out, c), "FAILED"), json.dumps({"traceback": repr(e)}))
                    status = "failed"
                if c.id not in ran:
                    ran.append(c.id)
                log.info("cell %s %s (%s)", c.id, status, c.axes)
        finally:
            if started_here:
                ray.shutdown()
    rows = write_results(spec, cells, out)
    return SweepResult({c.id: cell_status(out, c) for c in cells}, ran, rows)


# ---------------------------------------------------------------------------------------------------- results
def write_results(spec: SweepSpec, cells: Sequence[Cell], out: str) -> list[dict[str, Any]]:
    """``OUT/results.{csv,md,json}``: one row per (cell, metric) of the finished cells, and one per failed cell
    (metric "error", its last traceback line); and the spec's plots."""
    rows: list[dict[str, Any]] = []
    axes = sorted({k for c in cells for k in c.axes})
    for c in cells:
        d, base = cell_dir(out, c), {"cell": c.id, **{a: c.axes.get(a) for a in axes}}
        status = cell_status(out, c)
        if status == "done":
            with open(os.path.join(d, "metrics.json")) as f:
                metrics = json.load(f)
            names = spec.metrics or sorted(metrics)
            rows += [{**base, "status": status, "metric": m, "value": metrics.get(m, math.nan)} for m in names]
        else:
            error = ""
            if status == "failed":
                with open(os.path.join(d, "FAILED")) as f:
                    error = (json.load(f)["traceback"].strip().splitlines() or [""])[-1]
            rows.append({**base, "status": status, "metric": "error", "value": error})
    fields = ["cell", *axes, "status", "metric", "value"]
    write_atomic(os.path.join(out, "results.json"), json.dumps(rows, indent=1, default=str))
    tmp = os.path.join(out, ".results.csv")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(out, "results.csv"))
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in fields) + " |" for r in rows]
    write_atomic(os.path.join(out, "results.md"), f"# Sweep {spec.name}\n\n" + "\n".join(lines) + "\n")
    for plot in spec.plots:
        plot_metric(rows, plot["metric"], plot["x"], out, seed_key=spec.seed_key)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")


def plot_metric(rows: Sequence[dict[str, Any]], metric: str, x: str, out: str, *, seed_key: str = "seed") -> str:
    """``OUT/<metric>_vs_<x>.png``: the metric against axis ``x``, one line per combination of the other swept axes,
    mean ± min/max over seeds. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    chosen = [r for r in rows if r["metric"] == metric and r["status"] == "done"]
    others = sorted({k for r in chosen for k in r if k not in ("cell", "status", "metric", "value", x, seed_key)})
    groups: dict[tuple, dict[Any, list[float]]] = {}
    for r in chosen:
        groups.setdefault(tuple(r.get(k) for k in others), {}).setdefault(r[x], []).append(float(r["value"]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, by_x in groups.items():
        xs = sorted(by_x, key=lambda v: (isinstance(v, str), v))
        ys = [np.mean(by_x[v]) for v in xs]
        lo = [ys[i] - min(by_x[v]) for i, v in enumerate(xs)]
        hi = [max(by_x[v]) - ys[i] for i, v in enumerate(xs)]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, key)) or None
        ax.errorbar([str(v) for v in xs] if any(isinstance(v, str) for v in xs) else xs, ys, yerr=[lo, hi],
                    marker="o", capsize=3, label=label)
    numeric = [r[x] for r in chosen if isinstance(r[x], int | float) and not isinstance(r[x], bool)]
    if numeric and len(numeric) == len(chosen) and min(numeric) > 0 and max(numeric) >= 10 * min(numeric):
        ax.set_xscale("log")  # learning rates and other multiplicative axes
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)
    path = os.path.join(out, f"{safe(metric)}_vs_{safe(x)}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
