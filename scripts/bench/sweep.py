"""Scaling sweep of the JAX-vs-PyTorch benchmark: model size × batch × sequence length, over chosen workloads.

    python scripts/bench/sweep.py --batch 1,4 --seq 128 --out runs/bench-sweep             # CPU: bench_1b sft skipped
    python scripts/bench/sweep.py --dtype bfloat16 --batch 4,8 --seq 512,2048 --reps 5 --out runs/bench-sweep-gpu
    python scripts/bench/sweep.py --presets tiny,bench_100m:num_hidden_layers=4,bench_100m --workloads forward

Every point (preset, batch, seq, workload) runs ``run.py``'s machinery — :class:`BenchContext`, :data:`WORKLOADS`,
``time_work`` and the equal-work checks — and records tokens/s, peak memory, the JAX/PyTorch ratio and MFU of each
side. Before a point is built, its memory is estimated (weights, optimizer state and activations of both sides); a
point that would not fit in the available memory (host ``MemAvailable``, or the GPU's free memory; ``--max-gb``
overrides) is recorded as skipped with the estimate, and a point that fails (out of memory, a compiler error) is
recorded with its error while the sweep goes on. A point whose sides did not do the same work is recorded as a
mismatch, left out of the plots, and makes the script exit with status 1.

A preset may carry config overrides, ``NAME:field=value[:field=value...]`` (e.g. ``bench_100m:num_hidden_layers=4``),
for sizes between the presets. Writes ``sweep.json`` (every point, rewritten after each one), ``sweep.md`` (a table
and the scaling summary) and ``sweep.png`` (throughput and peak memory against parameters, and throughput against
batch × seq at one preset) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quiet_threads  # noqa: E402, F401  (sets thread-pool env vars: before jax, torch, scipy load)

# Both frameworks share one accelerator: JAX must not reserve most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# isort: split
import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    Result,
    check_equal_work,
    cpu_count,
    load_average,
    machine_description,
    matmul_params,
    measure_matmul_peak,
    set_mfu,
    set_threads,
    time_work,
    torch_matmul_peak,
)
from workloads import WORKLOADS, BenchContext  # noqa: E402

from safety_jax.errors import ConfigError  # noqa: E402
from safety_jax.model.config import PRESETS, LlamaConfig, get_preset  # noqa: E402
from safety_jax.model.llama import layer_loop  # noqa: E402

DEFAULT_PRESETS = "tiny,bench_100m,bench_1b"
DEFAULT_WORKLOADS = "forward,sft"
HEADROOM = 0.9          # share of the measured free memory a point may plan to use (the estimate is rough)
TRAIN_WORKLOADS = ("sft", "dpo")
# Config fields a preset spec may override, and how their values are read (dtypes come from --dtype).
_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(LlamaConfig)}
OVERRIDABLE = {k: t for k, t in _FIELD_TYPES.items()
               if t in ("int", "float", "str", "bool", "int | None") and k not in ("param_dtype", "compute_dtype")}


# ---------------------------------------------------------------------------------------------------- arguments
@dataclasses.dataclass(frozen=True)
class PresetSpec:
    """One model size of the sweep: a preset name and optional config overrides (``label`` as given)."""

    label: str
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, **common: Any) -> LlamaConfig:
        """The preset with ``common`` fields (dtype, layer loop) and then this spec's overrides applied."""
        changes = dict(common)
        changes.update(self.overrides)
        if {"hidden_size", "num_attention_heads"} & set(dict(self.overrides)) and "head_dim" not in changes:
            changes["head_dim"] = None  # derived again from the new width / heads
        return get_preset(self.name, **changes)


def _field_value(field: str, text: str) -> Any:
    kind = OVERRIDABLE[field]
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{field} needs true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if kind == "int | None" and text.lower() == "none":
        return None
    return {"int": int, "int | None": int, "float": float, "str": str}[kind](text)


def parse_preset(spec: str) -> PresetSpec:
    """``NAME[:field=value...]`` -> :class:`PresetSpec`; ValueError naming the bad part."""
    name, *parts = spec.split(":")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    overrides = []
    for part in parts:
        field, eq, text = part.partition("=")
        if not eq or field not in OVERRIDABLE:
            raise ValueError(f"bad override {part!r} in {spec!r}: write field=value with a field from "
                             f"{sorted(OVERRIDABLE)}")
        overrides.append((field, _field_value(field, text)))
    return PresetSpec(spec, name, tuple(overrides))


