"""Residual Flows estimators against dense float64 Jacobians.

The Russian-roulette log-det estimator and the Neumann-series gradient (Chen et al., 2019):
their means over many draws equal the exact log-det and its exact gradient (with respect
to parameters and input) within 4 standard errors; they stay jit-compiled across draws;
they work inside ``nn.scan`` stacks; bad settings raise clear errors.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import blocks, flow, layers, logdet


def _branch(kind, coeff, x):
    """A spectrally normalized branch whose constraint is active; returns (branch, vars).

    The last linear map is (nearly) the adjoint of the first, so ``J_g`` has a large
    positive trace: the log-det, and the bias of a short truncated series, are large
    against the statistical resolution of the tests.
    """
    rng = np.random.default_rng(4)
    if kind == "mlp":
        branch = blocks.MLPBranch(hidden=(8,), coeff=coeff, leading_activation=True)
        k0 = rng.normal(size=(x.shape[-1], 8))
        kernels = {"dense0": k0, "dense1": k0.T}
    else:
        branch = blocks.ConvBranch(hidden=4, coeff=coeff)
        k0 = rng.normal(size=(3, 3, x.shape[-1], 4))
        kernels = {"conv0": k0, "conv1": np.eye(4)[None, None],
                   "conv2": k0[::-1, ::-1].transpose(0, 1, 3, 2)}
    variables = jax.jit(branch.init)(jax.random.key(3), x)
    params = {name: {"kernel": jnp.asarray(3.0 * k + 0.1 * rng.normal(size=k.shape)),
                     "bias": jnp.asarray(0.1 * rng.normal(size=variables["params"][name][
                         "bias"].shape))}
              for name, k in kernels.items()}
    variables = {"params": params, "spectral": variables["spectral"]}
    with layers.power_iterations(200):
        _, state = jax.jit(lambda v: branch.apply(v, x, train=True, mutable=["spectral"]))(
            variables)
    return branch, {"params": params, **state}


def _input(kind):
    shape = (3, 4) if kind == "mlp" else (2, 3, 3, 2)
    return jax.random.normal(jax.random.key(5), shape, jnp.float64)


def _over_keys(fn, keys):
    """``fn`` for every key, as ``lax.map`` in one compiled program.

    Not ``vmap``: a batched predicate turns the roulette's ``lax.cond`` into a select over
    batched operands (a per-draw conv kernel), which is far slower on CPU.
    """
    return jax.jit(lambda ks: jax.lax.map(fn, ks))(keys)


def _mean_se(samples):
    samples = np.asarray(samples)
    return samples.mean(0), samples.std(0, ddof=1) / math.sqrt(samples.shape[0])


def _assert_within(samples, target, n_se=4.0):
    mean, se = _mean_se(samples)
    target = np.asarray(target)
    z = np.abs(mean - target) / np.maximum(se, 1e-300)
    ok = (np.abs(mean - target) <= 1e-12) | (z <= n_se)
    assert np.all(ok), (float(z.max()), mean, target, se)
    return se


# --------------------------------------------------------------------------------------
# Russian roulette.


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_roulette_weights_have_unit_mean_and_prefix_support(distribution):
    kw = dict(n_exact=1, max_terms=8, distribution=distribution, geom_p=0.4,
              poisson_lambda=1.5)
    survival = logdet.roulette_survival(**kw)
    if distribution == "geometric":
        expected = [1.0] + [0.6 ** max(j - 1, 0) for j in range(1, 8)]
    else:
        cdf = np.cumsum([math.exp(-1.5) * 1.5 ** i / math.factorial(i) for i in range(60)])
        expected = [1.0] + [1.0 - (cdf[j - 1] if j >= 1 else 0.0) for j in range(1, 8)]
    np.testing.assert_allclose(survival, expected, rtol=1e-12)
    keys = jax.random.split(jax.random.key(6), 40000)
    draw = jax.jit(jax.vmap(lambda k: logdet.roulette_weights(k, dtype=jnp.float32, **kw)[0]))
    m = np.asarray(draw(keys), np.float64)
    kept = m != 0
    assert np.all(kept[:, :-1] >= kept[:, 1:])          # a prefix of terms is kept
    assert np.all(kept[:, 0])                            # n_exact = 1 term always
    assert len(np.unique(kept.sum(1))) >= 4              # N really varies between draws
    tol = 4 * np.sqrt(survival * (1 - survival) / len(keys)) + 1e-12
    assert np.all(np.abs(kept.mean(0) - survival) <= tol), (kept.mean(0), survival)
    _assert_within(m, np.ones(8))                       # E[m_k] = 1
    n_always = logdet.roulette_weights(keys[0], **kw)[1]
    assert n_always == (1 if distribution == "poisson" else 2)
    assert logdet.expected_terms(**kw) == pytest.approx(survival.sum(), rel=1e-6)


@pytest.mark.parametrize("kind,distribution,probe,mode", [
    ("mlp", "geometric", "gaussian", "vjp"),
    ("mlp", "poisson", "rademacher", "jvp"),
    ("conv", "geometric", "gaussian", "vjp"),
])
def test_roulette_mean_equals_exact_logdet(x64, kind, distribution, probe, mode):
    x = _input(kind)
    branch, variables = _branch(kind, 0.7, x)
    g = branch.apply(variables, x, method="function")
    exact = np.asarray(logdet.exact(g, x))
    max_terms = 16 if kind == "mlp" else 10
    kw = dict(n_exact=1, max_terms=max_terms, distribution=distribution, geom_p=0.5,
              poisson_lambda=2.0, probe=probe, mode=mode)
    keys = jax.random.split(jax.random.key(7), 4000)
    est = _over_keys(lambda k: logdet.russian_roulette(g, x, k, **kw), keys)
    se = _assert_within(est, exact)
    # The static maximum's truncation is far below the statistical resolution.
    _, jac = logdet.jacobian(g, x)
    truncated = np.asarray(logdet.exact_series(jac, max_terms))
    assert np.all(np.abs(truncated - exact) < 0.05 * se)


def test_roulette_is_traced_once_for_all_draws():
    x = jax.random.normal(jax.random.key(8), (4, 3))
    g = lambda z: 0.5 * jnp.tanh(z)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def estimate(key):
        return logdet.russian_roulette(g, x, key, n_exact=1, max_terms=12)

    values = [np.asarray(estimate(jax.random.key(i))) for i in range(12)]
    assert len({v.tobytes() for v in values}) == 12
    # Same key, same draw: reproducible.
    np.testing.assert_array_equal(estimate(jax.random.key(3)), values[3])


# --------------------------------------------------------------------------------------
# The Neumann-series gradient.


def _grad_samples(branch, variables, x, keys, weights, **kw):
    """Per-draw gradients of sum_b weights_b * logdet_b w.r.t. (params, x)."""
    method = kw.pop("method")

    def loss(params, x, key):
        g = branch.apply({**variables, "params": params}, x, method="function")
        if method == "series":
            ld = logdet.power_series(g, x, key, gradient="neumann", **kw)
        else:
            ld = logdet.russian_roulette(g, x, key, gradient="neumann", **kw)
        return jnp.sum(weights * ld)

    grad = jax.grad(loss, argnums=(0, 1))
    return _over_keys(lambda k: grad(variables["params"], x, k), keys)


@pytest.mark.parametrize("kind,method,kw", [
    ("mlp", "series", dict(n_terms=16)),
    ("mlp", "roulette", dict(n_exact=1, max_terms=16, probe="rademacher")),
    ("mlp", "series", dict(n_terms=16, mode="jvp", n_samples=2)),
    ("conv", "roulette", dict(n_exact=2, max_terms=10)),
])
def test_neumann_gradient_mean_equals_exact_gradient(x64, kind, method, kw):
    x = _input(kind)
    branch, variables = _branch(kind, 0.7, x)
    # A non-uniform per-example weighting: the gradient must not assume a plain mean.
    weights = jnp.linspace(1.0, -2.0, x.shape[0])

    def exact_loss(params, x):
        g = branch.apply({**variables, "params": params}, x, method="function")
        return jnp.sum(weights * logdet.exact(g, x))

    target = jax.grad(exact_loss, argnums=(0, 1))(variables["params"], x)
    keys = jax.random.split(jax.random.key(9), 3000 if kind == "mlp" else 1500)
    samples = _grad_samples(branch, variables, x, keys, weights, method=method, **kw)
    assert max(float(jnp.max(jnp.abs(t))) for t in jax.tree.leaves(target)) > 0.1
    for sample, exact in zip(jax.tree.leaves(samples), jax.tree.leaves(target)):
        _assert_within(sample, exact)


def test_neumann_gradient_targets_the_truncated_series(x64):
    """With few terms the Neumann gradient is unbiased for the gradient of the n-term
    series (the quantity whose value the forward pass estimates), not of the log-det."""
    x = _input("mlp")
    branch, variables = _branch("mlp", 0.9, x)
    weights = jnp.array([0.5, 1.0, 2.0])
    n_terms = 2

    def series_loss(params, x):
        g = branch.apply({**variables, "params": params}, x, method="function")
        return jnp.sum(weights * logdet.exact_series(logdet.jacobian(g, x)[1], n_terms))

    target = jax.grad(series_loss, argnums=(0, 1))(variables["params"], x)
    keys = jax.random.split(jax.random.key(10), 3000)
    samples = _grad_samples(branch, variables, x, keys, weights, method="series",
                            n_terms=n_terms)
    for sample, exact in zip(jax.tree.leaves(samples), jax.tree.leaves(target)):
        _assert_within(sample, exact)


@pytest.mark.parametrize("mode,n_samples", [("vjp", 1), ("jvp", 2)])
def test_neumann_forward_value_is_the_series_estimate(x64, mode, n_samples):
    """The Neumann gradient's forward pass forms term k as <w_{k-1}, P v> from its
    linearization's P v (one product fewer than the plain chain): the same value."""
    x = _input("mlp")
    branch, variables = _branch("mlp", 0.9, x)
    g = branch.apply(variables, x, method="function")
    key = jax.random.key(11)
    for fn, kw in ((logdet.power_series, dict(n_terms=6, mode=mode, n_samples=n_samples)),
                   (logdet.power_series, dict(n_terms=1, mode=mode, n_samples=n_samples)),
                   (logdet.russian_roulette, dict(max_terms=10, mode=mode,
                                                  n_samples=n_samples)),
                   (logdet.russian_roulette, dict(max_terms=12, n_exact=0, mode=mode,
                                                  distribution="poisson"))):
        plain = fn(g, x, key, **kw)
        neumann = fn(g, x, key, gradient="neumann", **kw)
        np.testing.assert_allclose(neumann, plain, rtol=1e-12)
        # ... also the value seen while differentiating (the custom_vjp's forward pass).
        value, _ = jax.value_and_grad(
            lambda z: jnp.sum(fn(g, z, key, gradient="neumann", **kw)))(x)
        np.testing.assert_allclose(value, jnp.sum(plain), rtol=1e-12)


