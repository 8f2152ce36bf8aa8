"""Hutchinson probes and the shared loop of Algorithm 2 (the chains of products).

With probes ``v`` and ``w_0 = v``, ``w_k = w_{k-1} J`` (vector-Jacobian products) or
``J w_{k-1}`` (Jacobian-vector products); term ``k`` of Eq. (4) is estimated by
``(-1)^{k+1} m_k <w_k, v> / k`` with term weights ``m_k`` (1 for the truncated series,
the roulette's inverse inclusion probabilities otherwise). The series and the Neumann
gradient build on these functions.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iresnet_jax.logdet.dense import check_same_shape

Array = jax.Array
Fn = Callable[[Array], Array]

PROBES = ("gaussian", "rademacher")
MODES = ("vjp", "jvp", "split")
GRADIENTS = ("autodiff", "neumann")


def sample_probes(key: Array, shape: Sequence[int], probe: str, dtype) -> Array:
    """Hutchinson probes with identity covariance: Gaussian or Rademacher (+-1)."""
    if probe == "gaussian":
        return jax.random.normal(key, tuple(shape), dtype)
    if probe == "rademacher":
        return jax.random.rademacher(key, tuple(shape), dtype)
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")


def check_args(n_terms: int, n_samples: int, probe: str, mode: str, gradient: str,
               roulette: bool) -> None:
    """Validates the settings shared by the series and the roulette."""
    if int(n_terms) != n_terms or n_terms < 1:
        raise ValueError(f"n_terms must be an integer >= 1, got {n_terms!r}")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    # "split" pairs rows and columns of every term: it needs all terms (not the roulette's
    # random suffix) and the autodiff gradient (the Neumann vector is a sum of one chain).
    if mode == "split" and roulette:
        raise ValueError("mode='split' needs every series term computed; the Russian "
                         "roulette takes mode 'vjp' or 'jvp'")
    if mode == "split" and gradient != "autodiff":
        raise ValueError(f"mode='split' works with gradient='autodiff', got "
                         f"gradient={gradient!r} (use mode 'vjp' or 'jvp' with it)")


def linear_map(g: Fn, x: Array, mode: str) -> tuple[Array, Fn]:
    """``(g(x), w -> w J)`` for ``mode="vjp"`` or ``(g(x), w -> J w)`` for ``"jvp"``."""
    if mode == "vjp":
        gx, vjp_fn = jax.vjp(g, x)
        apply = lambda w: vjp_fn(w)[0]
    elif mode == "jvp":
        gx, apply = jax.linearize(g, x)
    elif mode == "split":
        raise ValueError("mode='split' uses two maps (w -> w J and w -> J w): use "
                         "linear_maps")
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_same_shape(gx, x)
    return gx, apply


def linear_maps(g: Fn, x: Array) -> tuple[Array, Fn, Fn]:
    """``(g(x), w -> w J, w -> J w)`` from one linearization (the VJP is its transpose)."""
    gx, jvp_fn = jax.linearize(g, x)
    check_same_shape(gx, x)
    transposed = jax.linear_transpose(jvp_fn, x)
    return gx, (lambda w: transposed(w)[0]), jvp_fn


def n_lead(n_samples: int) -> int:
    """Leading axes of the probes: ``(batch,)`` or ``(samples, batch)``."""
    return 2 if n_samples > 1 else 1


def probe_shape(x: Array, n_samples: int) -> tuple[int, ...]:
    return ((n_samples,) if n_samples > 1 else ()) + tuple(x.shape)


def finish(acc: Array, n_samples: int) -> Array:
    """The mean over probes of the per-example sums."""
    return jnp.mean(acc, axis=0) if n_samples > 1 else acc


def batched_map(g: Fn, x: Array, mode: str, n_samples: int) -> tuple[Array, Fn]:
    gx, apply = linear_map(g, x, mode)
    return gx, (jax.vmap(apply) if n_samples > 1 else apply)


def _per_example_sum(a: Array, lead: int) -> Array:
    return jnp.sum(a.reshape(a.shape[:lead] + (-1,)), axis=-1)


def series_chain(apply: Fn, v: Array, weights: Array | None, n_terms: int, n_always: int,
                 lead: int, want_neumann: bool, dual: Array | None = None
                 ) -> tuple[Array, Array | None]:
    """Per-example ``sum_k (-1)^{k+1} m_k <w_k, v> / k`` and, when ``want_neumann``, the
    Neumann vector ``u = sum_k (-1)^{k+1} m_k w_{k-1}``.

    ``dual``, when given, is the first product from the other side (``J v`` for a chain of
    ``v^T J^k``): term ``k`` is then ``<w_{k-1}, dual>`` and the chain stops one product
    earlier. The first ``n_always`` terms are unrolled in Python (on XLA:CPU much faster
    than a loop over conv products); the rest (the roulette's random terms) run in a
    ``lax.scan`` whose body skips the product under ``lax.cond`` where its weight is 0.
    Each term is reduced to per-example numbers at once, so no ``w_k`` stays alive.
    """
    reduce = functools.partial(_per_example_sum, lead=lead)
    w = v
    acc = jnp.zeros(v.shape[:lead], v.dtype)
    u = jnp.zeros_like(v) if want_neumann else None

    def term(w, acc, u, m_k, sign_over_k, sign, compute):
        if want_neumann:
            u = u + (sign * m_k) * w
        if dual is None:
            w = compute(w)
            acc = acc + (sign_over_k * m_k) * reduce(w * v)
        else:
            acc = acc + (sign_over_k * m_k) * reduce(w * dual)
            w = compute(w)
        return w, acc, u

    for k in range(1, min(n_always, n_terms) + 1):
        sign = 1.0 if k % 2 else -1.0
        m_k = 1.0 if weights is None else weights[k - 1]
        compute = apply if (dual is None or k < n_terms) else (lambda w: w)
        w, acc, u = term(w, acc, u, m_k, sign / k, sign, compute)
    if n_terms > n_always:
        ks = np.arange(n_always + 1, n_terms + 1)
        signs = np.where(ks % 2 == 1, 1.0, -1.0)
        maybe_apply = lambda w, gate: lax.cond(gate != 0, apply, jnp.zeros_like, w)
        # A term's product is needed when its own weight (no ``dual``) or the next term's
        # weight (with ``dual``) is nonzero.
        later = weights[n_always:]
        gates = later if dual is None else jnp.concatenate([later[1:],
                                                            jnp.zeros_like(later[:1])])

        def body(carry, inputs):
            w, acc, u = carry
            m_k, gate, sign_over_k, sign = inputs
            w, acc, u = term(w, acc, u, m_k, sign_over_k, sign,
                             lambda w: maybe_apply(w, gate))
            return (w, acc, u), None

        u_carry = u if want_neumann else jnp.zeros((), v.dtype)
        inputs = (later, gates, jnp.asarray(signs / ks, v.dtype), jnp.asarray(signs, v.dtype))
        (w, acc, u_carry), _ = lax.scan(body, (w, acc, u_carry), inputs)
        u = u_carry if want_neumann else None
    return acc, u


def split_chain(rows_fn: Fn, cols_fn: Fn, v: Array, weights: Array | None, n_terms: int,
                lead: int) -> Array:
    """``series_chain``'s sums with term ``k`` as ``<v^T J^a, J^b v>``, ``a = ceil(k/2)``,
    ``b = floor(k/2)``: two independent chains of about half the depth."""
    reduce = functools.partial(_per_example_sum, lead=lead)
    rows, cols = [v], [v]
    acc = jnp.zeros(v.shape[:lead], v.dtype)
    for k in range(1, n_terms + 1):
        a, b = (k + 1) // 2, k // 2
        while len(rows) <= a:
            rows.append(rows_fn(rows[-1]))
        while len(cols) <= b:
            cols.append(cols_fn(cols[-1]))
        m_k = 1.0 if weights is None else weights[k - 1]
        acc = acc + ((1.0 if k % 2 else -1.0) / k * m_k) * reduce(rows[a] * cols[b])
    return acc


def autodiff_sums(g: Fn, x: Array, v: Array, weights: Array | None, *, n_terms: int,
                  n_always: int, n_samples: int, mode: str) -> tuple[Array, Array]:
    """``(g(x), per-example sums)`` of the weighted series, differentiated by autodiff."""
    lead = n_lead(n_samples)
    if mode == "split":
        gx, rows_fn, cols_fn = linear_maps(g, x)
        if n_samples > 1:
            rows_fn, cols_fn = jax.vmap(rows_fn), jax.vmap(cols_fn)
        return gx, split_chain(rows_fn, cols_fn, v, weights, n_terms, lead)
    gx, apply = batched_map(g, x, mode, n_samples)
    acc, _ = series_chain(apply, v, weights, n_terms, n_always, lead, want_neumann=False)
    return gx, acc

