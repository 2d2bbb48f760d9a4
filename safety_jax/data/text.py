"""Real text datasets through `datasets` (hub or local files), prompt templates, tokenisation with loss masks.

The output of this module is a list of *examples*: plain dicts of 1-D int32 numpy arrays that `batches.py` pads into
fixed-shape batches.

- ``kind="prompt_completion"``: ``{"tokens", "loss_mask"}``: the prompt's tokens carry mask 0, the completion's
  tokens and the appended EOS carry 1 (loss on the response only, as in Alpaca / Antidote / TRL).
- ``kind="preference"``: ``{"chosen_tokens", "chosen_loss_mask", "rejected_tokens", "rejected_loss_mask"}``; both
  sequences start with the same (identically truncated) prompt tokens.
- ``kind="prompt"``: ``{"tokens", "loss_mask"}`` with the formatted prompt only (mask all 0), for generation.

Tokenisation follows the reference recipe (Stanford Alpaca's ``preprocess``, which Antidote and TRL's completion-only
loss share): tokenise the prompt alone and prompt+completion together, and mask the first ``len(prompt_ids)`` tokens
(see `_split` for the rare case where tokens merge across the prompt/completion boundary).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import datasets
import numpy as np

from safety_jax.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Example = dict[str, np.ndarray]

# Stanford Alpaca's PROMPT_DICT, as named in shared/methods/05 (loss on the response only).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

TEMPLATES = ("alpaca", "alpaca_antidote", "chat", "none")
KINDS = ("prompt_completion", "preference", "prompt")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}

# Column names (and the split / filter they come with) of datasets the studies name; see `DataConfig.preset`.
PRESETS: dict[str, dict[str, Any]] = {
    # PKU-Alignment/BeaverTails: split 30k_train / 30k_test; set filter_value=True (safe) or False (unsafe).
    "beavertails": dict(path="PKU-Alignment/BeaverTails", split="30k_train", prompt_column="prompt",
                        completion_column="response", filter_column="is_safe"),
    # llm-attacks harmful_behaviors.csv (520 rows): goal, target. Give the file as path=....
    "advbench": dict(split="train", prompt_column="goal", completion_column="target"),
    "alpaca": dict(path="tatsu-lab/alpaca", split="train", prompt_column="instruction", input_column="input",
                   completion_column="output"),
    "gsm8k": dict(path="openai/gsm8k", name="main", split="train", prompt_column="question",
                  completion_column="answer"),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a text dataset lives, which columns hold what, and how to format and tokenise it.

    ``path``: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.tsv`` file, a local dataset folder, or a
    hub dataset name (with ``name`` its configuration). ``template``: ``"alpaca"`` (Stanford Alpaca, as in
    shared/methods/05; the ``### Input:`` variant when ``input_column`` is set and non-empty), ``"alpaca_antidote"``
    (the git-disl Vaccine / Lisa / Booster / Antidote code: the same text without the newline after
    ``### Response:``), ``"chat"`` (the tokenizer's own chat template), ``"none"`` (the raw prompt).
    ``truncation_side``: ``"left"`` drops prompt tokens from the start (after BOS) and keeps its tail next to the
    completion; ``"right"`` cuts the end of the sequence (the completion first), as `transformers` does by default.
    Rows are filtered (``filter_column == filter_value``), optionally shuffled with ``seed``, then the first
    ``num_examples`` kept.
    """

    path: str
    split: str = "train"
    name: str | None = None
    kind: Literal["prompt_completion", "preference", "prompt"] = "prompt_completion"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    input_column: str | None = None
    filter_column: str | None = None
    filter_value: bool | int | str | None = None
    template: Literal["alpaca", "alpaca_antidote", "chat", "none"] = "alpaca"
    system_prompt: str | None = None
    max_length: int = 512
    max_prompt_length: int | None = None
    truncation_side: Literal["left", "right"] = "right"
    append_eos: bool = True
    num_examples: int | None = None
    seed: int = 0
    shuffle: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"DataConfig.kind={self.kind!r} is not one of {list(KINDS)}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"DataConfig.template={self.template!r} is not one of {list(TEMPLATES)}")
        if self.truncation_side not in ("left", "right"):
            raise ConfigError(f"DataConfig.truncation_side={self.truncation_side!r} must be 'left' or 'right'")
        if self.max_length < 2:
            raise ConfigError(f"DataConfig.max_length={self.max_length} must be at least 2")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"DataConfig.max_prompt_length={self.max_prompt_length} must be in (0, max_length)")
        if self.num_examples is not None and self.num_examples < 1:
            raise ConfigError(f"DataConfig.num_examples={self.num_examples} must be positive (or None for all)")

    @classmethod
    def preset(cls, dataset: str, **overrides: Any) -> DataConfig:
        """A config with the column names of a known dataset (``PRESETS``), e.g. ``preset("advbench", path=...)``."""
        if dataset not in PRESETS:
            raise ConfigError(f"no DataConfig preset {dataset!r}; known: {', '.join(sorted(PRESETS))}")
        fields = {**PRESETS[dataset], **overrides}
        if "path" not in fields:
            raise ConfigError(f"DataConfig preset {dataset!r} has no default path; pass path=...")
        return cls(**fields)

    def text_columns(self) -> dict[str, str]:
        """``{field name: column}`` for the text columns this kind reads."""
        cols = {"prompt_column": self.prompt_column}
        if self.kind == "prompt_completion":
            cols["completion_column"] = self.completion_column
        elif self.kind == "preference":
            cols["chosen_column"] = self.chosen_column
            cols["rejected_column"] = self.rejected_column
        if self.input_column is not None:
            cols["input_column"] = self.input_column
        return cols


