"""A converted model (``Converted``) and writing it as a training workdir that
``iresnet_jax.load`` and ``python -m experiments.evaluate`` read."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Converted:
    """A model converted from another library's checkpoint.

    Attributes:
      model: the model's settings, as ``config.model`` holds them (``models.build``).
      variables: its variables (``params`` and the model-state collections), NumPy.
      task: the training task it fits, ``"density"`` or ``"classification"``.
      source: what the checkpoint said about the model (its class and settings).
      input_shape: one input's ``(H, W, C)`` (or ``(D,)``).
      dataset: the dataset it was trained on, when the checkpoint says (else ``None``).
    """
    model: dict[str, Any]
    variables: dict[str, Any]
    task: str
    source: dict[str, Any]
    input_shape: tuple[int, ...]
    dataset: str | None = None


class VariableBuilder:
    """Collects converted arrays by variable path and builds the nested variables:
    ``put(path, None, value)`` for a single leaf, ``put(path, i, value)`` for entry ``i``
    of a scanned stack (stacked along a leading axis)."""

    def __init__(self):
        self.leaves: dict[tuple, dict] = {}

    def put(self, path: tuple, index, value) -> None:
        self.leaves.setdefault(path, {})[index] = np.asarray(value, np.float32)

    def variables(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path, values in self.leaves.items():
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = (values[None] if None in values
                              else np.stack([values[i] for i in range(len(values))]))
        return out


def check_variables(model, variables, input_shape) -> None:
    """Raises ``ValueError`` naming the first leaf whose shape or presence differs from
    what ``model.init`` makes for inputs of ``input_shape`` (one example)."""
    x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
    want = jax.eval_shape(model.init, jax.random.key(0), x)
    got_paths = {jax.tree_util.keystr(p): np.shape(v)
                 for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    want_paths = {jax.tree_util.keystr(p): tuple(v.shape)
                  for p, v in jax.tree_util.tree_leaves_with_path(want)}
    for path in sorted(set(got_paths) | set(want_paths)):
        if got_paths.get(path) != want_paths.get(path):
            raise ValueError(f"variables{path}: the model needs shape "
                             f"{want_paths.get(path)}, the conversion gave "
                             f"{got_paths.get(path)}")


def save_workdir(workdir: str, config, variables, input_shape) -> None:
    """Writes ``<workdir>/config.json`` and a step-0 checkpoint (``train.TrainState``
    with ``variables`` and the fresh state of ``config.optimizer``), so that
    ``iresnet_jax.load(workdir)`` returns the model of ``config.model`` with these
    variables. ``config``: a full training config (``experiments/configs``);
    ``input_shape``: one example's ``(H, W, C)``."""
    from iresnet_jax import models
    from iresnet_jax.train import CONFIG_FILE, Checkpointer, TrainState, check_workdir, optim

    check_workdir(workdir)
    model = models.build(config.model)
    check_variables(model, variables, input_shape)
    params = jax.tree.map(jnp.asarray, variables["params"])
    model_state = {k: jax.tree.map(jnp.asarray, v) for k, v in variables.items()
                   if k != "params"}
    tx = optim.make(config.optimizer, max(int(config.get("num_steps") or 0), 1))
    state = TrainState.create(params=params, model_state=model_state, tx=tx,
                              rng=jax.random.key_data(jax.random.key(config.seed)))
    checkpointer = Checkpointer(workdir)
    if checkpointer.latest_step() is not None:
        checkpointer.close()
        raise ValueError(f"{workdir!r} already holds checkpoints: convert into a new "
                         "workdir")
    try:
        if not checkpointer.save(state, force=True):
            raise ValueError("the converted parameters are not all finite")
    finally:
        checkpointer.close()
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=1))

