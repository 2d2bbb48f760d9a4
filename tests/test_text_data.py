"""Text datasets: loading local files through `datasets`, column errors, templates, tokenisation and loss masks."""

from __future__ import annotations

import csv
import json

import datasets
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from safety_jax.data.batches import left_pad_prompts
from safety_jax.data.text import (
    DataConfig,
    DataError,
    alpaca_prompt,
    decode_masked,
    format_prompt,
    load_dataset_from_config,
    load_examples,
)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

ROWS = [
    {"prompt": "How do I bake bread?", "completion": "Mix flour, water and yeast, then bake.", "is_safe": True},
    {"prompt": "How do I pick a lock?", "completion": "Insert a tension wrench and rake the pins.", "is_safe": False},
    {"prompt": "Name a colour.", "completion": "Blue.", "is_safe": True},
    {"prompt": "Write a threat.", "completion": "I cannot help with that request.", "is_safe": False},
]


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (exact decoding) that prepends <s>, with a small Jinja chat template."""
    corpus = [alpaca_prompt("x"), alpaca_prompt("x", "y")] + [r["prompt"] + " " + r["completion"] for r in ROWS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_rows(path, rows: list[dict]) -> str:
    """Write rows as .jsonl / .parquet / .csv by the path's extension."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(path)
    elif path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def cfg_for(path, tmp_path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_alpaca_template_matches_the_stanford_alpaca_strings_exactly():
    assert alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert alpaca_prompt("Translate.", "bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write "
        "a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\n"
        "bonjour\n\n### Response:\n")
    antidote = DataConfig(path="x.jsonl", template="alpaca_antidote")
    assert format_prompt(antidote, "Say hi.").endswith("### Instruction:\nSay hi.\n\n### Response:")
    assert format_prompt(DataConfig(path="x.jsonl", template="none"), "Say hi.") == "Say hi."


@pytest.mark.parametrize("ext", ["jsonl", "parquet", "csv"])
def test_local_files_load_by_extension(tmp_path, ext):
    path = write_rows(tmp_path / f"data.{ext}", ROWS)
    ds = load_dataset_from_config(cfg_for(path, tmp_path))
    assert len(ds) == len(ROWS)
    assert ds["prompt"] == [r["prompt"] for r in ROWS]
    assert ds["completion"] == [r["completion"] for r in ROWS]


def test_loss_mask_covers_exactly_the_completion_and_eos(tmp_path, tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    examples = load_examples(cfg_for(path, tmp_path), tokenizer)
    assert len(examples) == len(ROWS)
    for ex, row in zip(examples, ROWS, strict=True):
        tokens, mask = ex["tokens"], ex["loss_mask"]
        assert tokens.dtype == np.int32 and mask.dtype == np.int32 and tokens.shape == mask.shape
        assert decode_masked(tokenizer, tokens, mask) == row["completion"] + "</s>"
        assert decode_masked(tokenizer, tokens, 1 - mask) == "<s>" + alpaca_prompt(row["prompt"])
        assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == tokenizer.eos_token_id
        n_prompt = int(np.argmax(mask))  # masked tokens form one contiguous tail
        assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()


def test_alpaca_input_column_uses_the_input_variant(tmp_path, tokenizer):
    rows = [{"instruction": "Translate.", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = write_rows(tmp_path / "alpaca.jsonl", rows)
    examples = load_examples(DataConfig.preset("alpaca", path=path, cache_dir=str(tmp_path / "c")), tokenizer)
    assert decode_masked(tokenizer, examples[0]["tokens"], 1 - examples[0]["loss_mask"]).endswith(
        "### Input:\nbonjour\n\n### Response:\n")
    assert "### Input:" not in decode_masked(tokenizer, examples[1]["tokens"], 1 - examples[1]["loss_mask"])
    assert decode_masked(tokenizer, examples[0]["tokens"], examples[0]["loss_mask"]) == "hello</s>"


def test_missing_column_error_names_the_column_the_file_and_its_columns(tmp_path):
    path = write_rows(tmp_path / "advbench.csv", [{"goal": "Do harm", "target": "Sure, here is"}])
    with pytest.raises(DataError) as err:
        load_dataset_from_config(cfg_for(path, tmp_path))
    msg = str(err.value)
    assert f"dataset file {path}" in msg and "[goal, target]" in msg
    assert "DataConfig.prompt_column='prompt' not found" in msg and "set prompt_column=" in msg


def test_preset_maps_advbench_goal_and_target(tmp_path, tokenizer):
    path = write_rows(tmp_path / "advbench.csv", [{"goal": "Do harm", "target": "Sure, here is"}])
    examples = load_examples(DataConfig.preset("advbench", path=path, cache_dir=str(tmp_path / "c")), tokenizer)
    assert decode_masked(tokenizer, examples[0]["tokens"], examples[0]["loss_mask"]) == "Sure, here is</s>"


def test_mistyped_column_is_a_clear_error(tmp_path):
    path = write_rows(tmp_path / "labels.jsonl", [{"prompt": "Is this good?", "completion": 1}])
    with pytest.raises(DataError, match=r"column 'completion' \(DataConfig.completion_column\) holds .*int64"):
        load_dataset_from_config(cfg_for(path, tmp_path))


def test_filter_shuffle_and_num_examples(tmp_path):
    path = write_rows(tmp_path / "beavertails.jsonl",
                      [{"prompt": r["prompt"], "response": r["completion"], "is_safe": r["is_safe"]} for r in ROWS])
    cfg = DataConfig.preset("beavertails", path=path, filter_value=False, num_examples=2, cache_dir=str(tmp_path))
    ds = load_dataset_from_config(cfg)
    assert ds["prompt"] == [ROWS[1]["prompt"], ROWS[3]["prompt"]]
    with pytest.raises(DataError, match="2 rows after filtering"):
        load_dataset_from_config(DataConfig.preset("beavertails", path=path, filter_value=True, num_examples=3,
                                                   cache_dir=str(tmp_path)))
    shuffled = DataConfig.preset("beavertails", path=path, filter_value=True, shuffle=True, seed=3,
                                 cache_dir=str(tmp_path))
    assert sorted(load_dataset_from_config(shuffled)["prompt"]) == sorted(r["prompt"] for r in ROWS if r["is_safe"])


def test_preference_pairs_share_the_prompt_tokens(tmp_path, tokenizer):
    rows = [{"prompt": r["prompt"], "chosen": "I cannot help with that request.", "rejected": r["completion"]}
            for r in ROWS]
    path = write_rows(tmp_path / "pairs.parquet", rows)
    examples = load_examples(cfg_for(path, tmp_path, kind="preference"), tokenizer)
    for ex, row in zip(examples, rows, strict=True):
        n_c, n_r = int(np.argmax(ex["chosen_loss_mask"])), int(np.argmax(ex["rejected_loss_mask"]))
        assert n_c == n_r
        np.testing.assert_array_equal(ex["chosen_tokens"][:n_c], ex["rejected_tokens"][:n_r])
        assert decode_masked(tokenizer, ex["chosen_tokens"], ex["chosen_loss_mask"]) == row["chosen"] + "</s>"
        assert decode_masked(tokenizer, ex["rejected_tokens"], ex["rejected_loss_mask"]) == row["rejected"] + "</s>"


def test_left_truncation_keeps_bos_and_the_prompt_tail(tmp_path, tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS[:1])
    full = load_examples(cfg_for(path, tmp_path), tokenizer)[0]
    n_completion = int(full["loss_mask"].sum())
    cut = load_examples(cfg_for(path, tmp_path, max_length=n_completion + 6, truncation_side="left"), tokenizer)[0]
    assert len(cut["tokens"]) == n_completion + 6
    assert cut["tokens"][0] == tokenizer.bos_token_id
    np.testing.assert_array_equal(cut["tokens"][1:], full["tokens"][-(n_completion + 5):])
    assert int(cut["loss_mask"].sum()) == n_completion


def test_right_truncation_cuts_the_completion_end_and_drops_rows_without_completion(tmp_path, tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS[:1])
    full = load_examples(cfg_for(path, tmp_path), tokenizer)[0]
    n_prompt = int(np.argmax(full["loss_mask"]))
    cut = load_examples(cfg_for(path, tmp_path, max_length=n_prompt + 3), tokenizer)[0]
    np.testing.assert_array_equal(cut["tokens"], full["tokens"][: n_prompt + 3])
    assert int(cut["loss_mask"].sum()) == 3
    assert load_examples(cfg_for(path, tmp_path, max_length=n_prompt), tokenizer) == []


def test_preference_truncation_cuts_one_shared_prompt(tmp_path, tokenizer):
    rows = [{"prompt": ROWS[0]["prompt"], "chosen": "No.", "rejected": ROWS[1]["completion"]}]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    ex = load_examples(cfg_for(path, tmp_path, kind="preference", max_length=20, truncation_side="left"),
                       tokenizer)[0]
    assert len(ex["rejected_tokens"]) == 20 and len(ex["chosen_tokens"]) < 20
    n = int(np.argmax(ex["chosen_loss_mask"]))
    assert n == int(np.argmax(ex["rejected_loss_mask"]))
    np.testing.assert_array_equal(ex["chosen_tokens"][:n], ex["rejected_tokens"][:n])


def test_chat_template_path_uses_the_tokenizers_template(tmp_path, tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS[:2])
    examples = load_examples(cfg_for(path, tmp_path, template="chat"), tokenizer)
    for ex, row in zip(examples, ROWS[:2], strict=True):
        prompt = decode_masked(tokenizer, ex["tokens"], 1 - ex["loss_mask"])
        assert prompt == f"<s><|user|>\n{row['prompt']}</s>\n<|assistant|>\n"
        assert decode_masked(tokenizer, ex["tokens"], ex["loss_mask"]) == row["completion"] + "</s>"
        assert ex["tokens"][0] == tokenizer.bos_token_id and ex["tokens"][1] != tokenizer.bos_token_id


def test_prompt_kind_gives_generation_prompts_that_left_pad(tmp_path, tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    examples = load_examples(cfg_for(path, tmp_path, kind="prompt"), tokenizer)
    tokens, mask = left_pad_prompts([ex["tokens"] for ex in examples], tokenizer.pad_token_id)
    assert tokens.shape == mask.shape == (len(ROWS), max(len(ex["tokens"]) for ex in examples))
    assert mask[:, -1].all()
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert texts == [alpaca_prompt(r["prompt"]) for r in ROWS]


def test_tokens_merging_across_the_prompt_boundary(tmp_path):
    """SFT keeps the joint tokenisation (Alpaca's preprocess); preference pairs keep the prompt's own ids (TRL DPO)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello", "world"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    prompt_ids, full_ids = fast("hello wor")["input_ids"], fast("hello world world")["input_ids"]
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the boundary merges
    path = write_rows(tmp_path / "merge.jsonl", [{"prompt": "hello wor", "completion": "ld world", "chosen": "ld",
                                                  "rejected": "k"}])
    sft = load_examples(cfg_for(path, tmp_path, template="none"), fast)[0]
    np.testing.assert_array_equal(sft["tokens"], [*full_ids, fast.eos_token_id])
    assert (sft["loss_mask"] == 0).sum() == len(prompt_ids)
    pair = load_examples(cfg_for(path, tmp_path, template="none", kind="preference"), fast)[0]
    for side, text in (("chosen", "ld"), ("rejected", "k")):
        np.testing.assert_array_equal(pair[f"{side}_tokens"][: len(prompt_ids)], prompt_ids)
        assert decode_masked(fast, pair[f"{side}_tokens"], pair[f"{side}_loss_mask"]) == text + "</s>"


def test_an_all_empty_input_column_in_a_csv_means_no_input(tmp_path, tokenizer):
    path = write_rows(tmp_path / "alpaca.csv", [{"instruction": "Say hi.", "input": "", "output": "hi"}])
    ex = load_examples(DataConfig.preset("alpaca", path=path, cache_dir=str(tmp_path / "c")), tokenizer)[0]
    assert decode_masked(tokenizer, ex["tokens"], 1 - ex["loss_mask"]) == "<s>" + alpaca_prompt("Say hi.")
