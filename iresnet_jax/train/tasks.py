"""The tasks of the training pipeline: what differs between toy densities, image density
estimation and classification (data, loss, test metric, final outputs).

A task is made from the config (``make(config)``) and gives the pipeline:

* ``model_fields``: the model fields the data decides (input shape, number of classes);
* ``init_batch()``: the model input that initializes ActNorm (data-dependent init);
* ``train_batch(step)``: the global batch of a step, a pure function of (seed, step), so a
  resumed run sees the same data;
* ``eval_batches()``: the test set in batches of ``eval_batch_size`` with a ``mask``;
* ``outputs(...)``: the per-example loss (its mean is minimized), called ``loss_name``
  in the test metrics, and further per-example metrics;
* ``finish(...)``: outputs written at the end (the toy task's figure).

The test metrics are ``test_<name>`` (the mean over the test set) for the loss and every
metric; the run's result (``metric``) is ``test_nll`` (toy), ``test_bits_per_dim``
(density) or ``test_accuracy`` (classification).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iresnet_jax import distributions, flow
from iresnet_jax import data as data_lib
from iresnet_jax.data import toy2d

Array = jax.Array
TASKS = ("toy_density", "density", "classification")


def _apply(model: nn.Module, variables, x, *, train, mutable, rngs, method=None):
    if mutable:
        return model.apply(variables, x, train=train, mutable=list(mutable), rngs=rngs,
                           method=method)
    return model.apply(variables, x, train=train, rngs=rngs, method=method), {}


class ToyDensity:
    """Maximum likelihood on a 2-D toy density: fresh samples every step, a held-out
    sample for the test NLL, and a figure (data, model density, model samples)."""
    metric = "test_nll"
    loss_name = "nll"

    def __init__(self, config, data=None):
        del data   # toy densities are sampled
        self.config = config
        toy2d.check_name(config.dataset)
        self.test = toy2d.sample(config.dataset, config.n_test,
                                 np.random.default_rng([config.seed, 2]))
        self.model_fields = {"dim": 2}
        self.name = config.dataset
        self.num_steps = int(config.num_steps)

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        c = self.config
        return {"x": toy2d.sample(c.dataset, c.batch_size,
                                  np.random.default_rng([c.seed, 1, int(step)]))}

    def init_batch(self) -> np.ndarray:
        return self.train_batch(0)["x"]

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return data_lib.padded_batches({"x": self.test}, self.config.eval_batch_size)

    def outputs(self, model, variables, batch, key, *, train, mutable):
        log_p, new_state = _apply(model, variables, batch["x"], train=train, mutable=mutable,
                                  rngs={"logdet": key}, method="log_prob")
        return -log_p, {}, new_state

    def finish(self, model, variables, workdir: str, final: dict) -> dict:
        """The figure and the model's checks: mass on the plotted square, samples in the
        support, the gap to the true NLL."""
        c = self.config
        lim = c.plot_range
        g = np.linspace(-lim, lim, c.grid_size, dtype=np.float32)
        gx, gy = np.meshgrid(g, g)
        grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
        log_prob = jax.jit(lambda v, x, k: model.apply(v, x, method="log_prob",
                                                       rngs={"logdet": k}))
        key = jax.random.fold_in(jax.random.key(c.seed), 8)
        chunks = [np.asarray(log_prob(variables, b["x"], jax.random.fold_in(key, i)))[b["mask"]]
                  for i, b in enumerate(data_lib.padded_batches({"x": grid},
                                                                c.eval_batch_size))]
        density = np.exp(np.concatenate(chunks)).reshape(gx.shape)
        out: dict[str, Any] = {"density_mass_on_plot_grid":
                               float(np.sum(density) * (g[1] - g[0]) ** 2)}
        out["inverse"] = {"round_trip": _round_trip(model, variables, self.test[:256], key)}
        samples = None
        if c.n_plot_samples:
            sample = jax.jit(lambda v, k: model.apply(v, c.n_plot_samples, method="sample",
                                                      rngs={"sample": k},
                                                      mutable=["intermediates"]))
            samples, sown = sample(variables, jax.random.fold_in(jax.random.key(c.seed), 9))
            samples = np.asarray(samples)
            out["inverse"]["samples"] = flow.inverse_report(sown)
            if toy2d.has_log_density(c.dataset):
                inside = np.isfinite(toy2d.log_density(c.dataset, samples))
                out["sample_fraction_in_support"] = float(np.mean(inside))
        true = toy2d.true_nll(c.dataset)
        out["true_nll"] = true
        out["gap_nats"] = None if true is None else final["test_nll"] - true
        data = toy2d.sample(c.dataset, 50_000, np.random.default_rng([c.seed, 3]))
        title = (f"{c.model.name}, {int(final['step'])} steps: test NLL "
                 f"{final['test_nll']:.3f} nats" + (f" (true {true:.3f})" if true else ""))
        out["figure"] = f"{c.dataset}_{c.model.name}.png"
        _plot(os.path.join(workdir, out["figure"]), lim, c.dataset, data, gx, gy, density,
              samples, title)
        return out


def _round_trip(model, variables, x, key) -> dict:
    """``F^{-1}(F(x))`` of test points: the inverse's report and the largest error."""
    def fn(v, x):
        z = model.apply(v, x, rngs={"logdet": key})[0]
        return model.apply(v, z, method="inverse", mutable=["intermediates"])

    x_rec, sown = jax.jit(fn)(variables, x)
    return {**flow.inverse_report(sown),
            "max_error": float(np.max(np.abs(np.asarray(x_rec) - x)))}


