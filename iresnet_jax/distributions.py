"""Gaussian log-densities, uniform dequantization and bits per dimension (pure JAX)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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
    """Uniform dequantization to ``[-0.5, 0.5)``: ``(k + u) / n_bins - 0.5``, ``u ~ U[0, 1)``.

    ``pixels`` holds integer levels in ``[0, n_bins)`` (256 for 8-bit images, 17 for
    scikit-learn's digits). The shift (as the official code's ``x - 0.5``) has log-det 0,
    so ``bits_per_dim`` applies unchanged.
    """
    u = jax.random.uniform(key, pixels.shape, jnp.float32)
    return (pixels.astype(jnp.float32) + u) / n_bins - 0.5


def bits_per_dim(log_prob: Array, dim: int, n_bins: int = 256) -> Array:
    """``-(ln p(x) - D ln n_bins) / (D ln 2)`` for data dequantized to a unit interval.

    ``dim`` is the real number of dimensions ``D`` (784 for MNIST, 3072 for CIFAR-10),
    not counting injected channels.
    """
    return -(log_prob - dim * math.log(n_bins)) / (dim * math.log(2.0))
