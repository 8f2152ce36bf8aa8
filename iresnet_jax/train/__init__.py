"""Training infrastructure shared by the experiments: train state, checkpoints, metrics,
progress and the resumable training loop."""

from iresnet_jax.train.checkpoint import Checkpointer
from iresnet_jax.train.loop import NonFiniteLossError, run
from iresnet_jax.train.metrics import MetricWriter, Progress
from iresnet_jax.train.state import TrainState, check_finite_batch, check_workdir

__all__ = ["Checkpointer", "MetricWriter", "NonFiniteLossError", "Progress", "TrainState",
           "check_finite_batch", "check_workdir", "run"]
