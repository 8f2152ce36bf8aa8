"""Spectral normalization on the true convolution operator, and its certificates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import lipschitz


def _circular_dense_matrix(kernel, n, m):
    c_in = kernel.shape[2]
    d = n * m * c_in
    basis = jnp.eye(d, dtype=kernel.dtype).reshape(d, n, m, c_in)
    return lipschitz.conv2d(basis, kernel, padding="CIRCULAR").reshape(d, -1)


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
    dense = np.asarray(lipschitz.conv_dense_matrix(kernel, (5, 5)))
    np.testing.assert_allclose(sigma, np.linalg.svd(dense, compute_uv=False)[0], rtol=1e-6)


def _normalized_kernel(padding, coeff, x):
    conv = lipschitz.SpectralConv(4, (3, 3), coeff=coeff, padding=padding,
                                  init_power_iter=0)
    variables = conv.init(jax.random.key(4), x)
    # Scale the kernel up so that the constraint is active.
    variables = {"params": jax.tree.map(lambda p: 5.0 * p, variables["params"]),
                 "spectral": variables["spectral"]}
    with lipschitz.power_iterations(2000):
        _, state = conv.apply(variables, x, train=True, mutable=["spectral"])
    variables = {"params": variables["params"], **state}
    kernel, _ = conv.apply(variables, x, method="weights")
    return kernel, variables


@pytest.mark.parametrize("coeff", [0.5, 0.9])
def test_normalized_conv_true_operator_norm_below_coeff(x64, coeff):
    x = jnp.zeros((1, 6, 6, 3), jnp.float64)
    # Zero padding: the exact norm from the dense matrix of the operator.
    kernel, _ = _normalized_kernel("SAME", coeff, x)
    dense = np.asarray(lipschitz.conv_dense_matrix(kernel, (6, 6)))
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
    dense = np.asarray(lipschitz.conv_dense_matrix(k_reshaped, (8, 8)))
    op_norm = np.linalg.svd(dense, compute_uv=False)[0]
    assert np.isclose(lipschitz.reshaped_kernel_norm(k_reshaped), coeff)
    assert op_norm > 2.5 * coeff  # ~ sum |K| / ||K||_F = 3 for the circular operator
    assert float(lipschitz.conv_singular_values(k_reshaped, (8, 8)).max()) == pytest.approx(
        3 * coeff)
    # The operator-based normalization on the same kernel does bound it.
    sigma, _ = lipschitz.conv_norm(kernel, jnp.ones((1, 8, 8, 1)), 500)
    k_op = lipschitz.soft_normalize(kernel, sigma, coeff)
    dense = np.asarray(lipschitz.conv_dense_matrix(k_op, (8, 8)))
    assert np.linalg.svd(dense, compute_uv=False)[0] <= coeff * (1 + 1e-6)


def test_spectral_dense_normalizes_and_soft_leaves_small_weights(x64):
    layer = lipschitz.SpectralDense(6, coeff=0.7, init_power_iter=200)
    x = jnp.ones((2, 5), jnp.float64)
    variables = layer.init(jax.random.key(5), x)
    big = {"params": jax.tree.map(lambda p: 10 * p, variables["params"]),
           "spectral": variables["spectral"]}
    with lipschitz.power_iterations(500):
        _, state = layer.apply(big, x, train=True, mutable=["spectral"])
    kernel, _ = layer.apply({"params": big["params"], **state}, x, method="weights")
    assert np.linalg.norm(np.asarray(kernel), 2) == pytest.approx(0.7, rel=1e-6)
    small = {"params": jax.tree.map(lambda p: 1e-3 * p, variables["params"]),
             "spectral": variables["spectral"]}
    kernel_small, _ = layer.apply(small, x, method="weights")
    np.testing.assert_allclose(kernel_small, small["params"]["kernel"])


def test_training_apply_updates_state_and_evaluation_does_not():
    conv = lipschitz.SpectralConv(3, (3, 3), coeff=0.9, n_power_iter=2, init_power_iter=0)
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
    layer = lipschitz.SpectralDense(3, coeff=0.5, init_power_iter=300)
    x = jnp.ones((1, 3), jnp.float64)
    variables = layer.init(jax.random.key(8), x)
    params = jax.tree.map(lambda p: 10 * p, variables["params"])
    # With the constraint active, ||W_eff||_F^2 is scale invariant in W: the gradient
    # along W itself vanishes (it would not if sigma were treated as a constant).
    with lipschitz.power_iterations(300):
        _, st = layer.apply({"params": params, "spectral": variables["spectral"]}, x,
                            train=True, mutable=["spectral"])
    grad = jax.grad(lambda p: jnp.sum(
        layer.apply({"params": p, **st}, x, method="weights")[0] ** 2))(params)
    assert abs(float(jnp.sum(grad["kernel"] * params["kernel"]))) < 1e-6


@pytest.mark.parametrize("coeff", [0.0, 1.0, 1.5, -0.2])
def test_bad_coefficient_raises(coeff):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        lipschitz.SpectralConv(4, (3, 3), coeff=coeff)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        lipschitz.SpectralDense(4, coeff=coeff)


def test_input_of_another_spatial_size_is_an_error():
    conv = lipschitz.SpectralConv(3, (3, 3))
    variables = conv.init(jax.random.key(9), jnp.ones((1, 6, 6, 2)))
    with pytest.raises(ValueError, match="spatial size"):
        conv.apply(variables, jnp.ones((1, 8, 8, 2)))


def test_conv_singular_values_rejects_bad_kernels():
    with pytest.raises(ValueError, match="HWIO"):
        lipschitz.conv_singular_values(jnp.ones((3, 3, 2)), (5, 5))
    with pytest.raises(ValueError, match="larger"):
        lipschitz.conv_singular_values(jnp.ones((5, 5, 1, 1)), (3, 3))


def test_zero_initialized_layer_has_finite_gradients():
    conv = lipschitz.SpectralConv(3, (3, 3), kernel_init=jax.nn.initializers.zeros)
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
    layer = lipschitz.SpectralDense(4, coeff=0.5, kernel_init=jax.nn.initializers.zeros,
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


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
@pytest.mark.parametrize("ksize", [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_conv2d_patches_equals_conv2d(x64, padding, ksize):
    k1, k2 = jax.random.split(jax.random.key(11))
    kernel = jax.random.normal(k1, ksize + (3, 4), jnp.float64)
    x = jax.random.normal(k2, (2, 6, 7, 3), jnp.float64)
    expected = lipschitz.conv2d(x, kernel, padding=padding)
    got = lipschitz.conv2d_patches(x, kernel, padding=padding)
    assert got.shape == expected.shape == (2, 6, 7, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # The transposes (what the power iteration applies) agree as well.
    cot = jax.random.normal(jax.random.key(12), expected.shape, jnp.float64)
    t_expected = jax.vjp(lambda v: lipschitz.conv2d(v, kernel, padding=padding), x)[1](cot)
    t_got = jax.vjp(lambda v: lipschitz.conv2d_patches(v, kernel, padding=padding), x)[1](cot)
    np.testing.assert_allclose(t_got[0], t_expected[0], rtol=1e-12, atol=1e-12)


def test_conv2d_patches_rejects_other_paddings():
    with pytest.raises(ValueError, match="padding"):
        lipschitz.conv2d_patches(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)),
                                 padding="VALID")


@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR"])
def test_conv2d_1x1_einsum_path_equals_lax_conv(x64, padding):
    k1, k2 = jax.random.split(jax.random.key(13))
    kernel = jax.random.normal(k1, (1, 1, 5, 3), jnp.float64)
    x = jax.random.normal(k2, (2, 4, 6, 5), jnp.float64)
    got = lipschitz.conv2d(x, kernel, padding=padding)
    lax_padding = "SAME" if padding == "CIRCULAR" else padding
    expected = jax.lax.conv_general_dilated(x, kernel, (1, 1), lax_padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # Strided 1x1 convolutions keep the lax.conv path and still agree.
    got_s = lipschitz.conv2d(x, kernel, strides=2, padding=padding)
    expected_s = jax.lax.conv_general_dilated(x, kernel, (2, 2), lax_padding,
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                              precision="highest")
    np.testing.assert_allclose(got_s, expected_s, rtol=1e-12, atol=1e-12)


def test_conv_norm_patches_path_matches_dense_svd_under_vmap(x64):
    kernels = jax.random.normal(jax.random.key(14), (3, 3, 3, 2, 4), jnp.float64)
    u0 = jnp.ones((3, 1, 5, 5, 2))
    sigmas, _ = jax.vmap(lambda k, u: lipschitz.conv_norm(k, u, 1000))(kernels, u0)
    for k, s in zip(kernels, sigmas):
        dense = np.asarray(lipschitz.conv_dense_matrix(k, (5, 5)))
        np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[0], rtol=1e-6)


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
def test_conv2d_widening_kernel_path_equals_lax_conv(x64, padding):
    """``conv2d`` with C_in < C_out (computed from patches) is the same convolution."""
    k1, k2 = jax.random.split(jax.random.key(15))
    kernel = jax.random.normal(k1, (3, 3, 2, 5), jnp.float64)
    x = jax.random.normal(k2, (2, 5, 6, 2), jnp.float64)
    got = lipschitz.conv2d(x, kernel, padding=padding)
    if padding == "CIRCULAR":
        xp = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="wrap")
        expected = jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision="highest")
    else:
        expected = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision="highest")
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ksize", [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_conv2d_col2im_equals_lax_conv_with_gradients(x64, ksize):
    """The output-side form of a narrowing conv is the same operator, and so are its
    gradients with respect to the input and the kernel."""
    k1, k2, k3 = jax.random.split(jax.random.key(16), 3)
    kernel = jax.random.normal(k1, ksize + (6, 2), jnp.float64)
    x = jax.random.normal(k2, (2, 5, 7, 6), jnp.float64)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")

    expected, vjp_ref = jax.vjp(reference, x, kernel)
    got, vjp_got = jax.vjp(lipschitz.conv2d_col2im, x, kernel)
    assert got.shape == (2, 5, 7, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    cot = jax.random.normal(k3, expected.shape, jnp.float64)
    for g, e in zip(vjp_got(cot), vjp_ref(cot)):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
    # Through conv2d: the narrowing option selects it, and the result is the same.
    if ksize != (1, 1):
        via = lipschitz.conv2d(x, kernel, narrowing="col2im")
        np.testing.assert_allclose(via, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not hasattr(jax.lax, "split"), reason="jnp.split is slices here")
def test_conv2d_col2im_backward_concatenates_instead_of_adding_padded_copies():
    """The input gradient of the output-side form takes the product's cotangent as one
    concatenation of the nine shifted output cotangents; adding nine copies each padded to
    all 9 * C_out channels made the classifier's training step 5-12% slower."""
    x = jnp.ones((2, 5, 7, 6))
    kernel = jnp.ones((3, 3, 6, 4))
    _, vjp = jax.vjp(lipschitz.conv2d_col2im, x, kernel)
    text = str(jax.make_jaxpr(vjp)(jnp.ones((2, 5, 7, 4))))
    assert "concatenate" in text
    assert "f32[2,5,7,36] = pad" not in text and "f32[2,5,7,36] = add" not in text


