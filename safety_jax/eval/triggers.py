"""Trigger-token removal (Pan et al. 2025, §6): rewrite the prompt tokens that drive the dominant refusal component,
one at a time, until the prompt's projection on it falls below the refusal threshold.

Each round, for every row still above ``threshold``: gradient × input relevance of the prompt tokens to the
projection f = ⟨h_ℓ[last], v⟩ (``analysis.attribution``); the most relevant editable token not yet rewritten is handed
to a *rewriter*, which returns candidate rows; the candidate with the lowest f replaces the row. The reference
rewrites with a 70B language model; here a rewriter is any callable

    rewriter(tokens [T], mask [T], editable [T] bool, position, row) -> list of (tokens, mask, editable) of length T

with :func:`deletion` (drop the token, left-pad) and :func:`substitution` (each token of a vocabulary in its place)
built in; a rewriting model fits the same signature (decode, rewrite, re-encode, left-pad).
Rows are left-padded: the last column is the last prompt token, whose state the component is read at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from safety_jax.analysis.activations import map_batches
from safety_jax.analysis.attribution import gradient_x_input, projection
from safety_jax.model.config import LlamaConfig
from safety_jax.model.llama import Params

Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens [T], mask [T], editable [T] bool
Rewriter = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int], Sequence[Row]]  # ..., position, row index


def deletion(pad_id: int) -> Rewriter:
    """Remove the token at ``position``; the tokens before it move one slot right and a pad enters on the left."""
    def rewrite(tokens: np.ndarray, mask: np.ndarray, editable: np.ndarray, position: int, row: int) -> list[Row]:
        def drop(x: np.ndarray, fill: Any) -> np.ndarray:
            return np.concatenate([np.array([fill], x.dtype), x[:position], x[position + 1:]])
        return [(drop(tokens, pad_id), drop(mask, 0), drop(editable, False))]
    return rewrite


def substitution(vocabulary: Sequence[int]) -> Rewriter:
    """Put each token of ``vocabulary`` (other than the current one) at ``position``."""
    vocab = np.asarray(vocabulary, np.int64)

    def rewrite(tokens: np.ndarray, mask: np.ndarray, editable: np.ndarray, position: int, row: int) -> list[Row]:
        out = []
        for v in vocab[vocab != tokens[position]]:
            t = tokens.copy()
            t[position] = v
            out.append((t, mask, editable))
        return out
    return rewrite


@dataclasses.dataclass(frozen=True)
class TriggerResult:
    """``tokens`` / ``mask`` [B, T] the rewritten prompts; ``edits`` [B] tokens rewritten per row; ``start`` / ``end``
    [B] the projection before and after; ``history`` [rounds + 1, B] the projection after each round."""

    tokens: np.ndarray
    mask: np.ndarray
    edits: np.ndarray
    start: np.ndarray
    end: np.ndarray
    history: np.ndarray


def _scores(params: Params, config: LlamaConfig, tokens: np.ndarray, mask: np.ndarray, direction: jnp.ndarray,
            layer: int, batch_size: int) -> np.ndarray:
    fn = lambda t, m: projection(params, t, m, direction, config=config, layer=layer)
    return np.asarray(map_batches(fn, tokens, mask, batch_size=batch_size), np.float64)


def trigger_removal(params: Params, config: LlamaConfig, tokens: Any, mask: Any, editable: Any, direction: Any, *,
                    layer: int, rewriter: Rewriter, threshold: float | Any = -np.inf, rounds: int = 3,
                    batch_size: int = 64) -> TriggerResult:
    """Rewrite each row's most-attributed tokens (:mod:`module docstring <safety_jax.eval.triggers>`) for up to
    ``rounds`` rounds, a row stopping once its projection is ≤ ``threshold`` (a scalar or [B]) or nothing editable is
    left. tokens, mask [B, T] left-padded; editable [B, T] bool (the tokens a rewrite may touch); direction [D] (the
    dominant component at ``layer``)."""
    tokens, mask = np.array(tokens, np.int32), np.array(mask, np.int32)
    editable = np.array(editable, bool)
    b = tokens.shape[0]
    v = jnp.asarray(direction, jnp.float32)
    thr = np.broadcast_to(np.asarray(threshold, np.float64), (b,))
    touched = np.zeros_like(editable)
    f = _scores(params, config, tokens, mask, v, layer, batch_size)
    history, edits = [f.copy()], np.zeros(b, np.int64)
    for _ in range(rounds):
        active = (f > thr) & (editable & ~touched).any(1)
        if not active.any():
            history.append(f.copy())
            continue
        rel = map_batches(lambda t, m: gradient_x_input(params, t, m, v, config=config, layer=layer),
                          tokens, mask, batch_size=batch_size)
        rel = np.where(editable & ~touched, np.asarray(rel, np.float64), -np.inf)
        rows, owner = [], []
        for i in np.flatnonzero(active):
            pos = int(np.argmax(rel[i]))
            marked = touched[i].copy()
            marked[pos] = True
            for t, m, e in rewriter(tokens[i], mask[i], editable[i] & ~marked, pos, int(i)):
                if len(t) != tokens.shape[1]:
                    raise ValueError(f"rewriter returned a row of length {len(t)}; rows must keep length "
                                     f"{tokens.shape[1]} (left-pad or truncate on the left)")
                rows.append((np.asarray(t), np.asarray(m), np.asarray(e, bool)))
                owner.append(i)
            touched[i, pos] = True  # even when the rewriter offers nothing, do not pick this token again
        if rows:
            cand_t = np.stack([r[0] for r in rows]).astype(np.int32)
            cand_m = np.stack([r[1] for r in rows]).astype(np.int32)
            cand_f = _scores(params, config, cand_t, cand_m, v, layer, batch_size)
            owner_arr = np.asarray(owner)
            for i in np.unique(owner_arr):
                idx = np.flatnonzero(owner_arr == i)
                j = idx[np.argmin(cand_f[idx])]
                if cand_f[j] < f[i]:
                    # the rewriter's editable mask already excludes the rewritten token (a deletion moves the
                    # others, so the record of tried positions starts afresh)
                    tokens[i], mask[i], editable[i] = rows[j]
                    touched[i] = False
                    f[i] = cand_f[j]
                    edits[i] += 1
        history.append(f.copy())
    return TriggerResult(tokens, mask, edits, history[0], f, np.stack(history))
