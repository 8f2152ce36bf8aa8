"""The models the analyses look at: roles, their configs, and training or restoring them.

A role is ``"vanilla"``, ``"batchnorm"``, ``"c=<coeff>"`` (the i-ResNet classifiers) or
``"density"``; each analysis names the roles it needs (``NEEDS``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np

from experiments.configs import (digits_batchnorm, digits_classifier, digits_density,
                                 digits_vanilla)
from iresnet_jax import train
from iresnet_jax.train import pipeline

NEEDS = {
    "singular_values": ("vanilla", "batchnorm", "coeffs"),
    "reconstructions": ("vanilla", "batchnorm", "max_coeff"),
    "convergence": ("coeffs",),
    "logdet_bias": ("density",),
    "runtime": (),
    "samples": ("density",),
}


@dataclasses.dataclass
class Trained(train.Run):
    """A run (config, task, model, state) with a label and its last training metrics."""
    name: str = ""
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def coeff(self) -> float | None:
        return getattr(self.model, "coeff", None)

    def test_inputs(self, n: int) -> np.ndarray:
        """The first ``n`` test images as network inputs: normalized (classifier) or at the
        centres of their dequantization bins in ``[-0.5, 0.5)`` (density)."""
        test = self.task.test
        images = test.images[:n].astype(np.float32)
        if self.task.normalizer is not None:
            return np.asarray(self.task.normalizer(images), np.float32)
        return ((images + 0.5) / test.n_bins - 0.5).astype(np.float32)


def default_name(config: ml_collections.ConfigDict) -> str:
    """The role of a training config: ``"density"``, ``"batchnorm"``, ``"vanilla"`` or
    ``"c=<coeff>"``."""
    if config.task == "density":
        return "density"
    if config.model.get("norm", "actnorm") == "batchnorm":
        return "batchnorm"
    coeff = config.model.get("coeff")
    return "vanilla" if coeff is None else f"c={coeff:g}"


def roles(only: Iterable[str], coeffs) -> list[str]:
    """The roles the analyses ``only`` need, in order and without repeats."""
    out = []
    for name in only:
        for need in NEEDS[name]:
            if need == "coeffs":
                out += [f"c={c:g}" for c in coeffs]
            elif need == "max_coeff":
                out.append(f"c={max(coeffs):g}")
            else:
                out.append(need)
    return list(dict.fromkeys(out))


def model_config(role: str, s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training config of a role: a digits config with the settings' overrides."""
    if role == "density":
        c = digits_density.get_config()
        c.model.update(s.density_model)
    else:
        module = {"vanilla": digits_vanilla, "batchnorm": digits_batchnorm}.get(
            role, digits_classifier)
        c = module.get_config()
        c.model.update(s.classifier_model)
        if role.startswith("c="):
            c.model.coeff = float(role[2:])
    c.batch_size = s.batch_size
    c.seed = s.seed
    return c


def train_quick(config: ml_collections.ConfigDict, num_steps: int | None, *, name: str,
                print_fn: Callable[[str], None] = print) -> Trained:
    """Trains the model of ``config`` in memory (no checkpoints, no evaluation) for
    ``num_steps`` steps (``None`` or negative: the config's schedule; 0: as initialized)."""
    r = pipeline.setup(config)
    if num_steps is None or num_steps < 0:
        num_steps = r.task.num_steps
    state, metrics = r.state, {}
    if num_steps > 0:
        t0 = time.perf_counter()
        step = jax.jit(pipeline.make_train_step(r.model, r.task), donate_argnums=0)
        state, summary = train.run(state=state, train_step=step, batch_fn=r.task.train_batch,
                                   num_steps=num_steps, checkpointer=None,
                                   log_every=config.log_every, print_fn=print_fn)
        metrics = summary["train"]
        print_fn(f"{name}: {num_steps} steps in {time.perf_counter() - t0:.1f} s, last "
                 + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return Trained(r.config, r.task, r.model, state, name=name, metrics=metrics)


def load_workdir(workdir: str, name: str | None = None) -> Trained:
    """The newest checkpoint of a training workdir, named by its role unless ``name``."""
    r = train.restore(workdir)
    return Trained(r.config, r.task, r.model, r.state, name=name or default_name(r.config))


def get_models(wanted: Iterable[str], s: ml_collections.ConfigDict, checkpoints=(),
               train_steps: int | None = None, models: dict | None = None,
               print_fn: Callable[[str], None] = print) -> dict[str, Trained]:
    """``models`` (role -> ``Trained``), then the checkpoints, then the roles of ``wanted``
    still missing, trained here (``train_steps``, default the settings')."""
    models = dict(models or {})
    for workdir in checkpoints:
        t = load_workdir(workdir)
        print_fn(f"{t.name}: restored step {t.step} from {workdir}")
        models[t.name] = t
    for role in wanted:
        if role not in models:
            steps = train_steps
            if steps is None:
                steps = s.density_steps if role == "density" else s.classifier_steps
            models[role] = train_quick(model_config(role, s), steps, name=role,
                                       print_fn=print_fn)
    return models
