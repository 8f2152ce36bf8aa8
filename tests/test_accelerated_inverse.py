"""The Anderson-accelerated inverse: same solutions as the plain iteration, fewer
evaluations where the plain iteration is slow, honest convergence reports, and the same
implicit gradients."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import blocks, flow, inverse, layers, logdet


def _hard_conv_branch(coeff, x):
    """A conv branch (width 4) whose last conv is the adjoint of the first: J_g is close
    to positive semi-definite with spectral radius near c^3, the plain iteration's worst
    case."""
    branch = blocks.ConvBranch(hidden=4, coeff=coeff)
    variables = jax.jit(branch.init)(jax.random.key(1), x)
    p = variables["params"]
    k0 = p["conv0"]["kernel"]
    params = {"conv0": {**p["conv0"], "kernel": 3.0 * k0},
              "conv1": {**p["conv1"], "kernel": 3.0 * jnp.eye(4, dtype=x.dtype)[None, None]},
              "conv2": {**p["conv2"], "kernel": 3.0 * jnp.transpose(k0[::-1, ::-1],
                                                                    (0, 1, 3, 2))}}
    with layers.power_iterations(300):
        _, state = jax.jit(lambda v: branch.apply(v, x, train=True, mutable=["spectral"]))(
            {"params": params, "spectral": variables["spectral"]})
    return branch.apply({"params": params, **state}, x, method="function")


@pytest.mark.parametrize("coeff", [0.5, 0.9, 0.99])
def test_anderson_matches_plain_on_a_conv_branch(x64, coeff):
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 2), jnp.float64)
    g = _hard_conv_branch(coeff, x)
    y = x + g(x)
    solve = jax.jit(
        lambda y, method: inverse.fixed_point(g, y, tol=1e-10, max_iter=3000, method=method),
        static_argnums=1)
    x_plain, info_plain = solve(y, "plain")
    x_and, info_and = solve(y, "anderson")
    assert bool(jnp.all(info_plain.converged)) and bool(jnp.all(info_and.converged))
    np.testing.assert_allclose(x_and, x_plain, atol=1e-8)
    np.testing.assert_allclose(x_and, x, atol=1e-8)
    plain_iters = np.asarray(info_plain.iterations)
    and_iters = np.asarray(info_and.iterations)
    if coeff >= 0.9:     # where the plain iteration is slow, Anderson is much faster
        assert np.all(and_iters <= 0.6 * plain_iters), (and_iters, plain_iters)
    else:
        assert np.all(and_iters <= plain_iters + 2), (and_iters, plain_iters)


def test_anderson_reports_only_real_convergence(x64):
    a = jax.random.orthogonal(jax.random.key(3), 5, dtype=jnp.float64)
    y = jax.random.normal(jax.random.key(4), (6, 5), jnp.float64)
    tol = 1e-9
    # A contraction: every claimed convergence is checked independently.
    g = lambda x: 0.95 * jnp.tanh(x @ a.T + 0.2)
    x_hat, info = inverse.fixed_point(g, y, tol=tol, max_iter=500, method="anderson")
    assert bool(jnp.all(info.converged))
    # |f(x_hat) - x_hat|_2 <= L |f(z) - z|_2 <= L sqrt(d) tol for x_hat = f(z).
    resid = np.abs(np.asarray(x_hat + g(x_hat) - y)).max(axis=1)
    assert np.all(resid <= 0.95 * math.sqrt(5) * tol)
    # Too few iterations: not converged, and the residual says why.
    _, info_short = inverse.fixed_point(g, y, tol=tol, max_iter=3, method="anderson")
    assert not np.any(np.asarray(info_short.converged))
    assert np.all(np.asarray(info_short.residual) > tol)
    assert np.all(np.asarray(info_short.iterations) == 3)
    # Not contractions. A claim of convergence must still be true of the returned point:
    # |f(x_hat) - x_hat| <= Lip(f) |f(z) - z|_2 with Lip(f) = Lip(g).
    for g_bad, lip in ((lambda x: 2.0 * x + 1.0, 2.0), (lambda x: 1.5 * jnp.sin(3 * x), 4.5)):
        x_bad, info_bad = inverse.fixed_point(g_bad, y, tol=tol, max_iter=40,
                                              method="anderson")
        conv = np.asarray(info_bad.converged)
        assert np.all(conv == (np.asarray(info_bad.residual) <= tol))
        resid = np.abs(np.asarray(x_bad + g_bad(x_bad) - y)).max(axis=1)
        assert np.all(resid[conv] <= lip * math.sqrt(5) * tol)
    _, info_nan = inverse.fixed_point(lambda x: x * jnp.nan, y, tol=tol, max_iter=10,
                                      method="anderson")
    assert not np.any(np.asarray(info_nan.converged))
    with pytest.raises(inverse.FixedPointError, match="did not converge"):
        inverse.fixed_point(g, y, tol=tol, max_iter=3, method="anderson", checked=True)


def test_anderson_stops_per_example():
    g = lambda x: 0.9 * jnp.tanh(x)
    y = jnp.array([[1e-4, 0.0], [3.0, -2.0], [0.5, 0.5]])
    _, info = inverse.fixed_point(g, y, tol=1e-6, max_iter=200, method="anderson")
    iters = np.asarray(info.iterations)
    assert bool(jnp.all(info.converged)) and len(set(iters.tolist())) > 1


def test_anderson_step_solves_a_linear_problem_with_full_history(x64):
    # For affine f with m >= d + 1 points, the extrapolation is the fixed point (GMRES).
    d = 3
    m_mat = 0.5 * jax.random.orthogonal(jax.random.key(5), d, dtype=jnp.float64)
    c = jnp.array([1.0, -1.0, 0.5])
    f = lambda x: x @ m_mat.T + c
    x_star = jnp.linalg.solve(jnp.eye(d) - m_mat, c)
    xs = [jnp.array([0.3, 0.2, -0.1])]
    for _ in range(d):
        xs.append(f(xs[-1]))
    xs_arr = jnp.stack(xs)[None]
    fs_arr = jax.vmap(f)(jnp.stack(xs))[None]
    z = inverse.anderson_step(xs_arr, fs_arr, d + 1, reg=0.0)
    np.testing.assert_allclose(z[0], x_star, atol=1e-9)
    # With a per-example count, invalid slots are ignored.
    z2 = inverse.anderson_step(jnp.concatenate([xs_arr, 5 + xs_arr]),
                               jnp.concatenate([fs_arr, fs_arr]),
                               jnp.array([d + 1, 1]), reg=0.0)
    np.testing.assert_allclose(z2[0], x_star, atol=1e-9)
    np.testing.assert_allclose(z2[1], fs_arr[0, 0], atol=1e-12)   # one point: plain step


def test_anderson_implicit_gradient_matches_plain(x64):
    w = 0.9 * jax.random.orthogonal(jax.random.key(6), 4, dtype=jnp.float64)
    w = w + 0.05 * jax.random.normal(jax.random.key(7), (4, 4), jnp.float64)
    w = 0.95 * w / jnp.linalg.norm(w, 2)
    y = jax.random.normal(jax.random.key(8), (3, 4), jnp.float64)
    c = jnp.array([1.0, -2.0, 0.5, 0.3])

    @functools.partial(jax.jit, static_argnums=2)
    def loss(w, y, method):
        x, _ = inverse.fixed_point(lambda x: jnp.tanh(x @ w), y, tol=1e-12, max_iter=5000,
                                   method=method)
        return jnp.sum(jnp.sin(x) * c)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_plain = grad(w, y, "plain")
    g_and = grad(w, y, "anderson")
    for a, b in zip(g_and, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    eps = 1e-6
    direction = jax.random.normal(jax.random.key(9), w.shape, jnp.float64)
    numeric = (loss(w + eps * direction, y, "anderson")
               - loss(w - eps * direction, y, "anderson")) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(g_and[0] * direction), numeric, rtol=1e-6)


def test_anderson_inverse_of_a_scanned_stack_under_jit(x64):
    block = blocks.InvertibleBlock(blocks.MLPBranch(hidden=(8,), coeff=0.9),
                                   logdet=logdet.LogDetConfig("none"),
                                   inverse_config=inverse.InverseConfig(
                                       tol=1e-10, max_iter=500, method="anderson"))
    model = flow.BlockStack(block, n=3)
    x = jax.random.normal(jax.random.key(10), (4, 3), jnp.float64)
    variables = jax.jit(model.init)(jax.random.key(11), x)
    y, _ = jax.jit(model.apply)(variables, x)

    def loss(params, y):
        x_rec = model.apply({**variables, "params": params}, y, method="inverse")
        return jnp.sum(x_rec ** 2), x_rec

    (_, x_rec), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"], y)
    np.testing.assert_allclose(x_rec, x, atol=1e-8)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))
