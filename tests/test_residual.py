"""Residual-space kernels against an independent numpy float64 implementation on random data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.analysis import residual
from safety_jax.errors import ConfigError
from safety_jax.model.config import get_preset
from safety_jax.model.interventions import directional_ablation
from safety_jax.model.llama import forward, init_params

L, N, D = 3, 40, 12


def _pair(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(L, n, D))
    # a low-rank shift plus noise, so the spectrum has a dominant component
    u = rng.normal(size=(L, n, 1)) + 2.0
    y = x + u * rng.normal(size=(L, 1, D)) + 0.1 * rng.normal(size=(L, n, D))
    return x, y


def _rel(a, b):
    return np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))


def test_shift_variants_and_least_squares_map_equal_numpy():
    x, y = _pair()
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    assert _rel(residual.representation_shift(xj, yj, "identity"), y - x) < 1e-6
    w_ref = np.stack([np.linalg.lstsq(x[i], y[i], rcond=None)[0] for i in range(L)])
    assert _rel(residual.least_squares_map(xj, yj), w_ref) < 1e-5
    r_ref = np.einsum("lnd,lde->lne", x, w_ref) - x
    assert _rel(residual.representation_shift(xj, yj, "matrix"), r_ref) < 1e-5
    with pytest.raises(ConfigError, match="identity"):
        residual.representation_shift(xj, yj, "affine")


def test_matrix_shift_equals_identity_when_fewer_rows_than_dims():
    x, y = _pair(1, n=8)  # N < D: X W fits Y exactly
    r = residual.representation_shift(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), "matrix")
    assert _rel(r, y - x) < 1e-4


def test_components_shares_and_effective_rank_equal_numpy():
    x, y = _pair(2)
    shift = y - x
    comp = residual.shift_components(jnp.asarray(shift, jnp.float32))
    for i in range(L):
        u, s, vt = np.linalg.svd(shift[i], full_matrices=False)
        sign = np.where(u.sum(0) < 0, -1.0, 1.0)
        vt = vt * sign[:, None]
        lam = s**2 / (N - 1)
        assert _rel(comp.singular_values[i], s) < 1e-5
        assert _rel(comp.variances[i], lam) < 1e-5
        assert _rel(comp.share[i], lam / lam.sum()) < 1e-5
        # directions of well-separated singular values are determined up to the (fixed) sign
        sep = np.r_[np.inf, -np.diff(s)] > 1e-2 * s[0]
        sep &= np.r_[-np.diff(s), np.inf] > 1e-2 * s[0]
        assert _rel(np.asarray(comp.directions[i])[sep], vt[sep]) < 1e-4
        cum = np.cumsum(lam / lam.sum())
        want = [int(np.argmax(cum >= t)) + 1 for t in residual.THRESHOLDS]
        assert residual.effective_rank(comp.share)[i].tolist() == want
    assert comp.share[:, 0].min() > 0.5  # the constructed shift has one dominant component
    top2 = residual.shift_components(jnp.asarray(shift, jnp.float32), k=2)
    assert top2.directions.shape == (L, 2, D) and _rel(top2.share, np.asarray(comp.share)[:, :2]) < 1e-6


def test_percentile_threshold_accuracy_equals_numpy():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(L, 5, N))
    labels = rng.random(N) < 0.3
    thr = np.percentile(scores, 100 * (1 - labels.mean()), axis=-1, keepdims=True)
    want = ((scores > thr) == labels).mean(-1)
    got = residual.percentile_accuracy(jnp.asarray(scores, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-7)


def test_refusal_prediction_finds_the_separating_component():
    rng = np.random.default_rng(4)
    labels = rng.random(N) < 0.5
    dirs = np.linalg.qr(rng.normal(size=(D, D)))[0].T[None].repeat(L, 0)  # [L, D, D] orthonormal rows
    acts = rng.normal(size=(L, N, D)) + 4.0 * labels[None, :, None] * dirs[:, 2][:, None, :]
    out = residual.refusal_prediction(jnp.asarray(acts, jnp.float32), jnp.asarray(dirs, jnp.float32), labels, top=5)
    assert (out["best_index"] == 2).all() and (out["best"] > 0.9).all()
    assert out["per_component"].shape == (L, 5)
    rand = residual.random_directions(jax.random.key(0), L, 4, D)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(rand), axis=-1), 1.0, rtol=1e-6)


def test_difference_in_means_is_float64_mean_difference():
    rng = np.random.default_rng(5)
    h, b = rng.normal(size=(L, 7, 3, D)).astype(np.float32), rng.normal(size=(L, 9, 3, D)).astype(np.float32)
    got = residual.difference_in_means(h, b)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, h.astype(np.float64).mean((1, 2)) - b.astype(np.float64).mean((1, 2)),
                               rtol=1e-12)


def test_weight_orthogonalisation_equals_activation_ablation(fast_compiles):
    cfg = get_preset("tiny", tie_word_embeddings=False)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    r = jax.random.normal(jax.random.key(2), (cfg.hidden_size,))
    names = ("resid_pre", "resid_post")
    ab_logits, ab = forward(params, tokens, cfg, capture=names,
                            interventions=directional_ablation(r, cfg.num_hidden_layers))
    ow_logits, ow = forward(residual.orthogonalize_weights(params, r, cfg), tokens, cfg, capture=names)
    for name in names:
        np.testing.assert_allclose(np.asarray(ow[name]), np.asarray(ab[name]), rtol=1e-5, atol=1e-5)
        comp = np.einsum("lbtd,d->lbt", np.asarray(ow[name]), np.asarray(r / jnp.linalg.norm(r)))
        assert np.abs(comp).max() < 1e-5
    np.testing.assert_allclose(np.asarray(ow_logits), np.asarray(ab_logits), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="ties"):
        residual.orthogonalize_weights(params, r, get_preset("tiny", tie_word_embeddings=True))
