"""Vaccine, Lisa and Booster: defenses against harmful fine-tuning that change the update rule, not the loss.

Each is a gradient function of the training engine (:class:`~safety_jax.train.trainer.GradFn`): the jitted step
calls it on every micro-batch in place of ``jax.value_and_grad(loss)``, so accumulation, clipping, frozen weights,
sharding and checkpoints stay the trainer's. Build one with :func:`make_defense_grad` and pass it as
``train(..., grad_fn=...)``; the data each needs comes from :class:`BoosterBatches` / :class:`LisaBatches`.

- **Vaccine** (Huang et al. 2024, arXiv 2402.01109; alignment stage). Let g_l = ∂L/∂h_l for every layer's attention
  output h_l and ‖g‖ = sqrt(Σ_l ‖g_l‖²) over all layers and the whole micro-batch. The gradient is ∇_w L taken with
  every h_l ← h_l + ρ·g_l / (‖g‖ + ε), the shift held constant (ρ = 2). Two forward/backward passes; the first
  differentiates the activations only. Needs a loss that reads ``batch["perturb"]`` (the SFT family of
  ``train.losses``).
- **Lisa** (Huang et al. 2024, arXiv 2405.18641; fine-tuning stage). Steps alternate ``alignment_steps`` on alignment
  data and ``finetune_steps`` on the user's data, alignment first (100 / 900). After the first ``proximal_after``
  of the run the loss gains ρ/2·‖w − w_anchor‖² (ρ = 1), w_anchor the weights at the last switch of phase (the
  initial weights before the first), so its gradient gains ρ(w − w_anchor).
- **Booster** (Huang et al. 2024, arXiv 2409.01586; alignment stage). With h = ∇L_harm(w), the gradient is
  ∇L_align(w) + λ(h − ∇L_harm(w − α·h / (‖h‖ + ε))) (λ = 5, α = 0.1): three forward/backward passes per step.

Conventions read from the reference code (git-disl/Vaccine, Lisa, Booster, ``trainer.py``): ε = 1e-7 in both
normalisations; Vaccine hooks ``LlamaAttention``'s output (after o_proj, before the residual add) and normalises per
micro-batch; Lisa's step counter switches phase before the step's loss (so the first step of a phase has a zero
proximal gradient) and its proximal term starts once more than 10 % of the run's steps are done; Booster's
normalisation and perturbation cover the trainable weights only (here: the trainable tree, less frozen layer slices
when ``frozen_slices`` is given). Norms are float32 whatever the params' dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from safety_jax.errors import ConfigError, DataError
from safety_jax.train.optim import mask_frozen_grads

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
BoundLoss = Callable[[Any, Batch], tuple[jax.Array, Metrics]]
GradOut = tuple[tuple[jax.Array, Metrics], Any]

DEFENSES = ("none", "vaccine", "lisa", "booster")
PERTURB_KEY = "perturb"   # batch key a loss forwards to the model: {"attn_out": delta [L, B, T, D]}
HARM_PREFIX = "harm_"     # Booster's harmful group in the batch: harm_tokens, harm_loss_mask, ...


def _number(section: str, name: str, value: Any, low: float, *, strict: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and (value > low if strict else value >= low)
    if not ok:
        raise ConfigError(f"{section}.{name}={value!r} must be a number {'>' if strict else '>='} {low}")


# ---------------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class VaccineConfig:
    """Vaccine: rho, the perturbation radius ρ over all layers' attention outputs (reference ``--rho``, 2); eps, the
    guard of the normalisation ρ / (‖g‖ + eps)."""

    rho: float = 2.0
    eps: float = 1e-7

    def __post_init__(self) -> None:
        _number("vaccine", "rho", self.rho, 0.0)
        _number("vaccine", "eps", self.eps, 0.0, strict=True)


@dataclasses.dataclass(frozen=True)
class LisaConfig:
    """Lisa: alignment_steps / finetune_steps, the lengths of the two phases (reference ``--alignment_step 100
    --finetune_step 900``; 0 keeps one phase throughout); rho, the proximal intensity ρ (1); proximal_after, the
    fraction of the run's steps done before the proximal term starts (0.1: "more than 10 %").

    user_advances_on_alignment: the user stream yields (and the step drops) a batch on alignment steps too, as the
    reference's loop does, whose epochs count user batches; False draws user batches on fine-tuning steps only.
    """

    alignment_steps: int = 100
    finetune_steps: int = 900
    rho: float = 1.0
    proximal_after: float = 0.1
    user_advances_on_alignment: bool = True

    def __post_init__(self) -> None:
        for name in ("alignment_steps", "finetune_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"lisa.{name}={value!r} must be an integer >= 0")
        if self.alignment_steps == self.finetune_steps == 0:
            raise ConfigError("lisa.alignment_steps and lisa.finetune_steps are both 0; give at least one phase steps")
        _number("lisa", "rho", self.rho, 0.0)
        _number("lisa", "proximal_after", self.proximal_after, 0.0)
        if self.proximal_after > 1:
            raise ConfigError(f"lisa.proximal_after={self.proximal_after!r} is a fraction of the run's steps: "
                              "choose a value in [0, 1]")
        if not isinstance(self.user_advances_on_alignment, bool):
            raise ConfigError(f"lisa.user_advances_on_alignment={self.user_advances_on_alignment!r} must be true "
                              "or false")


@dataclasses.dataclass(frozen=True)
class BoosterConfig:
    """Booster: lam, the regulariser intensity λ (reference ``--lamb``, 5); alpha, the step α of the simulated harmful
    perturbation (``--alpha``, 0.1); eps, the guard of α / (‖∇L_harm‖ + eps); prefix, the batch prefix of the harmful
    group (see :class:`BoosterBatches`)."""

    lam: float = 5.0
    alpha: float = 0.1
    eps: float = 1e-7
    prefix: str = HARM_PREFIX

    def __post_init__(self) -> None:
        _number("booster", "lam", self.lam, 0.0)
        _number("booster", "alpha", self.alpha, 0.0)
        _number("booster", "eps", self.eps, 0.0, strict=True)
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ConfigError(f"booster.prefix={self.prefix!r} must be a non-empty string such as 'harm_'")


CONFIGS: dict[str, type] = {"vaccine": VaccineConfig, "lisa": LisaConfig, "booster": BoosterConfig}


# ---------------------------------------------------------------------------------------------------- helpers
def global_norm_f32(tree: Any) -> jax.Array:
    """sqrt(Σ x²) over every leaf of ``tree``, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.zeros(())


