"""The i-ResNet of the paper's toy-density experiments.

``n_blocks`` blocks ``x + g(x)`` with ``g`` an MLP (paper: 2-64-64-64-2 with ELU, 100
blocks), ActNorm after each block, the exact log-det (the paper's choice in 2-D; the
estimators by ``logdet``) and a standard normal prior.
"""

from __future__ import annotations

from typing import Sequence

import jax

from iresnet_jax import blocks, flow
from iresnet_jax.inverse import InverseConfig
from iresnet_jax.logdet import LogDetConfig

Array = jax.Array


class ToyIResNet(flow.DensityFlow):
    """The toy-density i-ResNet.

    Attributes:
      dim: dimension of the data (2).
      n_blocks: residual blocks (paper: 100).
      hidden: hidden sizes of each branch MLP (paper: (64, 64, 64)).
      coeff: spectral-normalization coefficient per linear layer, in (0, 1).
      n_power_iter: power iterations per training step.
      activation: ``"elu"`` (paper), ``"softplus"`` or ``"lipswish"``.
      actnorm: ActNorm after each block.
      zero_init_last: start each branch's last layer at zero.
      logdet: log-det method (paper: exact in 2-D).
      inverse_config: the fixed-point inverse's settings (sampling, inversion).
      remat: rematerialize blocks in the backward pass; on XLA:CPU storing only each
        block's input is faster for these small blocks than stacking their residuals.
      unroll, hoist: as in ``flow.BlockStack``.

    Example:
      >>> model = ToyIResNet(n_blocks=4)
      >>> x = jnp.zeros((8, 2))
      >>> variables = jax.jit(model.init)(jax.random.key(0), x)
      >>> lp = model.apply(variables, x, method="log_prob")
    """
    dim: int = 2
    n_blocks: int = 100
    hidden: Sequence[int] = (64, 64, 64)
    coeff: float = 0.9
    n_power_iter: int = 1
    activation: str = "elu"
    actnorm: bool = True
    zero_init_last: bool = False
    logdet: LogDetConfig = LogDetConfig("exact")
    inverse_config: InverseConfig = InverseConfig(max_iter=200)
    remat: bool = True
    unroll: int = 1
    hoist: bool = True

    def setup(self):
        branch = blocks.MLPBranch(hidden=tuple(self.hidden), coeff=self.coeff,
                                  n_power_iter=self.n_power_iter, activation=self.activation,
                                  leading_activation=False,
                                  zero_init_last=self.zero_init_last)
        block = blocks.InvertibleBlock(branch, actnorm="after" if self.actnorm else None,
                                       logdet=self.logdet,
                                       inverse_config=self.inverse_config)
        self.blocks = flow.BlockStack(block, n=self.n_blocks, remat=self.remat,
                                      unroll=self.unroll, hoist=self.hoist)
        self.prior = flow.DiagonalGaussianPrior(learn=False)

    @property
    def latent_dim(self) -> int:
        return self.dim

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"ToyIResNet expects inputs of shape (batch, {self.dim}), got "
                             f"{x.shape}")
        return self.blocks(x, train=train)

    def inverse(self, z: Array, *, n_iter: int | Array | None = None) -> Array:
        return self.blocks.inverse(z, n_iter=n_iter)
