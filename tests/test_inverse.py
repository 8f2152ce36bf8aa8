"""Fixed-point inverse: round trips, Banach rate, implicit gradients, reporting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import digits_classifier, digits_density
from iresnet_jax import blocks, flow, inverse, layers, logdet, models


def _scaled(variables, factor):
    return {**variables, "params": jax.tree.map(lambda p: factor * p, variables["params"])}


def _block(kind, coeff):
    if kind == "mlp":
        branch = blocks.MLPBranch(hidden=(32, 32), coeff=coeff, leading_activation=True)
    else:
        branch = blocks.ConvBranch(hidden=16, coeff=coeff)
    return blocks.InvertibleBlock(branch, actnorm="before",
                                  logdet=logdet.LogDetConfig("none"),
                                  inverse_config=inverse.InverseConfig(max_iter=2000))


def _certify(model, variables, x):
    """Scale weights up (every constraint active), then converge the power iterations."""
    variables = _scaled(variables, 3.0)
    with layers.power_iterations(300):
        _, state = model.apply(variables, x, train=True, mutable=["spectral"])
    return {**variables, **state}


@pytest.mark.parametrize("coeff", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("kind", ["mlp", "conv", "stack"])
def test_round_trip_float32(kind, coeff):
    shape = (8, 6) if kind == "mlp" else (4, 6, 6, 3)
    x = jax.random.normal(jax.random.key(1), shape)
    model = _block("conv" if kind == "stack" else kind, coeff)
    if kind == "stack":
        model = flow.BlockStack(model, n=3)
    variables = _certify(model, model.init(jax.random.key(2), x), x)
    y, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    x_rec, inter = jax.jit(lambda v, y: model.apply(v, y, method="inverse",
                                                    mutable=["intermediates"]))(variables, y)
    err = float(jnp.max(jnp.abs(x_rec - x)))
    assert err <= 1e-5, err
    iters = np.concatenate([np.ravel(a) for p, a in jax.tree_util.tree_leaves_with_path(inter)
                            if "inverse_iterations" in jax.tree_util.keystr(p)])
    assert iters.min() >= 1
    assert iters.max() < 2000  # every example converged before the bound
    assert flow.inverse_report(inter["intermediates"])["not_converged"] == 0


@pytest.mark.parametrize("coeff", [0.5, 0.9, 0.99])
def test_iterations_follow_the_banach_rate(x64, coeff):
    # g(x) = L * tanh(A x) with ||A|| = 1: Lip(g) = L exactly at x = 0.
    a = jax.random.orthogonal(jax.random.key(3), 4, dtype=jnp.float64)
    g = lambda x: coeff * jnp.tanh(x @ a.T)
    y = 1e-3 * jax.random.normal(jax.random.key(4), (16, 4), jnp.float64)
    tol = 1e-10
    x, info = jax.jit(lambda y: inverse.fixed_point(g, y, tol=tol, max_iter=10000))(y)
    assert bool(jnp.all(info.converged))
    np.testing.assert_allclose(x + g(x), y, atol=10 * tol / (1 - coeff))
    # Step k is |x^k - x^{k-1}|_inf <= |.|_2 <= L^{k-1} |x^1 - x^0|_2 = L^{k-1} |g(y)|_2,
    # so it is below tol after at most k* = ceil(log(tol / |g(y)|_2) / log L) + 1.
    step0 = np.linalg.norm(np.asarray(g(y)), axis=1)
    bound = np.ceil(np.log(tol / step0) / math.log(coeff)) + 1
    iters = np.asarray(info.iterations)
    assert np.all(iters <= bound)
    # ... and not far below it: near 0 the rate is close to L (tanh' ~ 1).
    assert np.all(iters >= 0.5 * bound)
    assert np.all(np.asarray(info.residual) <= tol)


def test_gradient_of_inverse_matches_finite_differences(x64):
    w = 0.4 * jax.random.orthogonal(jax.random.key(5), 3, dtype=jnp.float64)
    b = jnp.array([0.1, -0.2, 0.3])
    y = jax.random.normal(jax.random.key(6), (2, 3), jnp.float64)
    c = jnp.array([1.0, -2.0, 0.5])

    def loss(w, b, y):
        g = lambda x: jnp.tanh(x @ w + b)
        x, _ = inverse.fixed_point(g, y, tol=1e-13, max_iter=500)
        return jnp.sum(jnp.sin(x) * c)

    grads = jax.grad(loss, argnums=(0, 1, 2))(w, b, y)
    eps = 1e-6
    for arg, grad in enumerate(grads):
        args = [w, b, y]
        flat = np.asarray(args[arg]).ravel()
        num = np.zeros_like(flat)
        for i in range(flat.size):
            plus, minus = flat.copy(), flat.copy()
            plus[i] += eps
            minus[i] -= eps
            a_p, a_m = list(args), list(args)
            a_p[arg] = jnp.asarray(plus.reshape(args[arg].shape))
            a_m[arg] = jnp.asarray(minus.reshape(args[arg].shape))
            num[i] = (loss(*a_p) - loss(*a_m)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grad).ravel(), num, rtol=1e-6, atol=1e-8)


def test_gradient_through_a_block_inverse_reaches_parameters(x64):
    model = _block("mlp", 0.9)
    x = jax.random.normal(jax.random.key(7), (3, 4), jnp.float64)
    variables = _certify(model, model.init(jax.random.key(8), x), x)
    y, _ = model.apply(variables, x)

    def loss(params):
        v = {**variables, "params": params}
        return jnp.sum(model.apply(v, y, method="inverse") ** 2)

    grads = jax.grad(loss)(variables["params"])
    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(9), p.shape,
                                                         p.dtype), variables["params"])
    eps = 1e-6
    plus = jax.tree.map(lambda p, d: p + eps * d, variables["params"], direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, variables["params"], direction)
    numeric = (loss(plus) - loss(minus)) / (2 * eps)
    analytic = sum(jnp.sum(g * d)
                   for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def test_non_convergence_is_reported_and_checked_mode_raises():
    g = lambda x: 2.0 * x   # expands: x^k = y - 2 x^{k-1} diverges unless y = 0
    y = jnp.array([[3.0, -4.0], [0.0, 0.0]])
    x, info = inverse.fixed_point(g, y, tol=1e-6, max_iter=50)
    assert not bool(info.converged[0])
    assert bool(info.converged[1])                   # y = 0 has the fixed point 0
    assert int(info.iterations[0]) == 50 and float(info.residual[0]) > 1e-6
    with pytest.raises(inverse.FixedPointError, match="did not converge for 1 example"):
        inverse.fixed_point(g, y, tol=1e-6, max_iter=50, checked=True)
    # With a relative tolerance the message names the test that was applied.
    with pytest.raises(inverse.FixedPointError, match=r"tol \+ rtol \* max\|x\| with "
                                                      r"tol=0, rtol=1e-06"):
        inverse.fixed_point(g, y, tol=0.0, rtol=1e-6, max_iter=50, checked=True)
    jitted = jax.jit(lambda y: inverse.fixed_point(g, y, tol=1e-6, max_iter=50,
                                                   checked=True)[0])
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(jitted(y))
    # A branch that produces NaN never counts as converged.
    _, info_nan = inverse.fixed_point(lambda x: x * jnp.nan, y, tol=1e-6, max_iter=5)
    assert not np.any(np.asarray(info_nan.converged))


def test_per_example_convergence_and_fixed_iteration_count():
    g = lambda x: 0.5 * jnp.tanh(x)
    y = jnp.array([[1e-3], [5.0]])
    _, info = inverse.fixed_point(g, y, tol=1e-7, max_iter=100)
    # Near 0 the rate is 0.5; at x ~ 4.5 tanh is flat and one example stops early.
    assert int(info.iterations[0]) > int(info.iterations[1])
    _, info20 = inverse.fixed_point(g, jnp.array([[1e-3], [0.5]]), tol=0.0, max_iter=20)
    assert np.all(np.asarray(info20.iterations) == 20)


@pytest.mark.parametrize("coeff", [0.5, 0.9, 0.99])
def test_anderson_reaches_the_same_solution(x64, coeff):
    a = jax.random.normal(jax.random.key(10), (6, 6), jnp.float64)
    a = a / jnp.linalg.norm(a, 2)
    g = lambda x: coeff * jnp.tanh(x @ a.T + 0.3)
    y = jax.random.normal(jax.random.key(11), (8, 6), jnp.float64)
    x_plain, info_plain = inverse.fixed_point(g, y, tol=1e-11, max_iter=5000)
    x_and, info_and = inverse.fixed_point(g, y, tol=1e-11, max_iter=5000, method="anderson")
    assert bool(jnp.all(info_and.converged))
    np.testing.assert_allclose(x_and, x_plain, atol=1e-9)
    np.testing.assert_allclose(x_and + g(x_and), y, atol=1e-9)
    # Honest reporting: a claimed convergence is a real one.
    g_bad = lambda x: 1.5 * jnp.sin(3 * x)
    _, info_bad = inverse.fixed_point(g_bad, y, tol=1e-8, max_iter=30, method="anderson")
    for conv, res in zip(np.asarray(info_bad.converged), np.asarray(info_bad.residual)):
        assert conv == (res <= 1e-8)


@pytest.mark.parametrize("method", ["plain", "anderson"])
def test_relative_tolerance_converges_where_float32_absolute_cannot(method):
    """Features of size ~1e4 in float32: steps often stall near ~1e-4, so an absolute
    tol of 1e-6 runs to max_iter and reports failure for some examples, while rtol=1e-6
    stops each example at its own scale with a relative error near float32 rounding."""
    a = jax.random.normal(jax.random.key(30), (6, 6))
    a = a / jnp.linalg.norm(a, 2)
    g = lambda x: 0.8 * x @ a.T
    y = 1e4 * jax.random.normal(jax.random.key(31), (5, 6))
    _, info_abs = inverse.fixed_point(g, y, tol=1e-6, max_iter=300, method=method)
    assert not bool(jnp.all(info_abs.converged))   # some stall at float32 rounding
    x, info = inverse.fixed_point(g, y, tol=0.0, rtol=1e-6, max_iter=300, method=method)
    assert bool(jnp.all(info.converged))
    assert int(jnp.max(info.iterations)) < 300
    exact = np.linalg.solve(np.eye(6) + 0.8 * np.asarray(a, np.float64),
                            np.asarray(y, np.float64).T).T
    rel = np.max(np.abs(np.asarray(x, np.float64) - exact), axis=-1) / np.max(
        np.abs(exact), axis=-1)
    assert np.all(rel < 2e-5)
    # The gradient's linear solve uses the same test and matches the dense solve.
    w = jax.random.normal(jax.random.key(32), (5, 6))
    grad = jax.grad(lambda y: jnp.sum(w * inverse.fixed_point(
        g, y, tol=0.0, rtol=1e-6, max_iter=300, method=method)[0]))(y)
    expected = np.linalg.solve(np.eye(6) + 0.8 * np.asarray(a, np.float64).T,
                               np.asarray(w, np.float64).T).T
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rtol"):
        inverse.fixed_point(g, y, rtol=-1.0)


def test_bad_arguments():
    g = lambda x: 0.5 * x
    with pytest.raises(ValueError, match="max_iter"):
        inverse.fixed_point(g, jnp.ones((2, 2)), max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        inverse.fixed_point(g, jnp.ones((2, 2)), tol=-1.0)
    with pytest.raises(ValueError, match="batch"):
        inverse.fixed_point(g, jnp.ones((2,)))
    with pytest.raises(ValueError, match="shape"):
        inverse.fixed_point(lambda x: x[:, :1], jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="method"):
        inverse.fixed_point(g, jnp.ones((2, 2)), method="newton")


@pytest.mark.parametrize("density", [True, False], ids=["digits_density", "digits_classifier"])
def test_image_models_pass_the_relative_tolerance_to_their_blocks(density):
    config = (digits_density if density else digits_classifier).get_config()
    kw = (dict(blocks_per_scale=(1, 1, 1), input_shape=(8, 8, 1)) if density
          else dict(stages=(1, 1, 1), num_classes=10))
    x = jax.random.uniform(jax.random.key(40), (3, 8, 8, 1), minval=-0.5, maxval=0.5)
    config.model.inverse.update(tol=0.0, rtol=1e-6)
    model = models.build(config.model, **kw)
    assert model.inverse_config.rtol == 1e-6
    variables = model.init({"params": jax.random.key(41), "logdet": jax.random.key(42)}, x)
    if density:
        z, _ = model.apply(variables, x, rngs={"logdet": jax.random.key(43)})
    else:
        z = model.apply(variables, x, method="features")
    x_rec, inter = model.apply(variables, z, method="inverse", mutable=["intermediates"])
    assert float(jnp.max(jnp.abs(x_rec - x))) < 1e-5
    iters = [np.asarray(a) for path, a in jax.tree_util.tree_leaves_with_path(inter)
             if "inverse_iterations" in jax.tree_util.keystr(path)]
    assert iters and max(int(a.max()) for a in iters) < 100   # stopped by the test
