"""Study 3 — the safety residual space (Pan et al. 2025, arXiv 2502.09674) on the synthetic world.

    python -m experiments.study3_residual.run --config quick|demo|PATH --out DIR [section.key=value ...]

Study 1's pretrained and safety-tuned models (its stages, shared in the same OUT) → last-prompt-token states of every
block on an analysis set of every safety set → per (before, after) pair: the shift, its SVD components, λ shares,
effective rank, activation norms, refusal prediction per layer (dominant component, best of N, random directions,
a logistic probe and its cosine with the dominant direction) → attribution (integrated gradients over input tokens,
promote / suppress heat map) → the intervention sweep (subtract α·v₀ after every block while generating) → attacks
crafted on the first pair's tuned model (trigger-token removal on the operators, GCG suffixes) → the exposure study
(SSFT with 0 … N examples of each attack family given refusal targets; the fraction of each attack caught) →
``OUT/study3_residual/`` (report.md, metrics.json, PNG plots). Every computation is a stage (``OUT/study3_*``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from experiments.cli import run_study, study_parser
from experiments.study1_mechanics import run as study1
from experiments.study3_residual import claims, report
from experiments.study3_residual import synthetic as syn
from experiments.study3_residual.config import JAILBREAKS, Study3Config, load_config
from safety_jax.analysis import attribution, probes, residual
from safety_jax.data.synthetic import PAD
from safety_jax.data.synthetic_sets import HARMFUL, SAFETY_KINDS, concat_batches, mixed_safety_batch, safety_batch
from safety_jax.eval.gcg import GCGConfig
from safety_jax.eval.synthetic_world import left_padded_prompts
from safety_jax.stages import Stages
from safety_jax.train import losses
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.trainer import TrainConfig, train

log = logging.getLogger("study3")
STUDY = "study3_residual"
RESIDUAL_FIELDS = 2  # bumped when residual_stage computes new fields, so finished stages are recomputed


@dataclasses.dataclass
class Ctx:
    """What every stage of one run shares."""

    cfg: Study3Config
    cfg1: Any
    s1: Any  # study1.Study1Models
    models: dict[str, Any]
    keys: dict[str, Any]
    sets: dict[str, Any]

    @property
    def world(self) -> Any:
        return self.s1.world

    @property
    def mcfg(self) -> Any:
        return self.s1.mcfg

    def batch(self) -> int:
        return self.cfg.eval.batch_size

    def rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, 3, *tags])


# ---------------------------------------------------------------------------------------------------- residual
def residual_stage(c: Ctx, before: str, after: str) -> dict[str, Any]:
    """Shift, components, effective rank, norms and refusal prediction of one (before, after) pair."""
    cfg = c.cfg
    merged = concat_batches(list(c.sets.values()))
    prompts, mask = left_padded_prompts(merged)
    x = syn.last_states(c.models[before], c.mcfg, prompts, mask, batch_size=c.batch())
    y = syn.last_states(c.models[after], c.mcfg, prompts, mask, batch_size=c.batch())
    shift = residual.representation_shift(jnp.asarray(x), jnp.asarray(y), cfg.shift.variant)
    comp = residual.shift_components(shift)
    labels = syn.refused(syn.verdicts(c.models[after], c.mcfg, merged, prompts, mask, batch_size=c.batch()))
    pred_after = residual.refusal_prediction(y, comp.directions, labels, top=cfg.shift.top)
    pred_before = residual.refusal_prediction(x, comp.directions, labels, top=cfg.shift.top)
    n_layers, n, d = y.shape
    rand = residual.random_directions(jax.random.key(cfg.seed), n_layers, cfg.shift.n_random, d)
    rand_acc = residual.refusal_prediction(y, rand, labels, top=cfg.shift.n_random)["per_component"]
    k = min(cfg.shift.top, comp.directions.shape[1], cfg.shift.n_random)
    out: dict[str, Any] = {
        "before": before, "after": after, "n": int(n), "refusal_rate": float(labels.mean()),
        "share": np.asarray(comp.share), "variances": np.asarray(comp.variances),
        "effective_rank": residual.effective_rank(comp.share, cfg.shift.thresholds),
        "thresholds": cfg.shift.thresholds,
        "norms": residual.activation_norms(x, y, shift),
        "dominant_acc": pred_after["dominant"], "best_acc": pred_after["best"], "best_index": pred_after["best_index"],
        "dominant_acc_before": pred_before["dominant"],
        "random_acc_mean": rand_acc.mean(-1), "random_acc_q95": np.quantile(rand_acc, 0.95, axis=-1),
        "random_best_of_n": rand_acc[:, :k].max(-1), "best_of": k,
        "directions": np.asarray(comp.directions[:, 0]),
        "sigma": np.asarray(comp.singular_values[:, 0]) / np.sqrt(n),
        "threshold": np.quantile(np.asarray(residual.component_scores(jnp.asarray(y), comp.directions[:, :1]))[:, 0],
                                 1.0 - labels.mean(), axis=-1),
    }
    # the difference-in-means refusal direction (Arditi et al.; unsafe-labelled minus safe inputs, float64) and its
    # agreement with the dominant component
    dim = residual.difference_in_means(y[:, merged.is_unsafe], y[:, ~merged.is_unsafe])
    out["dim_cosine"] = residual.cosine(dim, comp.directions[:, 0])
    dim_unit = (dim / np.linalg.norm(dim, axis=-1, keepdims=True))[:, None].astype(np.float32)
    out["dim_acc"] = residual.refusal_prediction(y, dim_unit, labels, top=1)["dominant"]
    # a null-shape baseline for the spectrum: the leading share of an isotropic Gaussian matrix of the same shape
    noise = jax.random.normal(jax.random.key(cfg.seed + 1), (1, n, d))
    out["noise_top_share"] = float(residual.shift_components(noise).share[0, 0])
    if 0 < labels.sum() < len(labels) - 1:
        train_idx, test_idx = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
        if 0 < labels[train_idx].sum() < train_idx.sum():
            p = cfg.probe
            probe = probes.fit_probes(y[:, train_idx], labels[train_idx].astype(np.int32), l2=p.l2, steps=p.steps,
                                      lr=p.lr)
            out["probe_acc"] = np.asarray(probes.probe_accuracy(probe, y[:, test_idx], labels[test_idx]))
            out["probe_cosine"] = residual.cosine(probes.probe_direction(probe), comp.directions[:, 0])
            out["dominant_acc_heldout"] = np.asarray(residual.percentile_accuracy(
                residual.component_scores(jnp.asarray(y[:, test_idx]), comp.directions[:, :1])[:, 0],
                jnp.asarray(labels[test_idx])))
    return out


# ---------------------------------------------------------------------------------------------------- attribution
def attribution_stage(c: Ctx, res: dict[str, Any]) -> dict[str, Any]:
    """Integrated-gradients relevance of the input tokens (by role) and the promote / suppress heat map, for the last
    layer's dominant component on unsafe inputs, in the first pair's tuned model."""
    a = c.cfg.attribution
    params, layer = c.models[res["after"]], c.mcfg.num_hidden_layers - 1
    batch = c.sets["unsafe"].take(slice(0, a.n))
    prompts, mask = left_padded_prompts(batch)
    v = jnp.asarray(res["directions"])
    ig, delta = attribution.integrated_gradients(params, jnp.asarray(prompts), jnp.asarray(mask), v[layer],
                                                 config=c.mcfg, layer=layer, steps=a.ig_steps, baseline_token=PAD)
    ig, delta = np.asarray(ig, np.float64), np.asarray(delta, np.float64)
    p = prompts.shape[1]
    start = p - (batch.gt_pos + 1)
    k = batch.ops.shape[1]
    col = np.arange(p)[None, :]
    roles = {"operators": (col > start[:, None]) & (col <= start[:, None] + k),
             "text": (col > start[:, None] + k + 1) & (col < p - 1),
             "structure": mask.astype(bool) & ((col == start[:, None]) | (col == start[:, None] + k + 1)
                                               | (col == p - 1))}
    total = np.abs(ig).sum(1, keepdims=True)
    share = {r: float(np.mean((np.abs(ig) * m).sum(1) / np.maximum(total[:, 0], 1e-12))) for r, m in roles.items()}
    sources = _sources(c, res, a.components)
    heat = attribution.component_scores(params, jnp.asarray(prompts), jnp.asarray(mask), v[layer], sources,
                                        config=c.mcfg, layer=layer)
    return {"layer": layer, "relevance_share": share, "completeness_error": float(
        np.max(np.abs(ig.sum(1) - delta) / np.maximum(np.abs(delta), 1e-12))), "heat": np.asarray(heat),
        "n": len(batch)}


def _sources(c: Ctx, res: dict[str, Any], k: int) -> jax.Array:
    """The first ``k`` shift components of every layer of the pair (recomputed from the states: cheap)."""
    merged = concat_batches(list(c.sets.values()))
    prompts, mask = left_padded_prompts(merged)
    x = syn.last_states(c.models[res["before"]], c.mcfg, prompts, mask, batch_size=c.batch())
    y = syn.last_states(c.models[res["after"]], c.mcfg, prompts, mask, batch_size=c.batch())
    shift = residual.representation_shift(jnp.asarray(x), jnp.asarray(y), c.cfg.shift.variant)
    return residual.shift_components(shift, k=k).directions


# ---------------------------------------------------------------------------------------------------- intervention
def intervention_stage(c: Ctx, res: dict[str, Any]) -> list[dict[str, Any]]:
    """Refusal, harmful answers and benign perplexity as α grows (first pair's tuned model)."""
    iv = c.cfg.intervention
    params = c.models[res["after"]]
    dirs, scale = np.asarray(res["directions"]), np.asarray(res["sigma"])
    kinds = ["safe", "unsafe", *JAILBREAKS]
    small = {k: c.sets[k].take(slice(0, iv.n)) for k in kinds}
    merged = concat_batches(list(small.values()))
    prompts, mask = left_padded_prompts(merged)
    bounds = np.cumsum([0] + [len(b) for b in small.values()])
    rows = []
    for alpha in iv.alphas:
        v = syn.verdicts(params, c.mcfg, merged, prompts, mask, batch_size=c.batch(),
                         interventions=syn.dominant_intervention(dirs, scale, alpha, iv.mode) if alpha else ())
        row: dict[str, Any] = {"alpha": alpha}
        for i, kind in enumerate(kinds):
            part = v[bounds[i]:bounds[i + 1]]
            row[f"{kind}_refused_k"] = int(syn.refused(part).sum())
            row[f"{kind}_harmful_k"] = int((part == HARMFUL).sum())
            row[f"{kind}_n"] = len(part)
        row["benign_ppl"] = syn.benign_perplexity(params, c.mcfg, small["safe"], dirs, scale, alpha,
                                                  batch_size=c.batch(), mode=iv.mode)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- attacks
def attack_stage(c: Ctx, res: dict[str, Any]) -> dict[str, Any]:
    """Trigger removal and GCG suffixes crafted on the first pair's tuned model, for the test inputs and for the
    exposure study's training pool (unsafe inputs distinct from both)."""
    at, params = c.cfg.attack, c.models[res["after"]]
    layer = c.mcfg.num_hidden_layers - 1
    out: dict[str, Any] = {}
    gcg = GCGConfig(steps=at.gcg_steps, top_k=at.gcg_top_k, num_candidates=at.gcg_candidates, seed=c.cfg.seed)
    for name, batch in attack_inputs(c).items():
        trig, stats = syn.trigger_attack(c.world, params, c.mcfg, batch, np.asarray(res["directions"])[layer],
                                         layer=layer, threshold=float(res["threshold"][layer]),
                                         rounds=at.trigger_rounds, batch_size=c.batch())
        suffix, loss = syn.gcg_suffixes(params, c.mcfg, batch, gcg, at.gcg_suffix)
        out[name] = {"trigger_ops": trig.ops, "trigger_edits": stats["edits"], "trigger_start": stats["start"],
                     "trigger_end": stats["end"], "gcg_suffix": suffix, "gcg_loss": loss}
    return out


def attack_inputs(c: Ctx) -> dict[str, Any]:
    g = c.cfg1.world.grammars
    n_pool = max(c.cfg.exposure.counts)
    return {"test": safety_batch(c.world, "unsafe", c.cfg.eval.n_test, c.rng(40), g),
            **({"pool": safety_batch(c.world, "unsafe", n_pool, c.rng(41), g)} if n_pool else {})}


def family_sets(c: Ctx, attacks: dict[str, Any], which: str, n: int) -> dict[str, tuple[Any, Any]]:
    """Per attack family: (batch, sft rows or prompts) — ``which`` "test" (prompts, masks for evaluation) or "pool"
    (the first ``n`` training rows with refusal targets)."""
    g = c.cfg1.world.grammars
    base = attack_inputs(c)[which].take(slice(0, n))
    a = attacks[which]
    trig = syn.with_ops(c.world, base, np.asarray(a["trigger_ops"], np.int32)[:n])
    suffix = np.asarray(a["gcg_suffix"], np.int32)[:n]
    out: dict[str, tuple[Any, Any]] = {}
    for i, kind in enumerate(JAILBREAKS):
        b = safety_batch(c.world, kind, n, c.rng(50 if which == "pool" else 60, i), g)
        out[kind] = (b, b.sft() if which == "pool" else left_padded_prompts(b))
    out["trigger_removal"] = (trig, trig.sft() if which == "pool" else left_padded_prompts(trig))
    out["gcg"] = (base, syn.suffixed_sft(base, suffix) if which == "pool" else syn.suffixed_prompts(base, suffix))
    if which == "test":
        out["unsafe"] = (base, left_padded_prompts(base))
        safe = safety_batch(c.world, "safe", n, c.rng(61), g)
        out["safe"] = (safe, left_padded_prompts(safe))
    return out


# ---------------------------------------------------------------------------------------------------- exposure
def exposure_model(c: Ctx, res: dict[str, Any], attacks: dict[str, Any], count: int, folder: str) -> Any:
    """SSFT (study 1's settings at the first pair's learning rate) with ``count`` examples of each family mixed in:
    each batch is study 1's plus ``rows_per_batch`` rows drawn from the pool (standard rows at count 0)."""
    ex, cfg1 = c.cfg.exposure, c.cfg1
    pool = None
    if count:
        fams = family_sets(c, attacks, "pool", count)
        pool = syn.concat_sft([fams[f][1] for f in ex.families])
    num = c.cfg.attack.gcg_suffix
    length = c.world.config.seq_len + num

    def make(i: int) -> dict[str, np.ndarray]:
        # every exposure trains on batches of one size: without a pool the extra rows are standard safe / unsafe ones
        parts = [study1.method_batch(cfg1, c.world, "ssft", i, data_seed=c.cfg.seed + 1000)]
        if pool is not None:
            idx = c.rng(51, i).integers(0, len(pool["tokens"]), ex.rows_per_batch)
            parts.append({k: v[idx] for k, v in pool.items()})
        else:
            f1 = cfg1.finetune.for_method("ssft")
            parts.append(mixed_safety_batch(c.world, ex.rows_per_batch, f1.unsafe_frac, c.rng(52, i),
                                            cfg1.world.grammars, second_segment_refusal=f1.second_segment_refusal
                                            ).sft())
        return syn.pad_sft(syn.concat_sft(parts), length)

    run = res["after"]
    _, lr = study1.finetune_runs(cfg1)[run]
    f = cfg1.finetune.for_method("ssft")
    init = c.models[run] if ex.start == "aligned" else c.models["pretrained"]
    ocfg = OptimConfig(lr=lr, schedule=f.schedule, warmup_steps=min(f.warmup_steps, ex.steps // 4),
                       total_steps=ex.steps, weight_decay=f.weight_decay)
    state, _ = train(losses.make_sft_loss(c.mcfg), build_optimizer(ocfg, init), init, study1.StepBatches(make),
                     TrainConfig(steps=ex.steps, log_every=max(ex.steps // 5, 1), seed=c.cfg.seed))
    return state.params


def exposure_eval(c: Ctx, params: Any, attacks: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for fam, (batch, (prompts, mask)) in family_sets(c, attacks, "test", c.cfg.eval.n_test).items():
        v = syn.verdicts(params, c.mcfg, batch, prompts, mask, batch_size=c.batch())
        out[fam] = {"caught_k": int(syn.refused(v).sum()), "harmful_k": int((v == HARMFUL).sum()), "n": len(v)}
    return out


# ---------------------------------------------------------------------------------------------------- main
def setup(cfg: Study3Config, st: Stages) -> Ctx:
    cfg1 = cfg.study1_config()
    s1 = study1.study1_models(cfg1, st, cfg.study1_runs())
    g, n = cfg1.world.grammars, cfg.eval.n_per_set
    sets = {kind: safety_batch(s1.world, kind, n, np.random.default_rng([cfg.seed, 3, 30, i]), g)
            for i, kind in enumerate(SAFETY_KINDS)}
    return Ctx(cfg, cfg1, s1, {"pretrained": s1.pre, **s1.tuned}, {"pretrained": s1.pre_key, **s1.keys}, sets)


def run(cfg: Study3Config, out: str) -> dict[str, Any]:
    """Every stage of study 3 into ``out`` (shared with study 1); returns the metrics written to
    ``OUT/study3_residual/metrics.json``."""
    t0 = time.perf_counter()
    os.makedirs(os.path.join(out, STUDY), exist_ok=True)
    with open(os.path.join(out, STUDY, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    st = Stages(out)
    c = setup(cfg, st)
    d = cfg.to_dict()
    data_key = {"seed": cfg.seed, "eval": d["eval"], "study1_world": dataclasses.asdict(c.cfg1)["world"]}
    pairs = {}
    for before, after in cfg.shift.pairs:
        name = f"{before}->{after}"
        key = {"models": [c.keys[before], c.keys[after]], "shift": d["shift"], "probe": d["probe"], **data_key,
               "fields": RESIDUAL_FIELDS}
        pairs[name] = st.json(f"study3_residual_{before}-{after}", key,
                              lambda b=before, a=after: residual_stage(c, b, a))
    first = pairs[next(iter(pairs))]
    first_key = {"models": [c.keys[first["before"]], c.keys[first["after"]]], "shift": d["shift"], **data_key}
    attrib = st.json("study3_attribution", {**first_key, "attribution": d["attribution"], "baseline_token": PAD},
                     lambda: attribution_stage(c, first))
    sweep = st.json("study3_intervention", {**first_key, "intervention": d["intervention"]},
                    lambda: intervention_stage(c, first))
    attack_key = {**first_key, "attack": d["attack"], "pool": max(cfg.exposure.counts)}
    attacks = st.json("study3_attacks", attack_key, lambda: attack_stage(c, first))
    exposure = []
    ex_key = {k: v for k, v in d["exposure"].items() if k != "counts"}
    for count in cfg.exposure.counts:
        mkey = {**attack_key, "exposure": ex_key, "count": count, "start": c.keys[first["after"]]}
        params = st.model(f"study3_exposure_n{count}", mkey, c.mcfg, c.world,
                          lambda folder, n=count: exposure_model(c, first, attacks, n, folder))
        caught = st.json(f"study3_exposure_eval_n{count}", {"model": mkey, **data_key},
                         lambda p=params: exposure_eval(c, p, attacks))
        exposure.append({"count": count, **caught})
    metrics: dict[str, Any] = {
        "pairs": {k: {f: v for f, v in r.items() if f != "directions"} for k, r in pairs.items()},
        "attribution": attrib, "intervention": sweep, "exposure": exposure,
        "attack_stats": {k: {"trigger_edits_mean": float(np.mean(v["trigger_edits"])),
                             "trigger_projection_drop": float(np.mean(np.asarray(v["trigger_start"])
                                                                      - np.asarray(v["trigger_end"]))),
                             "gcg_loss_mean": float(np.mean(v["gcg_loss"]))} for k, v in attacks.items()},
        "families": cfg.exposure.families, "min_n": cfg.eval.min_n,
    }
    metrics["claims"] = [dataclasses.asdict(cl) | {"verdict": cl.verdict} for cl in claims.decide(metrics)]
    metrics["timing"] = {**st.timing, "total_this_invocation": time.perf_counter() - t0}
    metrics["ran_stages"], metrics["skipped_stages"] = st.ran, st.skipped
    report.write(os.path.join(out, STUDY), cfg, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = study_parser(__doc__, default="demo", configs="quick | demo", example="exposure.counts=[0,40]"
                        ).parse_args(argv)
    run_study(args, load_config, run, os.path.join(STUDY, "report.md"))


if __name__ == "__main__":
    main()
