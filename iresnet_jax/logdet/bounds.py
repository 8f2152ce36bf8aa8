"""Bounds of the paper: the series' bias (Theorem 3) and the whole flow's log-det (Lemma 7)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check_lipschitz(lipschitz) -> np.ndarray:
    lip = np.asarray(lipschitz, dtype=np.float64)
    if np.any(~np.isfinite(lip)) or np.any(lip < 0) or np.any(lip >= 1):
        raise ValueError(f"Lipschitz constants must lie in [0, 1), got {lipschitz!r}")
    return lip


def bias_bound(lipschitz, dim: int, n_terms: int):
    """Theorem 3: ``|PS(J_g, n) - ln det(I + J_g)| <= -d (ln(1 - L) + sum_{k<=n} L^k / k)``.

    Computed as the tail ``d * sum_{k>n} L^k / k`` (no cancellation), in float64;
    ``lipschitz`` may be an array (one bound per entry).
    """
    lip = _check_lipschitz(lipschitz)
    if int(n_terms) != n_terms or n_terms < 0:
        raise ValueError(f"n_terms must be an integer >= 0, got {n_terms!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    closed = -(np.log1p(-lip) + sum(lip ** k / k for k in range(1, n_terms + 1)))
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
    """Lemma 7: ``d sum_t ln(1 - L_t) <= ln det J_F(x) <= d sum_t ln(1 + L_t)`` for the
    Lipschitz constants ``L_t < 1`` of the residual branches and their dimension ``d``."""
    lip = _check_lipschitz(lipschitz)
    return float(dim * np.sum(np.log1p(-lip))), float(dim * np.sum(np.log1p(lip)))
