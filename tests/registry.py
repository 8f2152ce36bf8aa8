"""One registry of invertible modules drives the invariant tests (test_invariants.py).

Each entry builds a module following the flow protocol, with an input shape small enough
for a dense float64 Jacobian. Later models add themselves here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from iresnet_jax import blocks, flow, layers, logdet, models
from iresnet_jax.inverse import InverseConfig

EXACT = logdet.LogDetConfig("exact")
TIGHT = InverseConfig(tol=1e-10, max_iter=500)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    # Whether log_det is the exact log|det J| (False for injective padding).
    exact_logdet: bool = True


def _block(branch, **kw):
    return blocks.InvertibleBlock(branch, logdet=EXACT, inverse_config=TIGHT, **kw)


def _conv_block(**kw):
    kw.setdefault("actnorm", "before")
    return _block(blocks.ConvBranch(hidden=4, coeff=0.9), **kw)


def _mlp_block(**kw):
    return _block(blocks.MLPBranch(hidden=(8, 8), coeff=0.9), **kw)


REGISTRY = [
    Entry("actnorm", layers.ActNorm, (3, 2, 2, 3)),
    Entry("squeeze", layers.Squeeze, (2, 4, 4, 1)),
    Entry("squeeze_channel_first", lambda: layers.Squeeze(order="channel"), (2, 4, 4, 2)),
    Entry("mlp_block_actnorm_after", lambda: _mlp_block(actnorm="after"), (4, 2)),
    Entry("mlp_block_lipswish", lambda: _block(
        blocks.MLPBranch(hidden=(8,), coeff=0.7, activation="lipswish"), actnorm=None),
        (4, 3)),
    Entry("conv_block", _conv_block, (2, 3, 3, 2)),
    Entry("conv_block_softplus_circular", lambda: _block(
        blocks.ConvBranch(hidden=4, coeff=0.6, activation="softplus", padding="CIRCULAR")),
        (2, 3, 3, 2)),
    Entry("conv_block_matmul", lambda: _block(
        blocks.ConvBranch(hidden=4, coeff=0.9, conv="matmul")), (2, 3, 3, 2)),
    Entry("conv_block_hybrid", lambda: _block(
        blocks.ConvBranch(hidden=4, coeff=0.9, conv="hybrid")), (2, 3, 3, 2)),
    Entry("block_stack", lambda: flow.BlockStack(_conv_block(), n=3), (2, 3, 3, 2)),
    Entry("block_stack_unrolled", lambda: flow.BlockStack(_conv_block(), n=3, unroll=3),
          (2, 3, 3, 2)),
    Entry("block_stack_remat", lambda: flow.BlockStack(_mlp_block(), n=2, remat=True),
          (3, 3)),
    Entry("chain", lambda: flow.Chain([layers.ActNorm(), layers.Squeeze(),
                                       flow.BlockStack(_conv_block(), n=2)]), (2, 4, 2, 1)),
    Entry("toy_iresnet", lambda: models.ToyIResNet(n_blocks=3, hidden=(8, 8),
                                                   inverse_config=TIGHT), (4, 2)),
    Entry("glow_mlp_reverse", lambda: models.Glow(n_steps=3, hidden=(8,)), (4, 2)),
    Entry("glow_conv_1x1", lambda: models.Glow(n_steps=2, hidden=(4,), mixing="1x1"),
          (2, 2, 2, 4)),
    # Image models at tiny sizes.
    Entry("multiscale_density", lambda: models.MultiscaleDensity(
        input_shape=(4, 4, 1), blocks_per_scale=(1, 2, 1), squeeze=(False, True, False),
        hidden=4, logdet=EXACT, inverse_config=TIGHT), (2, 4, 4, 1)),
    Entry("classifier_features", lambda: models.IResNetFeatures(
        stages=(2, 1), hidden=4, squeeze=(False, True), pad_channels=0, logdet=EXACT,
        inverse_config=TIGHT), (2, 4, 4, 2)),
    Entry("classifier_features_padded", lambda: models.IResNetFeatures(
        stages=(1, 1), hidden=4, squeeze=(False, True), pad_channels=1, logdet=EXACT,
        inverse_config=TIGHT), (2, 4, 4, 1), exact_logdet=False),
    # Residual Flows' model: first ActNorm, squeeze, factor-out, fully connected blocks
    # (its logit transform needs inputs in [-0.5, 0.5): tests/test_resflow.py).
    Entry("residual_flow", lambda: models.ResidualFlow(
        input_shape=(8, 8, 1), blocks_per_scale=(1, 1), hidden=4, fc_hidden=4,
        factor_out=True, logit_alpha=None, coeff=0.9, logdet=EXACT, inverse_config=TIGHT),
        (2, 8, 8, 1)),
]
