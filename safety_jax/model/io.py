"""Load or save a whole model — config, params and tokenizer — as a Hugging Face folder or an orbax folder.

An orbax model folder holds ``config.json`` (Hugging Face fields), ``params/`` (an orbax checkpoint) and, when one
was given, the tokenizer files; it restores straight onto a mesh. A Hugging Face folder holds safetensors.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from safety_jax.model.config import LlamaConfig
from safety_jax.model.hf import CheckpointError, load_hf, save_hf
from safety_jax.model.llama import Params

ORBAX_PARAMS = "params"


def model_format(path: str | os.PathLike) -> str:
    """``'hf'`` or ``'orbax'`` for a model folder, or a clear error."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    if os.path.isdir(os.path.join(path, ORBAX_PARAMS)):
        return "orbax"
    names = os.listdir(path)
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "hf"
    raise CheckpointError(f"{path} is neither a Hugging Face folder (safetensors) nor a safety-jax orbax folder "
                          f"(config.json + {ORBAX_PARAMS}/)")


def load_model(path: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
               strategy: str = "auto") -> tuple[LlamaConfig, Params]:
    """Load ``(config, params)`` from either folder format, optionally onto a mesh."""
    path = os.fspath(path)
    if model_format(path) == "hf":
        return load_hf(path, dtype=dtype, mesh=mesh, strategy=strategy)
    from safety_jax.train.checkpoint import restore_params

    config = LlamaConfig.from_hf_file(path)
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    else:
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f).get("torch_dtype")
        if saved in ("float32", "bfloat16", "float16"):
            config = config.replace(param_dtype=saved)
    params = restore_params(os.path.join(path, ORBAX_PARAMS), config, mesh=mesh, strategy=strategy)
    return config, params


def save_orbax_model(path: str | os.PathLike, config: LlamaConfig, params: Params, tokenizer: Any = None) -> None:
    """Write an orbax model folder (config.json, params/, tokenizer files)."""
    from safety_jax.train.checkpoint import save_params

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    save_params(os.path.join(path, ORBAX_PARAMS), params, overwrite=True)
    tmp = os.path.join(path, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    os.replace(tmp, os.path.join(path, "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_model(path: str | os.PathLike, config: LlamaConfig, params: Params, *, fmt: str = "hf",
               tokenizer: Any = None) -> None:
    """Save in ``fmt`` (``'hf'`` or ``'orbax'``)."""
    if fmt == "hf":
        save_hf(config, params, path, tokenizer=tokenizer)
    elif fmt == "orbax":
        save_orbax_model(path, config, params, tokenizer)
    else:
        raise ValueError(f"unknown model format {fmt!r}; use 'hf' or 'orbax'")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The transformers tokenizer stored in a model folder (no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no tokenizer in {path}: save one with the model (tokenizer.save_pretrained) "
                              f"({e})") from None
