"""Training and evaluation of flows on 2-D toy densities (the README's main job).

``train_and_evaluate(config, workdir)`` trains an i-ResNet (or the Glow baseline) by maximum
likelihood with Adam, evaluates the test NLL on a held-out sample every
``config.eval_every`` steps, writes tensorboardX scalars and ``metrics.jsonl``, saves
Orbax checkpoints (rerunning the same command resumes), and at the end writes
``<dataset>_<model>.png`` (data, learned density, samples) and ``metrics.json``.

With ``config.processes > 1`` (the main job's default is 2) on a CPU, the run is data
parallel over that many processes of this machine (``train.multiprocess``): each computes
the gradient of its share of every batch (``batch_size`` is the global batch) and the
gradients are averaged through shared memory, so a run uses the cores that one XLA:CPU
process leaves idle at this model size. Rank 0 (the calling process) evaluates, writes
checkpoints and the figure; the result is that of a one-process run with the same global
batch up to float rounding.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.flatten_util import ravel_pytree

from iresnet_jax import logdet as logdet_lib
from iresnet_jax.data import toy2d
from iresnet_jax.models.glow import Glow
from iresnet_jax.models.toy import ToyIResNet
from iresnet_jax.train.checkpoint import Checkpointer
from iresnet_jax.train import multiprocess
from iresnet_jax.train.loop import NonFiniteLossError, restore_latest, run
from iresnet_jax.train.metrics import MetricWriter
from iresnet_jax.train.state import TrainState, check_workdir

MODELS = ("iresnet", "glow")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, with a clear message, on settings that cannot work."""
    toy2d.check_name(config.dataset)
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; valid: {', '.join(MODELS)}")
    for name in ("num_steps", "batch_size", "n_blocks", "eval_every", "checkpoint_every",
                 "n_test", "log_every"):
        value = config[name]
        if int(value) != value or value <= 0:
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
    if not config.learning_rate > 0:
        raise ValueError(f"config.learning_rate must be positive, got {config.learning_rate}")
    processes = config.get("processes", 1)
    if int(processes) != processes or processes < 1:
        raise ValueError(f"config.processes must be a positive integer, got {processes!r}")
    if config.batch_size % processes:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                         f"config.processes={processes}; choose a multiple")


def resolve_processes(config, print_fn=print) -> int:
    """How many processes the run uses: ``config.processes``, but 1 off the CPU backend
    (the processes would share one accelerator) and at most the CPUs available."""
    wanted = int(config.get("processes", 1))
    if wanted == 1:
        return 1
    if jax.default_backend() != "cpu":
        print_fn(f"config.processes={wanted} applies to CPU runs; using 1 process on "
                 f"{jax.default_backend()}")
        return 1
    cpus = len(multiprocess.available_cpus())
    n = wanted
    while n > 1 and (n > cpus or config.batch_size % n):
        n -= 1
    if n != wanted:
        print_fn(f"config.processes={wanted} but {cpus} CPU(s) available; using {n}")
    return n


def make_model(config: ml_collections.ConfigDict):
    """The flow named by ``config.model``."""
    if config.model == "glow":
        return Glow(n_steps=config.n_blocks, hidden=tuple(config.hidden))
    ld = config.logdet
    return ToyIResNet(n_blocks=config.n_blocks, hidden=tuple(config.hidden),
                      coeff=config.coeff, n_power_iter=config.n_power_iter,
                      activation=config.activation,
                      zero_init_last=config.get("zero_init_last", False),
                      remat=config.get("remat", True),
                      logdet=logdet_lib.LogDetConfig(ld.method, n_terms=ld.n_terms,
                                                     n_samples=ld.n_samples),
                      inverse_tol=config.inverse_tol, inverse_max_iter=config.inverse_max_iter)


def make_optimizer(config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        # A run shorter than the warm-up still needs one step of (cosine) decay.
        warmup_steps=min(config.warmup_steps, config.num_steps - 1),
        decay_steps=config.num_steps, end_value=config.learning_rate * config.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       optax.adam(schedule, b1=config.get("adam_b1", 0.9),
                                  b2=config.get("adam_b2", 0.999)))


def batch_for_step(config, step: int) -> np.ndarray:
    """The training batch of ``step``: a fresh sample, deterministic in (seed, step)."""
    return toy2d.sample(config.dataset, config.batch_size,
                        np.random.default_rng([config.seed, 1, step]))


def eval_key(config):
    """The key of the held-out evaluation and the density grid (stochastic log-dets)."""
    return jax.random.PRNGKey(config.seed + 7)


