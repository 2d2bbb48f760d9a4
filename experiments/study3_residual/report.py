"""Study 3's report: claims, per-layer tables and plots (dominant-component accuracy, effective rank, spectra,
activation norms), the attribution heat map, the intervention sweep and the exposure table; metrics.json beside."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from safety_jax.eval.stats import wilson
from safety_jax.report import Report, line_panels


def layer_rows(r: Mapping[str, Any]) -> list[dict[str, Any]]:
    share, er = np.asarray(r["share"]), np.asarray(r["effective_rank"])
    rows = []
    for layer in range(share.shape[0]):
        row = {"layer": layer, "λ0 share": share[layer, 0], "λ1 share": share[layer, 1]}
        row.update({f"rank@{t:g}": int(er[layer, j]) for j, t in enumerate(r["thresholds"])})
        row.update({"dominant acc": r["dominant_acc"][layer], f"best-of-{r['best_of']} acc": r["best_acc"][layer],
                    "random q95": r["random_acc_q95"][layer]})
        if "dim_acc" in r:
            row.update({"diff-in-means acc": r["dim_acc"][layer], "cos(diff-in-means, v0)": r["dim_cosine"][layer]})
        if "probe_acc" in r:
            row.update({"probe acc (held out)": r["probe_acc"][layer], "|cos(probe, v0)|":
                        abs(r["probe_cosine"][layer])})
        rows.append(row)
    return rows


def accuracy_figure(pairs: Mapping[str, Any]) -> Any:
    panels = {}
    for name, r in pairs.items():
        x = list(range(len(r["dominant_acc"])))
        panel = {"dominant (after)": (x, r["dominant_acc"]), "dominant (before)": (x, r["dominant_acc_before"]),
                 f"best of {r['best_of']}": (x, r["best_acc"]), "random q95": (x, r["random_acc_q95"])}
        if "probe_acc" in r:
            panel["probe"] = (x, r["probe_acc"])
        if "dim_acc" in r:
            panel["diff-in-means"] = (x, r["dim_acc"])
        panels[name] = panel
    return line_panels(panels, xlabel="layer", ylabel="accuracy", ncols=2, title="refusal prediction per layer")


def rank_figure(pairs: Mapping[str, Any]) -> Any:
    panels = {}
    for name, r in pairs.items():
        er = np.asarray(r["effective_rank"])
        x = list(range(er.shape[0]))
        panels[name] = {f"τ = {t:g}": (x, er[:, j].tolist()) for j, t in enumerate(r["thresholds"])}
    return line_panels(panels, xlabel="layer", ylabel="effective rank", ncols=2, title="effective rank of the shift")


def spectra_figure(pairs: Mapping[str, Any], k: int = 10) -> Any:
    panels = {}
    for name, r in pairs.items():
        share = np.asarray(r["share"])
        kk = min(k, share.shape[1])
        panels[name] = {f"layer {layer}": (list(range(kk)), share[layer, :kk].tolist())
                        for layer in range(share.shape[0])}
    return line_panels(panels, xlabel="component", ylabel="λ share", ncols=2, title="spectra of the shift")


def norms_figure(pairs: Mapping[str, Any]) -> Any:
    panels = {}
    for name, r in pairs.items():
        x = list(range(len(r["norms"]["before"])))
        panels[name] = {k: (x, v) for k, v in r["norms"].items()}
    return line_panels(panels, xlabel="layer", ylabel="mean L2 norm", ncols=2, title="activation norms")


def heat_figure(attr: Mapping[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = np.asarray(attr["heat"])[: attr["layer"]]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * heat.shape[1], 1.2 + 0.5 * max(heat.shape[0], 1)))
    lim = float(np.abs(heat).max()) or 1.0
    im = ax.imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(heat.shape[1]))
    ax.set_yticks(range(heat.shape[0]))
    ax.set_xlabel("component of the earlier layer")
    ax.set_ylabel("earlier layer")
    ax.set_title(f"promote (+) / suppress (−) of layer {attr['layer']}'s v₀")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def intervention_rows(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        row: dict[str, Any] = {"α": r["alpha"]}
        for kind in ("unsafe", "safe"):
            row[f"{kind} refused"] = r[f"{kind}_refused_k"] / r[f"{kind}_n"]
        jb = [k[: -len("_n")] for k in r if k.startswith("jb_") and k.endswith("_n")]
        row["jailbreaks harmful"] = sum(r[f"{k}_harmful_k"] for k in jb) / max(sum(r[f"{k}_n"] for k in jb), 1)
        row["unsafe harmful"] = r["unsafe_harmful_k"] / r["unsafe_n"]
        row["benign ppl"] = r["benign_ppl"]
        out.append(row)
    return out


def exposure_rows(rows: list[Mapping[str, Any]], families: list[str]) -> list[dict[str, Any]]:
    out = []
    for fam in [*families, "unsafe", "safe"]:
        row: dict[str, Any] = {"attack": fam if fam != "safe" else "safe (over-refusal)"}
        for r in sorted(rows, key=lambda x: x["count"]):
            k, n = r[fam]["caught_k"], r[fam]["n"]
            lo, hi = wilson(k, n)
            row[f"caught @ {r['count']}"] = f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]"
        out.append(row)
    return out


def write(out_dir: str, cfg: Any, metrics: dict[str, Any]) -> None:
    rep = Report(out_dir, "Study 3 — the safety residual space (synthetic world)")
    rep.text(f"Config `{cfg.name}` (study 1 config `{cfg.study1}`; shift variant `{cfg.shift.variant}`). "
             + (cfg.notes or ""))
    rep.section("Claims")
    for c in metrics["claims"]:
        label = "_Not decided:_" if c["holds"] is None else "_Reading:_"
        rep.text(f"**{c['statement']} — {c['verdict']}.** {c['evidence']} {label} {c['reading']}")
    pairs = metrics["pairs"]
    rep.section("Components and refusal prediction per layer",
                "States after every block at the last prompt token (`>`); λ shares of the uncentred SVD of the "
                "shift; accuracy = percentile-threshold prediction of the tuned model's greedy refusals from the "
                "projection on the component (oriented with the mean shift); random q95 = the 95th percentile over "
                "random unit directions.")
    for name, r in pairs.items():
        rep.table(layer_rows(r), caption=f"{name} (N = {r['n']}, refusal rate {r['refusal_rate']:.2f})")
    rep.plot("accuracy_per_layer", accuracy_figure(pairs), caption="Dominant-component accuracy per layer")
    rep.plot("effective_rank", rank_figure(pairs), caption="Effective rank per layer")
    rep.plot("spectra", spectra_figure(pairs), caption="λ shares of the first components")
    rep.plot("activation_norms", norms_figure(pairs), caption="Norms before, after and of the shift")
    a = metrics["attribution"]
    rep.section("Attribution", f"Integrated gradients of layer {a['layer']}'s v₀ projection on {a['n']} unsafe inputs: "
                "share of |relevance| by token role " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                  a["relevance_share"].items())
                + f" (largest completeness error {100 * a['completeness_error']:.2f} %).")
    rep.plot("attribution_heatmap", heat_figure(a), caption="Promote / suppress scores of earlier components")
    rep.section("Intervention", "Subtract α·σ₀·v₀ from the last-token state after every block while generating.")
    rep.table(intervention_rows(metrics["intervention"]))
    rows = sorted(metrics["intervention"], key=lambda r: r["alpha"])
    x = [r["alpha"] for r in rows]
    rep.plot("intervention", line_panels(
        {"refused": {"unsafe": (x, [r["unsafe_refused_k"] / r["unsafe_n"] for r in rows]),
                     "safe": (x, [r["safe_refused_k"] / r["safe_n"] for r in rows])},
         "benign perplexity": {"ppl": (x, [r["benign_ppl"] for r in rows])}}, xlabel="α", ylabel="", ncols=2,
        title="intervention sweep"), caption="Refusal and benign perplexity vs α")
    rep.section("Exposure", "Fraction of each attack refused (caught) by SSFT models trained with N examples of each "
                "family; 95 % Wilson intervals. Trigger-removed and GCG inputs are crafted on the first pair's tuned "
                "model and transferred.")
    rep.table(exposure_rows(metrics["exposure"], metrics["families"]))
    rep.text("Attack statistics: " + "; ".join(f"{k}: {v}" for k, v in metrics["attack_stats"].items()))
    t = metrics["timing"]
    rep.section("Timing", f"{t['total_this_invocation']:.0f} s this invocation; stages run: "
                f"{len(metrics['ran_stages'])}, skipped (done before): {len(metrics['skipped_stages'])}.")
    rep.metrics.update(metrics)
    rep.write()
