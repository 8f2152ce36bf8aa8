"""Log-determinants of residual blocks: ``ln det(I + J_g(x))`` per example.

For ``Lip(g) < 1`` the determinant is positive (Lemma 6) and

    ln det(I + J_g) = tr ln(I + J_g) = sum_{k>=1} (-1)^{k+1} tr(J_g^k) / k        (Eq. 4).

``exact`` builds the dense per-example Jacobian (toy densities, tests). ``power_series``
truncates Eq. (4) at ``n_terms`` and estimates each trace with Hutchinson's estimator
``tr(A) = E[v^T A v]`` (Algorithm 2), by repeated vector-Jacobian products (``mode="vjp"``),
Jacobian-vector products (``mode="jvp"``), or both from the two ends (``mode="split"``:
``v^T J^k v = (v^T J^a)(J^b v)`` with ``a + b = k``, two independent chains of half the
depth). The series is unrolled with a Python loop, which XLA:CPU runs much faster than a
``lax.scan`` over the terms.

``bias_bound`` is Theorem 3 and ``terms_for_bias`` inverts it; ``lemma7_bounds`` gives the
bounds of Lemma 7 for a whole network.

Residual Flows (Chen et al., NeurIPS 2019) add two things, both here:

* ``russian_roulette``: the "Russian roulette" estimator. A random number of terms ``N`` is
  drawn; term ``k`` of Eq. (4) is kept when ``k <= n_exact + N`` and weighted by
  ``1 / P(k <= n_exact + N)``, so its expectation over ``N`` is the untruncated term.
  In JAX the number of terms has a static maximum ``max_terms`` (terms beyond it are never
  kept): the draw is a single uniform integer compared against static thresholds, the
  terms past the draw are skipped by ``lax.cond`` (not recompiled), and the estimate is
  exactly unbiased for the ``max_terms``-term series, whose remaining bias is bounded by
  Theorem 3 (choose ``max_terms`` with ``terms_for_bias``).
* ``gradient="neumann"``: the Neumann-series gradient (Residual Flows, Sec. 3.2),
  ``d ln det(I + J_g) = tr((I + J_g)^{-1} dJ_g) = sum_{k>=0} (-1)^k tr(J_g^k dJ_g)``. The
  forward pass computes the log-det estimate *and* the probe-weighted Neumann vector
  ``u = sum_{k=1}^{n} (-1)^{k+1} m_k v^T J_g^{k-1}`` from the same vector-Jacobian
  products, and linearizes ``(g(x), J_g v)`` once; the backward pass is one reverse sweep
  of that linearization with cotangent ``(gbar, ldbar * u)``. The gradient is unbiased for
  the gradient of the series the forward estimates (truncated or roulette-weighted, with
  the same weights ``m_k``), is correct for any per-example weighting of the loss, and
  keeps no activations per term (on XLA:CPU one input-sized buffer per term remains:
  the sum forming ``u`` is fused).

All functions take ``g``, a function of one batch that acts per example (no mixing across
the batch), and ``x`` with a leading batch axis. Everything here is pure JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iresnet_jax import utils

Array = jax.Array
Fn = Callable[[Array], Array]

PROBES = ("gaussian", "rademacher")
MODES = ("vjp", "jvp", "split")


def _check_same_shape(gx: Array, x: Array, what: str = "g"):
    if gx.shape != x.shape:
        raise ValueError(f"{what} must map inputs to outputs of the same shape, got {x.shape} "
                         f"-> {gx.shape}")


def jacobian(g: Fn, x: Array) -> tuple[Array, Array]:
    """Dense per-example Jacobian of ``g`` at ``x``, with ``g(x)``.

    Returns ``(g(x), J)`` with ``J`` of shape ``(batch, d, d)``, ``d`` the number of
    elements of one example. Costs ``d`` batched Jacobian-vector products that share one
    linearization. If ``g`` carries a fused ``g.value_and_jacobian`` (as the MLP branch
    does) that is used instead.
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have a leading batch axis, got shape {x.shape}")
    fused = getattr(g, "value_and_jacobian", None)
    if fused is not None and x.ndim == 2:
        gx, jac = fused(x)
        _check_same_shape(gx, x)
        return gx, jac
    gx, jvp_fn = jax.linearize(g, x)
    _check_same_shape(gx, x)
    batch, d = x.shape[0], math.prod(x.shape[1:])
    eye = jnp.eye(d, dtype=x.dtype)
    basis = jnp.broadcast_to(eye[:, None, :], (d, batch, d)).reshape((d,) + x.shape)
    cols = jax.vmap(jvp_fn)(basis)                   # (d, batch, ...): column i of J
    jac = jnp.moveaxis(cols.reshape(d, batch, d), 0, -1)
    return gx, jac


