"""Invertible layers without a Lipschitz constraint (flow protocol).

``ActNorm`` initializes from data at ``model.init`` (Glow). ``Squeeze`` is space-to-depth
with the channel order ``[dy, dx, c]`` of the official i-ResNet code: output channel
``dy * 2C + dx * C + c`` holds input pixel ``(2i + dy, 2j + dx)``, channel ``c``.
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


def squeeze(x: Array, factor: int = 2) -> Array:
    """Space-to-depth ``(B, H, W, C) -> (B, H/f, W/f, f*f*C)``, channel order [dy, dx, c]."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"squeeze needs spatial dims divisible by {factor}, got {(h, w)}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // factor, w // factor, factor * factor * c)


def unsqueeze(y: Array, factor: int = 2) -> Array:
    """Inverse of ``squeeze``."""
    b, h, w, c4 = y.shape
    if c4 % (factor * factor):
        raise ValueError(f"unsqueeze needs channels divisible by {factor * factor}, got {c4}")
    c = c4 // (factor * factor)
    y = y.reshape(b, h, w, factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h * factor, w * factor, c)


class Squeeze(nn.Module):
    """Invertible downsampling (space-to-depth); log-det 0. See ``squeeze``."""
    factor: int = 2

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        return squeeze(x, self.factor), _zeros_logdet(x)

    def inverse(self, y: Array) -> Array:
        return unsqueeze(y, self.factor)


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
