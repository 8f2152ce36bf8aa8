"""ActNorm, squeeze, injective padding, factor-out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iresnet_jax import layers


def test_actnorm_data_dependent_init_and_exact_inverse():
    x = 3.0 + 2.5 * jax.random.normal(jax.random.key(0), (16, 5, 5, 3))
    x = x * jnp.array([1.0, 0.1, 7.0])
    norm = layers.ActNorm()
    variables = norm.init(jax.random.key(1), x)
    y, ld = norm.apply(variables, x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, atol=1e-5)
    expected = 25 * np.sum(variables["params"]["log_scale"])
    np.testing.assert_allclose(ld, np.full(16, expected), rtol=1e-6)
    np.testing.assert_allclose(norm.apply(variables, y, method="inverse"), x, rtol=1e-6,
                               atol=1e-5)
    # A later batch does not re-initialize: the parameters are ordinary parameters.
    y2, _ = norm.apply(variables, 2 * x)
    assert float(jnp.std(y2)) > 1.5


def test_actnorm_keeps_constant_channels_finite():
    x = jnp.concatenate([jax.random.normal(jax.random.key(2), (8, 4, 4, 2)),
                         jnp.zeros((8, 4, 4, 2))], axis=-1)
    norm = layers.ActNorm()
    variables = norm.init(jax.random.key(3), x)
    np.testing.assert_array_equal(variables["params"]["log_scale"][2:], 0.0)


def test_squeeze_channel_order_is_dy_dx_c():
    # Pixel (2i + dy, 2j + dx), channel c goes to channel dy*2C + dx*C + c (the official
    # i-ResNet order, so its checkpoints map one to one).
    b, h, w, c = 1, 4, 4, 3
    x = jnp.arange(b * h * w * c, dtype=jnp.float32).reshape(b, h, w, c)
    y = layers.squeeze(x)
    assert y.shape == (1, 2, 2, 12)
    for i in range(2):
        for j in range(2):
            for dy in range(2):
                for dx in range(2):
                    for ch in range(c):
                        assert y[0, i, j, dy * 2 * c + dx * c + ch] == x[0, 2 * i + dy,
                                                                         2 * j + dx, ch]
    np.testing.assert_array_equal(layers.unsqueeze(y), x)
    module = layers.Squeeze()
    y2, ld = module.apply({}, x)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(ld, 0.0)
    np.testing.assert_array_equal(module.apply({}, y2, method="inverse"), x)


def test_squeeze_matches_reference_pytorch_ordering():
    # The same permutation written the way the reference code builds it: split the width
    # into pairs, view each (H, 2, C) slab as (H/2, 4C), stack along width.
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 5)).astype(np.float32)
    b, h, w, c = x.shape
    slabs = [x[:, :, 2 * k:2 * k + 2, :].reshape(b, h // 2, 4 * c) for k in range(w // 2)]
    ref = np.stack(slabs, axis=1).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(layers.squeeze(jnp.asarray(x)), ref)


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="divisible"):
        layers.squeeze(jnp.ones((1, 5, 4, 1)))


def test_injective_pad_and_factor_out():
    x = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
    pad = layers.InjectivePad(13)
    y, ld = pad.apply({}, x)
    assert y.shape == (2, 4, 4, 16)
    np.testing.assert_array_equal(y[..., 3:], 0.0)
    np.testing.assert_array_equal(pad.apply({}, y, method="inverse"), x)
    fo = layers.FactorOut()
    (kept, out), ld = fo.apply({}, y)
    assert kept.shape == (2, 4, 4, 8) and out.shape == (2, 4, 4, 8)
    np.testing.assert_array_equal(fo.apply({}, (kept, out), method="inverse"), y)
    with pytest.raises(ValueError, match="non-empty"):
        fo.apply({}, jnp.ones((1, 2, 2, 1)))


@pytest.mark.parametrize("name", ["elu", "softplus", "lipswish"])
def test_activations_are_one_lipschitz_and_smooth(name):
    fn = layers.activation_fn(name)
    x = jnp.linspace(-8, 8, 4001)
    d = jax.vmap(jax.grad(lambda t: fn(t)))(x)
    assert float(jnp.max(jnp.abs(d))) <= 1.0 + 1e-6
    dd = jax.vmap(jax.grad(jax.grad(lambda t: fn(t))))(x)
    assert bool(jnp.all(jnp.isfinite(dd)))
    with pytest.raises(ValueError, match="activation"):
        layers.activation_fn("swish2")


def test_elu_derivatives_of_every_order_match_the_closed_form(x64):
    """``layers.elu`` has its derivatives written out (``custom_jvp`` rules); first to
    third derivatives, reverse and forward mode, must still be those of ELU: ``exp(x)``
    for ``x < 0`` (every order), ``1`` then ``0`` for ``x > 0``."""
    x = jnp.concatenate([jnp.linspace(-6.0, -1e-3, 200), jnp.linspace(1e-3, 6.0, 200)])
    assert x.dtype == jnp.float64
    neg = x < 0
    np.testing.assert_allclose(layers.elu(x), np.where(neg, np.expm1(x), x), rtol=1e-12)
    d1 = jax.vmap(jax.grad(layers.elu))
    d2 = jax.vmap(jax.grad(jax.grad(layers.elu)))
    d3 = jax.vmap(jax.grad(jax.grad(jax.grad(layers.elu))))
    e = np.exp(np.asarray(x))
    np.testing.assert_allclose(d1(x), np.where(neg, e, 1.0), rtol=1e-14)
    np.testing.assert_allclose(d2(x), np.where(neg, e, 0.0), rtol=1e-14)
    np.testing.assert_allclose(d3(x), np.where(neg, e, 0.0), rtol=1e-14)
    # Forward over reverse, as the Neumann gradient linearizes the branch's VJP.
    _, fwd_rev = jax.jvp(d1, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(fwd_rev, np.where(neg, e, 0.0), rtol=1e-14)
    assert bool(jnp.isnan(layers.elu(jnp.array([jnp.nan])))[0])


def test_lipswish_one_lipschitz_for_many_betas():
    x = jnp.linspace(-10, 10, 4001)
    for beta in (0.1, 1.0, 5.0, 50.0):
        d = jax.vmap(jax.grad(lambda t: layers.lipswish(t, beta)))(x)
        assert float(jnp.max(jnp.abs(d))) <= 1.0
