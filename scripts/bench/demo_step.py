"""Time the synthetic studies' hot loop: one training step of study 1's demo model against its forward.

    python scripts/bench/demo_step.py                          # every layer-loop mode, the demo's pretraining batch
    python scripts/bench/demo_step.py --modes unrolled --steps 50 --profile runs/demo-step-trace

For each layer-loop mode (``LlamaConfig.layer_loop``) it measures, on the demo's model and pretraining batch
(64 × 42 tokens):

- ``forward``: the jitted forward (logits), one batch, median of ``--reps`` calls;
- ``step``: the library's compiled SFT train step (AdamW, clipping) fed its own state back, the same batch;
- ``loop``: ``trainer.train`` for ``--steps`` steps on freshly drawn pretraining batches (host batch building, token
  checks, dispatch and logging included), per step;
- ``batch``: drawing one pretraining batch on the host.

and prints step / forward and loop / forward. ``--profile DIR`` writes a ``jax.profiler`` trace of a few steps
(TensorBoard's profile plugin or Perfetto read it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quiet_threads  # noqa: E402, F401  (thread-pool env vars before jax loads)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.study1_mechanics.config import load_config  # noqa: E402
from experiments.study1_mechanics.run import world_and_model  # noqa: E402
from safety_jax.data.synthetic_sets import pretrain_batch  # noqa: E402
from safety_jax.model.llama import forward, init_params  # noqa: E402
from safety_jax.train import losses  # noqa: E402
from safety_jax.train.optim import OptimConfig, build_optimizer  # noqa: E402
from safety_jax.train.trainer import TrainConfig, TrainState, make_train_step, stack_micro_batches, train  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(mode: str, study: str, reps: int, steps: int, profile: str | None) -> dict[str, float]:
    """The four timings (ms) of one layer-loop mode."""
    cfg = load_config(study)
    world, mcfg = world_and_model(cfg)
    mcfg = mcfg.replace(layer_loop=mode)
    p = cfg.pretrain
    params = init_params(mcfg, jax.random.key(0))
    draw = lambda i: pretrain_batch(world, p.batch_size, np.random.default_rng([0, i]), progress=0.5,
                                    grammars=cfg.world.grammars).sft()
    batch = draw(0)
    tokens = jnp.asarray(batch["tokens"])

    fwd = jax.jit(lambda prm, tok: forward(prm, tok, mcfg)[0])
    fwd(params, tokens).block_until_ready()
    forward_ms = _median_ms(lambda: fwd(params, tokens).block_until_ready(), reps)

    ocfg = OptimConfig(lr=p.lr, schedule="cosine", warmup_steps=p.warmup_steps, total_steps=p.steps,
                       min_lr_ratio=p.min_lr_ratio, weight_decay=p.weight_decay, clip_norm=p.clip_norm)
    optimizer = build_optimizer(ocfg, params)
    step_fn = make_train_step(losses.make_sft_loss(mcfg), optimizer)
    holder = {"state": TrainState.create(jax.tree.map(jnp.array, params), optimizer)}
    stacked = {k: jnp.asarray(v) for k, v in stack_micro_batches(batch, 1).items()}

    def one_step() -> None:
        holder["state"], metrics = step_fn(holder["state"], stacked, None, None)
        jax.block_until_ready(metrics)

    one_step()
    step_ms = _median_ms(one_step, reps)
    if profile:
        with jax.profiler.trace(os.path.join(profile, mode)):
            for _ in range(5):
                one_step()

    batch_ms = _median_ms(lambda: draw(1), reps)

    class Batches:
        def __init__(self) -> None:
            self.i = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.i += 1
            return draw(self.i)

    tcfg = TrainConfig(steps=steps, log_every=max(steps // 20, 1), seed=0, progress=False)
    train(losses.make_sft_loss(mcfg), optimizer, params, Batches(), tcfg, model_config=mcfg)  # compile + warm up
    t0 = time.perf_counter()
    train(losses.make_sft_loss(mcfg), optimizer, params, Batches(), tcfg, model_config=mcfg)
    loop_ms = 1e3 * (time.perf_counter() - t0) / steps
    return {"forward": forward_ms, "step": step_ms, "loop": loop_ms, "batch": batch_ms}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="demo", help="study 1 config whose model and pretraining batch are timed")
    ap.add_argument("--modes", default="scan,unrolled", help="comma list of layer-loop modes: scan, unrolled")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=100, help="trainer steps timed for the loop figure")
    ap.add_argument("--profile", default=None, help="folder for a jax.profiler trace of five steps per mode")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in ("scan", "unrolled")]
    if bad:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from scan, unrolled")
    load = os.getloadavg()[0]
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print("| layer loop | forward ms | step ms | step / forward | trainer loop ms per step | loop / forward "
          "| batch draw ms |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        r = measure(mode, args.study, args.reps, args.steps, args.profile)
        print(f"| {mode} | {r['forward']:.1f} | {r['step']:.1f} | {r['step'] / r['forward']:.2f} | "
              f"{r['loop']:.1f} | {r['loop'] / r['forward']:.2f} | {r['batch']:.1f} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
