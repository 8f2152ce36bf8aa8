"""Flax layers: invertible layers without a Lipschitz constraint (``invertible``),
spectrally normalized linear layers (``spectral``) and smooth 1-Lipschitz activations
(``activations``).

Every invertible module follows the flow protocol: ``__call__(x, *, train=False) ->
(y, log_det)`` with ``log_det`` of shape ``(batch,)``, and ``inverse(y) -> x``.
"""

from iresnet_jax.layers.activations import (ACTIVATIONS, activation_fn, elu, lipswish,
                                            softplus)
from iresnet_jax.layers.invertible import (SQUEEZE_ORDERS, ActNorm, FactorOut,
                                           InjectivePad, LogitTransform, Squeeze, squeeze,
                                           unsqueeze)
from iresnet_jax.layers.spectral import (SPECTRAL, SpectralConv, SpectralDense,
                                         power_iterations)

__all__ = ["ACTIVATIONS", "ActNorm", "FactorOut", "InjectivePad", "LogitTransform",
           "SPECTRAL", "SQUEEZE_ORDERS", "SpectralConv", "SpectralDense", "Squeeze",
           "activation_fn", "elu", "lipswish", "power_iterations", "softplus", "squeeze",
           "unsqueeze"]
