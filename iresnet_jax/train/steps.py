"""Pure train and evaluation steps for the two tasks, and the optimizers of appendix C.

``make_train_step`` returns ``(state, batch) -> (state, metrics)``: training applies the
model with ``train=True`` and updates the mutable collections (``"spectral"``
power-iteration vectors, ``"batch_stats"``); randomness (dequantization noise, Hutchinson
probes) comes from ``state.step_key()``, i.e. ``fold_in(rng, step)``. ``make_eval_step``
returns ``(params, model_state, batch, key) -> sums`` with ``train=False``: the spectral
state is frozen and BatchNorm uses its running averages.

Classification loss: cross-entropy. Density loss: mean bits/dim of the uniformly
dequantized batch (SPEC section 4).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from iresnet_jax.models import density as density_lib
from iresnet_jax.train.state import TrainState

TASKS = ("classification", "density")
OPTIMIZERS = ("sgd", "adamax", "adam")


def _check_task(task: str):
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def learning_rate_schedule(*, learning_rate: float, steps_per_epoch: int,
                           decay_epochs: Sequence[float] = (), decay_factor: float = 0.2,
                           warmup_epochs: float = 0.0) -> optax.Schedule:
    """Linear warm-up, then ``learning_rate * decay_factor^k`` after the k-th decay epoch
    (paper classification: 0.1, x0.2 at epochs 60/120/160)."""
    boundaries = {int(round(e * steps_per_epoch)): decay_factor for e in decay_epochs}
    schedule = optax.piecewise_constant_schedule(learning_rate, boundaries)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup <= 0:
        return schedule
    ramp = optax.linear_schedule(learning_rate / warmup, learning_rate, warmup)
    return lambda step: jnp.where(step < warmup, ramp(step), schedule(step))


def make_optimizer(*, name: str, schedule: optax.Schedule | float, momentum: float = 0.9,
                   weight_decay: float = 0.0, grad_clip: float = 0.0
                   ) -> optax.GradientTransformation:
    """SGD with momentum (classification) or Adamax (density), with PyTorch-style L2
    weight decay added to the gradient (the official code's ``weight_decay``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    if name == "sgd":
        parts.append(optax.sgd(schedule, momentum=momentum))
    elif name == "adamax":
        parts.append(optax.adamax(schedule))
    else:
        parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def _apply(model: nn.Module, variables: dict, x, *, train: bool, mutable: Sequence[str],
           rngs: dict, method=None):
    if mutable:
        return model.apply(variables, x, train=train, mutable=list(mutable), rngs=rngs,
                           method=method)
    return model.apply(variables, x, train=train, rngs=rngs, method=method), {}


def _outputs(model, task, variables, batch, key, *, train, mutable, n_bins, dim):
    """``(per-example loss, per-example metrics dict, new mutable state)``."""
    k_deq, k_ld = jax.random.split(key)
    if task == "density":
        x = density_lib.dequantize(k_deq, batch["image"], n_bins)
        log_prob, new_state = _apply(model, variables, x, train=train, mutable=mutable,
                                     rngs={"logdet": k_ld}, method="log_prob")
        bpd = density_lib.bits_per_dim(log_prob, dim, n_bins)
        return bpd, {"bits_per_dim": bpd}, new_state
    logits, new_state = _apply(model, variables, batch["image"], train=train,
                               mutable=mutable, rngs={"logdet": k_ld})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return loss, {"accuracy": correct}, new_state


def make_train_step(model: nn.Module, task: str, *, n_bins: int = 256, dim: int = 0
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure training step (jit it; it is traced once per shape).

    Args:
      model: the image model.
      task: ``"classification"`` or ``"density"``.
      n_bins: grey levels of the data (density: dequantization and bits/dim).
      dim: real number of dimensions ``D`` of one example (density: bits/dim).
    """
    _check_task(task)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        mutable = sorted(state.model_state.keys())

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            loss, metrics, new_state = _outputs(model, task, variables, batch,
                                                state.step_key(), train=True,
                                                mutable=mutable, n_bins=n_bins, dim=dim)
            return jnp.mean(loss), (metrics, new_state)

        (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        new_state = {**state.model_state, **new_state}
        out = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        out.update({k: jnp.mean(v) for k, v in metrics.items()})
        return state.apply_gradients(grads, model_state=new_state), out

    return step


def make_eval_step(model: nn.Module, task: str, *, n_bins: int = 256, dim: int = 0
                   ) -> Callable[..., dict]:
    """``(params, model_state, batch, key) -> sums``: masked sums of the loss and the
    metrics over the batch and the number of real examples (``"count"``)."""
    _check_task(task)

    def step(params, model_state, batch, key):
        variables = {"params": params, **model_state}
        loss, metrics, _ = _outputs(model, task, variables, batch, key, train=False,
                                    mutable=(), n_bins=n_bins, dim=dim)
        mask = batch["mask"].astype(loss.dtype)
        sums = {"loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}
        sums.update({k: jnp.sum(v * mask) for k, v in metrics.items()})
        return sums

    return step
