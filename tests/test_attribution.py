"""Attribution: integrated-gradients completeness, gradient × input and component scores against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.analysis import attribution
from safety_jax.model.config import get_preset
from safety_jax.model.llama import forward, init_params


@pytest.fixture(scope="module")
def tiny(fast_compiles):
    cfg = get_preset("tiny", num_hidden_layers=3)
    params = init_params(cfg, jax.random.key(0), initializer_range=0.1)
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 1, cfg.vocab_size)
    mask = jnp.ones((3, 7), jnp.int32).at[0, :2].set(0)  # one left-padded row
    v = jax.random.normal(jax.random.key(2), (cfg.hidden_size,))
    return cfg, params, tokens, mask, v / jnp.linalg.norm(v)


def test_integrated_gradients_are_complete(tiny):
    cfg, params, tokens, mask, v = tiny
    ig, delta = attribution.integrated_gradients(params, tokens, mask, v, config=cfg, layer=2, steps=64)
    ig, delta = np.asarray(ig, np.float64), np.asarray(delta, np.float64)
    assert np.all(np.abs(ig.sum(1) - delta) <= 0.01 * np.abs(delta))
    assert np.all(ig[0, :2] == 0)  # padding gets no relevance


def test_projection_matches_the_captured_state(tiny):
    cfg, params, tokens, mask, v = tiny
    _, cap = forward(params, tokens, cfg, attention_mask=mask, capture="resid_post")
    want = np.asarray(cap["resid_post"][1, :, -1]) @ np.asarray(v)
    got = attribution.projection(params, tokens, mask, v, config=cfg, layer=1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_gradient_x_input_is_the_first_order_term(tiny):
    cfg, params, tokens, mask, v = tiny
    rel = np.asarray(attribution.gradient_x_input(params, tokens, mask, v, config=cfg, layer=2))
    # scaling token t's embedding by (1 + ε) changes f by ε · relevance_t to first order
    e = jnp.take(params["embed"], tokens, axis=0)
    eps, t = 1e-2, 4
    f = lambda x: np.asarray(attribution._projection(params, x, mask, cfg, 2, v), np.float64)
    fd = (f(e.at[:, t].multiply(1 + eps)) - f(e.at[:, t].multiply(1 - eps))) / (2 * eps)  # central difference
    np.testing.assert_allclose(rel[:, t], fd, rtol=2e-2, atol=1e-3)


def test_component_scores_are_gradient_x_coordinate(tiny):
    cfg, params, tokens, mask, v = tiny
    src = jax.random.normal(jax.random.key(3), (cfg.num_hidden_layers, 2, cfg.hidden_size))
    src = src / jnp.linalg.norm(src, axis=-1, keepdims=True)
    s = np.asarray(attribution.component_scores(params, tokens, mask, v, src, config=cfg, layer=2))
    assert s.shape == (3, 2) and np.all(s[2:] == 0)
    # finite difference: add ε · v_j to the last token's state after block 0
    layer, j, eps = 0, 1, 1e-3
    pos = attribution.last_positions(mask)
    zeros = jnp.zeros((cfg.num_hidden_layers, 3, 7, cfg.hidden_size))
    bump = zeros.at[layer, jnp.arange(3), pos].set(eps * src[layer, j])
    e = jnp.take(params["embed"], tokens, axis=0)
    f = lambda p: np.asarray(attribution._projection(params, e, mask, cfg, 2, v, p), np.float64)
    slope = (f(bump) - f(zeros)) / eps
    _, cap = forward(params, tokens, cfg, attention_mask=mask, capture="resid_post")
    coord = np.asarray(cap["resid_post"][layer, jnp.arange(3), pos]) @ np.asarray(src[layer, j])
    np.testing.assert_allclose(s[layer, j], np.mean(coord * slope), rtol=2e-2, atol=1e-5)


def test_top_tokens_respects_the_editable_mask():
    rel = np.array([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.1, 0.0]])
    editable = np.array([[1, 0, 1, 1], [1, 0, 0, 0]], bool)
    assert attribution.top_tokens(rel, 2, editable).tolist() == [[3, 2], [0, -1]]