def _plot(path, lim, name, data, grid_x, grid_y, density, samples, title) -> None:
    # A bare Figure (no pyplot): headless, and the caller's backend is left alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 3)
    extent = [[-lim, lim], [-lim, lim]]
    axes[0].hist2d(data[:, 0], data[:, 1], bins=150, range=extent, cmap="viridis")
    axes[0].set_title(f"data ({name})")
    axes[1].pcolormesh(grid_x, grid_y, density, cmap="viridis", shading="auto")
    axes[1].set_title("model density")
    if samples is not None:
        axes[2].hist2d(samples[:, 0], samples[:, 1], bins=150, range=extent, cmap="viridis")
        axes[2].set_title("model samples (inverse)")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Writes a matplotlib figure atomically."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


class _Images:
    """Image data: the splits, deterministic augmented batches, the ActNorm init batch.
    ``data``: the ``(train, test)`` splits as ``ImageData`` (e.g. synthetic images for a
    benchmark) instead of ``config.dataset``'s."""

    def __init__(self, config, normalizer: Callable | None, data=None):
        self.config = config
        if data is None:
            data_dir = config.get("data_dir") or None
            data = (data_lib.load(config.dataset, "train", data_dir=data_dir),
                    data_lib.load(config.dataset, "test", data_dir=data_dir))
        self.train, self.test = data
        self.normalizer = normalizer(self.train) if normalizer else None
        augment = config.get("augment")
        self.batches = data_lib.TrainBatches(
            self.train, config.batch_size, config.seed,
            augment=data_lib.Augment(**augment.to_dict()) if augment else None,
            normalizer=self.normalizer)
        self.name = self.train.name
        if config.get("num_steps", 0):
            self.num_steps = int(config.num_steps)
        else:
            self.num_steps = int(math.ceil(config.num_epochs * self.batches.steps_per_epoch))

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        return self.batches(step)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in data_lib.padded_batches({"image": self.test.images,
                                              "label": self.test.labels},
                                             self.config.eval_batch_size):
            images = batch["image"]
            batch["image"] = (self.normalizer(images) if self.normalizer is not None
                              else images.astype(np.float32))
            yield batch

    def _init_images(self) -> np.ndarray:
        n = min(self.config.get("init_batch_size", 512), len(self.train))
        rng = np.random.default_rng([int(self.config.seed), 2])
        return self.train.images[np.sort(rng.permutation(len(self.train))[:n])]

    def finish(self, *args, **kwargs) -> dict:
        return {}


class Density(_Images):
    """Density estimation on 8-bit (or ``n_bins``-level) images: the loss is the mean
    bits/dim of the uniformly dequantized batch (fresh noise every step)."""
    metric = "test_bits_per_dim"
    loss_name = "bits_per_dim"

    def __init__(self, config, data=None):
        super().__init__(config, normalizer=None, data=data)
        self.model_fields = {"input_shape": self.train.shape}

    def init_batch(self) -> np.ndarray:
        key = jax.random.fold_in(jax.random.key(self.config.seed), 1)
        return np.asarray(distributions.dequantize(key, self._init_images(),
                                                   self.train.n_bins))

    def outputs(self, model, variables, batch, key, *, train, mutable):
        k_deq, k_ld = jax.random.split(key)
        x = distributions.dequantize(k_deq, batch["image"], self.train.n_bins)
        log_prob, new_state = _apply(model, variables, x, train=train, mutable=mutable,
                                     rngs={"logdet": k_ld}, method="log_prob")
        bpd = distributions.bits_per_dim(log_prob, self.train.dim, self.train.n_bins)
        return bpd, {}, new_state


class Classification(_Images):
    """Classification with cross-entropy; inputs normalized as ``config.normalization``
    says and augmented as ``config.augment``."""
    metric = "test_accuracy"
    loss_name = "loss"

    def __init__(self, config, data=None):
        super().__init__(config, normalizer=lambda train: data_lib.Normalizer.create(
            config.normalization, train), data=data)
        self.model_fields = {"num_classes": self.train.num_classes}

    def init_batch(self) -> np.ndarray:
        return self.normalizer(self._init_images())

    def outputs(self, model, variables, batch, key, *, train, mutable):
        logits, new_state = _apply(model, variables, batch["image"], train=train,
                                   mutable=mutable, rngs={"logdet": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return loss, {"accuracy": correct}, new_state


def make(config, data=None):
    """The task named by ``config.task`` (``data``: image splits to use instead of
    ``config.dataset``'s)."""
    if config.task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {config.task!r}")
    return {"toy_density": ToyDensity, "density": Density,
            "classification": Classification}[config.task](config, data)
