"""GCG suffix attack: slot insertion, candidate scoring against a per-candidate loop, and a falling target loss."""

import jax
import numpy as np
import pytest

from safety_jax.errors import ConfigError
from safety_jax.eval import gcg
from safety_jax.model.config import get_preset
from safety_jax.model.llama import init_params


@pytest.fixture(scope="module")
def setup(fast_compiles):
    cfg = get_preset("tiny", num_hidden_layers=2, vocab_size=64)
    params = init_params(cfg, jax.random.key(0), initializer_range=0.1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, size=(2, 8)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :2] = 0  # left padding
    t, m, slots = gcg.insert_slots(tokens, mask, np.array([5, 5]), 3, fill=7)
    target = np.zeros_like(t)
    target[:, -3:] = 1  # the last three tokens are the target completion
    return cfg, params, tokens, t, m, slots, target


def test_insert_slots_moves_the_tail_right(setup):
    _, _, tokens, t, m, slots, _ = setup
    assert t.shape == (2, 11) and slots.tolist() == [[5, 6, 7]] * 2
    np.testing.assert_array_equal(t[:, :5], tokens[:, :5])
    np.testing.assert_array_equal(t[:, 5:8], 7)
    np.testing.assert_array_equal(t[:, 8:], tokens[:, 5:])
    assert m[1, :2].tolist() == [0, 0] and m[:, 5:8].all()


def test_candidate_scoring_equals_a_per_candidate_loop(setup):
    cfg, params, _, t, m, slots, target = setup
    cand = np.random.default_rng(1).integers(0, 64, size=(2, 5, 3)).astype(np.int32)
    got = np.asarray(gcg.score_candidates(params, t, m, target, slots, cand, config=cfg))
    for c in range(5):
        tc = t.copy()
        for b in range(2):
            tc[b, slots[b]] = cand[b, c]
        want = np.asarray(gcg.target_loss(params, tc, m, target, config=cfg))
        np.testing.assert_allclose(got[:, c], want, rtol=1e-5)


def test_gcg_lowers_the_target_loss(setup):
    cfg, params, _, t, m, slots, target = setup
    start = np.asarray(gcg.target_loss(params, t, m, target, config=cfg))
    allowed = np.ones(64, bool)
    allowed[0] = False
    res = gcg.gcg_attack(params, cfg, t, m, target, slots, gcg.GCGConfig(steps=6, top_k=8, num_candidates=16),
                         allowed=allowed)
    assert (res.loss < start).all()
    assert np.all(np.diff(res.history, axis=0) <= 1e-6)  # never worse than the step before
    np.testing.assert_allclose(np.asarray(gcg.target_loss(params, res.tokens, m, target, config=cfg)), res.loss,
                               rtol=1e-5)
    assert (res.suffix != 0).all()
    with pytest.raises(ConfigError, match="top_k"):
        gcg.gcg_attack(params, cfg, t, m, target, slots, gcg.GCGConfig(steps=1, top_k=64), allowed=allowed)
