"""Study 1's report: what the run shrank, acceptance checks, each claim with its numbers, tables and plots.

Built on the library's one report writer (``safety_jax.report.Report``): ``report.md``, ``metrics.json`` and PNGs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from experiments.study1_mechanics.claims import (
    JAILBREAKS,
    MLP_MODULES,
    acceptance,
    acceptance_reading,
    assess_claims,
    finetuned,
)
from experiments.study1_mechanics.config import StudyConfig
from safety_jax.data.synthetic import World, get_world_config
from safety_jax.data.synthetic_sets import SAFETY_KINDS
from safety_jax.model.config import LlamaConfig, get_preset
from safety_jax.model.llama import LINEAR_MODULES
from safety_jax.report import Report, line_panels

SETS = SAFETY_KINDS  # safe, unsafe, then the jailbreak families


def _shrink_note(cfg: StudyConfig, world: World, mcfg: LlamaConfig) -> str:
    """What this config runs against the reference (Jain et al.: 6 layers, width 192, 100k steps of batch 512)."""
    ref_world = get_world_config("reference")
    ref_model = get_preset("synthetic")
    diff_world = {f.name: (getattr(ref_world, f.name), getattr(world.config, f.name))
                  for f in dataclasses.fields(ref_world) if getattr(ref_world, f.name) != getattr(world.config, f.name)}
    diff_model = {f: (getattr(ref_model, f), getattr(mcfg, f)) for f in
                  ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
                  if getattr(ref_model, f) != getattr(mcfg, f)}
    p, ft = cfg.pretrain, cfg.finetune
    mix = (f"{ft.unsafe_frac:.0%} all-unsafe batches" if ft.batch_mix == "per_batch"
           else f"{ft.unsafe_frac:.0%} unsafe rows in every batch")
    lines = [
        f"- Config `{cfg.name}`. {cfg.notes}".rstrip(),
        f"- World: preset `{cfg.world.preset}`" + (", changed vs reference: " + ", ".join(
            f"{k} {a}→{b}" for k, (a, b) in diff_world.items()) if diff_world else " (the reference)") +
        f"; {cfg.world.n_test} examples per test set.",
        f"- Model: Llama (RMSNorm, RoPE, SwiGLU) instead of the reference minGPT — "
        f"{mcfg.num_hidden_layers} layers, width {mcfg.hidden_size}, MLP {mcfg.intermediate_size}, "
        f"{mcfg.num_attention_heads} heads ({mcfg.num_params() / 1e6:.2f} M parameters)" +
        ("; changed vs the `synthetic` preset: " + ", ".join(f"{k} {a}→{b}" for k, (a, b) in diff_model.items())
         if diff_model else "") + ".",
        f"- Pretraining: {p.steps} steps of batch {p.batch_size}, AdamW (0.9, 0.95) lr {p.lr:g} warmup "
        f"{p.warmup_steps} + cosine, wd {p.weight_decay:g} (reference: 100k steps of batch 512, lr 1e-3).",
        f"- Safety fine-tuning: {', '.join(ft.methods)} at " +
        ", ".join(f"{k} = {v:g}" for k, v in ft.lrs.items()) +
        ("; learning rate × " + ", ".join(f"{v:g} for {m}" for m, v in ft.lr_scale.items()) if ft.lr_scale else "") +
        f" (reference η_M = 1e-4, η_S = 1e-5); {ft.steps} steps of batch {ft.batch_size}" +
        f", {mix}" + "".join(f"; for {m}: " + ", ".join(f"{k} {v}" for k, v in o.items())
                             for m, o in ft.method_overrides.items()) + "; "
        f"DPO β_w = {ft.beta_chosen}, β_l = {ft.beta_rejected} (study "
        f"variant, log-likelihood / (T−1)); standard DPO β = {ft.beta_standard} (sigmoid, summed log-probs"
        f"{f' + {ft.rpo_alpha:g}·NLL(chosen)' if ft.rpo_alpha else ''}); "
        f"unlearning ℓ(chosen) − {ft.rejected_weight}·ℓ(rejected).",
        f"- Analyses: τ window `>` + {cfg.analysis.tau_width - 1} positions; ΔW top {cfg.analysis.top_k} directions vs "
        f"the pretrained {cfg.analysis.energy:.0%}-energy column space; α ∈ {cfg.analysis.alphas}; Lipschitzness, "
        f"row space and α-interpolation on {cfg.analysis.n_examples} examples per set; soft-token attack on "
        f"{cfg.analysis.attack_n} unsafe inputs, k ∈ {cfg.analysis.attack_num_soft}, up to "
        f"{cfg.analysis.attack_rounds * cfg.analysis.attack_steps_per_round} steps (lr {cfg.analysis.attack_lr}).",
    ]
    return "\n".join(lines)


def _eval_table(metrics: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    return [{"model": m, **{s: metrics["eval"][m][s].get(metric) for s in SETS}} for m in metrics["eval"]]


def write(out: str, cfg: StudyConfig, world: World, mcfg: LlamaConfig, metrics: dict[str, Any]) -> None:
    """Write ``report.md``, ``metrics.json`` and the plots of one run into ``out``."""
    rep = Report(out, f"Study 1 — safety fine-tuning mechanics (Jain et al. 2024), config `{cfg.name}`")
    claims = assess_claims(metrics)
    checks = acceptance(metrics)
    rep.metrics.update(config=dataclasses.asdict(cfg), **metrics,
                       claims=[dataclasses.asdict(c) for c in claims], acceptance=checks)
    timing = metrics["timing"]
    total = sum(v for k, v in timing.items() if k != "total_this_invocation")
    rep.section("This run", _shrink_note(cfg, world, mcfg) +
                f"\n- Wall time of the stages: {total:.0f} s (" +
                ", ".join(f"{k} {v:.0f} s" for k, v in timing.items() if k != "total_this_invocation") + ")." +
                (f" Skipped (done before): {', '.join(metrics['skipped_stages'])}." if metrics["skipped_stages"]
                 else ""))

    rep.section("Claims", "Each claim of the paper, decided from this run's numbers (a claim that does not hold is "
                "reported as such, not tuned away).")
    rep.text("\n".join(f"{i + 1}. {c.line()}" for i, c in enumerate(claims)))
    rep.section("Acceptance checks")
    rep.table([{**r, "pass": "PASS" if r["pass"] else "FAIL"} for r in checks], ["check", "value", "target", "pass"])
    rep.text("_Reading:_ " + acceptance_reading(metrics, checks))

    rep.section("Accuracy and judged generations (methods × test sets)",
                "Teacher-forced token accuracy on the output positions against the true transformation (instruct) "
                "and against the refusal (null); greedy generations judged exactly (refused: first segment all "
                "null letters; harmful: an unsafe input answered with its exact transformation).")
    for metric, caption in (("instruct_acc", "Instruct accuracy"), ("null_acc", "Null (refusal) accuracy"),
                            ("refused", "Generated: refused"), ("harmful", "Generated: harmful"),
                            ("correct", "Generated: correct (safe inputs answered right)"),
                            ("other", "Generated: other")):
        rep.table(_eval_table(metrics, metric), ["model", *SETS], caption=f"**{caption}**")

    rep.section("Refusal by what decides the label",
                "Standard sets split into inputs whose operators alone make them safe or unsafe and inputs with "
                "conditional operators only, whose label is the text's family (safe- or unsafe-dominant): a model "
                "that does not read the family must guess on the second group.")
    rep.table([{"model": m, **{f"{kind} refused, by {rule.replace('_', ' ')} (n={r['n']})": r["refused"]
                               for kind in ("safe", "unsafe") for rule, r in metrics["boundary"][m][kind].items()}}
               for m in metrics["boundary"]])

    rep.section("τ cluster separation (analysis 1)",
                "τ(x) = ‖f − μ_unsafe‖ − ‖f − μ_safe‖ per layer, f the MLP hidden activation averaged over `>` and the "
                "next positions, class means from each model's own standard safe / unsafe sets; positive = closer to "
                "the safe cluster. Table: τ averaged over layers; separation = mean τ(safe) − mean τ(unsafe).")
    rep.table([{"model": m, **{s: float(np.mean(metrics["tau"][m][s]["mean"])) for s in SETS},
                "separation": float(np.mean(metrics["separation"][m])),
                "separation (last layer)": metrics["separation"][m][-1]} for m in metrics["tau"]],
              ["model", *SETS, "separation", "separation (last layer)"])
    layers = np.arange(mcfg.num_hidden_layers)
    rep.plot("tau_per_layer", line_panels(
        {m: {s: (layers, metrics["tau"][m][s]["mean"], metrics["tau"][m][s]["std"]) for s in SETS}
         for m in metrics["tau"]}, xlabel="layer", ylabel="τ (mean ± std)", hline=0.0),
        caption="τ per layer for every test set, one panel per model")

    ft = finetuned(metrics)
    rep.section("ΔW versus the pretrained column space (analysis 2)",
                "For every linear matrix and layer: SVD of ΔW = W_ft − W_pre (HF orientation [out, in]); sin θ of its "
                f"top {cfg.analysis.top_k} left singular vectors against the span of the pretrained weight's top "
                f"singular vectors holding {cfg.analysis.energy:.0%} of its energy (1 = entirely outside). Done on ΔW "
                "and on columns of U, correcting the reference script (which decomposes W_ft and indexes rows). "
                "'random' = sin θ expected for a random direction, sqrt(1 − rank/out).")
    rep.table([{"model": m, "module": mod, "sin θ (mean top-k)": metrics["delta_w"][m][mod]["sin_theta_mean"],
                "sin θ (top-1)": metrics["delta_w"][m][mod]["sin_theta_top1"],
                "random": metrics["delta_w"][m][mod]["random_baseline"],
                "‖ΔW‖/‖W‖": float(np.mean(metrics["delta_w"][m][mod]["relative_norm"]))}
               for m in ft for mod in LINEAR_MODULES])
    rep.plot("sin_theta_spectra", line_panels(
        {mod: {m: (np.arange(1, len(metrics["delta_w"][m][mod]["sin_theta_by_rank"]) + 1),
                   metrics["delta_w"][m][mod]["sin_theta_by_rank"]) for m in ft} for mod in LINEAR_MODULES},
        xlabel="singular direction i of ΔW", ylabel="sin θ (mean over layers)", ncols=4),
        caption="sin θ of ΔW's top singular directions, per matrix")

    rep.section("Row-space alignment and local Lipschitzness (analyses 3, 4)",
                "Row space: singular-value-weighted |cos| between the MLP input at `>` and the right singular vectors "
                "of the pretrained gate / up weights (mean over layers). Lipschitzness: ‖∂ max-logit at `>` / ∂ input "
                "embeddings‖ (mean).")
    rep.table([{"model": m, **{f"{mod} {s}": float(np.mean(metrics["row_space"][m][mod][s]))
                               for mod in ("mlp.gate", "mlp.up") for s in ("safe", "unsafe")},
                "lipschitz safe": metrics["lipschitz"][m]["safe"],
                "lipschitz unsafe": metrics["lipschitz"][m]["unsafe"]}
               for m in metrics["row_space"]])

    rep.section("Interpolation along ΔW (analysis 5)", "W_pre + α·ΔW; α = 0 is the pretrained model, α = 1 the "
                "fine-tuned one.")
    rep.table([{"model": m, **r} for m in ft for r in metrics["interpolation"][m]])
    rep.plot("accuracy_vs_alpha", line_panels(
        {m: {key: ([r["alpha"] for r in metrics["interpolation"][m]], [r[key] for r in metrics["interpolation"][m]])
             for key in ("safe_instruct_acc", "unsafe_null_acc", "unsafe_refused", "unsafe_harmful")} for m in ft},
        xlabel="α", ylabel="rate"), caption="Accuracy and refusal along W_pre + α·ΔW")
    rep.plot("separation_vs_alpha", line_panels(
        {"separation": {m: ([r["alpha"] for r in metrics["interpolation"][m]],
                            [r["separation"] for r in metrics["interpolation"][m]]) for m in ft}},
        xlabel="α", ylabel="τ separation (mean over layers)"), caption="τ separation along W_pre + α·ΔW")

    rep.section("Adversarial soft tokens (analysis 6)",
                "k embedding vectors inserted before `>`, optimised toward the harmful completion (normalised "
                "gradient steps, kept within the mean token-embedding norm). Success = the whole harmful completion "
                "is the teacher-forced argmax (greedy decoding reproduces it); first token harmful = the refusal "
                "decision is flipped; τ of the attacked inputs, mean over "
                "layers, against the model's safe / unsafe class means.")
    rep.table([{"model": m, "k": r["num_soft"], "steps": r["steps"], "success": r["success"],
                "first token harmful": r["first_token_success"], "target acc": r["target_acc"],
                "τ": float(np.mean(r["tau_mean"]))}
               for m in ft for r in metrics["attack"][m]])
    panels: dict[str, Any] = {}
    for m in ft:
        rows = metrics["attack"][m]
        ks = sorted({r["num_soft"] for r in rows})
        pick = lambda k, key: ([r["steps"] for r in rows if r["num_soft"] == k],
                               [key(r) for r in rows if r["num_soft"] == k])
        panels[f"{m}: success / first token harmful"] = {
            **{f"k={k}": pick(k, lambda r: r["success"]) for k in ks},
            **{f"k={k} first token": pick(k, lambda r: r["first_token_success"]) for k in ks}}
        panels[f"{m}: τ"] = {f"k={k}": pick(k, lambda r: float(np.mean(r["tau_mean"]))) for k in ks}
    rep.plot("attack_strength", line_panels(panels, xlabel="attack steps", ylabel="success / τ", ncols=2),
             caption="Attack success and τ as the number of soft tokens k and of steps grow")
    rep.metrics["jailbreak_sets"] = list(JAILBREAKS)
    rep.metrics["mlp_modules"] = list(MLP_MODULES)
    rep.write()
