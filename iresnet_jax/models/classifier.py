"""The i-ResNet classifier and its baselines (paper Section 5 and appendix C.2).

``IResNetFeatures`` is the invertible feature extractor: injective zero padding (paper: 13
channels, 32x32x3 -> 32x32x16), then stages of blocks (paper: 13/13/13) whose first
block, in every stage but the first, squeezes; ActNorm before each block and the 3-1-3
conv branch, spectrally normalized to ``coeff``. Its ``inverse`` runs the fixed-point
inverse block by block and drops the padding. ``IResNetClassifier`` adds the head:
BatchNorm -> activation -> global average pool -> Dense.

Baselines of the same topology: ``coeff=None`` (the "vanilla" ResNet) and
``norm="batchnorm"`` (``BatchNormBranch``: BatchNorm before every nonlinearity of the
branch instead of ActNorm, appendix C.2). Neither is guaranteed to be invertible; their
inverse runs the same fixed-point iteration and reports whether it converged.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iresnet_jax import blocks, conv as conv_lib, flow, layers
from iresnet_jax.inverse import InverseConfig
from iresnet_jax.logdet import LogDetConfig
from iresnet_jax.models.common import block_stack

Array = jax.Array

NORMS = ("actnorm", "batchnorm", "none")


class BatchNormBranch(blocks.ConvBranch):
    """``g = [BN -> phi] -> conv -> BN -> phi -> conv -> BN -> phi -> conv``.

    ``parts`` holds the convs' weights and each BatchNorm's ``(scale, bias, mean, var)``
    with its running averages, so ``build`` gives the evaluation-mode (per-example) ``g``
    that the inverse iterates. ``__call__`` with ``train=True`` uses the batch statistics
    and updates the running averages (``mutable=["batch_stats"]``).
    """
    coeff: float | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def parts(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        self._check()
        widths, convs = self._layers(x.shape[-1])
        weights, norms = [], []
        for i, (conv, c_in) in enumerate(zip(convs, widths)):
            if i > 0 or self.leading_activation:
                scale = self.param(f"bn{i}_scale", nn.initializers.ones, (c_in,), x.dtype)
                bias = self.param(f"bn{i}_bias", nn.initializers.zeros, (c_in,), x.dtype)
                mean = self.variable("batch_stats", f"bn{i}_mean",
                                     lambda c=c_in: jnp.zeros((c,), x.dtype))
                var = self.variable("batch_stats", f"bn{i}_var",
                                    lambda c=c_in: jnp.ones((c,), x.dtype))
                norms.append((scale, bias, mean, var))
            else:
                norms.append(None)
            like = jax.ShapeDtypeStruct(tuple(x.shape[:-1]) + (c_in,), x.dtype)
            weights.append(conv.weights(like, train=train))
        return weights, norms

    def _g(self, parts, batch_statistics: bool):
        """``g`` returning ``(g(x), [(mean, var) of every BatchNorm's input])``."""
        weights, norms = parts
        act = layers.activation_fn(self.activation)
        padding, impl, eps = self.padding, self.conv, self.epsilon

        def g(x: Array):
            h, stats = x, []
            for (kernel, bias), norm in zip(weights, norms):
                if norm is not None:
                    scale, shift, mean_var, var_var = norm
                    if batch_statistics:
                        axes = tuple(range(h.ndim - 1))
                        mean, var = jnp.mean(h, axes), jnp.var(h, axes)
                        stats.append((mean, var))
                    else:
                        mean, var = mean_var.value, var_var.value
                    h = act((h - mean) * jax.lax.rsqrt(var + eps) * scale + shift)
                h = conv_lib.conv2d(h, kernel, padding=padding, impl=impl) + bias
            return h, stats
        return g

    def build(self, parts) -> Callable[[Array], Array]:
        g = self._g(parts, batch_statistics=False)
        return lambda x: g(x)[0]

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        parts = self.parts(x, train=train)
        if not train:
            return self.build(parts)(x)
        gx, stats = self._g(parts, batch_statistics=True)(x)
        if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            m = self.momentum
            for (_, _, mean_var, var_var), (mean, var) in zip(
                    [n for n in parts[1] if n is not None], stats):
                mean_var.value = m * mean_var.value + (1 - m) * mean
                var_var.value = m * var_var.value + (1 - m) * var
        return gx


def _per_stage(value, n: int, what: str) -> tuple:
    if isinstance(value, (int, bool)) or value is None:
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{what} needs one entry per stage ({n}), got {value}")
    return value


class IResNetFeatures(nn.Module):
    """The invertible feature extractor of the i-ResNet classifier (flow protocol).

    Attributes:
      stages: blocks per stage (paper: ``(13, 13, 13)``).
      hidden: inner conv width, one int or one per stage (the official script: 32/64/128).
      squeeze: whether the first block of each stage squeezes first.
      initial_squeeze: squeeze the input before padding.
      pad_channels: zero channels appended by injective padding (paper: 13).
      coeff: Lipschitz coefficient in (0, 1); ``None`` for the vanilla baseline.
      n_power_iter: power iterations per training forward (official: 1 for classifiers).
      activation: nonlinearity of the branches (paper: ELU).
      norm: ``"actnorm"`` before each block, ``"batchnorm"`` (the BatchNorm baseline) or
        ``"none"``.
      logdet: the blocks' log-det (``"none"`` for classification).
      inverse_config: the fixed-point inverse's settings.
      remat, unroll: as in ``flow.BlockStack``.
      padding, conv: the convs' padding and implementation (``iresnet_jax.conv.IMPLS``).
      stored_sigma: evaluate the convs with their stored ``sigma`` (``layers.SpectralConv``;
        converted checkpoints).

    ``__call__(x, *, train=False) -> (features, log_det)``; ``inverse(features) -> x``.
    With ``pad_channels > 0`` the map is injective, and ``log_det`` covers the blocks.
    """
    stages: Sequence[int] = (13, 13, 13)
    hidden: int | Sequence[int] = (32, 64, 128)
    squeeze: Sequence[bool] = (False, True, True)
    initial_squeeze: bool = False
    pad_channels: int = 13
    coeff: float | None = 0.9
    n_power_iter: int = 1
    activation: str = "elu"
    norm: str = "actnorm"
    logdet: LogDetConfig = LogDetConfig("none")
    inverse_config: InverseConfig = InverseConfig()
    remat: bool = False
    unroll: int = 1
    padding: str = "SAME"
    conv: str = "xla"
    stored_sigma: bool = False

    def setup(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.pad_channels < 0:
            raise ValueError(f"pad_channels must be >= 0, got {self.pad_channels}")
        if self.norm == "batchnorm" and self.logdet.method != "none":
            raise ValueError("the BatchNorm baseline computes no log-determinant: use "
                             "LogDetConfig('none')")
        n = len(self.stages)
        hidden = _per_stage(self.hidden, n, "hidden")
        self._squeeze = _per_stage(self.squeeze, n, "squeeze")
        branch_type = BatchNormBranch if self.norm == "batchnorm" else blocks.ConvBranch

        def maker(width):
            def block(leading: bool):
                branch = branch_type(hidden=width, coeff=self.coeff,
                                     n_power_iter=self.n_power_iter,
                                     activation=self.activation, leading_activation=leading,
                                     padding=self.padding, conv=self.conv,
                                     stored_sigma=self.stored_sigma)
                return blocks.InvertibleBlock(
                    branch, actnorm="before" if self.norm == "actnorm" else None,
                    logdet=self.logdet, inverse_config=self.inverse_config)
            return block

        # The BatchNorm branch's training forward uses batch statistics: no hoisting of
        # its (evaluation-mode) weights.
        self.stacks = [block_stack(maker(width), n_blocks, first_without_activation=(i == 0),
                                   remat=self.remat, unroll=self.unroll,
                                   hoist=self.norm != "batchnorm")
                       for i, (n_blocks, width) in enumerate(zip(self.stages, hidden))]

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        if x.ndim != 4:
            raise ValueError(f"the classifier expects NHWC images, got shape {x.shape}")
        log_det = jnp.zeros(x.shape[:1], x.dtype)
        h = layers.squeeze(x) if self.initial_squeeze else x
        if self.pad_channels:
            h = jnp.concatenate([h, jnp.zeros(h.shape[:-1] + (self.pad_channels,), h.dtype)],
                                axis=-1)
        for sq, stack in zip(self._squeeze, self.stacks):
            if sq:
                h = layers.squeeze(h)
            h, ld = stack(h, train=train)
            log_det = log_det + ld
        return h, log_det

    def inverse(self, z: Array, *, n_iter: int | Array | None = None) -> Array:
        h = z
        for sq, stack in zip(reversed(self._squeeze), reversed(self.stacks)):
            h = stack.inverse(h, n_iter=n_iter)
            if sq:
                h = layers.unsqueeze(h)
        if self.pad_channels:
            h = h[..., : h.shape[-1] - self.pad_channels]
        return layers.unsqueeze(h) if self.initial_squeeze else h


class IResNetClassifier(IResNetFeatures):
    """The feature extractor, then BatchNorm -> activation -> average pool -> Dense.

    Attributes (besides those of ``IResNetFeatures``):
      num_classes: number of classes.
      head_activation: nonlinearity after the head's BatchNorm (paper: ELU; the official
        code: ReLU).
      feature_prior: a learned diagonal Gaussian over the flattened features, unused by
        the loss, which the official code builds in its classifiers too (it counts in
        their parameter numbers).
      bn_momentum: momentum of the head's BatchNorm running averages.

    ``__call__(x, *, train=False) -> logits``; ``features(x)``; ``inverse(features)``.
    BatchNorm statistics live in ``"batch_stats"`` (``mutable=["batch_stats"]``).

    Example:
      >>> model = IResNetClassifier(stages=(1, 1), hidden=8, squeeze=(False, True),
      ...                           pad_channels=3, num_classes=10)
      >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((4, 8, 8, 1)))
    """
    num_classes: int = 10
    head_activation: str = "elu"
    feature_prior: bool = False
    bn_momentum: float = 0.9

    def setup(self):
        super().setup()
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        self.head_norm = nn.BatchNorm(momentum=self.bn_momentum, epsilon=1e-5)
        self.head = nn.Dense(self.num_classes)
        if self.feature_prior:
            self.prior = flow.DiagonalGaussianPrior()

    def features(self, x: Array, *, train: bool = False) -> Array:
        """The invertible extractor's output."""
        return IResNetFeatures.__call__(self, x, train=train)[0]

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        z = self.features(x, train=train)
        if self.feature_prior and self.is_initializing():
            self.prior(z.reshape(z.shape[0], -1))
        h = self.head_norm(z, use_running_average=not train)
        h = layers.activation_fn(self.head_activation)(h)
        return self.head(jnp.mean(h, axis=(1, 2)))
