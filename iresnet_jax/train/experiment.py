"""Training an image model from an ``ml_collections`` config: ``train_and_evaluate``.

The config (see ``experiments/configs/``) names the task (``"classification"`` or
``"density"``), the dataset, the model (a preset of ``iresnet_jax.models`` plus
overrides), the optimizer and the schedule. ``train_and_evaluate(config, workdir)``:

* loads the data (``iresnet_jax.data``) and builds deterministic batches;
* initializes the model on a data batch (ActNorm's data-dependent initialization);
* replicates the train state over a ``jax.make_mesh`` mesh and splits batches along it
  (``NamedSharding`` + ``jit``; no ``pmap``);
* runs the resumable loop of ``iresnet_jax.train.run``: Orbax checkpoints in
  ``<workdir>/checkpoints`` (resumed automatically), tensorboardX and JSONL metrics,
  progress with rate and ETA, a NaN/Inf loss stops the run keeping the last good
  checkpoint;
* evaluates on the test split and writes ``<workdir>/config.json`` and
  ``<workdir>/summary.json``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from iresnet_jax import data as data_lib
from iresnet_jax import models
from iresnet_jax.train import parallel, staged, steps
from iresnet_jax.train.checkpoint import Checkpointer
from iresnet_jax.train.loop import run
from iresnet_jax.train.metrics import MetricWriter
from iresnet_jax.train.state import TrainState, check_finite_batch, check_workdir

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


def load_data(config: ml_collections.ConfigDict) -> tuple[data_lib.ImageData,
                                                          data_lib.ImageData]:
    """The train and test splits named by ``config.dataset`` / ``config.data_dir``."""
    data_dir = config.get("data_dir") or None
    train = data_lib.load(config.dataset, "train", data_dir=data_dir)
    test = data_lib.load(config.dataset, "test", data_dir=data_dir)
    return train, test


def build_model(config: ml_collections.ConfigDict, train_data: data_lib.ImageData,
                **overrides):
    """The model of ``config.model`` (a preset plus overrides) for this dataset."""
    kwargs = models.model_kwargs(**{**config.model.to_dict(), **overrides})
    task = config.task
    steps._check_task(task)
    expected = "density" if task == "density" else "classifier"
    if kwargs["kind"] != expected:
        raise ValueError(f"task {task!r} needs a {expected} model, got kind "
                         f"{kwargs['kind']!r}")
    if task == "density":
        shape = tuple(kwargs.get("input_shape", train_data.shape))
        if shape != train_data.shape:
            raise ValueError(f"the model is built for inputs {shape} but {train_data.name} "
                             f"images are {train_data.shape}")
        kwargs["input_shape"] = shape
    else:
        classes = kwargs.setdefault("num_classes", train_data.num_classes)
        if classes != train_data.num_classes:
            raise ValueError(f"the model has {classes} classes but {train_data.name} has "
                             f"{train_data.num_classes}")
    return models.build(**kwargs)


def normalizer_for(config, train_data) -> data_lib.Normalizer | None:
    if config.task == "density":
        return None
    return data_lib.Normalizer.create(config.normalization, train_data)


def steps_per_epoch(config, train_data) -> int:
    return len(train_data) // config.batch_size


def total_steps(config, train_data) -> int:
    if config.get("num_steps", 0):
        return int(config.num_steps)
    return int(math.ceil(config.num_epochs * steps_per_epoch(config, train_data)))


def make_tx(config, train_data):
    spe = steps_per_epoch(config, train_data)
    schedule = steps.learning_rate_schedule(
        learning_rate=config.learning_rate, steps_per_epoch=spe,
        decay_epochs=tuple(config.get("lr_decay_epochs", ())),
        decay_factor=config.get("lr_decay_factor", 0.2),
        warmup_epochs=config.get("warmup_epochs", 0.0))
    return steps.make_optimizer(name=config.optimizer, schedule=schedule,
                                momentum=config.get("momentum", 0.9),
                                weight_decay=config.get("weight_decay", 0.0),
                                grad_clip=config.get("grad_clip", 0.0))


def init_batch(config, train_data, normalizer) -> np.ndarray:
    """The data batch that initializes ActNorm (a fixed random subset of the train set)."""
    n = min(config.get("init_batch_size", 512), len(train_data))
    idx = np.sort(np.random.default_rng([int(config.seed), 2]).permutation(len(train_data))[:n])
    images = train_data.images[idx]
    if normalizer is not None:
        return normalizer(images)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return np.asarray(models.dequantize(key, images.astype(np.float32), train_data.n_bins))


@functools.lru_cache(maxsize=16)
def _jitted_init(model):
    return jax.jit(model.init)


@functools.lru_cache(maxsize=16)
def jitted_steps(model, task: str, n_bins: int, dim: int, mesh):
    """``(train_step, eval_step)`` jitted for ``mesh``: the train state replicated, batches
    split along the data axis, the state donated.

    Cached on the (hashable) model and mesh, so a run resumed in the same process (or a
    second run of the same model) reuses the compiled programs.
    """
    repl, data_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    train_step = jax.jit(steps.make_train_step(model, task, n_bins=n_bins, dim=dim),
                         in_shardings=(repl, data_sh), out_shardings=(repl, repl),
                         donate_argnums=(0,))
    eval_step = jax.jit(steps.make_eval_step(model, task, n_bins=n_bins, dim=dim))
    return train_step, eval_step


def staged_train_step(model, task: str, n_bins: int, dim: int, mesh):
    """The block-by-block training step (``train.staged``) of a density model on one
    device: ``config.staged = True``."""
    if task != "density" or not isinstance(model, models.MultiscaleDensity):
        raise ValueError(f"config.staged=True applies to multiscale density models, not "
                         f"to the {task} model {type(model).__name__}")
    if mesh.size != 1:
        raise ValueError(f"config.staged=True runs on one device, got a mesh of "
                         f"{mesh.size}; pass one device or set config.staged=False")
    return staged.make_staged_train_step(model, n_bins=n_bins, dim=dim)


def create_state(config, model, x_init: np.ndarray, tx) -> TrainState:
    """Initializes the model on ``x_init`` and returns the train state."""
    key = jax.random.key(config.seed)
    k_params, k_ld, k_run = jax.random.split(key, 3)
    variables = _jitted_init(model)({"params": k_params, "logdet": k_ld}, x_init)
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState.create(params=params, model_state=variables, tx=tx,
                             rng=jax.random.key_data(k_run))


def abstract_state(config, model, x_init, tx) -> TrainState:
    """The train state's shapes without computing it (a checkpoint-restore template)."""
    return jax.eval_shape(lambda x: create_state(config, model, x, tx), x_init)


