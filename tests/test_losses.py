"""Losses against independent float64 numpy formulas, their step-0 values, finite-difference gradients, and
per-token log-probs against transformers."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import jax_from_hf, make_hf_model

from safety_jax.model.config import get_preset
from safety_jax.model.llama import forward, param_shapes
from safety_jax.train import losses as L

CONFIG = get_preset("tiny")
BETA = 0.1


# ---------------------------------------------------------------------------------------------------- numpy references
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_seq_logps(logits, tokens, mask):
    """Σ over target tokens t ≥ 1 of log softmax(logits[t-1])[tokens[t]], and the target counts."""
    lp = np_log_softmax(logits)[:, :-1]
    tok = np.take_along_axis(lp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    m = np.asarray(mask, np.float64)[:, 1:]
    return (tok * m).sum(-1), m.sum(-1)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, loss_type, ls=0.0, beta_l=None):
    beta_l = beta if beta_l is None else beta_l
    z = beta * (pc - rc) - beta_l * (pr - rr)  # = βΔ when symmetric
    if loss_type == "sigmoid":
        return -(1 - ls) * np_log_sigmoid(z) - ls * np_log_sigmoid(-z)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - z)
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def np_npo(nll, ref_nll, beta):
    return -(2 / beta) * np_log_sigmoid(beta * (nll - ref_nll))


# ---------------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("fast_compiles")


def np_params(config, seed, scale=0.08):
    """Random params made with numpy (no per-shape XLA compilations): weights N(0, scale²), norm gains ≈ 1."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 + 0.1 * rng.standard_normal(s.shape)) if "norm" in jax.tree_util.keystr(path)
                                    else scale * rng.standard_normal(s.shape), jnp.float32), param_shapes(config))


@pytest.fixture(scope="module")
def models():
    return np_params(CONFIG, 0), np_params(CONFIG, 1)


def _group(rng, b, t, prefix="", prompt=4, pad_tail=0):
    tokens = rng.integers(3, CONFIG.vocab_size, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.int32)
    mask[:, prompt: t - pad_tail] = 1
    attn = np.ones((b, t), np.int32)
    if pad_tail:
        attn[:, t - pad_tail:] = 0
        tokens[:, t - pad_tail:] = 0
    return {prefix + "tokens": tokens, prefix + "loss_mask": mask, prefix + "attention_mask": attn}


@pytest.fixture(scope="module")
def pair_batch():
    rng = np.random.default_rng(0)
    batch = {**_group(rng, 4, 12, "chosen_"), **_group(rng, 4, 12, "rejected_", prompt=3, pad_tail=2)}
    batch["rejected_loss_mask"][1, 5:] = 0  # a shorter completion
    return batch


_forward = jax.jit(lambda params, tokens, mask: forward(params, tokens, CONFIG, attention_mask=mask))
_capture = jax.jit(lambda params, tokens, mask: forward(params, tokens, CONFIG, attention_mask=mask,
                                                        capture="resid_post")[1]["resid_post"])


def _logits(params, batch, prefix):
    return np.asarray(_forward(params, batch[prefix + "tokens"], batch[prefix + "attention_mask"]))


@functools.cache
def _loss(name, **kwargs):
    """A jitted loss, built once per (name, options) so the tests share compilations."""
    return jax.jit(L.make_loss(name, CONFIG, **kwargs))


# ---------------------------------------------------------------------------------------------------- log-probs
def test_token_logps_match_numpy_on_random_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 9, 50)).astype(np.float32)
    tokens = rng.integers(0, 50, (4, 9))
    mask = rng.integers(0, 2, (4, 9))
    tok = np.asarray(jax.jit(L.token_logps)(logits, tokens))
    assert np.all(tok[:, 0] == 0) and tok.shape == tokens.shape
    ref_sums, _ = np_seq_logps(logits, tokens, mask)
    np.testing.assert_allclose((tok * np.asarray(L.target_mask(mask))).sum(-1), ref_sums, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 8, 10**6])
