"""Log-determinants of residual blocks: ``ln det(I + J_g(x))`` per example.

For ``Lip(g) < 1`` the determinant is positive (Lemma 6) and
``ln det(I + J_g) = sum_{k>=1} (-1)^{k+1} tr(J_g^k) / k`` (Eq. 4). One module per idea:

* ``dense``: ``exact``, from the dense Jacobian (toy densities, tests), ``exact_series``;
* ``series``: ``power_series``, the truncated series with Hutchinson estimates
  (Algorithm 2), on the chains of products of ``chains``;
* ``roulette``: ``russian_roulette``, the unbiased estimator of Residual Flows;
* ``neumann``: the Neumann-series gradient (``gradient="neumann"`` of both estimators);
* ``bounds``: ``bias_bound`` (Theorem 3), ``terms_for_bias``, ``lemma7_bounds``;
* ``config``: ``LogDetConfig``, what a block carries.

All functions take ``g``, a function of one batch acting per example, and ``x`` with a
leading batch axis. Pure JAX.
"""

from iresnet_jax.logdet.bounds import bias_bound, lemma7_bounds, terms_for_bias
from iresnet_jax.logdet.chains import (GRADIENTS, MODES, PROBES, linear_map, linear_maps,
                                       sample_probes)
from iresnet_jax.logdet.config import METHODS, LogDetConfig
from iresnet_jax.logdet.dense import exact, exact_series, jacobian
from iresnet_jax.logdet.roulette import (DISTRIBUTIONS, expected_terms, roulette_survival,
                                         roulette_weights, russian_roulette)
from iresnet_jax.logdet.series import power_series

__all__ = ["DISTRIBUTIONS", "GRADIENTS", "LogDetConfig", "METHODS", "MODES", "PROBES",
           "bias_bound", "exact", "exact_series", "expected_terms", "jacobian",
           "lemma7_bounds", "linear_map", "linear_maps", "power_series",
           "roulette_survival", "roulette_weights", "russian_roulette", "sample_probes",
           "terms_for_bias"]
