"""The exact log-determinant ``ln|det(I + J_g(x))|`` from the dense per-example Jacobian."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Fn = Callable[[Array], Array]


def check_same_shape(gx: Array, x: Array, what: str = "g"):
    if gx.shape != x.shape:
        raise ValueError(f"{what} must map inputs to outputs of the same shape, got {x.shape} "
                         f"-> {gx.shape}")


def jacobian(g: Fn, x: Array) -> tuple[Array, Array]:
    """``(g(x), J)`` with ``J`` the dense per-example Jacobian, shape ``(batch, d, d)``.

    Costs ``d`` batched Jacobian-vector products sharing one linearization; a ``g`` that
    carries a fused ``g.value_and_jacobian`` (the MLP branch) uses that instead.
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have a leading batch axis, got shape {x.shape}")
    fused = getattr(g, "value_and_jacobian", None)
    if fused is not None and x.ndim == 2:
        gx, jac = fused(x)
        check_same_shape(gx, x)
        return gx, jac
    gx, jvp_fn = jax.linearize(g, x)
    check_same_shape(gx, x)
    batch, d = x.shape[0], math.prod(x.shape[1:])
    eye = jnp.eye(d, dtype=x.dtype)
    basis = jnp.broadcast_to(eye[:, None, :], (d, batch, d)).reshape((d,) + x.shape)
    cols = jax.vmap(jvp_fn)(basis)                   # (d, batch, ...): column i of J
    return gx, jnp.moveaxis(cols.reshape(d, batch, d), 0, -1)


def logdet_identity_plus(jac: Array) -> Array:
    """``ln|det(I + J)|`` for a stack of square matrices (closed form for d <= 2)."""
    d = jac.shape[-1]
    if d == 1:
        return jnp.log(jnp.abs(1.0 + jac[..., 0, 0]))
    if d == 2:
        a, b = 1.0 + jac[..., 0, 0], jac[..., 0, 1]
        c, e = jac[..., 1, 0], 1.0 + jac[..., 1, 1]
        return jnp.log(jnp.abs(a * e - b * c))
    return jnp.linalg.slogdet(jnp.eye(d, dtype=jac.dtype) + jac)[1]


def exact(g: Fn, x: Array, *, with_output: bool = False):
    """Per-example ``ln|det(I + J_g(x))|`` from the dense Jacobian.

    With ``with_output=True`` returns ``(g(x), log_det)`` from the same forward pass.

    Example:
      >>> w = jnp.array([[0.5, 0.1], [0.0, 0.2]])
      >>> exact(lambda x: x @ w.T, jnp.zeros((3, 2)))   # ln(1.5 * 1.2) for each example
    """
    gx, jac = jacobian(g, x)
    ld = logdet_identity_plus(jac)
    return (gx, ld) if with_output else ld


def exact_series(jac: Array, n_terms: int) -> Array:
    """The deterministic ``n``-term series ``sum_k (-1)^{k+1} tr(J^k) / k`` (Eq. 4) from
    dense ``J`` of shape ``(..., d, d)``: what ``power_series`` estimates without bias."""
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    power = jac
    total = jnp.zeros(jac.shape[:-2], jac.dtype)
    for k in range(1, n_terms + 1):
        total = total + (-1.0) ** (k + 1) * jnp.trace(power, axis1=-2, axis2=-1) / k
        power = power @ jac
    return total
