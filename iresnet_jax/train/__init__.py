"""Training: one pipeline for every task (``train_and_evaluate``), its tasks, the train
state, checkpoints, metrics, the optimizer builder, data parallelism and the evaluation
protocol of the density models (``evaluation``)."""

from iresnet_jax.train.checkpoint import Checkpointer
from iresnet_jax.train.loop import NonFiniteLossError, run
from iresnet_jax.train.metrics import MetricWriter, Progress
from iresnet_jax.train.pipeline import (CONFIG_FILE, METRICS_FILE, Run, build_model,
                                        make_eval_step, make_train_step, restore, setup,
                                        train_and_evaluate)
from iresnet_jax.train.state import TrainState, check_finite_batch, check_workdir

__all__ = ["CONFIG_FILE", "Checkpointer", "METRICS_FILE", "MetricWriter",
           "NonFiniteLossError", "Progress", "Run", "TrainState", "build_model",
           "check_finite_batch", "check_workdir", "make_eval_step", "make_train_step",
           "restore", "run", "setup", "train_and_evaluate"]