def _add_scaled(a: Any, b: Any, scale: Any) -> Any:
    """a + scale·b leaf by leaf, in float32, cast back to a's dtypes."""
    return jax.tree.map(lambda x, y: (x.astype(jnp.float32) + scale * y.astype(jnp.float32)).astype(x.dtype), a, b)


def _with_metrics(metrics: Metrics, extra: Mapping[str, jax.Array]) -> Metrics:
    return {**metrics, **{k: jax.lax.stop_gradient(v) for k, v in extra.items()}}


class _Rule:
    """Shared parts of the rules: no state unless a rule keeps one; ``describe`` for the checkpoint fingerprint."""

    name = "none"
    cfg: Any = None

    def init_extra(self, params: Any) -> Any:
        return None

    def step_extra(self, extra: Any, params: Any, step: jax.Array) -> Any:
        return extra

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **(dataclasses.asdict(self.cfg) if self.cfg is not None else {})}


class PlainGrad(_Rule):
    """The engine's default: ``jax.value_and_grad(loss)`` (``make_defense_grad("none")``; its empty ``describe``
    keeps the fingerprint of a run without a rule)."""

    def describe(self) -> dict[str, Any]:
        return {}

    def __call__(self, loss: BoundLoss, params: Any, batch: Batch, step: jax.Array, extra: Any) -> GradOut:
        return jax.value_and_grad(loss, has_aux=True)(params, batch)


