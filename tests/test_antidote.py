"""Antidote / Wanda pruning against an independent numpy implementation of the spec's formula, statistics streamed
inside the layer scan, LoRA adapters, and the decoder's reductions and perturbations they rest on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.defenses.antidote import (
    IN_AXES,
    MODULE_INPUTS,
    PruneConfig,
    antidote,
    apply_masks,
    calibration_stats,
    load_masks,
    prune_masks,
    save_masks,
)
from safety_jax.errors import ConfigError
from safety_jax.model.config import LlamaConfig
from safety_jax.model.interventions import make_intervention
from safety_jax.model.llama import forward, get_layer_weight, init_params
from safety_jax.model.lora import LoraConfig, init_lora

CONFIG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
ALL = tuple(f"{m}@*" for m in MODULE_INPUTS)
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, jax.random.key(0), initializer_range=0.1)
    lora_cfg = LoraConfig(rank=4, targets=("attn.q", "attn.v", "mlp.down"))
    lora = init_lora(CONFIG, lora_cfg, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), lora)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = rng.integers(3, CONFIG.vocab_size, (2, 10)).astype(np.int32)
        mask = np.ones_like(tokens)
        mask[0, :3] = 0  # left padding
        loss_mask = mask.copy()
        loss_mask[:, :6] = 0  # prompt tokens
        batches.append({"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask})
    return params, lora, lora_cfg.scale, batches


def _np_stats(params, lora, scale, batches, names, mask_key="attention_mask"):
    """Σ x² per input feature from full captures [L, B, T, ...] summed in numpy."""
    out = {}
    for b in batches:
        _, caps = forward(params, jnp.asarray(b["tokens"]), CONFIG, attention_mask=jnp.asarray(b["attention_mask"]),
                          lora=lora, lora_scale=scale, capture=names)
        w = (b[mask_key] * b["attention_mask"]).astype(np.float64)
        for n in names:
            x = np.asarray(caps[n], np.float64)
            s = np.einsum("bt,lbt...->l...", w, x * x)
            out[n] = out.get(n, 0) + s
    return out


def _np_masks(w, s, n_in_axes, ratio, mode="top", score="wanda"):
    """The spec's formula, one output row at a time: stable sort, ties to the lower input index."""
    w = np.asarray(w, np.float64)
    L = w.shape[0]
    n_in = int(np.prod(w.shape[1:1 + n_in_axes]))
    w2 = np.abs(w.reshape(L, n_in, -1))
    k = int(np.floor(ratio * n_in))
    masks = np.zeros(w2.shape, bool)
    for layer in range(L):
        sc = w2[layer] * (np.sqrt(np.asarray(s, np.float64).reshape(L, n_in)[layer])[:, None]
                          if score == "wanda" else 1.0)
        for o in range(sc.shape[1]):
            col = sc[:, o]
            order = np.argsort(-col if mode == "top" else col, kind="stable")
            masks[layer, order[:k], o] = True
    return masks.reshape(w.shape)


def test_reductions_in_the_scan_equal_numpy_sums_of_the_captures(model):
    params, lora, scale, batches = model
    names = ("attn_in", "attn_hidden", "mlp_hidden", "lora_mid.attn.q", "lora_mid.mlp.down")
    b = batches[0]
    _, sums = forward(params, jnp.asarray(b["tokens"]), CONFIG, attention_mask=jnp.asarray(b["attention_mask"]),
                      lora=lora, lora_scale=scale, capture_reduce=dict.fromkeys(names, "sum_sq"),
                      reduce_mask=jnp.asarray(b["loss_mask"]))
    want = _np_stats(params, lora, scale, [b], names, "loss_mask")
    for n in names:
        assert sums[n].shape == want[n].shape, n
        np.testing.assert_allclose(np.asarray(sums[n]), want[n], rtol=1e-5, atol=1e-7)
    assert sums["lora_mid.attn.q"].shape == (CONFIG.num_hidden_layers, 4)
    with pytest.raises(ValueError, match="lora_mid"):
        forward(params, jnp.asarray(b["tokens"]), CONFIG, capture_reduce={"lora_mid.attn.k": "sum_sq"}, lora=lora)


