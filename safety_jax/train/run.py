"""A training run from a YAML file: model → data → loss → optimizer → trainer → saved model, in one output folder.

    safety-jax train --config sft.yaml out=runs/sft optim.lr=1e-4 train.steps=200

Config keys (all validated before anything is compiled; an unknown key or a value of the wrong type is an error
naming it)::

    method: sft            # a loss of safety_jax.train.losses.LOSSES: sft, dpo, synthetic_dpo, npo, ...
    loss: {}               # keyword options of that loss (beta, loss_type, ...)
    model: path/to/folder  # Hugging Face or orbax folder; or `preset: tiny` + `seed` for a random model
    tokenizer: null        # default: the model folder
    param_dtype: float32   # storage of the trained (master) weights; bfloat16 only for pure-bf16 training (warns)
    compute_dtype: null    # matmul dtype; default: the checkpoint's dtype (bfloat16 for published Llamas)
    data: {...}            # safety_jax.data.text.DataConfig fields
    eval_data: null        # held-out DataConfig: mean loss reported at each eval
    batch_size: 8          # global batch (all processes together)
    precompute_reference: true   # DPO / NPO: reference log-probs in one pass before training (else every step)
    optim: {...}           # safety_jax.train.optim.OptimConfig fields
    plan: null             # a saved safety_jax.train.plans plan (JSON): ML-LR multipliers or SWAT's two phases
    lora: null             # safety_jax.model.lora.LoraConfig fields to train adapters on a frozen base
    train: {...}           # safety_jax.train.trainer.TrainConfig fields
    mesh: null             # e.g. "data=2,fsdp=4"
    strategy: auto
    save_format: hf        # final model: hf or orbax
    out: runs/train

A checkpoint in ``out`` is resumed only when it was written under the same settings (everything but ``train.steps``,
logging and ``out``); see ``TrainConfig.resume``. Launched as several processes (``jax.distributed`` environment),
each process loads its share of every batch.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import types
import typing
from typing import Any, Literal

import jax
import numpy as np
import yaml

from safety_jax.configs import YamlDict, apply_overrides, read_yaml
from safety_jax.data.batches import BatchIterator, default_buckets
from safety_jax.data.text import DataConfig, load_examples
from safety_jax.errors import ConfigError, DataError
from safety_jax.model.config import DTYPES, get_preset
from safety_jax.model.io import load_model, load_tokenizer, save_model
from safety_jax.model.llama import init_params
from safety_jax.model.lora import LoraConfig, combine, init_lora, save_lora, split
from safety_jax.train.losses import LOSSES, make_loss, precompute_reference_logps
from safety_jax.train.optim import OptimConfig, build_optimizer, merge_params, split_trainable
from safety_jax.train.trainer import TrainConfig, stack_micro_batches, train

log = logging.getLogger(__name__)

PREFERENCE_METHODS = ("dpo", "synthetic_dpo", "synthetic_unlearning")
COMPLETION_METHODS = ("sft", "gradient_ascent", "npo")
PRECOMPUTED_REFERENCE = {"dpo": ("chosen_", "rejected_"), "synthetic_dpo": ("chosen_", "rejected_"), "npo": ("",)}
# settings that change nothing a run computes, so a checkpoint stays valid across them
NOT_FINGERPRINTED = ("out", "save_format", "eval_data")
RENAMED = {"dtype": "param_dtype (storage of the trained weights) or compute_dtype (the matmul dtype)"}
POSITIVE_LOSS_OPTIONS = ("beta", "beta_chosen", "beta_rejected")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run (see the module docstring for the YAML layout)."""

    method: str = "sft"
    loss: dict = dataclasses.field(default_factory=dict)
    model: str | None = None
    preset: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    param_dtype: str = "float32"
    compute_dtype: str | None = None
    data: dict = dataclasses.field(default_factory=dict)
    eval_data: dict | None = None
    batch_size: int = 8
    precompute_reference: bool = True
    optim: dict = dataclasses.field(default_factory=dict)
    plan: str | None = None
    lora: dict | None = None
    train: dict = dataclasses.field(default_factory=dict)
    mesh: str | None = None
    strategy: str = "auto"
    save_format: str = "hf"
    out: str = "runs/train"

    def __post_init__(self) -> None:
        check_field_types(self, "run config")
        if self.method not in LOSSES:
            raise ConfigError(f"run config: method={self.method!r}; choose one of {', '.join(LOSSES)}")
        if self.method in ("gradient_difference", "rmu"):
            raise ConfigError(f"run config: method={self.method!r} needs a retain set, which `safety-jax train` "
                              "does not load; call safety_jax.train.trainer.train with retain_* batches instead")
        if (self.model is None) == (self.preset is None):
            raise ConfigError("run config: give exactly one of `model` (a model folder) or `preset` (random init)")
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"run config: {name}={value!r}; choose one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise ConfigError(f"run config: batch_size={self.batch_size} must be a positive integer")
        if self.save_format not in ("hf", "orbax"):
            raise ConfigError(f"run config: save_format={self.save_format!r}; use hf or orbax")
        kind = dict(self.data).get("kind", "prompt_completion")
        want = ("preference" if self.method in PREFERENCE_METHODS else
                "prompt_completion" if self.method in COMPLETION_METHODS else None)
        if want is not None and kind != want:
            raise ConfigError(f"run config: method={self.method!r} trains on {want} data but data.kind={kind!r}; "
                              f"set data.kind={want} (with its columns) or choose a method for {kind} data")
        _check_loss_options(self.method, self.loss)


