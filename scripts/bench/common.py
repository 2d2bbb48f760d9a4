"""Shared machinery of the JAX-vs-PyTorch benchmarks: timing, matmul peak, FLOP counts, memory, tables.

A workload builds a :class:`Work`: one :class:`Side` per implementation (JAX, PyTorch eager, optionally
torch.compile), each a zero-argument callable that does the same work once and blocks until the result is ready. The
sides are warmed up, then run alternately; the median of the repetitions is reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
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
    """One implementation of a workload.

    run: does the work once and blocks until done. first_output: a scalar of the first run for the equal-work check
    (a loss, a logit mean, a checksum). artifact: a richer first-run output handed to :attr:`Work.compare` (masks,
    spectra). prepare: ahead-of-time compilation, timed as compile time. memory_mb: peak memory of one run in MiB
    (measured once, after the timed repetitions).
    """

    name: str                                             # "jax", "torch", "torch.compile"
    run: Callable[[], Any]
    first_output: Callable[[], float] | None = None
    artifact: Callable[[], Any] | None = None
    prepare: Callable[[], None] | None = None
    memory_mb: Callable[[], float | None] | None = None


@dataclasses.dataclass
class Work:
    """What a workload returns: its sides and how much work one run is.

    items: tokens processed per run (or ``unit`` things, e.g. matrices). flops: matmul FLOPs per run, or None when
    MFU is not meaningful. rtol: tolerance of the scalar check (None: the run's dtype default). expect: a value every
    side's first output must equal (e.g. log 2 for DPO at step 0). compare(side_artifact, torch_artifact) -> note:
    raises when the sides disagree, else returns a short note for the table.
    """

    sides: list[Side]
    items: int
    flops: float | None
    unit: str = "tokens"
    rtol: float | None = None
    expect: float | None = None
    compare: Callable[[Any, Any], str] | None = None


@dataclasses.dataclass
class Result:
    workload: str
    side: str
    tokens: int                 # items per run, in ``unit``
    median_s: float
    min_s: float
    compile_s: float
    tokens_per_s: float         # items per second, in ``unit``
    flops: float | None
    mfu: float | None
    peak_mem_mb: float | None
    check_value: float | None
    unit: str = "tokens"
    note: str = ""


def block(x: Any) -> Any:
    """Wait for JAX arrays in a pytree (no-op for anything else)."""
    return jax.block_until_ready(x)


# ---------------------------------------------------------------------------------------------------- the machine
def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Give every CPU thread pool the benchmark reaches ``n`` threads (default: the CPU count): PyTorch's intra-op
    pool (OpenMP, MKL) and the OpenBLAS libraries loaded in the process — scipy's, which backs JAX's CPU LAPACK
    kernels (``lapack_sgesdd_ffi`` for SVD), and numpy's. XLA's own CPU pool is sized at start-up (one thread per
    core). Returns ``n``.
    """
    import torch

    n = n or cpu_count()
    torch.set_num_threads(n)
    set_openblas_threads(n)
    return n


def set_openblas_threads(n: int) -> list[str]:
    """Call ``openblas_set_num_threads`` (whatever its symbol prefix) in every OpenBLAS loaded in this process; returns
    the libraries set. OpenBLAS otherwise starts one busy-waiting thread per core, which on a shared machine turns
    each BLAS/LAPACK call into a wait for a descheduled thread (see README.md)."""
    import ctypes

    import scipy.linalg.cython_lapack  # noqa: F401  (loads the OpenBLAS that jaxlib's LAPACK kernels call)

    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:  # not Linux
        return []
    done = []
    for path in libs:
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                       "openblas_set_num_threads", "openblas_set_num_threads64_"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(os.path.basename(path))
                break
    return done


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the same cores), or None where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_description() -> str:
    import torch

    dev = jax.devices()[0]
    tdev = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    return (f"{platform.node() or 'host'}: JAX {dev.device_kind} ({jax.default_backend()}), PyTorch {tdev}, "
            f"{cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")


