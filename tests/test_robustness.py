"""Module robustness: one slice perturbed at a time, seeded noise of the requested relative norm, the batched sweep
equal to a per-module loop, joint perturbations, restricted fine-tuning and the proxy-guided search."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.analysis import robustness as rb
from safety_jax.analysis.probes import fit_probe
from safety_jax.model.config import get_preset
from safety_jax.model.llama import LINEAR_MODULES, init_params
from safety_jax.train.losses import make_sft_loss

MODULES = ("attn.q", "mlp.down")


@pytest.fixture(scope="module")
def world():
    before = jax.config.read("jax_disable_most_optimizations")  # many small programs: compile them fast
    jax.config.update("jax_disable_most_optimizations", True)
    yield _world()
    jax.config.update("jax_disable_most_optimizations", before)


def _world():
    cfg = get_preset("tiny", num_hidden_layers=3)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    n, t = 24, 8
    tokens = rng.integers(3, cfg.vocab_size, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[::3, :2] = 0  # some left padding
    last = np.full(n, t - 1, np.int32)
    labels = (np.arange(n) % 2).astype(np.int32)
    data = rb.ProxyData(tokens, mask, last, labels)
    states = np.asarray(rb.last_token_states(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                             jnp.asarray(last), 1))
    probe = fit_probe(states, labels, l2=1e-2, steps=50)
    return cfg, params, data, probe


def _slices(params, module):
    return np.asarray(rb.get_module(params, module))


def test_perturb_slice_changes_only_that_slice_with_the_requested_relative_norm_and_seed(world):
    cfg, params, _, _ = world
    out = rb.perturb_slice(params, "mlp.up", 1, 0.3, seed=7)
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                            zip(jax.tree.leaves(params), jax.tree.leaves(out), strict=True), strict=True):
        name = jax.tree_util.keystr(path[0])
        if "up" not in name:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w0, w1 = _slices(params, "mlp.up"), _slices(out, "mlp.up")
    np.testing.assert_array_equal(w0[[0, 2]], w1[[0, 2]])
    rel = np.linalg.norm((w1[1] - w0[1]).astype(np.float64)) / np.linalg.norm(w0[1].astype(np.float64))
    np.testing.assert_allclose(rel, 0.3, rtol=1e-5)
    again = rb.perturb_slice(params, "mlp.up", 1, 0.3, seed=7)
    np.testing.assert_array_equal(_slices(again, "mlp.up"), w1)
    other = rb.perturb_slice(params, "mlp.up", 1, 0.3, seed=8)
    assert not np.allclose(_slices(other, "mlp.up")[1], w1[1])


def test_batched_gaussian_robustness_equals_a_per_module_loop(world):
    cfg, params, data, probe = world
    modules = ("mlp.down",)
    res = rb.gaussian_robustness(params, cfg, probe, data, 1, modules=modules, eps=0.5, seed=3, chunk=2,
                                 batch_size=16)  # 3 layers in chunks of 2, 24 rows in batches of 16
    assert res["accuracy"].shape == (len(modules), 3)
    y = data.labels.astype(bool)
    for i, module in enumerate(modules):
        for lay in range(3):
            p = rb.perturb_slice(params, module, lay, 0.5, seed=3)
            z = np.asarray(rb._logits(p, probe, jnp.asarray(data.tokens), jnp.asarray(data.attention_mask),
                                      jnp.asarray(data.last_idx), config=cfg, layer=1))
            assert res["accuracy"][i, lay] == np.mean((z > 0) == y)
            np.testing.assert_allclose(res["margin"][i, lay], np.mean((2.0 * y - 1) * z), rtol=1e-5, atol=1e-6)
    # layer 2 comes after the probe's layer 1: perturbing it cannot move the states the probe reads
    np.testing.assert_allclose(res["margin"][:, 2], res["base_margin"], rtol=1e-6)


def test_joint_perturbation_applies_each_slice_its_own_noise(world):
    cfg, params, _, _ = world
    sel = {"attn.q": jnp.asarray([1.0, 0.0, 1.0]), "mlp.down": jnp.asarray([0.0, 1.0, 0.0])}
    joint = rb.perturb_selection(params, sel, 0.2, seed=5)
    seq = params
    for module, lay in (("attn.q", 0), ("attn.q", 2), ("mlp.down", 1)):
        seq = rb.perturb_slice(seq, module, lay, 0.2, seed=5)
    for a, b in zip(jax.tree.leaves(joint), jax.tree.leaves(seq), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_proxy_guided_search_keeps_accuracy_above_the_threshold(world):
    cfg, params, data, probe = world
    res = rb.gaussian_robustness(params, cfg, probe, data, 1, modules=MODULES, eps=0.5, seed=3)
    order = rb.robustness_order(res, MODULES)
    assert len(order) == 6 and len(set(order)) == 6
    acc = np.asarray(res["accuracy"])
    ranked = [acc[MODULES.index(m), lay] for m, lay in order]
    assert ranked == sorted(ranked, reverse=True)
    everything, accs = rb.proxy_guided_search(params, cfg, probe, data, 1, order, min_accuracy=0.0, eps=0.5, seed=3)
    assert everything == order and len(accs) == 6
    none, _ = rb.proxy_guided_search(params, cfg, probe, data, 1, order, min_accuracy=1.01, eps=0.5, seed=3)
    assert none == []
    some, accs = rb.proxy_guided_search(params, cfg, probe, data, 1, order, min_accuracy=res["base_accuracy"],
                                        eps=0.5, seed=3)
    assert some == order[:len(some)] and all(a >= res["base_accuracy"] for a in accs)


def test_restricted_finetune_moves_only_the_rules_slice(world):
    cfg, params, data, _ = world
    batch = {"tokens": data.tokens, "loss_mask": data.attention_mask}
    out = rb.finetune_slice(params, "attn.v@2", make_sft_loss(cfg), itertools.repeat(batch), steps=2, lr=0.5)
    for module in LINEAR_MODULES:
        a, b = _slices(params, module), _slices(out, module)
        if module == "attn.v":
            np.testing.assert_array_equal(a[:2], b[:2])
            assert not np.allclose(a[2], b[2])
        else:
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(out["embed"]))
