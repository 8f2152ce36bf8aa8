"""``LogDetConfig``: the one carrier of a block's log-det settings, from config files to
the estimator."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from iresnet_jax.logdet import chains, dense, roulette, series

Array = jax.Array

METHODS = ("exact", "series", "roulette", "none")
CONFIG_MODES = chains.MODES + ("auto",)


@dataclasses.dataclass(frozen=True)
class LogDetConfig:
    """How an invertible block computes ``ln det(I + J_g)``.

    Attributes:
      method: ``"exact"`` (dense Jacobian), ``"series"`` (Algorithm 2, ``n_terms``
        terms), ``"roulette"`` (Russian roulette, Residual Flows) or ``"none"`` (zeros,
        e.g. for classifiers).
      n_terms: terms of the truncated series (``"series"``).
      n_samples, probe: Hutchinson probes per example and their law.
      mode: ``"vjp"``, ``"jvp"``, ``"split"`` (see ``power_series``) or ``"auto"``,
        which becomes ``"split"`` for the series with the autodiff gradient and ``"vjp"``
        otherwise.
      gradient: ``"autodiff"`` or ``"neumann"`` (series and roulette only).
      n_exact, max_terms, distribution, geom_p, poisson_lambda: the roulette's settings
        (``russian_roulette``); the defaults are the Residual Flows code's (geometric,
        p = 0.5, 2 exact terms: 4 terms on average), with at most 20 terms.

    Example:
      >>> cfg = LogDetConfig("roulette", gradient="neumann")
      >>> gx, ld = cfg(lambda x: 0.5 * jnp.tanh(x), jnp.ones((3, 2)), jax.random.key(0))
    """
    method: str = "series"
    n_terms: int = 5
    n_samples: int = 1
    probe: str = "gaussian"
    mode: str = "vjp"
    gradient: str = "autodiff"
    n_exact: int = 2
    max_terms: int = 20
    distribution: str = "geometric"
    geom_p: float = 0.5
    poisson_lambda: float = 2.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"log-det method must be one of {METHODS}, got {self.method!r}")
        if self.mode not in CONFIG_MODES:
            raise ValueError(f"mode must be one of {CONFIG_MODES}, got {self.mode!r}")
        if self.gradient not in chains.GRADIENTS:
            raise ValueError(f"gradient must be one of {chains.GRADIENTS}, got "
                             f"{self.gradient!r}")
        if self.gradient != "autodiff" and self.method not in ("series", "roulette"):
            raise ValueError(f"gradient={self.gradient!r} needs method 'series' or "
                             f"'roulette', got method={self.method!r}")
        if self.mode == "auto":
            split = self.method == "series" and self.gradient == "autodiff"
            object.__setattr__(self, "mode", "split" if split else "vjp")
        if self.method == "series":
            chains.check_args(self.n_terms, self.n_samples, self.probe, self.mode,
                              self.gradient, roulette=False)
        if self.method == "roulette":
            roulette.check_args(self.n_exact, self.max_terms, self.distribution,
                                self.geom_p, self.poisson_lambda)
            chains.check_args(self.max_terms, self.n_samples, self.probe, self.mode,
                              self.gradient, roulette=True)

    @property
    def needs_rng(self) -> bool:
        return self.method in ("series", "roulette")

    @property
    def expected_terms(self) -> float:
        """Expected number of products per call (0 for exact and none)."""
        if self.method == "series":
            return float(self.n_terms)
        if self.method == "roulette":
            return roulette.expected_terms(
                n_exact=self.n_exact, max_terms=self.max_terms,
                distribution=self.distribution, geom_p=self.geom_p,
                poisson_lambda=self.poisson_lambda)
        return 0.0

    def __call__(self, g: Callable[[Array], Array], x: Array, key: Array | None
                 ) -> tuple[Array, Array]:
        """``(g(x), log-det estimate)`` per example."""
        if self.method == "exact":
            return dense.exact(g, x, with_output=True)
        if self.method == "series":
            return series.power_series(g, x, key, n_terms=self.n_terms,
                                       n_samples=self.n_samples, probe=self.probe,
                                       mode=self.mode, gradient=self.gradient,
                                       with_output=True)
        if self.method == "roulette":
            return roulette.russian_roulette(
                g, x, key, n_exact=self.n_exact, max_terms=self.max_terms,
                distribution=self.distribution, geom_p=self.geom_p,
                poisson_lambda=self.poisson_lambda, n_samples=self.n_samples,
                probe=self.probe, mode=self.mode, gradient=self.gradient, with_output=True)
        return g(x), jnp.zeros(x.shape[:1], x.dtype)
