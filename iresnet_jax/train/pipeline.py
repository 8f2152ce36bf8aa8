"""``train_and_evaluate(config, workdir)``: the one training pipeline, for every task.

The config (``experiments/configs/``) names the task (``tasks``), the dataset, the model
(``models.build(config.model)``), the optimizer (``optim``) and the schedule. The run:

* builds batches that are pure functions of (seed, step), initializes the model on a
  data batch (ActNorm's data-dependent init) and the train state;
* replicates the state over a ``jax.make_mesh`` mesh of every device of every process
  and splits each batch along it (``parallel``: ``NamedSharding`` + ``jit``);
* runs the resumable loop (``loop.run``): Orbax checkpoints in ``<workdir>/checkpoints``
  (resumed automatically), ``metrics.jsonl`` and TensorBoard scalars, progress with rate
  and ETA, a NaN/Inf loss stops the run and keeps the last good checkpoint;
* evaluates on the test set and writes ``<workdir>/config.json`` and
  ``<workdir>/metrics.json``: ``{"final": {"step", "train_loss", <test metrics>},
  "processes", "devices", "seconds", ...}``.

``restore(workdir)`` reads a finished or running workdir back (``iresnet_jax.load``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from iresnet_jax import flow, models, precision
from iresnet_jax.train import optim, parallel, tasks
from iresnet_jax.train.checkpoint import Checkpointer
from iresnet_jax.train.loop import run
from iresnet_jax.train.metrics import MetricWriter
from iresnet_jax.train.state import TrainState, check_finite_batch, check_workdir

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass
class Run:
    """A configured run: its config, task (data), model and train state."""
    config: ml_collections.ConfigDict
    task: Any
    model: nn.Module
    state: TrainState

    @property
    def variables(self) -> dict:
        return self.state.variables()

    @property
    def step(self) -> int:
        return int(self.state.step)


def build_model(config, task) -> nn.Module:
    """The model of ``config.model`` with the fields the task's data decides."""
    spec = config.model.to_dict()
    for key, value in task.model_fields.items():
        given = spec.get(key)
        if given is not None and tuple(_tuple(given)) != tuple(_tuple(value)):
            raise ValueError(f"config.model.{key}={given} does not fit the data of "
                             f"{task.name} ({key}={value})")
        spec[key] = value
    return models.build(spec)


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def create_state(config, model: nn.Module, x_init, tx: optax.GradientTransformation
                 ) -> TrainState:
    """Initializes the model on ``x_init`` (the task's ``init_batch()``: ActNorm's
    data-dependent init) and returns the train state."""
    k_params, k_logdet, k_run = jax.random.split(jax.random.key(config.seed), 3)
    variables = dict(jax.jit(model.init)({"params": k_params, "logdet": k_logdet}, x_init))
    params = variables.pop("params")
    return TrainState.create(params=params, model_state=variables, tx=tx,
                             rng=jax.random.key_data(k_run))