def test_set(config) -> np.ndarray:
    return toy2d.sample(config.dataset, config.n_test, np.random.default_rng([config.seed, 2]))


def _rngs(model, key):
    keys = jax.random.split(key, 2)
    return {"logdet": keys[0], "sample": keys[1]}


def _loss_and_grads(model, state: TrainState, x, key):
    """``(mean NLL of x, new non-parameter state, gradients)`` at ``state.params``."""
    def loss_fn(params):
        variables = {"params": params, **state.model_state}
        log_p, new_state = model.apply(variables, x, train=True, method="log_prob",
                                       rngs=_rngs(model, key),
                                       mutable=list(state.model_state.keys()))
        return -jnp.mean(log_p), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, new_state, grads


def make_steps(model, eval_chunk: int):
    """Jitted train step and a chunked per-example log-density."""

    def train_step(state: TrainState, x):
        loss, new_state, grads = _loss_and_grads(model, state, x, state.step_key())
        grad_norm = optax.global_norm(grads)
        return state.apply_gradients(grads, {**state.model_state, **new_state}), {
            "loss": loss, "grad_norm": grad_norm}

    @jax.jit
    def log_prob_chunk(variables, x, key):
        return model.apply(variables, x, method="log_prob", rngs=_rngs(model, key))

    def log_prob(variables, x: np.ndarray, key, offset: int = 0) -> np.ndarray:
        """Per-point log-density; chunk ``i`` draws with ``fold_in(key, offset + i)``
        (``offset``: the index of ``x[0]`` in a larger set split between processes)."""
        out = []
        for i in range(0, len(x), eval_chunk):
            chunk = x[i:i + eval_chunk]
            n = len(chunk)
            if n < eval_chunk:  # pad to one compiled shape
                chunk = np.concatenate([chunk, np.zeros((eval_chunk - n, 2), chunk.dtype)])
            out.append(np.asarray(log_prob_chunk(variables, jnp.asarray(chunk),
                                                 jax.random.fold_in(key, offset + i)))[:n])
        return np.concatenate(out)

    return jax.jit(train_step, donate_argnums=0), log_prob


def make_data_parallel_step(model, state: TrainState, rank: int,
                            group: multiprocess.ProcessGroup):
    """The train step of one process of a data-parallel run: the gradient of the local
    batch (jitted), the mean over the group's processes (shared memory), the update
    (jitted). The loss, the gradients and the new power-iteration state are averaged
    (the last is the same in every process: it does not depend on the data). Each
    process folds its rank into the step's key."""
    like = (jnp.zeros((), jnp.float32), state.params, state.model_state)
    _, unravel = ravel_pytree(like)

    @jax.jit
    def grad_fn(state: TrainState, x):
        key = jax.random.fold_in(state.step_key(), rank)
        loss, new_state, grads = _loss_and_grads(model, state, x, key)
        new_state = {**state.model_state, **new_state}
        return ravel_pytree((loss.astype(jnp.float32), grads, new_state))[0]

    def apply_fn(state: TrainState, mean):
        loss, grads, new_state = unravel(mean)
        return state.apply_gradients(grads, new_state), {
            "loss": loss, "grad_norm": optax.global_norm(grads)}

    return multiprocess.data_parallel_step(grad_fn, jax.jit(apply_fn, donate_argnums=0),
                                           group)


def plot(path: str, config, data: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray,
         density: np.ndarray, samples: np.ndarray | None, title: str) -> None:
    # A bare Figure (no pyplot): works headless and leaves the caller's matplotlib backend
    # alone (switching it to Agg would stop inline plots in a notebook).
    from matplotlib.figure import Figure

    lim = config.plot_range
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 3)
    axes[0].hist2d(data[:, 0], data[:, 1], bins=150, range=[[-lim, lim], [-lim, lim]],
                   cmap="viridis")
    axes[0].set_title(f"data ({config.dataset})")
    axes[1].pcolormesh(grid_x, grid_y, density, cmap="viridis", shading="auto")
    axes[1].set_title("model density")
    if samples is not None:
        axes[2].hist2d(samples[:, 0], samples[:, 1], bins=150,
                       range=[[-lim, lim], [-lim, lim]], cmap="viridis")
        axes[2].set_title("model samples (inverse)")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def _initial_state(config, model) -> TrainState:
    x0 = jnp.asarray(batch_for_step(config, 0))
    init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = jax.jit(model.init)(init_key, x0)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState.create(params=params, model_state=model_state,
                             tx=make_optimizer(config), rng=run_key)


