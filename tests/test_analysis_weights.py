"""ΔW column-space overlap, row-space alignment and α-interpolation against numpy references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safety_jax.analysis import weights
from safety_jax.model.config import get_preset
from safety_jax.model.llama import LINEAR_MODULES, param_shapes


def _random_params(cfg, seed: int, scale: float = 0.02):
    """Random params from numpy (jax.random compiles per leaf, seconds on CPU): normal matrices, unit norms."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
        else jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), param_shapes(cfg))


def _np_sin_theta(w_pre: np.ndarray, w_ft: np.ndarray, top_k: int, energy: float) -> np.ndarray:
    """Per layer: top-k left singular vectors of ΔW vs the pretrained top singular vectors holding `energy`."""
    out = []
    for p, f in zip(w_pre.astype(np.float64), w_ft.astype(np.float64)):
        u_d = np.linalg.svd(f - p, full_matrices=False)[0][:, :top_k]
        u_p, s_p, _ = np.linalg.svd(p, full_matrices=False)
        frac = np.cumsum(s_p**2) / np.sum(s_p**2)
        n_keep = int(np.searchsorted(frac, energy) + 1)  # smallest prefix reaching `energy`
        basis = u_p[:, :n_keep]
        out.append(np.linalg.norm(u_d - basis @ (basis.T @ u_d), axis=0))
    return np.stack(out)