# ---------------------------------------------------------------------------------------------------- Vaccine
class VaccineGrad(_Rule):
    """Vaccine's gradient (see the module docstring). ``model_config`` gives the perturbation's shape [L, B, T, D]
    and dtype (the compute dtype)."""

    name = "vaccine"

    def __init__(self, cfg: VaccineConfig, model_config: Any):
        self.cfg, self.model_config = cfg, model_config

    def __call__(self, loss: BoundLoss, params: Any, batch: Batch, step: jax.Array, extra: Any) -> GradOut:
        mc = self.model_config
        b, t = batch["tokens"].shape
        zeros = jnp.zeros((mc.num_hidden_layers, b, t, mc.hidden_size), mc.dtype)

        def shifted(w: Any, delta: jax.Array) -> tuple[jax.Array, Metrics]:
            return loss(w, {**batch, PERTURB_KEY: {"attn_out": delta}})

        (value, metrics), g = jax.value_and_grad(lambda d: shifted(params, d), has_aux=True)(zeros)
        norm = global_norm_f32(g)
        delta = jax.lax.stop_gradient((self.cfg.rho / (norm + self.cfg.eps)) * g.astype(jnp.float32)).astype(mc.dtype)
        (perturbed, _), grads = jax.value_and_grad(lambda w: shifted(w, delta), has_aux=True)(params)
        extra_metrics = {"vaccine/hidden_grad_norm": norm, "vaccine/perturbed_loss": perturbed}
        return (value, _with_metrics(metrics, extra_metrics)), grads


# ---------------------------------------------------------------------------------------------------- Lisa
def lisa_is_alignment(step: Any, cfg: LisaConfig) -> Any:
    """Whether 0-based ``step`` is an alignment step (alignment phase first); works on ints and traced arrays."""
    if cfg.finetune_steps == 0:
        return step >= 0
    if cfg.alignment_steps == 0:
        return step < 0
    return step % (cfg.alignment_steps + cfg.finetune_steps) < cfg.alignment_steps


def lisa_switches(step: Any, cfg: LisaConfig) -> Any:
    """Whether 0-based ``step`` is the first of a new phase (the anchor is reset to the weights it starts from)."""
    if cfg.alignment_steps == 0 or cfg.finetune_steps == 0:
        return step < 0
    at = step % (cfg.alignment_steps + cfg.finetune_steps)
    return (step > 0) & ((at == 0) | (at == cfg.alignment_steps))


def lisa_proximal_active(step: Any, cfg: LisaConfig, total_steps: int) -> Any:
    """Whether the proximal term applies at 0-based ``step``: once more than ``proximal_after`` of the run is done."""
    return step > cfg.proximal_after * total_steps


class LisaGrad(_Rule):
    """Lisa's gradient: the loss's, plus ρ(w − w_anchor) once the proximal term is on. ``extra`` is
    ``{"anchor": weights}``, reset to the current weights on the first step of every phase."""

    name = "lisa"

    def __init__(self, cfg: LisaConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "total_steps": self.total_steps}

    def init_extra(self, params: Any) -> Any:
        return {"anchor": jax.tree.map(jnp.copy, params)}  # a copy: the step donates params and extra separately

    def step_extra(self, extra: Any, params: Any, step: jax.Array) -> Any:
        if extra is None:
            raise ConfigError("Lisa keeps its anchor weights in TrainState.extra, which is None: create the state "
                              "with TrainState.create(..., extra=grad_fn.init_extra(params)) or let train() do it")
        switch = lisa_switches(step, self.cfg)
        return {"anchor": jax.tree.map(lambda a, p: jnp.where(switch, p, a), extra["anchor"], params)}

    def __call__(self, loss: BoundLoss, params: Any, batch: Batch, step: jax.Array, extra: Any) -> GradOut:
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
        diff = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32), params, extra["anchor"])
        rho = jnp.where(lisa_proximal_active(step, self.cfg, self.total_steps), self.cfg.rho, 0.0)
        drift = jnp.square(global_norm_f32(diff))
        grads = _add_scaled(grads, diff, rho)
        extra_metrics = {"lisa/proximal": rho / 2 * drift, "lisa/drift": drift,
                         "lisa/alignment_step": jnp.asarray(lisa_is_alignment(step, self.cfg), jnp.float32)}
        return (value, _with_metrics(metrics, extra_metrics)), grads


