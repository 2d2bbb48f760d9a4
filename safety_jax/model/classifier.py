"""Sequence classifiers (transformers' ``*ForSequenceClassification`` checkpoints) as scorers of texts.

A Llama classifier runs in our decoder: ``forward(..., return_hidden=True)`` gives the final normed hidden states
``[B, T, D]``, the bias-free ``score`` head maps them to ``num_labels`` logits, and the logits are read where
transformers pools them (``GenericForSequenceClassification.forward``): at the rightmost token whose id is not
``pad_token_id``, whatever the attention mask says, so a row whose text ends in the pad id is pooled on the token
before it, as there. Without a pad id transformers reads the last position (and accepts batches of one only); here
the last position the mask keeps, which is the same for an unpadded row.

Any other architecture runs in transformers (``AutoModelForSequenceClassification``, safetensors only, no remote
code) on PyTorch, which is optional (the ``bench`` extra brings it). Both backends tokenise alike: each text
truncated to ``max_length`` tokens, right-padded with the pad id (as the BeaverTails moderation code pads), and
give float32 logits ``[N, num_labels]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.errors import CheckpointError, ConfigError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.hf import load_hf
from safety_jax.model.llama import Params, forward
from safety_jax.model.storage import PathLike, Shardings, local_path

BACKENDS = ("auto", "jax", "torch")
TORCH_EXTRA = "bench"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """What a classifier folder's ``config.json`` says beyond the decoder: its labels (in id order), how its logits
    are read (``problem_type``: ``multi_label_classification``, ``single_label_classification``, ``regression`` or
    None, as transformers records it) and its architecture."""

    labels: tuple[str, ...]
    problem_type: str | None
    architecture: str
    pad_token_id: int | None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_llama(self) -> bool:
        return self.architecture == "LlamaForSequenceClassification"


def read_classifier_config(path: PathLike) -> ClassifierConfig:
    """The :class:`ClassifierConfig` of a sequence-classification folder (``config.json``'s ``id2label``,
    ``problem_type``, ``architectures``, ``pad_token_id``)."""
    file = local_path(path, "a Hugging Face folder") / "config.json"
    if not file.exists():
        raise ConfigError(f"no config.json at {file}: point to a Hugging Face sequence-classification folder")
    d = json.loads(file.read_text())
    archs = [a for a in d.get("architectures") or [] if a.endswith("ForSequenceClassification")]
    if not archs:
        raise ConfigError(f"{file}: architectures={d.get('architectures')!r} names no *ForSequenceClassification "
                          "model; this is not a sequence-classification checkpoint")
    id2label = d.get("id2label")
    if id2label:
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    else:
        labels = tuple(f"LABEL_{i}" for i in range(int(d.get("num_labels", 2))))
    pad = d.get("pad_token_id")
    return ClassifierConfig(labels, d.get("problem_type"), archs[0], None if pad is None else int(pad))


# ---------------------------------------------------------------------------------------------------- the JAX path
def pool_index(tokens: jax.Array, attention_mask: jax.Array, pad_token_id: int | None) -> jax.Array:
    """[B] the position transformers' sequence classifiers read: the rightmost token that is not ``pad_token_id``
    (position 0 when every token is), or, without a pad id, the rightmost position the mask keeps."""
    keep = attention_mask.astype(bool) if pad_token_id is None else tokens != pad_token_id
    positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
    return jnp.argmax(positions * keep.astype(jnp.int32), axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "pad_token_id"))
def classifier_logits(params: Params, tokens: jax.Array, attention_mask: jax.Array, config: LlamaConfig,
                      pad_token_id: int | None) -> jax.Array:
    """Float32 logits [B, num_labels] of ``tokens: [B, T]`` (right- or left-padded, ``attention_mask: [B, T]``):
    the ``score`` head ``params["score"]: [D, num_labels]`` on the hidden state at :func:`pool_index`."""
    hidden = forward(params, tokens, config, attention_mask=attention_mask, return_hidden=True)  # [B, T, D]
    idx = pool_index(tokens, attention_mask, pad_token_id)
    pooled = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]  # [B, D]
    return jnp.einsum("bd,dl->bl", pooled.astype(config.dtype), params["score"].astype(config.dtype),
                      preferred_element_type=jnp.float32)


def load_classifier(path: PathLike, *, dtype: str | None = None, shardings: Shardings = None
                    ) -> tuple[LlamaConfig, Params, ClassifierConfig]:
    """``(config, params, classifier config)`` of a ``LlamaForSequenceClassification`` folder: the decoder and the
    ``score`` head (``lm_head`` is never read). dtype: parameter dtype (default float32, the stored master)."""
    info = read_classifier_config(path)
    if not info.is_llama:
        raise CheckpointError(f"{os.fspath(path)} holds a {info.architecture}; load_classifier reads "
                              "LlamaForSequenceClassification folders (run others with SequenceClassifier, "
                              "backend='torch')")
    config, params = load_hf(path, dtype=dtype, shardings=shardings, head="score")
    if params["score"].shape[1] != info.num_labels:
        raise CheckpointError(f"{os.fspath(path)}: score.weight has {params['score'].shape[1]} rows but config.json "
                              f"names {info.num_labels} labels {info.labels}")
    return config, params, info


# ---------------------------------------------------------------------------------------------------- tokenising
def _bucket(n: int, max_length: int | None) -> int:
    """Padded length for a batch whose longest row has ``n`` tokens: the next power of two (at least 8), so a run
    compiles a handful of shapes, never past ``max_length``."""
    size = max(8, 1 << max(n - 1, 0).bit_length())
    return max(n, min(size, max_length)) if max_length else size


def encode(tokenizer: Any, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    """Token ids of each text (the tokenizer's special tokens added), truncated to ``max_length`` on the right."""
    if max_length:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    else:
        enc = tokenizer(list(texts))
    return [list(ids) for ids in enc["input_ids"]]


def right_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int, batch: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)`` ``[batch, length]`` int32: the rows right-padded with ``pad_id``; rows past ``len(rows)``
    (filling a fixed batch) hold one masked-in pad token so no row attends to nothing."""
    b = len(rows) if batch is None else batch
    tokens = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = 1
    mask[len(rows):, 0] = 1
    return tokens, mask


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(f"this classifier runs in transformers on PyTorch, which is not installed: install the "
                          f"'{TORCH_EXTRA}' extra (pip install 'safety-jax[{TORCH_EXTRA}]') or torch itself") from None
    return torch


# ---------------------------------------------------------------------------------------------------- the scorer
class SequenceClassifier:
    """A sequence-classification folder ready to score texts: ``logits(texts) -> [N, num_labels]`` float32.

    backend: ``"jax"`` (Llama classifiers, in our decoder), ``"torch"`` (any architecture, in transformers), or
    ``"auto"`` (jax for Llama, torch otherwise). dtype: ``float32`` (default) or ``bfloat16`` weights and compute.
    The tokenizer is the folder's own (``AutoTokenizer``, no remote code).
    """

    def __init__(self, path: PathLike, *, backend: str = "auto", dtype: str | None = None) -> None:
        from safety_jax.model.io import load_tokenizer

        if backend not in BACKENDS:
            raise ConfigError(f"classifier backend={backend!r}; choose one of {BACKENDS}")
        self.path = os.fspath(path)
        self.info = read_classifier_config(path)
        if backend == "auto":
            backend = "jax" if self.info.is_llama else "torch"
        if backend == "jax" and not self.info.is_llama:
            raise ConfigError(f"{self.path} holds a {self.info.architecture}; the jax backend runs "
                              "LlamaForSequenceClassification only: use backend='torch'")
        self.backend, self.dtype = backend, dtype or "float32"
        self.tokenizer = load_tokenizer(path)
        if backend == "jax":
            config, self.params, _ = load_classifier(path, dtype=dtype)
            self.config = config.replace(compute_dtype=self.dtype)
        else:
            torch = _import_torch()
            from transformers import AutoModelForSequenceClassification

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForSequenceClassification.from_pretrained(self.path, trust_remote_code=False,
                                                                       use_safetensors=True)
            self.model = model.to(self.device, getattr(torch, self.dtype)).eval()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    @property
    def pad_id(self) -> int:
        """The id padding is written with: the model's pad id (which pooling skips), else the tokenizer's, else 0."""
        if self.info.pad_token_id is not None:
            return self.info.pad_token_id
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def logits(self, texts: Sequence[str], *, max_length: int | None = 256, batch_size: int = 16) -> np.ndarray:
        """Float32 logits [N, num_labels] of the texts, each truncated to ``max_length`` tokens. Texts are batched
        longest first (less padding), every batch ``batch_size`` rows (one compiled shape per length bucket)."""
        rows = encode(self.tokenizer, texts, max_length)
        out = np.zeros((len(rows), self.info.num_labels), np.float32)
        if self.backend == "torch" and self.info.pad_token_id is None:
            batch_size = 1  # transformers cannot pool a padded batch without a pad id
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            chunk = [rows[i] for i in idx]
            length = _bucket(max(len(r) for r in chunk), max_length)
            if self.backend == "jax":
                tokens, mask = right_pad(chunk, length, self.pad_id, batch_size)
                logits = classifier_logits(self.params, jnp.asarray(tokens), jnp.asarray(mask), self.config,
                                           self.info.pad_token_id)
                out[idx] = np.asarray(logits)[:len(chunk)]
            else:
                out[idx] = self._torch_logits(*right_pad(chunk, max(len(r) for r in chunk), self.pad_id))
        return out

    def _torch_logits(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = _import_torch()
        with torch.no_grad():
            out = self.model(input_ids=torch.as_tensor(tokens, dtype=torch.long, device=self.device),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long, device=self.device))
        return out.logits.float().cpu().numpy()


__all__ = ["BACKENDS", "ClassifierConfig", "SequenceClassifier", "classifier_logits", "encode", "load_classifier",
           "pool_index", "read_classifier_config", "right_pad"]