def test_sequence_logps_matches_numpy_on_random_hidden_states(chunk):
    """Random hidden states through a random head in chunks over 4 rows (4: one position each; 8: two, the 9
    positions padded to 10) or in one piece, against float64 numpy on the full logits."""
    rng = np.random.default_rng(0)
    hidden = rng.normal(0, 1, (4, 9, 16)).astype(np.float32)
    head = {"lm_head": rng.normal(0, 1, (16, 50)).astype(np.float32)}
    config = CONFIG.replace(vocab_size=50, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    tokens = rng.integers(0, 50, (4, 9))
    mask = rng.integers(0, 2, (4, 9))
    out = jax.jit(functools.partial(L.sequence_logps, config=config, chunk=chunk))(head, hidden, tokens, mask)
    logits = hidden.astype(np.float64) @ head["lm_head"]
    ref_sums, ref_counts = np_seq_logps(logits, tokens, mask)
    m = np.asarray(mask, np.float64)[:, 1:]
    np.testing.assert_allclose(np.asarray(out.logps), ref_sums, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.counts), ref_counts)
    np.testing.assert_allclose(np.asarray(out.logit_sums), (logits[:, :-1].mean(-1) * m).sum(-1), rtol=1e-6,
                               atol=1e-6)
    hits = (logits[:, :-1].argmax(-1) == np.asarray(tokens)[:, 1:]) * m
    np.testing.assert_array_equal(np.asarray(out.hits), hits.sum(-1))


def test_sequence_logps_ignores_position_zero_of_the_mask():
    config = CONFIG.replace(vocab_size=4)
    head = {"lm_head": jnp.zeros((CONFIG.hidden_size, 4))}
    out = L.sequence_logps(head, jnp.zeros((1, 3, CONFIG.hidden_size)), np.array([[1, 2, 3]]),
                           np.array([[1, 1, 1]]), config)
    assert float(out.counts[0]) == 2 and math.isclose(float(out.logps[0]), 2 * math.log(0.25), rel_tol=1e-6)


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_token_logps_match_transformers(style):
    model = make_hf_model(style)
    config, params = jax_from_hf(model)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, config.vocab_size, (2, 160))
    with torch.no_grad():
        ref_logits = model(input_ids=torch.as_tensor(tokens)).logits
        ref = torch.log_softmax(ref_logits[:, :-1].double(), -1).gather(-1, torch.as_tensor(tokens)[:, 1:, None])
    ours = jax.jit(lambda p, t: L.token_logps(forward(p, t, config), t))(params, tokens)
    np.testing.assert_allclose(np.asarray(ours)[:, 1:], ref[..., 0].numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("loss_type,ls,beta_l", [("sigmoid", 0.0, None), ("sigmoid", 0.2, None), ("hinge", 0.0, None),
                                                 ("ipo", 0.0, None), ("sigmoid", 0.0, 0.01), ("hinge", 0.0, 0.03)])
def test_dpo_loss_from_logps_matches_numpy(loss_type, ls, beta_l):
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (rng.normal(-20, 8, 64).astype(np.float32) for _ in range(4))
    dpo = jax.jit(lambda *x: L.dpo_loss_from_logps(*x, beta=BETA, loss_type=loss_type, label_smoothing=ls,
                                                   beta_rejected=beta_l))
    losses, rew_c, rew_r = dpo(pc, pr, rc, rr)
    expected = np_dpo(pc.astype(np.float64), pr, rc, rr, BETA, loss_type, ls, beta_l)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rew_c), BETA * (pc.astype(np.float64) - rc), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rew_r), (beta_l or BETA) * (pr.astype(np.float64) - rr), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(2)), ("hinge", 1.0),
                                                ("ipo", 1 / (4 * BETA**2))])
