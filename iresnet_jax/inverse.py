"""Inverting ``y = x + g(x)`` by fixed-point iteration (Algorithm 1), differentiably.

For ``Lip(g) = L < 1`` the map ``x -> y - g(x)`` is a contraction (Banach), so
``x^0 = y, x^{k+1} = y - g(x^k)`` converges geometrically: ``|x^k - x*| <= L^k |y - x*|``.
``fixed_point`` runs this in a ``lax.while_loop`` with a per-example convergence test and
reports, per example, the number of iterations and the last step size (which bounds the
residual ``|x + g(x) - y|`` of the returned point). Non-convergence is never silent:
``info.converged`` says it, and ``checked=True`` raises.

Gradients use the implicit function theorem rather than differentiating the loop. From
``x + g(x, theta) = y``: ``dx = (I + J_g)^{-1} (dy - d_theta g dtheta)``. The backward pass
solves ``u = xbar - J_g^T u`` (again a contraction) and returns ``ybar = u`` and
``thetabar = -(d_theta g)^T u``. ``g`` may close over parameters: they are hoisted with
``jax.closure_convert`` so their gradients flow too.

``method="anderson"`` uses Anderson acceleration (type II, with a safeguarded fall-back to
the plain step); see ``anderson_step``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

METHODS = ("plain", "anderson")


class FixedPointInfo(NamedTuple):
    """Per-example diagnostics of ``fixed_point``.

    Attributes:
      iterations: iterations run until the example converged (or ``max_iter``).
      residual: max-abs size of the last step ``|x^{k} - x^{k-1}|_inf``; the residual
        ``|x + g(x) - y|`` of the returned ``x`` is at most ``Lip(g)`` times this (in the
        2-norm) and its error at most ``Lip(g) / (1 - Lip(g))`` times it.
      converged: ``residual <= tol``.
    """
    iterations: Array
    residual: Array
    converged: Array


class FixedPointError(RuntimeError):
    """Raised by ``fixed_point(..., checked=True)`` when an example did not converge."""


def _max_abs(a: Array) -> Array:
    return jnp.max(jnp.abs(a.reshape(a.shape[0], -1)), axis=-1)


def _bcast(mask: Array, like: Array) -> Array:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def _plain_solve(g, y, tol, max_iter):
    batch = y.shape[0]

    def cond(state):
        k, _, done, _, _ = state
        return jnp.logical_and(k < max_iter, jnp.logical_not(jnp.all(done)))

    def body(state):
        k, x, done, iters, res = state
        x_new = y - g(x)
        step = _max_abs(x_new - x)
        active = jnp.logical_not(done)
        x = jnp.where(_bcast(active, x), x_new, x)
        iters = jnp.where(active, k + 1, iters)
        res = jnp.where(active, step, res)
        done = jnp.logical_or(done, step <= tol)
        return k + 1, x, done, iters, res

    init = (jnp.zeros((), jnp.int32), y, jnp.zeros((batch,), bool),
            jnp.zeros((batch,), jnp.int32), jnp.full((batch,), jnp.inf, y.dtype))
    _, x, done, iters, res = lax.while_loop(cond, body, init)
    return x, FixedPointInfo(iters, res, done)


def anderson_step(xs: Array, fs: Array, n_hist: Array, reg: float) -> Array:
    """One Anderson (type II) extrapolation per example.

    Args:
      xs, fs: ring buffers ``(batch, m, d)`` of past iterates ``x_i`` and their images
        ``f(x_i) = y - g(x_i)``; only the first ``n_hist`` (per batch, a scalar) are used.
      n_hist: how many entries are valid.
      reg: Tikhonov regularization of the least-squares problem.

    Returns:
      ``sum_i alpha_i f(x_i)`` with ``alpha`` minimizing ``|sum_i alpha_i (f(x_i) - x_i)|``
      subject to ``sum_i alpha_i = 1``.
    """
    m = xs.shape[1]
    valid = jnp.arange(m) < n_hist
    r = fs - xs                                                    # residuals (b, m, d)
    gram = jnp.einsum("bid,bjd->bij", r, r)
    scale = jnp.maximum(jnp.max(jnp.abs(gram), axis=(1, 2), keepdims=True), 1e-30)
    gram = gram / scale
    vv = valid[:, None] & valid[None, :]
    eye = jnp.eye(m, dtype=xs.dtype)
    gram = jnp.where(vv, gram, eye) + reg * eye
    ones = valid.astype(xs.dtype)
    sol = jnp.linalg.solve(gram, jnp.broadcast_to(ones, (xs.shape[0], m))[..., None])[..., 0]
    sol = jnp.where(valid, sol, 0.0)
    alpha = sol / jnp.sum(sol, axis=1, keepdims=True)
    return jnp.einsum("bi,bid->bd", alpha, fs)


def _anderson_solve(g, y, tol, max_iter, memory=5, reg=1e-8):
    """Anderson-accelerated fixed point with a safeguard.

    Each step proposes the Anderson extrapolation; it is accepted when its fixed-point
    residual does not exceed the plain step's (both measured by one more evaluation of
    ``g``), otherwise the plain iterate is kept, so the residual of every accepted point
    is at most that of the plain iteration from the same point. Convergence of the plain
    contraction therefore carries over.
    """
    batch = y.shape[0]
    shape = y.shape
    flat = lambda a: a.reshape(batch, -1)
    f = lambda x: y - g(x)
    d = flat(y).shape[1]
    m = memory

    def cond(state):
        k, *_rest, done, _, _ = state
        return jnp.logical_and(k < max_iter, jnp.logical_not(jnp.all(done)))

    def body(state):
        k, x, fx, xs, fs, done, iters, res = state
        slot = k % m
        xs = xs.at[:, slot].set(flat(x))
        fs = fs.at[:, slot].set(flat(fx))
        n_hist = jnp.minimum(k + 1, m)
        x_acc = anderson_step(xs, fs, n_hist, reg).reshape(shape)
        x_plain = fx
        f_acc = f(x_acc)
        f_plain = f(x_plain)
        r_acc = _max_abs(f_acc - x_acc)
        r_plain = _max_abs(f_plain - x_plain)
        take_acc = jnp.logical_and(jnp.isfinite(r_acc), r_acc <= r_plain)
        x_new = jnp.where(_bcast(take_acc, x), x_acc, x_plain)
        f_new = jnp.where(_bcast(take_acc, x), f_acc, f_plain)
        step = jnp.minimum(jnp.where(take_acc, r_acc, r_plain), r_plain)
        active = jnp.logical_not(done)
        x_out = jnp.where(_bcast(active, x), x_new, x)
        fx_out = jnp.where(_bcast(active, x), f_new, fx)
        iters = jnp.where(active, k + 1, iters)
        res = jnp.where(active, step, res)
        done = jnp.logical_or(done, step <= tol)
        return k + 1, x_out, fx_out, xs, fs, done, iters, res

    init = (jnp.zeros((), jnp.int32), y, f(y), jnp.zeros((batch, m, d), y.dtype),
            jnp.zeros((batch, m, d), y.dtype), jnp.zeros((batch,), bool),
            jnp.zeros((batch,), jnp.int32), jnp.full((batch,), jnp.inf, y.dtype))
    _, x, fx, _, _, done, iters, res = lax.while_loop(cond, body, init)
    # Return the image f(x): one more contraction step from the accepted point.
    return fx, FixedPointInfo(iters, res, done)


def _solve(g, y, tol, max_iter, method):
    with jax.default_matmul_precision("float32"):
        if method == "plain":
            return _plain_solve(g, y, tol, max_iter)
        return _anderson_solve(g, y, tol, max_iter)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fixed_point(g, tol, max_iter, method, y, *consts):
    return _solve(lambda x: g(x, *consts), y, tol, max_iter, method)


def _fixed_point_fwd(g, tol, max_iter, method, y, *consts):
    x, info = _solve(lambda x: g(x, *consts), y, tol, max_iter, method)
    return (x, info), (x, consts)


def _fixed_point_bwd(g, tol, max_iter, method, res, cotangents):
    x, consts = res
    xbar = cotangents[0]
    with jax.default_matmul_precision("float32"):
        _, vjp_fn = jax.vjp(lambda x_, *c: g(x_, *c), x, *consts)

        # Solve u = xbar - J_g^T u (a contraction, like the forward problem).
        def cond(state):
            k, _, step = state
            return jnp.logical_and(k < max_iter, step > tol)

        def body(state):
            k, u, _ = state
            u_new = xbar - vjp_fn(u)[0]
            return k + 1, u_new, jnp.max(jnp.abs(u_new - u))

        _, u, _ = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), xbar,
                                              jnp.asarray(jnp.inf, xbar.dtype)))
        const_bars = vjp_fn(u)[1:]
    negate = lambda c: c if c.dtype == jax.dtypes.float0 else -c
    return (u,) + tuple(jax.tree.map(negate, c) for c in const_bars)


_fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def _raise_if_not_converged(converged, residual, iterations, max_iter, tol):
    if not bool(jnp.all(converged)):
        bad = int(jnp.sum(~jnp.asarray(converged)))
        worst = float(jnp.max(jnp.where(converged, -jnp.inf, residual)))
        raise FixedPointError(
            f"fixed-point inverse did not converge for {bad} example(s) within "
            f"max_iter={max_iter} (worst last step {worst:.3g} > tol={tol:.3g}); the "
            "residual branch may not be a contraction (is every Lipschitz constant < 1?)")


def fixed_point(g: Callable[[Array], Array], y: Array, *, tol: float = 1e-6,
                max_iter: int = 100, checked: bool = False,
                method: str = "plain") -> tuple[Array, FixedPointInfo]:
    """Solves ``x + g(x) = y`` for each example by fixed-point iteration (Algorithm 1).

    Args:
      g: residual branch acting per example on a batch, with ``Lip(g) < 1``. It may close
        over parameters (gradients reach them through the implicit function theorem).
      y: outputs of the block, leading batch axis.
      tol: an example stops once its step ``max|x^{k+1} - x^k|`` is ``<= tol``
        (``tol=0`` runs exactly ``max_iter`` iterations unless a step is exactly zero).
      max_iter: bound on the iterations (``>= 1``).
      checked: raise ``FixedPointError`` if an example did not converge (under ``jit``
        the error surfaces as a runtime error carrying the same message).
      method: ``"plain"`` (Algorithm 1) or ``"anderson"`` (Anderson acceleration with a
        safeguard; each iteration then costs two evaluations of ``g``).

    Returns:
      ``(x, info)`` with ``info`` a ``FixedPointInfo`` of per-example arrays.

    Example:
      >>> g = lambda x: 0.5 * jnp.sin(x)
      >>> y = jnp.array([[1.0, -2.0]])
      >>> x, info = fixed_point(g, y, tol=1e-7)
      >>> # x + g(x) == y, info.iterations == [~24]
    """
    y = jnp.asarray(y)
    if y.ndim < 2:
        raise ValueError(f"y must have a leading batch axis, got shape {y.shape}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = jax.eval_shape(g, y)
    if out.shape != y.shape:
        raise ValueError(f"g must preserve the shape of its input: {y.shape} -> {out.shape}")
    g_conv, consts = jax.closure_convert(g, y)
    x, info = _fixed_point(g_conv, float(tol), int(max_iter), method, y, *consts)
    info = FixedPointInfo(*(lax.stop_gradient(a) for a in info))
    if checked:
        if isinstance(info.converged, jax.core.Tracer):
            def callback(converged, residual, iterations):
                _raise_if_not_converged(converged, residual, iterations, max_iter, tol)
            jax.debug.callback(callback, info.converged, info.residual, info.iterations)
        else:
            _raise_if_not_converged(info.converged, info.residual, info.iterations,
                                    max_iter, tol)
    return x, info