# ---------------------------------------------------------------------------------------------------- loading


def _is_local_file(path: str) -> bool:
    return os.path.isfile(path) or any(path.endswith(ext) for ext in FILE_BUILDERS)


def _describe(cfg: DataConfig) -> str:
    if _is_local_file(cfg.path):
        return f"dataset file {cfg.path}"
    return f"dataset {cfg.path!r} (config {cfg.name!r}, split {cfg.split!r})"


def _check_columns(ds: datasets.Dataset, cfg: DataConfig) -> None:
    """Raise a DataError naming the file, its columns and the config field when a needed column is absent or not
    text."""
    where, have = _describe(cfg), list(ds.column_names)
    needed = dict(cfg.text_columns())
    if cfg.filter_column is not None:
        needed["filter_column"] = cfg.filter_column
    for field, col in needed.items():
        if col not in have:
            close = difflib.get_close_matches(col, have, n=1, cutoff=0.0)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise DataError(f"{where} has columns [{', '.join(have)}]; DataConfig.{field}={col!r} not found; set "
                            f"{field}= to one of those columns{hint}, or use DataConfig.preset(...) for a known "
                            f"dataset ({', '.join(sorted(PRESETS))})")
        feature = ds.features[col]
        if field == "filter_column":
            ok = isinstance(feature, datasets.Value)
            expected = "a scalar (bool, int or string)"
        else:
            # an all-empty optional input column (Alpaca's "input" in a CSV) loads as nulls
            text_dtypes = ("string", "large_string", "null") if field == "input_column" else ("string", "large_string")
            ok = isinstance(feature, datasets.Value) and feature.dtype in text_dtypes
            expected = "text (string)"
        if not ok:
            raise DataError(f"{where}: column {col!r} (DataConfig.{field}) holds {feature}, expected {expected}; "
                            f"point DataConfig.{field} at a text column or convert this one first")


