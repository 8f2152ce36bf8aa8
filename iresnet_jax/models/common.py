"""Pieces shared by the image models: the learned diagonal Gaussian prior and stacks of
i-ResNet conv blocks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from iresnet_jax import blocks
from iresnet_jax import distributions
from iresnet_jax import flow
from iresnet_jax import logdet as logdet_lib
from iresnet_jax import utils

Array = jax.Array


class DiagonalGaussianPrior(nn.Module):
    """A diagonal Gaussian over flat vectors ``(batch, D)``, learned or standard.

    With ``learn=True`` it holds ``mean`` and ``log_std`` of shape ``(D,)`` (zeros at init,
    i.e. the standard normal); their shape is taken from the first ``z`` it sees (at
    ``model.init``). With ``learn=False`` it is the standard normal and has no parameters.
    """
    learn: bool = True

    @nn.compact
    def __call__(self, z: Array) -> Array:
        """Per-example ``ln N(z; mean, diag(exp(log_std))^2)``."""
        if z.ndim != 2:
            raise ValueError(f"the prior expects flat latents (batch, D), got {z.shape}")
        if not self.learn:
            return distributions.standard_normal_log_prob(z)
        mean = self.param("mean", nn.initializers.zeros, (z.shape[-1],), z.dtype)
        log_std = self.param("log_std", nn.initializers.zeros, (z.shape[-1],), z.dtype)
        return distributions.diag_normal_log_prob(z, mean, log_std)

    def sample(self, key: Array, n: int, dim: int, dtype=jnp.float32,
               temperature: float = 1.0) -> Array:
        """``n`` draws of dimension ``dim`` (the standard deviation scaled by
        ``temperature``)."""
        eps = utils.normal(key, (n, dim), dtype) * temperature
        if not self.learn:
            return eps
        mean = self.get_variable("params", "mean")
        log_std = self.get_variable("params", "log_std")
        if mean is None:
            raise ValueError("the learned prior has no parameters yet: initialize the model "
                             "(model.init) with data first")
        return mean + jnp.exp(log_std) * eps


def conv_block(*, hidden: int, coeff: float | None, n_power_iter: int, activation: str,
               leading_activation: bool, logdet: logdet_lib.LogDetConfig,
               actnorm: str | None = "before", padding: str = "SAME",
               narrowing: str = "conv", widening: str = "patches", inverse_tol: float = 1e-6,
               inverse_max_iter: int = 100,
               inverse_method: str = "plain", inverse_rtol: float = 0.0
               ) -> blocks.InvertibleBlock:
    """One image i-ResNet block: ActNorm, then ``x + g(x)`` with the 3-1-3 conv branch."""
    branch = blocks.ConvBranch(hidden=hidden, coeff=coeff, n_power_iter=n_power_iter,
                               activation=activation, leading_activation=leading_activation,
                               padding=padding, narrowing=narrowing, widening=widening)
    return blocks.InvertibleBlock(branch, actnorm=actnorm, logdet=logdet,
                                  inverse_tol=inverse_tol, inverse_max_iter=inverse_max_iter,
                                  inverse_method=inverse_method, inverse_rtol=inverse_rtol)


def block_stack(n: int, first_without_activation: bool, remat: bool, unroll: int = 1,
                **block_kw) -> nn.Module:
    """``n`` blocks as one ``nn.scan``; a network's first block (no leading activation)
    is applied on its own before the scanned rest. ``unroll``: blocks per iteration of the
    compiled loop (``flow.BlockStack``)."""
    if n < 1:
        raise ValueError(f"a stage needs at least one block, got {n}")
    if not first_without_activation:
        return flow.BlockStack(conv_block(leading_activation=True, **block_kw), n=n,
                               remat=remat, unroll=min(unroll, n))
    first = conv_block(leading_activation=False, **block_kw)
    if n == 1:
        return flow.Chain([first])
    rest = flow.BlockStack(conv_block(leading_activation=True, **block_kw), n=n - 1,
                           remat=remat, unroll=min(unroll, n - 1))
    return flow.Chain([first, rest])
