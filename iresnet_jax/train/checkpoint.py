"""Orbax checkpoints of a ``TrainState``: atomic, verified, resumable, never non-finite."""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from iresnet_jax.train.state import TrainState

DIGEST = "sha256"   # the checkpoint tree's leaf holding the digest of the other leaves


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir could be read (each one's problem is in the message)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameters do not fit the model of the config."""


def _all_finite(tree) -> bool:
    for leaf in jax.tree.leaves(tree):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            return False
    return True


def digest(tree) -> np.ndarray:
    """SHA-256 of every leaf's path, dtype, shape and bytes, as ``uint8[32]``: Orbax reads
    some damaged array files without an error, so a checkpoint carries this of itself."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return np.frombuffer(h.digest(), np.uint8).copy()


def _shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_fits(saved, expected, where: str) -> None:
    """Raises ``CheckpointMismatchError`` naming the first parameter of ``expected`` whose
    shape differs in ``saved`` (or that one of them lacks)."""
    have, want = _shapes(saved), _shapes(expected)
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            got = "absent" if name not in have else f"shape {have[name]}"
            need = "absent" if name not in want else f"shape {want[name]}"
            raise CheckpointMismatchError(
                f"{where} does not fit the model of the config: parameter {name} is {got} "
                f"in the checkpoint but {need} in the model (a different config.model?)")


class Checkpointer:
    """Saves and restores train states under ``<workdir>/checkpoints``.

    Orbax writes each checkpoint to a temporary directory and renames it when complete,
    so a run killed mid-save leaves the previous checkpoint intact. ``save`` refuses a
    state with non-finite parameters (it returns ``False``), so a diverged run never
    overwrites the last good checkpoint, and stores a digest of the state with it.
    ``restore`` reads the newest checkpoint that is intact (readable, digest matching)
    into the structure of a template state (abstract shapes suffice, e.g. from
    ``jax.eval_shape``); each damaged one it passes over is named in ``skipped`` and
    replaced when the run saves that step again. Nothing is deleted on restore.
    """

    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers=ocp.StandardCheckpointHandler())
        self.skipped: list[str] = []   # "step N: what is wrong", newest first
        self._damaged: set[int] = set()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _read(self, step: int, template: TrainState) -> dict:
        """The tree of ``step``; ``CheckpointMismatchError`` if it does not fit
        ``template``, any other exception if it is damaged."""
        saved = self._manager.item_metadata(step)
        saved = getattr(saved, "tree", saved)
        check_fits(saved["params"], template.params, f"checkpoint at step {step}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.checkpoint_tree())
        if DIGEST in saved:
            abstract[DIGEST] = jax.ShapeDtypeStruct((32,), np.uint8)
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        stored = tree.pop(DIGEST, None)
        if stored is not None and not np.array_equal(np.asarray(stored),
                                                     digest(jax.device_get(tree))):
            raise ValueError("its contents do not match the digest saved with them")
        return tree

    def restore(self, template: TrainState, step: int | None = None
                ) -> TrainState | None:
        """The newest intact checkpoint (or ``step``'s) in the structure of ``template``,
        or ``None`` when there is none.

        Raises:
          CheckpointMismatchError: a checkpoint's parameters do not fit ``template``.
          CheckpointError: checkpoints exist but none is intact (none is deleted).
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint at step {step} in {self.directory} "
                                      f"(steps: {sorted(steps)})")
            steps = [step]
        self.skipped = []
        for s in steps:
            try:
                tree = self._read(s, template)
            except CheckpointMismatchError:
                raise
            except Exception as e:   # noqa: BLE001 - whatever a damaged file raises
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.skipped.append(f"step {s}: {reason[:300]}")
                self._damaged.add(s)
                logging.warning("checkpoint at step %d in %s is damaged (%s)", s,
                                self.directory, reason)
                continue
            return template.from_checkpoint_tree(tree)
        if self.skipped:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}; nothing was deleted. "
                + "; ".join(self.skipped))
        return None

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Saves ``state`` at its step; returns whether it was written."""
        tree = jax.device_get(state.checkpoint_tree())
        if not _all_finite(tree["params"]):
            return False
        step = int(tree["step"])
        if step in self._damaged:     # found damaged by restore: replaced by this one
            self._manager.delete(step)
            self._damaged.discard(step)
        elif not force and step in self._manager.all_steps():
            return False
        tree[DIGEST] = digest(tree)
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        self._manager.wait_until_finished()
        return True

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
