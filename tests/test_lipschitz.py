"""Spectral normalization on the true convolution operator, and its certificates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import conv, layers, lipschitz


def _circular_dense_matrix(kernel, n, m):
    c_in = kernel.shape[2]
    d = n * m * c_in
    basis = jnp.eye(d, dtype=kernel.dtype).reshape(d, n, m, c_in)
    return conv.conv2d(basis, kernel, padding="CIRCULAR").reshape(d, -1)


def test_operator_norm_dense_matches_svd(x64):
    w = jax.random.normal(jax.random.key(1), (7, 5), jnp.float64)
    sigma, u = lipschitz.dense_norm(w, jnp.ones(7), 300)
    np.testing.assert_allclose(sigma, np.linalg.svd(np.asarray(w), compute_uv=False)[0],
                               rtol=1e-8)
    assert u.shape == (7,)


@pytest.mark.parametrize("shape", [(5, 5, 2, 3), (3, 3, 4, 4), (1, 1, 3, 2)])
def test_fft_singular_values_match_dense_circular_operator(x64, shape):
    kernel = jax.random.normal(jax.random.key(2), shape, jnp.float64)
    n, m = 6, 7
    sv_fft = np.sort(np.asarray(lipschitz.conv_singular_values(kernel, (n, m))).ravel())
    sv_dense = np.linalg.svd(np.asarray(_circular_dense_matrix(kernel, n, m)),
                             compute_uv=False)
    sv_dense = np.sort(sv_dense)[-sv_fft.size:]
    np.testing.assert_allclose(sv_fft, sv_dense, rtol=1e-9, atol=1e-9)


def test_conv_power_iteration_is_operator_norm(x64):
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 2, 4), jnp.float64)
    u0 = jnp.ones((1, 5, 5, 2))
    sigma, _ = lipschitz.conv_norm(kernel, u0, 1000)
    dense = np.asarray(conv.conv_dense_matrix(kernel, (5, 5)))
    np.testing.assert_allclose(sigma, np.linalg.svd(dense, compute_uv=False)[0], rtol=1e-6)


def _normalized_kernel(padding, coeff, x):
    conv = layers.SpectralConv(4, (3, 3), coeff=coeff, padding=padding,
                                  init_power_iter=0)
    variables = conv.init(jax.random.key(4), x)
    # Scale the kernel up so that the constraint is active.
    variables = {"params": jax.tree.map(lambda p: 5.0 * p, variables["params"]),
                 "spectral": variables["spectral"]}
    with layers.power_iterations(2000):
        _, state = conv.apply(variables, x, train=True, mutable=["spectral"])
    variables = {"params": variables["params"], **state}
    kernel, _ = conv.apply(variables, x, method="weights")
    return kernel, variables


@pytest.mark.parametrize("coeff", [0.5, 0.9])
def test_normalized_conv_true_operator_norm_below_coeff(x64, coeff):
    x = jnp.zeros((1, 6, 6, 3), jnp.float64)
    # Zero padding: the exact norm from the dense matrix of the operator.
    kernel, _ = _normalized_kernel("SAME", coeff, x)
    dense = np.asarray(conv.conv_dense_matrix(kernel, (6, 6)))
    true_norm = np.linalg.svd(dense, compute_uv=False)[0]
    assert true_norm <= coeff * (1 + 1e-3)
    assert true_norm >= coeff * (1 - 1e-3)  # the constraint is active, not trivially met
    # Circular padding: the exact norm from the FFT singular values.
    kernel_c, _ = _normalized_kernel("CIRCULAR", coeff, x)
    fft_norm = float(lipschitz.conv_singular_values(kernel_c, (6, 6)).max())
    assert fft_norm <= coeff * (1 + 1e-3)
    assert fft_norm >= coeff * (1 - 1e-3)


def test_reshaped_kernel_norm_does_not_bound_operator(x64):
    # A smooth (all-positive) kernel: normalizing its reshaped matrix to c leaves the
    # convolution operator far above c.
    kernel = jnp.ones((3, 3, 1, 1), jnp.float64)
    coeff = 0.9
    reshaped = lipschitz.reshaped_kernel_norm(kernel)
    k_reshaped = kernel * coeff / reshaped
    dense = np.asarray(conv.conv_dense_matrix(k_reshaped, (8, 8)))
    op_norm = np.linalg.svd(dense, compute_uv=False)[0]
    assert np.isclose(lipschitz.reshaped_kernel_norm(k_reshaped), coeff)
    assert op_norm > 2.5 * coeff  # ~ sum |K| / ||K||_F = 3 for the circular operator
    assert float(lipschitz.conv_singular_values(k_reshaped, (8, 8)).max()) == pytest.approx(
        3 * coeff)
    # The operator-based normalization on the same kernel does bound it.
    sigma, _ = lipschitz.conv_norm(kernel, jnp.ones((1, 8, 8, 1)), 500)
    k_op = lipschitz.soft_normalize(kernel, sigma, coeff)
    dense = np.asarray(conv.conv_dense_matrix(k_op, (8, 8)))
    assert np.linalg.svd(dense, compute_uv=False)[0] <= coeff * (1 + 1e-6)


def test_spectral_dense_normalizes_and_soft_leaves_small_weights(x64):
    layer = layers.SpectralDense(6, coeff=0.7, init_power_iter=200)
    x = jnp.ones((2, 5), jnp.float64)
    variables = layer.init(jax.random.key(5), x)
    big = {"params": jax.tree.map(lambda p: 10 * p, variables["params"]),
           "spectral": variables["spectral"]}
    with layers.power_iterations(500):
        _, state = layer.apply(big, x, train=True, mutable=["spectral"])
    kernel, _ = layer.apply({"params": big["params"], **state}, x, method="weights")
    assert np.linalg.norm(np.asarray(kernel), 2) == pytest.approx(0.7, rel=1e-6)
    small = {"params": jax.tree.map(lambda p: 1e-3 * p, variables["params"]),
             "spectral": variables["spectral"]}
    kernel_small, _ = layer.apply(small, x, method="weights")
    np.testing.assert_allclose(kernel_small, small["params"]["kernel"])


def test_training_apply_updates_state_and_evaluation_does_not():
    conv = layers.SpectralConv(3, (3, 3), coeff=0.9, n_power_iter=2, init_power_iter=0)
    x = jax.random.normal(jax.random.key(6), (2, 5, 5, 2))
    variables = conv.init(jax.random.key(7), x)
    _, state = conv.apply(variables, x, train=True, mutable=["spectral"])
    assert not np.allclose(state["spectral"]["u"], variables["spectral"]["u"])
    _, state_eval = conv.apply(variables, x, train=False, mutable=["spectral"])
    np.testing.assert_array_equal(state_eval["spectral"]["u"], variables["spectral"]["u"])
    # A training apply without mutable=["spectral"] still runs (nothing is stored).
    y_train = conv.apply(variables, x, train=True)
    assert y_train.shape == (2, 5, 5, 3)


def test_gradient_flows_through_sigma(x64):
    layer = layers.SpectralDense(3, coeff=0.5, init_power_iter=300)
    x = jnp.ones((1, 3), jnp.float64)
    variables = layer.init(jax.random.key(8), x)
    params = jax.tree.map(lambda p: 10 * p, variables["params"])
    # With the constraint active, ||W_eff||_F^2 is scale invariant in W: the gradient
    # along W itself vanishes (it would not if sigma were treated as a constant).
    with layers.power_iterations(300):
        _, st = layer.apply({"params": params, "spectral": variables["spectral"]}, x,
                            train=True, mutable=["spectral"])
    grad = jax.grad(lambda p: jnp.sum(
        layer.apply({"params": p, **st}, x, method="weights")[0] ** 2))(params)
    assert abs(float(jnp.sum(grad["kernel"] * params["kernel"]))) < 1e-6


@pytest.mark.parametrize("coeff", [0.0, 1.0, 1.5, -0.2])
def test_bad_coefficient_raises(coeff):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        layers.SpectralConv(4, (3, 3), coeff=coeff)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        layers.SpectralDense(4, coeff=coeff)


def test_input_of_another_spatial_size_is_an_error():
    conv = layers.SpectralConv(3, (3, 3))
    variables = conv.init(jax.random.key(9), jnp.ones((1, 6, 6, 2)))
    with pytest.raises(ValueError, match="spatial size"):
        conv.apply(variables, jnp.ones((1, 8, 8, 2)))


def test_conv_singular_values_rejects_bad_kernels():
    with pytest.raises(ValueError, match="HWIO"):
        lipschitz.conv_singular_values(jnp.ones((3, 3, 2)), (5, 5))
    with pytest.raises(ValueError, match="larger"):
        lipschitz.conv_singular_values(jnp.ones((5, 5, 1, 1)), (3, 3))


def test_zero_initialized_layer_has_finite_gradients():
    conv = layers.SpectralConv(3, (3, 3), kernel_init=jax.nn.initializers.zeros)
    x = jax.random.normal(jax.random.key(10), (2, 5, 5, 2))
    variables = jax.jit(conv.init)(jax.random.key(11), x)

    def loss(params):
        y, _ = conv.apply({**variables, "params": params}, x, train=True,
                          mutable=["spectral"])
        return jnp.sum(y * x[..., :1])

    grads = jax.grad(loss)(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["kernel"]).max()) > 0


def test_zero_initialized_layer_keeps_a_live_power_iteration_vector(x64):
    # A zero kernel must not collapse u to 0: once the kernel grows, the constraint must act.
    layer = layers.SpectralDense(4, coeff=0.5, kernel_init=jax.nn.initializers.zeros,
                                    init_power_iter=20)
    x = jnp.ones((2, 3), jnp.float64)
    variables = jax.jit(layer.init)(jax.random.key(12), x)
    u = variables["spectral"]["u"]
    assert float(jnp.linalg.norm(u)) == pytest.approx(1.0)
    big = {**variables, "params": {**variables["params"],
                                   "kernel": 5.0 * jnp.ones((3, 4), jnp.float64)}}
    _, state = layer.apply(big, x, train=True, mutable=["spectral"])
    kernel, _ = layer.apply({**big, **state}, x, method="weights")
    assert np.linalg.norm(np.asarray(kernel), 2) == pytest.approx(0.5, rel=1e-6)


def test_conv_norm_patches_path_matches_dense_svd_under_vmap(x64):
    kernels = jax.random.normal(jax.random.key(14), (3, 3, 3, 2, 4), jnp.float64)
    u0 = jnp.ones((3, 1, 5, 5, 2))
    sigmas, _ = jax.vmap(lambda k, u: lipschitz.conv_norm(k, u, 1000))(kernels, u0)
    for k, s in zip(kernels, sigmas):
        dense = np.asarray(conv.conv_dense_matrix(k, (5, 5)))
        np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[0], rtol=1e-6)


