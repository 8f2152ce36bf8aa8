"""The multiscale density i-ResNet (paper Section 5 and appendix C, "MNIST and CIFAR").

The data ``x`` (NHWC, dequantized to ``[-0.5, 0.5)``) optionally goes through an initial
squeeze, then through scale-blocks: each optionally squeezes (``H x W x C -> H/2 x W/2 x
4C``), applies a stack of i-ResNet blocks (ActNorm, then ``x + g(x)`` with the 3-1-3 conv
branch, spectrally normalized) and, on all scale-blocks but the last, factors out half of
the channels as a latent. The latents are flattened and concatenated into ``z`` of the
data's dimension ``D`` with a learned diagonal Gaussian prior:
``ln p(x) = ln p_z(F(x)) + sum_t ln det J_{F_t}(x)``, the residual log-dets estimated as
``logdet`` says (the paper: the 5- or 10-term series, rng stream ``"logdet"``).

The first block of the network has no leading activation. The factor-out keeps the
first half of the channels in the flow (``keep_half="second"``: the second, as the
official code does).
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
KEEP_HALVES = ("first", "second")


def scale_plan(input_shape: Sequence[int], squeeze: Sequence[bool], initial_squeeze: bool,
               factor_out: bool, keep_half: str = "first") -> list[dict]:
    """Static shapes of the multiscale flow for one example ``(H, W, C)``: per scale-block
    ``"blocks_shape"`` (what its blocks act on) and ``"factored_shape"`` (or ``None``).
    ``keep_half="first"`` keeps ``C // 2`` channels, ``"second"`` factors ``C // 2`` out."""
    if keep_half not in KEEP_HALVES:
        raise ValueError(f"keep_half must be one of {KEEP_HALVES}, got {keep_half!r}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
    h, w, c = (int(s) for s in input_shape)

    def squeezed(h, w, c, where):
        if h % 2 or w % 2:
            raise ValueError(f"cannot squeeze a {h}x{w} input ({where}): spatial dims must be "
                             "even")
        return h // 2, w // 2, 4 * c

    if initial_squeeze:
        h, w, c = squeezed(h, w, c, "initial squeeze")
    plan = []
    for i, sq in enumerate(squeeze):
        if sq:
            h, w, c = squeezed(h, w, c, f"scale {i}")
        entry = {"blocks_shape": (h, w, c), "factored_shape": None}
        if factor_out and i < len(squeeze) - 1:
            keep = c // 2 if keep_half == "first" else c - c // 2
            if keep < 1 or keep == c:
                raise ValueError(f"cannot factor out half of {c} channel(s) after scale {i}")
            entry["factored_shape"] = (h, w, c - keep)
            c = keep
        plan.append(entry)
    return plan


class MultiscaleDensity(flow.DensityFlow):
    """Multiscale density i-ResNet with a learned diagonal Gaussian prior.

    Attributes:
      input_shape: ``(H, W, C)`` of one example.
      blocks_per_scale: i-ResNet blocks per scale-block (paper: ``(32, 32, 32)``).
      squeeze: whether each scale-block starts with a squeeze.
      initial_squeeze: squeeze the input before the first scale-block.
      factor_out: factor out half the channels after every scale-block but the last.
      keep_half: which half of the channels stays in the flow at a factor-out,
        ``"first"`` or ``"second"`` (the official code's).
      hidden: channels of the inner convs (paper: 32 MNIST, 512 CIFAR-10), one int or
        one per scale-block.
      coeff: Lipschitz coefficient of every conv, in (0, 1).
      n_power_iter: power iterations per training forward (official code: 5).
      activation: ``"elu"`` (paper), ``"softplus"`` or ``"lipswish"``.
      logdet: the log-det estimator (paper: series, 10 terms MNIST, 5 CIFAR-10).
      inverse_config: the fixed-point inverse's settings.
      learn_prior: learned diagonal Gaussian or the standard normal.
      actnorm: ActNorm before every block.
      stored_sigma: evaluate the convs with their stored ``sigma`` (``layers.SpectralConv``;
        converted checkpoints).
      remat: rematerialize each block in the backward pass.
      unroll: blocks per iteration of each scale's compiled loop (``flow.BlockStack``).
      padding: the convs' padding, ``"SAME"`` or ``"CIRCULAR"``.
      conv: how the convs are computed (``iresnet_jax.conv.IMPLS``).

    Example:
      >>> model = MultiscaleDensity(input_shape=(8, 8, 1), blocks_per_scale=(2, 2, 2),
      ...                           squeeze=(False, True, False))
      >>> x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1)) - 0.5
      >>> variables = jax.jit(model.init)(jax.random.key(1), x)
      >>> lp = model.apply(variables, x, method="log_prob",
      ...                  rngs={"logdet": jax.random.key(2)})
      >>> xs = model.apply(variables, 4, method="sample", rngs={"sample": jax.random.key(3)})
    """
    input_shape: Sequence[int]
    blocks_per_scale: Sequence[int] = (32, 32, 32)
    squeeze: Sequence[bool] = (False, True, True)
    initial_squeeze: bool = True
    factor_out: bool = True
    keep_half: str = "first"
    hidden: int | Sequence[int] = 32
    coeff: float = 0.9
    n_power_iter: int = 5
    activation: str = "elu"
    logdet: LogDetConfig = LogDetConfig("series", n_terms=5)
    inverse_config: InverseConfig = InverseConfig()
    learn_prior: bool = True
    actnorm: bool = True
    stored_sigma: bool = False
    remat: bool = False
    unroll: int = 1
    padding: str = "SAME"
    conv: str = "xla"

    def setup(self):
        if len(self.blocks_per_scale) != len(self.squeeze):
            raise ValueError(f"blocks_per_scale {tuple(self.blocks_per_scale)} and squeeze "
                             f"{tuple(self.squeeze)} must have the same length")
        if self.coeff is None:
            raise ValueError("a density model needs a Lipschitz coefficient in (0, 1), got "
                             "coeff=None")

        n_scales = len(self.blocks_per_scale)
        hidden = ((self.hidden,) * n_scales if isinstance(self.hidden, int)
                  else tuple(self.hidden))
        if len(hidden) != n_scales:
            raise ValueError(f"hidden needs one width per scale-block ({n_scales}), got "
                             f"{hidden}")

        def maker(width: int):
            def block(leading: bool):
                branch = blocks.ConvBranch(hidden=width, coeff=self.coeff,
                                           n_power_iter=self.n_power_iter,
                                           activation=self.activation,
                                           leading_activation=leading, padding=self.padding,
                                           conv=self.conv, stored_sigma=self.stored_sigma)
                return blocks.InvertibleBlock(branch,
                                              actnorm="before" if self.actnorm else None,
                                              logdet=self.logdet,
                                              inverse_config=self.inverse_config)
            return block

        self.scales = [block_stack(maker(width), n, first_without_activation=(i == 0),
                                   remat=self.remat, unroll=self.unroll)
                       for i, (n, width) in enumerate(zip(self.blocks_per_scale, hidden))]
        self.prior = flow.DiagonalGaussianPrior(learn=self.learn_prior)

    def plan(self) -> list[dict]:
        """``scale_plan`` of this model."""
        return scale_plan(self.input_shape, self.squeeze, self.initial_squeeze,
                          self.factor_out, self.keep_half)

    @property
    def latent_dim(self) -> int:
        """The data's number of dimensions ``D``."""
        return math.prod(int(s) for s in self.input_shape)

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        if tuple(x.shape[1:]) != tuple(int(s) for s in self.input_shape):
            raise ValueError(f"this model was built for inputs of shape "
                             f"{tuple(self.input_shape)}, got {tuple(x.shape[1:])}")
        batch = x.shape[0]
        log_det = jnp.zeros((batch,), x.dtype)
        h = layers.squeeze(x) if self.initial_squeeze else x
        zs = []
        for i, (scale, entry) in enumerate(zip(self.scales, self.plan())):
            if self.squeeze[i]:
                h = layers.squeeze(h)
            h, ld = scale(h, train=train)
            log_det = log_det + ld
            if entry["factored_shape"] is not None:
                keep = h.shape[-1] - entry["factored_shape"][-1]
                if self.keep_half == "first":
                    h, factored = h[..., :keep], h[..., keep:]
                else:
                    factored, h = h[..., :-keep], h[..., -keep:]
                zs.append(factored.reshape(batch, -1))
        zs.append(h.reshape(batch, -1))
        z = jnp.concatenate(zs, axis=-1)
        if self.is_initializing():
            self.prior(z)  # creates the prior's parameters at model.init
        return z, log_det

    def inverse(self, z: Array, *, n_iter: int | Array | None = None) -> Array:
        if z.ndim != 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"inverse expects flat latents (batch, {self.latent_dim}), got "
                             f"{tuple(z.shape)}")
        batch = z.shape[0]
        plan = self.plan()
        sizes = [math.prod(e["factored_shape"]) for e in plan
                 if e["factored_shape"] is not None]
        offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        h = z[:, offsets[-1]:].reshape((batch,) + tuple(plan[-1]["blocks_shape"]))
        k = len(sizes)
        for i in reversed(range(len(self.scales))):
            shape = plan[i]["factored_shape"]
            if shape is not None:
                k -= 1
                piece = z[:, offsets[k]:offsets[k + 1]].reshape((batch,) + tuple(shape))
                h = jnp.concatenate([h, piece] if self.keep_half == "first" else [piece, h],
                                    axis=-1)
            h = self.scales[i].inverse(h, n_iter=n_iter)
            if self.squeeze[i]:
                h = layers.unsqueeze(h)
        return layers.unsqueeze(h) if self.initial_squeeze else h
