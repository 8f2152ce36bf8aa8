"""Glow-style coupling flows: the dimension-splitting baseline of the paper.

One Glow step (Kingma and Dhariwal, 2018) is ActNorm, then an invertible linear mixing of
the channels (a fixed reversal, or an LU-parameterized invertible 1x1 convolution), then an
affine coupling layer: the first half of the channels passes unchanged and conditions a
scale and shift of the second half. Steps are stacked with ``flow.BlockStack``.

The coupling network is an MLP for vectors (toy densities) and a conv net
(3x3 -> 1x1 -> 3x3, as the i-ResNet branch) for NHWC images; its last layer starts at zero,
so a fresh step is ActNorm followed by a permutation and a constant rescaling.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax import flow, layers

Array = jax.Array


def _spatial_size(x: Array) -> int:
    return int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1


class ReversePermutation(nn.Module):
    """Reverses the channel order (log-det 0)."""

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        return x[..., ::-1], jnp.zeros(x.shape[:1], x.dtype)

    def inverse(self, y: Array) -> Array:
        return y[..., ::-1]


class InvertibleLinear(nn.Module):
    """Invertible channel mixing ``y = x W`` (a 1x1 convolution on images), LU-parameterized.

    ``W = P L (U + diag(sign * exp(log_s)))`` with a fixed random permutation ``P``, unit
    lower-triangular ``L`` and strictly upper-triangular ``U``; the log-det is
    ``(spatial size) * sum(log_s)``. Initialized at a random rotation.
    """

    @nn.compact
    def _weight(self, channels: int, dtype):
        def init_lu():
            w = jnp.linalg.qr(jax.random.normal(self.make_rng("params"), (channels, channels),
                                                dtype))[0]
            p, lower, upper = jax.scipy.linalg.lu(w)
            return {"p": p, "l": lower, "u": upper}

        # The fixed permutation (and the initial factors) live in the "constants" collection.
        lu = self.variable("constants", "lu", init_lu).value
        s = jnp.diag(lu["u"])
        lower = self.param("lower", lambda *_: jnp.tril(lu["l"], -1), (channels, channels))
        upper = self.param("upper", lambda *_: jnp.triu(lu["u"], 1), (channels, channels))
        log_s = self.param("log_s", lambda *_: jnp.log(jnp.abs(s)), (channels,))
        sign = jnp.sign(s)
        eye = jnp.eye(channels, dtype=dtype)
        l_mat = jnp.tril(lower, -1) + eye
        u_mat = jnp.triu(upper, 1) + jnp.diag(sign * jnp.exp(log_s))
        return lu["p"] @ l_mat @ u_mat, log_s

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        w, log_s = self._weight(x.shape[-1], x.dtype)
        y = x @ w
        return y, jnp.full(x.shape[:1], _spatial_size(x) * jnp.sum(log_s), x.dtype)

    def inverse(self, y: Array) -> Array:
        w, _ = self._weight(y.shape[-1], y.dtype)
        return y @ jnp.linalg.inv(w)


class AffineCoupling(nn.Module):
    """``y_a = x_a``, ``y_b = (x_b + t(x_a)) * sigmoid(h(x_a) + 2)`` (Glow's coupling).

    Attributes:
      hidden: MLP hidden sizes (vectors) or the conv width (images, first entry).
    """
    hidden: Sequence[int] = (64, 64, 64)

    @nn.compact
    def _shift_scale(self, xa: Array, out_channels: int):
        if xa.ndim == 2:
            h = xa
            for i, width in enumerate(self.hidden):
                h = nn.elu(nn.Dense(width, name=f"dense{i}")(h))
            out = nn.Dense(2 * out_channels, kernel_init=nn.initializers.zeros,
                           name="out")(h)
        else:
            width = self.hidden[0]
            h = nn.relu(nn.Conv(width, (3, 3), name="conv0")(xa))
            h = nn.relu(nn.Conv(width, (1, 1), name="conv1")(h))
            out = nn.Conv(2 * out_channels, (3, 3), kernel_init=nn.initializers.zeros,
                          name="out")(h)
        shift, raw = out[..., :out_channels], out[..., out_channels:]
        log_scale = jax.nn.log_sigmoid(raw + 2.0)
        return shift, log_scale

    def _split(self, x):
        k = x.shape[-1] // 2
        if k < 1:
            raise ValueError(f"AffineCoupling needs at least 2 channels, got {x.shape[-1]}")
        return x[..., :k], x[..., k:]

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        xa, xb = self._split(x)
        shift, log_scale = self._shift_scale(xa, xb.shape[-1])
        yb = (xb + shift) * jnp.exp(log_scale)
        log_det = jnp.sum(log_scale.reshape(x.shape[0], -1), axis=-1)
        return jnp.concatenate([xa, yb], axis=-1), log_det

    def inverse(self, y: Array) -> Array:
        ya, yb = self._split(y)
        shift, log_scale = self._shift_scale(ya, yb.shape[-1])
        return jnp.concatenate([ya, yb * jnp.exp(-log_scale) - shift], axis=-1)


class GlowStep(nn.Module):
    """ActNorm -> channel mixing -> affine coupling."""
    hidden: Sequence[int] = (64, 64, 64)
    mixing: str = "reverse"   # or "1x1"

    def setup(self):
        if self.mixing not in ("reverse", "1x1"):
            raise ValueError(f"mixing must be 'reverse' or '1x1', got {self.mixing!r}")
        self.steps = flow.Chain([
            layers.ActNorm(),
            ReversePermutation() if self.mixing == "reverse" else InvertibleLinear(),
            AffineCoupling(hidden=tuple(self.hidden)),
        ])

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        return self.steps(x, train=train)

    def inverse(self, y: Array) -> Array:
        return self.steps.inverse(y)


class Glow(flow.DensityFlow):
    """``n_steps`` Glow steps with a standard normal prior (toy densities, timing).

    Example:
      >>> model = Glow(n_steps=8)
      >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((16, 2)))
    """
    dim: int = 2
    n_steps: int = 100
    hidden: Sequence[int] = (64, 64, 64)
    mixing: str = "reverse"
    remat: bool = False

    def setup(self):
        self.flow = flow.BlockStack(GlowStep(hidden=tuple(self.hidden), mixing=self.mixing),
                                    n=self.n_steps, remat=self.remat)
        self.prior = flow.DiagonalGaussianPrior(learn=False)

    @property
    def latent_dim(self) -> int:
        return self.dim

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        return self.flow(x, train=train)

    def inverse(self, z: Array) -> Array:
        return self.flow.inverse(z)
