"""The Russian-roulette estimator of the log-det (Residual Flows, Sec. 3.1, Theorem 1).

A random number of terms ``N`` is drawn; term ``k`` of Eq. (4) is kept when
``k <= n_exact + N`` and weighted by ``1 / P(term k kept)``, so its expectation is the
untruncated term. The number of terms has a static maximum ``max_terms``: the draw is one
uniform 32-bit integer compared with static thresholds (so the weights use the *exact*
inclusion probabilities), the terms past the draw are skipped by ``lax.cond``, and the
estimate is exactly unbiased for the ``max_terms``-term series, whose remaining bias is
bounded by Theorem 3 (choose ``max_terms`` with ``terms_for_bias``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax.logdet import chains, series

Array = jax.Array

DISTRIBUTIONS = ("geometric", "poisson")
_TWO32 = 2 ** 32


def check_args(n_exact, max_terms, distribution, geom_p, poisson_lambda) -> None:
    if int(n_exact) != n_exact or n_exact < 0:
        raise ValueError(f"n_exact must be an integer >= 0, got {n_exact!r}")
    if int(max_terms) != max_terms or max_terms < max(1, n_exact):
        raise ValueError(f"max_terms must be an integer >= max(1, n_exact={n_exact}), got "
                         f"{max_terms!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got "
                         f"{distribution!r}")
    if distribution == "geometric" and not 0.0 < geom_p < 1.0:
        raise ValueError(f"geom_p must lie in (0, 1), got {geom_p!r}")
    if distribution == "poisson" and not (0.0 < poisson_lambda < math.inf):
        raise ValueError(f"poisson_lambda must be a finite number > 0, got "
                         f"{poisson_lambda!r}")


def roulette_survival(*, n_exact: int = 2, max_terms: int = 20,
                      distribution: str = "geometric", geom_p: float = 0.5,
                      poisson_lambda: float = 2.0) -> np.ndarray:
    """``P(term k is computed)`` for ``k = 1..max_terms`` (float64, before quantization).

    Term ``k <= n_exact`` is always computed; term ``n_exact + j`` when the drawn
    ``N >= j``, with ``N ~ Geometric(geom_p)`` on ``{1, 2, ...}`` (so term ``n_exact + 1``
    is always computed too) or ``N ~ Poisson(poisson_lambda)`` on ``{0, 1, ...}``, as in the
    Residual Flows code.
    """
    check_args(n_exact, max_terms, distribution, geom_p, poisson_lambda)
    j = np.arange(1, max_terms + 1) - n_exact            # index of the random term
    if distribution == "geometric":
        extra = (1.0 - geom_p) ** np.maximum(j - 1, 0).astype(np.float64)
    else:
        lam = float(poisson_lambda)
        # P(N >= j) summed from the tail (no cancellation).
        i = np.arange(0, max_terms + 200 + int(10 * lam))
        log_pmf = -lam + i * math.log(lam) - np.array([math.lgamma(t + 1.0) for t in i])
        tail = np.cumsum(np.exp(log_pmf)[::-1])[::-1]
        extra = np.where(j >= 1, tail[np.clip(j, 0, None)], 1.0)
    return np.where(j <= 0, 1.0, np.minimum(extra, 1.0))


def _thresholds(survival: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Static 32-bit thresholds ``t_k = round(S_k 2^32)``, the exact inclusion
    probabilities ``t_k / 2^32`` (1 where ``S_k = 1``) and the always-kept count."""
    always = survival >= 1.0
    n_always = int(np.argmin(always)) if not np.all(always) else len(survival)
    thresholds = np.minimum(np.round(survival * _TWO32), _TWO32 - 1)
    prob = np.where(always, 1.0, thresholds / _TWO32)
    return thresholds.astype(np.uint32), prob, n_always


def roulette_weights(key: Array, *, n_exact: int = 2, max_terms: int = 20,
                     distribution: str = "geometric", geom_p: float = 0.5,
                     poisson_lambda: float = 2.0, dtype=jnp.float32) -> tuple[Array, int]:
    """One draw: ``(m, n_always)`` with ``m_k = 1[k kept] / P(k kept)``, ``E[m_k] = 1``
    exactly. The shape is static, so a jitted estimator is traced once for all draws."""
    survival = roulette_survival(n_exact=n_exact, max_terms=max_terms,
                                 distribution=distribution, geom_p=geom_p,
                                 poisson_lambda=poisson_lambda)
    thresholds, prob, n_always = _thresholds(survival)
    bits = jax.random.bits(key, (), jnp.uint32)
    kept = jnp.logical_or(jnp.asarray(np.arange(max_terms) < n_always),
                          bits < jnp.asarray(thresholds))
    inv = np.where(prob > 0, 1.0 / np.maximum(prob, 1e-300), 0.0)
    return jnp.where(kept, jnp.asarray(inv, dtype), jnp.zeros((), dtype)), n_always


def expected_terms(*, n_exact: int = 2, max_terms: int = 20, distribution: str = "geometric",
                   geom_p: float = 0.5, poisson_lambda: float = 2.0) -> float:
    """Expected number of series terms (products) per draw."""
    survival = roulette_survival(n_exact=n_exact, max_terms=max_terms,
                                 distribution=distribution, geom_p=geom_p,
                                 poisson_lambda=poisson_lambda)
    return float(np.sum(_thresholds(survival)[1]))


def russian_roulette(g: Callable[[Array], Array], x: Array, key: Array, *, n_exact: int = 2,
                     max_terms: int = 20, distribution: str = "geometric",
                     geom_p: float = 0.5, poisson_lambda: float = 2.0, n_samples: int = 1,
                     probe: str = "gaussian", mode: str = "vjp", gradient: str = "autodiff",
                     with_output: bool = False):
    """Russian-roulette estimate of ``ln det(I + J_g)`` (Residual Flows, Theorem 1).

    ``sum_{k<=max_terms} (-1)^{k+1} m_k v^T J^k v / k`` with one draw of the weights ``m``
    per call, shared by the batch (as in the Residual Flows code). Unbiased for the
    ``max_terms``-term series; expected cost ``expected_terms(...)`` products (4 for the
    defaults). The variance is finite for the untruncated geometric estimator only if
    ``Lip(g)^2 < 1 - geom_p``.

    Args:
      g, x, n_samples, probe, mode, gradient, with_output: as in ``power_series``.
      key: PRNG key, split into the probes' key and the draw of ``N``.
      n_exact: terms always computed.
      max_terms: static maximum number of terms.
      distribution: ``"geometric"`` (``geom_p``) or ``"poisson"`` (``poisson_lambda``).
    """
    check_args(n_exact, max_terms, distribution, geom_p, poisson_lambda)
    chains.check_args(max_terms, n_samples, probe, mode, gradient, roulette=True)
    probe_key, draw_key = jax.random.split(key)
    v = chains.sample_probes(probe_key, chains.probe_shape(x, n_samples), probe, x.dtype)
    weights, n_always = roulette_weights(draw_key, n_exact=n_exact, max_terms=max_terms,
                                         distribution=distribution, geom_p=geom_p,
                                         poisson_lambda=poisson_lambda, dtype=x.dtype)
    out = series.weighted_estimate(g, x, v, weights, n_terms=max_terms, n_always=n_always,
                                   n_samples=n_samples, mode=mode, gradient=gradient)
    return out if with_output else out[1]
