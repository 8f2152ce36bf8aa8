"""Orbax checkpoints of a ``TrainState``: atomic, resumable, never non-finite."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from iresnet_jax.train.state import TrainState


def _all_finite(tree) -> bool:
    for leaf in jax.tree.leaves(tree):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            return False
    return True


class Checkpointer:
    """Saves and restores train states under ``<workdir>/checkpoints``.

    Orbax writes each checkpoint to a temporary directory and renames it when complete,
    so a run killed mid-save leaves the previous checkpoint intact. ``save`` refuses a
    state with non-finite parameters (it returns ``False``), so a diverged run never
    overwrites the last good checkpoint. ``restore`` reads the latest step into the
    structure of a template state (abstract shapes suffice, e.g. from ``jax.eval_shape``).
    """

    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, template: TrainState) -> TrainState | None:
        """The latest checkpoint in the structure of ``template``, or ``None``."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.checkpoint_tree())
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return template.from_checkpoint_tree(tree)

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Saves ``state`` at its step; returns whether it was written."""
        tree = jax.device_get(state.checkpoint_tree())
        if not _all_finite(tree["params"]):
            return False
        step = int(tree["step"])
        if not force and step in self._manager.all_steps():
            return False
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        self._manager.wait_until_finished()
        return True

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
