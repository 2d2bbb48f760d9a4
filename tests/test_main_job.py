"""The main job's index: every study's claims with verdicts and a link to its report, plots embedded in the HTML,
studies that did not run said so; the study list is parsed and checked before anything runs."""

from __future__ import annotations

import argparse
import base64
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from experiments import main  # noqa: E402


def _study_output(out, folder, claims, plot=None):
    d = os.path.join(out, folder)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump({"claims": claims}, f)
    body = "# report\n"
    if plot:
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        fig.savefig(os.path.join(d, plot))
        plt.close(fig)
        body += f"\n![a plot]({plot})\n"
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write(body)


def test_index_lists_each_studys_claims_and_embeds_its_plots(tmp_path):
    out = str(tmp_path)
    _study_output(out, "", [{"key": "a", "statement": "Separation grows", "holds": True, "evidence": "z = 3.9"},
                            {"key": "b", "statement": "Lipschitz | falls", "holds": False, "evidence": "p = 0.4"}],
                  plot="tau.png")
    _study_output(out, "study4_antidote", [{"key": "c", "statement": "Antidote lowers harm", "holds": True,
                                            "verdict": "HOLDS", "evidence": "0.8 %"}], plot="alpha.png")
    md_path, html_path = main.write_index(out)
    md = open(md_path).read()
    assert "[report](report.md) · 1 of 2 claims hold" in md
    assert "[report](study4_antidote/report.md) · 1 of 1 claims hold" in md
    assert "| HOLDS | Separation grows | z = 3.9 |" in md and "| DOES NOT HOLD | Lipschitz \\| falls | p = 0.4 |" in md
    assert md.count("Not run in this folder.") == 2  # studies 2 and 3
    page = open(html_path).read()
    for png in ("tau.png", os.path.join("study4_antidote", "alpha.png")):
        data = base64.b64encode(open(os.path.join(out, png), "rb").read()).decode()
        assert f"src='data:image/png;base64,{data}'" in page
    assert "Lipschitz | falls" in page and "<td class='no'>DOES NOT HOLD</td>" in page


def test_study_list_is_checked_before_anything_runs():
    assert main.parse_studies("all") == ["1", "4", "3", "2"]
    assert main.parse_studies("4,1") == ["4", "1"]
    with pytest.raises(argparse.ArgumentTypeError, match="study numbers"):
        main.parse_studies("5")
    with pytest.raises(SystemExit):
        main.main(["7", "--out", "x"])
