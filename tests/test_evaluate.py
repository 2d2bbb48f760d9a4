"""`safety-jax eval` and `eval.evaluate` on a tiny random Llama and a local BeaverTails-format file: the table against a
recount of the verdicts and a textbook Wilson interval, a resume after a crash that regenerates nothing already
answered and reproduces an uninterrupted run's sampled answers, settings that are never mixed, torn trailing lines,
bad input named by flag before any weights load, and `generate --chat` tokenising the template once."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from hf_models import make_tokenizer

from safety_jax import cli
from safety_jax.errors import ConfigError
from safety_jax.eval import evaluate as ev
from safety_jax.eval.judges import load_judge
from safety_jax.eval.stats import wilson
from safety_jax.model import generate as gen

VOCAB = 64
CATEGORIES = ("animal_abuse", "privacy_violation", "self_harm")
N_ROWS, BATCH, NEW = 8, 4, 8
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")
SAMPLED = dict(template="none", batch_size=BATCH, max_new_tokens=NEW, temperature=1.0, seed=3, progress=False)


REFUSAL_WORDS = ["user", "assistant", "Sorry", "Sorry,", "illegal", "illegal.", "unethical", "unethical.", "OpenAI",
                 "Hello!"]  # chat roles, and GCG-29 refusal strings so a random model refuses in some answers


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    return make_tokenizer(VOCAB, REFUSAL_WORDS, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("eval") / "model"
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """BeaverTails' published format: prompt, response, category {name: bool}, is_safe."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("eval") / "beavertails.jsonl"
    with open(path, "w") as f:
        for i in range(N_ROWS):
            flags = {c: bool(rng.random() < 0.5) for c in CATEGORIES}
            words = " ".join(f"w{w}" for w in rng.integers(13, VOCAB, 3 + i % 3))
            f.write(json.dumps({"prompt": words, "response": "w9", "category": flags,
                                "is_safe": not any(flags.values())}) + "\n")
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return ev.EvalModel.load(model_dir)


@pytest.fixture(scope="module")
def examples(data_file):
    from safety_jax.data.benchmarks import load_benchmark

    return load_benchmark("beavertails:30k_test", data_files=[str(data_file)])


@pytest.fixture(scope="module")
def uninterrupted(model, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "whole"
    ev.evaluate(model, examples, load_judge("GCG-29"), out_dir=out, **SAMPLED)
    return out


def _jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _textbook_wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The interval's ends as the roots in p of (k/n − p)² = z² p (1 − p) / n."""
    ph = k / n
    roots = np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph])
    return float(min(roots.real)), float(max(roots.real))


def test_eval_cli_table_counts_equal_a_recount_of_the_verdicts(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["eval", "--model", str(model_dir), "--data", "beavertails:30k_test", "--data-files", str(data_file),
              "--judge", "GCG-29", "--out", str(out), "--batch-size", str(BATCH), "--max-new-tokens", str(NEW),
              "--temperature", "1.0", "--no-progress"])
    printed = capsys.readouterr().out
    table = json.loads((out / "table.json").read_text())
    verdicts, answers = _jsonl(out / "verdicts.jsonl"), _jsonl(out / "answers.jsonl")
    assert len(verdicts) == len(answers) == N_ROWS == table["n"]
    assert len({a["settings_hash"] for a in answers}) == 1 and table["settings_hash"] == answers[0]["settings_hash"]
    assert table["judge"] and table["dataset"] == "beavertails:30k_test" and table["settings"]["template"] == "chat"

    groups = {"all": verdicts}
    for v in verdicts:
        for c in (v["category"] or "").split(";"):
            if c:
                groups.setdefault(c, []).append(v)
    rows = {(r["group"], r["metric"]): r for r in table["rows"]}
    assert set(rows) == {(g, "refused") for g in groups}
    for g, vs in groups.items():
        r = rows[(g, "refused")]
        k = sum(bool(v["refused"]) for v in vs)
        assert (r["k"], r["n"]) == (k, len(vs)) and r["rate"] == pytest.approx(k / len(vs))
        np.testing.assert_allclose((r["ci_low"], r["ci_high"]), _textbook_wilson(k, len(vs)), atol=1e-9)
        assert f"| {g} | refused | {k} / {len(vs)} |" in printed
    assert (out / "table.md").read_text().strip() in printed
    assert 0 < rows[("all", "refused")]["k"] < N_ROWS  # the tiny model refuses sometimes: both outcomes are counted


