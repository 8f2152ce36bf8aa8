"""Smooth 1-Lipschitz activations: training through the log-det differentiates the branch
two and three times, so the derivative must be continuous (ELU, softplus, LipSwish)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_jvp
def _exp_nonpositive(x: Array) -> Array:
    """``exp(min(x, 0))``, with its derivative (``exp(x)`` for ``x < 0``, else ``0``)
    written out, so that every order reuses the value instead of differentiating
    ``minimum``."""
    return jnp.exp(jnp.minimum(x, 0.0))


@_exp_nonpositive.defjvp
def _exp_nonpositive_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    e = _exp_nonpositive(x)
    return e, jnp.where(x > 0, jnp.zeros_like(e), e) * dx


@jax.custom_jvp
def elu(x: Array) -> Array:
    """ELU, 1-Lipschitz with a continuous first derivative.

    A ``custom_jvp`` whose derivative ``where(x > 0, 1, e)`` shares ``e = exp(min(x, 0))``
    with the value at every order: the log-det series differentiates the branch two and
    three times, and the derivatives autodiff takes of the formula add selects and
    products at each (docs/performance.md has the measured effect).
    """
    return jnp.where(x > 0, x, _exp_nonpositive(x) - 1.0)


@elu.defjvp
def _elu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    e = _exp_nonpositive(x)
    return jnp.where(x > 0, x, e - 1.0), jnp.where(x > 0, jnp.ones_like(e), e) * dx


def softplus(x: Array) -> Array:
    """Softplus, 1-Lipschitz and smooth."""
    return jax.nn.softplus(x)


def lipswish(x: Array, beta: Array | float = 1.0) -> Array:
    """LipSwish ``x * sigmoid(beta x) / 1.1`` (Chen et al., 2019): 1-Lipschitz for beta > 0."""
    return x * jax.nn.sigmoid(beta * x) / 1.1


ACTIVATIONS = ("elu", "softplus", "lipswish", "relu", "tanh")


def activation_fn(name: str) -> Callable[..., Array]:
    """The activation called ``name``; LipSwish takes ``beta`` as a second argument.

    ReLU is accepted for the non-invertible baselines only: its derivative jumps, which
    makes the gradient of the log-det estimator ill-defined (appendix C.3).
    """
    table = {"elu": elu, "softplus": softplus, "lipswish": lipswish, "relu": jax.nn.relu,
             "tanh": jnp.tanh}
    if name not in table:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return table[name]


