"""The truncated power series of Eq. (4) with Hutchinson trace estimates (Algorithm 2)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from iresnet_jax.logdet import chains, neumann

Array = jax.Array


def weighted_estimate(g: Callable[[Array], Array], x: Array, v: Array,
                      weights: Array | None, *, n_terms: int, n_always: int, n_samples: int,
                      mode: str, gradient: str) -> tuple[Array, Array]:
    """``(g(x), estimate)`` for probes ``v`` and term weights (``None``: all 1), with the
    autodiff or the Neumann-series gradient."""
    if gradient == "autodiff":
        gx, acc = chains.autodiff_sums(g, x, v, weights, n_terms=n_terms, n_always=n_always,
                                       n_samples=n_samples, mode=mode)
        return gx, chains.finish(acc, n_samples)
    if weights is None:
        weights = jnp.ones((n_terms,), x.dtype)
    return neumann.estimate(g, x, v, weights, n_terms=n_terms, n_always=n_always,
                            n_samples=n_samples, mode=mode)


def power_series(g: Callable[[Array], Array], x: Array, key: Array, *, n_terms: int,
                 n_samples: int = 1, probe: str = "gaussian", mode: str = "vjp",
                 gradient: str = "autodiff",
                 coefficients: Sequence[float] | Array | None = None,
                 with_output: bool = False):
    """Truncated power series of Eq. (4) with Hutchinson trace estimates (Algorithm 2).

    Args:
      g: residual branch acting per example on a batch.
      x: batch of inputs.
      key: PRNG key for the probes.
      n_terms: number of series terms ``n >= 1``.
      n_samples: probes per example; the estimate is their mean.
      probe: ``"gaussian"`` or ``"rademacher"``.
      mode: the powers as ``v^T J^k`` (``"vjp"``, Algorithm 2), ``J^k v`` (``"jvp"``) or
        ``(v^T J^a)(J^b v)`` with ``a + b = k`` (``"split"``: two independent chains of
        half the depth; autodiff gradient only). The same estimate for the same probes.
      gradient: ``"autodiff"`` differentiates through every term (the i-ResNet paper);
        ``"neumann"`` is the Neumann-series gradient (``logdet.neumann``): the same value,
        a backward pass whose cost does not grow with ``n_terms``.
      coefficients: replaces the weights ``(-1)^{k+1} / k`` of the terms (autodiff only).
      with_output: return ``(g(x), estimate)``, sharing the forward pass.

    Returns:
      Per-example estimates ``(batch,)``, unbiased for the ``n``-term series, whose bias
      against the exact log-det is bounded by ``bias_bound`` (Theorem 3).
    """
    chains.check_args(n_terms, n_samples, probe, mode, gradient, roulette=False)
    if coefficients is not None and gradient == "neumann":
        raise ValueError("custom coefficients cannot be combined with gradient='neumann'")
    v = chains.sample_probes(key, chains.probe_shape(x, n_samples), probe, x.dtype)
    weights = None
    if coefficients is not None:
        # Custom c_k as weights m_k = c_k k (-1)^{k+1} of Eq. (4).
        weights = jnp.stack([jnp.asarray(coefficients[k - 1] * k * (1.0 if k % 2 else -1.0),
                                         x.dtype) for k in range(1, n_terms + 1)])
    out = weighted_estimate(g, x, v, weights, n_terms=n_terms, n_always=n_terms,
                            n_samples=n_samples, mode=mode, gradient=gradient)
    return out if with_output else out[1]