def test_dpo_loss_at_policy_equal_reference(models, pair_batch, loss_type, expected):
    policy, _ = models
    loss, metrics = _loss("dpo", beta=BETA, loss_type=loss_type)(policy, pair_batch, {"ref_params": policy})
    assert abs(float(loss) - expected) <= 1e-6 * max(1.0, expected)
    assert float(metrics["rewards/accuracies"]) == 0.0
    assert abs(float(metrics["rewards/margins"])) < 1e-6
    expected_names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
    assert set(metrics) == expected_names


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_on_model_matches_numpy(models, pair_batch, loss_type):
    policy, ref = models
    loss, metrics = _loss("dpo", beta=BETA, loss_type=loss_type)(policy, pair_batch, {"ref_params": ref})
    lp = {}
    for name, params in (("p", policy), ("r", ref)):
        for g in ("chosen_", "rejected_"):
            s, n = np_seq_logps(_logits(params, pair_batch, g), pair_batch[g + "tokens"], pair_batch[g + "loss_mask"])
            lp[name + g] = s / n if loss_type == "ipo" else s
    expected = np_dpo(lp["pchosen_"], lp["prejected_"], lp["rchosen_"], lp["rrejected_"], BETA, loss_type)
    assert abs(float(loss) - expected.mean()) <= 1e-6 * max(1.0, abs(expected.mean()))
    rew_c, rew_r = BETA * (lp["pchosen_"] - lp["rchosen_"]), BETA * (lp["prejected_"] - lp["rrejected_"])
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), rew_c.mean(), atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/accuracies"]), (rew_c > rew_r).mean())
    np.testing.assert_allclose(float(metrics["logps/rejected"]), lp["prejected_"].mean(), rtol=1e-5)
    logits_c = _logits(policy, pair_batch, "chosen_")[:, :-1]
    m = pair_batch["chosen_loss_mask"][:, 1:].astype(bool)
    np.testing.assert_allclose(float(metrics["logits/chosen"]), logits_c[m].mean(), rtol=1e-5, atol=1e-6)


def test_dpo_rpo_alpha_adds_the_chosen_token_mean_nll(models, pair_batch):
    """TRL's rpo_alpha: loss = DPO + α · (Σ chosen-token NLL / number of chosen tokens in the batch)."""
    policy, ref = models
    plain, _ = _loss("dpo", beta=BETA)(policy, pair_batch, {"ref_params": ref})
    loss, metrics = _loss("dpo", beta=BETA, rpo_alpha=0.7)(policy, pair_batch, {"ref_params": ref})
    s, n = np_seq_logps(_logits(policy, pair_batch, "chosen_"), pair_batch["chosen_tokens"],
                        pair_batch["chosen_loss_mask"])
    nll = -s.sum() / n.sum()
    assert abs(float(metrics["nll_loss"]) - nll) <= 1e-6 * abs(nll)
    assert abs(float(loss) - (float(plain) + 0.7 * nll)) <= 1e-6 * abs(float(loss))
    with pytest.raises(ValueError, match="rpo_alpha"):
        _loss("dpo", beta=BETA, rpo_alpha=-1.0)


def test_dpo_precomputed_reference_equals_on_the_fly(models, pair_batch):
    policy, ref = models
    loss_fn = _loss("dpo", beta=BETA, loss_type="sigmoid")
    [with_ref] = L.precompute_reference_logps(ref, CONFIG, [pair_batch])
    assert with_ref["ref_chosen_logps"].shape == (4,)
    a, _ = loss_fn(policy, with_ref, None)
    b, _ = loss_fn(policy, pair_batch, {"ref_params": ref})
    assert abs(float(a) - float(b)) < 1e-6
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        loss_fn(policy, pair_batch, None)


def test_synthetic_dpo_matches_reference_formula(models, pair_batch):
    """−log σ(β_w·(ℓ_ref(w) − ℓ(w)) − β_l·(ℓ_ref(l) − ℓ(l))), ℓ = summed NLL / full target length (T−1)."""
    policy, ref = models
    loss, _ = _loss("synthetic_dpo")(policy, pair_batch, {"ref_params": ref})
    nll = {}
    for name, params in (("p", policy), ("r", ref)):
        for g in ("chosen_", "rejected_"):
            s, _ = np_seq_logps(_logits(params, pair_batch, g), pair_batch[g + "tokens"], pair_batch[g + "loss_mask"])
            nll[name + g] = -s / (pair_batch[g + "tokens"].shape[1] - 1)
    z = 0.1 * (nll["rchosen_"] - nll["pchosen_"]) - 0.01 * (nll["rrejected_"] - nll["prejected_"])
    assert abs(float(loss) + np_log_sigmoid(z).mean()) < 1e-6


def test_example_mask_drops_filler_rows(models, pair_batch):
    policy, ref = models
    loss_fn = _loss("dpo", beta=BETA, loss_type="sigmoid")
    full, _ = loss_fn(policy, pair_batch, {"ref_params": ref})
    padded = {k: np.concatenate([v, v[:1]]) for k, v in pair_batch.items()}
    padded["example_mask"] = np.array([1, 1, 1, 1, 0], np.int32)
    masked, _ = loss_fn(policy, padded, {"ref_params": ref})
    assert abs(float(full) - float(masked)) < 1e-6


