"""Gradients with respect to input embeddings: local Lipschitzness and adversarial soft tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.analysis.lipschitz import last_token_index, local_lipschitz
from safety_jax.eval import attacks
from safety_jax.model.config import get_preset
from safety_jax.model.llama import forward, param_shapes


def _random_params(cfg, seed: int, scale: float = 0.02):
    """Random params from numpy (jax.random compiles per leaf, seconds on CPU): normal matrices, unit norms."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
        else jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), param_shapes(cfg))


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny")
    return cfg, _random_params(cfg, 0, scale=0.1)  # a larger scale: logits depend visibly on the inputs


def test_local_lipschitz_matches_per_example_grad_and_finite_differences(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(3, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0   # left padding: last real token is T - 1
    mask[2, -3:] = 0  # right padding: last real token is 6
    assert last_token_index(mask).tolist() == [9, 9, 6]

    @jax.jit
    def max_logit(e, tok, m, pos):  # one example, written independently of the batched kernel
        logits = forward(params, tok[None], cfg, attention_mask=m[None], input_embeds=e[None])
        return jnp.max(logits[0, pos])

    grad_fn = jax.jit(jax.grad(max_logit))
    for position in (None, np.array([3, 5, 2])):
        got = local_lipschitz(params, cfg, tokens, mask, position=position, batch_size=2)
        assert got["grad_norm"].shape == (3,)
        for i, pos in enumerate(last_token_index(mask) if position is None else position):
            e = params["embed"][tokens[i]].astype(jnp.float32)
            g = grad_fn(e, tokens[i], mask[i], pos)
            ref = float(jnp.linalg.norm(g))
            np.testing.assert_allclose(got["grad_norm"][i], ref, rtol=1e-4)
            np.testing.assert_allclose(got["max_logit"][i], max_logit(e, tokens[i], mask[i], pos), rtol=1e-5)
            # Central differences along the gradient direction recover its norm.
            v, h = g / ref, 1e-4
            fd = (max_logit(e + h * v, tokens[i], mask[i], pos) - max_logit(e - h * v, tokens[i], mask[i], pos)) / 2 / h
            np.testing.assert_allclose(fd, ref, rtol=2e-2)
        # the reference's variant: the norm over the embeddings before the differentiated position only
        before = local_lipschitz(params, cfg, tokens, mask, position=position, include_position=False, batch_size=2)
        for i, pos in enumerate(last_token_index(mask) if position is None else position):
            g = np.asarray(grad_fn(params["embed"][tokens[i]].astype(jnp.float32), tokens[i], mask[i], pos))
            np.testing.assert_allclose(before["grad_norm"][i], np.linalg.norm(g[:pos]), rtol=1e-4)


def _attack_batch(cfg):
    rng = np.random.default_rng(2)
    b, t = 3, 14
    tokens = rng.integers(3, cfg.vocab_size, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[2, :2] = 0  # left padding
    anchor = np.array([6, 5, 7])  # the ">" of each row; the target completion follows it
    target = np.zeros((b, t), np.int32)
    for i, a in enumerate(anchor):
        target[i, a + 1:a + 5] = 1
    return tokens, mask, anchor, target


def test_soft_token_layout_with_real_embeddings_equals_inserting_the_tokens(tiny):
    cfg, params = tiny
    tokens, mask, anchor, _ = _attack_batch(cfg)
    k = 2
    inserted_ids = np.array([[10, 11], [12, 13], [14, 15]], np.int32)
    layout = attacks.soft_token_layout(anchor, tokens.shape[1], k)
    embeds = params["embed"][tokens]
    input_embeds = attacks.insert_soft_tokens(embeds, params["embed"][inserted_ids], layout)
    new_tokens = np.stack([np.concatenate([r[:a], ins, r[a:]]) for r, a, ins in zip(tokens, anchor, inserted_ids)])
    new_mask = np.stack([np.concatenate([m[:a], [1] * k, m[a:]]) for m, a in zip(mask, anchor)])
    fwd = jax.jit(forward, static_argnums=2)
    ref = fwd(params, jnp.asarray(new_tokens), cfg, attention_mask=jnp.asarray(new_mask))
    got = fwd(params, jnp.asarray(new_tokens), cfg, attention_mask=jnp.asarray(new_mask), input_embeds=input_embeds)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_soft_token_attack_reduces_target_loss_and_respects_the_norm_bound(tiny):
    cfg, params = tiny
    tokens, mask, anchor, target = _attack_batch(cfg)
    radius = float(attacks.mean_embedding_norm(params))
    res = attacks.soft_token_attack(params, cfg, tokens, mask, anchor, target, num_soft=3, steps=40,
                                    lr=0.1 * radius, key=jax.random.PRNGKey(1))
    assert res.soft.shape == (3, 3, cfg.hidden_size) and res.losses.shape == (41, 3)
    assert res.input_embeds.shape == (3, 17, cfg.hidden_size)
    assert bool(jnp.all(res.losses[-1] < res.losses[0] - 0.1)), res.losses[[0, -1]]
    assert bool(jnp.all(jnp.linalg.norm(res.soft, axis=-1) <= radius * (1 + 1e-5)))
    np.testing.assert_allclose(res.max_norm, radius, rtol=1e-6)
    # The returned layout reproduces the final loss, with the anchor and targets moved k places right.
    assert [int(res.tokens[i, a]) for i, a in enumerate(res.anchor_idx)] == tokens[np.arange(3), anchor].tolist()
    assert int(res.target_mask.sum()) == int(target.sum()) and int(res.soft_mask.sum()) == 9
    logits = jax.jit(forward, static_argnums=2)(params, res.tokens, cfg, attention_mask=res.attention_mask,
                                                positions=res.positions, input_embeds=res.input_embeds)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, res.tokens[:, 1:, None], axis=-1)[..., 0]
    m = res.target_mask[:, 1:]
    np.testing.assert_allclose((nll * m).sum(1) / m.sum(1), res.losses[-1], rtol=1e-4)
    assert res.positions[2, 2] == 0 and res.positions[2, -1] == 17 - 2 - 1  # left padding kept out of positions


def test_soft_token_attack_rejects_an_anchor_after_the_target(tiny):
    cfg, params = tiny
    tokens, mask, anchor, target = _attack_batch(cfg)
    with pytest.raises(ValueError, match="anchor_idx"):
        attacks.soft_token_attack(params, cfg, tokens, mask, anchor + 5, target, steps=1)