def make_train_step(model: nn.Module, task, products: str = precision.AUTO
                    ) -> Callable[[TrainState, dict], tuple]:
    """The pure training step ``(state, batch) -> (state, metrics)``: ``train=True`` (power
    iterations, BatchNorm statistics), randomness from ``state.step_key()``, products at
    the training precision of ``products`` (``iresnet_jax.precision``)."""

    def step(state: TrainState, batch: dict):
        mutable = sorted(state.model_state.keys())

        def loss_fn(params):
            loss, metrics, new_state = task.outputs(
                model, {"params": params, **state.model_state}, batch, state.step_key(),
                train=True, mutable=mutable)
            return jnp.mean(loss), (metrics, new_state)

        (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        out.update({k: jnp.mean(v) for k, v in metrics.items()})
        return state.apply_gradients(grads, {**state.model_state, **new_state}), out

    return precision.traced(step, products, exact=False)


def make_eval_step(model: nn.Module, task, products: str = precision.AUTO
                   ) -> Callable[..., dict]:
    """``(variables, batch, key) -> sums``: masked sums of the loss and metrics over the
    batch (``train=False``: frozen spectral state, BatchNorm running averages) and the
    number of real examples; products at the exact precision of ``products``."""

    def step(variables, batch, key):
        loss, metrics, _ = task.outputs(model, variables, batch, key, train=False,
                                        mutable=())
        mask = batch["mask"].astype(loss.dtype)
        sums = {task.loss_name: jnp.sum(loss * mask), "count": jnp.sum(mask)}
        sums.update({k: jnp.sum(v * mask) for k, v in metrics.items()})
        return sums

    return precision.traced(step, products, exact=True)


def evaluate(task, variables, key, eval_step, mesh) -> dict[str, float]:
    """``test_<name>``: the mean of the loss and every metric over the task's test set;
    batch ``i`` draws its randomness from ``fold_in(key, i)``."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(task.eval_batches()):
        sums = eval_step(variables, parallel.shard_batch(batch, mesh),
                         jax.random.fold_in(key, i))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {f"test_{k}": v / count for k, v in totals.items()}


def eval_key(config) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), 2)


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _positive_int(config, name: str, allow_zero: bool = False) -> None:
    value = config.get(name)
    ok = (isinstance(value, int) and not isinstance(value, bool)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        raise ValueError(f"config.{name} must be a {'non-negative' if allow_zero else 'positive'}"
                         f" integer, got {value!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the setting, on values that cannot work."""
    if config.get("task") not in tasks.TASKS:
        raise ValueError(f"config.task must be one of {tasks.TASKS}, got "
                         f"{config.get('task')!r}")
    for name in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every"):
        _positive_int(config, name)
    _positive_int(config, "eval_every", allow_zero=True)
    if "processes" in config:
        _positive_int(config, "processes")
    precision.check(config.get("precision", precision.AUTO), "config.precision")
    if config.task == "toy_density" or not config.get("num_epochs"):
        _positive_int(config, "num_steps")
    else:
        _positive_int(config, "num_steps", allow_zero=True)
        if not config.num_epochs > 0:
            raise ValueError(f"config.num_epochs must be positive, got {config.num_epochs!r}")
    if "model" not in config:
        return
    coeff = config.model.get("coeff")
    if coeff is not None and not 0 < coeff < 1:
        raise ValueError(f"config.model.coeff must lie in (0, 1) (the Lipschitz bound of "
                         f"each residual branch), got {coeff!r}")
    for name, value in _flat(config.model.to_dict(), "config.model"):
        if any(isinstance(v, int) and v < 0 for v in _tuple(value)):
            raise ValueError(f"{name} must not be negative, got {value!r}")


def _flat(tree: dict, prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def setup(config: ml_collections.ConfigDict, *, init: bool = True) -> Run:
    """The task (data), the model and the initial train state of ``config`` (its shapes
    only with ``init=False``: a restore template)."""
    check_config(config)
    task = tasks.make(config)
    tx = optim.make(config.optimizer, task.num_steps)
    x_init = jnp.asarray(task.init_batch())
    try:   # the model names its own field; the prefix says where it is set
        model = build_model(config, task)
        state = (create_state(config, model, x_init, tx) if init else
                 jax.eval_shape(lambda x: create_state(config, model, x, tx), x_init))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model ({config.model.get('name')}): {e}") from e
    return Run(config, task, model, state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains the model of ``config`` in ``workdir`` (resuming from its checkpoints) and
    evaluates it on the test set. Returns what it writes to ``metrics.json``."""
    t0 = time.time()
    check_workdir(workdir)
    checkpointer = Checkpointer(workdir)
    resume = checkpointer.latest_step() is not None
    r = setup(config, init=not resume)
    task, model = r.task, r.model
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    lead = jax.process_index() == 0
    if lead:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    if resume:   # the abstract state, placed on the mesh, is the restore template
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=parallel.replicated(mesh)), r.state)
    else:
        state = parallel.replicate(r.state, mesh)
    products = config.get("precision", precision.AUTO)
    train_step = jax.jit(make_train_step(model, task, products),
                         in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                         out_shardings=parallel.replicated(mesh), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(model, task, products))
    key = eval_key(config)
    n_params = models.count_params(state.params)
    writer = MetricWriter(workdir) if lead else None
    print_fn(f"{config.task} on {task.name}: {type(model).__name__} with {n_params:,} "
             f"parameters, {task.num_steps} steps of batch {config.batch_size}, "
             f"{mesh.size} device(s) in {jax.process_count()} process(es)")

    def batch_fn(step: int):
        batch = task.train_batch(step)
        check_finite_batch(batch, f"input batch of step {step}")
        return parallel.shard_batch(batch, mesh)

    state, summary = run(
        state=state, train_step=train_step, batch_fn=batch_fn, num_steps=task.num_steps,
        checkpointer=checkpointer, writer=writer, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, eval_every=config.get("eval_every") or None,
        eval_fn=lambda s: evaluate(task, s.variables(), key, eval_step, mesh),
        print_fn=print_fn)
    checkpointer.close()
    final = {"step": int(state.step), "train_loss": summary["train"].get("loss"),
             **summary["eval"]}
    result: dict[str, Any] = {
        "task": config.task, "dataset": task.name, "model": config.model.name,
        "final": final, "metric": task.metric, "parameters": n_params,
        "processes": jax.process_count(), "devices": mesh.size,
        "steps_this_run": summary["steps_this_run"],
        "steps_per_sec": summary["steps_per_sec"]}
    if lead:
        with precision.products(products, exact=True):   # samples, round trips, figures
            result.update(task.finish(model, jax.device_get(state.variables()), workdir,
                                      final))
        for name, report in result.get("inverse", {}).items():
            extra = (f", largest error {report['max_error']:.2e}" if "max_error" in report
                     else "")
            print_fn(f"{name}: {flow.describe_inverse(report)}{extra}")
        result["seconds"] = time.time() - t0
        _write_json(os.path.join(workdir, METRICS_FILE), result)
        writer.close()
    else:
        result["seconds"] = time.time() - t0
    print_fn(f"{task.metric} {final.get(task.metric, float('nan')):.4f} after "
             f"{final['step']} steps; {result['seconds']:.0f} s")
    return result


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{workdir!r} has no {CONFIG_FILE}: not a workdir of "
                         "train_and_evaluate")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore(workdir: str) -> Run:
    """The config, task (data), model and newest checkpoint of a training workdir."""
    r = setup(load_config(workdir), init=False)
    checkpointer = Checkpointer(workdir)
    try:
        state = checkpointer.restore(r.state)
    finally:
        checkpointer.close()
    if state is None:
        raise ValueError(f"no checkpoint in {workdir!r}/checkpoints")
    return dataclasses.replace(r, state=state)
