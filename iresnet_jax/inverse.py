"""Inverting ``y = x + g(x)`` by fixed-point iteration (Algorithm 1), differentiably.

For ``Lip(g) = L < 1`` the map ``x -> y - g(x)`` is a contraction (Banach), so
``x^0 = y, x^{k+1} = y - g(x^k)`` converges geometrically: ``|x^k - x*| <= L^k |y - x*|``.
``fixed_point`` runs this in a ``lax.while_loop`` with a per-example convergence test and
reports, per example, the number of iterations and the last step size (which bounds the
residual ``|x + g(x) - y|`` of the returned point). Non-convergence is never silent:
``info.converged`` says it, and ``checked=True`` raises.

Gradients use the implicit function theorem rather than differentiating the loop. From
``x + g(x, theta) = y``: ``dx = (I + J_g)^{-1} (dy - d_theta g dtheta)``. The backward pass
solves ``u = xbar - J_g^T u`` (again a contraction, by the same method as the forward
pass) and returns ``ybar = u`` and ``thetabar = -(d_theta g)^T u``. ``g`` may close over
parameters: they are hoisted with ``jax.closure_convert`` so their gradients flow too.

``method="anderson"`` uses safeguarded Anderson acceleration (type II, memory 5, one
evaluation of ``g`` per iteration; see ``_anderson_solve`` for the convergence argument):
far fewer evaluations where the plain iteration is slow, about as many where it is fast.

``InverseConfig`` carries the solver's settings from config files to the blocks;
``iterate`` runs exactly ``n`` plain iterations (the paper's Fig. 8 analysis).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from iresnet_jax import precision

Array = jax.Array

METHODS = ("plain", "anderson")


class FixedPointInfo(NamedTuple):
    """Per-example diagnostics of ``fixed_point``.

    Attributes:
      iterations: iterations run until the example converged (or ``max_iter``); both
        methods evaluate ``g`` once per iteration, so this is also the cost.
      residual: max-abs size of the last step ``|x^{k} - x^{k-1}|_inf`` (for Anderson:
        ``|f(z) - z|_inf`` at the point ``z`` whose image ``f(z)`` is returned); the residual
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


def _plain_solve(g, y, tol, max_iter, rtol=0.0):
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
        done = jnp.logical_or(done, step <= tol + rtol * _max_abs(x_new))
        return k + 1, x, done, iters, res

    init = (jnp.zeros((), jnp.int32), y, jnp.zeros((batch,), bool),
            jnp.zeros((batch,), jnp.int32), jnp.full((batch,), jnp.inf, y.dtype))
    _, x, done, iters, res = lax.while_loop(cond, body, init)
    return x, FixedPointInfo(iters, res, done)


def anderson_step(xs: Array, fs: Array, n_hist: Array | int, reg: float) -> Array:
    """One Anderson (type II) extrapolation per example.

    Args:
      xs, fs: buffers ``(batch, m, d)`` of past iterates ``x_i`` and their images
        ``f(x_i) = y - g(x_i)``; only the first ``n_hist`` entries are used.
      n_hist: how many entries are valid: a scalar or one count per example.
      reg: Tikhonov regularization of the least-squares problem, relative to the largest
        entry of the Gram matrix.

    Returns:
      ``sum_i alpha_i f(x_i)`` with ``alpha`` minimizing ``|sum_i alpha_i (f(x_i) - x_i)|``
      subject to ``sum_i alpha_i = 1`` (Walker & Ni, 2011, Eq. 1.2 with mixing 1).
    """
    m = xs.shape[1]
    n_hist = jnp.asarray(n_hist)
    valid = jnp.arange(m) < (n_hist[:, None] if n_hist.ndim else n_hist)   # (b, m) or (m,)
    valid = jnp.broadcast_to(valid, xs.shape[:2])
    r = fs - xs                                                    # residuals (b, m, d)
    gram = jnp.einsum("bid,bjd->bij", r, r, precision=lax.Precision.HIGHEST)
    # alpha is proportional to gram^{-1} 1. Jacobi scaling (unit diagonal) makes the
    # regularization relative to every residual's own size: the newest residuals are
    # orders of magnitude smaller than the oldest.
    diag = jnp.diagonal(gram, axis1=1, axis2=2)
    scale = jnp.where(valid, lax.rsqrt(jnp.maximum(diag, jnp.finfo(xs.dtype).tiny)), 0.0)
    gram = gram * scale[:, :, None] * scale[:, None, :]
    vv = valid[:, :, None] & valid[:, None, :]
    eye = jnp.eye(m, dtype=xs.dtype)
    gram = jnp.where(vv, gram, eye) + reg * eye
    sol = jnp.linalg.solve(gram, scale[..., None])[..., 0] * scale
    sol = jnp.where(valid, sol, 0.0)
    alpha = sol / jnp.sum(sol, axis=1, keepdims=True)
    return jnp.einsum("bi,bid->bd", alpha, fs, precision=lax.Precision.HIGHEST)


