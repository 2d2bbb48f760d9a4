"""Study 2 — security features, module robustness and module-wise learning rates (ML-LR, SWAT; Du et al. 2024,
arXiv 2410.04524) on the synthetic world.

    python -m experiments.study2_mllr.run --config quick|demo|PATH --out DIR [section.key=value ...]

Study 1's safety-tuned model (its pretrain and fine-tuning stages, through the shared stage cache in the same OUT) →
the security-feature probe (logistic regression on the last prompt token's residual stream, layer chosen on held-out
pairs of unsafe and safe inputs) → module robustness of every (module type, layer) under a controlled perturbation
→ the proxy-guided search (Mods_Robust) and the plans → benign fine-tuning on safe operator tasks only, under a
uniform lr, ML-LR and SWAT → the exact synthetic judge on every test set (harmfulness on unsafe inputs, each jailbreak
set's success, task accuracy on safe ones) and the probe's accuracy, before and after → ``OUT/study2_mllr/``
(report.md, metrics.json, heat map, mods_robust.json, the plans). Every model and result is a stage
(``OUT/study2_*``): a finished stage is never rerun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import yaml

from experiments.cli import run_study, study_parser
from experiments.study1_mechanics import run as study1
from experiments.study1_mechanics.config import StudyConfig
from experiments.study2_mllr import claims, report
from experiments.study2_mllr.config import Study2Config, load_config
from experiments.study4_antidote.run import epoch_batches
from safety_jax.analysis import probes, robustness
from safety_jax.analysis.activations import collect_activations
from safety_jax.data.synthetic import World
from safety_jax.data.synthetic_sets import (
    CORRECT,
    HARMFUL,
    SAFETY_KINDS,
    SyntheticBatch,
    concat_batches,
    decided_by_text,
    safe_twins,
    safety_batch,
)
from safety_jax.eval import synthetic_world
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params
from safety_jax.stages import Stages
from safety_jax.train import plans
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer, merge_params, split_trainable
from safety_jax.train.trainer import TrainConfig, train

log = logging.getLogger("study2")
STUDY = "study2_mllr"  # the report folder under OUT


@dataclasses.dataclass
class World2:
    """What every stage of one run shares."""

    cfg: Study2Config
    cfg1: StudyConfig
    world: World
    mcfg: LlamaConfig
    proxy: dict[str, SyntheticBatch]  # train / val / test: unsafe rows then safe rows
    test: dict[str, SyntheticBatch]  # every safety set
    benign: dict[str, np.ndarray]
    base_key: dict[str, Any]


def proxy_sets(cfg: Study2Config, world: World, grammars: list[int] | None) -> dict[str, SyntheticBatch]:
    """Probe data (spec item 1, synthetic form): unsafe inputs (label 1) and their benign twins (label 0) — the same
    text under operators safe for it — per split."""
    p = cfg.probe
    out = {}
    for i, (split, n) in enumerate((("train", p.n_train), ("val", p.n_val), ("test", p.n_test))):
        rng = np.random.default_rng([cfg.seed, 20, i])
        unsafe = safety_batch(world, "unsafe", n, rng, grammars)
        out[split] = concat_batches([unsafe, safe_twins(world, unsafe, rng)])
    return out


def proxy_data(batch: SyntheticBatch) -> robustness.ProxyData:
    """The robustness module's view of a proxy split: the inputs up to ``>`` (the last prompt token)."""
    return robustness.ProxyData(batch.tokens.astype(np.int32), np.ones_like(batch.tokens, np.int32),
                                batch.gt_pos.astype(np.int32), batch.is_unsafe.astype(np.int32))


def states(w: World2, params: Params, batch: SyntheticBatch) -> np.ndarray:
    """Residual stream after every block at ``>``: ``[L, N, D]``."""
    feats = collect_activations(params, w.mcfg, batch.tokens, capture="resid_post",
                                capture_positions=batch.gt_pos[:, None].astype(np.int32),
                                batch_size=w.cfg.eval.batch_size)["resid_post"]
    return feats[:, :, 0]


