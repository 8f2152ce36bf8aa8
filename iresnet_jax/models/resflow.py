"""The Residual Flow of Chen et al. (2019), as the official ``train_img.py`` builds its
``ResidualFlow`` for images (github.com/rtqichen/residual-flows).

The data ``x`` (NHWC, dequantized to ``[-0.5, 0.5)``) goes through the logit transform
(``logit_alpha``; the official code's inputs are ``x + 0.5``), an optional first squeeze,
then through scales. Scale ``i`` is: ActNorm (first scale only), ``blocks_per_scale[i]``
residual blocks ``x + g(x)`` each followed by ActNorm, with the 3-1-3 conv branch and
LipSwish; on every scale but the last a squeeze (channel order ``[c, dy, dx]``) and, with
``factor_out``, half of the channels leave as a latent; the last scale ends with
``fc_blocks`` fully connected residual blocks on the flattened ``C x H x W`` vector, each
followed by ActNorm. Latents are flattened channel-major (NCHW order), as the official
code's, under a standard normal prior. The log-det of each residual block is estimated as
``logdet`` says (the official training: the Russian roulette, Poisson(2) with 2 exact
terms, Neumann gradient).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from iresnet_jax import blocks, flow, layers
from iresnet_jax.inverse import InverseConfig
from iresnet_jax.logdet import LogDetConfig
from iresnet_jax.models.common import block_stack

Array = jax.Array
SQUEEZE_ORDER = "channel"


def n_scales(input_shape: Sequence[int], blocks_per_scale: Sequence[int],
             squeeze_first: bool) -> int:
    """The official number of scales: one per entry of ``blocks_per_scale``, at most as
    many as halvings keep the grid at least 4x4."""
    h, w = int(input_shape[0]), int(input_shape[1])
    if squeeze_first:
        h, w = h // 2, w // 2
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return min(len(blocks_per_scale), n)


def flat_nchw(x: Array) -> Array:
    """``(B, H, W, C) -> (B, C*H*W)`` in channel-major order (PyTorch's ``view``)."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def unflat_nchw(v: Array, shape: Sequence[int]) -> Array:
    """Inverse of ``flat_nchw`` for one example's ``(H, W, C)``."""
    h, w, c = shape
    return jnp.transpose(v.reshape(v.shape[0], c, h, w), (0, 2, 3, 1))


class ResidualFlow(flow.DensityFlow):
    """The Residual Flow image model (official ``ResidualFlow``, ``block_type=resblock``).

    Attributes:
      input_shape: ``(H, W, C)`` of one example.
      blocks_per_scale: residual blocks per scale (CIFAR-10, MNIST: ``(16, 16, 16)``);
        scales beyond what the input size allows are dropped, as the official code does.
      hidden: channels of the inner convs (``--idim``, 512).
      kernel_sizes: the conv branch's kernels (``--kernels 3-1-3``); the fully connected
        branches have one hidden layer fewer than there are kernels.
      fc_blocks: fully connected blocks at the end of the last scale (``--fc-end``: 4;
        0 for none); fc_hidden: their width (``--fc-idim``, 128).
      squeeze_first: squeeze the input before the first scale (``--squeeze-first``).
      factor_out: factor out half the channels after every scale but the last.
      actnorm: ActNorm after every block and before the first (``--actnorm``).
      first_resblock: the network's first block has no leading activation and is
        preceded by ActNorm (``--first-resblock``); preact: the others have one.
      logit_alpha: the logit transform's ``alpha`` (MNIST 1e-6, else 0.05; ``None``: none).
      coeff: Lipschitz coefficient of every linear map (``--coeff``, 0.98).
      n_power_iter: power iterations per training forward (the official code iterates
        after each optimizer step to a tolerance instead).
      activation: ``"lipswish"`` (``--act swish``) or ``"elu"``, ``"softplus"``.
      logdet, inverse_config: the log-det estimator and the inverse's settings.
      stored_sigma: evaluate with the stored ``sigma`` (converted checkpoints).
      remat, unroll, padding, conv: as in ``MultiscaleDensity`` (the official padding:
        zeros, ``"SAME"``).
    """
    input_shape: Sequence[int]
    blocks_per_scale: Sequence[int] = (16, 16, 16)
    hidden: int = 512
    kernel_sizes: Sequence[int] = (3, 1, 3)
    fc_blocks: int = 4
    fc_hidden: int = 128
    squeeze_first: bool = False
    factor_out: bool = False
    actnorm: bool = True
    first_resblock: bool = True
    preact: bool = True
    logit_alpha: float | None = 0.05
    coeff: float = 0.98
    n_power_iter: int = 5
    activation: str = "lipswish"
    logdet: LogDetConfig = LogDetConfig("roulette", n_exact=2, distribution="poisson",
                                        poisson_lambda=2.0, gradient="neumann")
    inverse_config: InverseConfig = InverseConfig()
    stored_sigma: bool = False
    remat: bool = False
    unroll: int = 1
    padding: str = "SAME"
    conv: str = "xla"

    def plan(self) -> list[dict]:
        """Per scale: ``"shape"`` its blocks act on and ``"factored_shape"`` (or None)."""
        h, w, c = (int(s) for s in self.input_shape)
        if self.squeeze_first:
            if h % 2 or w % 2:
                raise ValueError(f"squeeze_first needs even spatial dims, got {(h, w)}")
            h, w, c = h // 2, w // 2, 4 * c
        n = n_scales(self.input_shape, self.blocks_per_scale, self.squeeze_first)
        if n < 1:
            raise ValueError(f"input {tuple(self.input_shape)} is too small for a scale "
                             "(at least 4x4 after squeeze_first)")
        out = []
        for i in range(n):
            entry = {"shape": (h, w, c), "factored_shape": None}
            if i < n - 1:
                h, w, c = h // 2, w // 2, 4 * c
                if self.factor_out:
                    entry["factored_shape"] = (h, w, c - c // 2)
                    c = c // 2
            out.append(entry)
        return out

    def _block(self, branch):
        return blocks.InvertibleBlock(branch, actnorm="after" if self.actnorm else None,
                                      logdet=self.logdet,
                                      inverse_config=self.inverse_config)

    def setup(self):
        plan = self.plan()
        common = dict(coeff=self.coeff, n_power_iter=self.n_power_iter,
                      activation=self.activation, stored_sigma=self.stored_sigma)

        def conv_block(leading: bool):
            return self._block(blocks.ConvBranch(
                hidden=self.hidden, kernel_sizes=tuple(self.kernel_sizes), conv=self.conv,
                padding=self.padding,
                leading_activation=leading and self.preact, **common))

        first = self.first_resblock and len(plan) > 1
        self.scales = [block_stack(conv_block, self.blocks_per_scale[i],
                                   first_without_activation=first and i == 0,
                                   remat=self.remat, unroll=self.unroll)
                       for i in range(len(plan))]
        if self.fc_blocks > 0:
            fc = self._block(blocks.MLPBranch(
                hidden=(self.fc_hidden,) * (len(self.kernel_sizes) - 1),
                leading_activation=self.preact, **common))
            self.fc = flow.BlockStack(fc, n=self.fc_blocks, remat=self.remat)
        if self.logit_alpha is not None:
            self.logit = layers.LogitTransform(self.logit_alpha)
        if self.leading_norm():
            self.first_norm = layers.ActNorm()
        self.prior = flow.DiagonalGaussianPrior(learn=False)

    def leading_norm(self) -> bool:
        """Whether ActNorm precedes the first block (the official ``first_resblock``)."""
        return self.actnorm and self.first_resblock and len(self.plan()) > 1

    @property
    def latent_dim(self) -> int:
        return math.prod(int(s) for s in self.input_shape)

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        if tuple(x.shape[1:]) != tuple(int(s) for s in self.input_shape):
            raise ValueError(f"this model was built for inputs of shape "
                             f"{tuple(self.input_shape)}, got {tuple(x.shape[1:])}")
        log_det = jnp.zeros(x.shape[:1], x.dtype)
        if self.logit_alpha is not None:
            x, log_det = self.logit(x)
        else:
            x = x + 0.5
        h = layers.squeeze(x, order=SQUEEZE_ORDER) if self.squeeze_first else x
        if self.leading_norm():
            h, ld = self.first_norm(h)
            log_det = log_det + ld
        plan, zs = self.plan(), []
        for i, (scale, entry) in enumerate(zip(self.scales, plan)):
            h, ld = scale(h, train=train)
            log_det = log_det + ld
            if i == len(plan) - 1:
                break
            h = layers.squeeze(h, order=SQUEEZE_ORDER)
            if entry["factored_shape"] is not None:
                keep = h.shape[-1] - entry["factored_shape"][-1]
                zs.append(flat_nchw(h[..., keep:]))
                h = h[..., :keep]
        if self.fc_blocks > 0:
            v, ld = self.fc(flat_nchw(h), train=train)
            log_det = log_det + ld
        else:
            v = flat_nchw(h)
        z = jnp.concatenate(zs + [v], axis=-1)
        return z, log_det

    def inverse(self, z: Array, *, n_iter: int | Array | None = None) -> Array:
        if z.ndim != 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"inverse expects flat latents (batch, {self.latent_dim}), got "
                             f"{tuple(z.shape)}")
        plan = self.plan()
        sizes = [math.prod(e["factored_shape"]) for e in plan[:-1] if e["factored_shape"]]
        offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        v = z[:, offsets[-1]:]
        if self.fc_blocks > 0:
            v = self.fc.inverse(v, n_iter=n_iter)
        h = unflat_nchw(v, plan[-1]["shape"])
        k = len(sizes)
        for i in reversed(range(len(plan))):
            if i < len(plan) - 1:
                shape = plan[i]["factored_shape"]
                if shape is not None:
                    k -= 1
                    piece = unflat_nchw(z[:, offsets[k]:offsets[k + 1]], shape)
                    h = jnp.concatenate([h, piece], axis=-1)
                h = layers.unsqueeze(h, order=SQUEEZE_ORDER)
            h = self.scales[i].inverse(h, n_iter=n_iter)
        if self.leading_norm():
            h = self.first_norm.inverse(h)
        x = layers.unsqueeze(h, order=SQUEEZE_ORDER) if self.squeeze_first else h
        if self.logit_alpha is not None:
            return self.logit.inverse(x)
        return x - 0.5