# ---------------------------------------------------------------------------------------------------- SFT / GA / GD
@pytest.fixture(scope="module")
def sft_batch():
    rng = np.random.default_rng(3)
    batch = _group(rng, 4, 12, pad_tail=3)
    batch.update(_group(rng, 4, 12, "retain_", prompt=2))
    return batch


def _np_token_mean_nll(params, batch, prefix):
    s, n = np_seq_logps(_logits(params, batch, prefix), batch[prefix + "tokens"], batch[prefix + "loss_mask"])
    return -s.sum() / n.sum()


def test_sft_loss_is_mean_completion_token_nll(models, sft_batch):
    policy, _ = models
    loss, metrics = _loss("sft")(policy, sft_batch, None)
    assert abs(float(loss) - _np_token_mean_nll(policy, sft_batch, "")) < 1e-6
    assert float(metrics["num_target_tokens"]) == sft_batch["loss_mask"][:, 1:].sum()


def test_sft_normaliser_makes_micro_batch_average_the_global_token_mean(models, sft_batch):
    policy, _ = models
    loss_fn = _loss("sft")
    batch = {k: v for k, v in sft_batch.items() if not k.startswith("retain_")}
    batch["loss_mask"] = batch["loss_mask"].copy()
    batch["loss_mask"][0, 6:] = 0  # micro-batches with different token counts
    stacked = L.add_loss_normalizers({k: v.reshape(2, 2, -1) for k, v in batch.items()})
    micro = [loss_fn(policy, {k: v[i] for k, v in stacked.items()}, None)[0] for i in range(2)]
    whole, _ = loss_fn(policy, batch, None)
    assert abs(float(np.mean(micro)) - float(whole)) < 1e-6


def test_gradient_ascent_and_difference_match_numpy(models, sft_batch):
    policy, _ = models
    forget = _np_token_mean_nll(policy, sft_batch, "")
    retain = _np_token_mean_nll(policy, sft_batch, "retain_")
    ga, _ = _loss("gradient_ascent")(policy, sft_batch, None)
    gd, metrics = _loss("gradient_difference", retain_weight=0.5)(policy, sft_batch, None)
    assert abs(float(ga) + forget) < 1e-6
    assert abs(float(gd) - (-forget + 0.5 * retain)) < 1e-6
    assert abs(float(metrics["retain_nll"]) - retain) < 1e-6


# ---------------------------------------------------------------------------------------------------- NPO
def test_npo_from_nll_matches_numpy_and_is_2_log2_over_beta_at_reference():
    rng = np.random.default_rng(4)
    nll, ref = rng.normal(30, 10, 32).astype(np.float32), rng.normal(30, 10, 32).astype(np.float32)
    npo = jax.jit(lambda a, b: L.npo_loss_from_nll(a, b, beta=BETA))
    np.testing.assert_allclose(np.asarray(npo(nll, ref)), np_npo(nll.astype(np.float64), ref, BETA), rtol=1e-6)
    assert abs(float(npo(nll, nll)[0]) - 2 / BETA * math.log(2)) < 1e-5


def test_npo_loss_on_model(models, sft_batch):
    policy, ref = models
    loss_fn = _loss("npo", beta=BETA, retain_weight=0.5)  # NPO + 0.5·NLL(retain)
    _, at_ref = loss_fn(policy, sft_batch, {"ref_params": policy})
    assert abs(float(at_ref["npo_loss"]) - 2 / BETA * math.log(2)) < 1e-5  # 13.86
    loss, metrics = loss_fn(policy, sft_batch, {"ref_params": ref})
    nll = -np_seq_logps(_logits(policy, sft_batch, ""), sft_batch["tokens"], sft_batch["loss_mask"])[0]
    ref_nll = -np_seq_logps(_logits(ref, sft_batch, ""), sft_batch["tokens"], sft_batch["loss_mask"])[0]
    npo = np_npo(nll, ref_nll, BETA).mean()
    assert abs(float(metrics["npo_loss"]) - npo) < 1e-5
    assert abs(float(loss) - npo - 0.5 * _np_token_mean_nll(policy, sft_batch, "retain_")) < 1e-5


