"""iresnet_jax: invertible residual networks (Behrmann et al., ICML 2019) and the
estimators of Residual Flows (Chen et al., NeurIPS 2019) in JAX and Flax.

Pure JAX: ``conv``, ``lipschitz``, ``logdet``, ``inverse``, ``distributions``. Flax linen
modules: ``layers``, ``blocks``, ``flow``, ``models``. Data and training: ``data``,
``train``. CPU-only settings: ``tuning``. See docs/architecture.md.
"""

from iresnet_jax import (blocks, conv, distributions, flow, inverse, layers, lipschitz,
                         logdet, models)

__version__ = "0.2.0"

__all__ = ["blocks", "conv", "distributions", "flow", "inverse", "layers", "lipschitz",
           "load", "logdet", "models"]


def load(workdir: str):
    """``(model, variables)`` of the newest checkpoint of a training workdir."""
    from iresnet_jax.train import restore   # orbax and the data readers load on demand

    run = restore(workdir)
    return run.model, run.variables
