"""``safety-jax`` command line: one subcommand per job.

    safety-jax convert --src HF_FOLDER --dst OUT --to orbax       # or --to hf, from an orbax folder
    safety-jax generate --model FOLDER --prompt "..." --max-new-tokens 32 [--temperature 0.7 --top-p 0.9] [--chat]
    safety-jax eval --model FOLDER --data beavertails:30k_test[:1000] --judge GCG-29 --out DIR [--template alpaca]
                                                                   # generate → judge → table (resumable)
    safety-jax train --config run.yaml key=value ...               # SFT / DPO / unlearning
    safety-jax plan --config run.yaml [--mesh fsdp=8] [--batch 8 --seq 2048]   # per-device memory of one step
    safety-jax study all --config demo --out runs/demo            # the main job: studies 1-4 and their index
    safety-jax sweep --spec sweep.yaml [--out DIR] [--address ray://HEAD:10001]  # grid × seeds on Ray (resumable)

Multi-process (train, plan): --coordinator-address HOST:PORT --num-processes N --process-id I, or the environment
(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, Slurm, Open MPI, TPU) as jax.distributed reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from typing import Any

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _convert(args: argparse.Namespace) -> None:
    from safety_jax.model.io import load_model, load_tokenizer, model_format, save_model

    config, params = load_model(args.src, dtype=args.dtype)
    try:
        tokenizer = load_tokenizer(args.src)
    except ValueError:
        tokenizer = None
    save_model(args.dst, config, params, fmt=args.to, tokenizer=tokenizer)
    print(f"converted {args.src} ({model_format(args.src)}) -> {args.dst} ({args.to})")


def _generate(args: argparse.Namespace) -> None:
    import jax

    from safety_jax.model.generate import generate_text
    from safety_jax.model.io import load_model, load_tokenizer

    config, params = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    prompts: list[Any] = list(args.prompt)
    if args.chat:
        # message lists: the template is applied while tokenising, so its BOS is not added a second time
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    texts = generate_text(params, config, tokenizer, prompts, chat=args.chat, rng=jax.random.key(args.seed),
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k)
    for prompt, text in zip(args.prompt, texts):
        print(f"### {prompt}\n{text}")


class UsageError(Exception):
    """Bad command-line input found before any work: reported as an argparse error naming the flag."""

    def __init__(self, flag: str, problem: Any) -> None:
        super().__init__(f"{flag}: {problem}")


def _eval(args: argparse.Namespace) -> None:
    """Check every input (model and LoRA folders, data, judge, template, mesh) before loading weights or compiling,
    then evaluate and print the table."""
    from safety_jax.model.io import load_tokenizer, model_format

    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p", f"{args.top_p} must be in (0, 1]")
    try:
        model_format(args.model)
    except (OSError, ValueError) as e:
        raise UsageError("--model", e) from None
    if args.lora is not None:
        from safety_jax.model.lora import CONFIG_FILE, WEIGHTS_FILE

        missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not os.path.exists(os.path.join(args.lora, f))]
        if missing:
            raise UsageError("--lora", f"{args.lora} is not a LoRA folder (lacks {', '.join(missing)})")
    for f in args.data_files or ():
        if not os.path.exists(f):
            raise UsageError("--data-files", f"{f} does not exist")
    from safety_jax.data.benchmarks import load_benchmark

    keep = None if args.label is None else _label_filter(args.label)
    try:
        examples = load_benchmark(args.data, data_files=args.data_files, filter=keep, limit=args.limit)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError("--data", e) from None
    if not examples:
        raise UsageError("--data", f"{args.data} selects no examples" + (f" with --label {args.label}"
                                                                          if args.label is not None else ""))
    from safety_jax.eval.judges import load_judge

    try:
        judge = load_judge(args.judge)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError("--judge", e) from None
    try:
        tokenizer = load_tokenizer(args.model)
    except ValueError as e:
        raise UsageError("--model", e) from None
    if args.template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise UsageError("--template", f"chat needs a tokenizer with a chat_template; {args.model}'s has none: use "
                         "--template alpaca or none")
    mesh = shardings = None
    if args.mesh:
        from safety_jax.parallel import make_mesh, param_sharding_fn

        try:
            mesh = make_mesh(args.mesh)
        except ValueError as e:
            raise UsageError("--mesh", e) from None
        shardings = param_sharding_fn(mesh)

    from safety_jax.eval.evaluate import EvalModel, evaluate

    model = EvalModel.load(args.model, dtype=args.dtype, lora=args.lora, shardings=shardings)
    table = evaluate(model, examples, judge, out_dir=args.out, template=args.template, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k, seed=args.seed, dataset_name=args.data, mesh=mesh,
                     progress=not args.no_progress)
    print(table.markdown())
    print(f"answers, verdicts and table in {args.out}")


def _label_filter(text: str) -> Any:
    """``--label`` as a filter on ``EvalExample.label``: true / false, an integer, or any other text."""
    value: Any = {"true": True, "false": False}.get(text.lower(), text)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    return lambda e: e.label == value and isinstance(e.label, bool) == isinstance(value, bool)


def _train(args: argparse.Namespace) -> None:
    _init_distributed(args)
    from safety_jax.train.run import train_from_cli

    train_from_cli(args.config, args.overrides)


def _study(args: argparse.Namespace) -> None:
    from experiments.main import run_studies

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    run_studies(args.studies, args.config, args.out, args.overrides)


def _sweep(args: argparse.Namespace) -> None:
    from safety_jax.sweep import load_spec, run_sweep

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not os.path.exists(args.spec):
        raise UsageError("--spec", f"no file {args.spec}")
    spec = load_spec(args.spec, args.overrides)
    out = args.out or os.path.join("runs", "sweeps", spec.name)
    result = run_sweep(spec, out, address=args.address, num_cpus=args.num_cpus)
    counts = {s: list(result.status.values()).count(s) for s in ("done", "failed", "todo")}
    print(f"sweep {spec.name}: {counts['done']} done, {counts['failed']} failed, ran {len(result.ran)} "
          f"this call -> {os.path.join(out, 'results.md')}")


# ---------------------------------------------------------------------------------------------------- plan
def mesh_device_count(spec: str | None) -> int | None:
    """Devices a mesh spec (``"data=2,fsdp=4"``) asks for; None when it has a ``-1`` axis or is malformed."""
    sizes = []
    for part in (p.strip() for p in (spec or "").split(",") if p.strip()):
        try:
            sizes.append(int(part.partition("=")[2]))
        except ValueError:
            return None  # make_mesh names the malformed part
    return math.prod(sizes) if sizes and all(s > 0 for s in sizes) else None


def _config_mesh(path: str | None, overrides: list[str]) -> str | None:
    """The run config's ``mesh`` (a ``mesh=`` override last), read without jax; None when absent or unreadable."""
    mesh = None
    if path:
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
            mesh = raw.get("mesh") if isinstance(raw, dict) else None
        except (OSError, yaml.YAMLError):
            return None  # load_run_config reports it
    for item in overrides:
        if item.startswith("mesh="):
            mesh = item.partition("=")[2]
    return mesh if isinstance(mesh, str) else None