def test_npo_gradient_tends_to_gradient_ascent_as_beta_goes_to_zero():
    """d/dNLL_θ of −(2/β) log σ(β(NLL_θ − NLL_ref)) = −2σ(−β(NLL_θ − NLL_ref)) → −1: the gradient of −NLL."""
    nll, ref = jnp.array([40.0, 12.0, 3.0]), jnp.array([35.0, 20.0, 3.0])
    grad = jax.grad(lambda x: jnp.sum(L.npo_loss_from_nll(x, ref, beta=1e-5)))(nll)
    np.testing.assert_allclose(np.asarray(grad), -1.0, atol=1e-3)


# -------------------------------------------------------------------------------------------- RMU, synthetic unlearning
def test_rmu_loss_matches_numpy(models, sft_batch):
    policy, ref = models
    layer, coeff, alpha = 1, 6.5, 10.0
    loss, metrics = _loss("rmu", layer=layer, steering_coeff=coeff, alpha=alpha, seed=3)(
        policy, sft_batch, {"ref_params": ref})

    def acts(params, prefix):
        cap = _capture(params, sft_batch[prefix + "tokens"], sft_batch[prefix + "attention_mask"])
        return np.asarray(cap[layer], np.float64)

    def np_mse(a, y, m):
        per_tok = ((a - y) ** 2).mean(-1)
        return ((per_tok * m).sum(-1) / m.sum(-1)).mean()

    u = np.random.default_rng(3).random(CONFIG.hidden_size)
    control = coeff * u / np.linalg.norm(u)
    forget = np_mse(acts(policy, ""), control, sft_batch["loss_mask"])
    retain = np_mse(acts(policy, "retain_"), acts(ref, "retain_"), sft_batch["retain_loss_mask"])
    assert abs(float(metrics["rmu/forget_loss"]) - forget) <= 1e-6 * forget
    assert abs(float(metrics["rmu/retain_loss"]) - retain) <= 1e-5 * retain + 1e-9
    assert abs(float(loss) - (forget + alpha * retain)) <= 1e-5 * (forget + alpha * retain)


def test_synthetic_unlearning_loss_matches_numpy(models, pair_batch):
    policy, _ = models
    loss, _ = _loss("synthetic_unlearning")(policy, pair_batch, None)
    nll = {}
    for g in ("chosen_", "rejected_"):
        s, _ = np_seq_logps(_logits(policy, pair_batch, g), pair_batch[g + "tokens"], pair_batch[g + "loss_mask"])
        nll[g] = -s / (pair_batch[g + "tokens"].shape[1] - 1)
    assert abs(float(loss) - (nll["chosen_"] - 0.1 * nll["rejected_"]).mean()) < 1e-6


def test_unknown_loss_and_loss_type_are_rejected():
    with pytest.raises(ValueError, match="unknown loss"):
        L.make_loss("dpoo", CONFIG)
    with pytest.raises(ValueError, match="loss_type"):
        L.make_dpo_loss(CONFIG, loss_type="kto")
    with pytest.raises(ValueError, match="logits_chunk"):
        L.make_sft_loss(CONFIG, logits_chunk=0)


# ---------------------------------------------------------------------------------------------------- gradients
def _central_difference(f, x, eps):
    """Numerical gradient of a scalar f at x (numpy float64) by central differences."""
    f = jax.jit(f)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (float(f(x + d)) - float(f(x - d))) / (2 * eps)
    return g


