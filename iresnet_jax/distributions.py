"""Priors, dequantization and bits per dimension (SPEC section 4)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from iresnet_jax import utils

Array = jax.Array

LOG_2PI = math.log(2.0 * math.pi)


def _flat_sum(a: Array) -> Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def standard_normal_log_prob(z: Array) -> Array:
    """Per-example ``ln N(z; 0, I)``."""
    return _flat_sum(-0.5 * (z * z + LOG_2PI))


def diag_normal_log_prob(z: Array, mean: Array, log_std: Array) -> Array:
    """Per-example ``ln N(z; mean, diag(exp(log_std))^2)``; mean/log_std broadcast."""
    return _flat_sum(-0.5 * (((z - mean) * jnp.exp(-log_std)) ** 2 + LOG_2PI) - log_std)


def dequantize(key: Array, pixels: Array, n_bins: int = 256) -> Array:
    """Uniform dequantization ``x = (k + u) / n_bins`` with ``u ~ U[0, 1)``.

    ``pixels`` holds integers in ``[0, n_bins)``; the result lies in ``[0, 1)``.
    """
    u = utils.uniform(key, pixels.shape, jnp.float32)
    return (pixels.astype(jnp.float32) + u) / n_bins


def bits_per_dim(log_prob: Array, dim: int, n_bins: int = 256) -> Array:
    """``-(ln p(x) - D ln n_bins) / (D ln 2)`` for data dequantized to ``[0, 1)``.

    ``log_prob`` is the density of the dequantized data scaled to ``[0, 1)`` (add the
    log-det of any further affine preprocessing to it first); ``dim`` is the real number of
    dimensions (784 for MNIST, 3072 for CIFAR10), not counting injected channels.
    """
    return -(log_prob - dim * math.log(n_bins)) / (dim * math.log(2.0))
