"""The Neumann-series gradient of the log-det (Residual Flows, Sec. 3.2).

``d ln det(I + J_g) = tr((I + J_g)^{-1} dJ_g) = sum_{k>=0} (-1)^k tr(J_g^k dJ_g)``. The
forward pass computes the estimate and the probe-weighted Neumann vector
``u = sum_k (-1)^{k+1} m_k v^T J_g^{k-1}`` from the same products, and linearizes
``(g(x), J_g v)`` once; the backward pass is one reverse sweep of that linearization with
cotangent ``(gbar, ldbar * u)``. It is unbiased for the gradient of the series the forward
pass estimates (truncated or roulette-weighted), correct for any per-example weighting of
the loss, and keeps no activations per term. Reverse mode only.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from iresnet_jax.logdet import chains

Array = jax.Array


def estimate(g: Callable[[Array], Array], x: Array, v: Array, weights: Array, *,
             n_terms: int, n_always: int, n_samples: int, mode: str) -> tuple[Array, Array]:
    """``(g(x), estimate)`` of the weighted series with the Neumann-series gradient."""
    g_conv, consts = jax.closure_convert(g, x)
    return _neumann(g_conv, n_terms, n_always, n_samples, mode, x, v, weights, *consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _neumann(g, n_terms, n_always, n_samples, mode, x, v, weights, *consts):
    gx, apply = chains.batched_map(lambda z: g(z, *consts), x, mode, n_samples)
    acc, _ = chains.series_chain(apply, v, weights, n_terms, n_always,
                                 chains.n_lead(n_samples), want_neumann=False)
    return gx, chains.finish(acc, n_samples)


def _linearized(g, mode, n_samples, v):
    """``(x, *consts) -> (g(x), P v)`` with ``P = J_g`` (``mode="vjp"``) or ``J_g^T``: the
    log-det gradient is the derivative of ``<u, P v>`` in the direction ``u``."""
    def fn(x, *consts):
        f = lambda z: g(z, *consts)
        if mode == "vjp":
            gx, lin = jax.linearize(f, x)
        else:
            gx, vjp_fn = jax.vjp(f, x)
            lin = lambda t: vjp_fn(t)[0]
        return gx, (jax.vmap(lin)(v) if n_samples > 1 else lin(v))
    return fn


def _fwd(g, n_terms, n_always, n_samples, mode, x, v, weights, *consts):
    (gx, pv), pullback = jax.vjp(_linearized(g, mode, n_samples, v), x, *consts)
    _, apply = chains.batched_map(lambda z: g(z, *consts), x, mode, n_samples)
    # ``P v`` is the other side's first product: with it as ``dual`` the chain needs one
    # product fewer (term k is <w_{k-1}, P v> = v^T J^k v).
    acc, u = chains.series_chain(apply, v, weights, n_terms, n_always,
                                 chains.n_lead(n_samples), want_neumann=True, dual=pv)
    return (gx, chains.finish(acc, n_samples)), (pullback, u, v, weights)


def _bwd(g, n_terms, n_always, n_samples, mode, res, cotangents):
    pullback, u, v, weights = res
    gbar, ldbar = cotangents
    # The estimate is the mean over probes of per-example sums: d est_b = <u_b, dP v_b>/S.
    scale = ldbar.reshape(ldbar.shape + (1,) * (u.ndim - 1 - (n_samples > 1)))
    xbar, *const_bars = pullback((gbar, u * (scale / n_samples)))
    return (xbar, jnp.zeros_like(v), jnp.zeros_like(weights), *const_bars)


_neumann.defvjp(_fwd, _bwd)
