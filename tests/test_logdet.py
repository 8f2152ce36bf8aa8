"""Log-determinants against dense float64 linear algebra."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import blocks, flow, layers, logdet


def _branch(kind, coeff, x, n_power_iter=300):
    """A spectrally normalized branch with converged power iteration, as a pure g."""
    if kind == "mlp":
        branch = blocks.MLPBranch(hidden=(16, 16), coeff=coeff, leading_activation=True)
    else:
        branch = blocks.ConvBranch(hidden=6, coeff=coeff)
    variables = branch.init(jax.random.key(11), x)
    # Scale weights up so that every layer's constraint is active (Lip(g) close to c^3).
    variables = {"params": jax.tree.map(lambda p: 3.0 * p, variables["params"]),
                 "spectral": variables["spectral"]}
    with layers.power_iterations(n_power_iter):
        _, state = branch.apply(variables, x, train=True, mutable=["spectral"])
    variables = {"params": variables["params"], **state}
    g = branch.apply(variables, x, method="function")
    return g, variables


def _dense_jacobian(g, x):
    """Per-example Jacobian by jax.jacfwd on single examples (independent of the library)."""
    single = lambda xi: g(xi[None])[0].ravel()
    jac = jax.jit(jax.vmap(jax.jacfwd(single)))(x)
    return jac.reshape(x.shape[0], jac.shape[1], -1)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_exact_equals_slogdet(x64, kind):
    shape = (3, 4) if kind == "mlp" else (2, 4, 4, 2)
    x = jax.random.normal(jax.random.key(12), shape, jnp.float64)
    g, _ = _branch(kind, 0.9, x)
    jac = np.asarray(_dense_jacobian(g, x))
    expected = [np.linalg.slogdet(np.eye(j.shape[0]) + j)[1] for j in jac]
    np.testing.assert_allclose(jax.jit(lambda z: logdet.exact(g, z))(x), expected,
                               rtol=1e-10, atol=1e-12)
    _, jac_lib = jax.jit(lambda z: logdet.jacobian(g, z))(x)
    np.testing.assert_allclose(jac_lib, jac, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hidden,leading", [((8,), True), ((8, 8), False), ((8, 8, 8), False)])
def test_fused_mlp_value_and_jacobian_matches_jacfwd(x64, hidden, leading):
    """The MLP branch's fused forward-mode pass (the toy models' exact log-det) against
    per-example ``jax.jacfwd`` in float64, for 2-D inputs as in the toy densities."""
    branch = blocks.MLPBranch(hidden=hidden, coeff=0.9, leading_activation=leading)
    x = jax.random.normal(jax.random.key(21), (5, 2), jnp.float64)
    variables = branch.init(jax.random.key(22), x)
    g = branch.apply(variables, x, method="function")
    value, jac = jax.jit(g.value_and_jacobian)(x)
    np.testing.assert_allclose(value, g(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jac, _dense_jacobian(g, x), rtol=1e-10, atol=1e-13)


def test_exact_two_dimensional_closed_form(x64):
    w = jnp.array([[0.3, -0.4], [0.2, 0.1]], jnp.float64)
    g = lambda x: jnp.tanh(x @ w.T)
    x = jax.random.normal(jax.random.key(13), (5, 2), jnp.float64)
    jac = np.asarray(_dense_jacobian(g, x))
    expected = [np.linalg.slogdet(np.eye(2) + j)[1] for j in jac]
    np.testing.assert_allclose(logdet.exact(g, x), expected, rtol=1e-12)


@pytest.mark.parametrize("mode,probe", [("vjp", "gaussian"), ("jvp", "gaussian"),
                                        ("vjp", "rademacher")])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_power_series_unbiased_for_truncated_series(x64, kind, mode, probe):
    shape = (2, 4) if kind == "mlp" else (2, 3, 3, 2)
    x = jax.random.normal(jax.random.key(14), shape, jnp.float64)
    g, _ = _branch(kind, 0.9, x)
    n_terms = 4
    target = np.asarray(logdet.exact_series(_dense_jacobian(g, x), n_terms))
    n_rep = 2000
    keys = jax.random.split(jax.random.key(15), n_rep)
    est = jax.jit(jax.vmap(lambda k: logdet.power_series(
        g, x, k, n_terms=n_terms, probe=probe, mode=mode)))(keys)
    est = np.asarray(est)
    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(n_rep)
    assert np.all(np.abs(mean - target) <= 4 * se), (mean, target, se)
    # Averaging probes inside the estimator reduces the variance as 1/n_samples.
    est8 = jax.jit(jax.vmap(lambda k: logdet.power_series(
        g, x, k, n_terms=n_terms, n_samples=8, probe=probe, mode=mode)))(keys[:500])
    est8 = np.asarray(est8)
    se8 = est8.std(0, ddof=1) / math.sqrt(500)
    assert np.all(np.abs(est8.mean(0) - target) <= 4 * se8)
    assert np.all(est8.std(0) < 0.6 * est.std(0))


def test_vjp_and_jvp_agree_for_the_same_probe(x64):
    x = jax.random.normal(jax.random.key(16), (3, 5), jnp.float64)
    g, _ = _branch("mlp", 0.8, x)
    k = jax.random.key(17)
    a = logdet.power_series(g, x, k, n_terms=6, mode="vjp")
    b = logdet.power_series(g, x, k, n_terms=6, mode="jvp")
    np.testing.assert_allclose(a, b, rtol=1e-10)  # v^T J^k v == (J^k v)^T v


@pytest.mark.parametrize("kind,n_terms,n_samples", [("conv", 5, 1), ("conv", 4, 3),
                                                    ("mlp", 7, 1)])
def test_split_mode_has_the_value_and_gradient_of_vjp_mode(x64, kind, n_terms, n_samples):
    """``mode="split"`` pairs ``v^T J^a`` with ``J^b v``: for the same probes its estimate
    is ``v^T J^k v`` term by term, so value and gradient (parameters and input) must equal
    those of the single chain of vector-Jacobian products in float64."""
    shape = (3, 5) if kind == "mlp" else (2, 4, 4, 2)
    x = jax.random.normal(jax.random.key(31), shape, jnp.float64)
    if kind == "mlp":
        branch = blocks.MLPBranch(hidden=(8, 8), coeff=0.9, leading_activation=True)
    else:
        branch = blocks.ConvBranch(hidden=6, coeff=0.9)
    variables = branch.init(jax.random.key(32), x)
    weights = jnp.linspace(1.0, -2.0, x.shape[0])
    key = jax.random.key(33)

    def loss(params, x, mode):
        g = branch.apply({**variables, "params": params}, x, method="function")
        return jnp.sum(weights * logdet.power_series(g, x, key, n_terms=n_terms,
                                                     n_samples=n_samples, mode=mode))

    grads = {m: jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, m), argnums=(0, 1)))(
        variables["params"], x) for m in ("vjp", "split")}
    (value_vjp, grad_vjp), (value_split, grad_split) = grads["vjp"], grads["split"]
    assert abs(float(value_vjp)) > 1e-3
    np.testing.assert_allclose(value_split, value_vjp, rtol=1e-11)
    for a, b in zip(jax.tree.leaves(grad_split), jax.tree.leaves(grad_vjp)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(b))))
    # Custom coefficients go through the same pairing.
    g = branch.apply(variables, x, method="function")
    coefficients = [0.3, -1.2, 0.7, 2.0, -0.4, 0.1, 1.5][:n_terms]
    est = {m: logdet.power_series(g, x, key, n_terms=n_terms, n_samples=n_samples, mode=m,
                                  coefficients=coefficients, with_output=True)
           for m in ("vjp", "split")}
    np.testing.assert_allclose(est["split"][0], est["vjp"][0], rtol=1e-13)
    np.testing.assert_allclose(est["split"][1], est["vjp"][1], rtol=1e-11)


def test_split_mode_rejects_what_it_cannot_compute():
    g = lambda x: 0.5 * jnp.tanh(x)
    x = jnp.ones((2, 3))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="split.*gradient='autodiff'"):
        logdet.power_series(g, x, key, n_terms=4, mode="split", gradient="neumann")
    with pytest.raises(ValueError, match="split.*roulette"):
        logdet.russian_roulette(g, x, key, mode="split")
    with pytest.raises(ValueError, match="split.*gradient='autodiff'"):
        logdet.LogDetConfig("series", mode="split", gradient="neumann")
    with pytest.raises(ValueError, match="split.*roulette"):
        logdet.LogDetConfig("roulette", mode="split")
    with pytest.raises(ValueError, match="linear_maps"):
        logdet.linear_map(g, x, "split")
    with pytest.raises(ValueError, match="mode must be one of"):
        logdet.power_series(g, x, key, n_terms=4, mode="both")
    # The estimator itself works through the config, as the blocks call it.
    gx, ld = logdet.LogDetConfig("series", n_terms=4, mode="split")(g, x, key)
    np.testing.assert_allclose(ld, logdet.power_series(g, x, key, n_terms=4), rtol=1e-5)
    np.testing.assert_allclose(gx, g(x))


@pytest.mark.parametrize("coeff", [0.5, 0.9])
def test_series_error_within_theorem3_bound(x64, coeff):
    x = jax.random.normal(jax.random.key(18), (4, 3), jnp.float64)
    branch = blocks.MLPBranch(hidden=(8, 8), coeff=coeff, leading_activation=True)
    variables = branch.init(jax.random.key(19), x)
    variables = {"params": jax.tree.map(lambda p: 4.0 * p, variables["params"]),
                 "spectral": variables["spectral"]}
    with layers.power_iterations(500):
        _, state = branch.apply(variables, x, train=True, mutable=["spectral"])
    variables = {"params": variables["params"], **state}
    g = branch.apply(variables, x, method="function")
    # Certify Lip(g) by the exact norms of the effective weight matrices (ELU is 1-Lip).
    weights = branch.apply(variables, x, method="effective_weights")
    lip = math.prod(np.linalg.norm(np.asarray(w), 2) for w, _ in weights)
    assert lip <= coeff ** 3 * (1 + 1e-6)
    jac = _dense_jacobian(g, x)
    exact = np.asarray(logdet.exact(g, x))
    for n in (1, 2, 3, 5, 8):
        err = np.abs(np.asarray(logdet.exact_series(jac, n)) - exact)
        bound = logdet.bias_bound(lip, x.shape[1], n)
        assert np.all(err <= bound), (n, err, bound)
    assert logdet.bias_bound(lip, 3, 8) < logdet.bias_bound(lip, 3, 2)


def test_bias_bound_closed_form_and_terms_for_bias():
    lip, d = 0.9, 10
    for n in (0, 1, 5, 20):
        closed = -d * (math.log(1 - lip) + sum(lip ** k / k for k in range(1, n + 1)))
        assert logdet.bias_bound(lip, d, n) == pytest.approx(closed, rel=1e-9)
    n = logdet.terms_for_bias(lip, d, 1e-3)
    assert logdet.bias_bound(lip, d, n) <= 1e-3 < logdet.bias_bound(lip, d, n - 1)
    assert logdet.terms_for_bias(0.5, 784, 1e-4 * 784 * math.log(2)) == next(
        k for k in range(1, 200)
        if logdet.bias_bound(0.5, 784, k) <= 1e-4 * 784 * math.log(2))
    np.testing.assert_allclose(logdet.bias_bound(np.array([0.1, 0.5]), 2, 3),
                               [logdet.bias_bound(0.1, 2, 3), logdet.bias_bound(0.5, 2, 3)])


def test_lemma7_bounds_hold_for_a_multiblock_flow(x64):
    coeff, n_blocks = 0.8, 3
    block = blocks.InvertibleBlock(
        blocks.MLPBranch(hidden=(8,), coeff=coeff, leading_activation=True),
        actnorm=None, logdet=logdet.LogDetConfig("exact"))
    model = flow.BlockStack(block, n=n_blocks)
    x = 2.0 * jax.random.normal(jax.random.key(20), (16, 3), jnp.float64)
    variables = model.init(jax.random.key(21), x)
    variables = {"params": jax.tree.map(lambda p: 5.0 * p, variables["params"]),
                 "spectral": variables["spectral"]}
    with layers.power_iterations(500):
        _, state = model.apply(variables, x, train=True, mutable=["spectral"])
    variables = {"params": variables["params"], **state}
    y, ld = model.apply(variables, x)
    jac = _dense_jacobian(lambda z: model.apply(variables, z)[0], x)
    np.testing.assert_allclose(ld, [np.linalg.slogdet(np.asarray(j))[1] for j in jac],
                               rtol=1e-9)
    lo, hi = logdet.lemma7_bounds([coeff ** 2] * n_blocks, dim=3)
    assert np.all(np.asarray(ld) >= lo) and np.all(np.asarray(ld) <= hi)
    assert np.ptp(np.asarray(ld)) > 0.01  # the log-det varies with x: a real check


@pytest.mark.parametrize("n_terms", [0, -1, 2.5])
def test_bad_series_arguments(n_terms):
    g = lambda x: 0.5 * x
    with pytest.raises(ValueError, match="n_terms"):
        logdet.power_series(g, jnp.ones((2, 2)), jax.random.key(0), n_terms=n_terms)
    with pytest.raises(ValueError, match="n_terms"):
        logdet.LogDetConfig("series", n_terms=n_terms)


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="probe"):
        logdet.power_series(lambda x: x, jnp.ones((2, 2)), jax.random.key(0), n_terms=2,
                            probe="uniform")
    with pytest.raises(ValueError, match="mode"):
        logdet.power_series(lambda x: x, jnp.ones((2, 2)), jax.random.key(0), n_terms=2,
                            mode="fwd")
    with pytest.raises(ValueError, match="same shape"):
        logdet.exact(lambda x: x[:, :1], jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        logdet.bias_bound(1.2, 4, 3)
    with pytest.raises(ValueError, match="method"):
        logdet.LogDetConfig("magic")