def _local_batch_fn(config, rank: int, n: int):
    """``step -> batch`` of one process: its slice of the global batch of the step."""
    per = config.batch_size // n

    def batch_fn(step):
        return jnp.asarray(batch_for_step(config, step)[rank * per:(rank + 1) * per])

    return batch_fn


def _slot_bytes(state: TrainState) -> int:
    """Room for the largest payload of a run: the start state or the gradient vector."""
    state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    vector = 1 + sum(int(np.prod(np.shape(x))) for x in
                     jax.tree.leaves((state.params, state.model_state)))
    return max(state_bytes, 4 * vector)


def _pin(config, rank: int, n: int) -> list[int] | None:
    """Pins this process to the ``rank``-th available CPU when ``config.pin_processes``
    and there is one per process; returns the CPUs to restore afterwards (``None``: not
    pinned). Measured on the main job: 93 steps/s pinned, 77 unpinned (2-core VM)."""
    cpus = multiprocess.available_cpus()
    if not config.get("pin_processes", True) or len(cpus) < n:
        return None
    if not multiprocess.pin_threads([cpus[rank]]):
        return None
    return cpus


def _test_nll_fn(config, log_prob, rank: int = 0,
                 group: multiprocess.ProcessGroup | None = None):
    """``state -> {"test_nll": ...}`` on the held-out set; in a data-parallel run every
    process evaluates its share of the set and the group combines the sums."""
    x_test = test_set(config)
    key = eval_key(config)
    if group is None:
        def eval_fn(state):
            lp = log_prob(state.variables(), x_test, key)
            return {"test_nll": float(-np.mean(lp))}
        return eval_fn
    chunks = -(-len(x_test) // config.eval_chunk)
    per = -(-chunks // group.n) * config.eval_chunk    # whole chunks per process
    lo, hi = min(rank * per, len(x_test)), min((rank + 1) * per, len(x_test))

    def eval_fn(state):
        lp = log_prob(state.variables(), x_test[lo:hi], key, offset=lo) \
            if hi > lo else np.zeros((0,), np.float32)
        sums = group.mean(np.asarray([-np.sum(lp, dtype=np.float64), hi - lo], np.float64))
        return {"test_nll": float(sums[0] / sums[1])}

    return eval_fn


def _worker(handle: multiprocess.Handle, config: ml_collections.ConfigDict) -> None:
    """Rank ``handle.rank`` of a data-parallel toy run (started by ``train_and_evaluate``):
    trains in step with rank 0 and writes nothing."""
    _pin(config, handle.rank, handle.n)
    group = multiprocess.ProcessGroup.attach(handle)
    try:
        model = make_model(config)
        state = group.broadcast(_initial_state(config, model))
        train_step = make_data_parallel_step(model, state, handle.rank, group)
        _, log_prob = make_steps(model, config.eval_chunk)
        run(state=state, train_step=train_step,
            batch_fn=_local_batch_fn(config, handle.rank, handle.n),
            num_steps=config.num_steps, checkpointer=None, writer=None,
            log_every=config.log_every, checkpoint_every=config.checkpoint_every,
            eval_every=config.eval_every,
            eval_fn=_test_nll_fn(config, log_prob, handle.rank, group),
            print_fn=lambda line: None, restore=False)
    except (multiprocess.PeerFailedError, NonFiniteLossError):
        # Rank 0 reports these (it stops at the same step, or it is what failed).
        group.abort()
        raise SystemExit(1)
    except BaseException:
        group.abort()
        raise
    finally:
        group.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       print_fn=print) -> dict[str, Any]:
    """Trains the configured flow on a toy density and writes figure and metrics.

    With ``config.processes > 1`` on a CPU the training is data parallel over that many
    processes of this machine (see the module docstring); the call returns when all are
    done. Returns the dictionary written to ``<workdir>/metrics.json``.
    """
    validate_config(config)
    check_workdir(workdir)
    t_start = time.time()
    n_proc = resolve_processes(config, print_fn)
    model = make_model(config)
    state = _initial_state(config, model)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    fused_step, log_prob = make_steps(model, config.eval_chunk)
    checkpointer = Checkpointer(workdir)
    writer = MetricWriter(workdir)
    true_nll = toy2d.true_nll(config.dataset)
    group, restore_cpus = None, None
    try:
        if n_proc > 1:
            try:
                group = multiprocess.ProcessGroup.create(n_proc, _slot_bytes(state))
            except OSError as e:  # no shared memory here: train in this process alone
                logging.warning("shared memory unavailable (%s); training in one process", e)
                print_fn(f"shared memory unavailable ({e}); training in one process")
                n_proc = 1
        if group is not None:
            multiprocess.spawn(_worker, group, (config,))
            train_step = make_data_parallel_step(model, state, 0, group)
        else:
            train_step = fused_step
        eval_fn = _test_nll_fn(config, log_prob, 0, group)
        print_fn(f"{config.model} on {config.dataset}: {n_params} parameters, "
                 f"{config.num_steps} steps of batch {config.batch_size}"
                 + (f" in {n_proc} processes" if n_proc > 1 else "")
                 + (f"; true test NLL {true_nll:.4f} nats" if true_nll is not None else ""))
        state = restore_latest(checkpointer, state, print_fn)
        if group is not None:
            state = group.broadcast(state)
            restore_cpus = _pin(config, 0, n_proc)
        state, summary = run(state=state, train_step=train_step,
                             batch_fn=_local_batch_fn(config, 0, n_proc),
                             num_steps=config.num_steps, checkpointer=checkpointer,
                             writer=writer, log_every=config.log_every,
                             checkpoint_every=config.checkpoint_every,
                             eval_every=config.eval_every, eval_fn=eval_fn,
                             print_fn=print_fn, restore=False)
    except BaseException:
        if group is not None:
            group.abort()
        raise
    finally:
        if restore_cpus is not None:
            multiprocess.pin_threads(restore_cpus)
        if group is not None:
            group.close()
    checkpointer.close()
    train_seconds = time.time() - t_start

    # Figure: data, density on a grid, samples through the inverse.
    lim = config.plot_range
    g = np.linspace(-lim, lim, config.grid_size, dtype=np.float32)
    gx, gy = np.meshgrid(g, g)
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    density = np.exp(log_prob(state.variables(), grid, eval_key(config))).reshape(gx.shape)
    # A sanity check of the model itself: a normalized density integrates to <= 1 over the
    # plotted square (close to 1 when the square holds the support).
    grid_mass = float(np.sum(density) * (g[1] - g[0]) ** 2)
    samples = None
    if config.n_plot_samples:
        sample_fn = jax.jit(lambda v, k: model.apply(v, config.n_plot_samples,
                                                     method="sample",
                                                     rngs={"sample": k}))
        samples = np.asarray(sample_fn(state.variables(), jax.random.PRNGKey(config.seed + 9)))
    data = toy2d.sample(config.dataset, 50_000, np.random.default_rng([config.seed, 3]))
    test_nll = summary["eval"].get("test_nll", float("nan"))
    title = (f"{config.model}, {config.n_blocks} blocks, {int(state.step)} steps: "
             f"test NLL {test_nll:.3f} nats"
             + (f" (true {true_nll:.3f})" if true_nll is not None else ""))
    figure = os.path.join(workdir, f"{config.dataset}_{config.model}.png")
    plot(figure, config, data, gx, gy, density, samples, title)

    steps_run = summary["steps_this_run"]
    metrics = {
        "dataset": config.dataset, "model": config.model, "n_blocks": config.n_blocks,
        "hidden": list(config.hidden), "parameters": n_params,
        "logdet": config.logdet.method if config.model == "iresnet" else "coupling",
        "test_nll": test_nll, "true_nll": true_nll,
        "gap_nats": (test_nll - true_nll) if true_nll is not None else None,
        "steps": int(state.step), "steps_this_run": steps_run,
        "batch_size": config.batch_size, "processes": n_proc,
        "train_seconds_this_run": summary["seconds_this_run"],
        "steps_per_sec": steps_run / summary["seconds_this_run"] if steps_run else None,
        "total_seconds_this_run": time.time() - t_start,
        "seconds_to_end_of_training": train_seconds, "figure": os.path.basename(figure),
        "density_mass_on_plot_grid": grid_mass,
    }
    if samples is not None and true_nll is not None and toy2d.has_log_density(config.dataset):
        inside = np.isfinite(toy2d.log_density(config.dataset, samples))
        metrics["sample_fraction_in_support"] = float(np.mean(inside))
    tmp = os.path.join(workdir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "metrics.json"))
    writer.close()
    print_fn(f"test NLL {test_nll:.4f} nats"
             + (f" (true {true_nll:.4f}, gap {test_nll - true_nll:+.4f})" if true_nll else "")
             + f"; {int(state.step)} steps; {metrics['total_seconds_this_run']:.0f} s; "
             f"figure {figure}")
    logging.info("metrics: %s", metrics)
    return metrics
