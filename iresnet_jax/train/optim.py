"""The one optimizer builder: ``make(config.optimizer, num_steps)``.

Settings (``config.optimizer``): ``name`` (``"adam"``, ``"adamax"``, ``"sgd"``),
``learning_rate``, ``b1``/``b2`` (Adam, Adamax), ``momentum`` (SGD), ``weight_decay``
(L2 added to the gradient, as the official code's ``weight_decay``), ``grad_clip``
(global norm; 0: none) and the schedule:

* ``"cosine"``: linear warm-up from 0 over ``warmup_steps``, then cosine decay to
  ``learning_rate * final_fraction`` at the last step (the toy densities);
* ``"step"``: ``learning_rate * decay_factor^k`` after the k-th fraction of the run in
  ``decay_at`` (the paper's classifiers: x0.2 at epochs 60/120/160 of 200, i.e.
  ``(0.3, 0.6, 0.8)``), after a linear warm-up from ``learning_rate / warmup_steps``;
* ``"constant"``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import optax

NAMES = ("adam", "adamax", "sgd")
SCHEDULES = ("constant", "cosine", "step")
DEFAULTS = dict(name="adam", learning_rate=1e-3, b1=0.9, b2=0.999, momentum=0.9,
                weight_decay=0.0, grad_clip=0.0, schedule="constant", warmup_steps=0,
                decay_at=(), decay_factor=0.2, final_fraction=0.0)


def settings(**overrides) -> dict[str, Any]:
    """Every optimizer setting, ``DEFAULTS`` with ``overrides`` (for config files)."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown optimizer settings {sorted(unknown)}; valid: "
                         f"{sorted(DEFAULTS)}")
    return {**DEFAULTS, **overrides}


def schedule(s: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    lr = float(s["learning_rate"])
    warmup = int(s["warmup_steps"])
    if s["schedule"] == "constant":
        return optax.constant_schedule(lr)
    if s["schedule"] == "cosine":
        # A run shorter than the warm-up still gets one step of decay.
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=min(warmup, num_steps - 1),
            decay_steps=num_steps, end_value=lr * float(s["final_fraction"]))
    boundaries = {int(round(f * num_steps)): float(s["decay_factor"]) for f in s["decay_at"]}
    steps = optax.piecewise_constant_schedule(lr, boundaries)
    if warmup <= 0:
        return steps
    ramp = optax.linear_schedule(lr / warmup, lr, warmup)
    return lambda step: jnp.where(step < warmup, ramp(step), steps(step))


def make(s: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """The optimizer of the settings ``s`` for a run of ``num_steps`` steps."""
    s = settings(**dict(s))
    if s["name"] not in NAMES:
        raise ValueError(f"optimizer name must be one of {NAMES}, got {s['name']!r}")
    if s["schedule"] not in SCHEDULES:
        raise ValueError(f"optimizer schedule must be one of {SCHEDULES}, got "
                         f"{s['schedule']!r}")
    if not s["learning_rate"] > 0:
        raise ValueError(f"optimizer learning_rate must be positive, got "
                         f"{s['learning_rate']!r}")
    lr = schedule(s, num_steps)
    parts = []
    if s["grad_clip"] > 0:
        parts.append(optax.clip_by_global_norm(s["grad_clip"]))
    if s["weight_decay"] > 0:
        parts.append(optax.add_decayed_weights(s["weight_decay"]))
    if s["name"] == "sgd":
        parts.append(optax.sgd(lr, momentum=s["momentum"]))
    elif s["name"] == "adamax":
        parts.append(optax.adamax(lr, b1=s["b1"], b2=s["b2"]))
    else:
        parts.append(optax.adam(lr, b1=s["b1"], b2=s["b2"]))
    return optax.chain(*parts)
