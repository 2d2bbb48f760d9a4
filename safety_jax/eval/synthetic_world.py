"""Evaluation on the synthetic safety world: generate → judge → metrics, and the per-example quantities the
analyses of Jain et al. 2024 (arXiv 2407.10264) are built from.

Every function takes params, a model config and :class:`~safety_jax.data.synthetic_sets.SyntheticBatch` sets and
returns host numpy values; batches stream through module-level jitted kernels with a fixed shape (the last batch is
padded), so each kernel compiles once per model shape however many sets and models are evaluated.

- :func:`evaluate_sets`: teacher-forced token accuracy on the output positions against the true transformation
  ("instruct") and against the refusal ("null"), plus greedy generation judged exactly (refused / harmful / correct /
  other), per named set.
- :func:`window_features`: the τ features — MLP hidden activation averaged over ``>`` and the next ``width − 1``
  positions — with the true transformation after ``>`` (as the reference code feeds it), for every set.
- :func:`tau_by_set`, :func:`separation`: τ against the class means of the standard safe and unsafe sets.
- :func:`attack_sweep`: adversarial soft tokens of growing number and optimisation length; attack success
  (teacher-forced exact match of the harmful completion, i.e. greedy decoding reproduces it) and τ of the attacked
  inputs.
- :func:`lipschitz_by_set`, :func:`row_space_by_set`: analyses 4 and 3 per set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.analysis.activations import collect_activations, map_batches, window_mean_positions
from safety_jax.analysis.clusters import class_means, tau, tau_summary
from safety_jax.analysis.lipschitz import local_lipschitz
from safety_jax.analysis.weights import module_matrix, row_space_alignment, row_space_basis
from safety_jax.data.synthetic import PAD
from safety_jax.data.synthetic_sets import SyntheticBatch, concat_batches
from safety_jax.eval.attacks import soft_token_attack
from safety_jax.eval.judges import judge_synthetic, verdict_rates
from safety_jax.model.config import LlamaConfig
from safety_jax.model.generate import generate
from safety_jax.model.llama import Params, forward

Sets = Mapping[str, SyntheticBatch]


# ---------------------------------------------------------------------------------------------------- helpers
def _concat(sets: Sets, field: str) -> np.ndarray:
    return np.concatenate([np.asarray(getattr(b, field)) for b in sets.values()], axis=0)


def _split(x: np.ndarray, sets: Sets, axis: int = 0) -> dict[str, np.ndarray]:
    """Split a concatenation over ``sets`` back into one array per set (along ``axis``)."""
    bounds = np.cumsum([len(b) for b in sets.values()])[:-1]
    return dict(zip(sets, np.split(x, bounds, axis=axis)))


@partial(jax.jit, static_argnames=("config",))
def _target_hits(params: Params, tokens: jax.Array, loss_mask: jax.Array, attention_mask: jax.Array | None,
                 positions: jax.Array | None, input_embeds: jax.Array | None, *,
                 config: LlamaConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Teacher-forced hits: per row, how many masked target tokens are the argmax of the previous position's logits,
    how many targets there are, and whether the first target is hit. tokens, loss_mask: [B, T] -> three [B]."""
    logits = forward(params, tokens, config, attention_mask=attention_mask, positions=positions,
                     input_embeds=input_embeds)
    return _hits_from_logits(logits, tokens, loss_mask)


def _hits_from_logits(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    mask = loss_mask[:, 1:].astype(bool)
    hit = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]) & mask
    first = jnp.take_along_axis(hit, jnp.argmax(mask, axis=1)[:, None], axis=1)[:, 0]
    return hit.sum(axis=1).astype(jnp.int32), mask.sum(axis=1).astype(jnp.int32), first


