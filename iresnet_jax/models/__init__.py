"""Models built from the library's invertible layers: the toy-density i-ResNet and the
Glow baseline (``toy``, ``glow``), the multiscale density i-ResNet and the i-ResNet
classifier with its baselines (vanilla ResNet, BatchNorm ResNet), plus named configurations."""

from iresnet_jax.models.classifier import BatchNormBlock, IResNetClassifier, IResNetFeatures
from iresnet_jax.models.common import DiagonalGaussianPrior
from iresnet_jax.models.density import MultiscaleDensity, bits_per_dim, dequantize
from iresnet_jax.models.glow import Glow, GlowStep
from iresnet_jax.models.presets import PRESETS, build, count_params, model_kwargs
from iresnet_jax.models.toy import ToyIResNet

__all__ = ["BatchNormBlock", "DiagonalGaussianPrior", "Glow", "GlowStep", "IResNetClassifier",
           "IResNetFeatures", "MultiscaleDensity", "PRESETS", "ToyIResNet", "bits_per_dim",
           "build", "count_params", "dequantize", "model_kwargs"]