def _logdet_identity_plus(jac: Array) -> Array:
    d = jac.shape[-1]
    if d == 1:
        return jnp.log(jnp.abs(1.0 + jac[..., 0, 0]))
    if d == 2:
        a, b = 1.0 + jac[..., 0, 0], jac[..., 0, 1]
        c, e = jac[..., 1, 0], 1.0 + jac[..., 1, 1]
        return jnp.log(jnp.abs(a * e - b * c))
    _, logabsdet = jnp.linalg.slogdet(jnp.eye(d, dtype=jac.dtype) + jac)
    return logabsdet


def exact_with_output(g: Fn, x: Array) -> tuple[Array, Array]:
    """``(g(x), ln|det(I + J_g(x))|)`` from the dense Jacobian (closed form for d <= 2)."""
    gx, jac = jacobian(g, x)
    return gx, _logdet_identity_plus(jac)


def exact(g: Fn, x: Array) -> Array:
    """Per-example ``ln|det(I + J_g(x))|`` from the dense Jacobian.

    Example:
      >>> w = jnp.array([[0.5, 0.1], [0.0, 0.2]])
      >>> exact(lambda x: x @ w.T, jnp.zeros((3, 2)))   # ln(1.5 * 1.2) for each example
    """
    return exact_with_output(g, x)[1]


def sample_probes(key: Array, shape: Sequence[int], probe: str, dtype) -> Array:
    """Hutchinson probes with identity covariance: Gaussian or Rademacher (+-1)."""
    if probe == "gaussian":
        return utils.normal(key, shape, dtype)
    if probe == "rademacher":
        return utils.rademacher(key, shape, dtype)
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")


def _check_series_args(n_terms: int, n_samples: int, probe: str, mode: str):
    if int(n_terms) != n_terms or n_terms < 1:
        raise ValueError(f"n_terms must be an integer >= 1, got {n_terms!r}")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def linear_map(g: Fn, x: Array, mode: str) -> tuple[Array, Fn]:
    """``(g(x), w -> w J)`` for ``mode="vjp"`` or ``(g(x), w -> J w)`` for ``mode="jvp"``."""
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
    _check_same_shape(gx, x)
    return gx, apply


def linear_maps(g: Fn, x: Array) -> tuple[Array, Fn, Fn]:
    """``(g(x), w -> w J, w -> J w)`` from one linearization of ``g`` at ``x``.

    The vector-Jacobian product is the transpose of the linearized map, so both share one
    forward pass and its residuals.
    """
    gx, jvp_fn = jax.linearize(g, x)
    _check_same_shape(gx, x)
    transposed = jax.linear_transpose(jvp_fn, x)
    return gx, (lambda w: transposed(w)[0]), jvp_fn


GRADIENTS = ("autodiff", "neumann")


def _check_gradient(gradient: str):
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")


def _check_split(mode: str, gradient: str, roulette: bool):
    """``mode="split"`` pairs rows and columns of every term, so it needs all terms (not the
    roulette's random suffix) and the autodiff gradient (the Neumann vector is a sum of
    rows ``v^T J^{k-1}`` of one chain)."""
    if mode != "split":
        return
    if roulette:
        raise ValueError("mode='split' needs every series term computed; the Russian "
                         "roulette takes mode 'vjp' or 'jvp'")
    if gradient != "autodiff":
        raise ValueError(f"mode='split' works with gradient='autodiff', got "
                         f"gradient={gradient!r} (use mode 'vjp' or 'jvp' with it)")


def _per_example_sum(a: Array, n_lead: int) -> Array:
    """Sum over all but the ``n_lead`` leading axes (``(batch,)`` or ``(samples, batch)``)."""
    return jnp.sum(a.reshape(a.shape[:n_lead] + (-1,)), axis=-1)