def test_streamed_statistics_equal_one_pass_over_the_concatenation(model):
    params, lora, scale, batches = model
    cfg = PruneConfig(ratio=0.1, modules=ALL)
    streamed = calibration_stats(params, CONFIG, batches, cfg=cfg)
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    once = calibration_stats(params, CONFIG, [joined], cfg=cfg)
    for k in once:
        np.testing.assert_allclose(np.asarray(streamed[k]), np.asarray(once[k]), rtol=1e-5)  # fp32 sums, other order
    assert float(streamed["tokens"]) == sum(b["attention_mask"].sum() for b in batches)
    m1, m2 = prune_masks(params, streamed, cfg, CONFIG), prune_masks(params, once, cfg, CONFIG)
    assert all(np.array_equal(m1[k], m2[k]) for k in m1)


@pytest.mark.parametrize("mode,ratio,token_mask", [("top", 0.1, "attention_mask"), ("bottom", 0.25, "loss_mask")])
def test_full_weight_masks_equal_the_numpy_formula(model, mode, ratio, token_mask):
    params, _, _, batches = model
    cfg = PruneConfig(ratio=ratio, modules=ALL, mode=mode, token_mask=token_mask)
    stats = calibration_stats(params, CONFIG, batches, cfg=cfg)
    masks = prune_masks(params, stats, cfg, CONFIG)
    ref_stats = _np_stats(params, None, 1.0, batches, tuple(set(MODULE_INPUTS.values())), token_mask)
    for module, x_name in MODULE_INPUTS.items():
        w = get_layer_weight(params, module)
        want = _np_masks(w, ref_stats[x_name], IN_AXES[module], ratio, mode)
        assert np.array_equal(np.asarray(masks[module]), want), module
        n_in = int(np.prod(w.shape[1:1 + IN_AXES[module]]))
        per_row = np.asarray(masks[module]).reshape(w.shape[0], n_in, -1).sum(1)
        assert (per_row == int(np.floor(ratio * n_in))).all()


def test_lora_a_and_b_masks_equal_the_numpy_formula(model):
    params, lora, scale, batches = model
    cfg = PruneConfig(ratio=0.25, modules=("attn.q@*", "attn.v@0-1", "mlp.down@2"), target="lora")
    pruned, masks, stats = antidote(params, CONFIG, batches, cfg, lora=lora, lora_scale=scale)
    names = ("attn_in", "mlp_hidden", "lora_mid.attn.q", "lora_mid.attn.v", "lora_mid.mlp.down")
    ref = _np_stats(params, lora, scale, batches, names)
    layers = {"attn.q": [0, 1, 2], "attn.v": [0, 1], "mlp.down": [2]}
    for module, chosen in layers.items():
        group, leaf = module.split(".")
        node = lora["layers"][group][leaf]
        for part, s_name, n_in in (("a", MODULE_INPUTS[module], IN_AXES[module]), ("b", f"lora_mid.{module}", 1)):
            want = _np_masks(node[part], ref[s_name], n_in, 0.25)
            want[[i for i in range(3) if i not in chosen]] = False
            got = np.asarray(masks[f"{module}.{part}"])
            assert np.array_equal(got, want), (module, part)
            new = np.asarray(pruned["layers"][group][leaf][part])
            assert (new[got] == 0).all() and np.array_equal(new[~got], np.asarray(node[part])[~got])


