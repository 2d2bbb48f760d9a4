"""Every shipped config goes through the one YAML reader (safety_jax.configs): each loads, and an unknown key or
malformed YAML in any of them is an error naming the file, the line and the key."""

from __future__ import annotations

import glob
import importlib
import os
import re

import pytest

from safety_jax import sweep
from safety_jax.configs import apply_overrides, read_yaml
from safety_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "experiments", "study*", "*.yaml")))


def _loader(path: str):
    study = os.path.basename(os.path.dirname(path))
    if os.path.basename(path).startswith("real"):
        return importlib.import_module(f"experiments.{study}.real_config").load_real_config
    return importlib.import_module(f"experiments.{study}.config").load_config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_loads_and_names_the_line_of_an_unknown_key(path, tmp_path):
    _loader(path)(path)
    text = open(path).read()
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if re.match(r"^[a-z_0-9]+:", line))
    bad = tmp_path / os.path.basename(path)
    bad.write_text("\n".join(lines[:first] + ["unknown_key: 1"] + lines[first:]) + "\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}, line {first + 1}: unknown key.*unknown_key"):
        _loader(path)(str(bad))


def test_the_shipped_sweep_spec_loads():
    spec = sweep.load_spec(os.path.join(ROOT, "experiments", "sweeps", "study1_lr_seed.yaml"))
    assert len(sweep.expand(spec)) == 4


def test_reader_floats_overrides_and_malformed_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1e-4\nb: {c: 2}\nlr: 3.0e-3\n")
    data = apply_overrides(read_yaml(str(path)), ["b.c=1e-5", "d.e=[1, 2]", "f=null"])
    assert data == {"a": 1e-4, "b": {"c": 1e-5}, "lr": 3e-3, "d": {"e": [1, 2]}, "f": None}
    assert data.where("b") == f"{path}, line 2" and data.child("b").where("c") == f"{path}, line 2"
    with pytest.raises(ConfigError, match="a is 0.0001, not a section"):
        apply_overrides(data, ["a.x=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides(data, ["lr"])
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml, line 2, column 1: malformed YAML"):
        read_yaml(str(path))
