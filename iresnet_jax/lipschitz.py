"""Lipschitz constants of linear maps: power iteration, soft normalization, certificates.

The residual branch ``g`` of an i-ResNet block must be a contraction. With 1-Lipschitz
activations ``Lip(g) <= prod_i ||W_i||_2``, so every linear map is rescaled by the soft
spectral normalization of the paper's Eq. (2), ``W / max(1, sigma / c)``.

For a convolution, ``||W||_2`` is the norm of the *convolution operator* on inputs of the
real spatial size, not of the kernel reshaped to a matrix (``reshaped_kernel_norm``, which
can underestimate it by up to ``sqrt(kh * kw)``). ``conv_norm`` runs the power iteration on
the operator and its exact transpose; ``conv_singular_values`` gives all singular values
of a circular convolution from the 2-D FFT of its kernel (Sedghi et al., 2019);
``conv_operator_norm`` certifies one conv exactly or bounds it. Pure JAX and NumPy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iresnet_jax import conv as conv_lib

Array = jax.Array

_EPS = 1e-12


def check_coeff(coeff: float) -> float:
    """``coeff`` if it is a valid Lipschitz coefficient in (0, 1), else ``ValueError``."""
    try:
        c = float(coeff)
    except (TypeError, ValueError):
        raise ValueError(f"Lipschitz coefficient must be a number in (0, 1), got {coeff!r}")
    if not 0.0 < c < 1.0:
        raise ValueError(
            f"Lipschitz coefficient must lie in (0, 1), got c={c}; c >= 1 does not make the "
            "residual branch a contraction, so the block may not be invertible")
    return c


def _safe_norm(v: Array) -> Array:
    """Euclidean norm with a zero (not NaN) gradient at ``v = 0``."""
    return jnp.sqrt(jnp.maximum(jnp.sum(v * v), _EPS * _EPS))


def normalize(v: Array) -> Array:
    """``v / ||v||`` (finite at ``v = 0``)."""
    return v / _safe_norm(v)


def soft_normalize(weight: Array, sigma: Array, coeff: float) -> Array:
    """Eq. (2): ``W / max(1, sigma / coeff)`` (a no-op when ``sigma <= coeff``)."""
    return weight / jnp.maximum(1.0, sigma / coeff)


def operator_norm(op: Callable[[Array], Array], u: Array, n_iter: int,
                  *, op_transpose: Callable[[Array], Array] | None = None,
                  max_unroll: int = 8) -> tuple[Array, Array]:
    """Largest singular value of a linear operator by power iteration on ``op^T op``.

    Args:
      op: a linear function of one array.
      u: starting vector shaped like ``op``'s input (need not be normalized).
      n_iter: iterations (0 only evaluates ``||op(u)||`` at the normalized ``u``).
      op_transpose: the adjoint of ``op``; by default ``jax.linear_transpose(op, u)``.
      max_unroll: up to this many iterations are unrolled; more run in a ``fori_loop``.

    Returns:
      ``(sigma, u)``: ``||op(u)||`` at the final unit vector ``u`` (a lower bound of the
      norm that increases with ``n_iter``), and ``u``.

    Example:
      >>> w = jnp.diag(jnp.array([3.0, 1.0]))
      >>> sigma, _ = operator_norm(lambda v: w @ v, jnp.ones(2), 50)  # sigma ~= 3
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if op_transpose is None:
        transpose = jax.linear_transpose(op, u)
        op_transpose = lambda v: transpose(v)[0]
    u = normalize(u)

    def step(u):
        w = op_transpose(op(u))
        norm = jnp.sqrt(jnp.sum(w * w))
        # A vector in the null space (a zero-initialized kernel) would collapse the
        # iteration for good; keep the previous direction instead.
        return jnp.where(norm > _EPS, w / jnp.maximum(norm, _EPS), u)

    if n_iter <= max_unroll:
        for _ in range(n_iter):
            u = step(u)
    else:
        u = lax.fori_loop(0, n_iter, lambda _, u: step(u), u)
    return _safe_norm(op(u)), u


def dense_norm(kernel: Array, u: Array, n_iter: int) -> tuple[Array, Array]:
    """Power iteration for ``x -> x @ kernel`` (``kernel`` of shape ``(in, out)``)."""
    return operator_norm(lambda v: v @ kernel, u, n_iter, op_transpose=lambda w: kernel @ w)


def conv_norm(kernel: Array, u: Array, n_iter: int, *, strides=1,
              padding="SAME") -> tuple[Array, Array]:
    """Power iteration on the convolution operator acting on inputs shaped like ``u``
    (``(1, H, W, C_in)``), with its exact adjoint.

    Unit-stride ``"SAME"``/``"CIRCULAR"`` convs are applied as ``conv.conv2d_patches``
    (matrix products: a ``vmap`` over a stack's kernels stays a batched product). The
    iterations run in a ``fori_loop`` (one loop body to compile).
    """
    unit = strides in (1, (1, 1), [1, 1])
    if unit and padding in ("SAME", "CIRCULAR"):
        op = lambda v: conv_lib.conv2d_patches(v, kernel, padding=padding)
    else:
        op = lambda v: conv_lib.conv2d(v, kernel, strides=strides, padding=padding)
    return operator_norm(op, u, n_iter, max_unroll=0)


