"""The i-ResNet classifier and its baselines (paper Section 5 and appendix C.2).

The feature extractor (``IResNetFeatures``) is invertible: injective zero padding
(paper: 13 channels, 32x32x3 -> 32x32x16), then stages of blocks (paper: 13/13/13) where
the first block of every stage but the first squeezes (``H x W x C -> H/2 x W/2 x 4C``),
ActNorm before each block, branch ``[phi] -> conv3x3 -> phi -> conv1x1 -> phi -> conv3x3``
with every conv spectrally normalized to coefficient ``c``. ``inverse`` inverts it by
fixed-point iteration (Algorithm 1), block by block, and drops the padding. The head
(``IResNetClassifier``) is BatchNorm -> phi -> global average pool -> Dense.

Baselines of the same topology:

* ``norm="actnorm", coeff=None``: the "vanilla" ResNet, no Lipschitz constraint;
* ``norm="batchnorm"``: no ActNorm; batch normalization before every nonlinearity of the
  branch (appendix C.2), no Lipschitz constraint by default (``BatchNormBlock``).

Neither baseline is guaranteed to be invertible; their ``inverse`` runs the same
fixed-point iteration and reports (in ``"intermediates"``) whether it converged.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iresnet_jax import blocks
from iresnet_jax import inverse as inverse_lib
from iresnet_jax import layers
from iresnet_jax import lipschitz
from iresnet_jax import logdet as logdet_lib
from iresnet_jax import utils
from iresnet_jax.flow import BlockStack, Chain
from iresnet_jax.models.common import DiagonalGaussianPrior, block_stack

Array = jax.Array

NORMS = ("actnorm", "batchnorm", "none")


class BatchNormBlock(nn.Module):
    """Pre-activation residual block with BatchNorm before every nonlinearity.

    ``y = x + g(x)``, ``g = [BN -> phi] -> conv k1 -> BN -> phi -> conv k2 -> BN -> phi ->
    conv k3`` (the paper's BatchNorm baseline). Convs are unconstrained (``coeff=None``) or
    spectrally normalized. Follows the flow protocol with ``log_det = 0`` (not computed);
    ``inverse`` is the fixed-point iteration with the BatchNorm running averages (at
    evaluation BN is affine), which need not converge for this baseline.
    """
    hidden: int = 32
    kernel_sizes: Sequence[int] = (3, 1, 3)
    coeff: float | None = None
    n_power_iter: int = 1
    activation: str = "elu"
    leading_activation: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    inverse_tol: float = 1e-6
    inverse_max_iter: int = 100
    inverse_rtol: float = 0.0

    @nn.compact
    def parts(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False):
        """Declares the variables; returns ``(convs, norms)``: the effective ``(kernel,
        bias)`` of each conv and, per conv input, ``(scale, bias, mean, var)`` of its
        BatchNorm (running averages) or ``None`` where there is none."""
        channels = x.shape[-1]
        n = len(self.kernel_sizes)
        widths = [channels] + [self.hidden] * (n - 1)
        outs = [self.hidden] * (n - 1) + [channels]
        convs, norms = [], []
        for i, (ks, c_in, c_out) in enumerate(zip(self.kernel_sizes, widths, outs)):
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
            ks = (ks, ks) if isinstance(ks, int) else tuple(ks)
            like = jax.ShapeDtypeStruct(tuple(x.shape[:-1]) + (c_in,), x.dtype)
            if self.coeff is None:
                convs.append(blocks._PlainConv(c_out, ks, name=f"conv{i}").weights(like))
            else:
                layer = lipschitz.SpectralConv(c_out, ks, coeff=self.coeff,
                                               n_power_iter=self.n_power_iter,
                                               name=f"conv{i}")
                convs.append(layer.weights(like, train=train))
        return convs, norms

    def _g(self, convs, norms, act, train: bool):
        """``g`` as a function of one batch, returning ``(g(x), batch statistics)``
        (statistics only when ``train``; at evaluation the running averages are used)."""
        running = [None if n is None else (n[2].value, n[3].value) for n in norms]
        eps = self.epsilon

        def g(x: Array) -> tuple[Array, list]:
            h, stats = x, []
            for (kernel, bias), norm, avg in zip(convs, norms, running):
                if norm is not None:
                    if train:
                        axes = tuple(range(h.ndim - 1))
                        mean, var = jnp.mean(h, axes), jnp.var(h, axes)
                        stats.append((mean, var))
                    else:
                        mean, var = avg
                    h = act((h - mean) * jax.lax.rsqrt(var + eps) * norm[0] + norm[1])
                h = lipschitz.conv2d(h, kernel) + bias
            return h, stats
        return g

    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        convs, norms = self.parts(x, train=train)
        act = layers.activation_fn(self.activation)
        gx, stats = self._g(convs, norms, act, train)(x)
        if train and not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            m = self.momentum
            variables = [n for n in norms if n is not None]
            for (_, _, mean_var, var_var), (mean, var) in zip(variables, stats):
                mean_var.value = m * mean_var.value + (1 - m) * mean
                var_var.value = m * var_var.value + (1 - m) * var
        return x + gx, jnp.zeros(x.shape[:1], x.dtype)

    def inverse(self, y: Array) -> Array:
        convs, norms = self.parts(y, train=False)
        act = layers.activation_fn(self.activation)
        g_full = self._g(convs, norms, act, train=False)
        x, info = inverse_lib.fixed_point(lambda v: g_full(v)[0], y, tol=self.inverse_tol,
                                          max_iter=self.inverse_max_iter,
                                          rtol=self.inverse_rtol)
        self.sow("intermediates", "inverse_iterations", info.iterations)
        self.sow("intermediates", "inverse_residual", info.residual)
        return x


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
      hidden: inner conv width, one int or one per stage (the paper gives none; the
        official script uses ``(32, 64, 128)``).
      squeeze: whether the first block of each stage squeezes first (paper:
        ``(False, True, True)``: squeezes after blocks 13 and 26).
      initial_squeeze: squeeze the input before padding.
      pad_channels: zero channels appended by injective padding (paper: 13).
      coeff: Lipschitz coefficient in (0, 1); ``None`` for the vanilla baseline.
      n_power_iter: power iterations per training forward (official: 1 for classifiers).
      activation: nonlinearity in the branches (paper: ELU).
      norm: ``"actnorm"`` before each block (i-ResNet, vanilla), ``"batchnorm"`` (BN
        before every nonlinearity, the BatchNorm baseline) or ``"none"``.
      logdet: log-det estimator (``"none"`` for classification).
      remat: rematerialize each block in the backward pass.
      unroll: blocks per iteration of each stage's compiled loop (``flow.BlockStack``).
      narrowing: how the branches' channel-narrowing convs are computed: ``"col2im"``
        (``lipschitz.conv2d_col2im``: the ANCHORS.md classifier's training step ~15-20%
        and its inverse ~20-25% faster on a 2-core CPU), ``"conv"`` (``lax.conv``) or
        ``"auto"`` (the default: ``"col2im"`` on CPU, ``"conv"`` on GPU/TPU, where it
        was not measured); ``"hybrid"`` and ``"auto_hybrid"`` as in
        ``MultiscaleDensity`` (no faster here); the same operator either way.
      widening: the derivatives of the channel-widening convs (``"patches"``, the
        default, ``"hybrid"`` or ``"auto_hybrid"``; see ``MultiscaleDensity``).
      inverse_tol, inverse_max_iter, inverse_method, inverse_rtol: fixed-point inverse
        settings (``inverse.fixed_point``'s ``tol``, ``max_iter``, ``method``, ``rtol``).

    ``__call__(x, *, train=False) -> (features, log_det)``; ``inverse(features) -> x``.
    With ``pad_channels > 0`` the map is injective, not bijective, and ``log_det`` covers
    only the blocks.
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
    logdet: logdet_lib.LogDetConfig = logdet_lib.LogDetConfig("none")
    remat: bool = False
    unroll: int = 1
    padding: str = "SAME"
    narrowing: str = "auto"
    widening: str = "patches"
    inverse_tol: float = 1e-6
    inverse_max_iter: int = 100
    inverse_method: str = "plain"
    inverse_rtol: float = 0.0

    def setup(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.pad_channels < 0:
            raise ValueError(f"pad_channels must be >= 0, got {self.pad_channels}")
        n = len(self.stages)
        hidden = _per_stage(self.hidden, n, "hidden")
        squeeze = _per_stage(self.squeeze, n, "squeeze")
        stacks = []
        for i, (n_blocks, width) in enumerate(zip(self.stages, hidden)):
            if self.norm == "batchnorm":
                stack = self._batchnorm_stack(n_blocks, width, first=(i == 0))
            else:
                stack = block_stack(
                    n_blocks, i == 0, self.remat, self.unroll, hidden=width,
                    coeff=self.coeff,
                    n_power_iter=self.n_power_iter, activation=self.activation,
                    logdet=self.logdet, padding=self.padding, narrowing=self.narrowing,
                    widening=self.widening,
                    actnorm="before" if self.norm == "actnorm" else None,
                    inverse_tol=self.inverse_tol, inverse_max_iter=self.inverse_max_iter,
                    inverse_method=self.inverse_method, inverse_rtol=self.inverse_rtol)
            stacks.append(stack)
        self.stacks = stacks
        self._squeeze = squeeze

    def _batchnorm_stack(self, n: int, width: int, first: bool) -> nn.Module:
        if self.logdet.method != "none":
            raise ValueError("the BatchNorm baseline computes no log-determinant: use "
                             "LogDetConfig('none')")
        kw = dict(hidden=width, coeff=self.coeff, n_power_iter=self.n_power_iter,
                  activation=self.activation, inverse_tol=self.inverse_tol,
                  inverse_max_iter=self.inverse_max_iter, inverse_rtol=self.inverse_rtol)
        if not first:
            return BlockStack(BatchNormBlock(**kw), n=n, remat=self.remat)
        head = BatchNormBlock(leading_activation=False, **kw)
        if n == 1:
            return Chain([head])
        return Chain([head, BlockStack(BatchNormBlock(**kw), n=n - 1, remat=self.remat)])

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

    def inverse(self, z: Array) -> Array:
        h = z
        for sq, stack in zip(reversed(self._squeeze), reversed(self.stacks)):
            h = stack.inverse(h)
            if sq:
                h = layers.unsqueeze(h)
        if self.pad_channels:
            h = h[..., : h.shape[-1] - self.pad_channels]
        return layers.unsqueeze(h) if self.initial_squeeze else h


class IResNetClassifier(nn.Module):
    """Feature extractor, then BatchNorm -> activation -> global average pool -> Dense.

    Attributes:
      extractor: an ``IResNetFeatures``.
      num_classes: number of classes.
      head_activation: nonlinearity after the head's BatchNorm (paper: ELU; the official
        code and ANCHORS.md: ReLU).
      feature_prior: add a learned diagonal Gaussian over the flattened features. The
        official code builds this prior in its classifiers too (it is not used by the
        cross-entropy loss); ANCHORS.md's parameter count (214,650) includes its
        ``2 * D`` parameters.
      bn_momentum: momentum of the head's BatchNorm running averages.

    ``__call__(x, *, train=False) -> logits``; ``features(x)``; ``inverse(features)``.
    BatchNorm statistics live in ``"batch_stats"`` (``mutable=["batch_stats"]`` when
    training).
    """
    extractor: IResNetFeatures
    num_classes: int = 10
    head_activation: str = "elu"
    feature_prior: bool = False
    bn_momentum: float = 0.9

    def setup(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        self.head_norm = nn.BatchNorm(momentum=self.bn_momentum, epsilon=1e-5)
        self.head = nn.Dense(self.num_classes, kernel_init=utils.lecun_normal)
        if self.feature_prior:
            self.prior = DiagonalGaussianPrior()

    def features(self, x: Array, *, train: bool = False) -> Array:
        return self.extractor(x, train=train)[0]

    def logits_from_features(self, z: Array, *, train: bool = False) -> Array:
        h = self.head_norm(z, use_running_average=not train)
        h = layers.activation_fn(self.head_activation)(h)
        return self.head(jnp.mean(h, axis=(1, 2)))

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        z = self.features(x, train=train)
        if self.feature_prior and self.is_initializing():
            self.prior(z.reshape(z.shape[0], -1))
        return self.logits_from_features(z, train=train)

    def inverse(self, z: Array) -> Array:
        """Inverts the feature extractor (Algorithm 1 block by block, padding dropped)."""
        return self.extractor.inverse(z)