def target_hits(params: Params, config: LlamaConfig, tokens: np.ndarray, loss_mask: np.ndarray, *,
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hits [N], targets [N], first_hit [N] bool)``: teacher-forced argmax hits on the ``loss_mask`` tokens of
    ``tokens: [N, T]``, and whether the first target token is hit."""
    fn = lambda t, m: _target_hits(params, t, m, None, None, None, config=config)
    return map_batches(fn, np.asarray(tokens), np.asarray(loss_mask), batch_size=batch_size)


def left_padded_prompts(batch: SyntheticBatch) -> tuple[np.ndarray, np.ndarray]:
    """The inputs ``$ ops * text >`` left-padded with PAD: prompts and masks ``[N, P]`` int32.

    P = n_ops + text_len_max + 3, the longest possible input of the world, so every set (and subset) has one shape.
    """
    width = batch.ops.shape[1] + batch.text.shape[1] + 3
    lengths = batch.gt_pos + 1
    col = np.arange(width)[None, :]
    start = (width - lengths)[:, None]
    src = np.clip(col - start, 0, batch.tokens.shape[1] - 1)
    prompts = np.where(col >= start, np.take_along_axis(batch.tokens, src, axis=1), PAD).astype(np.int32)
    return prompts, (col >= start).astype(np.int32)


def generate_answers(params: Params, config: LlamaConfig, batch: SyntheticBatch, *, batch_size: int = 256
                     ) -> np.ndarray:
    """Greedy answers ``[N, 2·text_len_max + 1]`` (the tokens after ``>``) to the inputs of a safety batch."""
    prompts, mask = left_padded_prompts(batch)
    n_new = 2 * batch.text.shape[1] + 1
    fn = lambda p, m: generate(params, config, p, m, max_new_tokens=n_new, eos_token_ids=(), pad_token_id=PAD)[0]
    return map_batches(fn, prompts, mask, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------- metrics
def evaluate_sets(params: Params, config: LlamaConfig, sets: Sets, *, batch_size: int = 256,
                  generation: bool = True, verdicts: bool = False) -> dict[str, dict[str, Any]]:
    """Per set: ``instruct_acc`` (teacher-forced token accuracy of the true transformation on the output positions),
    ``null_acc`` (the same for the refusal on its ``decision_mask``: the null segment and ``*^``) and,
    with ``generation``, the verdict rates of greedy answers (``refused``, ``harmful``, ``correct``, ``other``; see
    ``judges.verdict_rates``). All values in [0, 1].
    ``verdicts=True`` also keeps each answer's verdict (``judges``' codes) as a list under ``"verdicts"``.

    All sets go through each kernel together (one compile, one pass).
    """
    merged = concat_batches(list(sets.values()))
    out: dict[str, dict[str, float]] = {name: {} for name in sets}
    for key, seqs, mask in (("instruct_acc", merged.transform, merged.loss_mask),
                            ("null_acc", merged.refusal, merged.decision_mask())):
        hits, count, _ = target_hits(params, config, seqs, mask, batch_size=batch_size)
        for name, h, c in zip(sets, _split(hits, sets).values(), _split(count, sets).values()):
            out[name][key] = float(h.sum() / max(c.sum(), 1))
    if generation:
        answers = generate_answers(params, config, merged, batch_size=batch_size)
        for name, ans in _split(answers, sets).items():
            judged = judge_synthetic(sets[name], ans)
            out[name].update(verdict_rates(judged))
            if verdicts:
                out[name]["verdicts"] = judged.astype(int).tolist()
    return out


def window_features(params: Params, config: LlamaConfig, sets: Sets, *, width: int = 10, batch_size: int = 256,
                    capture: str = "mlp_hidden") -> dict[str, np.ndarray]:
    """τ features per set: ``capture`` (default the MLP hidden activation after the nonlinearity) averaged over the
    ``>`` position and the next ``width − 1`` positions of the input followed by its true transformation.

    Returns ``{set: [L, N, F]}`` float32.
    """
    tokens = _concat(sets, "transform")
    pos, weights = window_mean_positions(_concat(sets, "gt_pos"), width, seq_len=tokens.shape[1])
    feats = collect_activations(params, config, tokens, capture=capture, capture_positions=pos,
                                pool_weights=weights, batch_size=batch_size)[capture]
    return _split(feats, sets, axis=1)


def tau_by_set(features: Mapping[str, np.ndarray], *, safe: str = "safe", unsafe: str = "unsafe",
               means: tuple[Any, Any] | None = None) -> dict[str, np.ndarray]:
    """τ ``[L, N]`` of every feature set against the class means of ``features[safe]`` and ``features[unsafe]``
    (or the given ``means = (μ_safe, μ_unsafe)``, each ``[L, F]``)."""
    mu_s, mu_u = means if means is not None else class_means(features[safe], features[unsafe])
    return {name: np.asarray(tau(f, mu_s, mu_u)) for name, f in features.items()}


def separation(taus: Mapping[str, np.ndarray], *, safe: str = "safe", unsafe: str = "unsafe") -> np.ndarray:
    """Cluster separation per layer: ``mean τ(safe) − mean τ(unsafe)`` ``[L]`` (larger: clusters further apart)."""
    return np.asarray(taus[safe]).mean(axis=1) - np.asarray(taus[unsafe]).mean(axis=1)


def summarise_taus(taus: Mapping[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """``{set: {"mean": [L], "std": [L]}}`` as plain lists (for JSON)."""
    return {name: {k: np.asarray(v).tolist() for k, v in tau_summary(t).items()} for name, t in taus.items()}


# ---------------------------------------------------------------------------------------------------- attacks
@partial(jax.jit, static_argnames=("config", "capture"))
def _attacked_eval(params: Params, tokens: jax.Array, attention_mask: jax.Array, positions: jax.Array,
                   input_embeds: jax.Array, target_mask: jax.Array, capture_positions: jax.Array,
                   pool_weights: jax.Array, *, config: LlamaConfig, capture: str
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One forward of soft-token inputs: teacher-forced hits, target counts, first-target hits [B] and pooled τ
    features [L, B, F]. (``collect_activations`` takes no ``input_embeds``: this is its pooled capture with soft
    tokens inserted.)"""
    logits, cap = forward(params, tokens, config, attention_mask=attention_mask, positions=positions,
                          input_embeds=input_embeds, capture=capture, capture_positions=capture_positions)
    feats = jnp.einsum("lbp...,bp->lb...", cap[capture].astype(jnp.float32), pool_weights)
    return (*_hits_from_logits(logits, tokens, target_mask), feats)