def conv_singular_values(kernel: Array, spatial_shape: Sequence[int]) -> Array:
    """Exact singular values of the circular 2-D convolution with ``kernel``.

    On an ``n x m`` input with periodic padding the operator is block-diagonalized by the
    2-D DFT: its singular values are those of the ``C_in x C_out`` matrices
    ``K_hat[p, q] = sum_{a,b} K[a, b] exp(-2 pi i (pa/n + qb/m))`` (Sedghi, Gupta and Long,
    2019). For zero padding, the values on the grid enlarged by the kernel's reach bound
    the operator norm from above.

    Args:
      kernel: HWIO kernel ``(kh, kw, C_in, C_out)`` with ``kh <= n`` and ``kw <= m``.
      spatial_shape: ``(n, m)``.

    Returns:
      Array ``(n, m, min(C_in, C_out))``; ``.max()`` is the operator norm.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be HWIO with 4 dimensions, got shape {kernel.shape}")
    n, m = (int(s) for s in spatial_shape)
    if kernel.shape[0] > n or kernel.shape[1] > m:
        raise ValueError(f"kernel {kernel.shape[:2]} is larger than the input {(n, m)}")
    transfer = jnp.fft.fft2(kernel, s=(n, m), axes=(0, 1))
    return jnp.linalg.svd(transfer, compute_uv=False)


def reshaped_kernel_norm(kernel: Array) -> Array:
    """Spectral norm of the kernel reshaped to ``(kh*kw*C_in, C_out)``: what reshaping-based
    spectral normalization (``flax.linen.SpectralNorm``) controls. Not the operator norm."""
    kernel = jnp.asarray(kernel)
    return jnp.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), ord=2)


# --------------------------------------------------------------------------------------
# Certificates of one convolution (float64 NumPy results).

BOUNDS = ("auto", "dense", "power", "circular")
DENSE_LIMIT = 4_000_000  # largest d_in * d_out for which "auto" builds the dense operator
POWER_ITERATIONS = 1000


def conv_operator_norm(kernel, spatial_shape, padding: str = "SAME", bound: str = "auto",
                       u=None) -> tuple[float, str]:
    """Operator norm of a stride-1 conv (HWIO kernel) on inputs of ``spatial_shape``.

    Returns ``(norm, how)``: ``"exact-1x1"`` (a 1x1 conv: its ``C_in x C_out`` matrix),
    ``"dense"`` (SVD of the dense operator, exact), ``"circular"`` (exact for circular
    padding; for zero padding the circular conv on the grid enlarged by the kernel's
    reach, a certified upper bound that is loose on small grids) or ``"power"``
    (``POWER_ITERATIONS`` power iterations from ``u``: an estimate from below).
    ``bound="auto"`` is ``"dense"`` up to ``DENSE_LIMIT`` entries, else ``"power"``.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    kernel = np.asarray(kernel, np.float64)
    kh, kw, c_in, c_out = kernel.shape
    if kh == 1 and kw == 1:
        return float(np.linalg.norm(kernel[0, 0], ord=2)), "exact-1x1"
    h, w = (int(s) for s in spatial_shape)
    if bound == "auto":
        bound = "dense" if (h * w) ** 2 * c_in * c_out <= DENSE_LIMIT else "power"
    with jax.enable_x64(True):
        k = jnp.asarray(kernel)
        if bound == "dense":
            mat = np.asarray(conv_lib.conv_dense_matrix(k, (h, w), padding=padding))
            return float(np.linalg.norm(mat, ord=2)), "dense"
        if bound == "circular":
            grid = (h, w) if padding == "CIRCULAR" else (h + kh - 1, w + kw - 1)
            return float(jnp.max(conv_singular_values(k, grid))), "circular"
        start = np.ones((1, h, w, c_in)) if u is None else np.asarray(u, np.float64)
        sigma, _ = conv_norm(k, jnp.asarray(start), POWER_ITERATIONS, padding=padding)
        return float(sigma), "power"


def effective_conv_kernel(kernel, u, coeff: float, padding: str = "SAME") -> np.ndarray:
    """``W / max(1, sigma / c)`` with ``sigma = ||conv(u, W)||`` at the stored unit ``u``:
    the kernel a spectrally normalized conv applies at evaluation (float64)."""
    with jax.enable_x64(True):
        k = jnp.asarray(kernel, jnp.float64)
        uu = normalize(jnp.asarray(u, jnp.float64))
        sigma = jnp.linalg.norm(conv_lib.conv2d(uu, k, padding=padding).ravel())
        return np.asarray(soft_normalize(k, sigma, coeff))
