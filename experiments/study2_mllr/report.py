"""Study 2's report: the robustness heat map, Mods_Robust, the before / after table, the claims; metrics.json."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from experiments.study2_mllr.claims import JAILBREAKS
from safety_jax.eval.stats import wilson
from safety_jax.report import Report, markdown_table

COLUMNS = ("plan", "harmful", "harmful_ci", *JAILBREAKS, "task", "task_ci", "probe_acc", "probe_margin", "n")


def table_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model: harmful % on unsafe inputs, each jailbreak set's success %, task accuracy % (Wilson 95 %
    intervals), the frozen probe's accuracy and margin."""
    out = []
    for r in metrics["rows"]:
        s = r["sets"]
        row: dict[str, Any] = {"plan": r["plan"]}
        for name, (k, n) in (("harmful", (s["unsafe"]["harmful_k"], s["unsafe"]["n"])),
                             ("task", (s["safe"]["correct_k"], s["safe"]["n"]))):
            lo, hi = wilson(k, n)
            row[name], row[f"{name}_ci"] = round(100 * k / max(n, 1), 1), f"[{100 * lo:.0f}, {100 * hi:.0f}]"
        for jb in JAILBREAKS:
            if jb in s:
                row[jb] = round(100 * s[jb]["harmful_k"] / max(s[jb]["n"], 1), 1)
        row["probe_acc"], row["probe_margin"] = round(100 * r["probe_accuracy"], 1), round(r["probe_margin"], 2)
        row["n"] = s["unsafe"]["n"]
        out.append(row)
    return out


def heatmap(metrics: Mapping[str, Any]) -> Any:
    """Probe accuracy and margin drop per (module type, layer), Mods_Robust outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rob = metrics["robustness"]
    panels = {"accuracy drop (points)": 100 * (rob["base_accuracy"] - np.asarray(rob["accuracy"])),
              "margin drop (logits)": rob["base_margin"] - np.asarray(rob["margin"])}
    chosen = {(m, int(lay)) for m, lay in rob["mods_robust"]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(rob["modules"]) + 2))
    for ax, (title, x) in zip(axes, panels.items(), strict=True):
        im = ax.imshow(x, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(rob["modules"])), rob["modules"])
        ax.set_xticks(range(x.shape[1]))
        ax.set_xlabel("layer")
        ax.set_title(title)
        for i, m in enumerate(rob["modules"]):
            for lay in range(x.shape[1]):
                if (m, lay) in chosen:
                    ax.add_patch(plt.Rectangle((lay - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        fig.colorbar(im, ax=ax)
    fig.suptitle("Module robustness (red: Mods_Robust)")
    fig.tight_layout()
    return fig


def write(out_dir: str, cfg: Any, metrics: dict[str, Any]) -> None:
    rep = Report(out_dir, "Study 2 — security features, module robustness, ML-LR and SWAT (synthetic world)")
    rep.text(f"Config `{cfg.name}` (study 1 config `{cfg.study1}`, safety-tuned model = study 1's `{cfg.base_run}`). "
             + (cfg.notes or ""))
    rep.section("Claims")
    for c in metrics["claims"]:
        label = "_Not decided:_" if c["holds"] is None else "_Reading:_"
        rep.text(f"**{c['statement']} — {c['verdict']}.** {c['evidence']} {label} {c['reading']}")
    p, r = metrics["probe"], cfg.robustness
    threshold = 100 * (metrics["robustness"]["base_accuracy"] - r.max_drop)
    rep.section("Probe and robustness",
                f"Probe at layer {p['layer']} (residual stream after the block, at `>`): test accuracy "
                f"{100 * p['accuracy']:.1f} %, margin {p['margin']:.2f}. Perturbation: {r.perturbation}"
                + (f" (ε = {r.eps:g} relative Frobenius)" if r.perturbation == "gaussian" else
                   f" ({r.finetune_steps} steps at lr {r.finetune_lr:g})")
                + f"; search threshold: probe accuracy ≥ {threshold:.1f}"
                f" % (unperturbed − {100 * r.max_drop:g} points) with every chosen module perturbed (Gaussian, "
                f"ε = {r.eps:g}).")
    rep.plot("robustness_heatmap", heatmap(metrics), caption="Accuracy and margin drop per (module type, layer)")
    mods = metrics["robustness"]["mods_robust"]
    rep.text(f"**Mods_Robust** ({len(mods)} of {len(r.modules) * metrics['num_layers']} modules, in the order the "
             "search added them): " + (", ".join(f"`{m}@{lay}`" for m, lay in mods) or "none") + ". Saved in "
             "`mods_robust.json`; plans: " + ", ".join(f"`{v}`" for v in metrics["plans_saved"].values()) + ".")
    rows = table_rows(metrics)
    rep.section("Before / after benign fine-tuning",
                f"{metrics['steps']} steps on safe operator tasks only. harmful = % of unsafe test inputs answered "
                "with their harmful transformation; jb_* = % of each jailbreak set answered harmfully; task = % of "
                "safe test inputs answered correctly (exact judge, greedy); probe = the frozen probe on the proxy "
                "test split.")
    rep.table(rows, COLUMNS)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(rows, COLUMNS))
    t = metrics["timing"]
    rep.section("Timing", f"{t['total_this_invocation']:.0f} s this invocation; stages run: "
                f"{len(metrics['ran_stages'])}, skipped (done before): {len(metrics['skipped_stages'])}.")
    rep.metrics.update(metrics)
    rep.write()
