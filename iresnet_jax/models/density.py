"""The multiscale density i-ResNet (paper Section 5 and appendix C, "MNIST and CIFAR").

The data ``x`` (NHWC) optionally goes through an initial squeeze, then through scale-blocks:
each scale-block optionally squeezes (``H x W x C -> H/2 x W/2 x 4C``), applies a stack of
i-ResNet blocks (ActNorm, then ``x + g(x)`` with ``g = [phi] -> conv3x3 -> phi -> conv1x1 ->
phi -> conv3x3``, spectrally normalized) and, on all scale-blocks but the last, factors out
half of the channels as a latent variable (multi-scale). The latents are flattened and
concatenated into one vector ``z`` of the data's dimension ``D`` with a learned diagonal
Gaussian prior. By the change of variables (SPEC section 4)::

    ln p(x) = ln p_z(F(x)) + sum_t ln det J_{F_t}(x),

where each residual log-det is estimated by the truncated power series of Eq. (4) with
Hutchinson probes (Algorithm 2; rng stream ``"logdet"``). The first block of the network
has no leading activation (as in the official code, every block of later scales has one).

``FactorOut`` keeps the first half of the channels in the flow and factors out the second
half (the official code keeps the second half; the choice does not change the model
class). Sampling draws ``z`` from the prior (rng stream ``"sample"``) and inverts all
scales by fixed-point iteration (Algorithm 1).

Bits per dimension for 8-bit images use uniform dequantization ``x = (k + u) / 256`` shifted
to ``[-0.5, 0.5)`` (a shift: log-det 0) and the real number of dimensions ``D``; see
``dequantize`` and ``bits_per_dim``.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iresnet_jax import distributions
from iresnet_jax import layers
from iresnet_jax import logdet as logdet_lib
from iresnet_jax.models.common import DiagonalGaussianPrior, block_stack

Array = jax.Array

# Dequantized data in [0, 1) are shifted by this much before the flow (as in the official
# code's ``x - 0.5``); a shift has log-det 0.
DATA_SHIFT = -0.5


def scale_plan(input_shape: Sequence[int], squeeze: Sequence[bool], initial_squeeze: bool,
               factor_out: bool) -> list[dict]:
    """Static shapes of the multiscale flow for one example of shape ``(H, W, C)``.

    Returns one dict per scale-block with ``"blocks_shape"`` (the shape its i-ResNet blocks
    act on) and ``"factored_shape"`` (the latent it factors out, or ``None``).
    """
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
            keep = c // 2  # as layers.FactorOut(0.5)
            if keep < 1:
                raise ValueError(f"cannot factor out half of {c} channel(s) after scale {i}")
            entry["factored_shape"] = (h, w, c - keep)
            c = keep
        plan.append(entry)
    return plan


class MultiscaleDensity(nn.Module):
    """Multiscale density i-ResNet with a learned diagonal Gaussian prior.

    Attributes:
      input_shape: ``(H, W, C)`` of one example (needed to split ``z`` when sampling).
      blocks_per_scale: i-ResNet blocks in each scale-block (paper: ``(32, 32, 32)``).
      squeeze: whether each scale-block starts with a squeeze (official CIFAR10 layout:
        ``(False, True, True)`` after an initial squeeze).
      initial_squeeze: squeeze the input before the first scale-block.
      factor_out: factor out half the channels after every scale-block but the last.
      hidden: channels of the inner convs (paper: 32 MNIST, 512 CIFAR10).
      coeff: Lipschitz coefficient of every conv, in (0, 1).
      n_power_iter: power iterations per training forward (official code: 5).
      activation: ``"elu"`` (paper), ``"softplus"`` or ``"lipswish"``.
      logdet: the log-det estimator (paper: series with 10 terms MNIST, 5 CIFAR10, one
        Gaussian probe).
      learn_prior: learned diagonal Gaussian (``True``) or the standard normal.
      remat: rematerialize each block in the backward pass.
      unroll: blocks per iteration of each scale's compiled loop (``flow.BlockStack``).
        Unrolling small stacks lets XLA fuse across blocks and avoids stacking the
        backward pass's residuals in loop buffers (the ANCHORS.md model: 4 blocks per
        scale, ``unroll=4``, trains about twice as fast on a 2-core CPU); compile time
        grows with it.
      narrowing: how the branches' channel-narrowing convs are computed
        (``lipschitz.conv2d``; the same operator either way): ``"auto_hybrid"`` (the
        default: ``"hybrid"`` on CPU, the output-side value with ``lax.conv``'s
        derivatives, which made the ANCHORS.md density model's evaluation and inverse
        ~15% faster without slowing its training steps; ``"conv"`` on GPU/TPU, where it
        was not measured), ``"conv"`` (``lax.conv``), ``"col2im"`` (output-side value
        and derivatives: its Neumann-gradient step was 10-17% slower) or ``"auto"``.
      widening: the derivatives of the branches' channel-widening convs, whose value is
        always an im2col matrix product: ``"auto_hybrid"`` (the default: ``lax.conv``'s
        derivatives on CPU, ``lipschitz.conv2d_patches_hybrid``; the patches' own
        elsewhere), ``"hybrid"`` or ``"patches"``. On the ANCHORS.md model the hybrid cut
        the compile time of the log-det training steps by a quarter (30 -> 23 s and 28 ->
        20 s) and did not slow them.
      inverse_tol, inverse_max_iter, inverse_method, inverse_rtol: fixed-point inverse
        settings (``inverse.fixed_point``'s ``tol``, ``max_iter``, ``method``, ``rtol``).

    Methods: ``__call__(x, *, train=False) -> (z, log_det)`` with flat ``z`` of shape
    ``(batch, D)``; ``inverse(z) -> x``; ``log_prob(x, *, train=False)``;
    ``sample(n, *, temperature=1.0)`` (rng stream ``"sample"``).

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
    hidden: int = 32
    coeff: float = 0.9
    n_power_iter: int = 5
    activation: str = "elu"
    logdet: logdet_lib.LogDetConfig = logdet_lib.LogDetConfig("series", n_terms=5)
    learn_prior: bool = True
    remat: bool = False
    unroll: int = 1
    padding: str = "SAME"
    narrowing: str = "auto_hybrid"
    widening: str = "auto_hybrid"
    inverse_tol: float = 1e-6
    inverse_max_iter: int = 100
    inverse_method: str = "plain"
    inverse_rtol: float = 0.0

    def setup(self):
        if len(self.blocks_per_scale) != len(self.squeeze):
            raise ValueError(f"blocks_per_scale {tuple(self.blocks_per_scale)} and squeeze "
                             f"{tuple(self.squeeze)} must have the same length")
        if self.coeff is None:
            raise ValueError("a density model needs a Lipschitz coefficient in (0, 1), got "
                             "coeff=None")
        block_kw = dict(hidden=self.hidden, coeff=self.coeff, n_power_iter=self.n_power_iter,
                        activation=self.activation, logdet=self.logdet, padding=self.padding,
                        narrowing=self.narrowing, widening=self.widening,
                        inverse_tol=self.inverse_tol,
                        inverse_max_iter=self.inverse_max_iter,
                        inverse_method=self.inverse_method, inverse_rtol=self.inverse_rtol)
        self.scales = [block_stack(n, i == 0, self.remat, self.unroll, **block_kw)
                       for i, n in enumerate(self.blocks_per_scale)]
        self.prior = DiagonalGaussianPrior(learn=self.learn_prior)

    def _plan(self) -> list[dict]:
        return scale_plan(self.input_shape, self.squeeze, self.initial_squeeze,
                          self.factor_out)

    @property
    def dim(self) -> int:
        """The data's number of dimensions ``D``."""
        return math.prod(int(s) for s in self.input_shape)

    def _check_input(self, x: Array):
        if tuple(x.shape[1:]) != tuple(int(s) for s in self.input_shape):
            raise ValueError(f"this model was built for inputs of shape "
                             f"{tuple(self.input_shape)}, got {tuple(x.shape[1:])}")

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        self._check_input(x)
        batch = x.shape[0]
        log_det = jnp.zeros((batch,), x.dtype)
        h = layers.squeeze(x) if self.initial_squeeze else x
        zs = []
        for i, (scale, entry) in enumerate(zip(self.scales, self._plan())):
            if self.squeeze[i]:
                h = layers.squeeze(h)
            h, ld = scale(h, train=train)
            log_det = log_det + ld
            if entry["factored_shape"] is not None:
                keep = h.shape[-1] - entry["factored_shape"][-1]
                zs.append(h[..., keep:].reshape(batch, -1))
                h = h[..., :keep]
        zs.append(h.reshape(batch, -1))
        z = jnp.concatenate(zs, axis=-1)
        if self.is_initializing():
            self.prior(z)  # creates the prior's parameters at model.init
        return z, log_det

    def inverse(self, z: Array) -> Array:
        if z.ndim != 2 or z.shape[-1] != self.dim:
            raise ValueError(f"inverse expects flat latents (batch, {self.dim}), got "
                             f"{tuple(z.shape)}")
        batch = z.shape[0]
        plan = self._plan()
        sizes = [math.prod(e["factored_shape"]) for e in plan
                 if e["factored_shape"] is not None]
        offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        final = plan[-1]["blocks_shape"]
        h = z[:, offsets[-1]:].reshape((batch,) + tuple(final))
        k = len(sizes)
        for i in reversed(range(len(self.scales))):
            shape = plan[i]["factored_shape"]
            if shape is not None:
                k -= 1
                piece = z[:, offsets[k]:offsets[k + 1]].reshape((batch,) + tuple(shape))
                h = jnp.concatenate([h, piece], axis=-1)
            h = self.scales[i].inverse(h)
            if self.squeeze[i]:
                h = layers.unsqueeze(h)
        return layers.unsqueeze(h) if self.initial_squeeze else h

    def log_prob(self, x: Array, *, train: bool = False) -> Array:
        """Per-example ``ln p(x)`` (change of variables, SPEC section 4)."""
        z, log_det = self(x, train=train)
        return self.prior(z) + log_det

    def sample(self, n: int, *, temperature: float = 1.0) -> Array:
        """``n`` samples: ``z`` from the prior (rng stream ``"sample"``), then the inverse."""
        z = self.prior.sample(self.make_rng("sample"), n, self.dim, temperature=temperature)
        return self.inverse(z)


def dequantize(key: Array, pixels: Array, n_bins: int = 256) -> Array:
    """Uniform dequantization to ``[-0.5, 0.5)``: ``(k + u) / n_bins - 0.5``.

    ``pixels`` holds integer levels in ``[0, n_bins)`` (256 for 8-bit images; scikit-learn's
    digits have 17). The shift has log-det 0, so ``bits_per_dim`` applies unchanged.
    """
    return distributions.dequantize(key, pixels, n_bins) + DATA_SHIFT


def bits_per_dim(log_prob: Array, dim: int, n_bins: int = 256) -> Array:
    """Bits/dim of dequantized data (SPEC section 4) with the real dimension ``dim``."""
    return distributions.bits_per_dim(log_prob, dim, n_bins)
