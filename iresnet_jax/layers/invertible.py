"""Invertible layers without a Lipschitz constraint (flow protocol).

``ActNorm`` initializes from data at ``model.init`` (Glow). ``Squeeze`` is space-to-depth
with the channel order ``[dy, dx, c]`` of the official i-ResNet code (output channel
``dy * 2C + dx * C + c`` holds input pixel ``(2i + dy, 2j + dx)``, channel ``c``) or
``[c, dy, dx]`` of the Residual Flows code (``order="channel"``).
``LogitTransform`` maps dequantized data to the real line (Residual Flows).
``InjectivePad`` appends zero channels (its inverse drops them). ``FactorOut`` splits the
channels into the part that continues through the flow and the part that leaves it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _zeros_logdet(x: Array) -> Array:
    return jnp.zeros(x.shape[:1], x.dtype)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + loc) * exp(log_scale)`` with data-dependent init.

    At ``model.init`` the parameters are set so that the init batch has zero mean and
    unit variance per channel (channels with standard deviation below ``min_std``, such
    as injected zero channels, keep scale 1). They are ordinary parameters: a restored
    checkpoint is never re-initialized. The log-det is ``(prod of spatial dims) *
    sum(log_scale)`` per example.
    """
    min_std: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        axes = tuple(range(x.ndim - 1))
        channels = x.shape[-1]

        def init_loc(_, shape):
            return -jnp.mean(x, axis=axes).reshape(shape)

        def init_log_scale(_, shape):
            std = jnp.std(x, axis=axes)
            return jnp.where(std > self.min_std, -jnp.log(jnp.maximum(std, self.min_std)),
                             0.0).reshape(shape)

        loc = self.param("loc", init_loc, (channels,))
        log_scale = self.param("log_scale", init_log_scale, (channels,))
        y = (x + loc) * jnp.exp(log_scale)
        spatial = 1
        for s in x.shape[1:-1]:
            spatial *= s
        log_det = jnp.full(x.shape[:1], spatial * jnp.sum(log_scale), x.dtype)
        return y, log_det

    def inverse(self, y: Array) -> Array:
        loc = self.get_variable("params", "loc")
        log_scale = self.get_variable("params", "log_scale")
        if loc is None:
            raise ValueError("ActNorm.inverse needs initialized parameters: call model.init"
                             " with data first")
        return y * jnp.exp(-log_scale) - loc


SQUEEZE_ORDERS = ("spatial", "channel")


def _check_order(order: str):
    if order not in SQUEEZE_ORDERS:
        raise ValueError(f"squeeze order must be one of {SQUEEZE_ORDERS}, got {order!r}")


def squeeze(x: Array, factor: int = 2, order: str = "spatial") -> Array:
    """Space-to-depth ``(B, H, W, C) -> (B, H/f, W/f, f*f*C)``. Channel order [dy, dx, c]
    (``order="spatial"``, the i-ResNet code's) or [c, dy, dx] (``"channel"``, PyTorch's
    ``pixel_unshuffle``, the Residual Flows code's)."""
    _check_order(order)
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"squeeze needs spatial dims divisible by {factor}, got {(h, w)}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    x = x.transpose((0, 1, 3, 2, 4, 5) if order == "spatial" else (0, 1, 3, 5, 2, 4))
    return x.reshape(b, h // factor, w // factor, factor * factor * c)


def unsqueeze(y: Array, factor: int = 2, order: str = "spatial") -> Array:
    """Inverse of ``squeeze``."""
    _check_order(order)
    b, h, w, c4 = y.shape
    if c4 % (factor * factor):
        raise ValueError(f"unsqueeze needs channels divisible by {factor * factor}, got {c4}")
    c = c4 // (factor * factor)
    if order == "spatial":
        y = y.reshape(b, h, w, factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
    else:
        y = y.reshape(b, h, w, c, factor, factor).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(b, h * factor, w * factor, c)


class Squeeze(nn.Module):
    """Invertible downsampling (space-to-depth); log-det 0. See ``squeeze``."""
    factor: int = 2
    order: str = "spatial"

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        return squeeze(x, self.factor, self.order), _zeros_logdet(x)

    def inverse(self, y: Array) -> Array:
        return unsqueeze(y, self.factor, self.order)


class LogitTransform(nn.Module):
    """``y = logit(alpha + (1 - 2 alpha) (x + shift))`` elementwise (Real NVP's
    preprocessing, as the Residual Flows code applies it): data dequantized to
    ``[-shift, 1 - shift)`` to the real line, with its exact log-det."""
    alpha: float = 0.05
    shift: float = 0.5

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        if not 0.0 <= self.alpha < 0.5:
            raise ValueError(f"LogitTransform needs alpha in [0, 0.5), got {self.alpha}")
        # s and 1 - s each from x directly: exact where x is, even when s is near 1.
        s = self.alpha + (1.0 - 2.0 * self.alpha) * (x + self.shift)
        t = self.alpha + (1.0 - 2.0 * self.alpha) * ((1.0 - self.shift) - x)
        y = jnp.log(s) - jnp.log(t)
        ld = jnp.log1p(-2.0 * self.alpha) - jnp.log(s) - jnp.log(t)
        return y, jnp.sum(ld.reshape(x.shape[0], -1), axis=-1)

    def inverse(self, y: Array) -> Array:
        return (jax.nn.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha) - self.shift


class InjectivePad(nn.Module):
    """Appends ``channels`` zero channels (injective padding; Jacobsen et al., 2018).

    The map is injective, not bijective: ``inverse`` drops the padded channels. Its
    log-det is reported as 0 (it is only used by classifiers).
    """
    channels: int

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        if self.channels < 0:
            raise ValueError(f"InjectivePad needs channels >= 0, got {self.channels}")
        pad = jnp.zeros(x.shape[:-1] + (self.channels,), x.dtype)
        return jnp.concatenate([x, pad], axis=-1), _zeros_logdet(x)

    def inverse(self, y: Array) -> Array:
        return y[..., : y.shape[-1] - self.channels]


class FactorOut(nn.Module):
    """Splits off the last ``channels - keep`` channels (multi-scale architectures).

    ``__call__`` returns ``((kept, factored), log_det=0)``; ``inverse((kept, factored))``
    concatenates them back. ``fraction`` of the channels is kept (rounded down, >= 1).
    """
    fraction: float = 0.5

    def split_index(self, channels: int) -> int:
        keep = int(channels * self.fraction)
        if not 1 <= keep < channels:
            raise ValueError(f"FactorOut(fraction={self.fraction}) cannot split {channels} "
                             "channels into two non-empty parts")
        return keep

    def __call__(self, x: Array, *, train: bool = False):
        k = self.split_index(x.shape[-1])
        return (x[..., :k], x[..., k:]), _zeros_logdet(x)

    def inverse(self, y) -> Array:
        kept, factored = y
        return jnp.concatenate([kept, factored], axis=-1)