@pytest.mark.parametrize("loss_type,beta_l", [("sigmoid", None), ("hinge", None), ("ipo", None), ("sigmoid", 0.02)])
def test_dpo_gradient_matches_finite_differences(loss_type, beta_l):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x = rng.normal(-3, 2, (4, 3))  # rows: chosen, rejected, ref chosen, ref rejected; 3 pairs

        def f(v):
            return jnp.mean(L.dpo_loss_from_logps(*jnp.asarray(v), beta=0.7, loss_type=loss_type, label_smoothing=0.1,
                                                  beta_rejected=beta_l)[0])

        analytic = np.asarray(jax.grad(f)(x))
        numeric = _central_difference(f, x, 1e-6)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_logps_npo_and_rmu_gradients_match_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        logits = rng.normal(0, 1, (2, 4, 5))
        tokens, mask = rng.integers(0, 5, (2, 4)), np.array([[0, 1, 1, 1], [0, 0, 1, 1]])

        def f_logps(v):
            m = L.target_mask(mask)
            s = jnp.sum(L.token_logps(jnp.asarray(v), tokens) * m, axis=-1)
            return jnp.sum(s * jnp.arange(1.0, 3.0)) / jnp.sum(m)

        np.testing.assert_allclose(np.asarray(jax.grad(f_logps)(logits)),
                                   _central_difference(f_logps, logits, 1e-6), rtol=1e-6,
                                   atol=1e-9)

        nll = rng.normal(5, 2, (2, 3))
        f_npo = lambda v: jnp.mean(L.npo_loss_from_nll(v[0], v[1], beta=0.5))
        np.testing.assert_allclose(np.asarray(jax.grad(f_npo)(nll)),
                                   _central_difference(f_npo, nll, 1e-6), rtol=1e-6, atol=1e-9)

        acts, target = rng.normal(0, 1, (2, 3, 4)), rng.normal(0, 1, 4)
        f_mse = lambda v: jnp.mean(L.activation_mse(v, target, mask[:, 1:]))
        np.testing.assert_allclose(np.asarray(jax.grad(f_mse)(acts)),
                                   _central_difference(f_mse, acts, 1e-6), rtol=1e-6, atol=1e-9)


def test_sft_loss_directional_derivative_matches_fp32_central_difference(models, sft_batch):
    policy, _ = models
    loss_fn = L.make_sft_loss(CONFIG)
    f = jax.jit(lambda p: loss_fn(p, sft_batch, None)[0])
    rng = np.random.default_rng(7)
    p0 = jax.tree.map(np.asarray, policy)
    # a direction at the scale of each weight (matrices ~0.08, norm gains ~1 with spread 0.1)
    direction = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * x.std(), p0)
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, sft_batch, None)[0]))(policy)
    analytic = sum(float(np.vdot(np.asarray(g, np.float64), d)) for g, d in
                   zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True))
    h = 1e-2
    shift = lambda s: jax.tree.map(lambda p, d: p + np.float32(s * h) * d, p0, direction)
    numeric = (float(f(shift(1.0))) - float(f(shift(-1.0)))) / (2 * h)
    assert abs(analytic - numeric) <= 1e-2 * abs(analytic) + 1e-4, (analytic, numeric)


# ---------------------------------------------------------------------------------------------------- chunked head
CHUNK_T = 13  # prime, so no chunk of whole positions divides it


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def chunk_setup(request):
    """Config, policy / reference params and batches (T = 13) for the chunked-vs-full comparisons."""
    config = CONFIG.replace(tie_word_embeddings=request.param)
    rng = np.random.default_rng(11)
    sft = {**_group(rng, 4, CHUNK_T, pad_tail=3), **_group(rng, 4, CHUNK_T, "retain_", prompt=2)}
    pair = {**_group(rng, 4, CHUNK_T, "chosen_"), **_group(rng, 4, CHUNK_T - 2, "rejected_", prompt=3, pad_tail=2)}
    return config, np_params(config, 2), np_params(config, 3), sft, pair


def _metric_scale(key: str, metrics: dict, logit_scale: float) -> float:
    """The size of the terms a metric is a near-cancelling difference of (0 for the others): rewards and log ratios
    are differences of log-probs (times β ≤ 0.1 here), mean logits are means of logits of either sign."""
    if key.startswith("rewards/") and key != "rewards/accuracies":
        return 0.1 * max(abs(float(metrics["logps/chosen"])), abs(float(metrics["logps/rejected"])))
    if key == "forget_log_ratio":
        return abs(float(metrics["forget_nll"]))
    return logit_scale if key.startswith("logits/") else 0.0


