"""Models built from the library's layers, and ``build``, which makes one from a config.

* ``ToyIResNet`` and ``Glow``: flows for 2-D toy densities;
* ``MultiscaleDensity``: the multiscale density i-ResNet;
* ``ResidualFlow``: the Residual Flows image model (its checkpoints: ``interop``);
* ``IResNetClassifier`` (with its invertible ``IResNetFeatures``) and its baselines
  (``coeff=None``; ``norm="batchnorm"``).

The density models share the contract of ``flow.DensityFlow`` (``log_prob``, ``sample``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping

import flax.linen as nn
import jax

from iresnet_jax import tuning
from iresnet_jax.inverse import InverseConfig
from iresnet_jax.logdet import LogDetConfig
from iresnet_jax.models.classifier import BatchNormBranch, IResNetClassifier, IResNetFeatures
from iresnet_jax.models.density import MultiscaleDensity, scale_plan
from iresnet_jax.models.glow import Glow, GlowStep
from iresnet_jax.models.resflow import ResidualFlow
from iresnet_jax.models.toy import ToyIResNet

MODELS: dict[str, type[nn.Module]] = {
    "toy_iresnet": ToyIResNet,
    "glow": Glow,
    "multiscale_density": MultiscaleDensity,
    "classifier": IResNetClassifier,
    "residual_flow": ResidualFlow,
}

__all__ = ["BatchNormBranch", "Glow", "GlowStep", "IResNetClassifier", "IResNetFeatures",
           "MODELS", "MultiscaleDensity", "ResidualFlow", "ToyIResNet", "build",
           "count_params", "scale_plan"]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _unknown(what: str, key: str, valid) -> ValueError:
    near = difflib.get_close_matches(key, list(valid), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return ValueError(f"unknown {what} {key!r}{hint} (valid: {', '.join(sorted(valid))})")


def _value(v):
    if isinstance(v, list):
        return tuple(_value(x) for x in v)
    return v


def _carrier(cls, settings: Mapping[str, Any], what: str):
    valid = _fields(cls)
    for key in settings:
        if key not in valid:
            raise _unknown(f"{what} setting", key, valid)
    return cls(**settings)


def build(spec: Mapping[str, Any], **overrides) -> nn.Module:
    """The model a config describes: ``spec["name"]`` (a key of ``MODELS``) and the
    model's fields, with ``logdet`` and ``inverse`` given as mappings of ``LogDetConfig``
    and ``InverseConfig`` fields and ``conv="auto"`` meaning ``tuning.conv_impl(name)``.

    Example:
      >>> model = build({"name": "toy_iresnet", "n_blocks": 4,
      ...                "logdet": {"method": "series", "n_terms": 8}})
    """
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    spec.update(overrides)
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    cls = MODELS[name]
    fields = [f for f in _fields(cls) if f != "inverse_config"]
    kwargs = {}
    for key, value in spec.items():
        if key == "logdet" and isinstance(value, Mapping):
            kwargs["logdet"] = _carrier(LogDetConfig, value, "logdet")
        elif key == "inverse":
            kwargs["inverse_config"] = (value if isinstance(value, InverseConfig) else
                                        _carrier(InverseConfig, value, "inverse"))
        elif key == "conv" and value == "auto":
            kwargs["conv"] = tuning.conv_impl(name)
        elif key in fields:
            kwargs[key] = _value(value)
        else:
            raise _unknown(f"field of model {name!r}", key, fields + ["inverse"])
    return cls(**kwargs)


def count_params(params) -> int:
    """Number of scalar parameters in a parameter pytree (arrays or shape structs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