def _backends_started() -> bool:
    """Whether jax has created its backends (after which ``XLA_FLAGS`` no longer changes the devices)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def simulate_host_devices(count: int | None) -> bool:
    """Ask for ``count`` host (CPU) devices via ``XLA_FLAGS``; possible only before jax creates its backends (returns
    whether it was set). An accelerator backend is unaffected: the flag sizes the CPU platform only."""
    if count is None or count < 2 or _backends_started():
        return False
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
    return True


def _plan(args: argparse.Namespace) -> None:
    if _requested_processes(args) <= 1:
        simulate_host_devices(mesh_device_count(args.mesh or _config_mesh(args.config, args.overrides)))
    _init_distributed(args)
    from safety_jax.train.plan import plan_step
    from safety_jax.train.run import load_run_config

    plan = plan_step(load_run_config(args.config, args.overrides), batch_size=args.batch, seq_len=args.seq,
                     mesh_spec=args.mesh, compile=not args.no_compile)
    import jax

    if jax.process_index() == 0:
        print(json.dumps(plan.to_json(), indent=2) if args.json else plan.format())


# ---------------------------------------------------------------------------------------------------- processes
def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _requested_processes(args: argparse.Namespace) -> int:
    """Processes asked for by the flags or a launcher's environment (Slurm, Open MPI); 1 when none."""
    counts = [args.num_processes, _env_int("SLURM_NTASKS") if "SLURM_PROCID" in os.environ else None,
              _env_int("OMPI_COMM_WORLD_SIZE")]
    return max([c for c in counts if c is not None] or [1])