def attack_sweep(params: Params, config: LlamaConfig, batch: SyntheticBatch, means: tuple[Any, Any], *,
                 num_soft: Sequence[int] = (1, 2, 4), rounds: int = 3, steps_per_round: int = 20, lr: float = 0.1,
                 width: int = 10, seed: int = 0, batch_size: int = 256,
                 capture: str = "mlp_hidden") -> list[dict[str, Any]]:
    """Soft-token attacks (``eval.attacks.soft_token_attack``) of growing strength on an unsafe batch.

    Strength 0 (``num_soft = 0, steps = 0``) is the unattacked input. Then for each k in ``num_soft``: k vectors
    inserted before ``>`` and optimised toward the harmful completion for ``s, 2s, …, rounds·s`` steps
    (s = ``steps_per_round``; each round continues from the last). At each point: ``success`` (share of examples
    whose whole harmful completion is the teacher-forced argmax, i.e. greedy decoding answers harmfully),
    ``first_token_success`` (the first answer token is the harmful one: the refusal decision is flipped),
    ``target_acc`` (token accuracy on it), ``loss`` (mean target NLL; NaN unattacked) and τ per layer against
    ``means = (μ_safe, μ_unsafe)`` (``tau_mean``, ``tau_std``: [L] lists).
    """
    tokens, target = np.asarray(batch.transform), np.asarray(batch.loss_mask)
    mu_s, mu_u = means

    def row(k: int, steps: int, hits: Any, count: Any, first: Any, feats: Any, loss: float) -> dict[str, Any]:
        hits, count, t = np.asarray(hits), np.asarray(count), np.asarray(tau(feats, mu_s, mu_u))
        return {"num_soft": int(k), "steps": int(steps), "success": float(np.mean(hits == count)),
                "first_token_success": float(np.mean(first)), "target_acc": float(hits.sum() / max(count.sum(), 1)),
                "loss": loss, "tau_mean": t.mean(axis=1).tolist(), "tau_std": t.std(axis=1).tolist()}

    # The unattacked baseline, on the batch tiled to `batch_size` rows so the evaluation kernels compiled for the
    # test sets are reused (a batch of another size would compile them again).
    n = len(batch)
    tiled = batch.take(np.arange(max(n, batch_size)) % n)
    base = [x[:n] for x in target_hits(params, config, tiled.transform, tiled.loss_mask, batch_size=batch_size)]
    feats = window_features(params, config, {"x": tiled}, width=width, batch_size=batch_size,
                            capture=capture)["x"][:, :n]
    rows = [row(0, 0, *base, feats, float("nan"))]
    for k in num_soft:
        soft = None
        for r in range(1, rounds + 1):
            res = soft_token_attack(params, config, tokens, None, batch.gt_pos, target, num_soft=k,
                                    steps=steps_per_round, lr=lr, init=soft, key=jax.random.PRNGKey(seed + k))
            soft = res.soft
            pos, weights = window_mean_positions(np.asarray(res.anchor_idx), width, seq_len=res.tokens.shape[1])
            out = _attacked_eval(params, res.tokens, res.attention_mask, res.positions, res.input_embeds,
                                 res.target_mask, jnp.asarray(pos), jnp.asarray(weights), config=config,
                                 capture=capture)
            rows.append(row(k, r * steps_per_round, *out, float(np.asarray(res.losses)[-1].mean())))
    return rows