def test_neumann_in_a_scanned_stack_under_jit(x64):
    x = jax.random.normal(jax.random.key(12), (3, 3), jnp.float64)

    def stack(cfg, remat=False):
        block = blocks.InvertibleBlock(
            blocks.MLPBranch(hidden=(8,), coeff=0.7, leading_activation=True,
                             activation="lipswish"),   # learnable beta: params in g
            actnorm="after", logdet=cfg)
        return flow.BlockStack(block, n=2, remat=remat)

    exact_model = stack(logdet.LogDetConfig("exact"))
    variables = jax.jit(exact_model.init)(jax.random.key(13), x)
    rng = np.random.default_rng(14)
    params = jax.tree.map(lambda p: p + 0.5 * rng.normal(size=p.shape), variables["params"])
    variables = {**variables, "params": params}
    weights = jnp.array([1.0, 0.3, -2.0])

    def loss_fn(model):
        def loss(params, x, key):
            (y, ld), _ = model.apply({**variables, "params": params}, x, train=True,
                                     mutable=["spectral"], rngs={"logdet": key})
            return jnp.sum(weights * (ld - 0.5 * jnp.sum(y ** 2, axis=-1)))
        return loss

    target = jax.grad(loss_fn(exact_model), argnums=(0, 1))(params, x, jax.random.key(0))
    cfg = logdet.LogDetConfig("roulette", n_exact=1, max_terms=14, gradient="neumann")
    grad = jax.grad(loss_fn(stack(cfg)), argnums=(0, 1))
    keys = jax.random.split(jax.random.key(15), 2000)
    samples = _over_keys(lambda k: grad(params, x, k), keys)
    for sample, exact in zip(jax.tree.leaves(samples), jax.tree.leaves(target)):
        _assert_within(sample, exact)
    # Rematerialized blocks give the same gradient draw for draw.
    grad_remat = jax.jit(jax.grad(loss_fn(stack(cfg, remat=True)), argnums=(0, 1)))
    for i in (0, 1):
        for a, b in zip(jax.tree.leaves(grad_remat(params, x, keys[i])),
                        jax.tree.leaves(jax.tree.map(lambda s: s[i], samples))):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_neumann_memory_does_not_grow_with_the_number_of_terms():
    x = jax.random.normal(jax.random.key(16), (256, 16))
    branch = blocks.MLPBranch(hidden=(64, 64), coeff=0.9, leading_activation=True)
    variables = jax.jit(branch.init)(jax.random.key(17), x)

    def temp_bytes(n_terms, gradient):
        def loss(params, x):
            g = branch.apply({**variables, "params": params}, x, method="function")
            return jnp.mean(logdet.power_series(g, x, jax.random.key(0), n_terms=n_terms,
                                                gradient=gradient))
        compiled = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile()
        mem = compiled.memory_analysis()
        if mem is None:
            pytest.skip("this backend has no memory analysis")
        return mem.temp_size_in_bytes

    auto = [temp_bytes(n, "autodiff") for n in (2, 8)]
    neumann = [temp_bytes(n, "neumann") for n in (2, 8)]
    input_bytes, hidden_bytes = 256 * 16 * 4, 256 * 64 * 4
    # Differentiating through the series keeps activations for every term ...
    assert auto[1] - auto[0] >= 6 * 2 * hidden_bytes
    # ... the Neumann gradient at most one input-sized buffer per term (XLA:CPU fuses the
    # sum forming the Neumann vector, keeping the w_k until it is formed).
    assert neumann[1] - neumann[0] <= 6 * input_bytes
    assert neumann[1] < auto[1] / 2


