"""Fixed-shape numpy batches from tokenised examples, padded to length buckets so a jitted step compiles a bounded
number of times, and a deterministic, resumable batch iterator.

An *example* is a dict of 1-D integer arrays: one or more sequence groups ``{prefix}tokens`` with an optional
``{prefix}loss_mask`` (prefix ``""`` for SFT data, ``"chosen_"`` / ``"rejected_"`` for preference pairs), plus
optional numeric scalars (e.g. precomputed reference log-probs) that are stacked to ``[B]``. Non-numeric entries
(strings) are not batched.

A batch holds, for every sequence group, ``{prefix}tokens``, ``{prefix}loss_mask`` (1 on tokens that are targets),
``{prefix}attention_mask`` (1 on real tokens) and ``{prefix}positions`` (``cumsum(attention_mask) - 1`` on real
tokens, 0 on padding — the transformers convention, which `model.llama.default_positions` also uses), all int32
``[B, T]``; ``example_mask`` int32 ``[B]`` is 0 on filler rows that complete a short last batch. All groups of a batch
share one length ``T``: the smallest bucket that holds its longest sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from safety_jax.errors import ConfigError

Batch = dict[str, np.ndarray]
SEQUENCE_FIELDS = ("tokens", "loss_mask", "attention_mask", "positions")


def default_buckets(max_length: int, min_bucket: int = 64) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` up to ``max_length``, with ``max_length`` itself as the last bucket."""
    buckets, b = [], min_bucket
    while b < max_length:
        buckets.append(b)
        b *= 2
    return (*buckets, max_length)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= length``."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"a sequence of {length} tokens is longer than the largest bucket {max(buckets)} "
                         f"(buckets {sorted(buckets)}); add a larger bucket or truncate the data (max_length)")
    return min(fitting)


def sequence_prefixes(example: Mapping[str, Any]) -> list[str]:
    """The sequence groups of an example: ``[""]`` for ``tokens``, ``["chosen_", "rejected_"]`` for pairs."""
    prefixes = sorted(k[: -len("tokens")] for k in example if k.endswith("tokens"))
    if not prefixes:
        raise ValueError(f"an example needs a 'tokens' (or '<prefix>_tokens') entry; it has {sorted(example)}")
    return prefixes


def example_length(example: Mapping[str, Any]) -> int:
    """The longest sequence in an example (over all its groups)."""
    return max(len(example[p + "tokens"]) for p in sequence_prefixes(example))


def _scalar_keys(example: Mapping[str, Any], prefixes: Sequence[str]) -> list[str]:
    seq_keys = {p + f for p in prefixes for f in ("tokens", "loss_mask")}
    return sorted(k for k, v in example.items()
                  if k not in seq_keys and np.ndim(v) == 0 and np.asarray(v).dtype.kind in "biuf")


def pad_batch(examples: Sequence[Mapping[str, Any]], length: int, *, batch_size: int | None = None, pad_id: int = 0,
              padding_side: Literal["right", "left"] = "right") -> Batch:
    """Pad examples into one fixed-shape batch ``[batch_size, length]`` (see the module docstring for the keys).

    Rows past ``len(examples)`` (up to ``batch_size``) are filler: pad tokens, all masks 0, ``example_mask`` 0.
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left'")
    b = len(examples) if batch_size is None else batch_size
    if len(examples) > b:
        raise ValueError(f"{len(examples)} examples do not fit in batch_size={b}")
    prefixes = sequence_prefixes(examples[0])
    scalars = _scalar_keys(examples[0], prefixes)
    out: Batch = {}
    for p in prefixes:
        tokens = np.full((b, length), pad_id, np.int32)
        loss_mask = np.zeros((b, length), np.int32)
        attention_mask = np.zeros((b, length), np.int32)
        for i, ex in enumerate(examples):
            seq = np.asarray(ex[p + "tokens"], np.int32)
            n = len(seq)
            if n > length:
                raise ValueError(f"example {i} has {n} tokens in {p}tokens, more than the batch length {length}")
            cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
            tokens[i, cols] = seq
            attention_mask[i, cols] = 1
            if p + "loss_mask" in ex:
                mask = np.asarray(ex[p + "loss_mask"], np.int32)
                if mask.shape != seq.shape:
                    raise ValueError(f"example {i}: {p}loss_mask has shape {mask.shape}, {p}tokens {seq.shape}")
                loss_mask[i, cols] = mask
        positions = np.where(attention_mask > 0, np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int32)
        out.update({p + "tokens": tokens, p + "loss_mask": loss_mask, p + "attention_mask": attention_mask,
                    p + "positions": positions})
    for k in scalars:
        values = np.asarray([ex[k] for ex in examples])
        dtype = np.float32 if np.issubdtype(values.dtype, np.floating) else np.int32
        out[k] = np.concatenate([values.astype(dtype), np.zeros(b - len(examples), dtype)])
    out["example_mask"] = (np.arange(b) < len(examples)).astype(np.int32)
    return out


def left_pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, *,
                     buckets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists for generation: ``tokens [B, P]`` and ``attention_mask [B, P]`` (int32), with ``P`` the
    longest prompt or, given ``buckets``, the smallest bucket that holds it."""
    if not prompts:
        raise ValueError("left_pad_prompts needs at least one prompt")
    longest = max(len(p) for p in prompts)
    length = longest if buckets is None else pick_bucket(longest, buckets)
    batch = pad_batch([{"tokens": p} for p in prompts], length, pad_id=pad_id, padding_side="left")
    return batch["tokens"], batch["attention_mask"]


