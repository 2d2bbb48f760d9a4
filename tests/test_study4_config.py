"""Study 4 configs: every shipped YAML loads and validates; a bad value is an error that names its field."""

from __future__ import annotations

import pytest

from experiments.study1_mechanics.run import finetune_runs
from experiments.study4_antidote.config import load_config
from experiments.study4_antidote.real_config import load_real_config
from safety_jax.errors import ConfigError


@pytest.mark.parametrize("name", ["quick", "demo"])
def test_synthetic_configs_load(name):
    cfg = load_config(name)
    assert cfg.study1 == name and cfg.alignment.run in finetune_runs(cfg.study1_config())


@pytest.mark.parametrize("name", ["real_llama2", "real_llama3"])
def test_real_configs_load_with_the_reference_settings(name):
    cfg = load_real_config(name)
    assert cfg.alignment.lora["rank"] == 256 and cfg.alignment.lora["alpha"] == 4.0
    assert cfg.alignment.epochs == 20 and cfg.alignment.batch_size == 5 and cfg.alignment.weight_decay == 0.1
    assert cfg.user.n == 5000 and cfg.user.template == "alpaca" and cfg.antidote.n_calibration == 2000
    assert cfg.eval.n_harmful == 1000 and cfg.eval.max_new_tokens == 512


@pytest.mark.parametrize("override, field", [
    ("defense=[none, prune]", "defense"), ("user.p=[1.5]", "user.p"), ("user.lrs=[]", "user.lrs"),
    ("user.epochs=[0]", "user.epochs"), ("user.batch_size=0", "user.batch_size"),
    ("user.lora={rank: 0}", "user.lora"), ("antidote.ratios=[0.0]", "antidote.ratios"),
    ("antidote.scores=[sparsegpt]", "antidote.scores"), ("antidote.target=lora", "antidote.target"),
    ("antidote.headline_ratio=0.3", "antidote.headline_ratio"), ("eval.n_test=0", "eval.n_test"),
    ("alignment.run=ssft", "alignment.run"), ("user.colour=1", "user"),
])
def test_bad_synthetic_values_name_their_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("quick", [override])


@pytest.mark.parametrize("override, field", [
    ("user.task=imdb", "user.task"), ("alignment.lora={rank: -1}", "alignment.lora"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"), ("antidote.target=both", "antidote.target"),
    ("model=''", "model"), ("extra=1", "unknown key 'extra'"),
])
def test_bad_real_values_name_their_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_real_config("real_llama2", [override])
