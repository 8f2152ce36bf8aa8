"""A resumable training loop with periodic evaluation, checkpoints and a NaN guard."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import jax
from absl import logging

from iresnet_jax.train.checkpoint import Checkpointer
from iresnet_jax.train.metrics import MetricWriter, Progress
from iresnet_jax.train.state import TrainState


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite (the last good checkpoint
    is kept)."""


def restore_latest(checkpointer: Checkpointer, state: TrainState,
                   print_fn: Callable[[str], None] = print) -> TrainState:
    """``state`` from ``checkpointer``'s newest intact checkpoint (``state`` is the
    template), or ``state`` itself when there is none; damaged ones are reported."""
    restored = checkpointer.restore(state)
    for problem in checkpointer.skipped:
        print_fn(f"damaged checkpoint passed over: {problem}")
    if restored is None:
        return state
    print_fn(f"resumed from checkpoint at step {int(restored.step)} "
             f"({checkpointer.directory})")
    return restored


def run(*, state: TrainState, train_step: Callable[[TrainState, Any], tuple[TrainState,
                                                                            Mapping]],
        batch_fn: Callable[[int], Any], num_steps: int, checkpointer: Checkpointer | None,
        writer: MetricWriter | None = None, log_every: int = 100,
        checkpoint_every: int = 1000, eval_every: int | None = None,
        eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
        print_fn: Callable[[str], None] = print) -> tuple[TrainState, dict]:
    """Trains ``state`` up to ``num_steps`` steps, resuming from ``checkpointer``.

    Args:
      state: the initial state (used as the template when a checkpoint exists).
      train_step: ``(state, batch) -> (state, metrics)``, jitted by the caller; metrics
        must contain ``"loss"``.
      batch_fn: ``step -> batch``; deterministic in the step, so a resumed run sees the
        same data.
      num_steps: total number of steps (the run stops at ``state.step == num_steps``).
      checkpointer: where checkpoints go (``None``: no checkpoints).
      writer: metrics sink.
      log_every, checkpoint_every, eval_every: intervals in steps.
      eval_fn: ``state -> scalars``, called every ``eval_every`` steps and at the end.
      print_fn: where progress lines go.

    Returns:
      ``(state, summary)`` with the final metrics, the last evaluation, steps run in this
      call, the wall time, and ``steps_per_sec`` after the first step (which compiles),
      evaluations and checkpoints included.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint stays.
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if checkpointer is not None:
        state = restore_latest(checkpointer, state, print_fn)
    start = int(state.step)
    progress = Progress(num_steps, start)
    t_start = time.time()
    last_metrics: dict = {}
    last_eval: dict = {}
    step = start
    while step < num_steps:
        batch = batch_fn(step)
        state, metrics = train_step(state, batch)
        step += 1
        is_log = step % log_every == 0 or step == num_steps or step == start + 1
        is_ckpt = checkpointer is not None and (step % checkpoint_every == 0
                                                or step == num_steps)
        is_eval = eval_fn is not None and eval_every and (step % eval_every == 0
                                                          or step == num_steps)
        if is_log or is_ckpt or is_eval:
            last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            loss = last_metrics.get("loss", float("nan"))
            if not math.isfinite(loss):
                if checkpointer is not None:
                    checkpointer.close()
                raise NonFiniteLossError(
                    f"training loss became {loss} at step {step}; stopping. The last good "
                    "checkpoint is kept (lower the learning rate or check the data).")
            if is_log:
                print_fn(progress.line(step, last_metrics))
                if writer is not None:
                    info = progress.update(step)
                    writer.write_scalars(step, {**{f"train/{k}": v
                                                   for k, v in last_metrics.items()},
                                                "train/steps_per_sec": info["steps_per_sec"]})
        if is_eval:
            last_eval = {k: float(v) for k, v in eval_fn(state).items()}
            print_fn(f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}"
                                                          for k, v in last_eval.items()))
            if writer is not None:
                writer.write_scalars(step, {f"eval/{k}": v for k, v in last_eval.items()})
        if is_ckpt:
            if not checkpointer.save(state):
                logging.warning("checkpoint at step %d not written (non-finite parameters "
                                "or already present)", step)
    if eval_fn is not None and not last_eval:  # e.g. a finished run, resumed
        last_eval = {k: float(v) for k, v in eval_fn(state).items()}
    if writer is not None:
        writer.flush()
    rate = progress.update(step)["steps_per_sec"] if step > start + 1 else float("nan")
    summary = {"train": last_metrics, "eval": last_eval, "steps_this_run": step - start,
               "seconds_this_run": time.time() - t_start, "final_step": step,
               "steps_per_sec": None if rate != rate else rate}
    return state, summary