# Safeguard of the Anderson iteration: an extrapolated point is accepted only if its
# fixed-point residual (2-norm) is at most this fraction of the current point's.
ANDERSON_DECREASE = 0.9


def _norm2(a: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=-1))


def _anderson_solve(g, y, tol, max_iter, memory=5, reg=None, rtol=0.0):
    """Safeguarded Anderson acceleration, one evaluation of ``g`` per iteration.

    Per example, the state is an accepted point ``x`` with its image ``f(x) = y - g(x)``
    and 2-norm residual ``r(x) = |f(x) - x|``, and a history of up to ``memory`` accepted
    pairs ``(x_i, f(x_i))``. Each iteration evaluates ``f`` at one candidate ``z``:

    * normally the Anderson extrapolation of the history (``anderson_step``); it is
      accepted if ``r(z) <= ANDERSON_DECREASE * r(x)``; otherwise it is rejected, the
      history restarts from ``x`` and the next candidate is the plain step;
    * after a rejection (or with fewer than two points) the plain step ``z = f(x)``,
      always accepted.

    Convergence for any contraction with ``Lip(g) = L < 1``, whatever the extrapolations
    do: a plain step gives ``r(f(x)) = |f(f(x)) - f(x)| <= L r(x)``, an accepted
    extrapolation ``r(z) <= 0.9 r(x)``, and a rejection (no progress) is always followed by
    a plain step; so after ``E`` evaluations ``r <= max(L, 0.9)^{floor(E/2)} r(y)``. Where
    the extrapolations are accepted, each costs one evaluation; near the fixed point of a
    smooth contraction Anderson converges r-linearly at least as fast as the plain
    iteration (Toth & Kelley, 2015), and for linear maps with ``m`` past residuals it is
    equivalent to GMRES (Walker & Ni, 2011).

    An example stops once an evaluated point has ``max|f(z) - z| <= tol``; ``f(z)`` is
    returned and ``iterations`` counts evaluations of ``g``, as for the plain iteration.
    """
    batch = y.shape[0]
    shape = y.shape
    dtype = y.dtype
    if reg is None:
        reg = 100.0 * float(jnp.finfo(dtype).eps)
    flat = lambda a: a.reshape(batch, -1)
    f = lambda x: y - g(x)
    m = memory
    b = lambda mask, a: _bcast(mask, a)

    def push(xs, fs, slot, x_new, f_new, write):
        onehot = (jnp.arange(m) == slot[:, None]) & write[:, None]         # (b, m)
        xs = jnp.where(onehot[..., None], flat(x_new)[:, None, :], xs)
        fs = jnp.where(onehot[..., None], flat(f_new)[:, None, :], fs)
        return xs, fs

    def cond(state):
        k, done = state[0], state[9]
        return jnp.logical_and(k < max_iter, jnp.logical_not(jnp.all(done)))

    def body(state):
        k, x, fx, r2, xs, fs, count, plain_next, out, done, iters, res = state
        use_plain = jnp.logical_or(plain_next, count < 2)
        z_acc = anderson_step(xs, fs, jnp.minimum(count, m), reg).reshape(shape)
        z = jnp.where(b(use_plain, x), fx, z_acc)
        fz = f(z)
        step = fz - z
        rz2, rz_inf = _norm2(step), _max_abs(step)
        accept = jnp.logical_or(
            use_plain, jnp.logical_and(jnp.isfinite(rz2), rz2 <= ANDERSON_DECREASE * r2))
        converged_now = rz_inf <= tol + rtol * _max_abs(fz)
        active = jnp.logical_not(done)
        upd = jnp.logical_and(active, accept)
        # History: push the accepted pair, or restart from the current point.
        slot = jnp.where(accept, count % m, 0)
        hx = jnp.where(b(accept, x), z, x)
        hf = jnp.where(b(accept, x), fz, fx)
        xs, fs = push(xs, fs, slot, hx, hf, active)
        count = jnp.where(active, jnp.where(accept, count + 1, 1), count)
        plain_next = jnp.where(active, jnp.logical_not(accept), plain_next)
        x = jnp.where(b(upd, x), z, x)
        fx = jnp.where(b(upd, x), fz, fx)
        r2 = jnp.where(upd, rz2, r2)
        # What an example returns: f(z) if z converged, else the image of its best point.
        stop = jnp.logical_and(active, converged_now)
        out = jnp.where(b(active, x), jnp.where(b(converged_now, x), fz, fx), out)
        res = jnp.where(stop, rz_inf, jnp.where(upd, rz_inf, res))
        iters = jnp.where(active, k + 1, iters)
        done = jnp.logical_or(done, stop)
        return k + 1, x, fx, r2, xs, fs, count, plain_next, out, done, iters, res

    fy = f(y)
    step0 = fy - y
    zeros_hist = jnp.zeros((batch, m, flat(y).shape[1]), dtype)
    xs, fs = push(zeros_hist, zeros_hist, jnp.zeros((batch,), jnp.int32), y, fy,
                  jnp.ones((batch,), bool))
    res0 = _max_abs(step0)
    init = (jnp.ones((), jnp.int32), y, fy, _norm2(step0), xs, fs,
            jnp.ones((batch,), jnp.int32), jnp.zeros((batch,), bool), fy,
            res0 <= tol + rtol * _max_abs(fy),
            jnp.ones((batch,), jnp.int32), res0)
    state = lax.while_loop(cond, body, init)
    _, _, _, _, _, _, _, _, out, done, iters, res = state
    return out, FixedPointInfo(iters, res, done)


