"""Shared machinery of the JAX-vs-PyTorch benchmarks: timing, matmul peak, FLOP counts, tables.

Every workload is a pair of zero-argument callables (JAX, PyTorch) that each do the same work and block until the
result is ready. They are run alternately after warm-up; the median of the repetitions is reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.model.config import LlamaConfig


@dataclasses.dataclass
class Side:
    """One implementation of a workload."""

    name: str                       # "jax", "torch", "torch.compile"
    run: Callable[[], Any]          # does the work once and blocks until done
    first_output: Callable[[], float] | None = None  # a scalar for the equal-work check (loss, logit sum)


@dataclasses.dataclass
class Result:
    workload: str
    side: str
    tokens: int
    median_s: float
    min_s: float
    compile_s: float
    tokens_per_s: float
    flops: float
    mfu: float
    peak_mem_mb: float | None
    check_value: float | None


def block(x: Any) -> Any:
    """Wait for JAX arrays in a pytree (no-op for anything else)."""
    return jax.block_until_ready(x)


def measure_matmul_peak(dtype: str = "float32", n: int | None = None, reps: int = 5) -> float:
    """Measured matmul throughput (FLOP/s) of this machine's default JAX device, for MFU denominators."""
    on_gpu = jax.default_backend() in ("gpu", "cuda", "tpu")
    n = n or (8192 if on_gpu else 1024)
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jnp.ones((n, n), jdt)
    f = jax.jit(lambda x, y: x @ y)
    block(f(a, a))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        block(f(a, a))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def torch_matmul_peak(dtype: str = "float32", n: int | None = None, reps: int = 5) -> float:
    """The same measurement with PyTorch on its device (reported beside the JAX one)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = n or (8192 if dev == "cuda" else 1024)
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.ones((n, n), dtype=tdt, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    a @ a
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def matmul_params(config: LlamaConfig) -> int:
    """Parameters that take part in matmuls per token (embedding lookup excluded, LM head included)."""
    d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f
    return config.num_hidden_layers * per_layer + d * config.vocab_size


def forward_flops(config: LlamaConfig, batch: int, seq: int, context: int | None = None) -> float:
    """Forward matmul FLOPs: 2·N·tokens plus causal attention (QK^T and PV, halved for the causal mask).

    ``context`` is the key length per query for cached decode steps (then attention is not halved).
    """
    tokens = batch * seq
    attn_width = config.num_attention_heads * config.head_dim
    if context is None:
        attn = 2 * 2 * config.num_hidden_layers * batch * seq * seq * attn_width / 2
    else:
        attn = 2 * 2 * config.num_hidden_layers * tokens * context * attn_width
    return 2 * matmul_params(config) * tokens + attn


def train_flops(config: LlamaConfig, batch: int, seq: int) -> float:
    """Training step FLOPs: 3× the forward (forward + backward)."""
    return 3 * forward_flops(config, batch, seq)


def peak_memory_mb() -> float | None:
    """Peak device memory of JAX's default device (GPU/TPU), or the process's peak RSS on CPU."""
    dev = jax.devices()[0]
    stats = getattr(dev, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_peak_memory_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_sides(workload: str, sides: list[Side], tokens: int, flops: float, peak: float, *, warmup: int = 2,
               reps: int = 5) -> list[Result]:
    """Warm up each side (first call timed as compile + run), then alternate repetitions; medians per side."""
    first: dict[str, float] = {}
    checks: dict[str, float | None] = {}
    for s in sides:
        t0 = time.perf_counter()
        s.run()
        first[s.name] = time.perf_counter() - t0
        checks[s.name] = s.first_output() if s.first_output else None
        for _ in range(warmup - 1):
            s.run()
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for _ in range(reps):
        for s in sides:
            t0 = time.perf_counter()
            s.run()
            times[s.name].append(time.perf_counter() - t0)
    out = []
    for s in sides:
        med = statistics.median(times[s.name])
        mem = peak_memory_mb() if s.name == "jax" else torch_peak_memory_mb()
        out.append(Result(workload=workload, side=s.name, tokens=tokens, median_s=med, min_s=min(times[s.name]),
                          compile_s=max(first[s.name] - med, 0.0), tokens_per_s=tokens / med, flops=flops,
                          mfu=flops / med / peak, peak_mem_mb=mem, check_value=checks[s.name]))
    return out


def machine_description() -> str:
    dev = jax.devices()[0]
    return f"{platform.node() or 'host'}: {dev.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores"


def write_tables(results: list[Result], meta: dict[str, Any], out_dir: str | None) -> str:
    """Markdown table + one-line summaries; JSON next to it when ``out_dir`` is given."""
    lines = [f"Machine: {meta['machine']}  ", f"Config: {meta['config']}  ",
             f"Measured matmul peak ({meta['dtype']}): JAX {meta['peak_jax'] / 1e12:.3f} TFLOP/s, "
             f"PyTorch {meta['peak_torch'] / 1e12:.3f} TFLOP/s (MFU uses the larger)", "",
             "| workload | side | tokens/s | median ms | compile s | MFU | peak MB | JAX/torch | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_wl: dict[str, dict[str, Result]] = {}
    for r in results:
        by_wl.setdefault(r.workload, {})[r.side] = r
    summaries = []
    for wl, sides in by_wl.items():
        ref = sides.get("torch")
        for name, r in sides.items():
            ratio = f"{r.tokens_per_s / ref.tokens_per_s:.2f}" if ref is not None else "–"
            check = "" if r.check_value is None else f"{r.check_value:.6g}"
            mem = "" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
            lines.append(f"| {wl} | {name} | {r.tokens_per_s:,.0f} | {r.median_s * 1e3:.2f} | {r.compile_s:.2f} | "
                         f"{r.mfu:.1%} | {mem} | {ratio} | {check} |")
        if "jax" in sides and ref is not None:
            j = sides["jax"]
            summaries.append(f"{wl}: JAX {j.tokens_per_s:,.0f} tok/s vs PyTorch {ref.tokens_per_s:,.0f} tok/s "
                             f"-> ratio {j.tokens_per_s / ref.tokens_per_s:.2f}x; MFU JAX {j.mfu:.1%}, "
                             f"PyTorch {ref.mfu:.1%}")
    text = "\n".join(lines + ["", *summaries]) + "\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return text


def assert_equal_work(workload: str, a: float | None, b: float | None, rtol: float) -> None:
    """Fail loudly when the two sides did not compute the same thing (first-step loss or output checksum)."""
    if a is None or b is None:
        return
    if not np.isclose(a, b, rtol=rtol, atol=rtol):
        raise RuntimeError(f"{workload}: JAX and PyTorch disagree on the first step ({a} vs {b}); not the same work")