def probe_stage(w: World2, st: Stages, aligned: Params) -> tuple[probes.Probe, dict[str, Any]]:
    """Fit one probe per layer on the train split, choose the layer on val (or take ``probe.layer``), report test."""
    p = w.cfg.probe
    key = {"model": w.base_key, "probe": dataclasses.asdict(p), "seed": w.cfg.seed,
           "world": dataclasses.asdict(w.cfg1)["world"], "proxy": "safe_twins"}  # the proxy data's form

    def compute(d: str) -> None:
        y = {s: b.is_unsafe.astype(np.int32) for s, b in w.proxy.items()}
        x = {s: states(w, aligned, b) for s, b in w.proxy.items()}
        fitted = probes.fit_probes(x["train"], y["train"], l2=p.l2, steps=p.steps, lr=p.lr)
        best, val_acc, val_margin = probes.select_layer(fitted, x["val"], y["val"])
        layer = best if p.layer == "best" else int(p.layer)
        test_acc = np.asarray(probes.probe_accuracy(fitted, x["test"], y["test"]))
        test_margin = np.asarray(probes.probe_margin(fitted, x["test"], y["test"]))
        chosen = probes.take_layer(fitted, layer)
        right = np.asarray(probes.probe_logits(chosen, x["test"][layer]) > 0) == y["test"].astype(bool)
        by_text = decided_by_text(w.world, w.proxy["test"])  # rows a conditional operator makes unsafe or safe
        meta = {"accuracy_text_decided": float(right[by_text].mean()) if by_text.any() else None,
                "accuracy_ops_decided": float(right[~by_text].mean()) if (~by_text).any() else None,
                "n_text_decided": int(by_text.sum()),
                "layer": layer, "val_accuracy": val_acc.tolist(), "val_margin": val_margin.tolist(),
                "test_accuracy": test_acc.tolist(), "test_margin": test_margin.tolist(),
                "accuracy": float(test_acc[layer]), "margin": float(test_margin[layer])}
        probes.save_probe(chosen, os.path.join(d, "probe.safetensors"), meta)

    folder = st.run("study2_probe", key, compute)
    probe, meta = probes.load_probe(os.path.join(folder, "probe.safetensors"))
    return probe, {**meta, "key": key}


def benign_data(cfg: Study2Config, world: World, grammars: list[int] | None) -> dict[str, np.ndarray]:
    """``benign.n`` safe operator tasks with their answers (loss on the whole output region)."""
    b = safety_batch(world, "safe", cfg.benign.n, np.random.default_rng([cfg.seed, 21]), grammars)
    return {"tokens": b.transform, "loss_mask": b.loss_mask}


def robustness_stage(w: World2, st: Stages, aligned: Params, probe: probes.Probe, probe_meta: dict[str, Any]
                     ) -> dict[str, Any]:
    """R(m) of every (module, layer), the robustness order and the proxy-guided search's Mods_Robust."""
    r = w.cfg.robustness
    key = {"probe": probe_meta["key"], "robustness": dataclasses.asdict(r), "benign": w.cfg.benign.n}
    data, layer = proxy_data(w.proxy["test"]), int(probe_meta["layer"])

    def compute() -> dict[str, Any]:
        if r.perturbation == "gaussian":
            res = robustness.gaussian_robustness(aligned, w.mcfg, probe, data, layer, modules=r.modules, eps=r.eps,
                                                 seed=w.cfg.seed, chunk=r.chunk, batch_size=w.cfg.eval.batch_size)
        else:
            loss = make_sft_loss(w.mcfg)

            def tune(params: Params, rule: str) -> Params:
                fresh, _ = epoch_batches(w.benign, w.cfg.benign.batch_size, w.cfg.seed)
                return robustness.finetune_slice(params, rule, loss, fresh, steps=r.finetune_steps,
                                                 lr=r.finetune_lr, seed=w.cfg.seed)
            res = robustness.finetune_robustness(aligned, w.mcfg, probe, data, layer, tune, modules=r.modules,
                                                 batch_size=w.cfg.eval.batch_size)
        order = robustness.robustness_order(res, r.modules)
        chosen, accs = robustness.proxy_guided_search(
            aligned, w.mcfg, probe, data, layer, order, min_accuracy=res["base_accuracy"] - r.max_drop, eps=r.eps,
            seed=w.cfg.seed, stop_at_first_failure=r.stop_at_first_failure, batch_size=w.cfg.eval.batch_size)
        return {**res, "modules": r.modules, "order": order, "mods_robust": chosen, "search_accuracy": accs}

    return st.json("study2_robustness", key, compute)


