"""Collect captured activations over a dataset, streamed batch by batch to host numpy arrays.

Every analysis of Jain et al. 2024 (arXiv 2407.10264, §5 / App. "Analyses") starts from per-layer activations at a
few positions of each prompt: the MLP hidden activation averaged over the ``>`` token and the next 9 positions (cluster
separation τ), the MLP input at ``>`` (row-space alignment). :func:`collect_activations` runs one jitted forward with a
fixed batch shape over the data (the last batch is padded, so it compiles once), gathers the requested positions and
optionally pools them inside the jit so that only ``[L, B, ...]`` leaves the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.model.config import LlamaConfig
from safety_jax.model.interventions import Intervention
from safety_jax.model.llama import Params, forward


def map_batches(fn: Callable[..., Any], *arrays: np.ndarray | None, batch_size: int, out_axis: int = 0) -> Any:
    """Apply ``fn`` to fixed-size slices ``[batch_size, ...]`` of ``arrays`` (split along axis 0) and concatenate.

    The last slice is padded by repeating its final row, so a jitted ``fn`` sees one shape and compiles once; padded
    rows are dropped from the result. ``None`` arrays are passed through as ``None``. Each output leaf has its batch
    axis at ``out_axis`` and comes back as a numpy array. Batch ``i + 1`` is dispatched before batch ``i`` is copied to
    host, so device compute and transfer overlap.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise ValueError("map_batches needs at least one array to split along axis 0")
    n = int(np.shape(present[0])[0])
    for a in present:
        if np.shape(a)[0] != n:
            raise ValueError(f"map_batches: arrays disagree on the batch size ({np.shape(a)[0]} vs {n})")
    if n == 0:
        raise ValueError("map_batches: the arrays are empty (0 rows)")
    batch_size = max(1, min(int(batch_size), n))

    def chunk(a: np.ndarray | None, start: int) -> np.ndarray | None:
        if a is None:
            return None
        part = np.asarray(a[start:start + batch_size])
        pad = batch_size - part.shape[0]
        if pad:
            part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)], axis=0)
        return part

    def fetch(out: Any, rows: int) -> Any:
        host = jax.device_get(out)
        return jax.tree.map(lambda x: np.take(np.asarray(x), np.arange(rows), axis=out_axis), host)

    results, pending = [], None
    for start in range(0, n, batch_size):
        out = fn(*(chunk(a, start) for a in arrays))
        if pending is not None:
            results.append(fetch(*pending))
        pending = (out, min(batch_size, n - start))
    results.append(fetch(*pending))
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=out_axis), *results)


@partial(jax.jit, static_argnames=("config", "capture", "dtype"))
def _capture_batch(params: Params, tokens: jax.Array, attention_mask: jax.Array | None, positions: jax.Array | None,
                   capture_positions: jax.Array | None, pool_weights: jax.Array | None,
                   interventions: tuple[Intervention, ...], lora: Params | None, *, config: LlamaConfig,
                   capture: tuple[str, ...], dtype: Any) -> dict[str, jax.Array]:
    _, captured = forward(params, tokens, config, attention_mask=attention_mask, positions=positions, capture=capture,
                          capture_positions=capture_positions, interventions=interventions, lora=lora)
    if pool_weights is not None:
        captured = {k: jnp.einsum("lbp...,bp->lb...", v.astype(jnp.float32), pool_weights.astype(jnp.float32))
                    for k, v in captured.items()}
    return {k: v.astype(dtype) for k, v in captured.items()}


def collect_activations(params: Params, config: LlamaConfig, tokens: np.ndarray,
                        attention_mask: np.ndarray | None = None, *, capture: str | Sequence[str],
                        capture_positions: np.ndarray | None = None,
                        pool_weights: np.ndarray | None = None, positions: np.ndarray | None = None,
                        batch_size: int = 32, interventions: Sequence[Intervention] = (),
                        lora: Params | None = None, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Captured intermediates of ``forward`` over a dataset, as host arrays stacked over layers.

    tokens, attention_mask, positions: [N, T]. capture: names from ``llama.CAPTURE_NAMES``.
    capture_positions: [N, P] token indices to keep (all T when None). pool_weights: [N, P] weights to sum the kept
    positions with inside the jit (see :func:`window_mean_positions`); requires ``capture_positions``.

    Returns ``{name: [L, N, P | T, ...]}``, or ``{name: [L, N, ...]}`` when pooled, in ``dtype``.
    Interventions must act on every position (``positions=None``): a per-example mask cannot follow the batching.
    """
    capture = (capture,) if isinstance(capture, str) else tuple(capture)
    if not capture:
        raise ValueError("collect_activations: capture is empty; name at least one of llama.CAPTURE_NAMES")
    if pool_weights is not None and capture_positions is None:
        raise ValueError("collect_activations: pool_weights [N, P] needs capture_positions [N, P] to pool over")
    if pool_weights is not None and np.shape(pool_weights) != np.shape(capture_positions):
        raise ValueError(f"pool_weights shape {np.shape(pool_weights)} must equal capture_positions shape "
                         f"{np.shape(capture_positions)}")
    if any(iv.positions is not None for iv in interventions):
        raise ValueError("collect_activations: interventions with a [B, T] positions mask are not supported; "
                         "use positions=None (every position) or run forward directly")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T] integers, got shape {tokens.shape}")
    kernel = partial(_capture_batch, config=config, capture=capture, dtype=jnp.dtype(dtype))
    fn = lambda t, m, p, cp, w: kernel(params, t, m, p, cp, w, tuple(interventions), lora)
    return map_batches(fn, tokens, attention_mask, positions, capture_positions, pool_weights,
                       batch_size=batch_size, out_axis=1)


def window_mean_positions(anchor_idx: np.ndarray, width: int = 10, *,
                          seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions and weights for "the mean over the anchor (``>``) position and the next ``width - 1`` positions".

    anchor_idx: [N] index of the anchor token in each row. Returns ``capture_positions: [N, width]`` (int32, clipped to
    ``seq_len - 1``) and ``pool_weights: [N, width]`` (float32; 1/#valid on positions inside the sequence, 0 on clipped
    ones), to pass to :func:`collect_activations` or :func:`window_mean` (Jain et al. 2024, τ analysis).
    """
    anchor_idx = np.asarray(anchor_idx, np.int64)
    if anchor_idx.ndim != 1:
        raise ValueError(f"anchor_idx must be [N], got shape {anchor_idx.shape}")
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    pos = anchor_idx[:, None] + np.arange(width)[None, :]
    valid = np.ones_like(pos, bool) if seq_len is None else pos < seq_len
    if seq_len is not None:
        if np.any(anchor_idx >= seq_len) or np.any(anchor_idx < 0):
            raise ValueError(f"anchor_idx must lie in [0, {seq_len}); got range [{anchor_idx.min()}, "
                             f"{anchor_idx.max()}]")
        pos = np.minimum(pos, seq_len - 1)
    weights = valid / valid.sum(axis=1, keepdims=True)
    return pos.astype(np.int32), weights.astype(np.float32)


def window_mean(x: Any, weights: Any) -> jax.Array:
    """Pool captured windows: ``x: [L, N, P, ...]``, ``weights: [N, P]`` -> ``[L, N, ...]`` (weighted sum over P)."""
    return jnp.einsum("lnp...,np->ln...", jnp.asarray(x, jnp.float32), jnp.asarray(weights, jnp.float32))
