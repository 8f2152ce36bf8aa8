"""Log-determinants of residual blocks: ``ln det(I + J_g(x))`` per example.

For ``Lip(g) < 1`` the determinant is positive (Lemma 6) and

    ln det(I + J_g) = tr ln(I + J_g) = sum_{k>=1} (-1)^{k+1} tr(J_g^k) / k        (Eq. 4).

``exact`` builds the dense per-example Jacobian (toy densities, tests). ``power_series``
truncates Eq. (4) at ``n_terms`` and estimates each trace with Hutchinson's estimator
``tr(A) = E[v^T A v]`` (Algorithm 2), by repeated vector-Jacobian products (``mode="vjp"``)
or Jacobian-vector products (``mode="jvp"``). The series is unrolled with a Python loop,
which XLA:CPU runs much faster than a ``lax.scan`` over the terms.

``bias_bound`` is Theorem 3 and ``terms_for_bias`` inverts it; ``lemma7_bounds`` gives the
bounds of Lemma 7 for a whole network.

All functions take ``g``, a function of one batch that acts per example (no mixing across
the batch), and ``x`` with a leading batch axis. Everything here is pure JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax import utils

Array = jax.Array
Fn = Callable[[Array], Array]

PROBES = ("gaussian", "rademacher")
MODES = ("vjp", "jvp")


def _check_same_shape(gx: Array, x: Array, what: str = "g"):
    if gx.shape != x.shape:
        raise ValueError(f"{what} must map inputs to outputs of the same shape, got {x.shape} "
                         f"-> {gx.shape}")


def _batch_sum(a: Array) -> Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def jacobian(g: Fn, x: Array) -> tuple[Array, Array]:
    """Dense per-example Jacobian of ``g`` at ``x``, with ``g(x)``.

    Returns ``(g(x), J)`` with ``J`` of shape ``(batch, d, d)``, ``d`` the number of
    elements of one example. Costs ``d`` batched Jacobian-vector products that share one
    linearization. If ``g`` carries a fused ``g.value_and_jacobian`` (as the MLP branch
    does) that is used instead.
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have a leading batch axis, got shape {x.shape}")
    fused = getattr(g, "value_and_jacobian", None)
    if fused is not None and x.ndim == 2:
        gx, jac = fused(x)
        _check_same_shape(gx, x)
        return gx, jac
    gx, jvp_fn = jax.linearize(g, x)
    _check_same_shape(gx, x)
    batch, d = x.shape[0], math.prod(x.shape[1:])
    eye = jnp.eye(d, dtype=x.dtype)
    basis = jnp.broadcast_to(eye[:, None, :], (d, batch, d)).reshape((d,) + x.shape)
    cols = jax.vmap(jvp_fn)(basis)                   # (d, batch, ...): column i of J
    jac = jnp.moveaxis(cols.reshape(d, batch, d), 0, -1)
    return gx, jac


def _logdet_identity_plus(jac: Array) -> Array:
    d = jac.shape[-1]
    if d == 1:
        return jnp.log(jnp.abs(1.0 + jac[..., 0, 0]))
    if d == 2:
        a, b = 1.0 + jac[..., 0, 0], jac[..., 0, 1]
        c, e = jac[..., 1, 0], 1.0 + jac[..., 1, 1]
        return jnp.log(jnp.abs(a * e - b * c))
    _, logabsdet = jnp.linalg.slogdet(jnp.eye(d, dtype=jac.dtype) + jac)
    return logabsdet


def exact_with_output(g: Fn, x: Array) -> tuple[Array, Array]:
    """``(g(x), ln|det(I + J_g(x))|)`` from the dense Jacobian (closed form for d <= 2)."""
    gx, jac = jacobian(g, x)
    return gx, _logdet_identity_plus(jac)


def exact(g: Fn, x: Array) -> Array:
    """Per-example ``ln|det(I + J_g(x))|`` from the dense Jacobian.

    Example:
      >>> w = jnp.array([[0.5, 0.1], [0.0, 0.2]])
      >>> exact(lambda x: x @ w.T, jnp.zeros((3, 2)))   # ln(1.5 * 1.2) for each example
    """
    return exact_with_output(g, x)[1]