def _series_chain(apply: Fn, v: Array, weights: Array | None, n_terms: int, n_always: int,
                  n_lead: int, want_neumann: bool, dual: Array | None = None
                  ) -> tuple[Array, Array | None]:
    """The shared loop of Algorithm 2.

    With ``w_0 = v`` and ``w_k = apply(w_{k-1})`` (``v^T J^k`` or ``J^k v``), returns the
    per-example sums ``sum_k (-1)^{k+1} m_k / k * <w_k, v>`` (shape ``v.shape[:n_lead]``:
    ``(batch,)`` or ``(samples, batch)``) and, when ``want_neumann``, the Neumann vector
    ``u = sum_k (-1)^{k+1} m_k w_{k-1}``. ``m_k`` is ``weights[k-1]`` (1 when ``weights`` is
    None).

    ``dual``, when given, is the first product from the other side (``J v`` when the chain
    is ``v^T J^k``, ``J^T v`` when it is ``J^k v``): term ``k`` is then ``<w_{k-1}, dual>``
    (the same ``v^T J^k v``) and the chain stops one product earlier. The Neumann gradient
    computes ``dual`` anyway for its backward pass.

    The first ``n_always`` terms are unrolled in Python (on XLA:CPU much faster than a
    loop over conv vjps). The remaining ones (the roulette's random terms, whose weights
    vanish on a suffix) run in a ``lax.scan`` whose body computes the product under
    ``lax.cond`` on ``m_k != 0``: skipped terms cost nothing, and the loop body compiles
    once (unrolling 18 conds of a conv vjp took 3x longer to compile, at the same speed).

    Each term is reduced to per-example numbers as it is produced: an elementwise
    accumulator would let XLA fuse the sum over all terms into one fusion at the end and
    keep every ``w_k`` alive.
    """
    reduce = functools.partial(_per_example_sum, n_lead=n_lead)
    w = v
    acc = jnp.zeros(v.shape[:n_lead], v.dtype)
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
        # With ``dual`` the last term needs no further product.
        compute = apply if (dual is None or k < n_terms) else (lambda w: w)
        w, acc, u = term(w, acc, u, m_k, sign / k, sign, compute)
    if n_terms > n_always:
        ks = np.arange(n_always + 1, n_terms + 1)
        signs = np.where(ks % 2 == 1, 1.0, -1.0)
        maybe_apply = lambda w, gate: lax.cond(gate != 0, apply, jnp.zeros_like, w)
        # The product of a term is needed when its own weight (without ``dual``) or the
        # next term's weight (with it) is nonzero.
        later = weights[n_always:]
        gates = later if dual is None else jnp.concatenate([later[1:], jnp.zeros_like(
            later[:1])])

        def body(carry, inputs):
            w, acc, u = carry
            m_k, gate, sign_over_k, sign = inputs
            w, acc, u = term(w, acc, u, m_k, sign_over_k, sign,
                             lambda w: maybe_apply(w, gate))
            return (w, acc, u), None

        u_carry = u if want_neumann else jnp.zeros((), v.dtype)
        inputs = (later, gates, jnp.asarray(signs / ks, v.dtype),
                  jnp.asarray(signs, v.dtype))
        (w, acc, u_carry), _ = lax.scan(body, (w, acc, u_carry), inputs)
        u = u_carry if want_neumann else None
    return acc, u


def _split_chain(rows_fn: Fn, cols_fn: Fn, v: Array, weights: Array | None, n_terms: int,
                 n_lead: int) -> Array:
    """``_series_chain``'s sums for ``mode="split"``: term ``k`` is ``<v^T J^a, J^b v>``
    with ``a = ceil(k/2)`` rows from ``rows_fn`` (``w -> w J``) and ``b = floor(k/2)``
    columns from ``cols_fn`` (``w -> J w``). The two chains do not depend on each other,
    and each is about half as deep as the single chain of ``"vjp"``/``"jvp"``, in the
    forward pass and in its gradient.
    """
    reduce = functools.partial(_per_example_sum, n_lead=n_lead)
    rows, cols = [v], [v]
    acc = jnp.zeros(v.shape[:n_lead], v.dtype)
    for k in range(1, n_terms + 1):
        a, b = (k + 1) // 2, k // 2
        while len(rows) <= a:
            rows.append(rows_fn(rows[-1]))
        while len(cols) <= b:
            cols.append(cols_fn(cols[-1]))
        sign_over_k = (1.0 if k % 2 else -1.0) / k
        m_k = 1.0 if weights is None else weights[k - 1]
        acc = acc + (sign_over_k * m_k) * reduce(rows[a] * cols[b])
    return acc


def _n_lead(n_samples: int) -> int:
    """Leading axes of the probes: ``(batch,)`` or ``(samples, batch)``."""
    return 2 if n_samples > 1 else 1


def _finish(acc: Array, n_samples: int) -> Array:
    return jnp.mean(acc, axis=0) if n_samples > 1 else acc


def _probe_shape(x: Array, n_samples: int) -> tuple[int, ...]:
    return ((n_samples,) if n_samples > 1 else ()) + tuple(x.shape)


def _apply_fn(g: Fn, x: Array, mode: str, n_samples: int) -> tuple[Array, Fn]:
    gx, apply = linear_map(g, x, mode)
    return gx, (jax.vmap(apply) if n_samples > 1 else apply)