def measure_matmul_peak(dtype: str = "float32", n: int | None = None, reps: int = 5) -> float:
    """Measured matmul throughput (FLOP/s) of this machine's default JAX device, for MFU denominators: the best of
    ``reps`` square matmuls of size ``n`` (1024 on CPU, 8192 on accelerators)."""
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


# ---------------------------------------------------------------------------------------------------- FLOPs
def matmul_params(config: LlamaConfig, lm_head: bool = True) -> int:
    """Parameters that take part in matmuls per token (embedding lookup excluded, LM head included if asked)."""
    d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f
    return config.num_hidden_layers * per_layer + (d * config.vocab_size if lm_head else 0)


def forward_flops(config: LlamaConfig, batch: int, seq: int, context: int | None = None,
                  lm_head: bool = True) -> float:
    """Forward matmul FLOPs: 2·N·tokens plus causal attention (QK^T and PV, halved for the causal mask).

    ``context`` is the key length per query for cached decode steps (then attention is not halved). ``lm_head=False``
    leaves out the vocabulary projection (work that only needs the layers' inputs).
    """
    tokens = batch * seq
    attn_width = config.num_attention_heads * config.head_dim
    if context is None:
        attn = 2 * 2 * config.num_hidden_layers * batch * seq * seq * attn_width / 2
    else:
        attn = 2 * 2 * config.num_hidden_layers * tokens * context * attn_width
    return 2 * matmul_params(config, lm_head) * tokens + attn


def train_flops(config: LlamaConfig, batch: int, seq: int) -> float:
    """Training step FLOPs: 3× the forward (forward + backward), i.e. 6·N·tokens plus attention."""
    return 3 * forward_flops(config, batch, seq)


# ---------------------------------------------------------------------------------------------------- memory
def compiled_memory_mb(compiled: Any) -> float | None:
    """Peak memory of one call of an XLA executable from its buffer plan: arguments + outputs − donated aliases +
    temporaries (what the executable needs resident on its device while it runs)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return total / 2**20


def device_peak_memory_mb() -> float | None:
    """Lifetime peak of JAX's default device where it keeps statistics (GPU/TPU); None on CPU."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return None