def sample_probes(key: Array, shape: Sequence[int], probe: str, dtype) -> Array:
    """Hutchinson probes with identity covariance: Gaussian or Rademacher (+-1)."""
    if probe == "gaussian":
        return utils.normal(key, shape, dtype)
    if probe == "rademacher":
        return utils.rademacher(key, shape, dtype)
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")


def _check_series_args(n_terms: int, n_samples: int, probe: str, mode: str):
    if int(n_terms) != n_terms or n_terms < 1:
        raise ValueError(f"n_terms must be an integer >= 1, got {n_terms!r}")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def linear_map(g: Fn, x: Array, mode: str) -> tuple[Array, Fn]:
    """``(g(x), w -> w J)`` for ``mode="vjp"`` or ``(g(x), w -> J w)`` for ``mode="jvp"``."""
    if mode == "vjp":
        gx, vjp_fn = jax.vjp(g, x)
        apply = lambda w: vjp_fn(w)[0]
    elif mode == "jvp":
        gx, apply = jax.linearize(g, x)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_same_shape(gx, x)
    return gx, apply


def power_series_with_output(g: Fn, x: Array, key: Array, *, n_terms: int,
                             n_samples: int = 1, probe: str = "gaussian",
                             mode: str = "vjp",
                             coefficients: Sequence[float] | Array | None = None
                             ) -> tuple[Array, Array]:
    """``(g(x), estimate)``: Algorithm 2 sharing the forward pass with ``g(x)``.

    ``coefficients`` optionally replaces the series weights ``(-1)^{k+1} / k`` (one per
    term; a traced array is allowed), which is how weighted (e.g. Russian-roulette)
    estimators reuse this loop.
    """
    _check_series_args(n_terms, n_samples, probe, mode)
    gx, apply = linear_map(g, x, mode)
    if n_samples > 1:
        apply = jax.vmap(apply)
        probe_shape = (n_samples,) + x.shape
    else:
        probe_shape = x.shape
    v = sample_probes(key, probe_shape, probe, x.dtype)
    if coefficients is None:
        coefficients = [(-1.0) ** (k + 1) / k for k in range(1, n_terms + 1)]
    w = v
    acc = jnp.zeros(probe_shape, x.dtype)
    for k in range(n_terms):
        w = apply(w)
        acc = acc + coefficients[k] * (w * v)
    if n_samples > 1:
        acc = jnp.mean(acc, axis=0)
    return gx, _batch_sum(acc)


def power_series(g: Fn, x: Array, key: Array, *, n_terms: int, n_samples: int = 1,
                 probe: str = "gaussian", mode: str = "vjp") -> Array:
    """Truncated power series of Eq. (4) with Hutchinson trace estimates (Algorithm 2).

    Args:
      g: residual branch acting per example on a batch.
      x: batch of inputs.
      key: PRNG key for the probes.
      n_terms: number of series terms ``n >= 1``.
      n_samples: probes per example; the estimate is their mean.
      probe: ``"gaussian"`` or ``"rademacher"``.
      mode: ``"vjp"`` computes ``v^T J^k`` (reverse mode, Algorithm 2); ``"jvp"``
        computes ``J^k v`` (forward mode). Both estimate ``sum_k (-1)^{k+1} tr(J^k)/k``.

    Returns:
      Per-example estimates, shape ``(batch,)``. Unbiased for the ``n``-term series, whose
      bias against the exact log-det is bounded by ``bias_bound``.
    """
    return power_series_with_output(g, x, key, n_terms=n_terms, n_samples=n_samples,
                                    probe=probe, mode=mode)[1]


def exact_series(jac: Array, n_terms: int) -> Array:
    """The deterministic ``n``-term series ``sum_k (-1)^{k+1} tr(J^k)/k`` from dense ``J``.

    ``jac`` has shape ``(..., d, d)``. This is the quantity ``power_series`` estimates
    without bias; tests and the bias analysis compare against it.
    """
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    power = jac
    total = jnp.zeros(jac.shape[:-2], jac.dtype)
    for k in range(1, n_terms + 1):
        total = total + (-1.0) ** (k + 1) * jnp.trace(power, axis1=-2, axis2=-1) / k
        power = power @ jac
    return total