def _solve(g, y, tols, max_iter, method):
    """``tols = (tol, rtol)``: an example stops once its step is ``<= tol + rtol * max|x|``."""
    tol, rtol = tols
    if method == "plain":
        return _plain_solve(g, y, tol, max_iter, rtol=rtol)
    return _anderson_solve(g, y, tol, max_iter, rtol=rtol)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fixed_point(g, tols, max_iter, method, y, *consts):
    return _solve(lambda x: g(x, *consts), y, tols, max_iter, method)


def _fixed_point_fwd(g, tols, max_iter, method, y, *consts):
    x, info = _solve(lambda x: g(x, *consts), y, tols, max_iter, method)
    return (x, info), (x, consts)


def _fixed_point_bwd(g, tols, max_iter, method, res, cotangents):
    x, consts = res
    xbar = cotangents[0]
    # g's products carry the precision fixed when fixed_point converted it; their
    # transposes keep it.
    _, vjp_x = jax.vjp(lambda x_: g(x_, *consts), x)
    # Solve u = xbar - J_g^T u: a contraction like the forward problem (||J_g|| <=
    # Lip(g)), solved by the same method with per-example stopping.
    u, _ = _solve(lambda w: vjp_x(w)[0], xbar, tols, max_iter, method)
    _, vjp_fn = jax.vjp(lambda x_, *c: g(x_, *c), x, *consts)
    const_bars = vjp_fn(u)[1:]
    negate = lambda c: c if c.dtype == jax.dtypes.float0 else -c
    return (u,) + tuple(jax.tree.map(negate, c) for c in const_bars)


_fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def _raise_if_not_converged(converged, residual, iterations, max_iter, tol, rtol=0.0):
    if not bool(jnp.all(converged)):
        bad = int(jnp.sum(~jnp.asarray(converged)))
        worst = float(jnp.max(jnp.where(converged, -jnp.inf, residual)))
        test = (f"tol={tol:.3g}" if not rtol else
                f"tol + rtol * max|x| with tol={tol:.3g}, rtol={rtol:.3g}")
        raise FixedPointError(
            f"fixed-point inverse did not converge for {bad} example(s) within "
            f"max_iter={max_iter} (worst last step {worst:.3g} > {test}); the "
            "residual branch may not be a contraction (is every Lipschitz constant < 1?)")


def fixed_point(g: Callable[[Array], Array], y: Array, *, tol: float = 1e-6,
                max_iter: int = 100, checked: bool = False,
                method: str = "plain", rtol: float = 0.0) -> tuple[Array, FixedPointInfo]:
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
      method: ``"plain"`` (Algorithm 1) or ``"anderson"`` (safeguarded Anderson
        acceleration; one evaluation of ``g`` per iteration, per-example histories;
        converges for every contraction, see ``_anderson_solve``). The gradient's linear
        solve uses the same method.
      rtol: relative tolerance: an example also stops once its step is ``<= tol + rtol *
        max|x^{k+1}|``. Float32 steps cannot fall far below ``1.2e-7 * max|x|``, so for
        large activations an absolute ``tol`` alone may never be met; ``rtol=1e-6`` with
        ``tol=0`` adapts the test to each example's scale. The gradient's solve applies
        the same test to its own iterate.

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
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = jax.eval_shape(g, y)
    if out.shape != y.shape:
        raise ValueError(f"g must preserve the shape of its input: {y.shape} -> {out.shape}")
    with precision.exact_products():   # closure_convert fixes the products' precision
        g_conv, consts = jax.closure_convert(g, y)
    x, info = _fixed_point(g_conv, (float(tol), float(rtol)), int(max_iter), method, y,
                           *consts)
    info = FixedPointInfo(*(lax.stop_gradient(a) for a in info))
    if checked:
        if isinstance(info.converged, jax.core.Tracer):
            def callback(converged, residual, iterations):
                _raise_if_not_converged(converged, residual, iterations, max_iter, tol,
                                        rtol)
            jax.debug.callback(callback, info.converged, info.residual, info.iterations)
        else:
            _raise_if_not_converged(info.converged, info.residual, info.iterations,
                                    max_iter, tol, rtol)
    return x, info


def iterate(g: Callable[[Array], Array], y: Array, n_iter: int | Array) -> Array:
    """Exactly ``n_iter`` plain iterations ``x <- y - g(x)`` from ``x = y`` (no convergence
    test; ``n_iter`` may be traced, so one compiled program serves every count)."""
    with precision.exact_products():
        return lax.fori_loop(0, n_iter, lambda _, x: y - g(x), y)


@dataclasses.dataclass(frozen=True)
class InverseConfig:
    """The settings of a block's fixed-point inverse (``fixed_point``'s ``tol``, ``rtol``,
    ``max_iter`` and ``method``).

    Example:
      >>> x, info = InverseConfig(tol=1e-7)(lambda x: 0.5 * jnp.sin(x), jnp.ones((2, 3)))
    """
    tol: float = 1e-6
    rtol: float = 0.0
    max_iter: int = 100
    method: str = "plain"

    def __post_init__(self):
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ValueError(f"inverse max_iter must be an integer >= 1, got "
                             f"{self.max_iter!r}")
        if not self.tol >= 0:
            raise ValueError(f"inverse tol must be >= 0, got {self.tol!r}")
        if not self.rtol >= 0:
            raise ValueError(f"inverse rtol must be >= 0, got {self.rtol!r}")
        if self.method not in METHODS:
            raise ValueError(f"inverse method must be one of {METHODS}, got "
                             f"{self.method!r}")

    def __call__(self, g: Callable[[Array], Array], y: Array
                 ) -> tuple[Array, FixedPointInfo]:
        """``fixed_point(g, y)`` with these settings."""
        return fixed_point(g, y, tol=self.tol, max_iter=self.max_iter, method=self.method,
                           rtol=self.rtol)
