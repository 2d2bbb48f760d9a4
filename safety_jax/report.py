"""The one report writer: ``metrics.json``, ``report.md`` (Markdown sections and tables) and PNG plots in one folder.

Usage::

    rep = Report(out_dir, "Study 1 — safety fine-tuning mechanics")
    rep.metrics["eval"] = {...}                         # anything JSON-like (numpy arrays and scalars are converted)
    rep.section("Accuracy", "Teacher-forced ...")
    rep.table(rows, columns=["method", "safe", "unsafe"], caption="...")
    rep.plot("tau_per_layer", line_panels({...}, xlabel="layer", ylabel="τ"))
    rep.write()                                         # report.md + metrics.json (+ the PNGs written by plot)

Plots use matplotlib's Agg backend (no display needed). NaN values become ``null`` in the JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Series = Mapping[str, tuple[Sequence[float], Sequence[float]] | tuple[Sequence[float], Sequence[float],
                                                                      Sequence[float]]]


def to_jsonable(x: Any) -> Any:
    """Nested dicts / lists / numpy values -> plain JSON values (NaN and ±inf -> None)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray) or hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
        arr = np.asarray(x)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals, None/NaN as ``–``."""
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                   digits: int = 3) -> str:
    """A Markdown table of ``rows`` (dicts), one column per key in ``columns`` (default: the first row's keys)."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def line_panels(panels: Mapping[str, Series], *, xlabel: str, ylabel: str, ncols: int = 3, logx: bool = False,
                hline: float | None = None, title: str | None = None) -> Any:
    """A figure with one subplot per panel; each panel maps a label to ``(x, y)`` or ``(x, y, yerr)``.

    Returns the matplotlib Figure (Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(panels), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for label, data in series.items():
            x, y = np.asarray(data[0], float), np.asarray(data[1], float)
            if len(data) > 2 and data[2] is not None:
                ax.errorbar(x, y, yerr=np.asarray(data[2], float), label=label, marker="o", ms=3, capsize=2)
            else:
                ax.plot(x, y, label=label, marker="o", ms=3)
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.8, ls="--")
        if logx:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class Report:
    """Collects Markdown sections, tables, plots and metrics, and writes them into ``out_dir``."""

    def __init__(self, out_dir: str | os.PathLike, title: str) -> None:
        self.out_dir = os.fspath(out_dir)
        self.title = title
        self.metrics: dict[str, Any] = {}
        self._parts: list[str] = [f"# {title}\n"]
        self.plots: list[str] = []
        os.makedirs(self.out_dir, exist_ok=True)

    def section(self, title: str, text: str = "", *, level: int = 2) -> None:
        """A heading and (optional) paragraph text."""
        self._parts.append(f"\n{'#' * level} {title}\n")
        if text:
            self._parts.append(text.rstrip() + "\n")

    def text(self, text: str) -> None:
        """A paragraph (or any Markdown)."""
        self._parts.append("\n" + text.rstrip() + "\n")

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
              caption: str | None = None, digits: int = 3) -> None:
        """A Markdown table (see :func:`markdown_table`), with an optional caption line above it."""
        if caption:
            self._parts.append(f"\n{caption}\n")
        self._parts.append("\n" + markdown_table(rows, columns, digits=digits))

    def plot(self, name: str, fig: Any, *, caption: str | None = None) -> str:
        """Save ``fig`` as ``<out_dir>/<name>.png``, embed it in the report, close it; returns the file path."""
        import matplotlib.pyplot as plt

        path = os.path.join(self.out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.plots.append(path)
        self._parts.append(f"\n![{caption or name}]({name}.png)\n")
        if caption:
            self._parts.append(f"\n_{caption}_\n")
        return path

    def markdown(self) -> str:
        """The report so far, as Markdown."""
        return "".join(self._parts)

    def write(self) -> tuple[str, str]:
        """Write ``report.md`` and ``metrics.json`` (atomically); returns their paths."""
        md, js = os.path.join(self.out_dir, "report.md"), os.path.join(self.out_dir, "metrics.json")
        for path, content in ((md, self.markdown()), (js, json.dumps(to_jsonable(self.metrics), indent=1))):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(content)
            os.replace(tmp, path)
        return md, js
