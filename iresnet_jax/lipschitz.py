"""Lipschitz control: power iteration on linear operators and spectral normalization.

The residual branch ``g`` of an i-ResNet block must be a contraction. With 1-Lipschitz
activations, ``Lip(g) <= prod_i ||W_i||_2``, so every linear map is rescaled by the soft
spectral normalization of the paper's Eq. (2)::

    W_tilde = W / max(1, sigma / c),    sigma ~= ||W||_2.

For a convolution, ``||W||_2`` is the norm of the *convolution operator* acting on inputs
of the real spatial size, not the norm of the kernel reshaped to a matrix (which can
underestimate it by up to a factor ``sqrt(kh * kw)``, see ``reshaped_kernel_norm``). The
power iteration here alternates the convolution and its exact transpose
(``jax.linear_transpose``). ``conv_singular_values`` computes all singular values of a
circular convolution exactly from the 2-D FFT of the kernel (Sedghi et al., 2019), which
certifies the constraint; for zero padding it is an upper bound.

The pure functions come first; ``SpectralDense`` and ``SpectralConv`` are thin Flax
modules over them whose power-iteration vector lives in the ``"spectral"`` collection.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from iresnet_jax import utils

SymbolicZero = jax.custom_derivatives.SymbolicZero

Array = jax.Array

SPECTRAL = "spectral"

_EPS = 1e-12
_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def check_coeff(coeff: float) -> float:
    """Returns ``coeff`` if it is a valid Lipschitz coefficient, else raises ``ValueError``.

    The coefficient must lie in the open interval (0, 1): at ``c >= 1`` the residual branch
    is no longer guaranteed to be a contraction and the block may not be invertible.
    """
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
    """Euclidean norm with a zero (not NaN) gradient at ``v = 0`` (zero-initialized layers)."""
    sq = jnp.sum(v * v)
    return jnp.sqrt(jnp.maximum(sq, _EPS * _EPS))


def _normalize(v: Array) -> Array:
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
      u: starting vector with the shape of ``op``'s input (need not be normalized).
      n_iter: number of iterations (0 only evaluates ``||op(u)||`` at the normalized ``u``).
      op_transpose: the adjoint of ``op``; by default ``jax.linear_transpose(op, u)``.
      max_unroll: up to this many iterations are unrolled in Python; more run in a
        ``lax.fori_loop`` (whose body compiles once).

    Returns:
      ``(sigma, u)``: the estimate ``||op(u)||`` at the final unit vector ``u``, and ``u``.
      The estimate is a lower bound of the true norm that increases with ``n_iter``.

    Example:
      >>> w = jnp.diag(jnp.array([3.0, 1.0]))
      >>> sigma, _ = operator_norm(lambda v: w @ v, jnp.ones(2), 50)  # sigma ~= 3
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if op_transpose is None:
        transpose = jax.linear_transpose(op, u)
        op_transpose = lambda v: transpose(v)[0]
    u = _normalize(u)

    def step(u):
        w = op_transpose(op(u))
        norm = jnp.sqrt(jnp.sum(w * w))
        # A vector in the null space (e.g. of a zero-initialized kernel) would collapse the
        # iteration to 0 for good, and sigma with it; keep the previous direction instead.
        return jnp.where(norm > _EPS, w / jnp.maximum(norm, _EPS), u)

    if n_iter <= max_unroll:
        for _ in range(n_iter):
            u = step(u)
    else:
        u = lax.fori_loop(0, n_iter, lambda _, u: step(u), u)
    sigma = _safe_norm(op(u))
    return sigma, u


def _is_unit_stride(strides) -> bool:
    return tuple(strides) == (1, 1)


NARROWING = ("conv", "col2im", "hybrid", "auto", "auto_hybrid")
WIDENING = ("patches", "hybrid", "auto_hybrid")


def conv2d(x: Array, kernel: Array, *, strides: int | Sequence[int] = 1,
           padding: str | Sequence[tuple[int, int]] = "SAME",
           precision: Any = None, narrowing: str = "conv",
           widening: str = "patches") -> Array:
    """2-D cross-correlation on NHWC inputs with an HWIO kernel (Flax's convention).

    ``padding`` is ``"SAME"`` (zeros), ``"VALID"``, explicit pairs, or ``"CIRCULAR"``
    (periodic; ``"SAME"``-sized output, the operator that ``conv_singular_values``
    diagonalizes exactly). A 1x1 kernel with unit strides is a matrix product over the
    channels and is computed as one (on XLA:CPU its kernel gradient is then a plain
    matrix product instead of a convolution over the whole image). A larger kernel with
    unit strides that widens the channels (``C_in < C_out``, the first conv of every
    residual branch) goes through ``conv2d_patches``: its patches have only
    ``kh * kw * C_in`` channels, and XLA:CPU's gradients of such a convolution (the
    kernel gradient is a convolution with an image-sized window) are several times
    slower than the matrix products that replace them.

    ``narrowing`` chooses how a unit-stride ``"SAME"`` conv that narrows the channels
    (``C_in > C_out``, the last conv of a branch) is computed: ``"conv"`` (``lax.conv``)
    or ``"col2im"`` (``conv2d_col2im``: one matrix product onto output-side patches and a
    sum of shifted slices), or ``"hybrid"`` (``conv2d_col2im_hybrid``: the output-side
    value with ``lax.conv``'s derivatives). All are the same operator; which is faster
    depends on the shapes and the backend (``conv2d_col2im`` and
    ``conv2d_col2im_hybrid`` have the measurements). ``"auto"``: ``"col2im"`` on CPU,
    where it was measured, ``"conv"`` on other backends (their convolution libraries
    were not compared); ``"auto_hybrid"``: ``"hybrid"`` on CPU, ``"conv"`` elsewhere.

    ``widening`` chooses the derivatives of the widening convs (their value is always
    ``conv2d_patches``): ``"patches"`` (the patches' own transpose) or ``"hybrid"``
    (``conv2d_patches_hybrid``: ``lax.conv``'s derivatives, for "SAME" padding; cheaper
    to compile); ``"auto_hybrid"``: ``"hybrid"`` on CPU, ``"patches"`` elsewhere.
    """
    if narrowing not in NARROWING:
        raise ValueError(f"narrowing must be one of {NARROWING}, got {narrowing!r}")
    if widening not in WIDENING:
        raise ValueError(f"widening must be one of {WIDENING}, got {widening!r}")
    on_cpu = jax.default_backend() == "cpu"
    if narrowing in ("auto", "auto_hybrid"):
        cpu_choice = "col2im" if narrowing == "auto" else "hybrid"
        narrowing = cpu_choice if on_cpu else "conv"
    if widening == "auto_hybrid":
        widening = "hybrid" if on_cpu else "patches"
    if isinstance(strides, int):
        strides = (strides, strides)
    unit = _is_unit_stride(strides)
    if kernel.shape[:2] == (1, 1) and unit and (
            isinstance(padding, str) and padding in ("SAME", "VALID", "CIRCULAR")):
        return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0], precision=precision)
    if (unit and isinstance(padding, str) and padding in ("SAME", "CIRCULAR")
            and kernel.shape[2] < kernel.shape[3]):
        if widening == "hybrid" and padding == "SAME":
            return conv2d_patches_hybrid(x, kernel, precision)
        return conv2d_patches(x, kernel, padding=padding, precision=precision)
    if (narrowing in ("col2im", "hybrid") and unit and isinstance(padding, str)
            and padding == "SAME" and kernel.shape[2] > kernel.shape[3]):
        if narrowing == "hybrid":
            return conv2d_col2im_hybrid(x, kernel, precision)
        return conv2d_col2im(x, kernel, precision=precision)
    if isinstance(padding, str) and padding == "CIRCULAR":
        kh, kw = kernel.shape[:2]
        pads = [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)]
        x = jnp.pad(x, pads, mode="wrap")
        padding = "VALID"
    return lax.conv_general_dilated(x, kernel, window_strides=tuple(strides), padding=padding,
                                    dimension_numbers=_CONV_DIMS, precision=precision)


def conv2d_patches(x: Array, kernel: Array, *, padding: str = "SAME",
                   precision: Any = None) -> Array:
    """``conv2d`` with unit strides as one matrix product over image patches (im2col).

    The same operator as ``conv2d(x, kernel, padding=padding)`` for ``"SAME"`` and
    ``"CIRCULAR"`` padding, built from pads, slices and one ``dot``: its transpose and its
    gradients are matrix products too, and it batches under ``vmap`` over kernels as a
    batched ``dot`` (a ``vmap`` of ``lax.conv`` over kernels becomes a grouped
    convolution, which XLA:CPU runs slowly). Used by the power iteration, whose operands
    are single images.
    """
    if padding not in ("SAME", "CIRCULAR"):
        raise ValueError(f"conv2d_patches supports 'SAME' and 'CIRCULAR' padding, got "
                         f"{padding!r}")
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = x.shape
    pads = [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)]
    xp = jnp.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "constant")
    cols = jnp.concatenate([xp[:, a:a + h, b:b + w, :] for a in range(kh)
                            for b in range(kw)], axis=-1)
    out = jnp.dot(cols.reshape(n * h * w, kh * kw * c_in),
                  kernel.reshape(kh * kw * c_in, c_out), precision=precision)
    return out.reshape(n, h, w, c_out)


def conv2d_col2im(x: Array, kernel: Array, *, precision: Any = None) -> Array:
    """``conv2d`` with unit strides and ``"SAME"`` zero padding, computed output-side.

    One matrix product maps every input pixel to its contributions to all ``kh * kw``
    output positions (``x @ K``, ``K`` of shape ``C_in x (kh * kw * C_out)``); the output
    is the sum of those contributions shifted into place (``lax.pad`` with a negative
    edge is a shift, and its transpose is the opposite shift). For a conv that narrows
    the channels this is the cheap direction: the product has ``kh * kw * C_out``
    columns, where im2col patches would have ``kh * kw * C_in``. The result goes through
    ``utils.materialize`` (an exact identity): otherwise XLA fuses the sum of shifted
    slices into every consumer and recomputes it there.

    Measured on the ANCHORS.md classifier (2-core x86 CPU, interleaved in one process,
    against ``lax.conv`` for its narrowing convs): training step 296-390 -> 253-316 ms,
    20-iteration inverse 1.54-1.60 -> 1.18-1.34 s. On the ANCHORS.md density model
    (channels 4 and 8) its evaluation and inverse are 10-15% faster but its
    Neumann-gradient step ~15% slower, so the density models take this value with
    ``lax.conv``'s derivatives (``conv2d_col2im_hybrid``). Splitting the product with
    ``jnp.split`` instead of channel slices (2026-11-29) made the classifier's training
    step another 5-12% faster (medians of 16 and 24 interleaved calls: 366 -> 321 and
    310 -> 294 ms; same results to the bit): its backward pass now concatenates the
    shifted cotangents instead of adding nine copies padded to ``kh * kw * C_out``
    channels.
    """
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = x.shape
    k2 = kernel.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out)
    p = jnp.dot(x.reshape(n * h * w, c_in), k2, precision=precision)
    # jnp.split, not nine channel slices: the transpose of a split is one concatenation,
    # where each slice's transpose would pad the cotangent to all kh*kw*C_out channels
    # and the backward pass would add nine such arrays.
    parts = jnp.split(p.reshape(n, h, w, kh * kw * c_out), kh * kw, axis=-1)
    zero = jnp.zeros((), p.dtype)
    out = None
    for a in range(kh):
        for b in range(kw):
            t = a * kw + b
            # out[:, i, j] += p_t[:, i + da, j + db], zero outside the image.
            da, db = a - (kh - 1) // 2, b - (kw - 1) // 2
            shifted = lax.pad(parts[t], zero,
                              [(0, 0, 0), (-da, da, 0), (-db, db, 0), (0, 0, 0)])
            out = shifted if out is None else out + shifted
    return utils.materialize(out)


def _conv_same(x: Array, kernel: Array, precision: Any) -> Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_CONV_DIMS,
                                    precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d_col2im_hybrid(x: Array, kernel: Array, precision: Any = None) -> Array:
    """``conv2d_col2im``'s value with ``lax.conv``'s derivatives (a ``custom_jvp``).

    The value is computed output-side (``conv2d_col2im``); the JVP, and so every
    gradient, is the same operator applied through ``lax.conv`` (``conv(dx, K) + conv(x,
    dK)``; an unperturbed input or kernel contributes no term), whose transposes XLA:CPU
    runs faster than those of the output-side product on the density models' shapes.
    Evaluation and the fixed-point inverse get the cheap value, training gets
    ``lax.conv``'s backward; higher derivatives (the gradient of the log-det series,
    which differentiates VJPs) go through the same rule at every level.

    Measured on the ANCHORS.md density model (2-core x86 CPU, ``python -m benchmarks.ab``,
    medians of 18 interleaved calls, against ``lax.conv`` for its narrowing convs):
    evaluation forward 20.2 -> 17.2 ms, 20-iteration inverse 387 -> 326 ms, training step
    without log-det 73 -> 71 ms, Neumann log-det step 168 -> 171 ms, autodiff log-det
    step unchanged (349 -> 348 ms; +13% and -9% in two earlier runs with a fixed order).
    Plain ``"col2im"`` made the Neumann step 10-17% slower.
    """
    return conv2d_col2im(x, kernel, precision=precision)


def _lax_conv_jvp(value_fn, precision, primals, tangents):
    """JVP rule of a ``custom_jvp`` conv whose value comes from ``value_fn``: the
    derivative of the same operator through ``lax.conv`` (``conv(dx, K) + conv(x, dK)``;
    an unperturbed input or kernel contributes no term)."""
    x, kernel = primals
    dx, dk = tangents
    out = value_fn(x, kernel, precision)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_conv_same(dx, kernel, precision))
    if not isinstance(dk, SymbolicZero):
        terms.append(_conv_same(x, dk, precision))
    if not terms:  # not reached: the rule runs only when some input is perturbed
        return out, jnp.zeros_like(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


conv2d_col2im_hybrid.defjvp(functools.partial(_lax_conv_jvp, conv2d_col2im_hybrid),
                            symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d_patches_hybrid(x: Array, kernel: Array, precision: Any = None) -> Array:
    """``conv2d_patches``'s value (``"SAME"`` padding) with ``lax.conv``'s derivatives.

    The counterpart of ``conv2d_col2im_hybrid`` for the convs that widen the channels:
    the value is one matrix product over im2col patches; the JVP, and so every gradient
    and the gradient of the log-det series' VJPs, goes through ``lax.conv``. What it
    saves is compile time: the transpose of the patches (a sum of nine shifted slices of
    the cotangent) compiles to a dozen small kernels per conv shape and derivative
    order, where a transposed ``lax.conv`` is one library call.

    Measured on the ANCHORS.md density model (2-core x86 CPU, both variants compiled and
    then timed interleaved in one process, 16 calls each): 5-term log-det training step
    compile 30.3 -> 23.0 s, step 407 -> 365 ms; Neumann-gradient step compile 28.0 ->
    20.4 s, step 272 -> 256 ms; the loss is identical.
    """
    return conv2d_patches(x, kernel, padding="SAME", precision=precision)


conv2d_patches_hybrid.defjvp(functools.partial(_lax_conv_jvp, conv2d_patches_hybrid),
                             symbolic_zeros=True)


def dense_norm(kernel: Array, u: Array, n_iter: int) -> tuple[Array, Array]:
    """Power iteration for ``x -> x @ kernel`` (``kernel`` of shape ``(in, out)``)."""
    return operator_norm(lambda v: v @ kernel, u, n_iter,
                         op_transpose=lambda w: kernel @ w)


def conv_norm(kernel: Array, u: Array, n_iter: int, *, strides=1,
              padding="SAME") -> tuple[Array, Array]:
    """Power iteration on the convolution operator acting on inputs shaped like ``u``.

    ``u`` has shape ``(1, H, W, C_in)``: the operator is the convolution at that spatial
    size with the given zero padding, and its transpose is the exact adjoint. With unit
    strides and ``"SAME"`` / ``"CIRCULAR"`` padding the operator is applied as
    ``conv2d_patches`` (matrix products; fast when vmapped over many kernels).

    The iterations run in a ``lax.fori_loop``: unrolled, the 5 training-time iterations
    of every conv were a third of the fusions XLA compiles for the ANCHORS.md density
    model's log-det training step. Rolled, its compile took 27 s instead of 35 s (the
    classifier's training step 15 s instead of 22 s), at the same step time within this
    2-core CPU's noise.
    """
    if isinstance(strides, int):
        strides = (strides, strides)
    if _is_unit_stride(strides) and padding in ("SAME", "CIRCULAR"):
        op = lambda v: conv2d_patches(v, kernel, padding=padding)
    else:
        op = lambda v: conv2d(v, kernel, strides=strides, padding=padding)
    return operator_norm(op, u, n_iter, max_unroll=0)


def conv_singular_values(kernel: Array, spatial_shape: Sequence[int]) -> Array:
    """Exact singular values of the circular 2-D convolution with ``kernel``.

    For an ``n x m`` input with circular (periodic) padding, the convolution operator is
    block-diagonalized by the 2-D DFT: its singular values are those of the
    ``C_in x C_out`` matrices ``K_hat[p, q] = sum_{a,b} K[a, b] exp(-2 pi i (pa/n + qb/m))``
    (Sedghi, Gupta and Long, 2019). Phases from the kernel's centring and the difference
    between convolution and correlation do not change them. For zero padding the result
    is an upper bound of the operator norm (the zero-padded operator is a compression of
    the circular one on a larger grid, and in practice its norm is close to it).

    Args:
      kernel: HWIO kernel ``(kh, kw, C_in, C_out)`` with ``kh <= n`` and ``kw <= m``.
      spatial_shape: ``(n, m)``, the input's spatial size.

    Returns:
      Array of shape ``(n, m, min(C_in, C_out))``; ``.max()`` is the operator norm.
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
    """Spectral norm of the kernel reshaped to ``(kh*kw*C_in, C_out)``.

    This is what reshaping-based spectral normalization (e.g. ``flax.linen.SpectralNorm``)
    controls. It is *not* the norm of the convolution operator and must not be used to
    certify invertibility; it is kept for comparison and tests.
    """
    kernel = jnp.asarray(kernel)
    return jnp.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), ord=2)


