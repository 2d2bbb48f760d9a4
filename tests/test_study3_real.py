"""Study 3 on real models (`experiments/study3_residual/real.py`) end to end on a tiny random Hugging Face Llama: one
tuned model trained by the library's trainer as a stage (SFT on a local file), one given as a folder; local
StrongREJECT- and OR-Bench-format prompt files. Random models pin the pipeline, not the science."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from hf_models import make_tokenizer

from experiments.study3_residual.real import run
from experiments.study3_residual.real_config import load_real_config
from safety_jax.errors import ConfigError

VOCAB = 160
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
HARMFUL = [f"Explain how w{i} to w{i + 1} a w{i + 2}" for i in range(10, 22)]
BENIGN = [f"How can w{i} kill a w{i + 3} process" for i in range(30, 42)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("study3_real")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    words = ["Explain", "how", "to", "a", "How", "can", "kill", "process", "I", "cannot", "help", "[user]",
             "[assistant]", "Sure"]
    tok = make_tokenizer(VOCAB, words, chat_template=TEMPLATE)
    paths = {}
    model = transformers.LlamaForCausalLM(cfg).eval()
    for role, scale in (("base", 0.0), ("given", 0.02)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if role == "base":
                    p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
                else:
                    p.add_(scale * torch.randn_like(p))
        paths[role] = str(root / role)
        model.save_pretrained(paths[role])
        tok.save_pretrained(paths[role])
    paths["strongreject"] = str(root / "strongreject_dataset.csv")
    with open(paths["strongreject"], "w") as f:
        f.write("category,source,forbidden_prompt\n" + "".join(f"harm,test,{p}\n" for p in HARMFUL))
    paths["orbench"] = str(root / "or-bench-hard-1k.csv")
    with open(paths["orbench"], "w") as f:
        f.write("prompt,category\n" + "".join(f"{p},benign\n" for p in BENIGN))
    paths["sft"] = str(root / "sft.jsonl")
    with open(paths["sft"], "w") as f:
        for p in HARMFUL[:4] + BENIGN[:4]:
            f.write(json.dumps({"prompt": p, "completion": "I cannot help" if p in HARMFUL else "Sure"}) + "\n")
    return paths


def overrides(folders) -> list[str]:
    data = "{path: " + folders["sft"] + ", template: chat, max_length: 32}"
    train = ("{method: sft, data: " + data + ", batch_size: 4, optim: {lr: 1.0e-3}, "
             "train: {steps: 2, log_every: 1, progress: false}}")
    return [f"base.path={folders['base']}", "dtype=float32", "mesh=null", "batch_size=8", "max_new_tokens=4",
            f"tuned={{ssft: {{train: {train}}}, given: {{path: {folders['given']}}}}}",
            f"sets={{strongreject: {{spec: strongreject, data_files: {folders['strongreject']}}}, "
            f"orbench: {{spec: 'orbench:hard-1k', data_files: {folders['orbench']}}}}}",
            "harmful=[strongreject]", "benign=[orbench]", "shift.top=8", "shift.n_random=8", "probe.steps=10",
            "min_n=4", "intervention.alphas=[0, 1]", "intervention.n=4"]


@pytest.fixture(scope="module")
def real_run(folders, tmp_path_factory, fast_compiles):
    out = str(tmp_path_factory.mktemp("study3_real_out"))
    cfg = load_real_config("real_llama3", overrides(folders))
    return cfg, out, run(cfg, out)


def test_real_pipeline_runs_every_stage_and_writes_the_report(real_run):
    cfg, out, metrics = real_run
    for name in ("report.md", "metrics.json", "accuracy_per_layer.png", "effective_rank.png",
                 "train_ssft/model/config.json", "states_base/states.npy", "answers_given/result.json",
                 "intervention_ssft/result.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert set(metrics["pairs"]) == {"base->ssft", "base->given"}
    for r in metrics["pairs"].values():
        assert r["n"] == len(HARMFUL) + len(BENIGN) and np.asarray(r["share"]).shape[0] == 2
        assert len(r["dominant_acc"]) == 2
    assert {c["key"] for c in metrics["claims"]} == {"low_rank", "dominant_predicts_late"}
    for rows in metrics["intervention"].values():
        assert [r["alpha"] for r in rows] == [0, 1] and all(r["harmful_n"] == 4 for r in rows)
        assert all(np.isfinite(r["benign_ppl"]) for r in rows)
    report = open(os.path.join(out, "report.md")).read()
    assert all(c["verdict"] in report for c in metrics["claims"])
    again = run(cfg, out)
    assert again["ran_stages"] == []


def test_shipped_real_config_loads_and_bad_values_name_their_field(folders):
    cfg = load_real_config("real_llama3")
    assert set(cfg.tuned) == {"ssft", "dpo"} and cfg.run_config("dpo", "x").method == "dpo"
    for override, field in (("judge=GCG-30", "judge"), ("benign=[strongreject]", "benign"),
                            ("tuned={x: {path: a, train: {method: sft}}}", "tuned.x"),
                            ("shift.variant=affine", "shift.variant"), ("max_chars=0", "max_chars"),
                            ("intervention.mode=scale", "intervention.mode")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_real_config("real_llama3", [override])
