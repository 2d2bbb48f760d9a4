"""Study 4 on real models (Huang et al. 2025, arXiv 2408.09600): harmful fine-tuning of an aligned Llama and Antidote.

    python -m experiments.study4_antidote.real --config real_llama2 --out runs/s4_llama2 model=/data/Llama-2-7b-hf \
        eval.judge=/data/beaver-dam-7b [key=value ...]

1. ``align``: LoRA SFT of the base model on ``alignment.n`` safe BeaverTails (prompt, safe response) pairs, loss on
   the response only, in the user's template (Alpaca); the adapter is merged and the aligned model saved
   (``align/model``, ``save_format``).
2. ``user_p{p}_lr{lr}_ep{epochs}``, one per cell of ``user.p × user.lrs × user.epochs``: a new LoRA on ``user.n``
   examples, ``round(p · n)`` harmful BeaverTails (prompt, harmful response) pairs and the rest the benign task (its
   instruction from ``data.benchmarks``, the label word / GSM8K answer as the response); adapters in ``lora/``.
3. ``antidote_<cell>_<score>_a{α}``, one per α of ``antidote.ratios`` and score: ``antidote.antidote`` with
   ``PruneConfig(target="lora", ratio=α, modules=q/k/v)`` on ``antidote.n_calibration`` other harmful pairs,
   tokenised as the training data (statistics from the unpruned model, computed once per cell); pruned adapters
   and masks saved. ``target: weights`` prunes the merged weights instead.
4. ``eval_<model>``: ``eval.evaluate`` with greedy decoding — the judge's flagged rate on the unsafe BeaverTails
   test prompts (harmful score) and the task scorer on the task's test split (fine-tune accuracy) — of the aligned
   model, each undefended fine-tuned model and each pruned one (adapters merged).
5. ``results.md``, ``report.md``, ``metrics.json`` in OUT: one row per model with Wilson 95 % intervals.

Every step is a ``stages.Stages`` stage under OUT: one done under the same settings is skipped, one whose settings
changed is recomputed, and models are loaded only when a stage that needs them runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import datasets
import jax
import numpy as np
import yaml

from experiments.cli import run_study, study_parser
from experiments.study4_antidote.real_config import RealStudy4Config, load_real_config
from safety_jax.data.batches import BatchIterator, default_buckets
from safety_jax.data.benchmarks import GSM8K_ANSWER_PROMPT, EvalExample, load_benchmark
from safety_jax.data.text import DataConfig, tokenize_dataset
from safety_jax.defenses.antidote import PruneConfig, apply_masks, calibration_stats, prune_masks, save_masks
from safety_jax.errors import ConfigError, DataError
from safety_jax.eval.evaluate import EvalModel, evaluate
from safety_jax.eval.judges import TaskScorer, load_judge
from safety_jax.eval.stats import wilson
from safety_jax.model.config import LlamaConfig
from safety_jax.model.io import load_model, load_tokenizer, save_model
from safety_jax.model.llama import Params
from safety_jax.model.lora import LoraConfig, combine, init_lora, load_lora, merge_lora, save_lora, split
from safety_jax.report import Report, markdown_table
from safety_jax.stages import Stages, fingerprint, write_atomic
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer, merge_params, split_trainable
from safety_jax.train.trainer import TrainConfig, train

log = logging.getLogger("study4.real")

TASK_TRAIN = {"sst2": "sst2:train", "agnews": "agnews:train", "gsm8k": "gsm8k:train", "alpaca": "alpaca:train"}
TASK_TEST = {"sst2": "sst2:validation", "agnews": "agnews:test", "gsm8k": "gsm8k:test"}  # alpaca: no scorer
RESULT = "result.json"
COLUMNS = ("model", "p", "lr", "epochs", "score", "α", "harmful score (%)", "harmful 95 % CI", "accuracy (%)",
           "accuracy 95 % CI", "n harmful", "n task")


# ---------------------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class Pair:
    """One training example: the instruction, an optional input (the task's sentence) and the response."""

    prompt: str
    input: str
    response: str


def _need(examples: list[EvalExample], n: int, field: str, spec: str) -> list[EvalExample]:
    if len(examples) < n:
        raise DataError(f"{field}: {spec!r} gave {len(examples)} examples, {n} needed; lower the count or give "
                        "more data")
    return examples[:n]


def beavertails_pairs(spec: str, files: Any, *, safe: bool, n: int, skip: int = 0, field: str) -> list[Pair]:
    """(prompt, response) pairs of BeaverTails-format rows whose ``is_safe`` is ``safe``: rows ``skip`` … ``skip+n``
    of those."""
    rows = load_benchmark(spec, data_files=files, filter=lambda e: e.label is safe)
    rows = _need(rows[skip:], n, field, f"{spec} ({'safe' if safe else 'unsafe'} rows after the first {skip})")
    return [Pair(e.prompt, e.input or "", e.reference or "") for e in rows]


def task_response(task: str, e: EvalExample) -> str:
    """The training target of a task example: the label word (SST-2, AG News), the GSM8K solution with ``####``
    written as the phrase the scorer reads (git-disl's build_dataset), Alpaca's output."""
    if e.reference is None:
        raise DataError(f"{e.id}: a training example of {task} needs a label / reference")
    return e.reference.replace("####", GSM8K_ANSWER_PROMPT) if task == "gsm8k" else e.reference


def task_pairs(cfg: RealStudy4Config, n: int) -> list[Pair]:
    u = cfg.user
    spec = u.task_data or TASK_TRAIN[u.task]
    rows = _need(load_benchmark(spec, data_files=u.task_data_files), n, "user.task_data", spec)
    return [Pair(e.prompt, e.input or "", task_response(u.task, e)) for e in rows]


def tokenize(pairs: Sequence[Pair], tokenizer: Any, template: str, max_length: int) -> list[dict[str, np.ndarray]]:
    """Prompt/response examples through ``data.text`` (the template around prompt and input, the response and EOS
    carrying the loss)."""
    ds = datasets.Dataset.from_dict({"prompt": [p.prompt for p in pairs], "input": [p.input for p in pairs],
                                     "completion": [p.response for p in pairs]})
    dcfg = DataConfig(path="(study 4 pairs)", prompt_column="prompt", input_column="input",
                      completion_column="completion", template=template, max_length=max_length)
    out = tokenize_dataset(ds, dcfg, tokenizer)
    if not out:
        raise DataError(f"no example fits max_length={max_length}")
    return out


def user_mix(cfg: RealStudy4Config, p: float, harmful: Sequence[Pair], task: Sequence[Pair]) -> list[Pair]:
    k = n_harmful(cfg, p)
    return [*harmful[:k], *task[:cfg.user.n - k]]


def n_harmful(cfg: RealStudy4Config, p: float) -> int:
    return int(round(p * cfg.user.n))


def calibration_skip(cfg: RealStudy4Config) -> int:
    """How many unsafe rows of the calibration set to pass over: those the user's data may use, when both come from
    the same set."""
    same = (cfg.antidote.data, cfg.antidote.data_files) == (cfg.user.harmful_data, cfg.user.harmful_data_files)
    return max(n_harmful(cfg, p) for p in cfg.user.p) if same else 0


# ---------------------------------------------------------------------------------------------------- models
class Models:
    """The base and aligned models, each loaded on first use; the tokenizer."""

    def __init__(self, cfg: RealStudy4Config, align_folder: str) -> None:
        self.cfg, self.align_folder = cfg, align_folder
        folder = cfg.tokenizer or cfg.model
        for field, path in (("model", cfg.model), ("tokenizer", folder)):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{field}={path!r} is not a model folder: download it (huggingface-cli "
                                        f"download <hub id> --local-dir <folder>) and set {field}=<folder>")
        self.tokenizer = load_tokenizer(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self._base: tuple[LlamaConfig, Params] | None = None
        self._aligned: tuple[LlamaConfig, Params] | None = None

    def _load(self, path: str) -> tuple[LlamaConfig, Params]:
        log.info("loading %s (%s)", path, self.cfg.dtype)
        config, params = load_model(path, dtype=self.cfg.dtype)
        return config.replace(compute_dtype=self.cfg.dtype), params

    def base(self) -> tuple[LlamaConfig, Params]:
        if self._base is None:
            self._base = self._load(self.cfg.model)
        return self._base

    def aligned(self) -> tuple[LlamaConfig, Params]:
        if self._aligned is None:
            self._base = None  # the base is not needed once the aligned model exists
            self._aligned = self._load(os.path.join(self.align_folder, "model"))
        return self._aligned

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def lora_sft(config: LlamaConfig, params: Params, lora_cfg: LoraConfig, examples: list[dict], *, lr: float,
             schedule: str, epochs: int, batch_size: int, weight_decay: float, seed: int, pad_id: int,
             max_length: int, out_dir: str, key: Any, remat: str = "none") -> tuple[Params, list[dict]]:
    """A fresh LoRA on the frozen ``params``, ``epochs`` passes over ``examples`` (SFT loss on the response tokens);
    AdamW (0.9, 0.999) as transformers' Trainer, clip 1.0. Checkpoints under ``out_dir`` (a rerun resumes)."""
    batches = BatchIterator(examples, batch_size, default_buckets(max_length), seed=seed, drop_last=False,
                            pad_id=pad_id)
    steps = epochs * batches.steps_per_epoch
    optim = OptimConfig(lr=lr, b2=0.999, schedule=schedule, total_steps=steps, weight_decay=weight_decay)
    trainable, frozen = split_trainable(optim, combine(params, init_lora(config, lora_cfg, jax.random.key(seed + 1))))
    tcfg = TrainConfig(steps=steps, seed=seed, log_every=max(1, min(10, steps)), progress=sys.stderr.isatty(),
                       remat=remat)
    loss = make_sft_loss(config, lora_cfg=lora_cfg, remat=remat)
    state, history = train(loss, build_optimizer(optim, trainable), trainable, batches, tcfg, frozen=frozen,
                           out_dir=out_dir, model_config=config, fingerprint=key)
    return split(merge_params(state.params, frozen))[1], history


def _write_result(folder: str, result: Any) -> None:
    write_atomic(os.path.join(folder, RESULT), json.dumps(result))


def _read_result(folder: str) -> Any:
    with open(os.path.join(folder, RESULT)) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass(frozen=True)
class Cell:
    p: float
    lr: float
    epochs: int

    @property
    def name(self) -> str:
        return f"p{self.p:g}_lr{self.lr:g}_ep{self.epochs}"


def _last_loss(history: Sequence[dict]) -> float | None:
    losses = [r["loss"] for r in history if "loss" in r]
    return float(losses[-1]) if losses else None


def run(cfg: RealStudy4Config, out: str) -> dict[str, Any]:
    """Every stage into ``out``; returns the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    c = dataclasses.asdict(cfg)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(c, f, sort_keys=False)
    a, u, x, e = cfg.alignment, cfg.user, cfg.antidote, cfg.eval
    st = Stages(out)
    models = Models(cfg, os.path.join(out, "align"))
    tok = models.tokenizer

    def examples(pairs: Sequence[Pair]) -> list[dict]:
        return tokenize(pairs, tok, u.template, cfg.max_length)

    # 1. alignment
    align_key = {k: c[k] for k in ("model", "tokenizer", "dtype", "max_length", "seed", "save_format")}
    align_key.update(alignment=c["alignment"], template=u.template)

    def align(d: str) -> None:
        pairs = beavertails_pairs(a.data, a.data_files, safe=True, n=a.n, field="alignment.n")
        config, params = models.base()
        lora_cfg = LoraConfig(**a.lora)
        lora, history = lora_sft(config, params, lora_cfg, examples(pairs), lr=a.lr, schedule=a.schedule,
                                 epochs=a.epochs, batch_size=a.batch_size, weight_decay=a.weight_decay, seed=cfg.seed,
                                 pad_id=models.pad_id, max_length=cfg.max_length, out_dir=os.path.join(d, "train"),
                                 key=align_key, remat=cfg.remat)
        save_model(os.path.join(d, "model"), config, merge_lora(params, lora, lora_cfg), fmt=cfg.save_format,
                   tokenizer=tok, overwrite=True)
        _write_result(d, {"n": len(pairs), "final_loss": _last_loss(history)})

    align_info = _read_result(st.run("align", align_key, align))

    # 2. the user's fine-tuning, per cell
    cells = [Cell(p, lr, ep) for p in u.p for lr in u.lrs for ep in u.epochs]
    user_common = {"aligned": align_key, "user": {k: v for k, v in c["user"].items() if k not in ("p", "lrs",
                                                                                                  "epochs")}}
    pools: dict[str, list[Pair]] = {}

    def pool(name: str) -> list[Pair]:
        if name not in pools:
            if name == "harmful":
                need = max(n_harmful(cfg, p) for p in u.p)
                pools[name] = beavertails_pairs(u.harmful_data, u.harmful_data_files, safe=False, n=need,
                                                field="user.n × user.p (harmful pairs)")
            elif name == "task":
                pools[name] = task_pairs(cfg, u.n - min(n_harmful(cfg, p) for p in u.p))
            else:
                pools[name] = beavertails_pairs(x.data, x.data_files, safe=False, n=x.n_calibration,
                                                skip=calibration_skip(cfg), field="antidote.n_calibration")
        return pools[name]

    user_keys, user_info = {}, {}
    for cell in cells:
        key = user_keys[cell] = {**user_common, "p": cell.p, "lr": cell.lr, "epochs": cell.epochs}

        def finetune(d: str, cell: Cell = cell, key: dict = key) -> None:
            pairs = user_mix(cfg, cell.p, pool("harmful"), pool("task"))
            config, params = models.aligned()
            lora_cfg = LoraConfig(**u.lora)
            lora, history = lora_sft(config, params, lora_cfg, examples(pairs), lr=cell.lr, schedule=u.schedule,
                                     epochs=cell.epochs, batch_size=u.batch_size, weight_decay=u.weight_decay,
                                     seed=cfg.seed, pad_id=models.pad_id, max_length=cfg.max_length,
                                     out_dir=os.path.join(d, "train"), key=key, remat=cfg.remat)
            save_lora(os.path.join(d, "lora"), lora, lora_cfg)
            _write_result(d, {"n": len(pairs), "n_harmful": n_harmful(cfg, cell.p),
                              "final_loss": _last_loss(history)})

        user_info[cell] = _read_result(st.run(f"user_{cell.name}", key, finetune))

    # 3. Antidote, per cell, score and α
    pruned: list[tuple[Cell, str, float, str, dict]] = []  # (cell, score, α, stage name, key)
    stats_cache: dict[Cell, Any] = {}
    if "antidote" in cfg.defense:
        anti_common = {k: v for k, v in c["antidote"].items() if k not in ("ratios", "scores")}
        anti_common["skip"] = calibration_skip(cfg)
        for cell in cells:
            for score in x.scores:
                for ratio in x.ratios:
                    name = f"antidote_{cell.name}_{score}_a{ratio:g}"
                    key = {"user": user_keys[cell], "antidote": anti_common, "score": score, "ratio": ratio}
                    prune_cfg = PruneConfig(ratio=ratio, modules=tuple(f"{m}@*" for m in x.modules), score=score,
                                            target=x.target, token_mask=x.token_mask, seed=cfg.seed)

                    def prune(d: str, cell: Cell = cell, prune_cfg: PruneConfig = prune_cfg) -> None:
                        config, params = models.aligned()
                        lora, lora_cfg = load_lora(os.path.join(out, f"user_{cell.name}", "lora"))
                        target = params if x.target == "lora" else merge_lora(params, lora, lora_cfg)
                        adapters = lora if x.target == "lora" else None
                        stats = None
                        if prune_cfg.score == "wanda":
                            if cell not in stats_cache:
                                batches = BatchIterator(examples(pool("calibration")), x.batch_size,
                                                        default_buckets(cfg.max_length), shuffle=False,
                                                        drop_last=False, num_epochs=1, pad_id=models.pad_id)
                                stats_cache[cell] = calibration_stats(target, config, batches, cfg=prune_cfg,
                                                                      lora=adapters, lora_scale=lora_cfg.scale)
                            stats = stats_cache[cell]
                        masks = prune_masks(target, stats, prune_cfg, config, lora=adapters)
                        save_masks(os.path.join(d, "masks.safetensors"), masks, stats)
                        if x.target == "lora":
                            save_lora(os.path.join(d, "lora"), apply_masks(params, masks, lora=lora), lora_cfg)
                        else:
                            save_model(os.path.join(d, "model"), config, apply_masks(target, masks),
                                       fmt=cfg.save_format, tokenizer=tok, overwrite=True)
                        _write_result(d, {"selected": {k: float(np.mean(np.asarray(m))) for k, m in masks.items()},
                                          "calibration_samples": None if stats is None
                                          else float(stats["samples"])})

                    st.run(name, key, prune)
                    pruned.append((cell, score, ratio, name, key))

    # 4. evaluation
    judge_cache: dict[str, Any] = {}
    eval_sets: dict[str, tuple[str, list[EvalExample]]] = {}
    task_spec = (e.task_data or TASK_TEST[u.task]) if u.task in TASK_TEST else None  # alpaca: no scorer
    eval_key = {"eval": {**c["eval"], "task_data": task_spec}, "task": u.task, "template": u.template}

    def sets() -> dict[str, tuple[str, list[EvalExample]]]:
        if not eval_sets:
            harmful = load_benchmark(e.harmful_prompts, data_files=e.harmful_data_files,
                                     filter=lambda ex: ex.label is False)
            eval_sets["harmful"] = (e.harmful_prompts, _need(harmful, e.n_harmful, "eval.n_harmful",
                                                             e.harmful_prompts))
            if task_spec is not None:
                task = load_benchmark(task_spec, data_files=e.task_data_files)
                eval_sets["task"] = (task_spec, _need(task, e.n_task, "eval.n_task", task_spec))
        return eval_sets

    def judge() -> Any:
        if "harm" not in judge_cache:
            try:
                judge_cache["harm"] = load_judge(e.judge, **e.judge_options)
            except ConfigError as err:
                raise ConfigError(f"eval.judge: {err}") from None
        return judge_cache["harm"]

    def eval_stage(name: str, model_key: Any, make_params: Any) -> dict[str, Any]:
        key = {**eval_key, "model": model_key}

        def compute(d: str) -> None:
            config, params = make_params()
            model = EvalModel(config, params, tok, name=f"{os.path.abspath(out)}/{name}", fingerprint=fingerprint(key))
            opts = dict(template=u.template, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                        temperature=0.0, seed=cfg.seed, progress=sys.stderr.isatty())
            spec, harmful = sets()["harmful"]
            j = judge()
            table = evaluate(model, harmful, j, out_dir=os.path.join(d, "harmful"), dataset_name=spec, **opts)
            metric = j.metrics[0]
            row = table.row(metric)
            k = row["n"] - row["k"] if metric == "refused" else row["k"]  # a refusal list: harmful = not refused
            result = {"harmful_k": int(k), "harmful_n": int(row["n"]), "harmful_metric": metric,
                      "task_k": None, "task_n": 0}
            if "task" in sets():
                spec, task = sets()["task"]
                t = evaluate(model, task, TaskScorer(u.task), out_dir=os.path.join(d, "task"), dataset_name=spec,
                             **opts).row("correct")
                result.update(task_k=int(t["k"]), task_n=int(t["n"]))
            _write_result(d, result)

        return _read_result(st.run(name, key, compute))

    def merged_with(lora_folder: str) -> Any:
        def make() -> tuple[LlamaConfig, Params]:
            config, params = models.aligned()
            lora, lora_cfg = load_lora(lora_folder)
            return config, merge_lora(params, lora, lora_cfg)
        return make

    rows = [{"model": "aligned", **eval_stage("eval_aligned", align_key, models.aligned)}]
    for cell in cells:
        r = eval_stage(f"eval_{cell.name}", user_keys[cell], merged_with(os.path.join(out, f"user_{cell.name}",
                                                                                      "lora")))
        rows.append({"model": "fine-tuned", "p": cell.p, "lr": cell.lr, "epochs": cell.epochs, **r})
    for cell, score, ratio, name, key in pruned:
        folder = os.path.join(out, name)
        make = merged_with(os.path.join(folder, "lora")) if x.target == "lora" else \
            (lambda folder=folder: models._load(os.path.join(folder, "model")))
        r = eval_stage(f"eval_{name}", key, make)
        rows.append({"model": "antidote", "p": cell.p, "lr": cell.lr, "epochs": cell.epochs, "score": score,
                     "ratio": ratio, **r})

    metrics: dict[str, Any] = {
        "config": c, "rows": rows, "alignment": align_info,
        "user": {cell.name: info for cell, info in user_info.items()},
        "task_data": task_spec, "judge": e.judge, "calibration_skip": calibration_skip(cfg),
        "ran_stages": list(st.ran), "skipped_stages": list(st.skipped),
        "timing": {**st.timing, "total_this_invocation": time.perf_counter() - t_start}}
    write_report(out, cfg, metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------- report
def _pct(k: int | None, n: int) -> tuple[Any, str]:
    if k is None or not n:
        return "–", "–"
    lo, hi = wilson(k, n)
    return round(100 * k / n, 1), f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def table_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model: harmful score and accuracy in % with Wilson 95 % intervals."""
    out = []
    for r in metrics["rows"]:
        h, h_ci = _pct(r["harmful_k"], r["harmful_n"])
        t, t_ci = _pct(r["task_k"], r["task_n"])
        out.append({"model": r["model"], "p": r.get("p", "–"), "lr": r.get("lr", "–"),
                    "epochs": r.get("epochs", "–"), "score": r.get("score", "–"), "α": r.get("ratio", "–"),
                    "harmful score (%)": h, "harmful 95 % CI": h_ci, "accuracy (%)": t, "accuracy 95 % CI": t_ci,
                    "n harmful": r["harmful_n"], "n task": r["task_n"]})
    return out


def write_report(out: str, cfg: RealStudy4Config, metrics: dict[str, Any]) -> None:
    a, u, x, e = cfg.alignment, cfg.user, cfg.antidote, cfg.eval
    rep = Report(out, f"Study 4 on real models — {cfg.name}")
    rep.text(f"Config `{cfg.name}`, model `{cfg.model}` ({cfg.dtype}). {cfg.notes}".rstrip())
    lines = [
        f"- Alignment: LoRA {a.lora} SFT on {a.n} safe `{a.data}` pairs, lr {a.lr:g} ({a.schedule}), {a.epochs} "
        f"epochs, batch {a.batch_size}, wd {a.weight_decay:g}; merged. Final loss "
        f"{metrics['alignment'].get('final_loss')}.",
        f"- Fine-tuning: a new LoRA {u.lora} on {u.n} examples, a fraction p of harmful `{u.harmful_data}` pairs and "
        f"the rest `{u.task_data or TASK_TRAIN[u.task]}`; {u.template} template, loss on the response; "
        f"{u.schedule} lr, batch {u.batch_size}.",
        f"- Antidote: {x.target} of {x.modules}, scores {x.scores}, dense ratios α {x.ratios}, statistics over "
        f"{x.token_mask} tokens of {x.n_calibration} harmful `{x.data}` pairs (the first "
        f"{metrics['calibration_skip']} unsafe rows passed over: the user's).",
        f"- Evaluation: greedy, {e.max_new_tokens} new tokens; harmful score = judge `{e.judge}` flagged rate on "
        f"{e.n_harmful} unsafe `{e.harmful_prompts}` prompts; accuracy = the {u.task} scorer on "
        + (f"{e.n_task} `{metrics['task_data']}` examples." if metrics["task_data"] else "nothing (no scorer)."),
    ]
    rep.section("What ran", "\n".join(lines))
    rows = table_rows(metrics)
    rep.section("Results", "Reference rows: the aligned model and each fine-tuned model without defense; then "
                "Antidote per cell, score and α. 95 % Wilson intervals.")
    rep.table(rows, COLUMNS)
    write_atomic(os.path.join(out, "results.md"), markdown_table(rows, COLUMNS))
    t = metrics["timing"]
    rep.section("Timing", f"{t['total_this_invocation']:.0f} s this invocation; stages run: "
                f"{', '.join(metrics['ran_stages']) or 'none'}; skipped (done before): "
                f"{len(metrics['skipped_stages'])}.")
    rep.metrics.update(metrics)
    rep.write()


def main(argv: list[str] | None = None) -> None:
    args = study_parser(__doc__, default="real_llama2", configs="real_llama2 | real_llama3",
                        example="model=/data/llama user.n=1000").parse_args(argv)
    run_study(args, load_real_config, run)


if __name__ == "__main__":
    main()