def _init_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed`` before anything touches the devices (a no-op for a single-process run)."""
    import jax

    if _requested_processes(args) > 1 and _cpu_may_run():
        # CPU collectives across processes; the setting configures only the CPU client
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from safety_jax.parallel import initialize_distributed

    kwargs: dict[str, Any] = {}
    if args.coordinator_address is not None or (args.num_processes or 1) > 1:
        kwargs = {k: v for k, v in (("coordinator_address", args.coordinator_address),
                                    ("num_processes", args.num_processes), ("process_id", args.process_id))
                  if v is not None}
    initialize_distributed(**kwargs)


def _cpu_may_run() -> bool:
    """Whether the CPU platform may be the one jax runs on (``JAX_PLATFORMS`` unset or naming cpu first)."""
    import jax

    platforms = jax.config.jax_platforms or ""
    return not platforms or platforms.split(",")[0].strip() == "cpu"


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def _add_process_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (default: the environment, as jax.distributed reads it)")
    g.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
                   help="address of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=_positive_int, default=os.environ.get("JAX_NUM_PROCESSES"), metavar="N",
                   help="number of processes in the job (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_non_negative_int, default=os.environ.get("JAX_PROCESS_ID"), metavar="I",
                   help="this process's index, 0 .. N-1 (env JAX_PROCESS_ID)")


def _check_process_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not hasattr(args, "process_id"):
        return
    n, i = args.num_processes, args.process_id
    if i is not None and n is None:
        parser.error(f"--process-id {i} needs --num-processes (or JAX_NUM_PROCESSES)")
    if i is not None and i >= n:
        parser.error(f"--process-id {i} must be below --num-processes {n} (process ids run 0 .. {n - 1})")
    if n is not None and n > 1 and args.coordinator_address is None and i is None and not _launcher_env():
        parser.error(f"--num-processes {n} needs --coordinator-address HOST:PORT and --process-id (or a Slurm / "
                     "Open MPI / TPU launcher that sets them)")


def _launcher_env() -> bool:
    env = os.environ
    return any(k in env for k in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "TPU_WORKER_HOSTNAMES",
                                  "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safety-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model folder between Hugging Face and orbax formats")
    p.add_argument("--src", required=True, help="Hugging Face or orbax model folder")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--to", choices=["hf", "orbax"], required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.set_defaults(func=_convert)

    p = sub.add_parser("generate", help="generate text from a model folder with its tokenizer")
    p.add_argument("--model", required=True, help="Hugging Face or orbax model folder (with tokenizer files)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="generate answers to a benchmark, judge them, table the rates",
                       description="Answer every example of a benchmark, judge the answers and print per-metric "
                       "counts, rates and Wilson 95 % intervals (overall and per category). Answers are cached in "
                       "OUT/answers.jsonl: a re-run with the same settings answers only what is missing.")
    p.add_argument("--model", required=True, help="Hugging Face or orbax model folder (with tokenizer files)")
    p.add_argument("--data", required=True, help="benchmark spec, e.g. beavertails:30k_test[:1000] or advbench")
    p.add_argument("--data-files", nargs="+", default=None, metavar="FILE", help="local data files for the spec")
    p.add_argument("--judge", required=True, help="GCG-29, JBB-13, sst2, agnews, gsm8k, or a classifier / guard "
                   "model folder")
    p.add_argument("--out", required=True, help="output folder (answers.jsonl, verdicts.jsonl, table.md/json)")
    p.add_argument("--template", choices=["chat", "alpaca", "none"], default="chat",
                   help="prompt format: the tokenizer's chat template, Alpaca, or the raw prompt")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=_non_negative_int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="keep examples with this label, e.g. false for BeaverTails' unsafe "
                   "prompts (is_safe False: the harmful-score set)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="evaluate only the first N examples (after --label)")
    p.add_argument("--lora", default=None, metavar="FOLDER", help="LoRA adapters (a save_lora folder)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--mesh", default=None, help="mesh spec, e.g. data=8 (batch split along the data axes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)

    p = sub.add_parser("train", help="SFT / DPO / unlearning from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 steps=100")
    _add_process_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("study", help="the synthetic studies into one folder, with an index of their claims")
    from experiments.main import add_arguments

    add_arguments(p)
    p.set_defaults(func=_study)

    p = sub.add_parser("sweep", help="a grid of config overrides x seeds over a study or train config, on Ray")
    p.add_argument("--spec", required=True, help="sweep spec YAML (see safety_jax/sweep.py)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the spec, e.g. seeds=[0,1,2]")
    p.add_argument("--out", default=None, help="output folder (default runs/sweeps/<name>; reuse it to resume)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (ray://head:10001, auto); default RAY_ADDRESS or a local Ray")
    p.add_argument("--num-cpus", type=_positive_int, default=None, help="CPUs of the local Ray (default: all)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("plan", help="per-device memory of one training step, without loading weights",
                       description="Per-device memory of one training step of a run config: params, optimizer "
                       "state, frozen weights, batch (from their shardings) and XLA's compiled estimate "
                       "(activations, temporaries, total). Nothing is loaded or run; on a CPU-only machine the "
                       "mesh's devices are simulated.")
    p.add_argument("--config", default=None, help="YAML run config (as for train); or only key=value overrides")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. preset=llama3_8b compute_dtype=bfloat16")
    p.add_argument("--mesh", default=None, help="mesh spec, e.g. fsdp=8 (default: the config's mesh)")
    p.add_argument("--batch", type=_positive_int, default=None, help="global batch size (default: batch_size)")
    p.add_argument("--seq", type=_positive_int, default=None, help="sequence length (default: data.max_length)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-compile", action="store_true",
                   help="only the analytic sizes (no XLA compile: no activations / temporaries)")
    _add_process_args(p)
    p.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_process_args(parser, args)
    try:
        args.func(args)
    except UsageError as e:
        parser.error(f"{args.command} {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
