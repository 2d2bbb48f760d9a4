"""Study 1's report: what the run shrank, acceptance checks, each claim with its numbers, tables and plots.

Built on the library's one report writer (``safety_jax.report.Report``): ``report.md``, ``metrics.json`` and PNGs.

Metrics read (layout of ``run.py``; model names ``pretrained`` and ``<method>@<lr name>``): ``eval``, ``boundary``,
``tau``, ``separation``, ``delta_w`` (``sin_theta [L][k]``, ``pre_energy_rank [L]``, ``out_dim`` for the sorted-sin θ
figure), ``row_space[model][module][set]`` (``{"mean": [L], "per_direction": [L][D]}``, or a plain ``[L]`` list in
older runs), ``lipschitz[model][set]`` (``{"mean", "values": [N]}``, or a float in older runs), ``interpolation``,
``attack``, ``timing``, ``skipped_stages`` and, when present, ``runs[model]`` (each fine-tuning run's budget) and
``seeds`` (acceptance figures and claims over several data-order seeds). Keys missing from older runs skip their table
or figure with a note line instead of failing the report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments.study1_mechanics.claims import acceptance, acceptance_reading, assess_claims
from experiments.study1_mechanics.config import StudyConfig
from safety_jax.data.synthetic import World, get_world_config
from safety_jax.data.synthetic_sets import SAFETY_KINDS
from safety_jax.model.config import LlamaConfig, get_preset
from safety_jax.model.llama import LINEAR_MODULES
from safety_jax.report import Report, fmt, line_panels

log = logging.getLogger("study1")

SETS = SAFETY_KINDS  # safe, unsafe, then the jailbreak families
JAILBREAKS = tuple(s for s in SETS if s not in ("safe", "unsafe"))
MLP_MODULES = tuple(m for m in LINEAR_MODULES if m.startswith("mlp."))
ROW_SPACE_MODULES = ("mlp.gate", "mlp.up")
METHOD_ORDER = ("ssft", "dpo", "dpo_standard", "unlearning")
STUDY_METHODS = ("ssft", "dpo", "unlearning")  # the three methods the study decides on
CONTRAST_METHODS = ("dpo_standard",)  # reported beside them for comparison, never an acceptance failure
SET_COLORS = {"safe": "tab:blue", "unsafe": "tab:red", "jb_text": "tab:orange", "jb_ops": "tab:green",
              "jb_composition": "tab:purple", "jb_mismatch_ops": "tab:brown", "jb_mismatch_text": "tab:pink"}
LR_STYLES = ("-", "--", ":", "-.")
_FIGURE_ERRORS = (KeyError, IndexError, TypeError, ValueError)  # what missing or malformed metrics raise


class _Skip(Exception):
    """A figure that cannot be drawn from these metrics (the message says why)."""


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
        "".join(f" ({v} at {k})" for k, v in ft.lr_steps.items()) +
        ("".join(f"; {m} at {', '.join(n)} only" for m, n in ft.method_lrs.items())) +
        f"; {ft.second_segment_refusal:.0%} second-segment refusal rows, pairs scored on `{ft.pair_targets}` "
        "positions" +
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


# ---------------------------------------------------------------------------------------------------- helpers
def _split(model: str) -> tuple[str, str]:
    method, _, lr = model.partition("@")
    return method, lr


def _finetuned(metrics: Mapping[str, Any]) -> list[str]:
    """The fine-tuned models, in the run's order."""
    names = metrics.get("eval") or metrics.get("tau") or {}
    return [m for m in names if m != "pretrained"]


def _grid_axes(models: Sequence[str]) -> tuple[list[str], list[str]]:
    """Methods (the study's order first) and learning-rate names (the run's order) of ``models``."""
    methods = [m for m in METHOD_ORDER if any(_split(x)[0] == m for x in models)]
    methods += [m for m in dict.fromkeys(_split(x)[0] for x in models) if m not in methods]
    return methods, list(dict.fromkeys(_split(x)[1] for x in models))