def test_wilson_matches_the_textbook_interval_and_the_edges():
    for k, n in ((0, 10), (3, 10), (10, 10), (1, 1), (47, 200)):
        np.testing.assert_allclose(wilson(k, n), np.clip(_textbook_wilson(k, n), 0, 1), atol=1e-12)
    assert wilson(0, 0) == (0.0, 1.0)


def test_resume_after_a_crash_generates_only_missing_ids_and_reproduces_the_uninterrupted_answers(
        model, examples, uninterrupted, tmp_path, monkeypatch):
    real, calls = gen.generate_text, []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(list(args[3]))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(gen, "generate_text", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        ev.evaluate(model, examples, load_judge("GCG-29"), out_dir=out, **SAMPLED)
    first = _jsonl(out / "answers.jsonl")
    assert [a["id"] for a in first] == [e.id for e in examples[:BATCH]]
    with open(out / "answers.jsonl", "a") as f:  # a kill in the middle of the next batch's write
        f.write(json.dumps({"id": examples[BATCH].id, "answer": "w9 w9"})[:-7])

    calls.clear()

    def counting(*args, **kwargs):
        calls.append(list(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_text", counting)
    table = ev.evaluate(model, examples, load_judge("GCG-29"), out_dir=out, **SAMPLED)
    assert calls == [[e.prompt for e in examples[BATCH:]]]  # one batch: the first batch's ids are not regenerated
    resumed, whole = _jsonl(out / "answers.jsonl"), _jsonl(uninterrupted / "answers.jsonl")
    assert [a["id"] for a in resumed] == [e.id for e in examples]  # the torn line is gone
    assert {a["id"]: a["answer"] for a in resumed} == {a["id"]: a["answer"] for a in whole}
    assert len({a["answer"] for a in whole}) > 1  # sampled, not one repeated answer
    assert table.rows == tuple(json.loads((uninterrupted / "table.json").read_text())["rows"])

    calls.clear()
    ev.evaluate(model, examples, load_judge("GCG-29"), out_dir=out, **SAMPLED)  # everything cached
    assert calls == []


def test_other_settings_are_refused_not_mixed(model, examples, uninterrupted):
    for change, named in ((dict(seed=4), "seed: 3 → 4"), (dict(template="alpaca"), "template: 'none' → 'alpaca'"),
                          (dict(max_new_tokens=NEW + 1), "max_new_tokens"), (dict(temperature=0.0), "temperature")):
        with pytest.raises(ConfigError, match="other settings") as info:
            ev.evaluate(model, examples, load_judge("GCG-29"), out_dir=uninterrupted, **{**SAMPLED, **change})
        assert named in str(info.value)
    assert len(_jsonl(uninterrupted / "answers.jsonl")) == N_ROWS


def test_a_cached_id_with_another_prompt_is_an_error(model, examples, uninterrupted):
    from dataclasses import replace

    from safety_jax.errors import DataError

    changed = [replace(examples[0], prompt="w13 w13"), *examples[1:]]
    with pytest.raises(DataError, match="another prompt"):
        ev.evaluate(model, changed, load_judge("GCG-29"), out_dir=uninterrupted, **SAMPLED)


def test_read_answers_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = [{"id": "a", "answer": "x"}, {"id": "b", "answer": "y"}]
    body = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(body + '{"id": "c", "answ')
    assert list(ev.read_answers(path)) == ["a", "b"] and path.read_text() == body
    path.write_text(body + "not json\n" + body)
    with pytest.raises(ValueError, match="line 3"):
        ev.read_answers(path)


def test_categories_and_tabulation_count_an_example_in_each_of_its_categories(examples):
    from safety_jax.data.benchmarks import EvalExample

    exs = [EvalExample("0", "p", category="a;b"), EvalExample("1", "p", category="b"), EvalExample("2", "p")]
    rows = ev.tabulate(exs, [{"ok": True}, {"ok": False}, {"ok": None}], ("ok",))
    got = {r["group"]: (r["k"], r["n"]) for r in rows}
    assert got == {"all": (1, 2), "a": (1, 1), "b": (1, 2)}  # None: undecided, left out of n


@pytest.mark.parametrize(("change", "flag"), [
    ({"--model": "/no/such/folder"}, "--model"),
    ({"--judge": "no-such-judge"}, "--judge"),
    ({"--data": "beavertails:no_split"}, "--data"),
    ({"--data": "not a spec!"}, "--data"),
    ({"--lora": "/no/such/lora"}, "--lora"),
    ({"--top-p": "0"}, "--top-p"),
])
def test_bad_eval_input_is_an_error_naming_the_flag_before_any_weights_load(change, flag, model_dir, data_file,
                                                                            tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(ev.EvalModel, "load", no_load)
    argv = {"--model": str(model_dir), "--data": "beavertails:30k_test", "--data-files": str(data_file),
            "--judge": "GCG-29", "--out": str(tmp_path / "o"), **change}
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", *[x for kv in argv.items() for x in kv]])
    assert info.value.code == 2
    assert f"eval {flag}:" in capsys.readouterr().err


def test_chat_template_without_one_is_a_template_error(model_dir, data_file, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    tok = transformers.AutoTokenizer.from_pretrained(bare)
    tok.chat_template = None
    tok.save_pretrained(bare)
    for f in bare.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(bare), "--data", "beavertails:30k_test", "--data-files", str(data_file),
                  "--judge", "GCG-29", "--out", str(tmp_path / "o")])
    assert "eval --template: chat needs a tokenizer with a chat_template" in capsys.readouterr().err


def test_generate_chat_tokenises_the_template_once(model_dir, capsys):
    from safety_jax.model.io import load_model

    cli.main(["generate", "--model", str(model_dir), "--prompt", "w20 w33", "--chat", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    tok = _tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "w20 w33"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    assert ids.count(1) == 1 and ids[0] == 1  # one BOS: the template's
    config, params = load_model(model_dir)
    new, n = gen.generate(params, config, np.asarray([ids]), max_new_tokens=6, eos_token_ids=(2,), pad_token_id=0)
    expected = tok.decode(np.asarray(new)[0, : int(n[0])], skip_special_tokens=True)
    assert f"### w20 w33\n{expected}\n" in printed


def test_sharded_batch_gives_the_single_device_answers(model, examples, tmp_path):
    import jax

    from safety_jax.parallel import make_mesh

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh = make_mesh("data=2", devices=jax.devices()[:2])
    greedy = {**SAMPLED, "temperature": 0.0}
    plain = ev.evaluate(model, examples, load_judge("GCG-29"), out_dir=tmp_path / "one", **greedy)
    sharded = ev.evaluate(model, examples, load_judge("GCG-29"), out_dir=tmp_path / "two", mesh=mesh, **greedy)
    assert _jsonl(tmp_path / "one" / "answers.jsonl") == _jsonl(tmp_path / "two" / "answers.jsonl")
    assert plain.rows == sharded.rows and not math.isnan(plain.rows[0]["rate"])


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random multi-label Llama sequence classifier (a moderation judge's format), with the tokenizer."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=2,
                                   problem_type="multi_label_classification")
    clf = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        clf.score.weight.copy_(2.0 * torch.randn_like(clf.score.weight))
    path = tmp_path_factory.mktemp("eval") / "classifier"
    clf.save_pretrained(path, safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return path


def test_cached_answers_are_judged_again_by_a_classifier_without_generating(model, examples, uninterrupted,
                                                                             classifier_dir, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "rejudged"
    shutil.copytree(uninterrupted, out)
    monkeypatch.setattr(gen, "generate_text", lambda *a, **k: pytest.fail("cached answers were generated again"))
    judge = load_judge(classifier_dir)
    table = ev.evaluate(model, examples, judge, out_dir=out, **SAMPLED)
    verdicts = _jsonl(out / "verdicts.jsonl")
    assert all(v["flagged"] == (v["harmful_score"] > 0.5) for v in verdicts)
    row = table.row("flagged")
    assert (row["k"], row["n"]) == (sum(v["flagged"] for v in verdicts), N_ROWS)
    assert json.loads((out / "table.json").read_text())["judge"]["kind"] == "moderation"
