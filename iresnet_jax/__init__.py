"""iresnet_jax: invertible residual networks (Behrmann et al., ICML 2019) in JAX/Flax.

Pure functions live in ``lipschitz``, ``logdet`` and ``inverse``; Flax linen modules in
``layers``, ``blocks``, ``flow`` and ``models``.

Submodules load on first use (``iresnet_jax.blocks`` or ``from iresnet_jax import
blocks``), so ``iresnet_jax.runtime`` can be imported, and a binary can restart itself
(``runtime.relaunch_with_hugepages``), before JAX is loaded.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["blocks", "distributions", "flow", "inverse", "layers", "lipschitz", "logdet"]


def __getattr__(name: str):
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
