"""Linear layers normalized by their operator norm (Eq. 2), as Flax modules.

The effective weight is ``W / max(1, sigma / coeff)`` with ``sigma`` a power-iteration
estimate of ``||W||_2`` (for a convolution: of the operator at the real input size, see
``iresnet_jax.lipschitz``). The iteration vector ``u`` and the last ``sigma`` live in the
``"spectral"`` collection: a training call (``train=True``) runs ``n_power_iter``
iterations and stores ``u`` when the caller passes ``mutable=["spectral"]``; evaluation
uses the stored ``u`` (with ``stored_sigma=True``: the stored ``sigma`` itself, which a
converted checkpoint needs when its ``sigma`` was not ``||W u||``, see
``iresnet_jax.interop``). ``coeff=None`` gives the unconstrained layer (no state), which
the baselines use.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from iresnet_jax import conv as conv_lib
from iresnet_jax import lipschitz, precision

Array = jax.Array

SPECTRAL = "spectral"

_override = threading.local()


@contextlib.contextmanager
def power_iterations(n_iter: int):
    """Within this context every spectral layer runs ``n_iter`` power iterations.

    Applies while a model is *traced* (an un-jitted ``apply``, or a function jitted inside
    the context). With ``train=True, mutable=["spectral"]`` the stored vectors converge,
    which makes the stored ``sigma`` a tight estimate::

        with layers.power_iterations(200):
            _, state = model.apply(variables, x, train=True, mutable=["spectral"])
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    previous = getattr(_override, "n_iter", None)
    _override.n_iter = int(n_iter)
    try:
        yield
    finally:
        _override.n_iter = previous


def _iterations(n_train: int, train: bool) -> int:
    forced = getattr(_override, "n_iter", None)
    if forced is not None:
        return forced
    return n_train if train else 0


class _Spectral(nn.Module):
    """Parameters, the ``"spectral"`` state and the soft normalization."""

    def _check_coeff(self):
        if self.coeff is not None:
            lipschitz.check_coeff(self.coeff)

    def _weights(self, kernel_shape, u_shape, norm_fn, dtype, train: bool):
        kernel = self.param("kernel", self.kernel_init, kernel_shape, dtype)
        bias = (self.param("bias", self.bias_init, kernel_shape[-1:], dtype)
                if self.use_bias else None)
        if self.coeff is None:
            return kernel, bias
        u_var = self.variable(SPECTRAL, "u", lambda: lipschitz.normalize(
            jax.random.normal(self.make_rng("params"), u_shape, dtype)))
        sigma_var = self.variable(SPECTRAL, "sigma", lambda: jnp.zeros((), dtype))
        if u_var.value.shape != tuple(u_shape):
            raise ValueError(
                f"{type(self).__name__} was built for inputs of shape {u_var.value.shape[1:]}"
                f" (power-iteration vector), got {tuple(u_shape[1:])}: the operator norm of a"
                " convolution depends on the input's spatial size")
        n_iter = (self.init_power_iter if self.is_initializing()
                  else _iterations(self.n_power_iter, train))
        if self.stored_sigma and n_iter == 0:
            return lipschitz.soft_normalize(kernel, sigma_var.value, self.coeff), bias
        with precision.exact_products():
            _, u = norm_fn(lax.stop_gradient(kernel), u_var.value, n_iter)
            u = lax.stop_gradient(u)
            # sigma = ||W u|| with u fixed: differentiable in W, as in spectral normalization.
            sigma, _ = norm_fn(kernel, u, 0)
        if (self.is_initializing() or n_iter > 0) and self.is_mutable_collection(SPECTRAL):
            u_var.value = u
            sigma_var.value = lax.stop_gradient(sigma)
        return lipschitz.soft_normalize(kernel, sigma, self.coeff), bias


class SpectralDense(_Spectral):
    """Dense layer with effective kernel ``W / max(1, sigma / coeff)`` (Eq. 2).

    Example:
      >>> layer = SpectralDense(8, coeff=0.9)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 3)))
      >>> y, state = layer.apply(variables, jnp.ones((4, 3)), train=True,
      ...                        mutable=["spectral"])
    """
    features: int
    coeff: float | None = 0.9
    n_power_iter: int = 1
    init_power_iter: int = 20
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    stored_sigma: bool = False

    def __post_init__(self):
        self._check_coeff()
        super().__post_init__()

    @nn.compact
    def weights(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False
                ) -> tuple[Array, Array | None]:
        """The effective kernel ``(in, out)`` and bias for inputs like ``x``."""
        d = x.shape[-1]
        return self._weights((d, self.features), (d,), lipschitz.dense_norm, x.dtype, train)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        kernel, bias = self.weights(x, train=train)
        y = x @ kernel
        return y + bias if bias is not None else y


class SpectralConv(_Spectral):
    """2-D convolution (NHWC) normalized by its true *operator* norm.

    The power iteration alternates the convolution and its transpose on a vector of one
    input's shape ``(1, H, W, C_in)``. ``conv`` is the implementation
    (``iresnet_jax.conv.IMPLS``); every choice is the same operator.

    Example:
      >>> layer = SpectralConv(16, (3, 3), coeff=0.9, n_power_iter=5)
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y = layer.apply(variables, x)           # evaluation: stored u, no update
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    coeff: float | None = 0.9
    n_power_iter: int = 1
    init_power_iter: int = 20
    strides: int | Sequence[int] = 1
    padding: str = "SAME"
    conv: str = "xla"
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    stored_sigma: bool = False

    def __post_init__(self):
        self._check_coeff()
        conv_lib.check_impl(self.conv)
        super().__post_init__()

    @nn.compact
    def weights(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False
                ) -> tuple[Array, Array | None]:
        """The effective HWIO kernel and bias for NHWC inputs like ``x``."""
        if len(x.shape) != 4:
            raise ValueError(f"SpectralConv expects NHWC inputs, got shape {tuple(x.shape)}")
        ks = (tuple(self.kernel_size) if not isinstance(self.kernel_size, int)
              else (self.kernel_size,) * 2)
        norm_fn = lambda k, u, n: lipschitz.conv_norm(k, u, n, strides=self.strides,
                                                      padding=self.padding)
        return self._weights(ks + (x.shape[-1], self.features), (1,) + tuple(x.shape[1:]),
                             norm_fn, x.dtype, train)

    def apply_kernel(self, x: Array, kernel: Array) -> Array:
        """The convolution with a given (effective) kernel, as this layer computes it."""
        return conv_lib.conv2d(x, kernel, strides=self.strides, padding=self.padding,
                               impl=self.conv)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        kernel, bias = self.weights(x, train=train)
        y = self.apply_kernel(x, kernel)
        return y + bias if bias is not None else y
