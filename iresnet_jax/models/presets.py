"""Named model configurations and one builder for the image models.

``build(preset="paper_cifar10_density")`` or ``build(kind="density", input_shape=...,
...)``; keyword arguments override a preset's. Convenience keys ``logdet_method``,
``n_terms``, ``n_samples``, ``probe``, ``logdet_mode`` and ``logdet_gradient`` build the
``LogDetConfig``. ``logdet_mode="auto"`` (the default) is ``"split"`` for a density model's
truncated series with the autodiff gradient (the same estimate and gradient as Algorithm
2's chain of vector-Jacobian products, from two chains of half the depth: 5-11% faster
training steps of the ANCHORS.md model on a 2-core CPU) and ``"vjp"`` otherwise.

Paper configurations (appendix C): the MNIST and CIFAR10 density models (3 scale-blocks of
32 blocks, 32 or 512 filters, 10 or 5 series terms, one Gaussian probe) in the official
code's multiscale layout (initial squeeze, factor-out after every scale-block but the
last), and the 39-block classifier (13/13/13, 13 zero channels, widths from the official
script since the paper gives none). ``anchors_*``: the configurations of ANCHORS.md, whose
parameter counts (51,680 and 214,650) the tests pin. ``digits_*``: quick CPU models for
scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import flax.linen as nn
import jax

from iresnet_jax import logdet as logdet_lib
from iresnet_jax.models.classifier import IResNetClassifier, IResNetFeatures
from iresnet_jax.models.density import MultiscaleDensity

KINDS = ("classifier", "density")

_DENSITY_MNIST = dict(input_shape=(28, 28, 1), initial_squeeze=True,
                      squeeze=(False, True, False), factor_out=True, coeff=0.9,
                      n_power_iter=5, activation="elu")

PRESETS: dict[str, dict[str, Any]] = {
    # Density estimation (appendix C, "MNIST and CIFAR").
    "paper_mnist_density": dict(kind="density", **_DENSITY_MNIST, blocks_per_scale=(32, 32, 32),
                                hidden=32, n_terms=10),
    "paper_cifar10_density": dict(kind="density", input_shape=(32, 32, 3),
                                  initial_squeeze=True, squeeze=(False, True, True),
                                  factor_out=True, blocks_per_scale=(32, 32, 32), hidden=512,
                                  coeff=0.9, n_power_iter=5, n_terms=5),
    "anchors_density": dict(kind="density", **_DENSITY_MNIST, blocks_per_scale=(4, 4, 4),
                            hidden=32, n_terms=5, unroll=4, remat=True),
    "digits_density": dict(kind="density", input_shape=(8, 8, 1), initial_squeeze=True,
                           squeeze=(False, True, False), factor_out=True,
                           blocks_per_scale=(4, 4, 4), hidden=32, coeff=0.9, n_power_iter=5,
                           n_terms=5),
    # Classification (appendix C.2).
    "paper_cifar10_classifier": dict(kind="classifier", stages=(13, 13, 13),
                                     hidden=(32, 64, 128), squeeze=(False, True, True),
                                     pad_channels=13, coeff=0.9, n_power_iter=1,
                                     activation="elu", head_activation="elu", num_classes=10),
    "anchors_classifier": dict(kind="classifier", stages=(4, 4, 4), hidden=32,
                               squeeze=(False, True, True), pad_channels=3, coeff=0.9,
                               n_power_iter=5, activation="elu", head_activation="relu",
                               feature_prior=True, num_classes=10, unroll=4),
    "digits_classifier": dict(kind="classifier", stages=(4, 4, 4), hidden=32,
                              squeeze=(False, True, True), pad_channels=3, coeff=0.9,
                              n_power_iter=1, activation="elu", head_activation="elu",
                              num_classes=10),
}
PRESETS["paper_cifar100_classifier"] = dict(PRESETS["paper_cifar10_classifier"],
                                            num_classes=100)
PRESETS["digits_vanilla"] = dict(PRESETS["digits_classifier"], coeff=None)
PRESETS["digits_batchnorm"] = dict(PRESETS["digits_classifier"], coeff=None, norm="batchnorm")

_LOGDET_KEYS = {"logdet_method": "method", "n_terms": "n_terms", "n_samples": "n_samples",
                "probe": "probe", "logdet_mode": "mode", "logdet_gradient": "gradient"}
_HEAD_KEYS = ("num_classes", "head_activation", "feature_prior", "bn_momentum")


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def model_kwargs(preset: str | None = None, **overrides) -> dict[str, Any]:
    """The keyword arguments of a preset with ``overrides`` applied (``kind`` included)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[preset])
    else:
        kwargs = {}
    kwargs.update({k: _tuples(v) for k, v in overrides.items()})
    if kwargs.get("kind") not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kwargs.get('kind')!r} "
                         "(give a preset or kind=...)")
    return kwargs


def build(preset: str | None = None, **overrides) -> nn.Module:
    """Builds an image model from a preset and/or keyword arguments.

    Example:
      >>> model = build("digits_density", n_terms=8)
      >>> classifier = build("digits_classifier", coeff=None)   # the vanilla baseline
    """
    kwargs = model_kwargs(preset, **overrides)
    kind = kwargs.pop("kind")
    ld = {}
    for key, field in _LOGDET_KEYS.items():
        if key in kwargs:
            ld[field] = kwargs.pop(key)
    ld.setdefault("method", "series" if kind == "density" else "none")
    if ld.get("mode", "auto") == "auto":
        split = (kind == "density" and ld["method"] == "series"
                 and ld.get("gradient", "autodiff") == "autodiff")
        ld["mode"] = "split" if split else "vjp"
    if kind == "density":
        return MultiscaleDensity(logdet=logdet_lib.LogDetConfig(**ld), **kwargs)
    head = {k: kwargs.pop(k) for k in _HEAD_KEYS if k in kwargs}
    extractor = IResNetFeatures(logdet=logdet_lib.LogDetConfig(**ld), **kwargs)
    return IResNetClassifier(extractor=extractor, **head)


def count_params(params) -> int:
    """Number of scalar parameters in a parameter pytree (arrays or shape structs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
