"""Activation sharding hints: the model names the logical axes of its large activations, the caller decides what
they mean on a mesh.

Inside :func:`use_activation_sharding` (entered by the trainer and ``parallel.sharded_forward`` while they trace),
``constrain(x, ("batch", "seq", "mlp"))`` becomes a ``with_sharding_constraint``; elsewhere it returns ``x``. Without
these hints XLA's propagation may keep activations saved for the backward replicated over the FSDP axis (the whole
batch on every device).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax

Constrain = Callable[[jax.Array, Sequence[str | None]], jax.Array]

_CONSTRAIN: contextvars.ContextVar[Constrain | None] = contextvars.ContextVar("safety_jax_activation_sharding",
                                                                            default=None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``x`` with the sharding its logical ``axes`` have under the active rules (unchanged when none are active)."""
    fn = _CONSTRAIN.get()
    return x if fn is None else fn(x, axes)


@contextlib.contextmanager
def use_activation_sharding(fn: Constrain | None) -> Iterator[None]:
    """Make ``fn(x, logical_axes) -> x`` the activation constraint while tracing inside this block."""
    token = _CONSTRAIN.set(fn)
    try:
        yield
    finally:
        _CONSTRAIN.reset(token)
