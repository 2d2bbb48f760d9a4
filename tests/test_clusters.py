"""τ cluster separation, cluster accuracy and the activation collection they start from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.analysis import activations, clusters
from safety_jax.model.config import get_preset
from safety_jax.model.llama import forward, param_shapes


def _random_params(cfg, seed: int, scale: float = 0.02):
    """Random params from numpy (jax.random compiles per leaf, seconds on CPU): normal matrices, unit norms."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
        else jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), param_shapes(cfg))
_forward = jax.jit(forward, static_argnums=2, static_argnames="capture")


def test_tau_matches_numpy_and_is_positive_near_the_safe_mean():
    rng = np.random.default_rng(0)
    safe = rng.normal(size=(3, 20, 8)).astype(np.float32) + 2.0
    unsafe = rng.normal(size=(3, 30, 8)).astype(np.float32) - 2.0
    mu_safe, mu_unsafe = clusters.class_means(safe, unsafe)
    np.testing.assert_allclose(mu_safe, safe.mean(axis=1), rtol=1e-5)
    feats = rng.normal(size=(3, 7, 8)).astype(np.float32)
    expected = (np.linalg.norm(feats - unsafe.mean(1)[:, None], axis=-1)
                - np.linalg.norm(feats - safe.mean(1)[:, None], axis=-1))
    np.testing.assert_allclose(clusters.tau(feats, mu_safe, mu_unsafe), expected, rtol=1e-5, atol=1e-5)
    # Sign convention: the safe mean itself has τ = ‖μ_safe − μ_unsafe‖ > 0, the unsafe mean the negative.
    at_means = np.stack([mu_safe, mu_unsafe], axis=1)
    t = np.asarray(clusters.tau(at_means, mu_safe, mu_unsafe))
    gap = np.linalg.norm(np.asarray(mu_safe) - np.asarray(mu_unsafe), axis=-1)
    np.testing.assert_allclose(t[:, 0], gap, rtol=1e-5)
    np.testing.assert_allclose(t[:, 1], -gap, rtol=1e-5)
    summary = clusters.tau_summary(expected)
    np.testing.assert_allclose(summary["mean"], expected.mean(1), rtol=1e-5)
    np.testing.assert_allclose(summary["std"], expected.std(1), rtol=1e-5)
    table = clusters.tau_table({"safe": safe, "unsafe": unsafe}, mu_safe, mu_unsafe)
    assert bool((table["safe"]["mean"] > 0).all()) and bool((table["unsafe"]["mean"] < 0).all())


def test_cluster_accuracy_is_one_on_separable_data_and_half_on_identical_sets():
    rng = np.random.default_rng(1)
    safe = rng.uniform(1.0, 2.0, size=(2, 40, 5)).astype(np.float32)
    unsafe = -rng.uniform(1.0, 2.0, size=(2, 25, 5)).astype(np.float32)
    np.testing.assert_array_equal(clusters.cluster_accuracy(safe, unsafe, *clusters.class_means(safe, unsafe)), 1.0)
    same = rng.normal(size=(2, 10, 5)).astype(np.float32)
    acc = clusters.cluster_accuracy(same, same, *clusters.class_means(same, same))
    np.testing.assert_allclose(acc, 0.5)  # equal means: every τ = 0, all called safe


def test_tau_rejects_mismatched_means():
    with pytest.raises(ValueError, match=r"\[L, F\]"):
        clusters.tau(np.zeros((2, 3, 4)), np.zeros((2, 5)), np.zeros((2, 5)))


def _tiny_batch(n: int, t: int, seed: int = 0):
    cfg = get_preset("tiny")
    params = _random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, size=(n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[1, :3] = 0  # a left-padded row
    mask[2, -4:] = 0  # a right-padded row
    return cfg, params, tokens, mask


def test_collect_activations_equals_a_direct_forward_capture():
    cfg, params, tokens, mask = _tiny_batch(n=7, t=12)
    got = activations.collect_activations(params, cfg, tokens, mask, capture=("mlp_hidden", "mlp_in"), batch_size=3)
    _, ref = _forward(params, tokens, cfg, attention_mask=mask, capture=("mlp_hidden", "mlp_in"))
    assert got["mlp_hidden"].shape == (cfg.num_hidden_layers, 7, 12, cfg.intermediate_size)
    for name in ("mlp_hidden", "mlp_in"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)


def test_window_pooled_collection_equals_mean_over_anchor_and_next_positions():
    cfg, params, tokens, mask = _tiny_batch(n=5, t=16)
    anchor = np.array([2, 4, 6, 9, 12])
    cap_pos, pool_w = activations.window_mean_positions(anchor, width=5, seq_len=16)
    assert cap_pos.shape == (5, 5) and cap_pos[-1].tolist() == [12, 13, 14, 15, 15]
    np.testing.assert_allclose(pool_w.sum(1), 1.0)
    got = activations.collect_activations(params, cfg, tokens, mask, capture="mlp_hidden", capture_positions=cap_pos,
                                          pool_weights=pool_w, batch_size=2)["mlp_hidden"]
    _, ref = _forward(params, tokens, cfg, attention_mask=mask, capture=("mlp_hidden",))
    ref = np.asarray(ref["mlp_hidden"])
    expected = np.stack([ref[:, i, a:min(a + 5, 16)].mean(axis=1) for i, a in enumerate(anchor)], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    windows = activations.collect_activations(params, cfg, tokens, mask, capture="mlp_hidden",
                                              capture_positions=cap_pos, batch_size=5)["mlp_hidden"]
    np.testing.assert_allclose(activations.window_mean(windows, pool_w), expected, rtol=1e-5, atol=1e-6)