class LisaBatches(Iterator[Batch]):
    """Lisa's data: batch ``i`` (for 0-based step ``i``) comes from ``alignment`` on alignment steps and from
    ``user`` on fine-tuning steps (:func:`lisa_is_alignment`); with ``user_advances_on_alignment`` a user batch is
    drawn and dropped on alignment steps too. Both streams must last the run (``BatchIterator(num_epochs=None)``
    cycles, as the reference's alignment loader does); their positions and the step count are checkpointed through
    ``state()`` / ``restore()``."""

    def __init__(self, alignment: Iterator[Batch], user: Iterator[Batch], cfg: LisaConfig = LisaConfig()):
        self.alignment, self.user, self.cfg = alignment, user, cfg
        self._step = 0

    def __next__(self) -> Batch:
        if lisa_is_alignment(self._step, self.cfg):
            if self.cfg.user_advances_on_alignment:
                next(self.user)
            batch = next(self.alignment)
        else:
            batch = next(self.user)
        self._step += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"step": self._step, "alignment": _stream_state(self.alignment), "user": _stream_state(self.user)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self._step = int(state["step"])
        _restore_stream(self.alignment, state.get("alignment"), "alignment")
        _restore_stream(self.user, state.get("user"), "user")


# ---------------------------------------------------------------------------------------------------- Booster
class BoosterGrad(_Rule):
    """Booster's gradient (see the module docstring) on a batch holding the alignment group (``tokens``, …) and the
    harmful group under ``cfg.prefix``. ``frozen_slices``: ``optim.frozen_layers(optim_cfg, trainable)``, so that
    frozen layer slices neither count in ‖∇L_harm‖ nor move in the simulated perturbation."""

    name = "booster"

    def __init__(self, cfg: BoosterConfig, frozen_slices: Any = None):
        self.cfg = cfg
        self.mask = None if frozen_slices is None else mask_frozen_grads(frozen_slices)

    def split(self, batch: Batch) -> tuple[dict[str, Any], dict[str, Any]]:
        """(alignment micro-batch, harmful micro-batch with the prefix stripped); both get ``dropout_rng``."""
        p = self.cfg.prefix
        harm = {k[len(p):]: v for k, v in batch.items() if k.startswith(p)}
        if "tokens" not in harm:
            raise DataError(f"Booster needs the harmful group in the batch as '{p}tokens', '{p}loss_mask', ...; the "
                            f"batch has {sorted(batch)} (combine the two streams with BoosterBatches)")
        align = {k: v for k, v in batch.items() if not k.startswith(p)}
        if "dropout_rng" in batch:
            harm["dropout_rng"] = batch["dropout_rng"]
        return align, harm

    def __call__(self, loss: BoundLoss, params: Any, batch: Batch, step: jax.Array, extra: Any) -> GradOut:
        align, harm = self.split(batch)
        cfg = self.cfg
        (value, metrics), g_align = jax.value_and_grad(loss, has_aux=True)(params, align)
        (harm_loss, _), g_harm = jax.value_and_grad(loss, has_aux=True)(params, harm)
        direction = g_harm if self.mask is None else self.mask.update(g_harm, optax.EmptyState())[0]
        norm = global_norm_f32(direction)
        shifted = _add_scaled(params, direction, -cfg.alpha / (norm + cfg.eps))
        (shifted_loss, _), g_shifted = jax.value_and_grad(loss, has_aux=True)(shifted, harm)
        grads = jax.tree.map(
            lambda a, h, s: (a.astype(jnp.float32) + cfg.lam * (h.astype(jnp.float32) - s.astype(jnp.float32)))
            .astype(a.dtype), g_align, g_harm, g_shifted)
        extra_metrics = {"booster/harmful_loss": harm_loss, "booster/shifted_harmful_loss": shifted_loss,
                         "booster/harmful_grad_norm": norm}
        return (value, _with_metrics(metrics, extra_metrics)), grads


