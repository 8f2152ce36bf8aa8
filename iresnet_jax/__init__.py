"""iresnet_jax: invertible residual networks (Behrmann et al., ICML 2019) in JAX/Flax.

Pure functions live in ``lipschitz``, ``logdet`` and ``inverse``; Flax linen modules in
``layers``, ``blocks``, ``flow`` and ``models``.
"""

from iresnet_jax import blocks
from iresnet_jax import distributions
from iresnet_jax import flow
from iresnet_jax import inverse
from iresnet_jax import layers
from iresnet_jax import lipschitz
from iresnet_jax import logdet

__version__ = "0.1.0"

__all__ = ["blocks", "distributions", "flow", "inverse", "layers", "lipschitz", "logdet"]
