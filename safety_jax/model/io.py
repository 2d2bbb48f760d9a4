"""Load or save a whole model — config, params and tokenizer — as a Hugging Face folder or an orbax folder.

An orbax model folder holds ``config.json`` (Hugging Face fields), ``params/`` (an orbax checkpoint) and, when one
was given, the tokenizer files; it may live at a ``gs://``-style URI and restores straight onto the target
shardings. A Hugging Face folder holds safetensors and is local.
"""

from __future__ import annotations

import os
from typing import Any

from jax.experimental import multihost_utils

from safety_jax.errors import CheckpointError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.hf import load_hf, save_hf
from safety_jax.model.llama import Params
from safety_jax.model.orbax_params import restore_params, save_params
from safety_jax.model.storage import (
    ORBAX_PARAMS,
    PathLike,
    Shardings,
    check_destination,
    is_main_process,
    local_path,
    read_config,
    read_json,
    save_tokenizer,
    staging_path,
    swap_in,
    to_path,
    write_json,
)


def model_format(path: PathLike) -> str:
    """``'hf'`` or ``'orbax'`` for a model folder, or a clear error."""
    folder = to_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if (folder / ORBAX_PARAMS).is_dir():
        return "orbax"
    if any(p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json" for p in folder.iterdir()):
        return "hf"
    raise CheckpointError(f"{folder} is neither a Hugging Face folder (safetensors) nor a safety-jax orbax folder "
                          f"(config.json + {ORBAX_PARAMS}/)")


def load_model(path: PathLike, *, dtype: str | None = None,
               shardings: Shardings = None) -> tuple[LlamaConfig, Params]:
    """Load ``(config, params)`` from either folder format, optionally straight onto ``shardings``.

    shardings: a params-shaped pytree of ``jax.sharding.Sharding`` or a function ``config -> pytree`` (e.g.
    ``safety_jax.parallel.param_sharding_fn(mesh, strategy)``).
    """
    if model_format(path) == "hf":
        return load_hf(path, dtype=dtype, shardings=shardings)
    folder = to_path(path)
    config = read_config(folder)
    if dtype is None:
        saved = read_json(folder / "config.json").get("torch_dtype")
        dtype = saved if saved in ("float32", "bfloat16", "float16") else None
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    return config, restore_params(folder / ORBAX_PARAMS, config, shardings=shardings)


def save_orbax_model(path: PathLike, config: LlamaConfig, params: Params, tokenizer: Any = None, *,
                     overwrite: bool = False) -> None:
    """Write an orbax model folder (config.json, params/, tokenizer files), beside ``path`` and then renamed in.

    An existing destination must be empty, or a model folder replaced with ``overwrite=True``. Every process of a
    multi-host job must call it.
    """
    dest = to_path(path)
    check_destination(dest, overwrite)
    tmp = staging_path(dest)
    if is_main_process() and tmp.exists():
        tmp.rmtree()
    multihost_utils.sync_global_devices("safety_jax.save_orbax_model.start")
    save_params(tmp / ORBAX_PARAMS, params)
    if is_main_process():
        write_json(tmp / "config.json", config.to_hf_dict())
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        swap_in(tmp, dest)
    multihost_utils.sync_global_devices("safety_jax.save_orbax_model")


def save_model(path: PathLike, config: LlamaConfig, params: Params, *, fmt: str = "hf", tokenizer: Any = None,
               overwrite: bool = False) -> None:
    """Save in ``fmt`` (``'hf'`` or ``'orbax'``); ``overwrite`` replaces an existing model folder."""
    if fmt == "hf":
        save_hf(config, params, path, tokenizer=tokenizer, overwrite=overwrite)
    elif fmt == "orbax":
        save_orbax_model(path, config, params, tokenizer, overwrite=overwrite)
    else:
        raise ValueError(f"unknown model format {fmt!r}; use 'hf' or 'orbax'")


def load_tokenizer(path: PathLike) -> Any:
    """The transformers tokenizer stored in a (local) model folder (no remote code)."""
    from transformers import AutoTokenizer

    folder = local_path(path, "a tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(os.fspath(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no tokenizer in {folder}: save one with the model (tokenizer.save_pretrained) "
                              f"({e})") from None


__all__ = ["load_model", "load_tokenizer", "model_format", "save_model", "save_orbax_model"]
