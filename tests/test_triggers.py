"""Trigger-token removal: the built-in rewriters and an attack that lowers the projection on the component."""

import jax
import jax.numpy as jnp
import numpy as np

from safety_jax.eval import triggers
from safety_jax.model.config import get_preset
from safety_jax.model.llama import init_params


def test_deletion_left_pads_and_substitution_lists_the_vocabulary():
    t, m, e = np.array([0, 5, 6, 7]), np.array([0, 1, 1, 1]), np.array([False, True, True, False])
    [(t2, m2, e2)] = triggers.deletion(pad_id=0)(t, m, e, 2, 0)
    assert t2.tolist() == [0, 0, 5, 7] and m2.tolist() == [0, 0, 1, 1] and e2.tolist() == [False, False, True, False]
    subs = triggers.substitution([3, 6, 9])(t, m, e, 2, 0)
    assert [s[0].tolist() for s in subs] == [[0, 5, 3, 7], [0, 5, 9, 7]]


def test_trigger_removal_lowers_the_projection_monotonically(fast_compiles):
    cfg = get_preset("tiny", num_hidden_layers=2)
    params = init_params(cfg, jax.random.key(0), initializer_range=0.1)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 6), 1, cfg.vocab_size), np.int32)
    mask = np.ones_like(tokens)
    editable = np.ones(tokens.shape, bool)
    editable[:, -1] = False  # the last token (where the state is read) stays
    v = jax.random.normal(jax.random.key(2), (cfg.hidden_size,))
    v = v / jnp.linalg.norm(v)
    res = triggers.trigger_removal(params, cfg, tokens, mask, editable, v, layer=1,
                                   rewriter=triggers.substitution(range(1, 20)), rounds=2, batch_size=16)
    assert res.history.shape == (3, 3)
    assert np.all(np.diff(res.history, axis=0) <= 1e-9) and np.all(res.end < res.start)
    assert np.all(res.tokens[:, -1] == tokens[:, -1]) and np.all(res.edits >= 1)
    assert np.all((res.tokens != tokens).sum(1) == res.edits)
    # a threshold above every start projection stops the attack before it edits anything
    res2 = triggers.trigger_removal(params, cfg, tokens, mask, editable, v, layer=1, threshold=1e9,
                                    rewriter=triggers.deletion(0), rounds=2, batch_size=16)
    assert (res2.edits == 0).all() and np.array_equal(res2.tokens, tokens)
