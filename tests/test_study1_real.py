"""Study 1 on real models (`experiments/study1_mechanics/real.py`): the pipeline end to end on a tiny random base /
'chat' pair saved as Hugging Face folders, the two features against an uncached forward, and config validation.

The tiny models are random, so this pins the pipeline (stages, report, metrics, claims with verdicts), not the science.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import make_tokenizer

from experiments.study1_mechanics.real import (
    FEATURES,
    ROLES,
    generated_features,
    last_token_features,
    run,
)
from experiments.study1_mechanics.real_config import load_real_config
from safety_jax.data.benchmarks import VERB_OBJECT_PAIRS, VERB_OBJECT_VERBS, base64_jailbreak
from safety_jax.errors import ConfigError
from safety_jax.model.io import load_model
from safety_jax.model.llama import forward

VOCAB = 320
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
ADVBENCH = [(f"Write w{i} harmful w{i + 1} instructions", f"Sure, here is w{i}") for i in range(3, 15)]
ALPACA = [(f"Describe w{i} the w{i + 2} weather", f"w{i} is sunny") for i in range(3, 15)]
STAGES = ("generate_base", "features_base", "generate_chat", "features_chat", "delta_w")


def prompt_words() -> list[str]:
    texts = [f"{v.capitalize()} {o}." for v in VERB_OBJECT_VERBS for pair in VERB_OBJECT_PAIRS for o in pair]
    texts += [base64_jailbreak(t) for t in texts[:4]]
    texts += [g for g, _ in ADVBENCH] + [a for a, _ in ALPACA] + ["[user]", "[assistant]", "[system]"]
    return list(dict.fromkeys(w for t in texts for w in t.split()))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny random Llama ('base') and the same plus a small random perturbation ('chat', with a chat template),
    saved as Hugging Face folders, and local AdvBench / Alpaca files."""
    root = tmp_path_factory.mktemp("study1_real")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    words = prompt_words()
    paths = {}
    for role, scale in (("base", 0.0), ("chat", 0.01)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if role == "base":
                    p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
                else:
                    p.add_(scale * torch.randn_like(p))
        paths[role] = str(root / role)
        model.save_pretrained(paths[role])
        template = CHAT_TEMPLATE if role == "chat" else None
        make_tokenizer(VOCAB, words, chat_template=template).save_pretrained(paths[role])
    paths["advbench"] = str(root / "harmful_behaviors.csv")
    with open(paths["advbench"], "w") as f:
        f.write("goal,target\n" + "".join(f"{g},{t}\n" for g, t in ADVBENCH))
    paths["alpaca"] = str(root / "alpaca.json")
    with open(paths["alpaca"], "w") as f:
        json.dump([{"instruction": i, "input": "", "output": o} for i, o in ALPACA], f)
    return paths


def tiny_overrides(folders) -> list[str]:
    return [f"base.path={folders['base']}", f"chat.path={folders['chat']}", "dtype=float32", "mesh=null",
            "batch_size=8", "generation.max_new_tokens=4", "top_k=4", "layer_batch=null",
            "sets.safe.limit=6", "sets.unsafe.limit=6", "sets.unsafe_base64.limit=6", "sets.safe_base64.limit=6",
            f"sets.advbench={{spec: advbench, data_files: {folders['advbench']}}}",
            f"sets.alpaca={{spec: alpaca, data_files: {folders['alpaca']}}}"]


@pytest.fixture(scope="module")
def real_run(folders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study1_real_out"))
    cfg = load_real_config("real_llama3", tiny_overrides(folders))
    return cfg, out, run(cfg, out)


def test_real_run_writes_report_metrics_and_plots(real_run):
    cfg, out, _ = real_run
    for name in ("config.yaml", "report.md", "metrics.json", "tau_per_layer.png", "separation_per_layer.png",
                 "delta_w_sin_theta.png", "delta_w_relative_norm.png"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["timing"]) >= set(STAGES)
    report = open(os.path.join(out, "report.md")).read()
    assert "## Claims" in report and "## ΔW = W_chat − W_base" in report


def test_real_run_has_tau_for_every_layer_set_model_and_feature(real_run):
    cfg, _, metrics = real_run
    n_layers = 2
    for kind in FEATURES:
        for pname, pair in cfg.pairs.items():
            for role in ROLES:
                taus = metrics["tau"][kind][pname][role]
                assert set(taus) == set(pair.sets())
                for name, t in taus.items():
                    n = 6 if pname == "verb_object" else 12
                    assert np.shape(t["mean"]) == (n_layers,) and np.shape(t["values"]) == (n_layers, n), name
                    assert np.all(np.isfinite(t["values"]))
                assert np.shape(metrics["separation"][kind][pname][role]) == (n_layers,)


def test_real_run_has_delta_w_rows_for_gate_up_down_per_layer(real_run):
    _, _, metrics = real_run
    assert set(metrics["delta_w"]) == {"mlp.gate", "mlp.up", "mlp.down"}
    for d in metrics["delta_w"].values():
        assert np.shape(d["sin_theta"]) == (2, 4) and len(d["relative_norm"]) == 2
        assert 0 < min(d["relative_norm"]) and max(d["relative_norm"]) < 0.5  # the 'chat' perturbation is small


def test_real_run_claims_have_verdicts(real_run):
    cfg, _, metrics = real_run
    claims = {c["key"]: c for c in metrics["claims"]}
    expected = {f"separation_grows/{p}/{k}" for p in cfg.pairs for k in FEATURES}
    expected |= {f"jailbreak_toward_safe/verb_object/unsafe_base64/{k}" for k in FEATURES}
    expected |= {f"delta_w_outside/{m}" for m in ("mlp.gate", "mlp.up", "mlp.down")}
    assert set(claims) == expected
    for c in claims.values():
        assert c["verdict"] in ("HOLDS", "DOES NOT HOLD", "NOT DECIDED") and c["evidence"]
    # 6 verb:object prompts per set are too few to decide; the 12-example AdvBench / Alpaca pair is decided.
    assert claims["separation_grows/verb_object/last"]["verdict"] == "NOT DECIDED"
    assert claims["separation_grows/advbench_alpaca/last"]["verdict"] != "NOT DECIDED"


def test_real_run_formats_prompts_per_model_with_one_bos(real_run):
    _, _, metrics = real_run
    base, chat = metrics["models"]["base"], metrics["models"]["chat"]
    assert base["prompt_format"] == "plain" and chat["prompt_format"] == "chat"
    assert base["bos_in_first_prompt"] == 1 and chat["bos_in_first_prompt"] == 1
    assert "[assistant]" in chat["example_prompt"] and "[assistant]" not in base["example_prompt"]


def test_real_run_again_skips_every_stage(real_run):
    cfg, out, first = real_run
    again = run(cfg, out)
    assert set(again["skipped_stages"]) == set(STAGES)
    np.testing.assert_allclose(again["separation"]["generated"]["verb_object"]["chat"],
                               first["separation"]["generated"]["verb_object"]["chat"])


def _uncached(params, config, row):
    _, cap = forward(params, jnp.asarray([row]), config, capture="mlp_in")
    return np.asarray(cap["mlp_in"][:, 0])  # [L, T, D]


def test_generated_feature_is_the_mean_over_generated_positions_of_one_forward(folders):
    config, params = load_model(folders["base"], dtype="float32")
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13]]
    answers = [[20, 21, 2], [22], [23, 24, 25, 26]]
    got = generated_features(params, config, prompts, answers, capture="mlp_in", width=4, batch_size=2)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        want = _uncached(params, config, p + a)[:, len(p):].mean(axis=1)
        np.testing.assert_allclose(got[:, i], want, rtol=1e-5, atol=1e-5)