def _is_contrast(row: Mapping[str, Any]) -> bool:
    """An acceptance row of the contrast method (standard DPO): reported with its numbers, never as a failure."""
    if row.get("contrast") is not None:
        return bool(row["contrast"])
    return _split(str(row.get("check", "")).split(":", 1)[0])[0] in CONTRAST_METHODS


def _verdict(holds: Any) -> str:
    return "NOT DECIDED" if holds is None else "HOLDS" if holds else "DOES NOT HOLD"


def _claim_line(c: Any) -> str:
    """The claim's own report line where it has one, else verdict, evidence and reading."""
    if callable(getattr(c, "line", None)):
        return c.line()
    return (f"**{c.statement} — {_verdict(c.holds)}.** {getattr(c, 'evidence', '')} "
            f"_Reading:_ {getattr(c, 'reading', '')}").rstrip()


def _claim_dict(c: Any) -> dict[str, Any]:
    return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(vars(c))


def _mean_of(v: Any) -> float:
    """The mean of a metric stored as a number, a list, or ``{"mean": ...}`` (new and old run layouts)."""
    if isinstance(v, Mapping):
        v = v.get("mean")
    if v is None:
        return float("nan")
    return float(np.nanmean(np.asarray(v, dtype=float)))


def _pm(mean: Any, std: Any, digits: int = 3) -> str:
    """``mean ± std`` (``–`` for a missing value)."""
    if mean is None:
        return "–"
    return fmt(mean if isinstance(mean, str) else float(mean), digits) + (
        "" if std is None else " ± " + fmt(float(std), digits))


def _count(passes: Any) -> int:
    if isinstance(passes, (list, tuple)):
        return sum(bool(p) for p in passes)
    return int(passes)


def _subplots(nrows: int, ncols: int, *, width: float = 4.0, height: float = 3.0, **kw: Any) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)


def _figure(rep: Report, name: str, build: Callable[[], Any], caption: str) -> None:
    """``rep.plot(name, build())``, or a note line when these metrics cannot make the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    try:
        fig = build()
    except (_Skip, *_FIGURE_ERRORS) as e:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
        reason = str(e) if isinstance(e, _Skip) else f"{type(e).__name__} {e}"
        log.warning("figure %s skipped: %s", name, reason)
        rep.text(f"_Figure `{name}.png` skipped: {reason}._")
        return
    rep.plot(name, fig, caption=caption)


def _legend_below(fig: Any, axes: Any, *, ncol: int = 5) -> None:
    """One legend for the whole figure (the labels of every panel, once), below the panels."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ncol = max(1, min(ncol, int(fig.get_size_inches()[0] // 1.8)))
    rows = math.ceil(len(handles) / ncol) if handles else 0
    bottom = min(0.3, 0.25 * rows / fig.get_size_inches()[1])
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))


