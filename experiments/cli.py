"""The command line every study runner shares: ``--config NAME|PATH --out DIR [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any


def study_parser(doc: str, *, default: str, configs: str, example: str) -> argparse.ArgumentParser:
    """The parser of a study runner (``doc``'s first line as its description); add study-specific flags to it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", default=default, help=f"{configs} | path/to/config.yaml")
    parser.add_argument("--out", required=True, help="output folder (re-use it to skip finished stages)")
    parser.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {example}")
    return parser


def run_study(args: argparse.Namespace, load: Callable[[str, Sequence[str]], Any], run: Callable[..., dict],
              report: str = "report.md", **run_kwargs: Any) -> dict:
    """Load the config with its overrides, run the study into ``args.out`` and print where its report is."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    metrics = run(load(args.config, args.overrides), args.out, **run_kwargs)
    print(f"report: {os.path.join(args.out, report)} ({metrics['timing']['total_this_invocation']:.0f} s)")
    return metrics