class BoosterBatches(Iterator[Batch]):
    """Booster's data: each alignment batch with the next harmful batch's arrays added under ``prefix``
    (``harm_tokens``, ``harm_loss_mask``, ...). The harmful stream must last the run (the reference cycles it, with
    batches of 10); positions are checkpointed through ``state()`` / ``restore()``."""

    def __init__(self, alignment: Iterator[Batch], harmful: Iterator[Batch], prefix: str = HARM_PREFIX):
        self.alignment, self.harmful, self.prefix = alignment, harmful, prefix

    def __next__(self) -> Batch:
        batch, harm = dict(next(self.alignment)), next(self.harmful)
        clash = [k for k in batch if k.startswith(self.prefix)]
        if clash:
            raise DataError(f"alignment batch keys {clash} start with the harmful prefix '{self.prefix}'; rename them "
                            "or choose another prefix")
        batch.update({self.prefix + k: v for k, v in harm.items()})
        return batch

    def state(self) -> dict[str, Any]:
        return {"alignment": _stream_state(self.alignment), "harmful": _stream_state(self.harmful)}

    def restore(self, state: Mapping[str, Any]) -> None:
        _restore_stream(self.alignment, state.get("alignment"), "alignment")
        _restore_stream(self.harmful, state.get("harmful"), "harmful")


def _stream_state(stream: Any) -> Any:
    return stream.state() if hasattr(stream, "state") else None


def _restore_stream(stream: Any, state: Any, name: str) -> None:
    if state is None:
        return
    if not hasattr(stream, "restore"):
        raise DataError(f"the checkpoint holds a position of the {name} stream, which cannot restore one; pass a "
                        "resumable iterator (data.batches.BatchIterator)")
    stream.restore(state)


# ---------------------------------------------------------------------------------------------------- entry
def make_defense_grad(name: str, cfg: Any = None, *, model_config: Any = None, total_steps: int | None = None,
                      frozen_slices: Any = None) -> _Rule:
    """The gradient function of defense ``name`` (one of :data:`DEFENSES`) for ``train(..., grad_fn=...)``.

    cfg: the defense's config (default: the spec's, ``VaccineConfig()`` / ``LisaConfig()`` / ``BoosterConfig()``).
    model_config: the ``LlamaConfig`` (Vaccine). total_steps: the run's ``TrainConfig.steps`` (Lisa: when the
    proximal term starts). frozen_slices: ``optim.frozen_layers(optim_cfg, trainable)`` (Booster, when layer slices
    of trainable weights are frozen).
    """
    if name not in DEFENSES:
        raise ConfigError(f"unknown defense {name!r}; known: {', '.join(DEFENSES)}")
    if name == "none":
        if cfg is not None:
            raise ConfigError(f"defense 'none' takes no config, got {cfg!r}")
        return PlainGrad()
    cfg = CONFIGS[name]() if cfg is None else cfg
    if not isinstance(cfg, CONFIGS[name]):
        raise ConfigError(f"defense {name!r} takes a {CONFIGS[name].__name__}, got {type(cfg).__name__}")
    if name == "vaccine":
        if model_config is None:
            raise ConfigError("Vaccine perturbs every layer's attention output: pass model_config=LlamaConfig(...)")
        return VaccineGrad(cfg, model_config)
    if name == "lisa":
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"Lisa needs total_steps (the run's train.steps) to start its proximal term after "
                              f"{cfg.proximal_after:g} of the run; got {total_steps!r}")
        return LisaGrad(cfg, total_steps)
    return BoosterGrad(cfg, frozen_slices)