def _autodiff_sums(g: Fn, x: Array, v: Array, weights: Array | None, *, n_terms: int,
                   n_always: int, n_samples: int, mode: str) -> tuple[Array, Array]:
    """``(g(x), per-example sums)`` of the series, differentiated by autodiff."""
    if mode == "split":
        gx, rows_fn, cols_fn = linear_maps(g, x)
        if n_samples > 1:
            rows_fn, cols_fn = jax.vmap(rows_fn), jax.vmap(cols_fn)
        return gx, _split_chain(rows_fn, cols_fn, v, weights, n_terms, _n_lead(n_samples))
    gx, apply = _apply_fn(g, x, mode, n_samples)
    acc, _ = _series_chain(apply, v, weights, n_terms, n_always, _n_lead(n_samples),
                           want_neumann=False)
    return gx, acc


def _estimate(g: Fn, x: Array, v: Array, weights: Array | None, *, n_terms: int,
              n_always: int, n_samples: int, mode: str, gradient: str
              ) -> tuple[Array, Array]:
    """``(g(x), estimate)`` for probes ``v`` and term weights; dispatches on ``gradient``."""
    if gradient == "autodiff":
        gx, acc = _autodiff_sums(g, x, v, weights, n_terms=n_terms, n_always=n_always,
                                 n_samples=n_samples, mode=mode)
        return gx, _finish(acc, n_samples)
    if weights is None:
        weights = jnp.ones((n_terms,), x.dtype)
    g_conv, consts = jax.closure_convert(g, x)
    return _neumann(g_conv, n_terms, n_always, n_samples, mode, x, v, weights, *consts)


# --------------------------------------------------------------------------------------
# The Neumann-series gradient (Residual Flows, Sec. 3.2) as a custom_vjp.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _neumann(g, n_terms, n_always, n_samples, mode, x, v, weights, *consts):
    gx, apply = _apply_fn(lambda z: g(z, *consts), x, mode, n_samples)
    acc, _ = _series_chain(apply, v, weights, n_terms, n_always, _n_lead(n_samples),
                           want_neumann=False)
    return gx, _finish(acc, n_samples)


def _neumann_linearized(g, mode, n_samples, v):
    """``(x, *consts) -> (g(x), P v)`` with ``P = J_g`` (``mode="vjp"``) or ``J_g^T``.

    The log-det gradient is ``<u, dJ v>`` (rows ``u = sum v^T J^{k-1}``) or ``<u, dJ^T v>``
    (columns ``u = sum J^{k-1} v``, using ``tr(A B) = tr(B A)``): the derivative of the
    second output in the direction of the cotangent ``u``.
    """
    def fn(x, *consts):
        f = lambda z: g(z, *consts)
        if mode == "vjp":
            gx, lin = jax.linearize(f, x)
        else:
            gx, vjp_fn = jax.vjp(f, x)
            lin = lambda t: vjp_fn(t)[0]
        pv = jax.vmap(lin)(v) if n_samples > 1 else lin(v)
        return gx, pv
    return fn


def _neumann_fwd(g, n_terms, n_always, n_samples, mode, x, v, weights, *consts):
    (gx, pv), pullback = jax.vjp(_neumann_linearized(g, mode, n_samples, v), x, *consts)
    _, apply = _apply_fn(lambda z: g(z, *consts), x, mode, n_samples)
    # The linearization's ``P v`` is the other side's first product: with it as ``dual``
    # the chain needs one product fewer (term k is <w_{k-1}, P v> = v^T J^k v).
    acc, u = _series_chain(apply, v, weights, n_terms, n_always, _n_lead(n_samples),
                           want_neumann=True, dual=pv)
    return (gx, _finish(acc, n_samples)), (pullback, u, v, weights)


def _neumann_bwd(g, n_terms, n_always, n_samples, mode, res, cotangents):
    pullback, u, v, weights = res
    gbar, ldbar = cotangents
    # The estimate is the mean over probes of per-example sums: d est_b = <u_b, dP v_b>/S.
    scale = ldbar.reshape(ldbar.shape + (1,) * (u.ndim - 1 - (n_samples > 1)))
    xbar, *const_bars = pullback((gbar, u * (scale / n_samples)))
    return (xbar, jnp.zeros_like(v), jnp.zeros_like(weights), *const_bars)


_neumann.defvjp(_neumann_fwd, _neumann_bwd)