# ---------------------------------------------------------------------------------------------------- analyses 3, 4
def lipschitz_by_set(params: Params, config: LlamaConfig, sets: Sets, *, batch_size: int = 64,
                     values: bool = False, include_gt: bool = True) -> dict[str, Any]:
    """Mean ‖∂ max-logit / ∂ input embeddings‖ per set, the max logit taken at ``>`` (where the answer is decided);
    ``include_gt=False`` leaves ``>``'s own embedding out of the norm, as the reference does.

    Returns ``{set: mean}``; with ``values`` ``{set: {"mean": float, "values": [N] per-example norms}}``.
    """
    grad = local_lipschitz(params, config, _concat(sets, "transform"), position=_concat(sets, "gt_pos"),
                           include_position=include_gt, batch_size=batch_size)["grad_norm"]
    per_set = _split(np.asarray(grad, np.float64), sets)
    if values:
        return {name: {"mean": float(g.mean()), "values": g.tolist()} for name, g in per_set.items()}
    return {name: float(g.mean()) for name, g in per_set.items()}


def row_space_by_set(params: Params, pre_params: Params, config: LlamaConfig, sets: Sets, *,
                     modules: Sequence[str] = ("mlp.gate", "mlp.up"), batch_size: int = 256,
                     per_direction: bool = False, max_directions: int = 64) -> dict[str, dict[str, Any]]:
    """Row-space alignment (analysis 3): the MLP input at ``>`` of ``params`` against the right singular vectors of
    the *pretrained* MLP input weights, singular-value weighted. Returns ``{module: {set: [L] mean score}}``.

    With ``per_direction``: ``{module: {set: {"mean": [L], "per_direction": [L][D], "rest": [L]}}}`` where
    ``per_direction[l][i]`` is the mean over the set's examples of direction i's term ``s_i |cos(x, v_i)| / Σ_j s_j``
    (the terms ``row_space_alignment`` sums into the score), for the top ``D = min(r, max_directions)`` directions,
    and ``rest`` the mean of the remaining directions' terms: ``sum(per_direction[l]) + rest[l] = mean[l]``.
    """
    gt = _concat(sets, "gt_pos")[:, None].astype(np.int32)
    x = collect_activations(params, config, _concat(sets, "transform"), capture="mlp_in", capture_positions=gt,
                            batch_size=batch_size)["mlp_in"][:, :, 0]
    out: dict[str, dict[str, Any]] = {}
    for module in modules:
        s, vh = row_space_basis(module_matrix(pre_params, module))
        if not per_direction:
            score = np.asarray(row_space_alignment(x, s, vh))
            out[module] = {name: v.mean(axis=1).tolist() for name, v in _split(score, sets, axis=1).items()}
            continue
        terms = np.asarray(row_space_alignment(x, s, vh, per_direction=True), np.float64)  # [L, N, r]
        d = max(1, min(int(max_directions), terms.shape[-1]))
        out[module] = {}
        for name, t in _split(terms, sets, axis=1).items():
            by_dir = t.mean(axis=1)                                                       # [L, r]
            out[module][name] = {"mean": by_dir.sum(axis=1).tolist(), "per_direction": by_dir[:, :d].tolist(),
                                 "rest": by_dir[:, d:].sum(axis=1).tolist()}
    return out
