"""2-D convolutions (NHWC inputs, HWIO kernels) and the forms they can be computed in.

``conv2d(..., impl=...)`` is one operator with three implementations, all exact:

* ``"xla"``: ``lax.conv_general_dilated`` (the default; what GPUs and TPUs run best);
* ``"matmul"``: matrix products. A kernel that widens the channels (``C_in < C_out``) is
  applied to im2col patches (``conv2d_patches``); one that narrows them is applied
  output-side (``conv2d_col2im``: one product onto ``kh * kw * C_out`` columns and a sum
  of shifted slices); their derivatives are matrix products too;
* ``"hybrid"``: the same matrix-product values with ``lax.conv``'s derivatives
  (``custom_jvp``), which XLA:CPU runs faster for the density models' small channels.

A unit-stride 1x1 kernel is a product over the channels in every implementation.
Which implementation is faster depends on the shapes and the backend; the measured
choices for CPUs live in ``iresnet_jax.tuning``. ``conv_dense_matrix`` gives the dense
matrix of the operator (tests, certificates); ``materialize`` is an exact identity that
XLA computes once.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
SymbolicZero = jax.custom_derivatives.SymbolicZero

IMPLS = ("xla", "matmul", "hybrid")
PADDINGS = ("SAME", "VALID", "CIRCULAR")
_DIMS = ("NHWC", "HWIO", "NHWC")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"conv implementation must be one of {IMPLS}, got {impl!r}")
    return impl


def _pairs(strides) -> tuple[int, int]:
    return (strides, strides) if isinstance(strides, int) else tuple(strides)


def _wrap_pads(kernel_shape) -> list[tuple[int, int]]:
    kh, kw = kernel_shape[:2]
    return [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)]


def conv2d(x: Array, kernel: Array, *, strides: int | Sequence[int] = 1,
           padding: str | Sequence[tuple[int, int]] = "SAME", precision: Any = None,
           impl: str = "xla") -> Array:
    """2-D cross-correlation (Flax's convention).

    ``padding`` is ``"SAME"`` (zeros), ``"VALID"``, explicit pairs, or ``"CIRCULAR"``
    (periodic, ``"SAME"``-sized output: the operator ``lipschitz.conv_singular_values``
    diagonalizes). ``impl`` chooses how a unit-stride ``"SAME"``/``"CIRCULAR"`` conv is
    computed (module docstring); every choice is the same operator.
    """
    check_impl(impl)
    strides = _pairs(strides)
    unit = strides == (1, 1)
    named = isinstance(padding, str)
    if named and padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS} or explicit pairs, got "
                         f"{padding!r}")
    if unit and named and kernel.shape[:2] == (1, 1):
        return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0], precision=precision)
    if impl != "xla" and unit and named and padding != "VALID":
        c_in, c_out = kernel.shape[2:]
        if c_in < c_out:
            if impl == "hybrid" and padding == "SAME":
                return conv2d_patches_hybrid(x, kernel, precision)
            return conv2d_patches(x, kernel, padding=padding, precision=precision)
        if c_in > c_out and padding == "SAME":
            if impl == "hybrid":
                return conv2d_col2im_hybrid(x, kernel, precision)
            return conv2d_col2im(x, kernel, precision=precision)
    if named and padding == "CIRCULAR":
        x = jnp.pad(x, _wrap_pads(kernel.shape), mode="wrap")
        padding = "VALID"
    return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                    dimension_numbers=_DIMS, precision=precision)


def conv2d_patches(x: Array, kernel: Array, *, padding: str = "SAME",
                   precision: Any = None) -> Array:
    """Unit-stride ``conv2d`` as one matrix product over image patches (im2col).

    Built from pads, slices and one ``dot``, so its transpose and gradients are matrix
    products, and a ``vmap`` over kernels is a batched ``dot`` (the power iteration of a
    whole stack of blocks runs that way).
    """
    if padding not in ("SAME", "CIRCULAR"):
        raise ValueError(f"conv2d_patches supports 'SAME' and 'CIRCULAR' padding, got "
                         f"{padding!r}")
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = x.shape
    xp = jnp.pad(x, _wrap_pads(kernel.shape),
                 mode="wrap" if padding == "CIRCULAR" else "constant")
    cols = jnp.concatenate([xp[:, a:a + h, b:b + w, :] for a in range(kh)
                            for b in range(kw)], axis=-1)
    out = jnp.dot(cols.reshape(n * h * w, kh * kw * c_in),
                  kernel.reshape(kh * kw * c_in, c_out), precision=precision)
    return out.reshape(n, h, w, c_out)


def materialize(x: Array) -> Array:
    """``x`` exactly (a product with the identity over the last axis, at full precision),
    computed once: XLA never fuses a dot into its consumers, so they do not each recompute
    the elementwise work that produced ``x`` (``lax.optimization_barrier`` does not stop
    that fusion on XLA:CPU)."""
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.einsum("...c,cd->...d", x, eye, precision=lax.Precision.HIGHEST)


def conv2d_col2im(x: Array, kernel: Array, *, precision: Any = None) -> Array:
    """Unit-stride ``"SAME"`` ``conv2d`` computed output-side.

    One product maps every input pixel to its contributions at all ``kh * kw`` output
    positions (``C_in x kh*kw*C_out``); the output is the sum of those contributions
    shifted into place. For a narrowing conv this product is the small one. The product is
    split with ``jnp.split`` (its transpose is one concatenation), and the sum is
    materialized so that consumers do not re-evaluate the shifted slices.
    """
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = x.shape
    k2 = kernel.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out)
    p = jnp.dot(x.reshape(n * h * w, c_in), k2, precision=precision)
    parts = jnp.split(p.reshape(n, h, w, kh * kw * c_out), kh * kw, axis=-1)
    zero = jnp.zeros((), p.dtype)
    out = None
    for a in range(kh):
        for b in range(kw):
            # out[:, i, j] += part[:, i + da, j + db], zero outside the image.
            da, db = a - (kh - 1) // 2, b - (kw - 1) // 2
            shifted = lax.pad(parts[a * kw + b], zero,
                              [(0, 0, 0), (-da, da, 0), (-db, db, 0), (0, 0, 0)])
            out = shifted if out is None else out + shifted
    return materialize(out)


def _lax_conv_jvp(value_fn, precision, primals, tangents):
    """JVP of a conv whose value comes from ``value_fn``, through ``lax.conv``:
    ``conv(dx, K) + conv(x, dK)`` (an unperturbed input or kernel adds no term)."""
    x, kernel = primals
    dx, dk = tangents
    out = value_fn(x, kernel, precision)
    conv = functools.partial(lax.conv_general_dilated, window_strides=(1, 1),
                             padding="SAME", dimension_numbers=_DIMS, precision=precision)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(conv(dx, kernel))
    if not isinstance(dk, SymbolicZero):
        terms.append(conv(x, dk))
    if not terms:
        return out, jnp.zeros_like(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d_col2im_hybrid(x: Array, kernel: Array, precision: Any = None) -> Array:
    """``conv2d_col2im``'s value with ``lax.conv``'s derivatives, at every order."""
    return conv2d_col2im(x, kernel, precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d_patches_hybrid(x: Array, kernel: Array, precision: Any = None) -> Array:
    """``conv2d_patches``'s value (``"SAME"``) with ``lax.conv``'s derivatives."""
    return conv2d_patches(x, kernel, padding="SAME", precision=precision)


conv2d_col2im_hybrid.defjvp(functools.partial(_lax_conv_jvp, conv2d_col2im_hybrid),
                            symbolic_zeros=True)
conv2d_patches_hybrid.defjvp(functools.partial(_lax_conv_jvp, conv2d_patches_hybrid),
                             symbolic_zeros=True)


def conv_dense_matrix(kernel: Array, spatial_shape: Sequence[int], *, padding="SAME",
                      strides=1) -> Array:
    """The dense matrix of the conv operator on inputs ``(n, m, C_in)``: row ``i`` is the
    flattened output for the ``i``-th flattened unit input."""
    n, m = (int(s) for s in spatial_shape)
    c_in = kernel.shape[2]
    d = n * m * c_in
    basis = jnp.eye(d, dtype=kernel.dtype).reshape(d, n, m, c_in)
    out = conv2d(basis, kernel, padding=padding, strides=strides)
    return out.reshape(d, -1)