def load_dataset_from_config(cfg: DataConfig) -> datasets.Dataset:
    """Load, validate, filter, shuffle and truncate the rows a DataConfig names (no tokenisation).

    Local files go through the packaged ``json`` / ``parquet`` / ``csv`` builders by extension; anything else is
    passed to ``datasets.load_dataset`` as a hub name or local dataset folder.
    """
    if _is_local_file(cfg.path):
        if not os.path.isfile(cfg.path):
            raise FileNotFoundError(f"dataset file {cfg.path} does not exist")
        ext = next(e for e in FILE_BUILDERS if cfg.path.endswith(e))
        # CSV cells are text: keep empty cells and strings like "NA" as they are rather than pandas' NaN
        kwargs: dict[str, Any] = {"na_filter": False} if FILE_BUILDERS[ext] == "csv" else {}
        if ext == ".tsv":
            kwargs["delimiter"] = "\t"
        ds = datasets.load_dataset(FILE_BUILDERS[ext], data_files={cfg.split: cfg.path}, split=cfg.split,
                                   cache_dir=cfg.cache_dir, **kwargs)
    else:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, cache_dir=cfg.cache_dir)
    _check_columns(ds, cfg)
    if cfg.filter_column is not None:
        if cfg.filter_value is None:
            raise ConfigError(f"DataConfig.filter_column={cfg.filter_column!r} needs a filter_value "
                              "(e.g. filter_value=False for the unsafe BeaverTails rows)")
        ds = ds.filter(lambda v: v == cfg.filter_value, input_columns=cfg.filter_column)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_examples is not None:
        if cfg.num_examples > len(ds):
            raise DataError(f"{_describe(cfg)} has {len(ds)} rows after filtering; DataConfig.num_examples="
                            f"{cfg.num_examples} asks for more")
        ds = ds.select(range(cfg.num_examples))
    return ds


# ---------------------------------------------------------------------------------------------------- templates


def alpaca_prompt(instruction: str, input_text: str = "", *, response_newline: bool = True) -> str:
    """The Alpaca prompt (with the ``### Input:`` block when ``input_text`` is non-empty), ending at the response."""
    template = ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT
    text = template.format(instruction=instruction, input=input_text)
    return text if response_newline else text[:-1]


def format_prompt(cfg: DataConfig, instruction: str, input_text: str = "", tokenizer: Any = None) -> str:
    """The prompt text of one row under ``cfg.template`` (the completion is appended to it verbatim)."""
    if cfg.template in ("alpaca", "alpaca_antidote"):
        return alpaca_prompt(instruction, input_text, response_newline=cfg.template == "alpaca")
    content = f"{instruction}\n\n{input_text}" if input_text else instruction
    if cfg.template == "none":
        return content
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("DataConfig.template='chat' needs a tokenizer with a chat_template")
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_texts(ds: datasets.Dataset, cfg: DataConfig, tokenizer: Any = None) -> list[str]:
    """The formatted prompt of every row (for generation: pair with `batches.left_pad_prompts`)."""
    prompts = _text_column(ds, cfg, cfg.prompt_column)
    inputs = _text_column(ds, cfg, cfg.input_column, allow_none=True) if cfg.input_column else [""] * len(prompts)
    return [format_prompt(cfg, p, i, tokenizer) for p, i in zip(prompts, inputs, strict=True)]


def _text_column(ds: datasets.Dataset, cfg: DataConfig, column: str, allow_none: bool = False) -> list[str]:
    values = ds[column]
    for i, v in enumerate(values):
        if v is None and not allow_none:
            raise DataError(f"{_describe(cfg)}: row {i} has no value in column {column!r}")
    return [v or "" for v in values]


# ---------------------------------------------------------------------------------------------------- tokenisation


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _split(tokenizer: Any, prompt_ids: list[int], full_ids: list[int], completion: str,
           shared_prompt: bool) -> tuple[list[int], list[int]]:
    """(prompt, completion) tokens of one row.

    When the prompt's ids are a prefix of the joint tokenisation (the usual case) both rules agree. When tokens merge
    across the boundary, SFT keeps the joint tokenisation and masks its first ``len(prompt_ids)`` tokens (Alpaca's
    ``preprocess``, TRL's completion-only loss); preference pairs keep the prompt's own ids, shared by both answers,
    and tokenise the answer alone (TRL's DPO ``tokenize_row``).
    """
    n = len(prompt_ids)
    if full_ids[:n] == prompt_ids or not shared_prompt:
        return full_ids[:n], full_ids[n:]
    return prompt_ids, list(tokenizer(completion, add_special_tokens=False)["input_ids"])