def power_series_with_output(g: Fn, x: Array, key: Array, *, n_terms: int,
                             n_samples: int = 1, probe: str = "gaussian",
                             mode: str = "vjp",
                             coefficients: Sequence[float] | Array | None = None,
                             gradient: str = "autodiff") -> tuple[Array, Array]:
    """``(g(x), estimate)``: Algorithm 2 sharing the forward pass with ``g(x)``.

    ``coefficients`` optionally replaces the series weights ``(-1)^{k+1} / k`` (one per
    term; a traced array is allowed). ``gradient`` is as in ``power_series``; with
    ``gradient="neumann"`` custom ``coefficients`` are not allowed (the Neumann gradient
    is the gradient of the Eq. (4) weights).
    """
    _check_series_args(n_terms, n_samples, probe, mode)
    _check_gradient(gradient)
    _check_split(mode, gradient, roulette=False)
    if coefficients is not None and gradient == "neumann":
        raise ValueError("custom coefficients cannot be combined with gradient='neumann'")
    v = sample_probes(key, _probe_shape(x, n_samples), probe, x.dtype)
    if coefficients is None:
        return _estimate(g, x, v, None, n_terms=n_terms, n_always=n_terms,
                         n_samples=n_samples, mode=mode, gradient=gradient)
    # Express custom coefficients c_k as weights m_k = c_k k (-1)^{k+1} of Eq. (4).
    weights = [coefficients[k - 1] * k * (1.0 if k % 2 else -1.0)
               for k in range(1, n_terms + 1)]
    gx, acc = _autodiff_sums(g, x, v, jnp.stack([jnp.asarray(w, x.dtype) for w in weights]),
                             n_terms=n_terms, n_always=n_terms, n_samples=n_samples,
                             mode=mode)
    return gx, _finish(acc, n_samples)


def power_series(g: Fn, x: Array, key: Array, *, n_terms: int, n_samples: int = 1,
                 probe: str = "gaussian", mode: str = "vjp",
                 gradient: str = "autodiff") -> Array:
    """Truncated power series of Eq. (4) with Hutchinson trace estimates (Algorithm 2).

    Args:
      g: residual branch acting per example on a batch.
      x: batch of inputs.
      key: PRNG key for the probes.
      n_terms: number of series terms ``n >= 1``.
      n_samples: probes per example; the estimate is their mean.
      probe: ``"gaussian"`` or ``"rademacher"``.
      mode: ``"vjp"`` computes ``v^T J^k`` (reverse mode, Algorithm 2); ``"jvp"``
        computes ``J^k v`` (forward mode); ``"split"`` computes ``v^T J^a`` and ``J^b v``
        for ``a = ceil(k/2)``, ``b = floor(k/2)`` and pairs them (autodiff gradient only).
        All three give the same estimate of ``sum_k (-1)^{k+1} tr(J^k)/k`` for the same
        probes (``v^T J^k v``, up to float rounding) and the same gradient; ``"split"``
        runs two independent chains of about half the depth (measured on the
        ANCHORS.md density model: README, "Speed against the reference").
      gradient: ``"autodiff"`` differentiates through every term (the i-ResNet paper);
        ``"neumann"`` uses the Neumann-series gradient (Residual Flows, Sec. 3.2; see the
        module docstring): the same forward value, a backward pass whose cost does not
        grow with ``n_terms`` and no activations kept per term; unbiased for the gradient
        of the ``n``-term series.
        Reverse-mode only (``jax.grad``/``jax.vjp``; no ``jax.jvp`` through it).

    Returns:
      Per-example estimates, shape ``(batch,)``. Unbiased for the ``n``-term series, whose
      bias against the exact log-det is bounded by ``bias_bound``.
    """
    return power_series_with_output(g, x, key, n_terms=n_terms, n_samples=n_samples,
                                    probe=probe, mode=mode, gradient=gradient)[1]


# --------------------------------------------------------------------------------------
# Russian roulette (Residual Flows, Sec. 3.1, Theorem 1).

DISTRIBUTIONS = ("geometric", "poisson")

_TWO32 = 2 ** 32


def _check_roulette_args(n_exact, max_terms, distribution, geom_p, poisson_lambda):
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
    """``P(term k is computed)`` for ``k = 1..max_terms`` before the 32-bit quantization.

    Term ``k <= n_exact`` is always computed; term ``n_exact + j`` is computed when the
    drawn ``N >= j``. As in the Residual Flows code, ``N ~ Geometric(geom_p)`` on
    ``{1, 2, ...}`` (``P(N >= j) = (1 - p)^{j-1}``, so term ``n_exact + 1`` is always
    computed too) or ``N ~ Poisson(poisson_lambda)`` on ``{0, 1, ...}``. Float64 NumPy.
    """
    _check_roulette_args(n_exact, max_terms, distribution, geom_p, poisson_lambda)
    j = np.arange(1, max_terms + 1) - n_exact            # index of the random term
    if distribution == "geometric":
        extra = (1.0 - geom_p) ** np.maximum(j - 1, 0).astype(np.float64)
    else:
        lam = float(poisson_lambda)
        # P(N >= j) summed from the tail (no cancellation): sum_{i>=j} e^-lam lam^i / i!.
        i = np.arange(0, max_terms + 200 + int(10 * lam))
        log_pmf = -lam + i * math.log(lam) - np.array([math.lgamma(t + 1.0) for t in i])
        pmf = np.exp(log_pmf)
        tail = np.cumsum(pmf[::-1])[::-1]
        extra = np.where(j >= 1, tail[np.clip(j, 0, None)], 1.0)
    return np.where(j <= 0, 1.0, np.minimum(extra, 1.0))


