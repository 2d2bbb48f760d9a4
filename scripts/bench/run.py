"""Benchmark safety-jax against PyTorch (transformers) on the same config, weights, data and machine, in one run.

    python scripts/bench/run.py --preset tiny --batch 4 --seq 128
    python scripts/bench/run.py --preset bench_100m --batch 4 --seq 256 --reps 3 --out runs/bench-100m
    python scripts/bench/run.py --preset bench_1b --dtype bfloat16 --batch 8 --seq 1024 --out runs/bench-1b  # GPU

Workloads: forward, generate, sft, dpo, wanda, svd (see README.md). Prints a Markdown table (median tokens/s — or
matrices/s for svd —, JAX/PyTorch ratio, compile time, peak memory, MFU against the matmul peak measured in the same
run) and one summary line per workload, and writes bench.md / bench.json to ``--out``. Every workload first checks
that both sides did the same work (first-step loss, output checksum, masks) and fails when they did not.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quiet_threads  # noqa: E402, F401  (sets thread-pool env vars: before jax, torch, scipy load)

# isort: split
import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    Result,
    check_equal_work,
    cpu_count,
    load_average,
    machine_description,
    measure_matmul_peak,
    set_mfu,
    set_threads,
    time_work,
    torch_matmul_peak,
    write_tables,
)
from workloads import WORKLOADS, BenchContext  # noqa: E402

from safety_jax.model.config import get_preset  # noqa: E402
from safety_jax.model.llama import layer_loop  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", "--config", dest="preset", default="tiny",
                   help="model preset: tiny, bench_100m (CPU); bench_1b with --dtype bfloat16 (GPU); llama3_8b, ...")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (DPO: preference pairs)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128, help="decode tokens for the generation workload")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="param and compute dtype of both sides (training in pure bfloat16 on both sides)")
    p.add_argument("--layer-loop", default="scan", choices=["scan", "unrolled", "auto"],
                   help="the JAX model's layer loop (LlamaConfig.layer_loop): lax.scan, a Python loop over static "
                        "layer slices, or auto (unrolled on CPU, scan elsewhere)")
    p.add_argument("--scan-unroll", type=int, default=1, help="layers per scan iteration (with --layer-loop scan)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list from {list(WORKLOADS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile where it works")
    p.add_argument("--threads", "--torch-threads", dest="threads", type=int, default=None,
                   help="threads of PyTorch's intra-op pool and of OpenBLAS (JAX's CPU LAPACK); default: CPU count")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (one extra, profiled run per PyTorch side)")
    p.add_argument("--out", default=None, help="folder for bench.md and bench.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; returns the Markdown text (also printed, and written to ``--out``)."""
    args = parse_args(argv)
    import torch

    load_start = load_average()
    threads = set_threads(args.threads)
    torch.manual_seed(args.seed)
    config = get_preset(args.preset, param_dtype=args.dtype, compute_dtype=args.dtype, layer_loop=args.layer_loop,
                        scan_unroll=args.scan_unroll)
    ctx = BenchContext.build(config, args.batch, args.seq, args.new_tokens, args.seed, args.torch_compile)
    # The peak is measured before and after the workloads and the best kept: on a shared machine a single
    # measurement can land in a busy moment and make MFU exceed 100%.
    peak_jax = measure_matmul_peak(args.dtype)
    peak_torch = torch_matmul_peak(args.dtype)
    rtol = 2e-2 if args.dtype == "bfloat16" else 1e-4
    results: list[Result] = []
    for name in args.workloads.split(","):
        t0 = time.perf_counter()
        work = WORKLOADS[name](ctx)
        res, artifacts = time_work(name, work, warmup=args.warmup, reps=args.reps, memory=args.memory)
        check_equal_work(name, work, res, artifacts, rtol)
        results.extend(res)
        print(f"{name}: " + ", ".join(f"{r.side} {r.tokens_per_s:,.1f} {r.unit}/s" for r in res)
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    peak_jax = max(peak_jax, measure_matmul_peak(args.dtype))
    peak_torch = max(peak_torch, torch_matmul_peak(args.dtype))
    set_mfu(results, max(peak_jax, peak_torch))  # against the larger of the two frameworks' best peaks
    meta = dict(machine=machine_description(), config=f"{args.preset} ({config.num_params() / 1e6:.1f}M params), "
                f"batch {args.batch}, seq {args.seq}, {args.dtype}, layer loop {layer_loop(config)}"
                + (f" (unroll {config.scan_unroll})" if layer_loop(config) == "scan" else "")
                + f", jax {jax.__version__}, torch {torch.__version__}",
                dtype=args.dtype, peak_jax=peak_jax, peak_torch=peak_torch, cpus=cpu_count(), threads=threads,
                load_average=None if load_start is None else (load_start, load_average()), args=vars(args),
                env={k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "XLA_FLAGS")},
                model=dataclasses.asdict(config))
    text = write_tables(results, meta, args.out)
    print(text)
    return text


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
