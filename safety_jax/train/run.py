"""A training run from a YAML file: model → data → loss → optimizer → trainer → saved model, in one output folder.

    safety-jax train --config sft.yaml out=runs/sft optim.lr=1e-4 train.steps=200

Config keys (all validated; an unknown key is an error naming it)::

    method: sft            # a loss of safety_jax.train.losses.LOSSES: sft, dpo, synthetic_dpo, npo, ...
    loss: {}               # keyword options of that loss (beta, loss_type, ...)
    model: path/to/folder  # Hugging Face or orbax folder; or `preset: tiny` + `seed` for a random model
    tokenizer: null        # default: the model folder
    dtype: null            # parameter dtype override (float32 / bfloat16)
    compute_dtype: null    # matmul dtype override
    data: {...}            # safety_jax.data.text.DataConfig fields
    eval_data: null        # held-out DataConfig: mean loss reported at each eval
    batch_size: 8
    optim: {...}           # safety_jax.train.optim.OptimConfig fields
    lora: null             # safety_jax.model.lora.LoraConfig fields to train adapters on a frozen base
    train: {...}           # safety_jax.train.trainer.TrainConfig fields
    mesh: null             # e.g. "data=2,fsdp=4"
    strategy: auto
    save_format: hf        # final model: hf or orbax
    out: runs/train
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import yaml

from safety_jax.data.batches import BatchIterator, default_buckets
from safety_jax.data.text import DataConfig, load_examples
from safety_jax.model.config import get_preset
from safety_jax.model.io import load_model, load_tokenizer, save_model
from safety_jax.model.llama import init_params
from safety_jax.model.lora import LoraConfig, combine, init_lora, save_lora, split
from safety_jax.train.losses import LOSSES, make_loss
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.trainer import TrainConfig, stack_micro_batches, train

log = logging.getLogger(__name__)

REFERENCE_METHODS = ("dpo", "synthetic_dpo", "npo", "rmu")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run (see the module docstring for the YAML layout)."""

    method: str = "sft"
    loss: dict = dataclasses.field(default_factory=dict)
    model: str | None = None
    preset: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    dtype: str | None = None
    compute_dtype: str | None = None
    data: dict = dataclasses.field(default_factory=dict)
    eval_data: dict | None = None
    batch_size: int = 8
    optim: dict = dataclasses.field(default_factory=dict)
    lora: dict | None = None
    train: dict = dataclasses.field(default_factory=dict)
    mesh: str | None = None
    strategy: str = "auto"
    save_format: str = "hf"
    out: str = "runs/train"

    def __post_init__(self) -> None:
        if self.method not in LOSSES:
            raise ValueError(f"run config: method={self.method!r}; choose one of {', '.join(LOSSES)}")
        if (self.model is None) == (self.preset is None):
            raise ValueError("run config: give exactly one of `model` (a model folder) or `preset` (random init)")
        if self.save_format not in ("hf", "orbax"):
            raise ValueError(f"run config: save_format={self.save_format!r}; use hf or orbax")


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def _parse_value(text: str) -> Any:
    """YAML scalar parsing, plus floats YAML 1.1 leaves as strings (``1e-4``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML and apply ``key=value`` overrides (values parsed as YAML: numbers, lists, null)."""
    raw: dict[str, Any] = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        _set_dotted(raw, key, _parse_value(value))
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"run config: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    return RunConfig(**raw)


def _sub(cls: type, fields: dict | None, what: str, **extra: Any) -> Any:
    fields = dict(fields or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"run config: {what} has unknown key(s) {unknown}; known: {', '.join(sorted(names))}")
    for k, v in extra.items():
        fields.setdefault(k, v)
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for k, v in list(fields.items()):
        if isinstance(v, list):
            fields[k] = tuple(v)
        elif isinstance(v, str) and "float" in types[k]:  # YAML 1.1 reads 1e-4 as a string
            fields[k] = _parse_value(v)
    return cls(**fields)


def _held_out_eval(loss_fn, batches: list[dict]) -> Any:
    step = jax.jit(lambda p, b: loss_fn(p, b, None)[0])

    def evaluate(params: Any, _step: int) -> dict[str, float]:
        return {"loss": float(np.mean([float(step(params, b)) for b in batches]))}

    return evaluate


def run(cfg: RunConfig) -> dict[str, Any]:
    """Execute a run; returns the final metrics history and the output paths."""
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)

    mesh = None
    if cfg.mesh:
        from safety_jax.parallel import make_mesh

        mesh = make_mesh(cfg.mesh)
    if cfg.model is not None:
        config, params = load_model(cfg.model, dtype=cfg.dtype, mesh=mesh, strategy=cfg.strategy)
    else:
        config = get_preset(cfg.preset, **({"param_dtype": cfg.dtype} if cfg.dtype else {}))
        params = init_params(config, jax.random.key(cfg.seed))
    if cfg.compute_dtype:
        config = config.replace(compute_dtype=cfg.compute_dtype)
    tok_path = cfg.tokenizer or cfg.model
    if tok_path is None:
        raise ValueError("run config: a random `preset` model needs `tokenizer: path/to/tokenizer`")
    tokenizer = load_tokenizer(tok_path)

    data_cfg = _sub(DataConfig, cfg.data, "data")
    examples = load_examples(data_cfg, tokenizer)
    train_cfg = _sub(TrainConfig, cfg.train, "train", seed=cfg.seed)
    buckets = default_buckets(data_cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = BatchIterator(examples, cfg.batch_size, buckets, seed=cfg.seed, pad_id=pad_id)

    lora_cfg = _sub(LoraConfig, cfg.lora, "lora") if cfg.lora is not None else None
    loss_kwargs = dict(cfg.loss)
    if lora_cfg is not None:
        loss_kwargs["lora_cfg"] = lora_cfg
        params = combine(params, init_lora(config, lora_cfg, jax.random.key(cfg.seed + 1)))
    loss_fn = make_loss(cfg.method, config, **loss_kwargs)
    aux = {"ref_params": split(params)[0]} if cfg.method in REFERENCE_METHODS else None
    optim_cfg = _sub(OptimConfig, cfg.optim, "optim", total_steps=train_cfg.steps)
    optimizer = build_optimizer(optim_cfg, params)

    eval_fn = None
    if cfg.eval_data is not None:
        eval_examples = load_examples(_sub(DataConfig, cfg.eval_data, "eval_data"), tokenizer)
        eval_it = BatchIterator(eval_examples, cfg.batch_size, buckets, shuffle=False, drop_last=False,
                                num_epochs=1, pad_id=pad_id)
        eval_batches = [jax.tree.map(lambda x: x[0], stack_micro_batches(b, 1)) for b in eval_it]
        eval_fn = _held_out_eval(loss_fn, eval_batches)

    state, history = train(loss_fn, optimizer, params, batches, train_cfg, aux=aux, out_dir=cfg.out, eval_fn=eval_fn,
                           mesh=mesh, model_config=config, strategy=cfg.strategy)
    base, lora = split(state.params)
    model_dir = os.path.join(cfg.out, "model")
    save_model(model_dir, config, base, fmt=cfg.save_format, tokenizer=tokenizer)
    if lora is not None:
        save_lora(os.path.join(cfg.out, "lora"), lora, lora_cfg)
    return {"history": history, "model": model_dir}


def train_from_cli(config_path: str, overrides: list[str]) -> None:
    """Entry point of ``safety-jax train``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run(load_run_config(config_path, overrides))
    last = {k: v for row in result["history"] for k, v in row.items()}
    print(f"done: model saved to {result['model']}; last metrics: "
          + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step"))