def make_plan(w: World2, kind: str, mods_robust: list[list[Any]], steps: int) -> plans.Plan:
    pl, r = w.cfg.plan, w.cfg.robustness
    warm = int(round(pl.warmup_frac * steps)) if kind == "swat" else 0
    return plans.Plan(kind=kind, mods_robust=tuple((m, int(lay)) for m, lay in mods_robust), modules=tuple(r.modules),
                      num_layers=w.mcfg.num_hidden_layers, gamma=pl.gamma, reverse=pl.reverse, warmup_steps=warm)


def benign_finetune(w: World2, init: Params, plan: plans.Plan, out_dir: str) -> Params:
    """Benign fine-tuning of ``init`` under ``plan``: its phases in turn, the same data order for every plan."""
    b = w.cfg.benign
    batches, per_epoch = epoch_batches(w.benign, b.batch_size, w.cfg.seed)
    steps = b.epochs * per_epoch
    base = OptimConfig(lr=b.lr, schedule=b.schedule, total_steps=steps, weight_decay=b.weight_decay)
    params, history = init, []
    for n, ocfg in plans.phases(plan, base, steps):
        trainable, frozen = split_trainable(ocfg, params)
        state, h = train(make_sft_loss(w.mcfg), build_optimizer(ocfg, trainable), trainable, batches,
                         TrainConfig(steps=n, log_every=max(n // 5, 1), seed=w.cfg.seed), frozen=frozen)
        history.append(h)
        params = merge_params(state.params, frozen)
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history, f)
    return params


def evaluate(w: World2, params: Params, probe: probes.Probe, layer: int) -> dict[str, Any]:
    """Exact judge on every test set (harmful counts; correct answers on safe inputs) and the frozen probe's accuracy
    and margin on the proxy test split."""
    ev = synthetic_world.evaluate_sets(params, w.mcfg, w.test, batch_size=w.cfg.eval.batch_size, generation=True,
                                       verdicts=True)
    out: dict[str, Any] = {"sets": {}}
    for name, e in ev.items():
        v = np.asarray(e["verdicts"])
        out["sets"][name] = {"harmful_k": int((v == HARMFUL).sum()), "correct_k": int((v == CORRECT).sum()),
                             "n": len(v), "refused": e["refused"]}
    acc, margin = robustness.proxy_scores(params, w.mcfg, probe, proxy_data(w.proxy["test"]), layer,
                                          batch_size=w.cfg.eval.batch_size)
    out["probe_accuracy"], out["probe_margin"] = acc, margin
    return out


def setup(cfg: Study2Config, st: Stages) -> tuple[World2, Params]:
    cfg1 = cfg.study1_config()
    s1 = study1.study1_models(cfg1, st, [cfg.base_run])
    g = cfg1.world.grammars
    test = {kind: safety_batch(s1.world, kind, cfg.eval.n_test, np.random.default_rng([cfg.seed, 22, i]), g)
            for i, kind in enumerate(SAFETY_KINDS)}
    w = World2(cfg, cfg1, s1.world, s1.mcfg, proxy_sets(cfg, s1.world, g), test, benign_data(cfg, s1.world, g),
               s1.keys[cfg.base_run])
    return w, s1.tuned[cfg.base_run]


def run(cfg: Study2Config, out: str) -> dict[str, Any]:
    """Every stage of study 2 into ``out`` (shared with study 1); returns the metrics written to
    ``OUT/study2_mllr/metrics.json``."""
    t0 = time.perf_counter()
    folder = os.path.join(out, STUDY)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    st = Stages(out)
    w, aligned = setup(cfg, st)
    probe, probe_meta = probe_stage(w, st, aligned)
    layer = int(probe_meta["layer"])
    rob = robustness_stage(w, st, aligned, probe, probe_meta)
    b = cfg.benign
    steps = b.epochs * (b.n // b.batch_size)
    eval_key = {"eval": dataclasses.asdict(cfg.eval), "seed": cfg.seed, "probe": probe_meta["key"],
                "study1_world": dataclasses.asdict(w.cfg1)["world"]}
    rows: list[dict[str, Any]] = [{"plan": "aligned", **st.json(
        "study2_eval_aligned", {"model": w.base_key, **eval_key}, lambda: evaluate(w, aligned, probe, layer))}]
    saved, skipped = {}, {}
    for kind in b.plans:
        if kind == "swat" and not rob["mods_robust"]:
            skipped[kind] = "Mods_Robust is empty: SWAT has no module to warm up"
            continue
        plan = make_plan(w, kind, rob["mods_robust"], steps)
        plans.save_plan(plan, os.path.join(folder, f"plan_{kind}.json"),
                        {"robustness": dataclasses.asdict(cfg.robustness), "probe_layer": layer})
        saved[kind] = f"plan_{kind}.json"
        key = {"init": w.base_key, "benign": dataclasses.asdict(b) | {"plans": None}, "plan": plan.to_dict(),
               "seed": cfg.seed}
        tuned = st.model(f"study2_benign_{kind}", key, w.mcfg, w.world,
                         lambda d, p=plan: benign_finetune(w, aligned, p, d))
        rows.append({"plan": kind, **st.json(f"study2_eval_{kind}", {"model": key, **eval_key},
                                             lambda t=tuned: evaluate(w, t, probe, layer))})
    with open(os.path.join(folder, "mods_robust.json"), "w") as f:
        json.dump({"mods_robust": rob["mods_robust"], "order": rob["order"],
                   "search_accuracy": rob["search_accuracy"], "probe_layer": layer}, f, indent=1)
    metrics: dict[str, Any] = {
        "probe": {k: v for k, v in probe_meta.items() if k != "key"}, "min_probe_accuracy": cfg.probe.min_accuracy,
        "probe_n_test": cfg.probe.n_test,
        "robustness": {k: rob[k] for k in ("accuracy", "margin", "base_accuracy", "base_margin", "modules",
                                          "order", "mods_robust", "search_accuracy")},
        "rows": rows, "plans_saved": saved, "plans_skipped": skipped, "sets": list(SAFETY_KINDS),
        "n_test": cfg.eval.n_test, "min_n": cfg.eval.min_n, "steps": steps,
        "num_layers": w.mcfg.num_hidden_layers}
    metrics["claims"] = [dataclasses.asdict(cl) | {"verdict": cl.verdict}
                         for cl in claims.decide(metrics, permutations=cfg.eval.permutations, seed=cfg.seed)]
    metrics["timing"] = {**st.timing, "total_this_invocation": time.perf_counter() - t0}
    metrics["ran_stages"], metrics["skipped_stages"] = st.ran, st.skipped
    report.write(folder, cfg, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = study_parser(__doc__, default="demo", configs="quick | demo", example="benign.lr=1e-3").parse_args(argv)
    run_study(args, load_config, run, os.path.join(STUDY, "report.md"))


if __name__ == "__main__":
    main()
