"""The main job: the synthetic studies into one output folder, and an index of their claims.

    safety-jax study all --config demo --out runs/demo        # or: python -m experiments.main all ...
    safety-jax study 3 --config quick --out /tmp/quick

Studies run in the order 1, 4, 3, 2; every later study starts from study 1's pretrained and safety-tuned models,
which are stages of the same folder (computed once, found done by the others). Each study writes its report in its
own place (study 1 at the top of OUT, the others in ``OUT/study<k>_*/``). ``OUT/index.md`` and a self-contained
``OUT/index.html`` (plots embedded) put every study's claims side by side and link each report. Re-running skips
every finished stage.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safety_jax.stages import write_atomic
from safety_jax.sweep import TARGETS, resolve

log = logging.getLogger("main")


@dataclasses.dataclass(frozen=True)
class Study:
    """A study of the main job: its sweep target, title and where its report lands under OUT."""

    target: str
    title: str
    folder: str  # the report's folder under OUT ("" = OUT itself)


STUDIES: dict[str, Study] = {
    "1": Study("study1", "Safety fine-tuning mechanics (Jain et al. 2024)", ""),
    "4": Study("study4", "Harmful fine-tuning and Antidote (Huang et al. 2024)", "study4_antidote"),
    "3": Study("study3", "The safety residual space (Pan et al. 2025)", "study3_residual"),
    "2": Study("study2", "Module-wise learning rates, ML-LR and SWAT (Du et al. 2024)", "study2_mllr"),
}
ORDER = ("1", "4", "3", "2")


def run_studies(which: Sequence[str], config: str, out: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the studies ``which`` (keys of STUDIES, in ORDER) with config ``config`` into ``out``; write the index.
    ``overrides`` (``key=value``) go to every study's config. Returns ``{study: metrics}``."""
    todo = [k for k in ORDER if k in which]
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for i, key in enumerate(todo):
        study = STUDIES[key]
        load_ref, run_ref = TARGETS[study.target]
        print(f"[main] study {key} ({i + 1} of {len(todo)}, {len(todo) - i - 1} after it): {study.title}",
              flush=True)
        cfg = resolve(load_ref)(config, list(overrides))
        results[key] = resolve(run_ref)(cfg, out)
    paths = write_index(out)
    print(f"[main] {len(todo)} studies in {time.perf_counter() - t0:.0f} s -> {paths[0]}, {paths[1]}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- index
def _claims(out: str, study: Study) -> list[dict[str, Any]] | None:
    path = os.path.join(out, study.folder, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("claims", [])


def _verdict(claim: dict[str, Any]) -> str:
    if "verdict" in claim:
        return str(claim["verdict"])
    holds = claim.get("holds")
    return "HOLDS" if holds is True else "DOES NOT HOLD" if holds is False else "UNDECIDED"


def _report_plots(out: str, study: Study) -> list[str]:
    """The PNGs a study's report.md embeds, in its order (paths under OUT)."""
    path = os.path.join(out, study.folder, "report.md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", f.read())
    return [os.path.join(study.folder, n) for n in dict.fromkeys(names)
            if os.path.exists(os.path.join(out, study.folder, n))]


def write_index(out: str) -> tuple[str, str]:
    """``OUT/index.md`` and a self-contained ``OUT/index.html``: each study's claims (verdict, statement, evidence)
    with a link to its report; the HTML also embeds every plot the reports show."""
    md = ["# Safety studies on the synthetic world", "",
          "Every claim of every study that has run into this folder, with its verdict against its baseline.", ""]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>safety-jax studies</title><style>",
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}"
            ".HOLDS{color:#070}.no{color:#a00}img{max-width:520px;margin:4px}</style></head><body>",
            "<h1>Safety studies on the synthetic world</h1>"]
    for key in ORDER:
        study = STUDIES[key]
        claims = _claims(out, study)
        report = os.path.join(study.folder, "report.md")
        md.append(f"## Study {key} — {study.title}")
        page.append(f"<h2>Study {key} — {html.escape(study.title)}</h2>")
        if claims is None:
            md += ["", "Not run in this folder.", ""]
            page.append("<p>Not run in this folder.</p>")
            continue
        held = sum(_verdict(c).startswith("HOLD") for c in claims)
        md += ["", f"[report]({report}) · {held} of {len(claims)} claims hold", "",
               "| verdict | claim | evidence |", "|---|---|---|"]
        page.append(f"<p><a href='{html.escape(report)}'>report</a> · {held} of {len(claims)} claims hold</p>"
                    "<table><tr><th>verdict</th><th>claim</th><th>evidence</th></tr>")
        for c in claims:
            verdict, evidence = _verdict(c), str(c.get("evidence", ""))
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
            md.append(f"| {verdict} | {cell(str(c.get('statement', c.get('key', ''))))} | {cell(evidence)} |")
            cls = "HOLDS" if verdict.startswith("HOLD") else "no"
            page.append(f"<tr><td class='{cls}'>{html.escape(verdict)}</td>"
                        f"<td>{html.escape(str(c.get('statement', c.get('key', ''))))}</td>"
                        f"<td>{html.escape(evidence)}</td></tr>")
        md.append("")
        page.append("</table>")
        for png in _report_plots(out, study):
            with open(os.path.join(out, png), "rb") as f:
                data = base64.b64encode(f.read()).decode()
            page.append(f"<img alt='{html.escape(png)}' title='{html.escape(png)}' "
                        f"src='data:image/png;base64,{data}'>")
    page.append("</body></html>")
    paths = os.path.join(out, "index.md"), os.path.join(out, "index.html")
    write_atomic(paths[0], "\n".join(md) + "\n")
    write_atomic(paths[1], "\n".join(page) + "\n")
    return paths


def parse_studies(text: str) -> list[str]:
    """``all`` or a comma list of study numbers (``1,4``)."""
    if text == "all":
        return list(ORDER)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in STUDIES]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"{text!r}: give all or study numbers from {sorted(STUDIES)} (e.g. 1,4)")
    return keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("studies", type=parse_studies, help="all, or study numbers: 1, 2, 3, 4 (comma-separated)")
    parser.add_argument("--config", default="demo", help="each study's config name (quick | demo) or path")
    parser.add_argument("--out", required=True, help="output folder shared by the studies (reuse it to resume)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every study's config")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    run_studies(args.studies, args.config, args.out, args.overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
