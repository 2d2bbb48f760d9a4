"""Bad input stops before anything is compiled, with an error naming the field and the fix."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_models import make_tokenizer

from safety_jax.data.batches import BatchIterator
from safety_jax.errors import ConfigError, DataError
from safety_jax.model.config import get_preset
from safety_jax.model.hf import save_hf
from safety_jax.model.llama import init_params
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.run import load_run_config, run
from safety_jax.train.trainer import TrainConfig, train

VOCAB = 64
CONFIG = get_preset("tiny", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    save_hf(CONFIG, init_params(CONFIG, jax.random.key(0)), root / "model", tokenizer=make_tokenizer(VOCAB))
    make_tokenizer(VOCAB + 16).save_pretrained(root / "big_tokenizer")
    (root / "train.jsonl").write_text('{"prompt": "w3 w4", "completion": "w5 w6", "chosen": "w5", "rejected": "w7"}\n'
                                      * 16)
    return root


def _run(workspace, *overrides):
    base = [f"model={workspace / 'model'}", f"out={workspace / 'out'}", f"data.path={workspace / 'train.jsonl'}",
            "data.template=none", "data.max_length=16", "batch_size=4", "train.steps=2", "train.progress=false"]
    return run(load_run_config(None, [*base, *overrides]))


@pytest.mark.parametrize("override,match", [
    ("train.steps=ten", r"train.steps='ten' \(str\) is not a valid int"),
    ("train.steps=0", r"train.steps=0 must be an integer >= 1"),
    ("train.grad_accum=1.5", r"train.grad_accum=1.5"),
    ("train.remat=most", r"train.remat='most'; choose one of none, dots_saveable, full"),
    ("optim.lr=0", r"optim: OptimConfig.lr=0 must be a positive number"),
    ("optim.lr=fast", r"optim.lr='fast' \(str\) is not a valid float"),
    ("optim.warmup_steps=-3", r"OptimConfig.warmup_steps=-3 must be >= 0"),
    ("data.max_length=many", r"data.max_length='many'"),
    ("lora.rank=0", r"LoraConfig.rank must be a positive integer"),
])
def test_mistyped_or_out_of_range_fields_are_named(workspace, override, match):
    with pytest.raises(ConfigError, match=match):
        _run(workspace, override)


@pytest.mark.parametrize("overrides,match", [
    (["batch_size=0"], r"batch_size=0 must be a positive integer"),
    (["seed=x"], r"seed='x' \(str\) is not a valid int"),
    (["loss.beta=0", "method=dpo", "data.kind=preference"], r"loss.beta=0 must be a positive number"),
    (["loss.bta=0.1", "method=dpo", "data.kind=preference"],
     r"loss has unknown option\(s\) \['bta'\] for method='dpo'; accepted: beta, .*loss_type"),
    (["method=sft", "data.kind=preference"], r"method='sft' trains on prompt_completion data but data.kind="),
    (["method=dpo"], r"method='dpo' trains on preference data but data.kind='prompt_completion'"),
    (["dtype=bfloat16"], r"'dtype' was renamed; use param_dtype"),
    (["param_dtype=bf16"], r"param_dtype='bf16'; choose one of"),
])
def test_bad_run_config_values_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(None, ["preset=tiny", *overrides])


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: sft\npreset: tiny\noptim: {lr: 1e-4\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}, line \d+, column \d+: malformed YAML"):
        load_run_config(str(path))


def test_a_tokenizer_larger_than_the_embedding_is_refused(workspace):
    with pytest.raises(DataError, match=r"tokenizer has 80 tokens but the model's embedding has vocab_size=64"):
        _run(workspace, f"tokenizer={workspace / 'big_tokenizer'}")


def test_token_ids_outside_the_vocabulary_stop_the_trainer_before_the_first_step():
    params = init_params(CONFIG, jax.random.key(0))
    tokens = np.full((4, 8), 3, np.int32)
    tokens[2, 5] = VOCAB + 1
    examples = [{"tokens": t, "loss_mask": np.ones(8, np.int32)} for t in tokens]
    with pytest.raises(DataError, match=rf"step 1: batch\['tokens'\] holds token id {VOCAB + 1} outside the model's "
                                        rf"vocabulary \[0, {VOCAB}\)"):
        train(make_sft_loss(CONFIG), build_optimizer(OptimConfig(), params), params,
              BatchIterator(examples, 4, (8,)), TrainConfig(steps=1, progress=False), model_config=CONFIG)