def _orthonormal(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


METHODS = ("svd", "gram")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 12, 7), (2, 6, 10)])
def test_sin_theta_matches_numpy_svd_per_layer(shape, method):
    rng = np.random.default_rng(0)
    w_pre = rng.normal(size=shape).astype(np.float32)
    w_ft = (w_pre + 0.1 * rng.normal(size=shape)).astype(np.float32)
    got = weights.column_space_overlap(w_pre, w_ft, top_k=4, energy=0.9, method=method)
    np.testing.assert_allclose(got["sin_theta"], _np_sin_theta(w_pre, w_ft, 4, 0.9), atol=2e-4)
    np.testing.assert_allclose(got["delta_singular_values"],
                               np.linalg.svd((w_ft - w_pre).astype(np.float64), compute_uv=False), rtol=1e-4)
    s_p = np.linalg.svd(w_pre.astype(np.float64), compute_uv=False)
    frac = np.cumsum(s_p**2, axis=1) / np.sum(s_p**2, axis=1, keepdims=True)
    np.testing.assert_array_equal(got["pre_energy_rank"], [np.searchsorted(f, 0.9) + 1 for f in frac])
    rel = np.linalg.norm(w_ft - w_pre, axis=(1, 2)) / np.linalg.norm(w_pre, axis=(1, 2))
    np.testing.assert_allclose(got["relative_norm"], rel, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_sin_theta_is_one_outside_and_zero_inside_the_pretrained_column_space(method):
    rng = np.random.default_rng(1)
    out_dim, in_dim, rank = 10, 8, 4
    q = _orthonormal(rng, out_dim)
    inside, outside = q[:, :rank], q[:, rank:]
    # Pretrained weight: rank 4 with equal singular values, so 90 % of the energy keeps its whole column space.
    w = inside @ _orthonormal(rng, in_dim)[:rank] * 2.0
    delta_in = inside @ rng.normal(size=(rank, in_dim)) * 0.05
    delta_out = outside @ rng.normal(size=(out_dim - rank, in_dim)) * 0.05
    w_pre = np.stack([w, w]).astype(np.float32)
    w_ft = np.stack([w + delta_in, w + delta_out]).astype(np.float32)
    got = weights.column_space_overlap(w_pre, w_ft, top_k=3, energy=0.9, method=method)
    assert got["pre_energy_rank"].tolist() == [rank, rank]
    np.testing.assert_allclose(got["sin_theta"][0], 0.0, atol=1e-3)
    np.testing.assert_allclose(got["sin_theta"][1], 1.0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_sin_theta_is_nan_for_a_zero_update(method):
    w = np.random.default_rng(2).normal(size=(2, 5, 4)).astype(np.float32)
    got = weights.column_space_overlap(w, w, top_k=2, method=method)
    assert np.isnan(np.asarray(got["sin_theta"])).all()
    np.testing.assert_array_equal(got["relative_norm"], 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_lax_map_layer_batches_equal_full_vmap(method):
    rng = np.random.default_rng(3)
    w_pre = rng.normal(size=(5, 9, 6)).astype(np.float32)
    w_ft = w_pre + 0.1 * rng.normal(size=w_pre.shape).astype(np.float32)
    full = weights.column_space_overlap(w_pre, w_ft, top_k=3, method=method)
    chunked = weights.column_space_overlap(w_pre, w_ft, top_k=3, layer_batch=2, method=method)
    for k in full:
        np.testing.assert_allclose(chunked[k], full[k], rtol=1e-5, atol=1e-6)


def _finetune_like(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random W_pre and W_ft = W_pre + ΔW, ΔW rank 4 plus a noise floor (a fine-tuning-like spectrum)."""
    rng = np.random.default_rng(seed)
    n_layers, n_out, n_in = shape
    w_pre = rng.normal(size=shape)
    delta = 1e-2 * rng.normal(size=(n_layers, n_out, 4)) @ rng.normal(size=(n_layers, 4, n_in)) / 2
    delta += 1e-4 * rng.normal(size=shape)
    return w_pre.astype(np.float32), (w_pre + delta).astype(np.float32)


def _np_reference(w_pre: np.ndarray, w_ft: np.ndarray, top_k: int, energy: float) -> dict[str, np.ndarray]:
    """The whole analysis by float64 numpy SVDs of the same float32 inputs."""
    p64, d64 = w_pre.astype(np.float64), w_ft.astype(np.float64) - w_pre.astype(np.float64)
    s_d = np.linalg.svd(d64, compute_uv=False)
    s_p = np.linalg.svd(p64, compute_uv=False)
    rank = lambda s: np.array([np.searchsorted(np.cumsum(x**2) / np.sum(x**2), energy) + 1 for x in s])
    prob = s_d / s_d.sum(axis=1, keepdims=True)
    return {"sin_theta": _np_sin_theta(w_pre, w_ft, top_k, energy), "delta_singular_values": s_d,
            "pre_singular_values": s_p, "pre_energy_rank": rank(s_p), "delta_energy_rank": rank(s_d),
            "delta_effective_rank": np.exp(-np.sum(prob * np.log(prob), axis=1))}


@pytest.mark.parametrize("shape", [(2, 16, 40), (2, 40, 16), (2, 24, 24)], ids=["wide", "tall", "square"])
def test_gram_matches_a_float64_svd_reference(shape):
    w_pre, w_ft = _finetune_like(shape, seed=5)
    got = weights.column_space_overlap(w_pre, w_ft, top_k=6, energy=0.9, method="gram")
    ref = _np_reference(w_pre, w_ft, 6, 0.9)
    np.testing.assert_allclose(got["sin_theta"], ref["sin_theta"], atol=1e-5)
    for key in ("delta_singular_values", "pre_singular_values", "delta_effective_rank"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    for key in ("pre_energy_rank", "delta_energy_rank"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    svd = weights.column_space_overlap(w_pre, w_ft, top_k=6, energy=0.9, method="svd")
    for key, value in got.items():
        assert (value.dtype, value.shape) == (svd[key].dtype, svd[key].shape), key


def test_gram_left_vectors_of_tall_matrices_are_oriented_and_normalised():
    """out > in: U = M V / σ. A ΔW inside W_pre's column space must give sin θ ≈ 0, one outside it sin θ ≈ 1; W_pre
    has distinct singular values, so a wrong 1/σ scaling of the implicit basis would show."""
    rng = np.random.default_rng(6)
    out_dim, in_dim, rank = 24, 10, 4
    q = _orthonormal(rng, out_dim)
    inside, outside = q[:, :rank], q[:, rank:]
    w = inside @ np.diag([3.0, 2.0, 1.5, 1.0]) @ _orthonormal(rng, in_dim)[:rank]
    delta_in = inside @ rng.normal(size=(rank, in_dim)) * 0.05
    delta_out = outside @ rng.normal(size=(out_dim - rank, in_dim)) * 0.05
    w_pre = np.stack([w, w]).astype(np.float32)
    w_ft = np.stack([w + delta_in, w + delta_out]).astype(np.float32)
    got = weights.column_space_overlap(w_pre, w_ft, top_k=3, energy=0.99, method="gram")
    assert got["pre_energy_rank"].tolist() == [rank, rank]
    np.testing.assert_allclose(got["sin_theta"][0], 0.0, atol=1e-5)
    np.testing.assert_allclose(got["sin_theta"][1], 1.0, atol=1e-5)


def test_gram_leaves_null_directions_out_of_the_basis():
    """W_pre rank-deficient, out > in, energy 1.0: the mask keeps W_pre's zero singular values, but gram has no
    left vectors for them, so an update outside the column space still reads sin θ = 1."""
    rng = np.random.default_rng(7)
    out_dim, in_dim, rank = 12, 8, 3
    q = _orthonormal(rng, out_dim)
    w = q[:, :rank] @ rng.normal(size=(rank, in_dim))
    delta = q[:, rank:] @ rng.normal(size=(out_dim - rank, in_dim)) * 0.05
    got = weights.column_space_overlap(w[None].astype(np.float32), (w + delta)[None].astype(np.float32), top_k=3,
                                       energy=1.0, method="gram")
    assert int(got["pre_energy_rank"][0]) > rank
    np.testing.assert_allclose(got["sin_theta"][0], 1.0, atol=1e-5)


def test_gram_inside_an_outer_jit_equals_the_host_call():
    w_pre, w_ft = _finetune_like((2, 20, 12), seed=8)
    host = weights.column_space_overlap(w_pre, w_ft, top_k=4, method="gram")
    traced = jax.jit(lambda p, f: weights.column_space_overlap(p, f, top_k=4, method="gram"))(w_pre, w_ft)
    for key in host:
        assert traced[key].dtype == host[key].dtype, key
        np.testing.assert_allclose(traced[key], host[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert not jax.config.jax_enable_x64                         # the float64 context does not leak


def test_gram_issues_one_eigh_per_matrix():
    """A batched CPU eigh blocks a thread-pool worker on its own sub-tasks, and concurrent ones hang the program; the
    gram kernel must lower to unbatched [n, n] eigh calls only, with vmap and with layer batches."""
    w = jnp.zeros((3, 20, 12), jnp.float32)
    for layer_batch in (None, 2):
        text = jax.jit(lambda p, f, lb=layer_batch: weights.column_space_overlap(
            p, f, top_k=3, layer_batch=lb, method="gram")).lower(w, w).as_text()
        operands = re.findall(r"custom_call @\w*syevd\w*\(.*?: \(tensor<([0-9x]+?)xf64>", text)
        assert operands and all(s.count("x") == 1 for s in operands), operands


def test_method_is_validated_and_auto_resolves_by_backend(monkeypatch):
    w = np.zeros((1, 3, 2), np.float32)
    with pytest.raises(ValueError, match="method"):
        weights.column_space_overlap(w, w, method="bogus")
    with pytest.raises(ValueError, match="method"):
        weights.delta_weight_analysis({}, {}, method="bogus")
    assert weights.resolve_method("svd") == "svd"
    monkeypatch.setattr(weights.jax, "default_backend", lambda: "cpu")
    assert weights.resolve_method("auto") == "gram"
    monkeypatch.setattr(weights.jax, "default_backend", lambda: "tpu")
    assert weights.resolve_method("auto") == "svd"


def test_module_matrix_is_the_hf_orientation():
    cfg = get_preset("tiny")
    params = _random_params(cfg, 0)
    n, k, h, d, f = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                     cfg.intermediate_size)
    expected = {"attn.q": (n * h, d), "attn.k": (k * h, d), "attn.v": (k * h, d), "attn.o": (d, n * h),
                "mlp.gate": (f, d), "mlp.up": (f, d), "mlp.down": (d, f)}
    x = np.random.default_rng(0).normal(size=(d,)).astype(np.float32)
    for module, shape in expected.items():
        m = weights.module_matrix(params, module)
        assert m.shape == (cfg.num_hidden_layers, *shape), module
    # M x (HF) equals x W (einsum layout) for the query projection of layer 0.
    q = params["layers"]["attn"]["q"][0]
    np.testing.assert_allclose(weights.module_matrix(params, "attn.q")[0] @ x,
                               jnp.einsum("d,dnh->nh", x, q).reshape(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a linear module"):
        weights.module_matrix(params, "mlp_norm")


def test_delta_weight_analysis_covers_every_module_and_matches_numpy():
    cfg = get_preset("tiny")
    pre = _random_params(cfg, 0)
    ft = jax.tree.map(lambda p, n: p + 0.01 * n, pre, _random_params(cfg, 1))
    report = weights.delta_weight_analysis(pre, ft, top_k=3)
    assert set(report) == set(LINEAR_MODULES)
    for module in ("attn.o", "mlp.down"):
        m_pre = np.asarray(weights.module_matrix(pre, module))
        m_ft = np.asarray(weights.module_matrix(ft, module))
        np.testing.assert_allclose(report[module].sin_theta, _np_sin_theta(m_pre, m_ft, 3, 0.9), atol=5e-4)
    rows = report["mlp.up"].rows()
    assert len(rows) == cfg.num_hidden_layers * 3 and rows[0]["module"] == "mlp.up"


def test_effective_rank_of_equal_singular_values_is_their_count():
    np.testing.assert_allclose(weights.effective_rank(jnp.array([2.0, 2.0, 2.0, 0.0])), 3.0, rtol=1e-6)


def test_row_space_alignment_matches_numpy():
    rng = np.random.default_rng(4)
    n_layers, out_dim, in_dim, n = 2, 12, 6, 5
    w = rng.normal(size=(n_layers, out_dim, in_dim)).astype(np.float32)
    x = rng.normal(size=(n_layers, n, in_dim)).astype(np.float32)
    s, vh = weights.row_space_basis(w)
    got = weights.row_space_alignment(x, s, vh, top_k=4)
    for layer in range(n_layers):
        _, s_np, vh_np = np.linalg.svd(w[layer].astype(np.float64), full_matrices=False)
        cos = np.abs(x[layer] @ vh_np[:4].T) / np.linalg.norm(x[layer], axis=1, keepdims=True)
        np.testing.assert_allclose(got[layer], cos @ s_np[:4] / s_np[:4].sum(), rtol=1e-4)
    # An input along the top right singular vector scores higher than one along the last.
    top, last = vh[:, 0], vh[:, -1]
    scores = weights.row_space_alignment(jnp.stack([top, last], axis=1), s, vh)
    assert bool(jnp.all(scores[:, 0] > scores[:, 1]))


def test_interpolate_params_endpoints_and_midpoint():
    cfg = get_preset("tiny")
    pre = _random_params(cfg, 0)
    ft = _random_params(cfg, 1)
    for alpha, expect in ((0.0, pre), (1.0, ft), (0.5, jax.tree.map(lambda a, b: (a + b) / 2, pre, ft))):
        got = weights.interpolate_params(pre, ft, alpha)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7), got, expect)