def _positive_ints(p: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    out = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value <= 0:
            p.error(f"{option}: {item!r} is not a positive integer (give a comma list, e.g. 1,4)")
        out.append(value)
    return list(dict.fromkeys(out))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the options (presets, workloads, sizes) before anything is built."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", "--preset", "--config", dest="presets", default=DEFAULT_PRESETS,
                   help=f"comma list of model presets, each NAME[:field=value...] (default {DEFAULT_PRESETS}; "
                        f"presets: {', '.join(sorted(PRESETS))})")
    p.add_argument("--batch", default="4", help="comma list of batch sizes (DPO: preference pairs; default 4)")
    p.add_argument("--seq", default="128", help="comma list of sequence lengths (default 128)")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                   help=f"comma list from {list(WORKLOADS)} (default {DEFAULT_WORKLOADS})")
    p.add_argument("--new-tokens", type=int, default=128, help="decode tokens for the generation workload")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="param and compute dtype of both sides (training in pure bfloat16 on both sides)")
    p.add_argument("--layer-loop", default="scan", choices=["scan", "unrolled", "auto"],
                   help="the JAX model's layer loop (LlamaConfig.layer_loop)")
    p.add_argument("--scan-unroll", type=int, default=1, help="layers per scan iteration (with --layer-loop scan)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per side and point (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per side and point, the first compiles (default 1)")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile where it works")
    p.add_argument("--threads", "--torch-threads", dest="threads", type=int, default=None,
                   help="threads of PyTorch's intra-op pool and of OpenBLAS (JAX's CPU LAPACK); default: CPU count")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (one extra, profiled run per PyTorch side)")
    p.add_argument("--max-gb", type=float, default=None,
                   help="memory a point may use, in GB (default: 90%% of the free memory: the host's MemAvailable "
                        "before each point, or the GPU's free memory at the start)")
    p.add_argument("--grid-preset", default=None,
                   help="preset of the tokens/s-vs-batch×seq panels (default, per workload: the largest preset "
                        "measured at several batch × seq)")
    p.add_argument("--out", default="runs/bench-sweep", help="folder for sweep.json, sweep.md and sweep.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    specs = []
    for text in args.presets.split(","):
        try:
            spec = parse_preset(text)
            spec.config(param_dtype=args.dtype, compute_dtype=args.dtype, layer_loop=args.layer_loop,
                        scan_unroll=args.scan_unroll)
        except (ValueError, ConfigError) as e:
            p.error(f"--presets: {e}")
        specs.append(spec)
    if len({s.label for s in specs}) < len(specs):
        p.error(f"--presets: {args.presets!r} names a preset twice")
    args.preset_specs = specs
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        p.error(f"--workloads: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    args.workload_list = list(dict.fromkeys(args.workloads.split(",")))
    args.batches = _positive_ints(p, "--batch", args.batch)
    args.seqs = _positive_ints(p, "--seq", args.seq)
    for option in ("reps", "warmup", "new_tokens", "scan_unroll"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.max_gb is not None and args.max_gb <= 0:
        p.error(f"--max-gb must be positive, got {args.max_gb}")
    if args.grid_preset is not None and args.grid_preset not in {s.label for s in specs}:
        p.error(f"--grid-preset {args.grid_preset!r} is not one of --presets {[s.label for s in specs]}")
    return args


# ---------------------------------------------------------------------------------------------------- memory
@dataclasses.dataclass
class Estimate:
    """Planned bytes of one point: ``device`` while it runs (shared context + every side), ``host`` while the
    context is built (the fp32 PyTorch model, its converted copy and the JAX params)."""

    device: float
    host: float


def _forward_activations(config: LlamaConfig, batch: int, seq: int, nbytes: int, lm_head: bool = True) -> float:
    """Bytes live in one forward: logits (and a float32 copy), one layer's temporaries, its attention scores."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    tokens = batch * seq
    logits = tokens * v * (nbytes + 4) if lm_head else 0
    return logits + tokens * (4 * d + 3 * f) * nbytes + 2 * batch * config.num_attention_heads * seq * seq * 4


def _train_activations(config: LlamaConfig, batch: int, seq: int, nbytes: int) -> float:
    """Bytes saved for the backward of every layer (norm inputs and outputs, q/k/v, attention output, the MLP's
    gate, up and their products, the attention probabilities), one layer's float32 attention scores, and the logits
    with their float32 log-softmax and gradients."""
    d, f, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    tokens = batch * seq
    scores = batch * config.num_attention_heads * seq * seq
    per_layer = tokens * (8 * d + 4 * f) * nbytes + scores * nbytes
    return n_layers * per_layer + 2 * scores * 4 + tokens * v * (2 * nbytes + 8)


def estimate_memory(config: LlamaConfig, batch: int, seq: int, workload: str, *, new_tokens: int = 128,
                    n_sides: int = 2) -> Estimate:
    """A rough (high-side) memory plan of one point: the shared context holds the weights twice (PyTorch model and
    JAX params); each side adds its own state (training: params, grads and two AdamW moments, ×4) and activations."""
    nbytes = 2 if config.param_dtype == "bfloat16" else 4
    n = config.num_params()
    if workload == "forward":
        side = _forward_activations(config, batch, seq, nbytes)
    elif workload == "generate":
        cache = 2 * config.num_hidden_layers * batch * (seq + new_tokens) * config.num_key_value_heads
        side = cache * config.head_dim * nbytes + _forward_activations(config, batch, seq, nbytes)
    elif workload == "sft":
        side = 4 * n * nbytes + _train_activations(config, batch, seq, nbytes)
    elif workload == "dpo":   # chosen and rejected in one batch; the reference forward too
        side = (4 * n * nbytes + _train_activations(config, 2 * batch, seq, nbytes)
                + _forward_activations(config, 2 * batch, seq, nbytes))
    elif workload == "wanda":  # float32 scores and bool masks of every linear weight
        side = matmul_params(config, lm_head=False) * 5 + _forward_activations(config, batch, seq, nbytes, False)
    elif workload == "svd":   # ΔW and W_pre in float32, thin SVD factors of both
        side = 6 * matmul_params(config, lm_head=False) * 4
    else:
        raise ValueError(f"no memory estimate for workload {workload!r}")
    return Estimate(device=2 * n * nbytes + n_sides * side, host=n * (8 + nbytes))


def _meminfo_bytes(key: str = "MemAvailable") -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_available_bytes() -> float:
    """Memory the host can still give (``MemAvailable``; else free pages from ``os.sysconf``)."""
    avail = _meminfo_bytes()
    if avail is None:
        avail = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return avail


def _own_rss_bytes() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


class MemoryBudget:
    """What a point may use: ``--max-gb`` when given; else 90 % of the free memory. On GPU that is the device's free
    memory at the start of the sweep (both frameworks release theirs between points); on the host it is measured
    before each point, plus what this process has grown since the start (memory it holds for reuse)."""

    def __init__(self, max_gb: float | None) -> None:
        import torch

        self.max_bytes = None if max_gb is None else max_gb * 1e9
        self.rss_start = _own_rss_bytes()
        self.device_free: float | None = None
        self.device_source = None
        if torch.cuda.is_available():
            self.device_free, self.device_source = float(torch.cuda.mem_get_info()[0]), "GPU free memory"
        elif jax.default_backend() != "cpu":
            stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
            if "bytes_limit" in stats:
                self.device_free = float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
                self.device_source = "JAX device memory limit"

    def host(self) -> float:
        """The host memory a point may use now."""
        return HEADROOM * (host_available_bytes() + max(_own_rss_bytes() - self.rss_start, 0.0))

    def check(self, est: Estimate) -> str | None:
        """None when ``est`` fits, else the reason it does not."""
        if self.max_bytes is not None:
            need = est.device if self.device_free is not None else max(est.device, est.host)
            return None if need <= self.max_bytes else (
                f"estimated {need / 1e9:.2f} GB > --max-gb {self.max_bytes / 1e9:.2f} GB")
        if self.device_free is not None:
            if est.device > HEADROOM * self.device_free:
                return (f"estimated {est.device / 1e9:.2f} GB > {HEADROOM * self.device_free / 1e9:.2f} GB "
                        f"({HEADROOM:.0%} of {self.device_source})")
            need, what = est.host, "to build the models"
        else:
            need, what = max(est.device, est.host), ""
        host = self.host()
        if need > host:
            return (f"estimated {need / 1e9:.2f} GB{' ' + what if what else ''} > {host / 1e9:.2f} GB "
                    f"({HEADROOM:.0%} of MemAvailable)")
        return None

    def describe(self) -> str:
        if self.max_bytes is not None:
            return f"--max-gb {self.max_bytes / 1e9:.2f} GB per point"
        host = f"{HEADROOM:.0%} of MemAvailable ({host_available_bytes() / 1e9:.1f} GB at start)"
        if self.device_free is not None:
            return f"{HEADROOM:.0%} of {self.device_source} ({self.device_free / 1e9:.1f} GB at start); host: {host}"
        return host


# ---------------------------------------------------------------------------------------------------- the sweep
def point_context(base: BenchContext, batch: int, seq: int) -> BenchContext:
    """``base``'s model with the [batch, seq] tokens :meth:`BenchContext.build` draws for that shape (same seed), so
    each point sees exactly what a ``run.py`` run with that preset, batch and seq sees."""
    tokens = np.random.default_rng(base.seed).integers(3, base.config.vocab_size, (batch, seq)).astype(np.int32)
    return dataclasses.replace(base, tokens=tokens)


def _side_names(torch_compile: bool) -> list[str]:
    return ["jax", "torch"] + (["torch.compile"] if torch_compile else [])


def _short_error(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(args: argparse.Namespace, meta: dict[str, Any], out_json: str | None = None
              ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], Result]]]:
    """Every preset × batch × seq × workload: skipped, failed, mismatch or measured; one record per side (rewritten
    to ``out_json`` after each point). Returns the records and the (record, :class:`Result`) pairs measured."""
    import torch

    _free_memory()
    budget = MemoryBudget(args.max_gb)
    meta["memory_budget"] = budget.describe()
    records: list[dict[str, Any]] = []
    results: list[tuple[dict[str, Any], Result]] = []
    rtol = 2e-2 if args.dtype == "bfloat16" else 1e-4
    sides = _side_names(args.torch_compile)
    common_fields = dict(param_dtype=args.dtype, compute_dtype=args.dtype, layer_loop=args.layer_loop,
                         scan_unroll=args.scan_unroll)

    def record(point: dict[str, Any], side: str, status: str, **fields: Any) -> dict[str, Any]:
        rec = dict(point, side=side, status=status, tokens_per_s=None, unit="tokens", median_s=None, compile_s=None,
                   mfu=None, peak_mem_mb=None, jax_over_torch=None, check_value=None, note="", error=None)
        rec.update(fields)
        records.append(rec)
        return rec

    for spec in args.preset_specs:
        config = spec.config(**common_fields)
        n_params = config.num_params()
        base: BenchContext | None = None
        for batch, seq in itertools.product(args.batches, args.seqs):
            for workload in args.workload_list:
                point = dict(preset=spec.label, params=n_params, batch=batch, seq=seq, workload=workload)
                est = estimate_memory(config, batch, seq, workload, new_tokens=args.new_tokens, n_sides=len(sides))
                point.update(estimate_gb=round(est.device / 1e9, 3), estimate_build_gb=round(est.host / 1e9, 3),
                             load_average=None)
                longest = seq + (args.new_tokens if workload == "generate" else 0)
                reason = (f"{longest} positions > max_position_embeddings {config.max_position_embeddings}"
                          if longest > config.max_position_embeddings else budget.check(est))
                tag = f"{spec.label} B{batch} T{seq} {workload}"
                if reason is not None:
                    for side in sides:
                        record(point, side, "skipped", error=reason)
                    print(f"{tag}: skipped ({reason})", flush=True)
                    if out_json:
                        _write_json(out_json, meta, records)
                    continue
                t0 = time.perf_counter()
                point["load_average"] = load_average()
                work = artifacts = None
                try:
                    if base is None:
                        torch.manual_seed(args.seed)  # the weights run.py builds for this preset and seed
                        base = BenchContext.build(config, batch, seq, args.new_tokens, args.seed, args.torch_compile)
                    work = WORKLOADS[workload](point_context(base, batch, seq))
                    res, artifacts = time_work(workload, work, warmup=args.warmup, reps=args.reps,
                                               memory=args.memory)
                except Exception as e:  # out of memory, a compiler error: record it and go on
                    traceback.print_exc()
                    for side in sides:
                        record(point, side, "failed", error=_short_error(e))
                    print(f"{tag}: failed ({_short_error(e, 120)})", flush=True)
                else:
                    status, error = "ok", None
                    try:
                        check_equal_work(workload, work, res, artifacts, rtol)
                    except (RuntimeError, AssertionError) as e:
                        status, error = "mismatch", _short_error(e)
                    ref = next((r for r in res if r.side == "torch"), None)
                    for r in res:
                        rec = record(point, r.side, status, tokens_per_s=r.tokens_per_s, unit=r.unit,
                                     median_s=r.median_s, compile_s=r.compile_s, peak_mem_mb=r.peak_mem_mb,
                                     check_value=r.check_value, note=r.note, error=error,
                                     jax_over_torch=None if ref is None else r.tokens_per_s / ref.tokens_per_s)
                        results.append((rec, r))
                    print(f"{tag}: " + ", ".join(f"{r.side} {r.tokens_per_s:,.1f} {r.unit}/s" for r in res)
                          + f" ({time.perf_counter() - t0:.0f} s)" + (f" MISMATCH: {error}" if error else ""),
                          flush=True)
                finally:
                    del work, artifacts
                    _free_memory()
                if out_json:
                    _write_json(out_json, meta, records)
        del base
        _free_memory()
        jax.clear_caches()
    return records, results


def _write_json(path: str, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "points": records}, f, indent=2, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- tables
def _millions(n: float) -> str:
    m = n / 1e6
    return f"{m:.3g}" if m < 10 else f"{m:,.0f}"


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.3g}"


def _times(x: float) -> str:
    return f"×{x:,.0f}" if x >= 100 else f"×{x:.3g}"


def _shape_key(rec: dict[str, Any]) -> tuple[int, int]:
    return rec["batch"], rec["seq"]


def _loglog_slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 2 or min(y) <= 0:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def scaling_summary(records: list[dict[str, Any]]) -> list[str]:
    """One line per workload and side: how throughput and peak memory change from each size to the next, at the
    batch × seq measured at the most sizes, with the log-log slope over all sizes (throughput ∝ N^a)."""
    ok = [r for r in records if r["status"] == "ok"]
    lines = []
    for wl in dict.fromkeys(r["workload"] for r in records):
        for side in dict.fromkeys(r["side"] for r in records):
            rows = [r for r in ok if r["workload"] == wl and r["side"] == side]
            if not rows:
                lines.append(f"{wl} / {side}: nothing measured")
                continue
            counts: dict[tuple[int, int], int] = {}
            for r in rows:
                counts[_shape_key(r)] = counts.get(_shape_key(r), 0) + 1
            shape = max(counts, key=counts.__getitem__)  # the first of the most-measured shapes
            pts = sorted((r for r in rows if _shape_key(r) == shape), key=lambda r: r["params"])
            head = f"{wl} / {side} at B{shape[0]}×T{shape[1]}"
            unit = pts[0]["unit"]
            if len(pts) < 2:
                r = pts[0]
                mem = "" if r["peak_mem_mb"] is None else f", {r['peak_mem_mb']:,.0f} MB"
                lines.append(f"{head}: one size measured ({r['preset']}: {_rate(r['tokens_per_s'])} {unit}/s{mem})")
                continue
            steps = []
            for a, b in itertools.pairwise(pts):
                mem = ("" if a["peak_mem_mb"] is None or b["peak_mem_mb"] is None or a["peak_mem_mb"] <= 0
                       else f", peak MB {_times(b['peak_mem_mb'] / a['peak_mem_mb'])}")
                steps.append(f"{a['preset']} → {b['preset']} (params {_times(b['params'] / a['params'])}): "
                             f"{unit}/s {_times(b['tokens_per_s'] / a['tokens_per_s'])}{mem}")
            params = [r["params"] for r in pts]
            slope = _loglog_slope(params, [r["tokens_per_s"] for r in pts])
            mems = [r["peak_mem_mb"] for r in pts]
            mslope = None if None in mems else _loglog_slope(params, mems)
            fit = f"{unit}/s ∝ N^{slope:.2f}" + ("" if mslope is None else f", peak ∝ N^{mslope:.2f}")
            lines.append(f"{head}: " + "; ".join(steps) + f" ({fit})")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def sweep_markdown(meta: dict[str, Any], records: list[dict[str, Any]], summary: list[str]) -> str:
    """Header lines, one table row per point × workload × side, the scaling summary."""
    load = meta.get("load_average")
    lines = [f"Machine: {meta['machine']}  ", f"Config: {meta['config']}  ",
             f"Memory budget: {meta['memory_budget']}  "]
    if load:
        lines.append(f"CPU load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} "
                     f"(above {meta.get('cpus', '?')}: other processes compete for the cores; timings are noisy)  ")
    lines += ["", "| preset | params M | batch | seq | workload | side | tokens/s | peak MB | JAX/torch | MFU "
              "| status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rate = _rate(r["tokens_per_s"]) + ("" if r["unit"] == "tokens" or r["tokens_per_s"] is None
                                          else f" {r['unit']}/s")
        mem = "–" if r["peak_mem_mb"] is None else (f"{r['peak_mem_mb']:,.0f}" if r["peak_mem_mb"] >= 10
                                                     else f"{r['peak_mem_mb']:.1f}")
        ratio = "–" if r["jax_over_torch"] is None else f"{r['jax_over_torch']:.2f}"
        mfu = "–" if r["mfu"] is None else f"{r['mfu']:.1%}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        if r["status"] == "skipped" and "estimated" not in (r["error"] or ""):
            status += f" (estimated {r['estimate_gb']:.2f} GB)"
        lines.append(f"| {_cell(r['preset'])} | {_millions(r['params'])} | {r['batch']} | {r['seq']} | "
                     f"{r['workload']} | {r['side']} | {rate} | {mem} | {ratio} | {mfu} | {_cell(status)} |")
    lines += ["", "Scaling with model size (N = parameters):", ""] + [f"- {s}" for s in summary]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plot
SIDE_COLORS = {"jax": "tab:blue", "torch": "tab:orange", "torch.compile": "tab:green"}
SHAPE_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (1, 1))),
                ("X", (0, (3, 1, 1, 1)))]


def _grid_preset(ok: list[dict[str, Any]], wanted: str | None) -> str | None:
    """The preset of a workload's batch × seq panel: ``wanted``, else the largest measured at several shapes."""
    shapes: dict[str, set[tuple[int, int]]] = {}
    params: dict[str, int] = {}
    for r in ok:
        shapes.setdefault(r["preset"], set()).add(_shape_key(r))
        params[r["preset"]] = r["params"]
    if wanted is not None:
        return wanted if len(shapes.get(wanted, ())) >= 2 else None
    several = [p for p, s in shapes.items() if len(s) >= 2]
    return max(several, key=params.__getitem__) if several else None


def _plain_log_labels(axis: Any) -> None:
    """Plain numbers (12,000 rather than 1.2×10⁴) on a log axis: decades, plus 2× and 5× within short ranges."""
    from matplotlib.ticker import FuncFormatter

    def keep(lo: float, hi: float) -> tuple[int, ...] | None:
        """Tick coefficients to label (None: all), by the decades the view spans."""
        if lo <= 0 or hi <= lo:
            return None
        if math.log10(hi / lo) > 2.5:
            return (1,)
        exps = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        inside = sum(lo <= c * 10.0**e <= hi for e in exps for c in (1, 2, 5))
        return (1, 2, 5) if inside >= 2 else None  # a narrow view: label every tick

    def fmt(v: float, _pos: int | None = None) -> str:
        if v <= 0:
            return ""
        exp = math.floor(math.log10(v) + 1e-9)
        coeff = round(v / 10**exp, 6)
        coeffs = keep(*axis.get_view_interval())
        if coeffs is not None and coeff not in coeffs:
            return ""
        return f"{v:,.0f}" if v >= 10 else f"{v:g}"

    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_formatter(FuncFormatter(fmt))


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _size_axis(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Log x axis with a tick per measured preset: its name and parameter count."""
    from matplotlib.ticker import NullLocator

    ticks = sorted({(r["params"], r["preset"]) for r in rows})
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    labels = [f"{name.replace(':', chr(10))}\n{_millions(p)}M" for p, name in ticks]
    # Labels of neighbours closer than ~15 % of the axis would overlap: push every other one of them down a block.
    block = max(label.count("\n") for label in labels) + 1
    span = math.log10(ticks[-1][0] / ticks[0][0]) if len(ticks) > 1 else 1.0
    level_of: list[int] = []
    for i, (p, _) in enumerate(ticks):
        close = i > 0 and math.log10(p / ticks[i - 1][0]) < 0.15 * span
        level_of.append((1 - level_of[-1]) if close else 0)
    ax.set_xticks([p for p, _ in ticks])
    ax.set_xticklabels(["\n" * (block * lv) + label for lv, label in zip(level_of, labels)], fontsize=8)
    if len(ticks) == 1:  # a single point: give the log axis some width
        ax.set_xlim(ticks[0][0] / 3, ticks[0][0] * 3)
    ax.set_xlabel("parameters (preset, millions)")
    ax.grid(True, which="major", alpha=0.3)


def plot_sweep(records: list[dict[str, Any]], path: str, title: str, grid_preset: str | None = None) -> None:
    """sweep.png: per workload (columns) throughput and peak memory (a row left out when none was measured) against
    parameters (log-log; colour = side, marker/line style = batch × seq), and, where a preset was measured at several
    shapes, throughput against batch × seq at the largest such preset (or ``grid_preset``); points not measured are
    listed under the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in records if r["status"] == "ok"]
    workloads = list(dict.fromkeys(r["workload"] for r in records)) or ["(none)"]
    sides = list(dict.fromkeys(r["side"] for r in records))
    shapes = list(dict.fromkeys(_shape_key(r) for r in records))
    style = {s: SHAPE_STYLES[i % len(SHAPE_STYLES)] for i, s in enumerate(shapes)}
    grids = {wl: _grid_preset([r for r in ok if r["workload"] == wl], grid_preset) for wl in workloads}

    missing = {}
    for r in records:
        if r["status"] != "ok":
            key = (r["preset"], r["batch"], r["seq"], r["workload"])
            missing[key] = f"{r['preset']} B{r['batch']}×T{r['seq']} {r['workload']}: {r['status']} ({r['error']})"
    ncols = len(workloads)
    width = max(5.8 * ncols, 8.0)
    notes = list(missing.values())
    if len(notes) > 8:
        notes = notes[:8] + [f"… and {len(notes) - 8} more (see sweep.md)"]
    footer = []
    for n in notes:
        footer += textwrap.wrap(n, int(width * 15), subsequent_indent="    ")
    if footer:
        footer.insert(0, "Not measured:")
    with_memory = any(r["peak_mem_mb"] is not None for r in ok)
    rows_of = ["size"] + (["memory"] if with_memory else []) + (["grid"] if any(grids.values()) else [])
    nrows = len(rows_of)
    foot_in = 0.17 * len(footer) + (0.25 if footer else 0.0)
    title_lines = [w for line in title.splitlines() for w in textwrap.wrap(line, int(width * 9.5))]
    head_in = 0.15 + 0.22 * len(title_lines)
    height = 4.3 * nrows + head_in + foot_in
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for c, wl in enumerate(workloads):
        rows = [r for r in ok if r["workload"] == wl]
        unit = rows[0]["unit"] if rows else "tokens"
        ax_t = axes[0][c]
        ax_m = axes[rows_of.index("memory")][c] if with_memory else None
        plotted_t = plotted_m = False
        for side in sides:
            for shape in shapes:
                pts = sorted((r for r in rows if r["side"] == side and _shape_key(r) == shape),
                             key=lambda r: r["params"])
                if not pts:
                    continue
                marker, ls = style[shape]
                label = side if len(shapes) == 1 else f"{side}, B{shape[0]}×T{shape[1]}"
                kw = dict(color=SIDE_COLORS.get(side, "tab:gray"), marker=marker, linestyle=ls, label=label)
                ax_t.plot([r["params"] for r in pts], [r["tokens_per_s"] for r in pts], **kw)
                plotted_t = True
                mem = [r for r in pts if r["peak_mem_mb"] is not None]
                if mem and ax_m is not None:
                    ax_m.plot([r["params"] for r in mem], [r["peak_mem_mb"] for r in mem], **kw)
                    plotted_m = True
        ax_t.set_title(f"{wl}: throughput vs model size", fontsize=11)
        if plotted_t:
            _size_axis(ax_t, rows)
            ax_t.set_yscale("log")
            _plain_log_labels(ax_t.yaxis)
            ax_t.set_ylabel(f"{unit}/s (median)")
            ax_t.legend(fontsize=8)
        else:
            _empty(ax_t, "no point measured")
        if ax_m is not None:
            ax_m.set_title(f"{wl}: peak memory vs model size", fontsize=11)
            if plotted_m:
                _size_axis(ax_m, [r for r in rows if r["peak_mem_mb"] is not None])
                ax_m.set_yscale("log")
                _plain_log_labels(ax_m.yaxis)
                ax_m.set_ylabel("peak MB (one call)")
                ax_m.legend(fontsize=8)
            else:
                _empty(ax_m, "peak memory not measured" if rows else "no point measured")
        if "grid" in rows_of:
            ax_g, grid = axes[rows_of.index("grid")][c], grids[wl]
            if grid is None:
                ax_g.set_title(f"{wl}: throughput vs batch × seq", fontsize=11)
                _empty(ax_g, f"no preset measured at several batch × seq for {wl}")
            else:
                _plot_grid(ax_g, [r for r in rows if r["preset"] == grid], wl, unit, grid, sides)
    fig.suptitle("\n".join(title_lines), fontsize=12)
    fig.tight_layout(rect=(0, foot_in / height, 1, 1 - 0.12 / height))  # makes room for the suptitle too
    if footer:
        fig.text(0.01, (foot_in - 0.1) / height, "\n".join(footer), fontsize=8, va="top", ha="left", family="monospace")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def _plot_grid(ax: Any, rows: list[dict[str, Any]], wl: str, unit: str, preset: str, sides: list[str]) -> None:
    """Throughput against batch × seq at one preset: one line per side and batch (over seq), or per side and seq
    when only the batch varies."""
    ax.set_title(f"{wl}: throughput vs batch × seq ({preset})", fontsize=11)
    if not rows:
        _empty(ax, f"{wl} not measured at {preset}")
        return
    by_batch = len({r["seq"] for r in rows}) > 1
    groups = list(dict.fromkeys(r["batch"] if by_batch else r["seq"] for r in rows))
    for side in sides:
        for i, g in enumerate(groups):
            pts = sorted((r for r in rows if r["side"] == side and (r["batch"] if by_batch else r["seq"]) == g),
                         key=lambda r: r["batch"] * r["seq"])
            if not pts:
                continue
            marker, ls = SHAPE_STYLES[i % len(SHAPE_STYLES)]
            ax.plot([r["batch"] * r["seq"] for r in pts], [r["tokens_per_s"] for r in pts], marker=marker,
                    linestyle=ls, color=SIDE_COLORS.get(side, "tab:gray"),
                    label=f"{side}, batch {g}" if by_batch else f"{side}, seq {g}")
    from matplotlib.ticker import NullLocator

    ticks = sorted({r["batch"] * r["seq"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:,}" for t in ticks], fontsize=8)
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)
    ax.set_xlabel("tokens per step (batch × seq)" + (", lines over seq" if by_batch else ", lines over batch"))
    ax.set_ylabel(f"{unit}/s (median)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep; writes sweep.json, sweep.md and sweep.png to ``--out``, prints the table and the scaling
    summary, and returns ``{"meta": ..., "points": [...]}`` (the content of sweep.json)."""
    args = parse_args(argv)
    import torch

    load_start = load_average()
    threads = set_threads(args.threads)
    configs = {s.label: s.config(param_dtype=args.dtype, compute_dtype=args.dtype, layer_loop=args.layer_loop,
                                 scan_unroll=args.scan_unroll) for s in args.preset_specs}
    loop = layer_loop(next(iter(configs.values())))
    peak_jax, peak_torch = measure_matmul_peak(args.dtype), torch_matmul_peak(args.dtype)
    sizes = ", ".join(f"{label} ({_millions(c.num_params())}M)" for label, c in configs.items())
    meta: dict[str, Any] = dict(
        machine=machine_description(),
        config=f"{sizes}; batch {args.batch}, seq {args.seq}; {args.dtype}, layer loop {loop}"
               + (f" (unroll {args.scan_unroll})" if loop == "scan" else "")
               + f"; reps {args.reps}, warmup {args.warmup}; jax {jax.__version__}, torch {torch.__version__}",
        jax=jax.__version__, torch=torch.__version__, dtype=args.dtype, layer_loop=loop, cpus=cpu_count(),
        threads=threads, load_average=None, peak_jax=peak_jax, peak_torch=peak_torch,
        args={k: v for k, v in vars(args).items() if k != "preset_specs"},
        env={k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "XLA_FLAGS",
                                            "XLA_PYTHON_CLIENT_PREALLOCATE")},
        models={label: dataclasses.asdict(c) for label, c in configs.items()})
    json_path = os.path.join(args.out, "sweep.json")
    records, measured = run_sweep(args, meta, json_path)
    meta["peak_jax"] = max(peak_jax, measure_matmul_peak(args.dtype))
    meta["peak_torch"] = max(peak_torch, torch_matmul_peak(args.dtype))
    set_mfu([r for _, r in measured], max(meta["peak_jax"], meta["peak_torch"]))
    for rec, r in measured:
        rec["mfu"] = r.mfu
    if load_start is not None:
        meta["load_average"] = (load_start, load_average())
    _write_json(json_path, meta, records)
    summary = scaling_summary(records)
    text = sweep_markdown(meta, records, summary)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text)
    plot_sweep(records, os.path.join(args.out, "sweep.png"),
               f"JAX (safety-jax) vs PyTorch (transformers): scaling sweep\n{args.dtype}, reps {args.reps}, "
               f"{meta['machine'].split(': ', 1)[-1]}", args.grid_preset)
    print(text)
    return {"meta": meta, "points": records}


if __name__ == "__main__":
    data = main()
    sys.exit(1 if any(p["status"] == "mismatch" for p in data["points"]) else 0)
