"""The train state: every piece of a run that a checkpoint must hold, in one pytree."""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Parameters, non-parameter model state, optimizer state, step and rng.

    ``model_state`` holds the mutable collections other than ``"params"`` (the
    ``"spectral"`` power-iteration vectors, ``"batch_stats"``). ``rng`` is a raw
    ``uint32[2]`` key; per-step randomness is ``jax.random.fold_in(rng, step)``, so a
    resumed run replays exactly the randomness it would have drawn.
    """
    step: Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, params, model_state, tx: optax.GradientTransformation,
               rng: Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                   opt_state=tx.init(params), rng=rng, tx=tx)

    def step_key(self) -> Array:
        """The key of the current step (fold_in of the run's key and the step)."""
        return jax.random.fold_in(self.rng, self.step)

    def apply_gradients(self, grads, model_state=None) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                            model_state=self.model_state if model_state is None
                            else model_state)

    def variables(self) -> dict:
        """``{"params": ..., **model_state}`` for ``model.apply``."""
        return {"params": self.params, **self.model_state}

    def checkpoint_tree(self) -> dict:
        return {"step": self.step, "params": self.params, "model_state": self.model_state,
                "opt_state": self.opt_state, "rng": self.rng}

    def from_checkpoint_tree(self, tree: dict) -> "TrainState":
        return self.replace(**tree)


def check_workdir(workdir: str) -> str:
    """Creates ``workdir`` and checks that it is writable, with a clear error if not."""
    if not workdir:
        raise ValueError("--workdir is required (a directory for checkpoints and outputs)")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")   # one per process
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e
    return workdir


def check_finite_batch(batch: Any, name: str = "input batch") -> None:
    """Raises ``ValueError`` if any array in ``batch`` holds NaN or infinity."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            where = jax.tree_util.keystr(path)
            bad = int(np.sum(~np.isfinite(arr)))
            raise ValueError(f"{name}{where} contains {bad} NaN or infinite value(s)")