def _truncate(prompt: list[int], completions: list[list[int]], cfg: DataConfig,
              bos_id: int | None) -> tuple[list[int], list[list[int]]]:
    """Fit prompt + longest completion into ``cfg.max_length`` (one shared prompt cut for preference pairs)."""
    head = 1 if prompt and bos_id is not None and prompt[0] == bos_id else 0

    def cut_prompt(p: list[int], limit: int) -> list[int]:
        if len(p) <= limit:
            return p
        if cfg.truncation_side == "left":
            keep = max(limit - head, 0)
            return p[:head] + (p[len(p) - keep:] if keep else [])
        return p[:limit]

    if cfg.max_prompt_length is not None:
        prompt = cut_prompt(prompt, cfg.max_prompt_length)
    longest = max((len(c) for c in completions), default=0)
    if len(prompt) + longest > cfg.max_length:
        if cfg.truncation_side == "left":
            prompt = cut_prompt(prompt, max(cfg.max_length - longest, head))
        else:
            prompt = prompt[: cfg.max_length]
        room = cfg.max_length - len(prompt)
        completions = [c[:room] for c in completions]
    return prompt, completions


def tokenize_dataset(ds: datasets.Dataset, cfg: DataConfig, tokenizer: Any) -> list[Example]:
    """Format and tokenise every row into examples (see the module docstring); rows left without any completion
    token after truncation are dropped with a warning."""
    add_special = cfg.template != "chat"  # chat templates render their own BOS text
    eos = tokenizer.eos_token_id
    if cfg.append_eos and cfg.kind != "prompt" and eos is None:
        raise ConfigError("DataConfig.append_eos=True but the tokenizer has no eos_token_id")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    prompts = prompt_texts(ds, cfg, tokenizer)
    prompt_ids = _encode(tokenizer, prompts, add_special)
    if cfg.kind == "prompt":  # a generation prompt keeps its tail (the response cue) whatever truncation_side says
        left = dataclasses.replace(cfg, truncation_side="left")
        return [{"tokens": np.asarray(cut, np.int32), "loss_mask": np.zeros(len(cut), np.int32)}
                for cut in (_truncate(p, [], left, bos_id)[0] for p in prompt_ids)]

    columns = [cfg.completion_column] if cfg.kind == "prompt_completion" else [cfg.chosen_column,
                                                                              cfg.rejected_column]
    per_column = []  # per completion column: (prompt ids, completion ids) of every row
    for col in columns:
        texts = _text_column(ds, cfg, col)
        full = _encode(tokenizer, [p + t for p, t in zip(prompts, texts, strict=True)], add_special)
        split = [_split(tokenizer, p, f, t, cfg.kind == "preference")
                 for p, f, t in zip(prompt_ids, full, texts, strict=True)]
        per_column.append([(p, [*c, eos] if cfg.append_eos else c) for p, c in split])

    examples, dropped = [], 0
    for i in range(len(prompt_ids)):
        p, comps = _truncate(per_column[0][i][0], [col[i][1] for col in per_column], cfg, bos_id)
        if any(len(c) == 0 for c in comps):
            dropped += 1
            continue
        seqs = [(np.asarray(p + c, np.int32), np.asarray([0] * len(p) + [1] * len(c), np.int32)) for c in comps]
        if cfg.kind == "prompt_completion":
            examples.append({"tokens": seqs[0][0], "loss_mask": seqs[0][1]})
        else:
            examples.append({"chosen_tokens": seqs[0][0], "chosen_loss_mask": seqs[0][1],
                             "rejected_tokens": seqs[1][0], "rejected_loss_mask": seqs[1][1]})
    if dropped:
        logger.warning("%s: dropped %d of %d rows whose completion did not fit in max_length=%d (prompt too long)",
                       _describe(cfg), dropped, len(prompt_ids), cfg.max_length)
    return examples


def load_examples(cfg: DataConfig, tokenizer: Any) -> list[Example]:
    """`load_dataset_from_config` then `tokenize_dataset`: the examples `batches.BatchIterator` takes."""
    return tokenize_dataset(load_dataset_from_config(cfg), cfg, tokenizer)


def decode_masked(tokenizer: Any, tokens: Sequence[int], loss_mask: Sequence[int]) -> str:
    """The text of the tokens that carry loss (for inspecting what a model is trained on)."""
    ids = [int(t) for t, m in zip(tokens, loss_mask, strict=True) if m]
    return tokenizer.decode(ids, skip_special_tokens=False)