# ---------------------------------------------------------------------------------------------------- validation
def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML gives it) fits a dataclass field annotation."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple or hint is tuple:
        return isinstance(value, tuple | list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_field_types(obj: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming the first field of a dataclass whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(f"{where}: {f.name}={value!r} ({type(value).__name__}) is not a valid "
                              f"{_type_name(hints[f.name])}")


def _check_loss_options(method: str, options: dict) -> None:
    params = inspect.signature(LOSSES[method]).parameters
    accepted = sorted(n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "lora_cfg")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"run config: loss has unknown option(s) {unknown} for method={method!r}; accepted: "
                          f"{', '.join(accepted)}")
    for name in POSITIVE_LOSS_OPTIONS:
        value = options.get(name)
        if value is not None and not (isinstance(value, int | float) and value > 0):
            raise ConfigError(f"run config: loss.{name}={value!r} must be a positive number")


def _as_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; give such a string back as the float it spells (else unchanged)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (:func:`safety_jax.configs.read_yaml`: ``1e-4`` is a float, errors name file and line) and apply
    ``key=value`` overrides (values parsed as YAML: numbers, lists, null)."""
    raw = read_yaml(path) if path else YamlDict({})
    apply_overrides(raw, overrides)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for old, new in RENAMED.items():
        if old in raw:
            raise ConfigError(f"run config {raw.where(old)}: key '{old}' was renamed; use {new}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"run config {raw.where(unknown[0])}: unknown key(s) {unknown}; known: "
                          f"{', '.join(sorted(known))}")
    return RunConfig(**raw)


def sub_config(cls: type, fields: dict | None, what: str, **extra: Any) -> Any:
    """Build the sub-config ``cls`` from its YAML dict: unknown keys and mistyped values are errors naming them."""
    fields = dict(fields or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigError(f"run config: {what} has unknown key(s) {unknown}; known: {', '.join(sorted(names))}")
    for k, v in extra.items():
        fields.setdefault(k, v)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    hints = typing.get_type_hints(cls)
    fields = {k: _as_float(v) if "float" in str(hints[k]) else v for k, v in fields.items()}
    for k, v in fields.items():  # before the constructor, so its own checks see well-typed values
        if not _type_ok(v, hints[k]):
            raise ConfigError(f"run config: {what}.{k}={v!r} ({type(v).__name__}) is not a valid "
                              f"{_type_name(hints[k])}")
    try:
        return cls(**fields)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"run config: {what}: {e}") from None


# ---------------------------------------------------------------------------------------------------- the run
def checkpoint_dtype(path: str) -> str | None:
    import json

    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        return None
    with open(config_file) as f:
        saved = json.load(f).get("torch_dtype")
    return saved if saved in DTYPES else None


def _check_vocab(tokenizer: Any, vocab_size: int) -> None:
    size = len(tokenizer)
    if size > vocab_size:
        raise DataError(f"the tokenizer has {size} tokens but the model's embedding has vocab_size={vocab_size}: ids "
                        f">= {vocab_size} would read past the embedding; use the model's own tokenizer or resize "
                        "the embeddings")
    pad = tokenizer.pad_token_id
    if pad is not None and not 0 <= pad < vocab_size:
        raise DataError(f"the tokenizer's pad_token_id={pad} lies outside the model's vocabulary [0, {vocab_size}); "
                        "set tokenizer.pad_token to a token of the model (e.g. its eos token)")


def _attach_reference(examples: list[dict], params: Any, config: Any, lora_cfg: LoraConfig | None, prefixes,
                      batch_size: int, buckets: tuple[int, ...], pad_id: int, chunk: dict) -> list[dict]:
    """Each example gains ``ref_{p}logps`` (its summed log-prob under the frozen reference) for every group ``p``."""
    batches = BatchIterator(examples, batch_size, buckets, shuffle=False, drop_last=False, num_epochs=1,
                            pad_id=pad_id)
    out, i = [dict(ex) for ex in examples], 0
    for batch in precompute_reference_logps(params, config, batches, lora_cfg=lora_cfg, **chunk):
        rows = int(np.sum(batch["example_mask"]))
        for p in prefixes:
            for r in range(rows):
                out[i + r][f"ref_{p}logps"] = np.float32(batch[f"ref_{p}logps"][r])
        i += rows
    return out


def _held_out_eval(loss_fn, batches: list[dict], aux: Any) -> Any:
    step = jax.jit(lambda p, b: loss_fn(p, b, aux)[0])

    def evaluate(params: Any, _step: int) -> dict[str, float]:
        return {"loss": float(np.mean([float(step(params, b)) for b in batches]))}

    return evaluate


def run_fingerprint_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint of this run is stamped with (see ``trainer.run_fingerprint``)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}


def run(cfg: RunConfig) -> dict[str, Any]:
    """Execute a run; returns the final metrics history and the output paths."""
    from safety_jax.parallel import initialize_distributed

    initialize_distributed()
    train_cfg = sub_config(TrainConfig, cfg.train, "train", seed=cfg.seed)
    optim_cfg = sub_config(OptimConfig, cfg.optim, "optim", total_steps=train_cfg.steps)
    data_cfg = sub_config(DataConfig, cfg.data, "data")
    eval_cfg = sub_config(DataConfig, cfg.eval_data, "eval_data") if cfg.eval_data is not None else None
    lora_cfg = sub_config(LoraConfig, cfg.lora, "lora") if cfg.lora is not None else None
    os.makedirs(cfg.out, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)

    mesh = None
    if cfg.mesh:
        from safety_jax.parallel import make_mesh

        mesh = make_mesh(cfg.mesh)
    if cfg.model is not None:
        from safety_jax.parallel import param_sharding_fn

        shardings = param_sharding_fn(mesh, cfg.strategy) if mesh is not None else None
        config, params = load_model(cfg.model, dtype=cfg.param_dtype, shardings=shardings)
        compute = cfg.compute_dtype or checkpoint_dtype(cfg.model) or "float32"
    else:
        config = get_preset(cfg.preset, param_dtype=cfg.param_dtype)
        params = init_params(config, jax.random.key(cfg.seed))
        compute = cfg.compute_dtype or "float32"
    config = config.replace(compute_dtype=compute)
    tok_path = cfg.tokenizer or cfg.model
    if tok_path is None:
        raise ConfigError("run config: a random `preset` model needs `tokenizer: path/to/tokenizer`")
    tokenizer = load_tokenizer(tok_path)
    _check_vocab(tokenizer, config.vocab_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    examples = load_examples(data_cfg, tokenizer)
    buckets = default_buckets(data_cfg.max_length)
    eval_examples = load_examples(eval_cfg, tokenizer) if eval_cfg is not None else None

    loss_kwargs = {**cfg.loss, "remat": train_cfg.remat}
    if lora_cfg is not None:
        loss_kwargs["lora_cfg"] = lora_cfg
        params = combine(params, init_lora(config, lora_cfg, jax.random.key(cfg.seed + 1)))
    loss_fn = make_loss(cfg.method, config, **loss_kwargs)
    base = split(params)[0]  # the frozen reference of DPO / NPO: the model as loaded, without adapters
    aux = None
    if cfg.method in PRECOMPUTED_REFERENCE and cfg.precompute_reference:
        prefixes = PRECOMPUTED_REFERENCE[cfg.method]
        chunk = {"logits_chunk": cfg.loss["logits_chunk"]} if "logits_chunk" in cfg.loss else {}
        examples = _attach_reference(examples, base, config, lora_cfg, prefixes, cfg.batch_size, buckets, pad_id,
                                     chunk)
        if eval_examples is not None:
            eval_examples = _attach_reference(eval_examples, base, config, lora_cfg, prefixes, cfg.batch_size,
                                              buckets, pad_id, chunk)
    elif cfg.method in PRECOMPUTED_REFERENCE:
        # full fine-tuning trains `params` in place, so the reference needs its own copy; a LoRA base is shared
        aux = {"ref_params": base if lora_cfg is not None else jax.tree.map(lambda x: x.copy(), base)}
    del base

    n_proc, proc = jax.process_count(), jax.process_index()
    if cfg.batch_size % n_proc:
        raise ConfigError(f"run config: batch_size={cfg.batch_size} must be a multiple of the {n_proc} processes")
    batches = BatchIterator(examples, cfg.batch_size, buckets, seed=cfg.seed, pad_id=pad_id, process_index=proc,
                            process_count=n_proc)
    eval_fn = None
    if eval_examples is not None:
        eval_it = BatchIterator(eval_examples, cfg.batch_size, buckets, shuffle=False, drop_last=False,
                                num_epochs=1, pad_id=pad_id)
        eval_batches = [jax.tree.map(lambda x: x[0], stack_micro_batches(b, 1)) for b in eval_it]
        eval_fn = _held_out_eval(loss_fn, eval_batches, aux)

    schedule = plan_phases(cfg, optim_cfg, train_cfg.steps)
    history: list[dict[str, Any]] = []
    for i, (steps, phase_optim) in enumerate(schedule):
        last = i == len(schedule) - 1  # earlier phases checkpoint in their own folder, the last one in `out`
        trainable, frozen = split_trainable(phase_optim, params)
        del params
        state, phase_history = train(
            loss_fn, build_optimizer(phase_optim, trainable), trainable, batches,
            dataclasses.replace(train_cfg, steps=steps), frozen=frozen, aux=aux,
            out_dir=cfg.out if last else os.path.join(cfg.out, f"phase{i}"), eval_fn=eval_fn if last else None,
            mesh=mesh, model_config=config, strategy=cfg.strategy,
            fingerprint={**run_fingerprint_settings(cfg), **({"phase": i, "phase_optim": dataclasses.asdict(
                phase_optim)} if cfg.plan is not None else {})},
            donate_params=True)
        history += [{**row, "step": row["step"] + sum(s for s, _ in schedule[:i])} if "step" in row else row
                    for row in phase_history]
        params = merge_params(state.params, frozen)
    base, lora = split(params)
    model_dir = os.path.join(cfg.out, "model")
    save_model(model_dir, config, base, fmt=cfg.save_format, tokenizer=tokenizer, overwrite=True)
    if lora is not None and jax.process_index() == 0:
        save_lora(os.path.join(cfg.out, "lora"), lora, lora_cfg)
    return {"history": history, "model": model_dir}


def plan_phases(cfg: RunConfig, optim_cfg: OptimConfig, steps: int) -> list[tuple[int, OptimConfig]]:
    """The run's optimizer phases: one (``optim``) without a plan, else the plan's (``train.plans.phases``)."""
    if cfg.plan is None:
        return [(steps, optim_cfg)]
    from safety_jax.train.plans import load_plan, phases

    return phases(load_plan(cfg.plan), optim_cfg, steps)


def train_from_cli(config_path: str, overrides: list[str]) -> None:
    """Entry point of ``safety-jax train``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run(load_run_config(config_path, overrides))
    last = {k: v for row in result["history"] for k, v in row.items()}
    print(f"done: model saved to {result['model']}; last metrics: "
          + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step"))