# (option, C_in, C_out, seed): the narrowing hybrid's value is output-side (col2im), the
# widening hybrid's is im2col patches; both take lax.conv's derivatives.
HYBRIDS = [("narrowing", 6, 2, 17), ("widening", 2, 5, 19)]


@pytest.mark.parametrize("option,c_in,c_out,seed", HYBRIDS)
@pytest.mark.parametrize("ksize", [(2, 2), (3, 3), (5, 3)])
def test_conv2d_hybrids_value_and_derivatives_equal_lax_conv(x64, ksize, option, c_in, c_out,
                                                             seed):
    """``narrowing="hybrid"`` / ``widening="hybrid"``: a matrix-product value with
    ``lax.conv``'s JVP. Its value, forward-mode and reverse-mode derivatives, and the
    second-order derivatives that a log-det gradient takes (the gradient of a VJP), all
    agree with ``lax.conv``; the primal has no ``lax.conv``, the backward pass does."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    kernel = jax.random.normal(k1, ksize + (c_in, c_out), jnp.float64)
    x = jax.random.normal(k2, (2, 5, 7, c_in), jnp.float64)
    cot = jax.random.normal(k3, (2, 5, 7, c_out), jnp.float64)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")

    def hybrid(x, kernel):
        return lipschitz.conv2d(x, kernel, precision="highest", **{option: "hybrid"})

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)

    jaxpr = str(jax.make_jaxpr(hybrid)(x, kernel))
    assert "conv_general_dilated" not in jaxpr and "custom_jvp_call" in jaxpr
    close(hybrid(x, kernel), reference(x, kernel))
    close(jax.jvp(hybrid, (x, kernel), (x, kernel))[1],
          jax.jvp(reference, (x, kernel), (x, kernel))[1])
    for g, e in zip(jax.vjp(hybrid, x, kernel)[1](cot), jax.vjp(reference, x, kernel)[1](cot)):
        close(g, e)
    # Only the input perturbed (the fixed-point inverse's and log-det's VJPs in x).
    close(jax.vjp(lambda v: hybrid(v, kernel), x)[1](cot)[0],
          jax.vjp(lambda v: reference(v, kernel), x)[1](cot)[0])

    def second_order(conv):
        def loss(x, kernel):
            _, vjp = jax.vjp(lambda v: jnp.tanh(conv(v, kernel)), x)
            return jnp.sum(jnp.sin(vjp(cot)[0]))
        return jax.grad(loss, (0, 1))(x, kernel)

    for g, e in zip(second_order(hybrid), second_order(reference)):
        close(g, e)
    # The backward pass goes through lax.conv (one library call per transposed conv), not
    # through the transpose of the matrix-product formulation.
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(hybrid(v, kernel) ** 2)))(x))
    assert "conv_general_dilated" in grad_jaxpr


def test_conv2d_widening_option_checks_and_resolves_per_backend():
    x = jnp.ones((1, 4, 4, 2))
    kernel = jnp.ones((3, 3, 2, 6))
    with pytest.raises(ValueError, match="widening"):
        lipschitz.conv2d(x, kernel, widening="fft")
    jaxpr = str(jax.make_jaxpr(
        lambda v: lipschitz.conv2d(v, kernel, widening="auto_hybrid"))(x))
    assert ("custom_jvp_call" in jaxpr) == (jax.default_backend() == "cpu")
    np.testing.assert_allclose(lipschitz.conv2d(x, kernel, widening="auto_hybrid"),
                               lipschitz.conv2d(x, kernel), rtol=1e-6)
    # "CIRCULAR" padding keeps the patches' own derivatives (lax.conv has no such padding).
    jaxpr = str(jax.make_jaxpr(
        lambda v: lipschitz.conv2d(v, kernel, widening="hybrid", padding="CIRCULAR"))(x))
    assert "custom_jvp_call" not in jaxpr


def test_conv2d_rejects_unknown_narrowing():
    with pytest.raises(ValueError, match="narrowing"):
        lipschitz.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 1)), narrowing="fft")


def test_conv2d_auto_narrowing_is_col2im_on_cpu_and_lax_conv_elsewhere():
    x = jnp.ones((1, 4, 4, 6))
    kernel = jnp.ones((3, 3, 6, 2))
    jaxpr = str(jax.make_jaxpr(lambda v: lipschitz.conv2d(v, kernel, narrowing="auto"))(x))
    on_cpu = jax.default_backend() == "cpu"
    assert ("conv_general_dilated" in jaxpr) == (not on_cpu)
    np.testing.assert_allclose(lipschitz.conv2d(x, kernel, narrowing="auto"),
                               lipschitz.conv2d(x, kernel), rtol=1e-6)
    jaxpr = str(jax.make_jaxpr(
        lambda v: lipschitz.conv2d(v, kernel, narrowing="auto_hybrid"))(x))
    assert ("custom_jvp_call" in jaxpr) == on_cpu
    assert ("conv_general_dilated" in jaxpr) == (not on_cpu)