def conv_dense_matrix(kernel: Array, spatial_shape: Sequence[int], *, padding="SAME",
                      strides=1) -> Array:
    """The dense matrix of the conv operator (for tests and small certificates).

    Row ``i`` is the flattened output for the ``i``-th flattened unit input of shape
    ``(n, m, C_in)``; its largest singular value is the exact operator norm.
    """
    n, m = (int(s) for s in spatial_shape)
    c_in = kernel.shape[2]
    d = n * m * c_in
    basis = jnp.eye(d, dtype=kernel.dtype).reshape(d, n, m, c_in)
    out = conv2d(basis, kernel, padding=padding, strides=strides)
    return out.reshape(d, -1)


# --------------------------------------------------------------------------------------
# Overriding the number of power iterations (certification).

_override = threading.local()


@contextlib.contextmanager
def power_iterations(n_iter: int):
    """Within this context every spectral layer runs ``n_iter`` power iterations.

    Applies while a model is *traced*: use it around an un-jitted ``model.apply`` (or a
    function jitted inside the context). With ``train=True, mutable=["spectral"]`` the
    stored vectors converge, which makes the stored ``sigma`` a tight estimate::

        with lipschitz.power_iterations(200):
            _, state = model.apply(variables, x, train=True, mutable=["spectral"])
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    previous = getattr(_override, "n_iter", None)
    _override.n_iter = int(n_iter)
    try:
        yield
    finally:
        _override.n_iter = previous


def _iterations(n_train: int, train: bool) -> int:
    forced = getattr(_override, "n_iter", None)
    if forced is not None:
        return forced
    return n_train if train else 0


# --------------------------------------------------------------------------------------
# Flax modules.


class _SpectralBase(nn.Module):
    """Shared logic: state in the "spectral" collection, soft normalization."""

    def _normalized(self, kernel: Array, u_shape: tuple[int, ...],
                    norm_fn: Callable[[Array, Array, int], tuple[Array, Array]],
                    train: bool) -> Array:
        coeff = check_coeff(self.coeff)
        u_var = self.variable(
            SPECTRAL, "u",
            lambda: _normalize(utils.normal(self.make_rng("params"), u_shape, kernel.dtype)))
        sigma_var = self.variable(SPECTRAL, "sigma", lambda: jnp.zeros((), kernel.dtype))
        if u_var.value.shape != tuple(u_shape):
            raise ValueError(
                f"{type(self).__name__} was built for inputs of shape {u_var.value.shape[1:]}"
                f" (power-iteration vector), got {tuple(u_shape[1:])}: the operator norm of a"
                " convolution depends on the input's spatial size")
        if self.is_initializing():
            n_iter = self.init_power_iter
        else:
            n_iter = _iterations(self.n_power_iter, train)
        w_const = lax.stop_gradient(kernel)
        with jax.default_matmul_precision("float32"):
            _, u = norm_fn(w_const, u_var.value, n_iter)
        u = lax.stop_gradient(u)
        # sigma = ||W u|| with u fixed: differentiable in W, as in spectral normalization.
        with jax.default_matmul_precision("float32"):
            sigma, _ = norm_fn(kernel, u, 0)
        if (self.is_initializing() or n_iter > 0) and self.is_mutable_collection(SPECTRAL):
            u_var.value = u
            sigma_var.value = lax.stop_gradient(sigma)
        return soft_normalize(kernel, sigma, coeff)


class SpectralDense(_SpectralBase):
    """Dense layer whose effective kernel is ``W / max(1, sigma / coeff)`` (Eq. 2).

    ``sigma`` is a power-iteration estimate of ``||W||_2``. The iteration vector ``u``
    (shape ``(in_features,)``) and the last ``sigma`` live in the ``"spectral"``
    collection; a training call (``train=True``) runs ``n_power_iter`` iterations and
    stores ``u`` when the caller passes ``mutable=["spectral"]``; evaluation uses the
    stored ``u`` as is. Initialization runs ``init_power_iter`` iterations.

    Example:
      >>> layer = SpectralDense(8, coeff=0.9)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 3)))
      >>> y, state = layer.apply(variables, jnp.ones((4, 3)), train=True,
      ...                        mutable=["spectral"])
    """
    features: int
    coeff: float = 0.9
    n_power_iter: int = 1
    init_power_iter: int = 20
    use_bias: bool = True
    kernel_init: Callable = utils.lecun_normal
    bias_init: Callable = nn.initializers.zeros

    def __post_init__(self):
        check_coeff(self.coeff)
        super().__post_init__()

    @nn.compact
    def weights(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False
                ) -> tuple[Array, Array | None]:
        """The normalized kernel ``(in, out)`` and the bias (or ``None``) for inputs like
        ``x`` (an array or ``jax.ShapeDtypeStruct``; parameters take its dtype)."""
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), x.dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), x.dtype)
                if self.use_bias else None)
        kernel = self._normalized(kernel, (in_features,), dense_norm, train)
        return kernel, bias

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        kernel, bias = self.weights(x, train=train)
        y = x @ kernel
        return y + bias if bias is not None else y


class SpectralConv(_SpectralBase):
    """2-D convolution (NHWC) normalized by its true *operator* norm.

    The power iteration alternates the convolution and its transpose on a vector of one
    input's shape ``(1, H, W, C_in)``, so ``sigma`` estimates the norm of the operator at
    the real spatial size and padding (not the reshaped kernel's norm). State handling is
    as in ``SpectralDense``.

    Example:
      >>> conv = SpectralConv(16, (3, 3), coeff=0.9, n_power_iter=5)
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> variables = conv.init(jax.random.key(0), x)
      >>> y = conv.apply(variables, x)           # evaluation: stored u, no update
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    coeff: float = 0.9
    n_power_iter: int = 1
    init_power_iter: int = 20
    strides: int | Sequence[int] = 1
    padding: str = "SAME"  # or "CIRCULAR"
    use_bias: bool = True
    kernel_init: Callable = utils.lecun_normal
    bias_init: Callable = nn.initializers.zeros

    def __post_init__(self):
        check_coeff(self.coeff)
        super().__post_init__()

    @nn.compact
    def weights(self, x: Array | jax.ShapeDtypeStruct, *, train: bool = False
                ) -> tuple[Array, Array | None]:
        """The normalized HWIO kernel and the bias for NHWC inputs like ``x`` (an array or
        ``jax.ShapeDtypeStruct``; parameters take its dtype)."""
        input_shape = x.shape
        if len(input_shape) != 4:
            raise ValueError(f"SpectralConv expects NHWC inputs, got shape {tuple(input_shape)}")
        ks = tuple(self.kernel_size) if not isinstance(self.kernel_size, int) else (
            self.kernel_size, self.kernel_size)
        c_in = input_shape[-1]
        kernel = self.param("kernel", self.kernel_init, ks + (c_in, self.features), x.dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), x.dtype)
                if self.use_bias else None)
        u_shape = (1,) + tuple(input_shape[1:])
        norm_fn = lambda k, u, n: conv_norm(k, u, n, strides=self.strides,
                                            padding=self.padding)
        kernel = self._normalized(kernel, u_shape, norm_fn, train)
        return kernel, bias

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        kernel, bias = self.weights(x, train=train)
        y = conv2d(x, kernel, strides=self.strides, padding=self.padding)
        return y + bias if bias is not None else y
