"""Small statistics for evaluation tables and claims (``math`` and numpy only, no scipy).

- :func:`wilson`: Wilson score interval of a proportion (Wilson 1927; Agresti & Coull 1998 recommend it over the
  normal-approximation interval, which fails near 0 and 1 and at small n).
- :func:`prop_greater`: one-sided pooled two-proportion z-test; :func:`mean_greater`: one-sided z-test of two means
  from their standard errors; :func:`normal_sf`: the standard normal tail they read p-values from.
- :func:`sign_test`: exact one-sided binomial sign test.
- :func:`bootstrap_ratio`: seeded percentile bootstrap interval of a ratio of means.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z_ONE_SIDED = 1.6448536269514722  # standard normal 95 % quantile
Z_WILSON = 1.959963984540054  # two-sided 95 %, the Wilson intervals' default
N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def wilson(k: int, n: int, z: float = Z_WILSON) -> tuple[float, float]:
    """Wilson score interval of the proportion k / n (95 % by default); (0, 1) for n = 0.

    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k / n``, clipped to [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def prop_greater(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """One-sided pooled two-proportion z-test of k1/n1 > k2/n2: (z, p). Equal rates at 0 or 1 give (0, 1)."""
    if n1 <= 0 or n2 <= 0:
        return 0.0, 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k1 / n1 - k2 / n2) / se
    return z, normal_sf(z)


def mean_greater(a: float, se_a: float, b: float, se_b: float) -> tuple[float, float]:
    """One-sided z-test of mean a > mean b from their standard errors: (z, p)."""
    se = math.hypot(se_a, se_b)
    if se == 0:
        return (math.copysign(math.inf, a - b) if a != b else 0.0), (0.0 if a > b else 1.0)
    z = (a - b) / se
    return z, normal_sf(z)


def sign_test(k: int, n: int) -> float:
    """Exact one-sided binomial sign test: P(X ≥ k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n if n > 0 else 1.0


def bootstrap_ratio(num: Any, den: Any, *, n: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % percentile bootstrap interval of mean(num) / mean(den), both resampled independently (seeded)."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    rng = np.random.default_rng(seed)
    ratios = (a[rng.integers(0, len(a), (n, len(a)))].mean(axis=1) /
              b[rng.integers(0, len(b), (n, len(b)))].mean(axis=1))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


__all__ = ["BOOTSTRAP_SEED", "N_BOOTSTRAP", "Z_ONE_SIDED", "Z_WILSON", "bootstrap_ratio", "mean_greater",
           "normal_sf", "prop_greater", "sign_test", "wilson"]