def torch_run_peak_mb(run: Callable[[], Any]) -> float | None:
    """Peak memory of tensors alive during one call of ``run`` (weights, gradients and optimizer state included).

    CUDA: the caching allocator's peak after a reset. CPU: the PyTorch profiler's memory timeline (one profiled call).
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            run()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return float(np.asarray(sizes).sum(axis=1).max()) / 2**20 if len(sizes) else None
    except Exception:  # a private API: degrade to "unknown" rather than fail the benchmark
        return None


# ---------------------------------------------------------------------------------------------------- timing
def time_work(workload: str, work: Work, *, warmup: int = 2, reps: int = 5,
              memory: bool = True) -> tuple[list[Result], dict[str, Any]]:
    """Compile / warm up each side (its first call, plus ``prepare``, counted as compile time), then alternate
    repetitions; medians per side. Memory is measured after the timed repetitions, so it cannot disturb them.
    MFU is left unset (see :func:`set_mfu`).

    Returns the results and each side's first-run artifact (for :attr:`Work.compare`).
    """
    first: dict[str, float] = {}
    prep: dict[str, float] = {}
    checks: dict[str, float | None] = {}
    artifacts: dict[str, Any] = {}
    for s in work.sides:
        t0 = time.perf_counter()
        if s.prepare is not None:
            s.prepare()
        prep[s.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        s.run()
        first[s.name] = time.perf_counter() - t0
        checks[s.name] = s.first_output() if s.first_output else None
        artifacts[s.name] = s.artifact() if s.artifact else None
        for _ in range(warmup - 1):
            s.run()
    times: dict[str, list[float]] = {s.name: [] for s in work.sides}
    for _ in range(reps):
        for s in work.sides:
            t0 = time.perf_counter()
            s.run()
            times[s.name].append(time.perf_counter() - t0)
    out = []
    for s in work.sides:
        med = statistics.median(times[s.name])
        mem = s.memory_mb() if (memory and s.memory_mb is not None) else None
        out.append(Result(workload=workload, side=s.name, tokens=work.items, median_s=med, min_s=min(times[s.name]),
                          compile_s=prep[s.name] + max(first[s.name] - med, 0.0), tokens_per_s=work.items / med,
                          flops=work.flops, mfu=None, peak_mem_mb=mem, check_value=checks[s.name], unit=work.unit))
    return out, artifacts


def set_mfu(results: list[Result], peak: float) -> None:
    """MFU = matmul FLOPs per run / median time / ``peak`` (FLOP/s), where the workload defines FLOPs."""
    for r in results:
        r.mfu = None if r.flops is None else r.flops / r.median_s / peak


def check_equal_work(workload: str, work: Work, results: list[Result], artifacts: dict[str, Any],
                     rtol: float) -> None:
    """Fail loudly when a side did not compute what PyTorch computed (first-step scalar, expected value, artifacts);
    notes from :attr:`Work.compare` go into the results."""
    rtol = work.rtol if work.rtol is not None else rtol
    ref = next(r for r in results if r.side == "torch")
    for r in results:
        if work.expect is not None and r.check_value is not None and not np.isclose(r.check_value, work.expect,
                                                                                     rtol=rtol, atol=rtol):
            raise RuntimeError(f"{workload}: {r.side}'s first step gives {r.check_value}, expected {work.expect}")
        if r.side == "torch":
            continue
        assert_equal_work(workload, r.check_value, ref.check_value, rtol)
        if work.compare is not None:
            r.note = work.compare(artifacts[r.side], artifacts["torch"])


def assert_equal_work(workload: str, a: float | None, b: float | None, rtol: float) -> None:
    """Fail loudly when the two sides did not compute the same thing (first-step loss or output checksum)."""
    if a is None or b is None:
        return
    if not np.isclose(a, b, rtol=rtol, atol=rtol):
        raise RuntimeError(f"{workload}: JAX and PyTorch disagree on the first step ({a} vs {b}); not the same work")


# ---------------------------------------------------------------------------------------------------- tables
def _rate(r: Result) -> str:
    unit = "" if r.unit == "tokens" else f" {r.unit}/s"
    return f"{r.tokens_per_s:,.0f}{unit}" if r.tokens_per_s >= 100 else f"{r.tokens_per_s:,.2f}{unit}"


def write_tables(results: list[Result], meta: dict[str, Any], out_dir: str | None) -> str:
    """Markdown table + one-line summaries; bench.md and bench.json in ``out_dir`` when given."""
    load = meta.get("load_average")
    lines = [f"Machine: {meta['machine']}  ", f"Config: {meta['config']}  ",
             f"Measured matmul peak ({meta['dtype']}): JAX {meta['peak_jax'] / 1e12:.3f} TFLOP/s, "
             f"PyTorch {meta['peak_torch'] / 1e12:.3f} TFLOP/s (MFU uses the larger)  "]
    if load:
        lines.append(f"CPU load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} "
                     f"(above {meta.get('cpus', '?')}: other processes compete for the cores; timings are noisy)  ")
    lines += ["", "| workload | side | tokens/s | median ms | compile s | MFU | peak MB | JAX/torch | check |",
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
            check = f"{check} ({r.note})" if r.note else check
            mem = "–" if r.peak_mem_mb is None else f"{r.peak_mem_mb:,.0f}"
            mfu = "n/a" if r.mfu is None else f"{r.mfu:.1%}"
            lines.append(f"| {wl} | {name} | {_rate(r)} | {r.median_s * 1e3:,.2f} | {r.compile_s:.2f} | {mfu} | "
                         f"{mem} | {ratio} | {check} |")
        if "jax" in sides and ref is not None:
            j = sides["jax"]
            mfu = "" if j.mfu is None else f"; MFU JAX {j.mfu:.1%}, PyTorch {ref.mfu:.1%}"
            summaries.append(f"{wl}: JAX {j.tokens_per_s:,.1f} {j.unit}/s vs PyTorch {ref.tokens_per_s:,.1f} "
                             f"{ref.unit}/s -> ratio {j.tokens_per_s / ref.tokens_per_s:.2f}x{mfu}")
    text = "\n".join(lines + ["", *summaries]) + "\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return text
