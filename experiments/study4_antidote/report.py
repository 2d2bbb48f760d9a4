"""Study 4's report: one results table (results.md / in report.md), plots, claims; metrics.json beside them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from safety_jax.eval.stats import wilson
from safety_jax.report import Report, line_panels, markdown_table

COLUMNS = ("defense", "score", "ratio", "p", "lr", "epochs", "harmful", "harmful_ci", "task", "task_ci", "n")


def table_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model: rates in % with Wilson 95 % intervals."""
    out = []
    for r in metrics["rows"]:
        row = {k: ("" if r.get(k) is None else r.get(k)) for k in ("defense", "score", "epochs")}
        row.update({k: "" if r.get(k) is None else f"{r[k]:g}" for k in ("ratio", "p", "lr")})  # 1e-4, not 0.000
        for m in ("harmful", "task"):
            k, n = r[f"{m}_k"], r[f"{m}_n"]
            lo, hi = wilson(k, n)
            row[m], row[f"{m}_ci"] = round(100 * k / max(n, 1), 1), f"[{100 * lo:.0f}, {100 * hi:.0f}]"
        row["n"] = r["harmful_n"]
        out.append(row)
    return out


def _rate(r: Mapping[str, Any], m: str) -> float:
    return 100 * r[f"{m}_k"] / max(r[f"{m}_n"], 1)


def alpha_figure(metrics: Mapping[str, Any]) -> Any:
    """Harmful score and task accuracy vs α, one line per score, at the first (p, lr, epochs) cell; α = 0 is the
    undefended fine-tuned model."""
    g, rows = metrics["grid"], metrics["rows"]
    cell = {"p": g["p"][0], "lr": g["lrs"][0], "epochs": g["epochs"][0]}
    none = next((r for r in rows if r["defense"] == "none" and all(r[k] == v for k, v in cell.items())), None)
    panels: dict[str, dict[str, Any]] = {"harmful score (%)": {}, "task accuracy (%)": {}}
    for score in g["scores"]:
        pts = sorted((r["ratio"], r) for r in rows if r["defense"] == "antidote" and r.get("score") == score
                     and all(r[k] == v for k, v in cell.items()))
        if none is not None:
            pts = [(0.0, none), *pts]
        for panel, m in (("harmful score (%)", "harmful"), ("task accuracy (%)", "task")):
            panels[panel][score] = ([a for a, _ in pts], [_rate(r, m) for _, r in pts])
    return line_panels(panels, xlabel="dense ratio α", ylabel="%", ncols=2,
                       title=f"Antidote vs α (p = {cell['p']:g}, lr {cell['lr']:g}, {cell['epochs']} epochs)")


def lr_figure(metrics: Mapping[str, Any]) -> Any:
    """Harmful score and task accuracy vs the user's learning rate, one line per defense (Antidote at the headline
    α with Wanda), at the first p and epoch count."""
    g, rows, a = metrics["grid"], metrics["rows"], metrics["headline_ratio"]
    p, ep = g["p"][0], g["epochs"][0]
    names = [d for d in metrics["defenses"] if d != "antidote"] + (["antidote"] if "antidote" in metrics["defenses"]
                                                                    else [])
    panels: dict[str, dict[str, Any]] = {"harmful score (%)": {}, "task accuracy (%)": {}}
    for d in dict.fromkeys(["none", *names]):
        pts = sorted((r["lr"], r) for r in rows if r["defense"] == d and r["p"] == p and r["epochs"] == ep
                     and (d != "antidote" or (r.get("score") == "wanda" and r.get("ratio") == a)))
        if not pts:
            continue
        label = f"antidote α={a:g}" if d == "antidote" else d
        for panel, m in (("harmful score (%)", "harmful"), ("task accuracy (%)", "task")):
            panels[panel][label] = ([x for x, _ in pts], [_rate(r, m) for _, r in pts])
    return line_panels(panels, xlabel="user fine-tuning lr", ylabel="%", ncols=2, logx=True,
                       title=f"per defense vs lr (p = {p:g}, {ep} epochs)")


def write(out_dir: str, cfg: Any, metrics: dict[str, Any]) -> None:
    rep = Report(out_dir, "Study 4 — harmful fine-tuning and Antidote (synthetic world)")
    rep.text(f"Config `{cfg.name}` (study 1 config `{cfg.study1}`, aligned model = study 1's `{cfg.alignment.run}`). "
             + (cfg.notes or ""))
    rep.section("Claims")
    for c in metrics["claims"]:
        label = "_Not decided:_" if c["holds"] is None else "_Reading:_"
        rep.text(f"**{c['statement']} — {c['verdict']}.** {c['evidence']} {label} {c['reading']}")
    rows = table_rows(metrics)
    rep.section("Results", "Harmful score = % of unsafe test inputs answered with their harmful transformation; task "
                "accuracy = % of safe test inputs answered correctly (exact synthetic judge, greedy); 95 % Wilson "
                "intervals.")
    rep.table(rows, COLUMNS)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(rows, COLUMNS))
    if "antidote" in metrics["defenses"]:
        rep.plot("alpha", alpha_figure(metrics), caption="Harmful score and task accuracy vs α")
    if len(metrics["grid"]["lrs"]) > 1:
        rep.plot("lr", lr_figure(metrics), caption="Harmful score and task accuracy per defense vs lr")
    t = metrics["timing"]
    rep.section("Timing", f"{t['total_this_invocation']:.0f} s this invocation; stages run: "
                f"{len(metrics['ran_stages'])}, skipped (done before): {len(metrics['skipped_stages'])}.")
    rep.metrics.update(metrics)
    rep.write()