def _check_lipschitz(lipschitz) -> np.ndarray:
    lip = np.asarray(lipschitz, dtype=np.float64)
    if np.any(~np.isfinite(lip)) or np.any(lip < 0) or np.any(lip >= 1):
        raise ValueError(f"Lipschitz constants must lie in [0, 1), got {lipschitz!r}")
    return lip


def bias_bound(lipschitz, dim: int, n_terms: int):
    """Theorem 3: ``|PS(J_g, n) - ln det(I + J_g)| <= -d (ln(1 - L) + sum_{k<=n} L^k / k)``.

    Computed as ``d * sum_{k>n} L^k / k`` (the same number without the cancellation of the
    closed form), in float64. ``lipschitz`` may be an array (one bound per entry).
    """
    lip = _check_lipschitz(lipschitz)
    if int(n_terms) != n_terms or n_terms < 0:
        raise ValueError(f"n_terms must be an integer >= 0, got {n_terms!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    closed = -(np.log1p(-lip) + sum(lip ** k / k for k in range(1, n_terms + 1)))
    # Direct tail sum where it converges quickly (more accurate for small bounds).
    tail = np.zeros_like(lip)
    term_k = n_terms + 1
    power = lip ** term_k
    for _ in range(20000):
        tail = tail + power / term_k
        term_k += 1
        power = power * lip
        if np.all(power / term_k <= 1e-17 * np.maximum(tail, 1e-300)):
            break
    else:
        tail = closed
    out = dim * np.maximum(tail, 0.0)
    return float(out) if out.ndim == 0 else out


def terms_for_bias(lipschitz: float, dim: int, tol: float, max_terms: int = 100000) -> int:
    """Smallest ``n >= 1`` with ``bias_bound(lipschitz, dim, n) <= tol``."""
    lip = float(_check_lipschitz(lipschitz))
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if lip == 0.0:
        return 1
    # The tail is <= L^{n+1} / ((n+1)(1-L)) * d: find a bracket, then bisect.
    lo, hi = 1, 1
    while bias_bound(lip, dim, hi) > tol:
        lo, hi = hi, hi * 2
        if hi > max_terms:
            raise ValueError(f"more than {max_terms} terms needed for L={lip}, d={dim}, "
                             f"tol={tol}")
    if bias_bound(lip, dim, lo) <= tol:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bias_bound(lip, dim, mid) <= tol:
            hi = mid
        else:
            lo = mid
    return hi


def lemma7_bounds(lipschitz: Sequence[float], dim: int) -> tuple[float, float]:
    """Lemma 7: ``d sum_t ln(1 - L_t) <= ln det J_F(x) <= d sum_t ln(1 + L_t)``.

    Args:
      lipschitz: the Lipschitz constants ``L_t < 1`` of the residual branches.
      dim: the dimension ``d`` of the blocks' inputs.
    """
    lip = _check_lipschitz(lipschitz)
    return float(dim * np.sum(np.log1p(-lip))), float(dim * np.sum(np.log1p(lip)))


# --------------------------------------------------------------------------------------
# Configuration used by the Flax blocks.

METHODS = ("exact", "series", "none")


@dataclasses.dataclass(frozen=True)
class LogDetConfig:
    """How an invertible block computes its log-determinant.

    Attributes:
      method: ``"exact"`` (dense Jacobian), ``"series"`` (Algorithm 2) or ``"none"``
        (return zeros, e.g. for classifiers).
      n_terms, n_samples, probe, mode: the power-series estimator's settings.
    """
    method: str = "series"
    n_terms: int = 5
    n_samples: int = 1
    probe: str = "gaussian"
    mode: str = "vjp"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"log-det method must be one of {METHODS}, got {self.method!r}")
        if self.method == "series":
            _check_series_args(self.n_terms, self.n_samples, self.probe, self.mode)

    @property
    def needs_rng(self) -> bool:
        return self.method == "series"

    def __call__(self, g: Fn, x: Array, key: Array | None) -> tuple[Array, Array]:
        """``(g(x), log-det estimate)`` per example."""
        if self.method == "exact":
            return exact_with_output(g, x)
        if self.method == "series":
            return power_series_with_output(g, x, key, n_terms=self.n_terms,
                                            n_samples=self.n_samples, probe=self.probe,
                                            mode=self.mode)
        return g(x), jnp.zeros(x.shape[:1], x.dtype)
