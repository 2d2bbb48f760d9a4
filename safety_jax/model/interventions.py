"""Interventions on the residual stream, passed to ``forward`` as data (no hooks).

An :class:`Intervention` acts at one *site* of every block (``resid_pre``: the block input; ``attn_out``: the attention
output before it is added to the stream; ``mlp_out``: likewise for the MLP; ``resid_post``: the block output), on the
layers where ``layers`` is non-zero and the token positions where ``positions`` is non-zero:

- ``add``: ``x + coeff · v`` (activation addition, e.g. adding a refusal direction);
- ``project_out``: ``x − (x·r̂) r̂`` (directional ablation, Arditi et al. 2024);
- ``set``: ``x − (x·r̂) r̂ + coeff · r̂`` (clamp the component along r̂, e.g. to its mean on harmless data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")
KINDS = ("add", "project_out", "set")
# Which tokens an intervention edits during generation (``generate``); the cached decode follows the new tokens.
#   all          every position, prompt and generated
#   prompt       the (non-pad) prompt tokens
#   last_prompt  the last prompt token only (the position whose logits give the first new token)
#   generated    every generated token, fed back at each decode step
TOKEN_SELECTORS = ("all", "prompt", "last_prompt", "generated")


@struct.dataclass
class Intervention:
    """One edit of the residual stream. Arrays are per layer so a scan over layers can carry them.

    direction: [L, D] (unit-normalised inside for ``project_out``/``set``); coeff: [L]; layers: [L] (1 = active);
    positions: [B, T] mask or None for every position; tokens: a name from ``TOKEN_SELECTORS``, resolved by
    ``generate`` into a mask per phase (a full ``forward`` takes masks only).
    """

    direction: jax.Array
    coeff: jax.Array
    layers: jax.Array
    positions: jax.Array | None = None
    kind: str = struct.field(pytree_node=False, default="add")
    site: str = struct.field(pytree_node=False, default="resid_pre")
    tokens: str = struct.field(pytree_node=False, default="all")


def make_intervention(kind: str, direction: Any, num_layers: int, *, site: str = "resid_pre", coeff: Any = 1.0,
                      layers: Any = None, positions: Any = None) -> Intervention:
    """Build an :class:`Intervention` from friendly inputs.

    direction: [D] (same for every layer) or [L, D]; coeff: scalar or [L]; layers: None (all), an iterable of layer
    indices, or an [L] mask; positions: None (all), a [B, T] mask, or a name from ``TOKEN_SELECTORS`` for use in
    ``generate`` ("last_prompt", "generated", ...).
    """
    if kind not in KINDS:
        raise ValueError(f"intervention kind {kind!r}; choose one of {KINDS}")
    if site not in SITES:
        raise ValueError(f"intervention site {site!r}; choose one of {SITES}")
    direction = jnp.asarray(direction, jnp.float32)
    if direction.ndim == 1:
        direction = jnp.broadcast_to(direction, (num_layers, direction.shape[0]))
    if direction.ndim != 2 or direction.shape[0] != num_layers:
        raise ValueError(f"intervention direction must be [D] or [L={num_layers}, D], got shape {direction.shape}")
    if layers is None:
        mask = jnp.ones((num_layers,), jnp.float32)
    else:
        layers = jnp.asarray(layers)
        if layers.shape == (num_layers,) and layers.dtype == jnp.bool_:
            mask = layers.astype(jnp.float32)
        else:
            idx = jnp.atleast_1d(layers).astype(jnp.int32)
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= num_layers):
                raise ValueError(f"intervention layers {idx.tolist()} out of range 0..{num_layers - 1}")
            mask = jnp.zeros((num_layers,), jnp.float32).at[idx].set(1.0)
    coeff = jnp.broadcast_to(jnp.asarray(coeff, jnp.float32), (num_layers,))
    tokens = "all"
    if isinstance(positions, str):
        if positions not in TOKEN_SELECTORS:
            raise ValueError(f"intervention positions={positions!r}; choose a [B, T] mask or one of {TOKEN_SELECTORS}")
        tokens, positions = positions, None
    if positions is not None:
        positions = jnp.asarray(positions, jnp.float32)
        if positions.ndim != 2:
            raise ValueError(f"intervention positions must be a [B, T] mask, got shape {positions.shape}")
    return Intervention(direction=direction, coeff=coeff, layers=mask, positions=positions, kind=kind, site=site,
                        tokens=tokens)


def directional_ablation(direction: Any, num_layers: int, positions: Any = None) -> tuple[Intervention, ...]:
    """Remove a direction from the residual stream everywhere: at every block input, attention and MLP output.

    With these three edits every hidden state of the model has zero component along the direction. positions as in
    :func:`make_intervention` (a mask or a token selector).
    """
    return tuple(make_intervention("project_out", direction, num_layers, site=s, positions=positions)
                 for s in ("resid_pre", "attn_out", "mlp_out"))


def check_forward_interventions(interventions: Sequence[Intervention]) -> None:
    """A full forward has no prompt/generated split: token selectors other than "all" belong to ``generate``."""
    for iv in interventions:
        if iv.tokens != "all":
            raise ValueError(f"intervention positions={iv.tokens!r} applies inside generate(); in forward() pass a "
                             "[B, T] positions mask (e.g. 1 at the last prompt token)")


def apply_interventions(x: jax.Array, interventions: tuple[tuple[Intervention, dict], ...], site: str,
                        t_slice: tuple[int, int] | None = None) -> jax.Array:
    """Apply the interventions registered at ``site`` to ``x: [B, T, D]`` inside one block.

    ``interventions`` pairs each intervention with its per-layer slice (``direction [D]``, ``coeff``, ``layers``)
    as produced by the layer scan.
    """
    for iv, per_layer in interventions:
        if iv.site != site:
            continue
        gate = per_layer["layers"]
        if iv.positions is not None:
            gate = gate * iv.positions[:, :, None].astype(jnp.float32)
        xf = x.astype(jnp.float32)
        v = per_layer["direction"].astype(jnp.float32)
        if iv.kind == "add":
            delta = per_layer["coeff"] * v
        else:
            r = v / jnp.linalg.norm(v)
            comp = jnp.einsum("btd,d->bt", xf, r)[..., None]
            delta = -comp * r
            if iv.kind == "set":
                delta = delta + per_layer["coeff"] * r
        x = (xf + gate * delta).astype(x.dtype)
    return x