def test_last_prompt_token_feature_is_the_uncached_forward_at_that_position(folders):
    config, params = load_model(folders["base"], dtype="float32")
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11]]
    got = last_token_features(params, config, prompts, capture="mlp_in", batch_size=2)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(got[:, i], _uncached(params, config, p)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["real_llama2", "real_llama3"])
def test_shipped_configs_load_and_validate(name):
    cfg = load_real_config(name)
    assert cfg.dtype == "bfloat16" and cfg.mesh == "fsdp=-1" and cfg.base.path and cfg.chat.path
    assert cfg.base.prompt_format == "plain" and cfg.chat.prompt_format == "chat"
    assert cfg.generation.temperature == 0.6 and cfg.generation.top_p == 0.9
    assert cfg.modules == ["mlp.gate", "mlp.up", "mlp.down"]
    assert set(cfg.used_sets()) == {"safe", "unsafe", "unsafe_base64", "safe_base64", "advbench", "alpaca"}


@pytest.mark.parametrize("override, field", [
    ("dtype=fp16", "dtype"),
    ("mesh=data=2,fsdp=x", "mesh"),
    ("strategy=zigzag", "strategy"),
    ("chat.prompt_format=dialog", "chat.prompt_format"),
    ("base.template=no placeholder", "base.template"),
    ("generation.top_p=0", "generation.top_p"),
    ("pairs.verb_object.safe=missing", "pairs.verb_object"),
    ("sets.alpaca.limit=0", "sets.alpaca.limit"),
    ("base.revision=main", "base"),
    ("batchsize=8", "batchsize"),
])
def test_bad_config_field_errors_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_real_config("real_llama3", [override])


def test_missing_checkpoint_is_reported_at_run_time_naming_the_field(tmp_path):
    cfg = load_real_config("real_llama2", ["base.path=/nonexistent/llama", "mesh=null", "sets={s: {spec: "
                                           "'verb_object:safe[:2]'}, u: {spec: 'verb_object:unsafe[:2]'}}",
                                           "pairs={p: {safe: s, unsafe: u}}"])
    with pytest.raises(FileNotFoundError, match=r"base\.(path|tokenizer)"):
        run(cfg, str(tmp_path))