class BatchIterator(Iterator[Batch]):
    """Deterministic, resumable batches over a list of examples.

    Epoch ``e`` visits the examples in the order ``default_rng([seed, e]).permutation(n)`` (or in order when
    ``shuffle`` is off), ``batch_size`` at a time; each batch is padded to the smallest of ``buckets`` (default:
    `default_buckets` of the longest example) that holds its longest sequence. With ``drop_last`` off the last batch
    of an epoch is completed with filler rows (``example_mask`` 0), so every batch has the same shape ``[B, T]``.

    In a multi-process job each process passes its ``process_index`` and the ``process_count``: every process walks
    the same global order and yields only its ``batch_size / process_count`` rows of each global batch (padded to the
    bucket of the whole global batch, so all processes agree on the shape).

    With ``accum_steps`` set, every array is shaped ``[accum_steps, batch_size // accum_steps, ...]`` for a scan over
    micro-batches; all micro-batches of one step share the step's bucket length. ``num_epochs=None`` iterates
    forever. ``state()`` / ``restore()`` resume exactly: the restored iterator yields the same remaining batches.
    """

    def __init__(self, examples: Sequence[Mapping[str, Any]], batch_size: int, buckets: Sequence[int] | None = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, *, accum_steps: int | None = None,
                 pad_id: int = 0, padding_side: Literal["right", "left"] = "right",
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        if accum_steps is not None and (accum_steps < 1 or batch_size % accum_steps):
            raise ConfigError(f"batch_size={batch_size} must be a multiple of accum_steps={accum_steps}")
        if not examples:
            raise ValueError("BatchIterator needs at least one example")
        if not 0 <= process_index < process_count or batch_size % process_count:
            raise ConfigError(f"batch_size={batch_size} must be a multiple of process_count={process_count} and "
                              f"0 <= process_index={process_index} < process_count")
        self.process_index, self.process_count = process_index, process_count
        self.examples = examples
        self.lengths = np.asarray([example_length(ex) for ex in examples])
        self.buckets = tuple(sorted(buckets)) if buckets is not None else default_buckets(int(self.lengths.max()))
        longest = int(np.argmax(self.lengths))
        if self.lengths[longest] > self.buckets[-1]:
            raise ValueError(f"example {longest} has {self.lengths[longest]} tokens, more than the largest bucket "
                             f"{self.buckets[-1]} (buckets {list(self.buckets)}); add a bucket or truncate the data")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.accum_steps, self.pad_id, self.padding_side = accum_steps, pad_id, padding_side
        self.num_epochs = num_epochs
        n = len(examples)
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} examples make no full batch of {batch_size} with drop_last=True")
        self._epoch, self._position = 0, 0
        self._order_epoch, self._order = -1, np.arange(n)

    def state(self) -> dict[str, int]:
        """Where the iterator stands: the next batch is batch ``position`` of epoch ``epoch`` (JSON-serialisable)."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a `state()`: the batches that follow are exactly those that followed when it was taken."""
        for key, have in (("num_examples", len(self.examples)), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != have:
                raise ValueError(f"iterator state was saved with {key}={state[key]}, this iterator has {have}; "
                                 "resume with the same data and batch size")
        if not 0 <= int(state["position"]) < self.steps_per_epoch:
            raise ValueError(f"iterator state position={state['position']} is outside [0, {self.steps_per_epoch})")
        self.seed, self._epoch, self._position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order_epoch = -1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices of one epoch, in visiting order."""
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __next__(self) -> Batch:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order, self._order_epoch = self.epoch_order(self._epoch), self._epoch
        idx = self._order[self._position * self.batch_size:(self._position + 1) * self.batch_size]
        length = pick_bucket(int(self.lengths[idx].max()), self.buckets)  # from the global batch: one shape for all
        rows = self.batch_size // self.process_count
        local = idx[self.process_index * rows:(self.process_index + 1) * rows]
        batch = pad_batch([self.examples[i] for i in local], length, batch_size=rows, pad_id=self.pad_id,
                          padding_side=self.padding_side)
        self._position += 1
        if self._position == self.steps_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        if self.accum_steps is not None:
            batch = {k: v.reshape(self.accum_steps, -1, *v.shape[1:]) for k, v in batch.items()}
        return batch