# --------------------------------------------------------------------------------------
# Configuration and errors.


def test_config_selects_estimator_and_gradient(x64):
    x = _input("mlp")
    g = lambda z: 0.4 * jnp.tanh(z)
    key = jax.random.key(18)
    cfg = logdet.LogDetConfig("roulette", n_exact=1, max_terms=12, gradient="neumann")
    assert cfg.needs_rng
    assert cfg.expected_terms == pytest.approx(logdet.expected_terms(n_exact=1,
                                                                     max_terms=12))
    gx, ld = cfg(g, x, key)
    np.testing.assert_allclose(gx, g(x))
    np.testing.assert_allclose(ld, logdet.russian_roulette(g, x, key, n_exact=1,
                                                           max_terms=12), rtol=1e-12)
    assert logdet.LogDetConfig("series", n_terms=7).expected_terms == 7


def test_bad_parameters_raise_clear_errors():
    g, x, key = (lambda z: 0.5 * z), jnp.ones((2, 2)), jax.random.key(0)
    cases = [
        (dict(distribution="uniform"), "distribution"),
        (dict(geom_p=0.0), "geom_p"),
        (dict(geom_p=1.0), "geom_p"),
        (dict(distribution="poisson", poisson_lambda=0.0), "poisson_lambda"),
        (dict(distribution="poisson", poisson_lambda=float("inf")), "poisson_lambda"),
        (dict(n_exact=-1), "n_exact"),
        (dict(n_exact=1.5), "n_exact"),
        (dict(n_exact=5, max_terms=4), "max_terms"),
        (dict(max_terms=0, n_exact=0), "max_terms"),
        (dict(gradient="implicit"), "gradient"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            logdet.russian_roulette(g, x, key, **kw)
        with pytest.raises(ValueError, match=match):
            logdet.LogDetConfig("roulette", **kw)
    with pytest.raises(ValueError, match="gradient"):
        logdet.power_series(g, x, key, n_terms=3, gradient="backprop")
    with pytest.raises(ValueError, match="coefficients"):
        logdet.power_series(g, x, key, n_terms=2, coefficients=[1.0, -0.5],
                            gradient="neumann")
    for method in ("exact", "none"):
        with pytest.raises(ValueError, match="gradient='neumann' needs method"):
            logdet.LogDetConfig(method, gradient="neumann")
    with pytest.raises(ValueError, match="probe"):
        logdet.LogDetConfig("roulette", probe="uniform")