def _roulette_thresholds(survival: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Static 32-bit thresholds, exact inclusion probabilities and the always-kept count.

    Term ``k`` is kept when a uniform 32-bit integer ``b < t_k`` with
    ``t_k = round(S_k 2^32)``; so it is kept with probability exactly ``t_k / 2^32``, and
    that (not ``S_k``) is the weight's denominator. The ``t_k`` do not increase, so the
    kept terms are a prefix. Terms with ``S_k = 1`` are always kept.
    """
    always = survival >= 1.0
    n_always = int(np.argmin(always)) if not np.all(always) else len(survival)
    thresholds = np.minimum(np.round(survival * _TWO32), _TWO32 - 1)
    prob = np.where(always, 1.0, thresholds / _TWO32)
    return thresholds.astype(np.uint32), prob, n_always


def roulette_weights(key: Array, *, n_exact: int = 2, max_terms: int = 20,
                     distribution: str = "geometric", geom_p: float = 0.5,
                     poisson_lambda: float = 2.0, dtype=jnp.float32
                     ) -> tuple[Array, int]:
    """One Russian-roulette draw: ``(m, n_always)`` with ``m_k = 1[k kept] / P(k kept)``.

    ``E[m_k] = 1`` for every ``k <= max_terms`` (exactly: the inclusion probability is the
    one of the 32-bit comparison, see ``_roulette_thresholds``). The first ``n_always``
    weights are always 1; the shape is static, so a jitted estimator is traced once for
    all draws.
    """
    survival = roulette_survival(n_exact=n_exact, max_terms=max_terms,
                                 distribution=distribution, geom_p=geom_p,
                                 poisson_lambda=poisson_lambda)
    thresholds, prob, n_always = _roulette_thresholds(survival)
    bits = jax.random.bits(key, (), jnp.uint32)
    kept = jnp.logical_or(jnp.asarray(np.arange(max_terms) < n_always),
                          bits < jnp.asarray(thresholds))
    inv = np.where(prob > 0, 1.0 / np.maximum(prob, 1e-300), 0.0)
    weights = jnp.where(kept, jnp.asarray(inv, dtype), jnp.zeros((), dtype))
    return weights, n_always


def expected_terms(*, n_exact: int = 2, max_terms: int = 20,
                   distribution: str = "geometric", geom_p: float = 0.5,
                   poisson_lambda: float = 2.0) -> float:
    """Expected number of series terms (vector-Jacobian products) per roulette draw."""
    survival = roulette_survival(n_exact=n_exact, max_terms=max_terms,
                                 distribution=distribution, geom_p=geom_p,
                                 poisson_lambda=poisson_lambda)
    return float(np.sum(_roulette_thresholds(survival)[1]))


def russian_roulette_with_output(g: Fn, x: Array, key: Array, *, n_exact: int = 2,
                                 max_terms: int = 20, distribution: str = "geometric",
                                 geom_p: float = 0.5, poisson_lambda: float = 2.0,
                                 n_samples: int = 1, probe: str = "gaussian",
                                 mode: str = "vjp", gradient: str = "autodiff"
                                 ) -> tuple[Array, Array]:
    """``(g(x), estimate)`` of ``russian_roulette``, sharing the forward pass."""
    _check_roulette_args(n_exact, max_terms, distribution, geom_p, poisson_lambda)
    _check_series_args(max_terms, n_samples, probe, mode)
    _check_gradient(gradient)
    _check_split(mode, gradient, roulette=True)
    probe_key, draw_key = jax.random.split(key)
    v = sample_probes(probe_key, _probe_shape(x, n_samples), probe, x.dtype)
    weights, n_always = roulette_weights(draw_key, n_exact=n_exact, max_terms=max_terms,
                                         distribution=distribution, geom_p=geom_p,
                                         poisson_lambda=poisson_lambda, dtype=x.dtype)
    return _estimate(g, x, v, weights, n_terms=max_terms, n_always=n_always,
                     n_samples=n_samples, mode=mode, gradient=gradient)


def russian_roulette(g: Fn, x: Array, key: Array, *, n_exact: int = 2, max_terms: int = 20,
                     distribution: str = "geometric", geom_p: float = 0.5,
                     poisson_lambda: float = 2.0, n_samples: int = 1,
                     probe: str = "gaussian", mode: str = "vjp",
                     gradient: str = "autodiff") -> Array:
    """Russian-roulette estimate of ``ln det(I + J_g)`` (Residual Flows, Theorem 1).

    ``sum_{k=1}^{max_terms} (-1)^{k+1} m_k v^T J^k v / k`` with the roulette weights ``m``
    of ``roulette_weights`` (one draw per call, shared by the batch, as in the Residual
    Flows code) and Hutchinson probes ``v``. Since ``E[m_k] = 1``, the estimate is
    unbiased for the ``max_terms``-term series; its bias against the exact log-det is at
    most ``bias_bound(Lip(g), d, max_terms)`` (Theorem 3), which ``terms_for_bias`` makes
    negligible. Expected cost: ``expected_terms(...)`` products (4 for the defaults).

    The variance grows with the weights ``1 / P(N >= j)``: for the untruncated geometric
    estimator it is finite only if ``Lip(g)^2 < 1 - geom_p``.

    Args:
      g, x, n_samples, probe, mode, gradient: as in ``power_series``.
      key: PRNG key; split into the probe key and the draw of ``N``.
      n_exact: terms always computed.
      max_terms: static maximum number of terms (the compiled program's size).
      distribution: ``"geometric"`` (``geom_p``) or ``"poisson"`` (``poisson_lambda``).

    Returns:
      Per-example estimates, shape ``(batch,)``.
    """
    return russian_roulette_with_output(
        g, x, key, n_exact=n_exact, max_terms=max_terms, distribution=distribution,
        geom_p=geom_p, poisson_lambda=poisson_lambda, n_samples=n_samples, probe=probe,
        mode=mode, gradient=gradient)[1]


def exact_series(jac: Array, n_terms: int) -> Array:
    """The deterministic ``n``-term series ``sum_k (-1)^{k+1} tr(J^k)/k`` from dense ``J``.

    ``jac`` has shape ``(..., d, d)``. This is the quantity ``power_series`` estimates
    without bias; tests and the bias analysis compare against it.
    """
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    power = jac
    total = jnp.zeros(jac.shape[:-2], jac.dtype)
    for k in range(1, n_terms + 1):
        total = total + (-1.0) ** (k + 1) * jnp.trace(power, axis1=-2, axis2=-1) / k
        power = power @ jac
    return total


def _check_lipschitz(lipschitz) -> np.ndarray:
    lip = np.asarray(lipschitz, dtype=np.float64)
    if np.any(~np.isfinite(lip)) or np.any(lip < 0) or np.any(lip >= 1):
        raise ValueError(f"Lipschitz constants must lie in [0, 1), got {lipschitz!r}")
    return lip


def bias_bound(lipschitz, dim: int, n_terms: int):
    """Theorem 3: ``|PS(J_g, n) - ln det(I + J_g)| <= -d (ln(1 - L) + sum_{k<=n} L^k / k)``.

    Computed as ``d * sum_{k>n} L^k / k`` (the same number without the cancellation of the
    closed form), in float64. ``lipschitz`` may be an array (one bound per entry).
    """
    lip = _check_lipschitz(lipschitz)
    if int(n_terms) != n_terms or n_terms < 0:
        raise ValueError(f"n_terms must be an integer >= 0, got {n_terms!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    closed = -(np.log1p(-lip) + sum(lip ** k / k for k in range(1, n_terms + 1)))
    # Direct tail sum where it converges quickly (more accurate for small bounds).
    tail = np.zeros_like(lip)
    term_k = n_terms + 1
    power = lip ** term_k
    for _ in range(20000):
        tail = tail + power / term_k
        term_k += 1
        power = power * lip
        if np.all(power / term_k <= 1e-17 * np.maximum(tail, 1e-300)):
            break
    else:
        tail = closed
    out = dim * np.maximum(tail, 0.0)
    return float(out) if out.ndim == 0 else out


def terms_for_bias(lipschitz: float, dim: int, tol: float, max_terms: int = 100000) -> int:
    """Smallest ``n >= 1`` with ``bias_bound(lipschitz, dim, n) <= tol``."""
    lip = float(_check_lipschitz(lipschitz))
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if lip == 0.0:
        return 1
    # The tail is <= L^{n+1} / ((n+1)(1-L)) * d: find a bracket, then bisect.
    lo, hi = 1, 1
    while bias_bound(lip, dim, hi) > tol:
        lo, hi = hi, hi * 2
        if hi > max_terms:
            raise ValueError(f"more than {max_terms} terms needed for L={lip}, d={dim}, "
                             f"tol={tol}")
    if bias_bound(lip, dim, lo) <= tol:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bias_bound(lip, dim, mid) <= tol:
            hi = mid
        else:
            lo = mid
    return hi


def lemma7_bounds(lipschitz: Sequence[float], dim: int) -> tuple[float, float]:
    """Lemma 7: ``d sum_t ln(1 - L_t) <= ln det J_F(x) <= d sum_t ln(1 + L_t)``.

    Args:
      lipschitz: the Lipschitz constants ``L_t < 1`` of the residual branches.
      dim: the dimension ``d`` of the blocks' inputs.
    """
    lip = _check_lipschitz(lipschitz)
    return float(dim * np.sum(np.log1p(-lip))), float(dim * np.sum(np.log1p(lip)))


# --------------------------------------------------------------------------------------
# Configuration used by the Flax blocks.

METHODS = ("exact", "series", "roulette", "none")


@dataclasses.dataclass(frozen=True)
class LogDetConfig:
    """How an invertible block computes its log-determinant.

    Attributes:
      method: ``"exact"`` (dense Jacobian), ``"series"`` (Algorithm 2, ``n_terms``
        terms), ``"roulette"`` (Russian roulette, Residual Flows; ``n_exact``,
        ``max_terms``, ``distribution``, ``geom_p``, ``poisson_lambda``) or ``"none"``
        (return zeros, e.g. for classifiers).
      n_terms: terms of the truncated series (``"series"``).
      n_samples, probe, mode: Hutchinson probes per example, their law, and whether the
        powers are ``v^T J^k`` (``"vjp"``), ``J^k v`` (``"jvp"``) or both halves
        (``"split"``: series with the autodiff gradient only).
      gradient: ``"autodiff"`` (differentiate through every term) or ``"neumann"`` (the
        Neumann-series gradient of Residual Flows: same forward value, no activations
        kept per term; reverse-mode only). Only for ``"series"`` and ``"roulette"``.
      n_exact, max_terms, distribution, geom_p, poisson_lambda: the roulette's settings
        (see ``russian_roulette``); the defaults are those of the Residual Flows code
        (geometric, p = 0.5, 2 exact terms: 4 terms on average), with at most 20 terms.

    Example:
      >>> cfg = LogDetConfig("roulette", gradient="neumann")
      >>> gx, ld = cfg(lambda x: 0.5 * jnp.tanh(x), jnp.ones((3, 2)), jax.random.key(0))
    """
    method: str = "series"
    n_terms: int = 5
    n_samples: int = 1
    probe: str = "gaussian"
    mode: str = "vjp"
    gradient: str = "autodiff"
    n_exact: int = 2
    max_terms: int = 20
    distribution: str = "geometric"
    geom_p: float = 0.5
    poisson_lambda: float = 2.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"log-det method must be one of {METHODS}, got {self.method!r}")
        _check_gradient(self.gradient)
        if self.gradient != "autodiff" and self.method not in ("series", "roulette"):
            raise ValueError(f"gradient={self.gradient!r} needs method 'series' or "
                             f"'roulette', got method={self.method!r}")
        if self.method == "series":
            _check_series_args(self.n_terms, self.n_samples, self.probe, self.mode)
            _check_split(self.mode, self.gradient, roulette=False)
        if self.method == "roulette":
            _check_roulette_args(self.n_exact, self.max_terms, self.distribution,
                                 self.geom_p, self.poisson_lambda)
            _check_series_args(self.max_terms, self.n_samples, self.probe, self.mode)
            _check_split(self.mode, self.gradient, roulette=True)

    @property
    def needs_rng(self) -> bool:
        return self.method in ("series", "roulette")

    @property
    def expected_terms(self) -> float:
        """Expected number of vector-Jacobian products per call (0 for exact/none)."""
        if self.method == "series":
            return float(self.n_terms)
        if self.method == "roulette":
            return expected_terms(n_exact=self.n_exact, max_terms=self.max_terms,
                                  distribution=self.distribution, geom_p=self.geom_p,
                                  poisson_lambda=self.poisson_lambda)
        return 0.0

    def __call__(self, g: Fn, x: Array, key: Array | None) -> tuple[Array, Array]:
        """``(g(x), log-det estimate)`` per example."""
        if self.method == "exact":
            return exact_with_output(g, x)
        if self.method == "series":
            return power_series_with_output(g, x, key, n_terms=self.n_terms,
                                            n_samples=self.n_samples, probe=self.probe,
                                            mode=self.mode, gradient=self.gradient)
        if self.method == "roulette":
            return russian_roulette_with_output(
                g, x, key, n_exact=self.n_exact, max_terms=self.max_terms,
                distribution=self.distribution, geom_p=self.geom_p,
                poisson_lambda=self.poisson_lambda, n_samples=self.n_samples,
                probe=self.probe, mode=self.mode, gradient=self.gradient)
        return g(x), jnp.zeros(x.shape[:1], x.dtype)
