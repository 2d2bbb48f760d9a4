"""Test setup: 8 simulated CPU devices (for the sharding tests) and full fp32 matmul precision."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
    """For modules that compile many small programs: skip XLA's slow optimisation passes (restored afterwards)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def synthetic_out(tmp_path_factory) -> str:
    """One output folder for every synthetic study's quick run, as the main job shares one: study 1's stages
    (pretrained and safety-tuned models) are computed by whichever study needs them first and reused by the rest."""
    return str(tmp_path_factory.mktemp("synthetic"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only when asked for (``-m slow``, or any ``-m`` expression naming it)."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: opt-in with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
