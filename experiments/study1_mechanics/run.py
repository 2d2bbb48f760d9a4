"""Study 1 — what makes and breaks safety fine-tuning (Jain et al. 2024, arXiv 2407.10264) on the synthetic world.

    python -m experiments.study1_mechanics.run --config demo --out runs/demo [section.key=value ...]
    python experiments/study1_mechanics/run.py --config quick --out /tmp/quick

Pretrain a small Llama on the world's pretraining mixture → safety fine-tune it (SSFT, the study's asymmetric DPO,
standard DPO, unlearning; at each learning rate) → evaluate every test set (teacher-forced accuracy, generation judged
exactly) → analyses (τ per layer, ΔW vs the pretrained column space, row-space alignment, Lipschitzness,
α-interpolation, soft-token attacks) → ``report.md``, ``metrics.json`` and PNG plots in OUT.

Every stage writes its outputs under ``OUT/<stage>/`` (models as Hugging Face folders, results as JSON) and is skipped
when ``OUT/<stage>/DONE`` exists, so re-running with the same OUT resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from experiments.cli import run_study, study_parser
from experiments.study1_mechanics import claims, summary
from experiments.study1_mechanics.config import StudyConfig, load_config
from safety_jax.analysis.weights import delta_weight_analysis, interpolate_params, module_matrix
from safety_jax.data.synthetic import World, build_world, get_world_config
from safety_jax.data.synthetic_sets import (
    REFUSED,
    SyntheticBatch,
    decided_by_text,
    make_test_sets,
    mixed_safety_batch,
    pretrain_batch,
    safety_batch,
)
from safety_jax.errors import ConfigError
from safety_jax.eval import synthetic_world
from safety_jax.model.config import LlamaConfig, get_preset
from safety_jax.model.llama import LINEAR_MODULES, Params, init_params
from safety_jax.stages import Stages
from safety_jax.train import losses
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.trainer import TrainConfig, train

log = logging.getLogger("study1")


class StepBatches:
    """Batch ``i`` = ``make(i)``; resumable by the trainer (``state`` / ``restore`` are the step index)."""

    def __init__(self, make: Callable[[int], dict[str, np.ndarray]]) -> None:
        self.make, self.i = make, 0

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.i += 1
        return self.make(self.i - 1)

    def state(self) -> dict[str, int]:
        return {"step": self.i}

    def restore(self, state: dict[str, int]) -> None:
        self.i = int(state["step"])


# ---------------------------------------------------------------------------------------------------- training
def pretrain(cfg: StudyConfig, world: World, mcfg: LlamaConfig, out_dir: str) -> Params:
    """Pretraining on the world's mixture (its mode probabilities move linearly over training)."""
    p = cfg.pretrain
    ocfg = OptimConfig(lr=p.lr, schedule="cosine", warmup_steps=p.warmup_steps, total_steps=p.steps,
                       min_lr_ratio=p.min_lr_ratio, weight_decay=p.weight_decay, clip_norm=p.clip_norm)
    params = init_params(mcfg, jax.random.key(cfg.seed))
    batches = StepBatches(lambda i: pretrain_batch(world, p.batch_size, np.random.default_rng([cfg.seed, i]),
                                                   progress=i / p.steps, grammars=cfg.world.grammars).sft())
    # With save_every > 0 the trainer keeps orbax checkpoints (and TensorBoard logs) in the stage folder, so an
    # interrupted pretraining resumes; with 0 it only returns the history, written here.
    state, history = train(losses.make_sft_loss(mcfg), build_optimizer(ocfg, params), params, batches,
                           TrainConfig(steps=p.steps, log_every=max(p.steps // 20, 1), save_every=p.save_every,
                                       seed=cfg.seed), out_dir=out_dir if p.save_every else None)
    with open(os.path.join(out_dir, "history.json"), "w") as fh:
        json.dump(history, fh)
    return state.params


def safety_batches(cfg: StudyConfig, world: World, step: int, method: str | None = None,
                   data_seed: int | None = None) -> SyntheticBatch:
    """Fine-tuning batch ``step`` (the same for every method that shares the batch settings): all-unsafe w.p.
    ``unsafe_frac``, else all-safe; or, with ``batch_mix="per_example"``, ``unsafe_frac`` of its rows unsafe.
    ``method`` applies that method's ``finetune.method_overrides``; ``data_seed`` (default ``cfg.seed``) sets the
    data order."""
    f = cfg.finetune if method is None else cfg.finetune.for_method(method)
    rng = np.random.default_rng([cfg.seed if data_seed is None else data_seed, 1, step])
    ssr = f.second_segment_refusal
    if f.batch_mix == "per_example":
        return mixed_safety_batch(world, f.batch_size, f.unsafe_frac, rng, cfg.world.grammars,
                                  second_segment_refusal=ssr)
    kind = "unsafe" if rng.random() < f.unsafe_frac else "safe"
    return safety_batch(world, kind, f.batch_size, rng, cfg.world.grammars, second_segment_refusal=ssr)


def method_batch(cfg: StudyConfig, world: World, method: str, step: int,
                 data_seed: int | None = None) -> dict[str, np.ndarray]:
    """The trainer's batch dict of fine-tuning step ``step`` for ``method``: SFT rows for SSFT, preference pairs for
    DPO and unlearning (scored on ``finetune.pair_targets``); ``finetune.pad_targets`` trains every output position."""
    batch = safety_batches(cfg, world, step, method, data_seed)
    f = cfg.finetune.for_method(method)
    if method == "ssft":
        return batch.sft(pad_targets=f.pad_targets)
    return batch.dpo(pad_targets=f.pad_targets, pair_targets=f.pair_targets)


def finetune(cfg: StudyConfig, world: World, mcfg: LlamaConfig, init: Params, method: str, lr: float,
             out_dir: str, data_seed: int | None = None, steps: int | None = None) -> Params:
    """One safety fine-tuning run from ``init`` (the pretrained params, or the model of the method it starts from,
    which is also DPO's frozen reference), with ``finetune`` and ``method``'s overrides, data order ``data_seed``,
    ``steps`` (default the method's)."""
    f = cfg.finetune.for_method(method)
    loss_fn = {
        "ssft": lambda: losses.make_sft_loss(mcfg),
        "dpo": lambda: losses.make_synthetic_dpo_loss(mcfg, beta_chosen=f.beta_chosen, beta_rejected=f.beta_rejected),
        "dpo_standard": lambda: losses.make_dpo_loss(mcfg, beta=f.beta_standard, loss_type="sigmoid",
                                                     rpo_alpha=f.rpo_alpha),
        "unlearning": lambda: losses.make_synthetic_unlearning_loss(mcfg, rejected_weight=f.rejected_weight),
    }[method]()
    batches = StepBatches(functools.partial(method_batch, cfg, world, method, data_seed=data_seed))
    # DPO's reference = the frozen starting params, its log-probs computed inside the step (no extra compile).
    aux = {"ref_params": init} if method.startswith("dpo") else None
    steps = f.steps if steps is None else steps
    ocfg = OptimConfig(lr=lr, schedule=f.schedule, warmup_steps=f.warmup_steps, total_steps=f.decay_steps or steps,
                       min_lr_ratio=0.01 if f.min_lr is None else min(f.min_lr / lr, 1.0), weight_decay=f.weight_decay)
    state, history = train(loss_fn, build_optimizer(ocfg, init), init, batches,
                           TrainConfig(steps=steps, log_every=max(steps // 10, 1), seed=cfg.seed), aux=aux)
    with open(os.path.join(out_dir, "history.json"), "w") as fh:  # short runs: no orbax checkpoints, just the log
        json.dump(history, fh)
    return state.params


# ---------------------------------------------------------------------------------------------------- analyses
def head(sets: dict[str, SyntheticBatch], n: int) -> dict[str, SyntheticBatch]:
    return {k: b.take(slice(0, n)) for k, b in sets.items()}


def refusal_by_rule(world: World, sets, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Refusal of the standard safe / unsafe sets split by what decides their label: the operators alone, or the
    text's family (conditional operators only) — where a model that cannot read the family has to guess. Uses the
    per-answer verdicts the evaluate stage kept (no second generation)."""
    out: dict[str, Any] = {}
    for name, ev in evaluation.items():
        out[name] = {}
        for kind in ("safe", "unsafe"):
            refused = np.asarray(ev[kind]["verdicts"]) == REFUSED
            by_text = decided_by_text(world, sets[kind])
            out[name][kind] = {rule: {"refused": float(refused[m].mean()) if m.any() else float("nan"),
                                      "n": int(m.sum())}
                               for rule, m in (("operators", ~by_text), ("text_family", by_text))}
    return out


def tau_stage(cfg: StudyConfig, mcfg: LlamaConfig, models: dict[str, Params], sets) -> dict[str, Any]:
    out: dict[str, Any] = {"tau": {}, "separation": {}}
    for name, params in tqdm(models.items(), desc="tau"):
        feats = synthetic_world.window_features(params, mcfg, sets, width=cfg.analysis.tau_width,
                                                batch_size=cfg.eval.batch_size)
        taus = synthetic_world.tau_by_set(feats)
        out["tau"][name] = synthetic_world.summarise_taus(taus)
        out["separation"][name] = synthetic_world.separation(taus)
    return out


def delta_w_stage(cfg: StudyConfig, pre: Params, models: dict[str, Params]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, params in tqdm(models.items(), desc="delta W"):
        reps = delta_weight_analysis(pre, params, modules=LINEAR_MODULES, top_k=cfg.analysis.top_k,
                                     energy=cfg.analysis.energy)
        out[name] = {}
        for module, r in reps.items():
            rows = int(module_matrix(pre, module).shape[1])  # output dimension (HF orientation [L, out, in])
            out[name][module] = {
                "sin_theta_mean": float(np.nanmean(r.sin_theta)),
                "sin_theta_top1": float(np.nanmean(r.sin_theta[:, 0])),
                "sin_theta_by_rank": np.nanmean(r.sin_theta, axis=0), "sin_theta": r.sin_theta,
                "random_baseline": float(np.mean(np.sqrt(np.clip(1 - r.pre_energy_rank / rows, 0, 1)))),
                "pre_energy_rank": r.pre_energy_rank, "out_dim": rows, "relative_norm": r.relative_norm,
                "delta_singular_values": r.delta_singular_values[:, : cfg.analysis.top_k]}
    return out


def probes_stage(cfg: StudyConfig, mcfg: LlamaConfig, pre: Params, models: dict[str, Params], sets) -> dict:
    small = head({k: sets[k] for k in ("safe", "unsafe")}, cfg.analysis.n_examples)
    out: dict[str, Any] = {"lipschitz": {}, "row_space": {}}
    for name, params in tqdm(models.items(), desc="lipschitz + row space"):
        out["lipschitz"][name] = synthetic_world.lipschitz_by_set(params, mcfg, small, values=True,
                                                                  include_gt=cfg.analysis.lipschitz_include_gt)
        out["row_space"][name] = synthetic_world.row_space_by_set(params, pre, mcfg, small,
                                                                  batch_size=cfg.eval.batch_size, per_direction=True)
    return out


def interpolation_stage(cfg: StudyConfig, mcfg: LlamaConfig, pre: Params, models: dict[str, Params], sets) -> dict:
    small = head({k: sets[k] for k in ("safe", "unsafe")}, cfg.analysis.n_examples)
    out: dict[str, Any] = {}
    for name, ft in models.items():
        rows = []
        for alpha in tqdm(cfg.analysis.alphas, desc=f"interpolate {name}"):
            params = interpolate_params(pre, ft, alpha)
            ev = synthetic_world.evaluate_sets(params, mcfg, small, batch_size=cfg.eval.batch_size)
            feats = synthetic_world.window_features(params, mcfg, small, width=cfg.analysis.tau_width,
                                                    batch_size=cfg.eval.batch_size)
            taus = synthetic_world.tau_by_set(feats)
            rows.append({"alpha": alpha, "safe_instruct_acc": ev["safe"]["instruct_acc"],
                         "unsafe_null_acc": ev["unsafe"]["null_acc"], "unsafe_refused": ev["unsafe"]["refused"],
                         "unsafe_harmful": ev["unsafe"]["harmful"], "safe_correct": ev["safe"]["correct"],
                         "separation": float(synthetic_world.separation(taus).mean()), "n": len(small["unsafe"])})
        out[name] = rows
    return out


def attack_stage(cfg: StudyConfig, mcfg: LlamaConfig, models: dict[str, Params], sets) -> dict:
    a = cfg.analysis
    ref = {k: sets[k] for k in ("safe", "unsafe")}
    target = sets["unsafe"].take(slice(0, a.attack_n))
    out = {}
    for name, params in tqdm(models.items(), desc="soft-token attacks"):
        feats = synthetic_world.window_features(params, mcfg, ref, width=a.tau_width, batch_size=cfg.eval.batch_size)
        means = (feats["safe"].mean(axis=1), feats["unsafe"].mean(axis=1))
        out[name] = synthetic_world.attack_sweep(params, mcfg, target, means, num_soft=a.attack_num_soft,
                                                 rounds=a.attack_rounds, steps_per_round=a.attack_steps_per_round,
                                                 lr=a.attack_lr, width=a.tau_width, seed=cfg.seed,
                                                 batch_size=cfg.eval.batch_size)
    return out


# ---------------------------------------------------------------------------------------------------- main
def finetune_runs(cfg: StudyConfig) -> dict[str, tuple[str, float]]:
    """``{"method@lr_name": (method, learning rate)}``: every method at every named lr it runs at
    (``finetune.method_lrs``, default all), times its ``lr_scale``."""
    f = cfg.finetune
    return {f"{m}@{name}": (m, lr * f.lr_scale.get(m, 1.0)) for name, lr in f.lrs.items() for m in f.methods
            if name in f.method_lrs.get(m, f.lrs)}


def run_budgets(cfg: StudyConfig) -> dict[str, dict[str, Any]]:
    """Each fine-tuning run's budget (what the claims compare at "equal budgets")."""
    out = {}
    for name, (method, lr) in finetune_runs(cfg).items():
        f = cfg.finetune.for_method(method)
        out[name] = {"method": method, "lr_name": name.split("@", 1)[1], "lr": lr,
                     "steps": cfg.finetune.steps_at(method, name.split("@", 1)[1]),
                     "batch_size": f.batch_size, "unsafe_frac": f.unsafe_frac, "batch_mix": f.batch_mix,
                     "start_from": f.start_from}
    return out


def training_log(path: str) -> dict[str, Any]:
    """The first and last logged metrics of one fine-tuning run (its ``history.json``), without the timing."""
    with open(path) as f:
        history = [{k: v for k, v in row.items() if k != "steps_per_s"} for row in json.load(f)]
    return {"first": history[0], "last": history[-1]} if history else {}


def start_run(cfg: StudyConfig, name: str) -> str | None:
    """The fine-tuning run whose model run ``name`` ("method@lr_name") starts from; None = the pretrained model."""
    method, lr_name = name.split("@", 1)
    parent = cfg.finetune.for_method(method).start_from
    return None if parent == "pretrained" else f"{parent}@{lr_name}"


def _start_order(cfg: StudyConfig, runs: dict[str, Any]) -> list[str]:
    """The runs with every run after the one it starts from (the config rejects cycles)."""
    order: list[str] = []
    def visit(name: str) -> None:
        if name not in order:
            if parent := start_run(cfg, name):
                visit(parent)
            order.append(name)
    for name in runs:
        visit(name)
    return order


def world_and_model(cfg: StudyConfig) -> tuple[World, LlamaConfig]:
    """The config's synthetic world and model config."""
    world_overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.world.overrides.items()}
    return (build_world(get_world_config(cfg.world.preset, **world_overrides)),
            get_preset(cfg.model.preset, **cfg.model.overrides))


def pretrained(cfg: StudyConfig, st: Stages, world: World, mcfg: LlamaConfig) -> tuple[Params, dict[str, Any]]:
    """The ``pretrain`` stage (computed, or found done in ``st.out``): (params, its stage key)."""
    c = dataclasses.asdict(cfg)
    pre_key = {k: c[k] for k in ("seed", "world", "model", "pretrain")}
    return st.model("pretrain", pre_key, mcfg, world, lambda d: pretrain(cfg, world, mcfg, d)), pre_key


def finetune_keys(cfg: StudyConfig, pre_key: dict[str, Any], data_seed: int) -> dict[str, dict[str, Any]]:
    """Every fine-tuning run's stage key, in start order. Changing one method's settings changes that method's key
    alone (and the keys of the runs that start from it: a run's key holds its start model's key)."""
    runs, keys = finetune_runs(cfg), {}
    for name in _start_order(cfg, runs):
        method, lr = runs[name]
        parent = start_run(cfg, name)
        keys[name] = {**pre_key, "finetune": cfg.finetune.key_for(method), "lr": lr, "data_seed": data_seed,
                      "steps": cfg.finetune.steps_at(method, name.split("@", 1)[1]),
                      **({"start": keys[parent]} if parent else {})}
    return keys


def tuned_models(cfg: StudyConfig, st: Stages, world: World, mcfg: LlamaConfig, pre: Params,
                 keys: dict[str, dict[str, Any]], *, data_seed: int, runs: Sequence[str] | None = None
                 ) -> dict[str, Params]:
    """The ``finetune_<run>`` stages (``.seed<k>`` for a data seed other than the config's) of ``runs`` (default
    all, in the config's order) and of the runs they start from; returns the requested runs' params."""
    all_runs = finetune_runs(cfg)
    wanted = list(all_runs) if runs is None else list(runs)
    if unknown := [r for r in wanted if r not in all_runs]:
        raise ConfigError(f"study 1 runs {unknown}: the config runs {sorted(all_runs)}")
    needed: set[str] = set()
    for name in wanted:
        while name is not None and name not in needed:
            needed.add(name)
            name = start_run(cfg, name)
    tag = "" if data_seed == cfg.seed else f".seed{data_seed}"
    tuned: dict[str, Params] = {}
    for name in (n for n in _start_order(cfg, all_runs) if n in needed):
        method, lr = all_runs[name]
        init = tuned[parent] if (parent := start_run(cfg, name)) else pre
        tuned[name] = st.model(f"finetune_{name}{tag}", keys[name], mcfg, world,
                               lambda d, m=method, lr=lr, init=init, n=name: finetune(
                                   cfg, world, mcfg, init, m, lr, d, data_seed,
                                   cfg.finetune.steps_at(m, n.split("@", 1)[1])))
    return {name: tuned[name] for name in wanted}


@dataclasses.dataclass
class Study1Models:
    """Study 1's models as stages of one output folder (what later studies start from)."""

    world: World
    mcfg: LlamaConfig
    pre: Params
    pre_key: dict[str, Any]
    tuned: dict[str, Params]  # run name ("ssft@eta_M") -> params
    keys: dict[str, dict[str, Any]]  # run name -> its stage key (what a later stage built on it depends on)


def study1_models(cfg: StudyConfig, st: Stages, runs: Sequence[str] | None = None) -> Study1Models:
    """Study 1's pretrained model and fine-tuning runs ``runs`` (default all) at the config's seed, through ``st``
    with the names and keys study 1's runner gives them: a study 1 run in the same folder finds them done, and vice
    versa. Later studies start from these, never from copies."""
    world, mcfg = world_and_model(cfg)
    pre, pre_key = pretrained(cfg, st, world, mcfg)
    keys = finetune_keys(cfg, pre_key, cfg.seed)
    tuned = tuned_models(cfg, st, world, mcfg, pre, keys, data_seed=cfg.seed, runs=runs)
    return Study1Models(world, mcfg, pre, pre_key, tuned, keys)


def run(cfg: StudyConfig, out: str, seeds: list[int] | None = None) -> dict[str, Any]:
    """Every stage of the study into ``out``; returns the metrics written to ``metrics.json``.

    ``seeds`` (default ``[cfg.seed]``): data orders of the fine-tuning. Every seed re-runs the fine-tuning, the
    evaluation and the analyses from the same pretrained model on the same test sets (stages of a seed other than
    ``cfg.seed`` are named ``<stage>.seed<k>``); the metrics are the first seed's, plus ``metrics["seeds"]``: every
    acceptance and claim figure as mean ± spread over the seeds (``claims.aggregate_seeds``)."""
    t_start = time.perf_counter()
    seeds = [cfg.seed] if not seeds else list(dict.fromkeys(seeds))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:  # the resolved config
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    world, mcfg = world_and_model(cfg)
    sets = make_test_sets(world, cfg.world.n_test, np.random.default_rng([cfg.seed, 2]), cfg.world.grammars)
    st = Stages(out)
    pre, pre_key = pretrained(cfg, st, world, mcfg)
    per_seed = {s: seed_metrics(cfg, st, world, mcfg, sets, pre, pre_key, s) for s in seeds}
    metrics = dict(per_seed[seeds[0]])
    if len(seeds) > 1:
        metrics["seeds"] = claims.aggregate_seeds(per_seed)
    metrics["timing"] = {**st.timing, "total_this_invocation": time.perf_counter() - t_start}
    metrics["skipped_stages"] = st.skipped
    summary.write(out, cfg, world, mcfg, metrics)
    return metrics


def seed_metrics(cfg: StudyConfig, st: Stages, world: World, mcfg: LlamaConfig, sets: dict[str, SyntheticBatch],
                 pre: Params, pre_key: dict[str, Any], data_seed: int) -> dict[str, Any]:
    """Fine-tuning, evaluation and analyses with fine-tuning data order ``data_seed``: one run's metrics."""
    c = dataclasses.asdict(cfg)
    tag = "" if data_seed == cfg.seed else f".seed{data_seed}"
    # Changing one method's settings recomputes that method alone; the evaluation and analyses depend on every
    # model's stage key, so they follow any model that was recomputed.
    # A method that starts from another method's model depends on that model's key too.
    ft_keys = finetune_keys(cfg, pre_key, data_seed)
    eval_key = {**{k: v for k, v in c.items() if k not in ("name", "notes", "analysis")}, "models": ft_keys}
    analysis_key = {**eval_key, "analysis": c["analysis"]}
    tuned = tuned_models(cfg, st, world, mcfg, pre, ft_keys, data_seed=data_seed)
    models = {"pretrained": pre, **tuned}

    metrics: dict[str, Any] = {
        "data_seed": data_seed, "runs": run_budgets(cfg), "n_test": cfg.world.n_test,
        "n_examples": cfg.analysis.n_examples, "attack_n": cfg.analysis.attack_n,
        "training": {name: training_log(os.path.join(st.out, f"finetune_{name}{tag}", "history.json"))
                     for name in tuned}}
    # "format": 4 = verdicts kept, null_acc on the decision mask; result folders of earlier formats are recomputed.
    metrics["eval"] = st.json(f"evaluate{tag}", {**eval_key, "format": 4}, lambda: {
        name: synthetic_world.evaluate_sets(p, mcfg, sets, batch_size=cfg.eval.batch_size, verdicts=True)
        for name, p in tqdm(models.items(), desc="evaluate")})
    metrics["boundary"] = refusal_by_rule(world, sets, metrics["eval"])
    metrics.update(st.json(f"tau{tag}", analysis_key, lambda: tau_stage(cfg, mcfg, models, sets)))
    metrics["delta_w"] = st.json(f"delta_w{tag}", analysis_key, lambda: delta_w_stage(cfg, pre, tuned))
    metrics.update(st.json(f"lipschitz_row_space{tag}", {**analysis_key, "format": 2},
                           lambda: probes_stage(cfg, mcfg, pre, models, sets)))
    metrics["interpolation"] = st.json(f"interpolation{tag}", {**analysis_key, "format": 2},
                                       lambda: interpolation_stage(cfg, mcfg, pre, tuned, sets))
    metrics["attack"] = st.json(f"attack{tag}", analysis_key, lambda: attack_stage(cfg, mcfg, tuned, sets))
    return metrics


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (an argparse type)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds: give at least one integer, e.g. 0,1,2")
    return seeds


def main(argv: list[str] | None = None) -> None:
    parser = study_parser(__doc__, default="demo", configs="demo | quick | reference", example="pretrain.steps=500")
    parser.add_argument("--seeds", type=parse_seeds, default=None,
                        help="fine-tuning data orders, e.g. 0,1,2: every figure as mean ± spread (default: seed)")
    args = parser.parse_args(argv)
    run_study(args, load_config, run, seeds=args.seeds)


if __name__ == "__main__":
    main()
