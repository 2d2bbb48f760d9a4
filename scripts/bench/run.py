"""Benchmark safety-jax against PyTorch (transformers) on the same config, weights, data and machine, in one run.

    python scripts/bench/run.py --preset tiny --batch 4 --seq 128 --workloads forward,generate
    python scripts/bench/run.py --preset bench_100m --batch 4 --seq 512 --out runs/bench

Prints a Markdown table (median tokens/s, JAX/PyTorch ratio, compile time, peak memory, MFU against the matmul peak
measured in the same run) and writes bench.md / bench.json to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Result,
    assert_equal_work,
    machine_description,
    measure_matmul_peak,
    time_sides,
    torch_matmul_peak,
    write_tables,
)
from workloads import WORKLOADS, BenchContext  # noqa: E402

from safety_jax.model.config import get_preset  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, bench_100m, bench_1b, llama3_8b, ...)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128, help="decode tokens for the generation workload")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list from {list(WORKLOADS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile where it works")
    p.add_argument("--out", default=None, help="folder for bench.md and bench.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    config = get_preset(args.preset, param_dtype=args.dtype, compute_dtype=args.dtype)
    ctx = BenchContext.build(config, args.batch, args.seq, args.new_tokens, args.seed, args.torch_compile)
    peak_jax = measure_matmul_peak(args.dtype)
    peak_torch = torch_matmul_peak(args.dtype)
    peak = max(peak_jax, peak_torch)
    rtol = 2e-2 if args.dtype == "bfloat16" else 1e-4
    results: list[Result] = []
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {list(WORKLOADS)}")
        sides, tokens, flops = WORKLOADS[name](ctx)
        res = time_sides(name, sides, tokens, flops, peak, warmup=args.warmup, reps=args.reps)
        ref = next(r for r in res if r.side == "torch")
        for r in res:
            if r.side != "torch":
                assert_equal_work(name, r.check_value, ref.check_value, rtol)
        results.extend(res)
        print(f"{name}: " + ", ".join(f"{r.side} {r.tokens_per_s:,.0f} tok/s" for r in res), flush=True)
    meta = dict(machine=machine_description(), config=f"{args.preset} ({config.num_params() / 1e6:.1f}M params), "
                f"batch {args.batch}, seq {args.seq}, {args.dtype}, jax {jax.__version__}, torch {torch.__version__}",
                dtype=args.dtype, peak_jax=peak_jax, peak_torch=peak_torch, args=vars(args),
                model=dataclasses.asdict(config))
    text = write_tables(results, meta, args.out)
    print(text)
    return text


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