def test_chunked_logps_and_metrics_equal_the_full_logits(chunk_setup):
    """sequence_logps in chunks of 8 tokens over 4 rows (2 positions: 7 chunks, 13 -> 14 positions) equals
    token_logps / masked_mean_logits / argmax on forward's full [B, T, V] logits."""
    config, policy, _, batch, _ = chunk_setup
    tokens, mask, attn = batch["tokens"], batch["loss_mask"], batch["attention_mask"]
    assert CHUNK_T % (8 // tokens.shape[0])
    logits = jax.jit(lambda p: forward(p, tokens, config, attention_mask=attn))(policy)
    hidden = jax.jit(lambda p: forward(p, tokens, config, attention_mask=attn, return_hidden=True))(policy)
    assert hidden.shape == (*tokens.shape, config.hidden_size)
    m = np.asarray(L.target_mask(mask))
    for chunk in (8, 10**6):
        out = jax.jit(functools.partial(L.sequence_logps, config=config, chunk=chunk))(policy, hidden, tokens, mask)
        assert _rel(out.logps, (np.asarray(L.token_logps(logits, tokens)) * m).sum(-1)) <= 1e-6, chunk
        assert _rel(np.sum(out.logit_sums) / np.sum(out.counts), L.masked_mean_logits(logits, mask)) <= 1e-6, chunk
        hits = (np.asarray(jnp.argmax(logits[:, :-1], -1)) == tokens[:, 1:]) * m[:, 1:]
        np.testing.assert_array_equal(np.asarray(out.hits), hits.sum(-1))


def _value_and_grad(name, config, chunk, **kw):
    loss_fn = L.make_loss(name, config, logits_chunk=chunk, **kw)
    return jax.jit(jax.value_and_grad(lambda p, b, a: loss_fn(p, b, a), has_aux=True))


@pytest.mark.parametrize("name,kw,data", [
    ("sft", {}, "sft"), ("gradient_difference", {"retain_weight": 0.5}, "sft"), ("dpo", {"beta": BETA}, "pair"),
    ("synthetic_dpo", {}, "pair"), ("npo", {"beta": BETA, "retain_weight": 0.5}, "sft"),
    ("synthetic_unlearning", {}, "pair")])
def test_losses_in_chunks_equal_the_full_logits_value_and_gradient(chunk_setup, name, kw, data):
    """Each loss with a 12-token chunk (over 4 or 8 rows: 3 or 1 positions, T = 13 padded) against one chunk of
    all B·T tokens (the full [B, T, V] logits): value, metrics and every gradient leaf within 1e-6 relative (a
    metric that is a difference of near-equal terms: relative to those terms, see ``_metric_scale``)."""
    config, policy, ref, sft, pair = chunk_setup
    batch = sft if data == "sft" else pair
    aux = {"ref_params": ref}
    (loss, metrics), grads = _value_and_grad(name, config, 12, **kw)(policy, batch, aux)
    (full_loss, full_metrics), full_grads = _value_and_grad(name, config, 10**6, **kw)(policy, batch, aux)
    assert _rel(loss, full_loss) <= 1e-6
    logits = forward(policy, pair["chosen_tokens"], config, attention_mask=pair["chosen_attention_mask"])
    logit_scale = float(jnp.mean(jnp.abs(logits)))
    for key, value in full_metrics.items():
        scale = max(abs(float(value)), _metric_scale(key, full_metrics, logit_scale))
        assert abs(float(metrics[key]) - float(value)) <= 1e-6 * scale, key
    for path, g in jax.tree_util.tree_leaves_with_path(full_grads):
        mine = functools.reduce(lambda t, k: t[k.key], path, grads)
        assert _rel(mine, g) <= 1e-6, (name, jax.tree_util.keystr(path))


def _f32_buffer_sizes(hlo: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)]


def test_sft_step_holds_no_full_logits_buffer():
    """The compiled value_and_grad of SFT (V = 4096, B·T = 128) with 32-token chunks has no float32 buffer as large
    as [B, T, V]; with one chunk it does (the check can see such a buffer)."""
    config = CONFIG.replace(vocab_size=4096)
    params = np_params(config, 4)
    rng = np.random.default_rng(5)
    batch = _group(rng, 2, 64, pad_tail=5)
    b, t = batch["tokens"].shape

    def largest(chunk: int) -> int:
        loss_fn = L.make_sft_loss(config, logits_chunk=chunk)
        step = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch)[0]))
        return max(_f32_buffer_sizes(step.lower(params).compile().as_text()))

    assert largest(32) < b * t * config.vocab_size
    assert largest(b * t) >= b * t * config.vocab_size
