"""Logistic probes: loss and gradient against a numpy float64 logistic regression, layer selection, save/load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.analysis import probes


def _np_loss_grad(w, b, x, y, l2):
    """Float64 reference: mean BCE with logits + l2/2 ‖w‖², and its gradient in (w, b)."""
    w, b, x, y = (np.asarray(a, np.float64) for a in (w, b, x, y))
    z = x @ w + b
    loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w
    r = 1.0 / (1.0 + np.exp(-z)) - y
    return loss, x.T @ r / len(y) + l2 * w, r.mean()


def _np_newton(x, y, l2, iters=30):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    theta = np.zeros(xa.shape[1])
    reg = np.full(xa.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-xa @ theta))
        g = xa.T @ (p - y) / len(y) + reg * theta
        h = (xa * (p * (1 - p))[:, None]).T @ xa / len(y) + np.diag(reg)
        theta -= np.linalg.solve(h, g)
    return theta[:-1], theta[-1]


def _data(seed=0, n=64, d=8, sep=1.0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int32)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + rng.normal(size=d)
    x[:, 0] += sep * (2 * y - 1)
    return x.astype(np.float32), y


def test_probe_loss_and_gradient_equal_numpy_float64_logistic_regression():
    x, y = _data()
    rng = np.random.default_rng(1)
    w, b, l2 = rng.normal(size=8).astype(np.float32) * 0.3, np.float32(0.2), 0.01
    loss, (gw, gb) = jax.value_and_grad(probes.probe_loss, argnums=(0, 1))(
        jnp.asarray(w), jnp.asarray(b), jnp.asarray(x), jnp.asarray(y, jnp.float32), l2)
    ref_loss, ref_gw, ref_gb = _np_loss_grad(w, b, x, y, l2)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), ref_gw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(gb), ref_gb, rtol=1e-5, atol=1e-7)


def test_fit_probe_reaches_the_float64_optimum_of_the_same_objective():
    x, y = _data(sep=0.7)
    l2 = 0.05
    probe = probes.fit_probe(x, y, l2=l2, steps=1500, lr=0.05)
    xs = (x - np.asarray(probe.mean)) / np.asarray(probe.scale)
    np.testing.assert_allclose(np.asarray(probe.mean), x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(probe.scale), x.std(0), rtol=1e-5)
    w_ref, b_ref = _np_newton(xs, y, l2)
    fitted = _np_loss_grad(probe.weights, probe.bias, xs, y, l2)[0]
    optimum = _np_loss_grad(w_ref, b_ref, xs, y, l2)[0]
    assert fitted - optimum < 1e-5
    np.testing.assert_allclose(np.asarray(probe.weights), w_ref, atol=2e-3)
    again = probes.fit_probe(x, y, l2=l2, steps=1500, lr=0.05)
    np.testing.assert_array_equal(np.asarray(again.weights), np.asarray(probe.weights))  # deterministic


def test_fit_probes_vmaps_over_layers_and_select_layer_picks_the_planted_separable_layer(tmp_path):
    rng = np.random.default_rng(2)
    n, d, n_layers, planted = 80, 6, 4, 2
    y = (np.arange(n) % 2).astype(np.int32)
    feats = rng.normal(size=(n_layers, n, d)).astype(np.float32)
    feats[planted, :, 3] += 4.0 * (2 * y - 1)
    probe = probes.fit_probes(feats[:, :40], y[:40], l2=1e-3, steps=300)
    assert probe.weights.shape == (n_layers, d) and probe.bias.shape == (n_layers,)
    single = probes.fit_probe(feats[1, :40], y[:40], l2=1e-3, steps=300)
    np.testing.assert_allclose(np.asarray(probe.weights[1]), np.asarray(single.weights), rtol=1e-5, atol=1e-6)
    layer, acc, margin = probes.select_layer(probe, feats[:, 40:], y[40:])
    assert layer == planted and acc[planted] == 1.0 and acc.shape == (n_layers,)
    chosen = probes.take_layer(probe, layer)
    direction = np.asarray(probes.probe_direction(chosen))
    np.testing.assert_allclose(np.linalg.norm(direction), 1.0, rtol=1e-6)
    assert np.argmax(np.abs(direction)) == 3 and direction[3] > 0.5  # towards "harmful", in raw feature space
    raw_logits = feats[planted, 40:] @ (np.asarray(chosen.weights) / np.asarray(chosen.scale))
    np.testing.assert_allclose(np.asarray(probes.probe_logits(chosen, feats[planted, 40:])),
                               raw_logits - np.asarray(chosen.mean / chosen.scale) @ np.asarray(chosen.weights)
                               + float(chosen.bias), rtol=1e-5, atol=1e-5)
    z = np.asarray(probes.probe_logits(chosen, feats[planted, 40:]))
    np.testing.assert_allclose(float(probes.probe_margin(chosen, feats[planted, 40:], y[40:])),
                               np.mean((2 * y[40:] - 1) * z), rtol=1e-5)
    np.testing.assert_allclose(margin[planted], np.mean((2 * y[40:] - 1) * z), rtol=1e-5)

    probes.save_probe(probe, tmp_path / "probe.safetensors", {"layer": layer})
    loaded, meta = probes.load_probe(tmp_path / "probe.safetensors")
    assert meta == {"layer": layer}
    for field in probes.PROBE_FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(loaded, field)), np.asarray(getattr(probe, field)))


def test_probe_inputs_are_validated():
    x, y = _data()
    with pytest.raises(ValueError, match="single class"):
        probes.fit_probe(x, np.zeros_like(y))
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        probes.fit_probe(x, y[:-1])
    with pytest.raises(ValueError, match="steps"):
        probes.fit_probe(x, y, steps=0)
    with pytest.raises(ValueError, match=r"\[L, N, D\]"):
        probes.fit_probes(x, y)
