"""Study 4 on real models (`experiments/study4_antidote/real.py`) end to end on a tiny random Hugging Face Llama, local
BeaverTails- and SST-2-format files and a tiny random multi-label moderation classifier: every stage runs, the results
table has a harmful score and an accuracy for the aligned model, the undefended fine-tuned model and each α, Antidote
selects the α fraction of each adapter row, and a rerun runs no stage.

The models are random, so this pins the pipeline, not the science.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from hf_models import make_tokenizer

from experiments.study4_antidote.real import COLUMNS, run
from experiments.study4_antidote.real_config import load_real_config
from safety_jax.data.benchmarks import SST2_INSTRUCTION
from safety_jax.data.text import ALPACA_PROMPT_WITH_INPUT
from safety_jax.errors import ConfigError
from safety_jax.model.io import load_model

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
CATEGORIES = ("animal_abuse", "self_harm")
RATIOS = (0.25, 0.5)
LORA = "{rank: 4, alpha: 8.0, targets: [attn.q, attn.k, attn.v]}"


def beavertails_rows(n_safe: int, n_unsafe: int, tag: str) -> list[dict]:
    rows = []
    for i in range(n_safe + n_unsafe):
        unsafe = i >= n_safe
        rows.append({"prompt": f"how do I {tag} thing {i} ?",
                     "response": f"Sure , here is how {i} ." if unsafe else f"sorry , I cannot help {i} .",
                     "category": {c: unsafe and j == i % 2 for j, c in enumerate(CATEGORIES)}, "is_safe": not unsafe})
    return rows


def sst2_rows(n: int, offset: int) -> list[dict]:
    return [{"idx": i, "sentence": f"the film was {'good' if i % 2 else 'bad'} {i + offset}", "label": i % 2}
            for i in range(n)]


def vocabulary(*texts: str) -> list[str]:
    return list(dict.fromkeys(w for t in texts for w in t.split()))


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else
                    (0.3 if name.startswith("score") else 0.08) * torch.randn_like(p))
    return model.eval()


def _jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("study4_real")
    files = {"bt_train": _jsonl(root / "bt_train.jsonl", beavertails_rows(4, 6, "do")),
             "bt_test": _jsonl(root / "bt_test.jsonl", beavertails_rows(2, 4, "try")),
             "sst2_train": _jsonl(root / "sst2_train.jsonl", sst2_rows(4, 0)),
             "sst2_val": _jsonl(root / "sst2_val.jsonl", sst2_rows(4, 100))}
    texts = [ALPACA_PROMPT_WITH_INPUT, SST2_INSTRUCTION, "positive negative BEGINNING OF CONVERSATION: USER: "
             "ASSISTANT:"]
    for name in files:
        with open(files[name]) as f:
            texts += [" ".join(str(v) for v in json.loads(line).values() if isinstance(v, str)) for line in f]
    tokenizer = make_tokenizer(VOCAB, vocabulary(*texts))
    base = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)), seed=0)
    files["model"] = str(root / "base")
    base.save_pretrained(files["model"])
    tokenizer.save_pretrained(files["model"])
    judge_cfg = transformers.LlamaConfig(**TINY, num_labels=len(CATEGORIES), id2label=dict(enumerate(CATEGORIES)),
                                         label2id={c: i for i, c in enumerate(CATEGORIES)},
                                         problem_type="multi_label_classification")
    files["judge"] = str(root / "judge")
    _randomize(transformers.LlamaForSequenceClassification(judge_cfg), seed=1).save_pretrained(files["judge"])
    tokenizer.save_pretrained(files["judge"])
    return files


def tiny_overrides(f) -> list[str]:
    return [f"model={f['model']}", "dtype=float32", "max_length=96",
            f"alignment.data_files={f['bt_train']}", "alignment.n=4", f"alignment.lora={LORA}", "alignment.epochs=1",
            "alignment.batch_size=2",
            "user.task=sst2", f"user.task_data_files={f['sst2_train']}", f"user.harmful_data_files={f['bt_train']}",
            "user.n=4", "user.p=[0.5]", "user.lrs=[1.0e-3]", "user.epochs=[1]", "user.batch_size=2",
            f"user.lora={LORA}",
            f"antidote.data_files={f['bt_train']}", f"antidote.ratios=[{', '.join(map(str, RATIOS))}]",
            "antidote.scores=[wanda]", "antidote.n_calibration=4", "antidote.batch_size=2",
            f"eval.harmful_data_files={f['bt_test']}", f"eval.task_data_files={f['sst2_val']}", "eval.n_harmful=4",
            "eval.n_task=4", f"eval.judge={f['judge']}", "eval.max_new_tokens=3", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def real_run(folders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study4_real_out"))
    cfg = load_real_config("real_llama2", tiny_overrides(folders))
    return cfg, out, run(cfg, out)


CELL = "p0.5_lr0.001_ep1"
STAGES = ["align", f"user_{CELL}", *(f"antidote_{CELL}_wanda_a{a:g}" for a in RATIOS), "eval_aligned",
          f"eval_{CELL}", *(f"eval_antidote_{CELL}_wanda_a{a:g}" for a in RATIOS)]


def test_every_stage_runs_and_the_report_is_written(real_run):
    _, out, metrics = real_run
    assert sorted(metrics["ran_stages"]) == sorted(STAGES) and not metrics["skipped_stages"]
    for name in ("config.yaml", "report.md", "results.md", "metrics.json", "align/model/config.json",
                 f"user_{CELL}/lora/lora.safetensors", f"antidote_{CELL}_wanda_a0.25/masks.safetensors",
                 f"eval_{CELL}/harmful/verdicts.jsonl", f"eval_{CELL}/task/table.json"):
        assert os.path.exists(os.path.join(out, name)), name
    results = open(os.path.join(out, "results.md")).read()
    assert all(col in results for col in COLUMNS)
    assert "## Results" in open(os.path.join(out, "report.md")).read()


def test_results_have_harmful_score_and_accuracy_per_alpha_and_reference_rows(real_run):
    _, _, metrics = real_run
    rows = metrics["rows"]
    assert [r["model"] for r in rows] == ["aligned", "fine-tuned", "antidote", "antidote"]
    assert [r.get("ratio") for r in rows[2:]] == list(RATIOS)
    for r in rows:
        assert r["harmful_n"] == 4 and r["task_n"] == 4 and r["harmful_metric"] == "flagged"
        assert 0 <= r["harmful_k"] <= 4 and 0 <= r["task_k"] <= 4
    assert metrics["user"][CELL] == {"n": 4, "n_harmful": 2, "final_loss": metrics["user"][CELL]["final_loss"]}
    assert np.isfinite(metrics["user"][CELL]["final_loss"]) and np.isfinite(metrics["alignment"]["final_loss"])
    # the user's harmful pairs are the first 2 unsafe rows; the calibration pairs the 4 after them
    assert metrics["calibration_skip"] == 2


def test_alignment_changes_the_model_and_antidote_prunes_the_alpha_fraction_of_each_adapter(real_run, folders):
    _, out, _ = real_run
    _, base = load_model(folders["model"], dtype="float32")
    _, aligned = load_model(os.path.join(out, "align", "model"), dtype="float32")
    assert float(np.abs(np.asarray(aligned["layers"]["attn"]["q"]) - np.asarray(base["layers"]["attn"]["q"])).max()) > 0
    np.testing.assert_array_equal(aligned["layers"]["mlp"]["up"], base["layers"]["mlp"]["up"])  # not adapted
    for a in RATIOS:
        with open(os.path.join(out, f"antidote_{CELL}_wanda_a{a:g}", "result.json")) as f:
            result = json.load(f)
        assert set(result["selected"]) == {f"attn.{m}.{ab}" for m in "qkv" for ab in "ab"}
        assert all(v == pytest.approx(a) for v in result["selected"].values()), result  # α of every row, all layers
        assert result["calibration_samples"] == 4


def test_rerun_runs_no_stage(real_run):
    cfg, out, first = real_run
    again = run(cfg, out)
    assert again["ran_stages"] == [] and sorted(again["skipped_stages"]) == sorted(STAGES)
    assert again["rows"] == first["rows"]


@pytest.mark.parametrize("name", ["real_llama2", "real_llama3"])
def test_shipped_real_configs_load_and_validate(name):
    cfg = load_real_config(name)
    assert cfg.defense == ["none", "antidote"] and cfg.user.task == "gsm8k" and cfg.user.template == "alpaca"
    assert cfg.antidote.target == "lora" and cfg.antidote.modules == ["attn.q", "attn.k", "attn.v"]
    assert cfg.eval.max_new_tokens == 512 and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("override, field", [
    ("defense=[none, lisa]", "defense"), ("dtype=fp16", "dtype"), ("antidote.modules=[attn.o]", "antidote.modules"),
    ("user.template=vicuna", "user.template"), ("max_length=1", "max_length"),
])
def test_bad_runner_fields_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_real_config("real_llama2", [override])


def test_missing_model_folder_is_reported_naming_the_field(tmp_path):
    cfg = load_real_config("real_llama2", [f"model={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="model="):
        run(cfg, str(tmp_path / "out"))


def test_a_new_alpha_runs_only_its_own_stages(real_run, folders, tmp_path):
    _, out, _ = real_run
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    cfg = load_real_config("real_llama2", [*tiny_overrides(folders), "antidote.ratios=[0.25, 0.75]"])
    metrics = run(cfg, copy)
    assert sorted(metrics["ran_stages"]) == [f"antidote_{CELL}_wanda_a0.75", f"eval_antidote_{CELL}_wanda_a0.75"]
    assert [r.get("ratio") for r in metrics["rows"]] == [None, None, 0.25, 0.75]
