"""Meeting other libraries: distrax bijectors, and checkpoints of other code converted
into models of this library.

* ``as_distrax(module, variables, *, key=None)``: an invertible module as a
  ``distrax.Bijector`` from latents to data (``pip install -e ".[distrax]"``).
* ``read(source, path, params=None)``: a checkpoint of ``SOURCES[source]`` as a
  ``Converted`` model (settings, variables, task); ``save_workdir`` writes it as a
  training workdir that ``iresnet_jax.load`` reads. Source ``"iresnet"``: the official
  PyTorch i-ResNet (``iresnet``), read without PyTorch (``torch_pickle``); ``"resflow"``:
  the official Residual Flows checkpoints (``resflow``, EMA weights by default).

See docs/interop.md.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from iresnet_jax.interop import iresnet, resflow, torch_pickle
from iresnet_jax.interop.workdir import Converted, check_variables, save_workdir

# source name -> read(path, params) -> Converted
SOURCES: dict[str, Callable[..., Converted]] = {"iresnet": iresnet.read,
                                                "resflow": resflow.read}

__all__ = ["Converted", "SOURCES", "as_distrax", "check_variables", "iresnet", "read",
           "resflow", "save_workdir", "torch_pickle"]


def read(source: str, path: str, params: Mapping[str, Any] | None = None) -> Converted:
    """The model of a checkpoint of ``source`` (a key of ``SOURCES``) at ``path``;
    ``params``: the model's settings where the file does not hold them."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {sorted(SOURCES)}")
    return SOURCES[source](path, params)


def as_distrax(module, variables, *, key=None, event_ndims: int | None = None):
    """``bijector.as_distrax``: ``module`` as a ``distrax.Bijector`` from latents to data
    (imports distrax, an optional dependency)."""
    try:
        from iresnet_jax.interop import bijector
    except ImportError as e:
        raise ImportError('as_distrax needs distrax: pip install -e ".[distrax]"') from e
    return bijector.as_distrax(module, variables, key=key, event_ndims=event_ndims)
