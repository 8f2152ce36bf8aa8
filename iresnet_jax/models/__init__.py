"""Image models: the multiscale density i-ResNet and the i-ResNet classifier with its
baselines (vanilla ResNet, BatchNorm ResNet), plus named configurations."""

from iresnet_jax.models.classifier import BatchNormBlock, IResNetClassifier, IResNetFeatures
from iresnet_jax.models.common import DiagonalGaussianPrior
from iresnet_jax.models.density import MultiscaleDensity, bits_per_dim, dequantize
from iresnet_jax.models.presets import PRESETS, build, count_params, model_kwargs

__all__ = ["BatchNormBlock", "DiagonalGaussianPrior", "IResNetClassifier", "IResNetFeatures",
           "MultiscaleDensity", "PRESETS", "bits_per_dim", "build", "count_params",
           "dequantize", "model_kwargs"]
