"""Single-kernel JAX-vs-PyTorch timings: the evidence behind the workload ratios of ``run.py``.

A workload is slower in JAX than in PyTorch either because a kernel XLA emits is slower than the library PyTorch calls
(CPU matmul: XLA's Eigen/oneDNN path vs PyTorch's MKL/oneDNN; SVD: the LAPACK JAX links vs PyTorch's), or because
the compiled program does extra work (copies, transposes). This script times the kernels alone, at the shapes a
``--preset`` produces, so the two causes can be told apart:

    python scripts/bench/kernel_timings.py --preset bench_100m --batch 4 --seq 256

It prints one Markdown table (median ms per call, the JAX/PyTorch speed ratio) and writes it with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quiet_threads  # noqa: E402, F401  (sets thread-pool env vars: before jax, torch, scipy load)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import machine_description, set_threads  # noqa: E402

from safety_jax.model.config import get_preset  # noqa: E402


def _median_ms(fn: Callable[[], Any], reps: int, sync: Callable[[Any], Any]) -> float:
    sync(fn())  # warm-up (and compile)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_cases(preset: str, batch: int, seq: int) -> list[tuple[str, tuple[tuple[int, ...], ...], str]]:
    """(name, operand shapes, op) at the shapes of a preset: op ``matmul`` [M,K]x[K,N] or ``svd`` of [out, in]."""
    c = get_preset(preset)
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    tokens = batch * seq
    return [
        ("matmul square 1024 (the MFU peak)", ((1024, 1024), (1024, 1024)), "matmul"),
        (f"MLP up, training tokens [{tokens},{d}]x[{d},{f}]", ((tokens, d), (d, f)), "matmul"),
        (f"MLP down, training tokens [{tokens},{f}]x[{f},{d}]", ((tokens, f), (f, d)), "matmul"),
        (f"LM head, training tokens [{tokens},{d}]x[{d},{v}]", ((tokens, d), (d, v)), "matmul"),
        (f"MLP up, one decode step [{batch},{d}]x[{d},{f}]", ((batch, d), (d, f)), "matmul"),
        (f"LM head, one decode step [{batch},{d}]x[{d},{v}]", ((batch, d), (d, v)), "matmul"),
        (f"SVD of an MLP matrix [{f},{d}]", ((f, d),), "svd"),
        (f"SVD of an attention matrix [{d},{d}]", ((d, d),), "svd"),
    ]


def _check_same(a: np.ndarray, b: np.ndarray, what: str, shapes: tuple[tuple[int, ...], ...]) -> None:
    """Equal work: both frameworks' results agree to float32 accuracy (relative to the largest entry)."""
    err = float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)
    if a.shape != b.shape or err > 1e-4:
        raise RuntimeError(f"kernels: JAX and PyTorch {what} differ for shapes {shapes} (max rel. error {err:.1e})")


def time_case(shapes: tuple[tuple[int, ...], ...], op: str, reps: int) -> dict[str, float]:
    """Median ms of the kernel in JAX (jitted), PyTorch, and for SVDs numpy/scipy's LAPACK (what JAX's CPU SVD uses)."""
    import torch

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    j = [jnp.asarray(a) for a in arrays]
    t = [torch.from_numpy(a) for a in arrays]
    if op == "matmul":
        fj = jax.jit(lambda a, b: a @ b)
        _check_same(np.asarray(fj(*j)), (t[0] @ t[1]).numpy(), "matmul", shapes)
        out = {"jax": _median_ms(lambda: fj(*j), reps, jax.block_until_ready),
               "torch": _median_ms(lambda: t[0] @ t[1], reps, lambda x: x)}
    else:
        import scipy.linalg

        fj = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False))
        _check_same(np.asarray(fj(j[0])[1]), torch.linalg.svdvals(t[0]).numpy(), "singular values", shapes)
        out = {"jax": _median_ms(lambda: fj(j[0]), reps, jax.block_until_ready),
               "torch": _median_ms(lambda: torch.linalg.svd(t[0], full_matrices=False), reps, lambda x: x),
               "scipy gesdd": _median_ms(lambda: scipy.linalg.svd(arrays[0], full_matrices=False,
                                                                  lapack_driver="gesdd"), reps, lambda x: x)}
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench_100m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="PyTorch and OpenBLAS threads (default: CPU count)")
    ap.add_argument("--out", default=None, help="folder for kernels.md and kernels.json")
    args = ap.parse_args(argv)

    import torch

    set_threads(args.threads)
    rows = []
    for name, shapes, op in kernel_cases(args.preset, args.batch, args.seq):
        ms = time_case(shapes, op, args.reps)
        rows.append({"kernel": name, **{f"{k} ms": v for k, v in ms.items()}, "JAX/torch": ms["torch"] / ms["jax"]})
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
              + f" -> JAX/torch {ms['torch'] / ms['jax']:.2f}x", flush=True)
    lines = [f"Machine: {machine_description()}  ",
             f"jax {jax.__version__}, torch {torch.__version__}, float32, CPU load average (1 min) "
             f"{os.getloadavg()[0]:.1f}  ", "",
             "| kernel | JAX ms | PyTorch ms | scipy ms | JAX/torch |", "|---|---|---|---|---|"]
    for r in rows:
        sc = f"{r['scipy gesdd ms']:.2f}" if "scipy gesdd ms" in r else "–"
        lines.append(f"| {r['kernel']} | {r['jax ms']:.2f} | {r['torch ms']:.2f} | {sc} | {r['JAX/torch']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels.md"), "w") as fh:
            fh.write(table + "\n")
        with open(os.path.join(args.out, "kernels.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
