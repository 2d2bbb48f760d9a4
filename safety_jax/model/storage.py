"""Where model files live and where params go: paths (local or ``gs://``-style URIs), JSON files, replacing a model
folder safely, and the ``shardings=`` argument of the loaders.

Paths are ``etils.epath.Path``: a local path is made absolute, a URI is kept exactly as given.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from safety_jax.errors import CheckpointError, ConfigError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params

PathLike = str | os.PathLike
# A params-shaped pytree of shardings, or a function building one from the config read from the folder.
Shardings = Params | Callable[[LlamaConfig], Params] | None

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ORBAX_PARAMS = "params"


def is_uri(path: PathLike) -> bool:
    """Whether ``path`` names a remote store (``gs://bucket/…``) rather than a local file."""
    return "://" in os.fspath(path)


def to_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: local paths made absolute, URIs unchanged."""
    text = os.fspath(path)
    return epath.Path(text if is_uri(text) else os.path.abspath(text))


def local_path(path: PathLike, what: str) -> epath.Path:
    """``to_path(path)``, refusing a URI: ``what`` (e.g. 'a Hugging Face folder') must be on a local disk."""
    if is_uri(path):
        raise CheckpointError(f"{os.fspath(path)}: {what} must be on a local disk (safetensors and tokenizers read "
                              "local files); copy it to a local folder first, or use the orbax format, which reads "
                              "and writes remote paths")
    return to_path(path)


def read_json(path: epath.Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: epath.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2))


def read_config(folder: epath.Path) -> LlamaConfig:
    """The ``LlamaConfig`` of a model folder's ``config.json``."""
    file = folder / "config.json"
    if not file.exists():
        raise ConfigError(f"no config.json at {file}: point to a Hugging Face Llama checkpoint folder")
    return LlamaConfig.from_hf_dict(read_json(file))


def resolve_shardings(shardings: Shardings, config: LlamaConfig) -> Params | None:
    """The params pytree of shardings ``shardings`` stands for (calling it on ``config`` when it is a function)."""
    return shardings(config) if callable(shardings) else shardings


# ---------------------------------------------------------------------------------------------------- folders
def is_model_folder(path: epath.Path) -> bool:
    """A folder a save wrote: ``config.json`` plus safetensors weights or an orbax ``params/``."""
    if not (path / "config.json").exists():
        return False
    return (path / ORBAX_PARAMS).is_dir() or any((path / n).exists() for n in HF_WEIGHT_FILES) or any(
        p.name.endswith(".safetensors") for p in path.iterdir())


def check_destination(path: epath.Path, overwrite: bool) -> None:
    """Refuse to save over anything but a missing or empty folder, or (with ``overwrite``) a model folder."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file; save the model to a folder path")
    if not any(True for _ in path.iterdir()):
        return
    if not is_model_folder(path):
        raise FileExistsError(f"{path} exists and is not a model folder (config.json with safetensors or "
                              f"{ORBAX_PARAMS}/); refusing to replace it: choose another path")
    if not overwrite:
        raise FileExistsError(f"a model folder already exists at {path}; pass overwrite=True to replace it")


def staging_path(path: epath.Path) -> epath.Path:
    """The folder a save writes before :func:`swap_in` (beside ``path``, the same name on every process)."""
    return path.parent / f".{path.name}.saving"


def swap_in(new: epath.Path, path: epath.Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is renamed away first and removed only afterwards."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
        new.rename(path)
        old.rmtree()
    else:
        new.rename(path)


def save_tokenizer(tokenizer: Any, folder: epath.Path) -> None:
    """``tokenizer.save_pretrained`` into ``folder`` (through a local copy when the folder is remote)."""
    if not is_uri(os.fspath(folder)):
        tokenizer.save_pretrained(os.fspath(folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            (folder / name).write_bytes(epath.Path(tmp, name).read_bytes())


def is_main_process() -> bool:
    return jax.process_index() == 0


__all__ = ["HF_WEIGHT_FILES", "ORBAX_PARAMS", "PathLike", "Shardings", "check_destination", "is_main_process",
           "is_model_folder", "is_uri", "local_path", "read_config", "read_json", "resolve_shardings", "save_tokenizer",
           "staging_path", "swap_in", "to_path", "write_json"]