# ---------------------------------------------------------------------------------------------------- figures
def _tau_grid(metrics: Mapping[str, Any]) -> Any:
    """τ per layer (mean ± std band) per set; methods (rows) × learning-rate names (columns); pretrained dashed."""
    tau = metrics.get("tau") or {}
    models = [m for m in _finetuned(metrics) if m in tau]
    if not models:
        raise _Skip("no fine-tuned model has τ metrics")
    methods, lrs = _grid_axes(models)
    fig, axes = _subplots(len(methods), len(lrs), sharey="row")
    pre = tau.get("pretrained", {})
    for i, method in enumerate(methods):
        for j, lr in enumerate(lrs):
            ax, model = axes[i][j], f"{method}@{lr}"
            if model not in tau:
                ax.set_title(f"{model} (not run)", fontsize=9)
                ax.axis("off")
                continue
            for s in SETS:
                if s not in tau[model]:
                    continue
                mean = np.asarray(tau[model][s]["mean"], float)
                std = np.asarray(tau[model][s].get("std", np.zeros_like(mean)), float)
                x = np.arange(len(mean))
                ax.plot(x, mean, color=SET_COLORS.get(s), marker="o", ms=3, lw=1.2, label=s)
                if len(x) > 1:
                    ax.fill_between(x, mean - std, mean + std, color=SET_COLORS.get(s), alpha=0.12, lw=0)
                else:  # one layer: no band to draw, an error bar instead
                    ax.errorbar(x, mean, yerr=std, color=SET_COLORS.get(s), capsize=3, lw=1.0)
            for s in ("safe", "unsafe"):
                if s in pre:
                    mean = np.asarray(pre[s]["mean"], float)
                    ax.plot(np.arange(len(mean)), mean, color=SET_COLORS[s], ls="--", lw=0.9, marker="x", ms=3,
                            label=f"pretrained {s}")
            ax.axhline(0.0, color="grey", lw=0.7, ls=":")
            ax.set_title(model, fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("τ (mean ± std)")
            n_layers = max(len(v["mean"]) for v in tau[model].values())
            ax.set_xticks(np.arange(n_layers))
    _legend_below(fig, axes, ncol=5)
    return fig


def _sin_theta_sorted(metrics: Mapping[str, Any]) -> Any:
    """Per layer, ΔW's top-k sin θ sorted descending (one block of k points per layer), per MLP module (rows) and
    method (columns), one colour per learning rate; black bars: the layer's random-direction baseline."""
    dw = metrics.get("delta_w") or {}
    models = [m for m in _finetuned(metrics) if m in dw and any("sin_theta" in dw[m].get(mod, {})
                                                                for mod in MLP_MODULES)]
    if not models:
        raise _Skip("no per-layer sin θ in the ΔW metrics (older run)")
    methods, lrs = _grid_axes(models)
    modules = [mod for mod in MLP_MODULES if any(mod in dw[m] for m in models)]
    fig, axes = _subplots(len(modules), len(methods), width=4.4, sharey=True)
    for i, mod in enumerate(modules):
        for j, method in enumerate(methods):
            ax, baseline_drawn, k = axes[i][j], False, 1
            for c, lr in enumerate(lrs):
                r = dw.get(f"{method}@{lr}", {}).get(mod)
                if not r or "sin_theta" not in r:
                    continue
                sin = np.array(r["sin_theta"], dtype=float)
                sin = sin.reshape(1, -1) if sin.ndim == 1 else sin
                n_layers, k = sin.shape
                ordered = -np.sort(-sin, axis=1)  # descending, NaN (zero update) last
                x = np.arange(n_layers)[:, None] * (k + 1) + np.arange(k)[None, :]
                for layer in range(n_layers):
                    ax.plot(x[layer], ordered[layer], color=f"C{c}", marker="o", ms=2.5, lw=1.0,
                            label=f"η = {lr}" if layer == 0 else None)
                rank, out = r.get("pre_energy_rank"), r.get("out_dim")
                if not baseline_drawn and rank is not None and out:
                    base = np.sqrt(np.clip(1.0 - np.asarray(rank, float).reshape(-1) / float(out), 0.0, 1.0))
                    for layer, b in enumerate(base[:n_layers]):
                        ax.hlines(b, layer * (k + 1) - 0.4, layer * (k + 1) + k - 0.6, color="k", lw=1.2,
                                  ls=":", label="random direction" if layer == 0 else None)
                    baseline_drawn = True
                ax.set_xticks(np.arange(n_layers) * (k + 1) + (k - 1) / 2, [str(layer) for layer in range(n_layers)])
            ax.axhline(1 / math.sqrt(2), color="grey", lw=0.6, ls="--")
            ax.set_title(f"{mod}: {method}", fontsize=9)
            ax.set_xlabel(f"layer (top {k} directions, sorted)")
            ax.set_ylabel("sin θ")
    _legend_below(fig, axes, ncol=4)
    return fig


def _row_space_directions(metrics: Mapping[str, Any]) -> Any:
    """Per-direction row-space scores (mean over layers) for safe and unsafe inputs; modules (rows) × pretrained
    and each method (columns), one line style per learning rate."""
    rs = metrics.get("row_space") or {}
    with_dirs = [m for m in rs if any(isinstance(rs[m].get(mod, {}).get("safe"), Mapping) and
                                      "per_direction" in rs[m][mod]["safe"] for mod in ROW_SPACE_MODULES)]
    if not with_dirs:
        raise _Skip("no per-direction row-space scores (older run)")
    methods, lrs = _grid_axes([m for m in with_dirs if m != "pretrained"])
    columns = (["pretrained"] if "pretrained" in with_dirs else []) + methods
    modules = [mod for mod in ROW_SPACE_MODULES if any(mod in rs[m] for m in with_dirs)]
    fig, axes = _subplots(len(modules), len(columns), sharey="row")
    for i, mod in enumerate(modules):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            models = [(col, "")] if col == "pretrained" else [(f"{col}@{lr}", lr) for lr in lrs]
            for c, (model, lr) in enumerate(models):
                for s in ("safe", "unsafe"):
                    entry = rs.get(model, {}).get(mod, {}).get(s)
                    if not isinstance(entry, Mapping) or "per_direction" not in entry:
                        continue
                    by_dir = np.array(entry["per_direction"], dtype=float)
                    y = by_dir.mean(axis=0) if by_dir.ndim == 2 else by_dir
                    ax.plot(np.arange(1, len(y) + 1), y, color=SET_COLORS[s], ls=LR_STYLES[c % len(LR_STYLES)],
                            lw=1.0, label=f"{s}" + (f" (η = {lr})" if lr else ""))
            ax.set_title(f"{mod}: {col}", fontsize=9)
            ax.set_xlabel("right singular direction i of W_pre")
            ax.set_ylabel("s_i |cos| / Σ s (mean over layers)")
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _lipschitz_hist(metrics: Mapping[str, Any]) -> Any:
    """Histograms of the per-example Lipschitz values, safe vs unsafe: each fine-tuned model (filled) against the
    pretrained model (outlines); methods (rows) × learning-rate names (columns)."""
    lip = metrics.get("lipschitz") or {}

    def values(model: str, s: str) -> np.ndarray | None:
        v = lip.get(model, {}).get(s)
        if isinstance(v, Mapping) and v.get("values") is not None:
            arr = np.array(v["values"], dtype=float)
            arr = arr[np.isfinite(arr)]
            return arr if arr.size else None
        return None

    models = [m for m in _finetuned(metrics) if values(m, "safe") is not None or values(m, "unsafe") is not None]
    if not models:
        raise _Skip("no per-example Lipschitz values (older run: means only)")
    methods, lrs = _grid_axes(models)
    fig, axes = _subplots(len(methods), len(lrs))
    for i, method in enumerate(methods):
        for j, lr in enumerate(lrs):
            ax, model = axes[i][j], f"{method}@{lr}"
            series = {(who, s): values(who_model, s) for who, who_model in (("pretrained", "pretrained"),
                                                                              (model, model))
                      for s in ("safe", "unsafe")}
            series = {k: v for k, v in series.items() if v is not None}
            if not any(who == model for who, _ in series):
                ax.set_title(f"{model} (no values)", fontsize=9)
                ax.axis("off")
                continue
            bins = np.histogram_bin_edges(np.concatenate(list(series.values())), bins=20)
            for (who, s), v in series.items():
                if who == "pretrained":
                    ax.hist(v, bins=bins, histtype="step", color=SET_COLORS[s], ls="--", lw=1.0,
                            label=f"pretrained {s}")
                else:
                    ax.hist(v, bins=bins, color=SET_COLORS[s], alpha=0.35, label=f"fine-tuned {s}")
            ax.set_title(model, fontsize=9)
            ax.set_xlabel("‖∂ max-logit / ∂ input embeddings‖")
            ax.set_ylabel("examples")
    _legend_below(fig, axes, ncol=4)
    return fig


# ---------------------------------------------------------------------------------------------------- sections
def _eval_table(metrics: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    return [{"model": m, **{s: metrics["eval"][m].get(s, {}).get(metric) for s in SETS}} for m in metrics["eval"]]


def _budgets(rep: Report, metrics: Mapping[str, Any]) -> None:
    runs = metrics.get("runs")
    if not runs:
        return
    rows = []
    for model, r in runs.items():
        lr, share = r.get("lr"), r.get("unsafe_frac")
        rows.append({"model": model, "method": r.get("method"), "lr name": r.get("lr_name"),
                     "lr": f"{lr:g}" if isinstance(lr, (int, float)) else lr, "steps": r.get("steps"),
                     "batch": r.get("batch_size"),
                     "unsafe share": f"{share:.0%}" if isinstance(share, (int, float)) else share,
                     "mix": r.get("batch_mix")})
    rep.table(rows, ["model", "method", "lr name", "lr", "steps", "batch", "unsafe share", "mix"],
              caption="**Budgets of the fine-tuning runs** (after each method's overrides and learning-rate scale; "
              "mix: `per_batch` = all-safe or all-unsafe batches, `per_example` = that share of unsafe rows in "
              "every batch)")


def _acceptance_section(rep: Report, metrics: Mapping[str, Any], checks: Sequence[Mapping[str, Any]]) -> None:
    study = [r for r in checks if not _is_contrast(r)]
    contrast = [r for r in checks if _is_contrast(r)]
    rep.section("Acceptance checks", "The pretrained model and the study's three methods (SSFT, the study's DPO, "
                "unlearning); standard DPO follows as a contrast, with its numbers but no pass mark.")
    rep.table([{**r, "pass": "–" if r.get("pass") is None else "PASS" if r["pass"] else "FAIL"} for r in study],
              ["check", "value", "target", "pass"])
    if contrast:
        rep.table([dict(r) for r in contrast], ["check", "value", "target"],
                  caption="**Contrast: standard DPO** (symmetric β, summed log-probabilities; not an acceptance "
                  "check — it shows what the study's DPO variant changes)")
    rep.text("_Reading:_ " + (acceptance_reading(metrics, checks) or "Every check passes."))


def _seeds_section(rep: Report, seeds: Mapping[str, Any]) -> None:
    ids = list(seeds.get("seeds", []))
    rep.section(f"Over data orders (seeds {', '.join(str(s) for s in ids)})",
                f"The same configuration re-run with {len(ids)} data orders (fine-tuning batch order seeds): each "
                "acceptance figure as mean ± std over the seeds with how many seeds pass, and each claim with how "
                "many seeds it holds in and the figures that decide it.")
    rows = []
    for r in seeds.get("acceptance", []):
        values = r.get("values") or []
        n = r.get("n", len(values))
        contrast = _is_contrast(r)
        passes = r.get("passes")
        count = None if passes is None else f"{_count(passes)}/{n}"
        rows.append({"check": r.get("check"), "mean ± std": _pm(r.get("mean"), r.get("std")),
                     "values": ", ".join(fmt(v) for v in values),
                     "passes": (f"contrast (meets the target {count})" if count else "contrast") if contrast
                     else count or "–"})
    if rows:
        rep.table(rows, ["check", "mean ± std", "values", "passes"], caption="**Acceptance figures**")
    claim_rows, figure_rows = [], []
    for c in seeds.get("claims", []):
        holds = list(c.get("holds", []))
        decided = [h for h in holds if h is not None]
        undecided = len(holds) - len(decided)
        claim_rows.append({"claim": c.get("statement", c.get("key")),
                           "holds": f"{sum(bool(h) for h in decided)}/{len(holds)}" +
                                    (f" ({undecided} not decided)" if undecided else "")})
        for name, f in (c.get("figures") or {}).items():
            f = f if isinstance(f, Mapping) else {"mean": f}
            figure_rows.append({"claim": c.get("key", c.get("statement")), "figure": name,
                                "mean ± std": _pm(f.get("mean"), f.get("std")),
                                "values": ", ".join(fmt(v) for v in f.get("values") or [])})
    if claim_rows:
        rep.table(claim_rows, ["claim", "holds"], caption="**Claims** (seeds in which the claim holds)")
    if figure_rows:
        rep.table(figure_rows, ["claim", "figure", "mean ± std", "values"], caption="**The claims' figures**")


def write(out: str, cfg: StudyConfig, world: World, mcfg: LlamaConfig, metrics: dict[str, Any]) -> None:
    """Write ``report.md``, ``metrics.json`` and the plots of one run into ``out``."""
    rep = Report(out, f"Study 1 — safety fine-tuning mechanics (Jain et al. 2024), config `{cfg.name}`")
    claims = assess_claims(metrics)
    checks = acceptance(metrics)
    rep.metrics.update(metrics)
    rep.metrics.update(config=dataclasses.asdict(cfg), claims=[_claim_dict(c) for c in claims], acceptance=checks)
    timing = metrics.get("timing", {})
    stages = {k: v for k, v in timing.items() if k != "total_this_invocation"}
    skipped = metrics.get("skipped_stages") or []
    rep.section("This run", _shrink_note(cfg, world, mcfg) +
                (f"\n- Wall time of the stages: {sum(stages.values()):.0f} s (" +
                 ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ")." if stages else "") +
                (f" Skipped (done before): {', '.join(skipped)}." if skipped else ""))
    _budgets(rep, metrics)

    rep.section("Claims", "Each claim of the paper, decided from this run's numbers (a claim that does not hold is "
                "reported as such, not tuned away; NOT DECIDED: this run's numbers cannot decide it).")
    rep.text("\n".join(f"{i + 1}. {_claim_line(c)}" for i, c in enumerate(claims)))
    _acceptance_section(rep, metrics, checks)
    if metrics.get("seeds"):
        _seeds_section(rep, metrics["seeds"])

    rep.section("Accuracy and judged generations (methods × test sets)",
                "Teacher-forced token accuracy on the output positions against the true transformation (instruct) "
                "and against the refusal (null); greedy generations judged exactly (refused: first segment all "
                "null letters; harmful: an unsafe input answered with its exact transformation).")
    for metric, caption in (("instruct_acc", "Instruct accuracy"), ("null_acc", "Null (refusal) accuracy"),
                            ("refused", "Generated: refused"), ("harmful", "Generated: harmful"),
                            ("correct", "Generated: correct (safe inputs answered right)"),
                            ("other", "Generated: other")):
        rep.table(_eval_table(metrics, metric), ["model", *SETS], caption=f"**{caption}**")

    if metrics.get("boundary"):
        rep.section("Refusal by what decides the label",
                    "Standard sets split into inputs whose operators alone make them safe or unsafe and inputs with "
                    "conditional operators only, whose label is the text's family (safe- or unsafe-dominant): a "
                    "model that does not read the family must guess on the second group.")
        rep.table([{"model": m, **{f"{kind} refused, by {rule.replace('_', ' ')} (n={r['n']})": r["refused"]
                                   for kind in ("safe", "unsafe") for rule, r in metrics["boundary"][m][kind].items()}}
                   for m in metrics["boundary"]])

    rep.section("τ cluster separation (analysis 1)",
                "τ(x) = ‖f − μ_unsafe‖ − ‖f − μ_safe‖ per layer, f the MLP hidden activation averaged over `>` and the "
                "next positions, class means from each model's own standard safe / unsafe sets; positive = closer to "
                "the safe cluster. Table: τ averaged over layers; separation = mean τ(safe) − mean τ(unsafe).")
    tau, sep = metrics.get("tau", {}), metrics.get("separation", {})
    rep.table([{"model": m, **{s: _mean_of(tau[m][s]) for s in SETS if s in tau[m]},
                "separation": _mean_of(sep.get(m)),
                "separation (last layer)": float(np.asarray(sep[m], float).reshape(-1)[-1])
                if m in sep and np.size(sep[m]) else None} for m in tau],
              ["model", *SETS, "separation", "separation (last layer)"])
    _figure(rep, "tau_grid", lambda: _tau_grid(metrics),
            "τ per layer (mean ± std band) for every test set: methods (rows) × learning rates (columns); dashed: "
            "the pretrained model's safe and unsafe sets")
    _figure(rep, "tau_per_layer", lambda: line_panels(
        {m: {s: (np.arange(len(tau[m][s]["mean"])), tau[m][s]["mean"], tau[m][s]["std"]) for s in SETS
             if s in tau[m]} for m in tau}, xlabel="layer", ylabel="τ (mean ± std)", hline=0.0),
        "τ per layer for every test set, one panel per model")

    ft = _finetuned(metrics)
    dw = metrics.get("delta_w", {})
    rep.section("ΔW versus the pretrained column space (analysis 2)",
                "For every linear matrix and layer: SVD of ΔW = W_ft − W_pre (HF orientation [out, in]); sin θ of its "
                f"top {cfg.analysis.top_k} left singular vectors against the span of the pretrained weight's top "
                f"singular vectors holding {cfg.analysis.energy:.0%} of its energy (1 = entirely outside). Done on ΔW "
                "and on columns of U, correcting the reference script (which decomposes W_ft and indexes rows). "
                "'random' = sin θ expected for a random direction, sqrt(1 − rank/out).")
    rep.table([{"model": m, "module": mod, "sin θ (mean top-k)": dw[m][mod].get("sin_theta_mean"),
                "sin θ (top-1)": dw[m][mod].get("sin_theta_top1"), "random": dw[m][mod].get("random_baseline"),
                "‖ΔW‖/‖W‖": _mean_of(dw[m][mod].get("relative_norm"))}
               for m in ft if m in dw for mod in LINEAR_MODULES if mod in dw[m]])
    _figure(rep, "sin_theta_sorted", lambda: _sin_theta_sorted(metrics),
            "Per layer, sin θ of ΔW's top directions sorted from largest to smallest (one block per layer), per MLP "
            "matrix (rows) and method (columns); dotted black: the layer's random-direction baseline "
            "sqrt(1 − rank/out); dashed grey: 1/√2")
    _figure(rep, "sin_theta_spectra", lambda: line_panels(
        {mod: {m: (np.arange(1, len(dw[m][mod]["sin_theta_by_rank"]) + 1), dw[m][mod]["sin_theta_by_rank"])
               for m in ft if mod in dw.get(m, {})} for mod in LINEAR_MODULES},
        xlabel="singular direction i of ΔW", ylabel="sin θ (mean over layers)", ncols=4),
        "sin θ of ΔW's top singular directions, per matrix")

    rs, lip = metrics.get("row_space", {}), metrics.get("lipschitz", {})
    rep.section("Row-space alignment and local Lipschitzness (analyses 3, 4)",
                "Row space: singular-value-weighted |cos| between the MLP input at `>` and the right singular vectors "
                "of the pretrained gate / up weights (mean over layers). Lipschitzness: ‖∂ max-logit at `>` / ∂ input "
                "embeddings‖ (mean over examples).")
    rep.table([{"model": m, **{f"{mod} {s}": _mean_of(rs[m][mod][s]) for mod in ROW_SPACE_MODULES
                               if mod in rs[m] for s in ("safe", "unsafe") if s in rs[m][mod]},
                "lipschitz safe": _mean_of(lip.get(m, {}).get("safe")),
                "lipschitz unsafe": _mean_of(lip.get(m, {}).get("unsafe"))} for m in rs or lip],
              ["model", *(f"{mod} {s}" for mod in ROW_SPACE_MODULES for s in ("safe", "unsafe")), "lipschitz safe",
               "lipschitz unsafe"])
    _figure(rep, "row_space_directions", lambda: _row_space_directions(metrics),
            "Row-space score per right singular direction of the pretrained gate / up weights (its term "
            "s_i |cos(x, v_i)| / Σ s, mean over examples and layers; the terms sum to the score), safe vs unsafe")
    _figure(rep, "lipschitz_hist", lambda: _lipschitz_hist(metrics),
            "Per-example local Lipschitzness, safe vs unsafe: each fine-tuned model (filled) against the pretrained "
            "model (dashed outlines)")

    interp = metrics.get("interpolation", {})
    rep.section("Interpolation along ΔW (analysis 5)", "W_pre + α·ΔW; α = 0 is the pretrained model, α = 1 the "
                "fine-tuned one.")
    rep.table([{"model": m, **r} for m in ft for r in interp.get(m, [])])
    _figure(rep, "accuracy_vs_alpha", lambda: line_panels(
        {m: {key: ([r["alpha"] for r in interp[m]], [r[key] for r in interp[m]])
             for key in ("safe_instruct_acc", "unsafe_null_acc", "unsafe_refused", "unsafe_harmful")}
         for m in ft if m in interp}, xlabel="α", ylabel="rate"), "Accuracy and refusal along W_pre + α·ΔW")
    _figure(rep, "separation_vs_alpha", lambda: line_panels(
        {"separation": {m: ([r["alpha"] for r in interp[m]], [r["separation"] for r in interp[m]])
                        for m in ft if m in interp}},
        xlabel="α", ylabel="τ separation (mean over layers)"), "τ separation along W_pre + α·ΔW")

    attack = metrics.get("attack", {})
    rep.section("Adversarial soft tokens (analysis 6)",
                "k embedding vectors inserted before `>`, optimised toward the harmful completion (normalised "
                "gradient steps, kept within the mean token-embedding norm). Success = the whole harmful completion "
                "is the teacher-forced argmax (greedy decoding reproduces it); first token harmful = the refusal "
                "decision is flipped; τ of the attacked inputs, mean over "
                "layers, against the model's safe / unsafe class means.")
    rep.table([{"model": m, "k": r["num_soft"], "steps": r["steps"], "success": r["success"],
                "first token harmful": r["first_token_success"], "target acc": r["target_acc"],
                "τ": _mean_of(r["tau_mean"])}
               for m in ft for r in attack.get(m, [])])
    _figure(rep, "attack_strength", lambda: line_panels(_attack_panels(attack, ft), xlabel="attack steps",
                                                         ylabel="success / τ", ncols=2),
            "Attack success and τ as the number of soft tokens k and of steps grow")
    rep.metrics["jailbreak_sets"] = list(JAILBREAKS)
    rep.metrics["mlp_modules"] = list(MLP_MODULES)
    rep.write()


def _attack_panels(attack: Mapping[str, Any], models: Sequence[str]) -> dict[str, Any]:
    panels: dict[str, Any] = {}
    for m in models:
        rows = attack.get(m)
        if not rows:
            continue
        ks = sorted({r["num_soft"] for r in rows})

        def pick(k: int, key: Callable[[Mapping[str, Any]], float], rows: Sequence[Mapping[str, Any]] = rows
                 ) -> tuple[list[int], list[float]]:
            return [r["steps"] for r in rows if r["num_soft"] == k], [key(r) for r in rows if r["num_soft"] == k]

        panels[f"{m}: success / first token harmful"] = {
            **{f"k={k}": pick(k, lambda r: r["success"]) for k in ks},
            **{f"k={k} first token": pick(k, lambda r: r["first_token_success"]) for k in ks}}
        panels[f"{m}: τ"] = {f"k={k}": pick(k, lambda r: _mean_of(r["tau_mean"])) for k in ks}
    if not panels:
        raise _Skip("no attack metrics")
    return panels