def evaluate(model, task: str, params, model_state, test_data, *, batch_size: int,
             normalizer, mesh, key, eval_step=None) -> dict[str, float]:
    """Mean loss and accuracy (classification) or bits/dim (density) over ``test_data``."""
    if eval_step is None:
        eval_step = jax.jit(steps.make_eval_step(model, task, n_bins=test_data.n_bins,
                                                 dim=test_data.dim))
    totals: dict[str, float] = {}
    for i, batch in enumerate(data_lib.eval_batches(test_data, batch_size, normalizer)):
        sums = eval_step(params, model_state, parallel.shard_batch(batch, mesh),
                         jax.random.fold_in(key, i))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None, print_fn: Callable[[str], None] = print
                       ) -> dict[str, Any]:
    """Trains the model of ``config`` in ``workdir`` (resuming if checkpoints exist) and
    evaluates it on the test split. Returns the summary (also in ``summary.json``)."""
    check_workdir(workdir)
    steps._check_task(config.task)
    t0 = time.time()
    train_data, test_data = load_data(config)
    model = build_model(config, train_data)
    normalizer = normalizer_for(config, train_data)
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=1))

    augment = data_lib.Augment(**config.augment.to_dict()) if config.get("augment") else None
    batches = data_lib.TrainBatches(train_data, config.batch_size, config.seed,
                                    augment=augment, normalizer=normalizer)
    num_steps = total_steps(config, train_data)
    tx = make_tx(config, train_data)
    x_init = init_batch(config, train_data, normalizer)
    checkpointer = Checkpointer(workdir)
    if checkpointer.latest_step() is not None:
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                            sharding=parallel.replicated(mesh)),
                             abstract_state(config, model, x_init, tx))
    else:
        state = parallel.replicate(create_state(config, model, x_init, tx), mesh)

    train_step, eval_step = jitted_steps(model, config.task, train_data.n_bins,
                                         train_data.dim, mesh)
    if config.get("staged", False):
        train_step = staged_train_step(model, config.task, train_data.n_bins, train_data.dim,
                                       mesh)
    eval_key = jax.random.fold_in(jax.random.key(config.seed), 2)

    def batch_fn(step: int):
        batch = batches(step)
        check_finite_batch(batch)
        return parallel.shard_batch(batch, mesh)

    def eval_fn(state: TrainState) -> dict[str, float]:
        return evaluate(model, config.task, state.params, state.model_state, test_data,
                        batch_size=config.eval_batch_size, normalizer=normalizer, mesh=mesh,
                        key=eval_key, eval_step=eval_step)

    writer = MetricWriter(workdir) if jax.process_index() == 0 else None
    print_fn(f"{config.task} on {train_data.name}: {len(train_data)} train / "
             f"{len(test_data)} test images, {models.count_params(state.params):,} "
             f"parameters, {num_steps} steps ({batches.steps_per_epoch} per epoch), "
             f"{mesh.size} device(s)")
    state, summary = run(state=state, train_step=train_step, batch_fn=batch_fn,
                         num_steps=num_steps, checkpointer=checkpointer, writer=writer,
                         log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                         eval_every=config.get("eval_every", 0) or None, eval_fn=eval_fn,
                         print_fn=print_fn)
    checkpointer.close()
    if writer is not None:
        writer.close()
    summary = {**summary, "task": config.task, "dataset": train_data.name,
               "num_params": models.count_params(state.params), "devices": mesh.size,
               "total_seconds_this_run": time.time() - t0}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=1)
    print_fn("test: " + ", ".join(f"{k}={v:.4f}" for k, v in summary["eval"].items()))
    return summary