def test_ties_break_to_the_lower_input_index():
    w = np.ones((1, 6, 2), np.float32)  # every score in a row equal
    w[0, 4, 1] = 2.0
    cfg_config = CONFIG.replace(num_hidden_layers=1, hidden_size=6, intermediate_size=2, num_attention_heads=2,
                                num_key_value_heads=2)
    params = {"layers": {"mlp": {"gate": jnp.asarray(w)}}}
    stats = {"mlp_in": jnp.ones((1, 6))}
    masks = prune_masks(params, stats, PruneConfig(ratio=0.5, modules=("mlp.gate@*",)), cfg_config)
    got = np.asarray(masks["mlp.gate"])[0]
    assert got[:, 0].tolist() == [True, True, True, False, False, False]
    assert got[:, 1].tolist() == [True, True, False, False, True, False]
    assert np.array_equal(got, _np_masks(w, np.ones((1, 6)), 1, 0.5)[0])


def test_ablations_and_application(model):
    params, _, _, batches = model
    mag = prune_masks(params, None, PruneConfig(ratio=0.2, modules=("mlp.up@1",), score="magnitude"), CONFIG)
    w = get_layer_weight(params, "mlp.up")
    want = _np_masks(w, None, 1, 0.2, score="magnitude")
    want[[0, 2]] = False
    assert np.array_equal(np.asarray(mag["mlp.up"]), want)
    rnd = prune_masks(params, None, PruneConfig(ratio=0.2, modules=("mlp.up@*",), score="random", seed=3), CONFIG)
    assert (np.asarray(rnd["mlp.up"]).sum(1) == 6).all() and not np.array_equal(rnd["mlp.up"], want)
    pruned = apply_masks(params, mag)
    new = np.asarray(pruned["layers"]["mlp"]["up"])
    m = np.asarray(mag["mlp.up"])
    assert (new[m] == 0).all() and np.array_equal(new[~m], np.asarray(w)[~m])
    assert pruned["layers"]["mlp"]["gate"] is params["layers"]["mlp"]["gate"]
    assert np.asarray(params["layers"]["mlp"]["up"])[m].any()  # the input tree is untouched
    with pytest.raises(ConfigError, match="statistics"):
        prune_masks(params, None, PruneConfig(modules=("mlp.up@*",)), CONFIG)


def test_masks_and_statistics_round_trip(model, tmp_path):
    params, _, _, batches = model
    _, masks, stats = antidote(params, CONFIG, batches, PruneConfig(ratio=0.1))
    save_masks(tmp_path / "m.safetensors", masks, stats)
    m2, s2 = load_masks(tmp_path / "m.safetensors")
    assert set(m2) == set(masks) and all(np.array_equal(m2[k], masks[k]) for k in masks)
    assert all(np.allclose(s2[k], stats[k]) for k in stats)


def test_bad_config_names_the_field():
    for kw, field in ((dict(ratio=1.5), "ratio"), (dict(score="l1"), "score"), (dict(mode="mid"), "mode"),
                      (dict(target="all"), "target"), (dict(token_mask="m"), "token_mask")):
        with pytest.raises(ConfigError, match=field):
            PruneConfig(**kw)
    with pytest.raises(ConfigError, match="prunable"):
        prune_masks({}, {}, PruneConfig(modules=("embed",)), CONFIG)


def test_perturbations_add_at_their_site_like_an_activation_addition(model):
    params, _, _, batches = model
    tokens = jnp.asarray(batches[0]["tokens"])
    base = forward(params, tokens, CONFIG)
    shape = (CONFIG.num_hidden_layers, *tokens.shape, CONFIG.hidden_size)
    zero = forward(params, tokens, CONFIG, perturb={"attn_out": jnp.zeros(shape)})
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(base))
    v = jax.random.normal(jax.random.key(4), (CONFIG.hidden_size,))
    for site in ("attn_out", "mlp_out", "resid_post"):
        delta = jnp.zeros(shape).at[1].set(jnp.broadcast_to(v, shape[1:]))
        got = forward(params, tokens, CONFIG, perturb={site: delta})
        iv = make_intervention("add", v, CONFIG.num_hidden_layers, site=site, layers=[1])
        want = forward(params, tokens, CONFIG, interventions=[iv])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="perturb"):
        forward(params, tokens, CONFIG, perturb={"attn_out": jnp.zeros((1, 2, 3))})
