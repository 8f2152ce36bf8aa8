"""Two-dimensional toy densities (the standard set of the flow literature).

The samplers follow the definitions popularized by FFJORD (Grathwohl et al., 2019) and
used in the i-ResNet and Residual Flows papers. Where the density has a closed form it is
given too: ``8gaussians`` is a Gaussian mixture and ``checkerboard`` is uniform on 8 of the
16 squares of side 2 in ``[-4, 4]^2`` (true NLL ``ln 32 = 3.4657`` nats).

Every sampler takes an explicit ``numpy.random.Generator`` so a seed fixes the data.

Example:
  >>> x = sample("checkerboard", 1000, np.random.default_rng(0))   # (1000, 2) float32
  >>> log_density("checkerboard", x).mean()                        # -ln 32
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

DATASETS = ("8gaussians", "checkerboard", "2spirals", "moons", "circles", "pinwheel",
            "swissroll", "rings")

# 8gaussians: centres on a circle of radius 4 / 1.414, standard deviation 0.5 / 1.414.
_SQRT2 = 1.414
_EIGHT_RADIUS = 4.0 / _SQRT2
_EIGHT_STD = 0.5 / _SQRT2


def check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return name


def _eight_centres() -> np.ndarray:
    s = 1.0 / math.sqrt(2.0)
    unit = np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    return unit * _EIGHT_RADIUS


def _eight_gaussians(n, rng):
    idx = rng.integers(0, 8, n)
    return _eight_centres()[idx] + rng.normal(size=(n, 2)) * _EIGHT_STD


def _checkerboard(n, rng):
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2


def _two_spirals(n, rng):
    m = n // 2
    t = np.sqrt(rng.random((m, 1))) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(t) * t + rng.random((m, 1)) * 0.5
    d1y = np.sin(t) * t + rng.random((m, 1)) * 0.5
    x = np.vstack([np.hstack([d1x, d1y]), np.hstack([-d1x, -d1y])]) / 3
    x = x + rng.normal(size=x.shape) * 0.1
    if len(x) < n:  # odd n: one more point from the first spiral
        x = np.vstack([x, _two_spirals(2, rng)[:1]])
    return rng.permutation(x)


def _moons(n, rng):
    n_out = n // 2
    n_in = n - n_out
    outer = np.stack([np.cos(np.linspace(0, np.pi, n_out)),
                      np.sin(np.linspace(0, np.pi, n_out))], axis=1)
    inner = np.stack([1 - np.cos(np.linspace(0, np.pi, n_in)),
                      1 - np.sin(np.linspace(0, np.pi, n_in)) - 0.5], axis=1)
    x = np.vstack([outer, inner]) + rng.normal(size=(n, 2)) * 0.1
    return rng.permutation(x * 2 + np.array([-1.0, -0.2]))


def _circles(n, rng):
    n_out = n // 2
    n_in = n - n_out
    t_out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    t_in = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    x = np.vstack([np.stack([np.cos(t_out), np.sin(t_out)], 1),
                   0.5 * np.stack([np.cos(t_in), np.sin(t_in)], 1)])
    x = x + rng.normal(size=(n, 2)) * 0.08
    return rng.permutation(x * 3)


def _pinwheel(n, rng):
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    features = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = np.arange(n) % num_classes
    angles = rads[labels] + rate * np.exp(features[:, 0])
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)])
    rot = rot.T.reshape(-1, 2, 2)
    return 2 * rng.permutation(np.einsum("ti,tij->tj", features, rot))


def _swissroll(n, rng):
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    x = x + rng.normal(size=(n, 2)) * 1.0
    return x / 5


def _rings(n, rng):
    counts = [n // 4] * 3
    counts = [n - sum(counts)] + counts
    radii = [0.25, 0.5, 0.75, 1.0]
    parts = []
    for count, r in zip(counts, radii):
        t = np.linspace(0, 2 * np.pi, count, endpoint=False)
        parts.append(r * np.stack([np.cos(t), np.sin(t)], axis=1))
    x = np.vstack(parts) * 3.0
    x = rng.permutation(x)
    return x + rng.normal(size=x.shape) * 0.08


_SAMPLERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "8gaussians": _eight_gaussians, "checkerboard": _checkerboard, "2spirals": _two_spirals,
    "moons": _moons, "circles": _circles, "pinwheel": _pinwheel, "swissroll": _swissroll,
    "rings": _rings,
}


def sample(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points of the toy density ``name``, float32 of shape ``(n, 2)``."""
    check_name(name)
    if int(n) != n or n < 1:
        raise ValueError(f"number of samples must be a positive integer, got {n!r}")
    return _SAMPLERS[name](int(n), rng).astype(np.float32)


def _log_density_eight(x: np.ndarray) -> np.ndarray:
    d = x[:, None, :] - _eight_centres()[None]
    log_comp = (-0.5 * np.sum(d ** 2, -1) / _EIGHT_STD ** 2
                - np.log(2 * np.pi * _EIGHT_STD ** 2))
    m = log_comp.max(1, keepdims=True)
    return (m[:, 0] + np.log(np.mean(np.exp(log_comp - m), axis=1)))


def _log_density_checkerboard(x: np.ndarray) -> np.ndarray:
    # Squares of side 2: column i = floor(x1 / 2) in [-2, 1], row j = floor(x2 / 2); the
    # occupied squares are those with i + j even.
    i = np.floor(x[:, 0] / 2)
    j = np.floor(x[:, 1] / 2)
    inside = (np.abs(x[:, 0]) < 4) & (np.abs(x[:, 1]) < 4) & ((i + j) % 2 == 0)
    return np.where(inside, -math.log(32.0), -np.inf)


_LOG_DENSITIES = {"8gaussians": _log_density_eight, "checkerboard": _log_density_checkerboard}


def has_log_density(name: str) -> bool:
    return check_name(name) in _LOG_DENSITIES


def log_density(name: str, x: np.ndarray) -> np.ndarray:
    """True ``ln p(x)`` per point, for the densities with a closed form."""
    check_name(name)
    if name not in _LOG_DENSITIES:
        raise ValueError(f"no closed-form density for {name!r}; available for: "
                         f"{', '.join(_LOG_DENSITIES)}")
    return _LOG_DENSITIES[name](np.asarray(x, np.float64))


def true_nll(name: str, n: int = 200_000, seed: int = 12345) -> float | None:
    """Entropy of the density (the best achievable test NLL) in nats, or ``None``.

    Exact for the checkerboard (``ln 32``); a Monte Carlo estimate (standard error about
    1e-3 at the default ``n``) for the Gaussian mixture.
    """
    if name == "checkerboard":
        return math.log(32.0)
    if not has_log_density(name):
        return None
    x = sample(name, n, np.random.default_rng(seed))
    return float(-np.mean(log_density(name, x)))
