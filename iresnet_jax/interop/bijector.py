"""An invertible module of this library as a ``distrax.Bijector`` (needs ``distrax``).

The bijector maps latents to data, as ``distrax.Transformed(base, bijector)`` expects of
a flow: ``forward`` runs the module's fixed-point ``inverse`` and ``inverse`` runs the
module's forward pass, whose log-det is the module's configured one (exact where the
module says so, else its series or roulette estimator). distrax bijectors take no random
key per call, so an estimator's probes come from the ``key`` given to ``as_distrax``: the
same probes at every call, a fixed (and unbiased over keys) estimate.
``distrax.Inverse(as_distrax(...))`` is the module's own direction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import distrax
import flax.linen as nn
import jax

from iresnet_jax import blocks, flow, models
from iresnet_jax.logdet import LogDetConfig

Array = jax.Array


def _fields(module: Any) -> Iterator[Any]:
    """The values of a module's fields, sequences flattened, recursively."""
    stack = [module]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, nn.Module):
            stack += [getattr(node, f.name) for f in dataclasses.fields(node)
                      if f.name not in ("parent", "name")]
        elif isinstance(node, (list, tuple)):
            stack += list(node)


def data_ndims(module: nn.Module) -> int:
    """Event rank of the module's inputs: ``len(input_shape)``, 3 for convolutional
    modules, 1 for the toy flows; ``ValueError`` when it cannot tell."""
    if getattr(module, "input_shape", None) is not None:
        return len(module.input_shape)
    nodes = list(_fields(module))
    if any(isinstance(n, (blocks.ConvBranch, models.IResNetFeatures)) for n in nodes):
        return 3
    if any(isinstance(n, (blocks.MLPBranch, models.ToyIResNet)) for n in nodes):
        return 1
    raise ValueError(f"cannot tell the event rank of {type(module).__name__}'s inputs: "
                     "pass event_ndims")


class IResNetBijector(distrax.Bijector):
    """``forward``: latent -> data (the module's inverse); ``inverse``: data -> latent (the
    module's forward pass and log-det). Batch dimensions are flattened into one."""

    def __init__(self, module: nn.Module, variables, *, key: Array | None, data_ndims: int):
        latent_ndims = 1 if isinstance(module, flow.DensityFlow) else data_ndims
        super().__init__(event_ndims_in=latent_ndims, event_ndims_out=data_ndims)
        self.module, self.variables = module, variables
        self.rngs = {} if key is None else {"logdet": key}

    def _flat(self, a: Array, ndims: int) -> tuple[tuple[int, ...], Array]:
        batch = a.shape[:a.ndim - ndims]
        return batch, a.reshape((-1,) + a.shape[a.ndim - ndims:])

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        self._check_inverse_input_shape(y)
        batch, flat = self._flat(y, self.event_ndims_out)
        z, log_det = self.module.apply(self.variables, flat, rngs=self.rngs)
        return z.reshape(batch + z.shape[1:]), log_det.reshape(batch)

    def forward(self, x: Array) -> Array:
        self._check_forward_input_shape(x)
        batch, flat = self._flat(x, self.event_ndims_in)
        y = self.module.apply(self.variables, flat, method="inverse")
        return y.reshape(batch + y.shape[1:])

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        y = self.forward(x)
        _, log_det = self.inverse_and_log_det(y)
        return y, -log_det


def as_distrax(module: nn.Module, variables, *, key: Array | None = None,
               event_ndims: int | None = None) -> IResNetBijector:
    """``module`` (a block, a stack, ``ToyIResNet``, ``MultiscaleDensity``'s flow, ...)
    with ``variables`` as a ``distrax.Bijector`` from latents to data.

    Args:
      module: an invertible module of the flow protocol.
      variables: its variables.
      key: the probes' key, for modules whose log-det is estimated (series, roulette).
      event_ndims: event rank of the data (default: ``data_ndims(module)``).

    Example:
      >>> bijector = as_distrax(model, variables)            # model: MultiscaleDensity
      >>> prior = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))
      >>> log_p = distrax.Transformed(prior, bijector).log_prob(x)
    """
    if isinstance(module, models.IResNetClassifier):
        raise ValueError("a classifier is not a bijection: use models.IResNetFeatures, its "
                         "invertible part")
    if isinstance(module, models.IResNetFeatures) and module.pad_channels:
        raise ValueError("IResNetFeatures with pad_channels > 0 is injective, not a "
                         "bijection")
    needs_key = any(isinstance(n, LogDetConfig) and n.needs_rng for n in _fields(module))
    if needs_key and key is None:
        raise ValueError("the module estimates its log-det with random probes: pass key "
                         "(distrax bijectors take no key per call)")
    return IResNetBijector(module, variables, key=key,
                           data_ndims=data_ndims(module) if event_ndims is None
                           else event_ndims)
