"""The convolution operator in each of its implementations (``iresnet_jax.conv``): the
same values and the same derivatives, at every order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import conv


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
@pytest.mark.parametrize("ksize", [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_conv2d_patches_equals_conv2d(x64, padding, ksize):
    k1, k2 = jax.random.split(jax.random.key(11))
    kernel = jax.random.normal(k1, ksize + (3, 4), jnp.float64)
    x = jax.random.normal(k2, (2, 6, 7, 3), jnp.float64)
    expected = conv.conv2d(x, kernel, padding=padding)
    got = conv.conv2d_patches(x, kernel, padding=padding)
    assert got.shape == expected.shape == (2, 6, 7, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # The transposes (what the power iteration applies) agree as well.
    cot = jax.random.normal(jax.random.key(12), expected.shape, jnp.float64)
    t_expected = jax.vjp(lambda v: conv.conv2d(v, kernel, padding=padding), x)[1](cot)
    t_got = jax.vjp(lambda v: conv.conv2d_patches(v, kernel, padding=padding), x)[1](cot)
    np.testing.assert_allclose(t_got[0], t_expected[0], rtol=1e-12, atol=1e-12)


def test_conv2d_patches_rejects_other_paddings():
    with pytest.raises(ValueError, match="padding"):
        conv.conv2d_patches(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)),
                                 padding="VALID")


@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR"])
def test_conv2d_1x1_einsum_path_equals_lax_conv(x64, padding):
    k1, k2 = jax.random.split(jax.random.key(13))
    kernel = jax.random.normal(k1, (1, 1, 5, 3), jnp.float64)
    x = jax.random.normal(k2, (2, 4, 6, 5), jnp.float64)
    got = conv.conv2d(x, kernel, padding=padding)
    lax_padding = "SAME" if padding == "CIRCULAR" else padding
    expected = jax.lax.conv_general_dilated(x, kernel, (1, 1), lax_padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # Strided 1x1 convolutions keep the lax.conv path and still agree.
    got_s = conv.conv2d(x, kernel, strides=2, padding=padding)
    expected_s = jax.lax.conv_general_dilated(x, kernel, (2, 2), lax_padding,
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                              precision="highest")
    np.testing.assert_allclose(got_s, expected_s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
def test_conv2d_widening_kernel_path_equals_lax_conv(x64, padding):
    """``conv2d`` with C_in < C_out (computed from patches) is the same convolution."""
    k1, k2 = jax.random.split(jax.random.key(15))
    kernel = jax.random.normal(k1, (3, 3, 2, 5), jnp.float64)
    x = jax.random.normal(k2, (2, 5, 6, 2), jnp.float64)
    got = conv.conv2d(x, kernel, padding=padding, impl="matmul")
    assert "conv_general_dilated" not in str(jax.make_jaxpr(
        lambda v: conv.conv2d(v, kernel, padding=padding, impl="matmul"))(x))
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
    got, vjp_got = jax.vjp(conv.conv2d_col2im, x, kernel)
    assert got.shape == (2, 5, 7, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    cot = jax.random.normal(k3, expected.shape, jnp.float64)
    for g, e in zip(vjp_got(cot), vjp_ref(cot)):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
    # Through conv2d: impl="matmul" selects it, and the result is the same.
    if ksize != (1, 1):
        via = conv.conv2d(x, kernel, impl="matmul")
        np.testing.assert_allclose(via, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not hasattr(jax.lax, "split"), reason="jnp.split is slices here")
def test_conv2d_col2im_backward_concatenates_instead_of_adding_padded_copies():
    """The input gradient of the output-side form takes the product's cotangent as one
    concatenation of the nine shifted output cotangents; adding nine copies each padded to
    all 9 * C_out channels made the classifier's training step 5-12% slower."""
    x = jnp.ones((2, 5, 7, 6))
    kernel = jnp.ones((3, 3, 6, 4))
    _, vjp = jax.vjp(conv.conv2d_col2im, x, kernel)
    text = str(jax.make_jaxpr(vjp)(jnp.ones((2, 5, 7, 4))))
    assert "concatenate" in text
    assert "f32[2,5,7,36] = pad" not in text and "f32[2,5,7,36] = add" not in text


# (kind, C_in, C_out, seed): impl="hybrid" computes a narrowing conv's value output-side
# (col2im) and a widening conv's from im2col patches; both take lax.conv's derivatives.
HYBRIDS = [("narrowing", 6, 2, 17), ("widening", 2, 5, 19)]


@pytest.mark.parametrize("option,c_in,c_out,seed", HYBRIDS)
@pytest.mark.parametrize("ksize", [(2, 2), (3, 3), (5, 3)])
def test_conv2d_hybrids_value_and_derivatives_equal_lax_conv(x64, ksize, option, c_in, c_out,
                                                             seed):
    """``impl="hybrid"`` for narrowing and widening convs: a matrix-product value with
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
        return conv.conv2d(x, kernel, precision="highest", impl="hybrid")

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


def test_conv2d_implementations_are_checked_and_agree():
    x = jnp.ones((1, 4, 4, 2))
    kernel = jnp.ones((3, 3, 2, 6))
    with pytest.raises(ValueError, match="conv implementation"):
        conv.conv2d(x, kernel, impl="fft")
    for impl in conv.IMPLS:
        np.testing.assert_allclose(conv.conv2d(x, kernel, impl=impl), conv.conv2d(x, kernel),
                                   rtol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda v: conv.conv2d(v, kernel, impl="hybrid"))(x))
    assert "custom_jvp_call" in jaxpr
    # "CIRCULAR" padding keeps the patches' own derivatives (lax.conv has no such padding).
    jaxpr = str(jax.make_jaxpr(
        lambda v: conv.conv2d(v, kernel, impl="hybrid", padding="CIRCULAR"))(x))
    assert "custom_jvp_call" not in jaxpr
    # "xla" is lax.conv for every kernel but the 1x1 (a product over the channels).
    jaxpr = str(jax.make_jaxpr(lambda v: conv.conv2d(v, kernel))(x))
    assert "conv_general_dilated" in jaxpr
