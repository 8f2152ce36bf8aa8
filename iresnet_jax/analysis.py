"""The paper's appendix analyses (SPEC section 7) as reusable functions.

Each analysis takes trained models (``Trained``: a model, its variables and its data) and
returns plain numbers; ``plot_*`` functions draw them on a bare ``matplotlib`` ``Figure``
(no pyplot, so the caller's backend is left alone). ``experiments/analyses.py`` runs all six
and writes PNG, CSV and JSON files.

1. ``singular_values`` (Fig. 6): the largest singular value of every convolution operator
   of a trained model, from the 2-D FFT of the kernel (Sedghi et al., 2019; exact for
   circular padding at the layer's input size) and by power iteration on the true
   (zero-padded) operator.
2. ``reconstruct`` (Fig. 7): ``x -> F(x) -> F^{-1}(F(x))`` with the fixed-point inverse
   (100 iterations per block, as in appendix B), max and mean errors.
3. ``fixed_point_convergence`` (Fig. 8): reconstruction error and time per batch after
   ``k`` fixed-point iterations per block, for any ``k`` from one compiled program.
4. ``logdet_bias`` (Fig. 9): for a density model, the exact log-det of every residual
   block (dense Jacobian), the truncated series with ``n = 1..max_terms`` terms (exactly,
   from the dense Jacobian, and by Hutchinson's estimator as in training) and Theorem 3's
   bound.
5. ``runtime_comparison`` (Table 5): one forward+backward pass of Glow, an i-ResNet, an
   i-ResNet with spectral normalization and one with spectral normalization and the
   power-series log-det, with the same layers, channels and batch.
6. ``sample_images``: samples of a density model through its inverse.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from iresnet_jax import blocks
from iresnet_jax import data as data_lib
from iresnet_jax import flow
from iresnet_jax import lipschitz
from iresnet_jax import logdet as logdet_lib
from iresnet_jax.models import common as models_common
from iresnet_jax.models import glow as glow_lib
from iresnet_jax.train import evaluation, experiment, steps

Array = jax.Array

# --------------------------------------------------------------------------------------
# Trained models.


@dataclasses.dataclass
class Trained:
    """A model with its variables and data, ready for the analyses.

    Attributes:
      name: a label (``"vanilla"``, ``"c=0.9"``, ``"density"``...).
      config: the training config (``experiments/configs`` style).
      model: the Flax model.
      params, model_state: its variables (``model_state`` holds ``"spectral"``,
        ``"batch_stats"``...).
      train_data, test_data: the data splits; normalizer: the classifier's input map.
      step: training steps taken; metrics: the last training step's metrics.
    """
    name: str
    config: ml_collections.ConfigDict
    model: nn.Module
    params: Any
    model_state: dict
    train_data: Any
    test_data: Any
    normalizer: Any
    step: int
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.model_state}

    def test_inputs(self, n: int) -> np.ndarray:
        """The first ``n`` test images as network inputs: normalized (classifier) or at the
        centres of their dequantization bins, in ``[-0.5, 0.5)`` (density)."""
        images = self.test_data.images[:n].astype(np.float32)
        if self.normalizer is not None:
            return np.asarray(self.normalizer(images), np.float32)
        return ((images + 0.5) / self.test_data.n_bins - 0.5).astype(np.float32)

    @property
    def coeff(self) -> float | None:
        model = getattr(self.model, "extractor", self.model)
        return getattr(model, "coeff", None)


def train_quick(config: ml_collections.ConfigDict, num_steps: int, *, name: str,
                print_fn: Callable[[str], None] = print) -> Trained:
    """Trains the model of ``config`` for ``num_steps`` steps in memory (no checkpoints,
    no evaluation pass): the quick settings of the analyses. ``num_steps=0`` returns the
    initialized model."""
    train, test = experiment.load_data(config)
    model = experiment.build_model(config, train)
    normalizer = experiment.normalizer_for(config, train)
    tx = experiment.make_tx(config, train)
    state = experiment.create_state(config, model,
                                    experiment.init_batch(config, train, normalizer), tx)
    metrics: dict = {}
    if num_steps > 0:
        t0 = time.perf_counter()
        step = jax.jit(steps.make_train_step(model, config.task, n_bins=train.n_bins,
                                             dim=train.dim), donate_argnums=(0,))
        augment = (data_lib.Augment(**config.augment.to_dict())
                   if config.get("augment") else None)
        batches = data_lib.TrainBatches(train, config.batch_size, config.seed,
                                        augment=augment, normalizer=normalizer)
        for i in range(num_steps):
            state, m = step(state, batches(i))
        metrics = {k: float(v) for k, v in jax.device_get(m).items()}
        print_fn(f"{name}: {num_steps} steps in {time.perf_counter() - t0:.1f} s, last "
                 + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return Trained(name, config, model, state.params, dict(state.model_state), train, test,
                   normalizer, int(state.step), metrics)


def load_workdir(workdir: str, name: str | None = None) -> Trained:
    """A model trained by ``experiments/train.py`` (its latest checkpoint)."""
    r = evaluation.restore(workdir)
    config = r["config"]
    return Trained(name or default_name(config), config, r["model"], r["params"],
                   dict(r["model_state"]), r["train_data"], r["test_data"], r["normalizer"],
                   r["step"])


def default_name(config: ml_collections.ConfigDict) -> str:
    """``"density"``, ``"batchnorm"``, ``"vanilla"`` or ``"c=<coeff>"`` for a config."""
    if config.task == "density":
        return "density"
    if config.model.get("norm", "actnorm") == "batchnorm":
        return "batchnorm"
    coeff = config.model.get("coeff")
    return "vanilla" if coeff is None else f"c={coeff:g}"


# --------------------------------------------------------------------------------------
# 1. Singular values of the convolution operators (Fig. 6).


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One convolution as the model applies it: ``kernel`` is the effective HWIO kernel
    (after spectral normalization, as at evaluation), on inputs of ``spatial_shape``."""
    path: str
    kernel: np.ndarray
    spatial_shape: tuple[int, int]
    padding: str


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def conv_layers(model: nn.Module, variables: dict, x: np.ndarray) -> list[ConvLayer]:
    """Every convolution of ``model`` in the order of the forward pass, with its effective
    kernel and input size (found by tracing ``model.apply`` on ``x[:1]``)."""
    found: dict[tuple, dict] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "weights" and isinstance(
                module, (lipschitz.SpectralConv, blocks._PlainConv)):
            found.setdefault(tuple(module.path), dict(
                hw=tuple(int(s) for s in args[0].shape[1:3]),
                padding=getattr(module, "padding", "SAME"),
                coeff=getattr(module, "coeff", None)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, rngs={"logdet": jax.random.key(0)}),
                       variables, jnp.asarray(x[:1]))
    # Group the convs of one block (same parent path) so that stacked (scanned) blocks
    # are listed block by block.
    groups: dict[tuple, list[tuple]] = {}
    for path in found:
        groups.setdefault(path[:-1], []).append(path)
    layers = []
    for parent, paths in groups.items():
        kernels = [np.asarray(_get(variables["params"], p)["kernel"]) for p in paths]
        lead = kernels[0].shape[:-4]
        count = int(np.prod(lead)) if lead else 1
        kernels = [k.reshape((count,) + k.shape[-4:]) for k in kernels]
        us = []
        for p in paths:
            info = found[p]
            if info["coeff"] is None:
                us.append(None)
            else:
                u = np.asarray(_get(variables["spectral"], p)["u"])
                us.append(u.reshape((count,) + u.shape[-4:]))
        for b in range(count):
            for p, k, u in zip(paths, kernels, us):
                info = found[p]
                kernel = k[b]
                if u is not None:
                    kernel = evaluation._effective_kernel(kernel, u[b], info["coeff"],
                                                          info["padding"])
                name = "/".join(p) + (f"[{b}]" if lead else "")
                layers.append(ConvLayer(name, np.asarray(kernel), info["hw"],
                                        info["padding"]))
    return layers


def fold_kernel(kernel: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
    """The kernel of the same *circular* convolution on an ``n x m`` grid with its taps
    wrapped modulo ``(n, m)`` (needed when the kernel is larger than the input, e.g. a 3x3
    conv on 2x2 inputs)."""
    kernel = np.asarray(kernel)
    n, m = (int(s) for s in spatial_shape)
    kh, kw = kernel.shape[:2]
    if kh <= n and kw <= m:
        return kernel
    # Wrap every tap to its offset modulo (n, m); the offset of the anchor only multiplies
    # the transfer function by a phase, which leaves the singular values unchanged.
    full = np.zeros((n, m) + kernel.shape[2:], kernel.dtype)
    ch, cw = (kh - 1) // 2, (kw - 1) // 2
    for a in range(kh):
        for b in range(kw):
            full[(a - ch) % n, (b - cw) % m] += kernel[a, b]
    return full


@functools.partial(jax.jit, static_argnames=("n_iter", "padding"))
def _power_norm(kernel, u, *, n_iter: int, padding: str):
    return lipschitz.conv_norm(kernel, u, n_iter, padding=padding)[0]


def conv_norms(kernel: np.ndarray, spatial_shape: Sequence[int], padding: str = "SAME", *,
               n_power_iter: int = 200, seed: int = 0) -> dict[str, float]:
    """Largest singular value of one convolution operator, three ways.

    Returns:
      ``fft``: from the 2-D FFT of the kernel on the ``n x m`` grid (Sedghi et al., 2019),
      exact for circular padding (the kernel wrapped if larger than the grid);
      ``fft_zero_padding_bound``: the same on the grid enlarged by the kernel's reach, a
      certified upper bound for zero padding; ``power``: ``n_power_iter`` power iterations
      on the true operator with ``padding``, from a random start (an estimate from below).
    """
    kernel = np.asarray(kernel)
    n, m = (int(s) for s in spatial_shape)
    kh, kw = kernel.shape[:2]
    fft = float(jnp.max(lipschitz.conv_singular_values(
        jnp.asarray(fold_kernel(kernel, (n, m))), (n, m))))
    big = (n + kh - 1, m + kw - 1)
    bound = float(jnp.max(lipschitz.conv_singular_values(jnp.asarray(kernel), big)))
    u0 = np.random.default_rng(seed).normal(size=(1, n, m, kernel.shape[2]))
    k = jnp.asarray(kernel)
    power = float(_power_norm(k, jnp.asarray(u0, k.dtype), n_iter=int(n_power_iter),
                              padding=padding))
    return {"fft": fft, "fft_zero_padding_bound": bound, "power": power}


def singular_values(models: Sequence[Trained], *, n_power_iter: int = 200
                    ) -> list[dict[str, Any]]:
    """One row per (model, conv layer): the largest singular values of ``conv_norms``."""
    rows = []
    for t in models:
        x = t.test_inputs(1)
        for i, layer in enumerate(conv_layers(t.model, t.variables, x)):
            norms = conv_norms(layer.kernel, layer.spatial_shape, layer.padding,
                               n_power_iter=n_power_iter, seed=i)
            rows.append(dict(model=t.name, coeff=t.coeff, layer=i, path=layer.path,
                             kernel_shape="x".join(str(s) for s in layer.kernel.shape),
                             input_hw="x".join(str(s) for s in layer.spatial_shape),
                             padding=layer.padding, power_iterations=n_power_iter, **norms))
    return rows


def plot_singular_values(rows: Sequence[dict]):
    """Fig. 6: per layer, baselines (left) and i-ResNets (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    names = list(dict.fromkeys(r["model"] for r in rows))
    base = [n for n in names if not any(r["coeff"] for r in rows if r["model"] == n)]
    ires = [n for n in names if n not in base]
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    for ax, group, title in ((axes[0], base, "vanilla and BatchNorm ResNets"),
                             (axes[1], ires, "i-ResNets (spectral normalization)")):
        for name in group:
            rs = [r for r in rows if r["model"] == name]
            layer = [r["layer"] for r in rs]
            col = colors[names.index(name) % len(colors)]
            ax.plot(layer, [r["fft"] for r in rs], "o-", color=col, ms=4,
                    label=f"{name}: FFT (circular)")
            ax.plot(layer, [r["power"] for r in rs], "x--", color=col, ms=5, lw=0.8,
                    label=f"{name}: power iteration")
            coeff = rs[0]["coeff"]
            if coeff:
                ax.axhline(coeff, color=col, lw=0.6, ls=":")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("conv layer")
        ax.set_title(title)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel("largest singular value of the conv operator")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# 2-3. Reconstructions and fixed-point convergence (Figs. 7, 8).


def _with_inverse(model: nn.Module, tol: float, max_iter: int,
                  rtol: float | None = None) -> nn.Module:
    """``model`` (a classifier's feature extractor or a flow) with the fixed-point
    inverse's ``tol``, ``max_iter`` and, unless ``None``, ``rtol``."""
    kw = dict(inverse_tol=tol, inverse_max_iter=max_iter)
    if rtol is not None:
        kw["inverse_rtol"] = rtol
    if hasattr(model, "extractor"):
        return model.clone(extractor=model.extractor.clone(**kw))
    return model.clone(**kw)


def _forward(t: Trained, model: nn.Module | None = None):
    model = model or t.model
    if t.task == "classification":
        return lambda v, x: model.apply(v, x, method="features")
    return lambda v, x: model.apply(v, x, rngs={"logdet": jax.random.key(0)})[0]


def reconstruct(t: Trained, x: np.ndarray, *, max_iter: int = 100, tol: float = 0.0
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """``F^{-1}(F(x))`` with ``max_iter`` fixed-point iterations per block (``tol=0``: all
    of them, as in appendix B); per-image max and mean absolute errors."""
    model = _with_inverse(t.model, tol, max_iter)
    forward = jax.jit(_forward(t, model))
    inverse = jax.jit(lambda v, z: model.apply(v, z, method="inverse"))
    z = forward(t.variables, jnp.asarray(x))
    x_rec = np.asarray(inverse(t.variables, z))
    err = np.abs(x_rec - x).reshape(len(x), -1)
    with np.errstate(invalid="ignore"):
        per_max, per_mean = err.max(axis=1), err.mean(axis=1)
    finite = bool(np.all(np.isfinite(x_rec)))
    return x_rec, {"model": t.name, "coeff": t.coeff, "iterations": max_iter,
                   "max_error": float(np.max(per_max)) if finite else math.inf,
                   "mean_error": float(np.mean(per_mean)) if finite else math.inf,
                   "finite": finite, "per_image_max_error": per_max.tolist()}


def _k_iteration_inverse(n_iter: Array):
    """An interceptor that replaces every ``InvertibleBlock.inverse`` by exactly
    ``n_iter`` (traced) plain fixed-point iterations ``x <- y - g(x)`` from ``x = y``."""

    def intercept(next_fun, args, kwargs, context):
        block = context.module
        if context.method_name != "inverse" or not isinstance(block, blocks.InvertibleBlock):
            return next_fun(*args, **kwargs)
        y = args[0]
        if block.actnorm == "after":
            y = block.norm.inverse(y)
        prepared = kwargs.get("prepared")
        if prepared is None:
            prepared = block.prepare(y, train=False)
        g = block.branch.build(prepared)
        with jax.default_matmul_precision("float32"):
            x = lax.fori_loop(0, n_iter, lambda _, x: y - g(x), y)
        if block.actnorm == "before":
            x = block.norm.inverse(x)
        return x

    return intercept


def fixed_point_convergence(t: Trained, x: np.ndarray, iterations: Sequence[int], *,
                            repeats: int = 1) -> list[dict[str, Any]]:
    """Reconstruction error after ``k`` fixed-point iterations in every block, for each
    ``k`` in ``iterations`` (one compiled program; ``k`` is a traced loop bound), with the
    seconds per batch of the inverse (median of ``repeats`` calls after a warm-up)."""
    model = t.model

    def inverse(v, z, n_iter):
        with nn.intercept_methods(_k_iteration_inverse(n_iter)):
            return model.apply(v, z, method="inverse")

    inverse = jax.jit(inverse)
    z = jax.jit(_forward(t))(t.variables, jnp.asarray(x))
    jax.block_until_ready(inverse(t.variables, z, jnp.int32(1)))
    rows = []
    for k in iterations:
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            x_rec = jax.block_until_ready(inverse(t.variables, z, jnp.int32(k)))
            times.append(time.perf_counter() - t0)
        err = np.abs(np.asarray(x_rec) - x)
        rows.append(dict(model=t.name, coeff=t.coeff, iterations=int(k),
                         max_error=float(np.max(err)), mean_error=float(np.mean(err)),
                         seconds_per_batch=statistics.median(times), batch=len(x)))
    return rows


def plot_convergence(rows: Sequence[dict]):
    """Fig. 8: error against iterations (log scale), and time per batch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax, ax_t = fig.subplots(1, 2)
    for j, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        rs = [r for r in rows if r["model"] == name]
        k = [r["iterations"] for r in rs]
        ax.semilogy(k, [max(r["mean_error"], 1e-12) for r in rs], "o-", ms=3, color=f"C{j}",
                    label=f"{name} (mean)")
        ax.semilogy(k, [max(r["max_error"], 1e-12) for r in rs], "--", lw=0.8,
                    color=f"C{j}", label=f"{name} (max)")
        ax_t.plot(k, [1e3 * r["seconds_per_batch"] for r in rs], "o-", ms=3, color=f"C{j}",
                  label=name)
    ax.set_xscale("log")
    ax.set_xlabel("fixed-point iterations per block")
    ax.set_ylabel("reconstruction error |x - F^-1(F(x))|")
    ax.legend(fontsize=7)
    ax_t.set_xlabel("fixed-point iterations per block")
    ax_t.set_ylabel(f"ms per batch of {rows[0]['batch']}")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    return fig


def image_grid(rows_of_images: Sequence[np.ndarray], pad: int = 1) -> np.ndarray:
    """Tiles ``[r][i]`` images (H, W, 1) into one 2-D array with ``pad`` pixels of NaN."""
    rows = []
    for images in rows_of_images:
        images = np.asarray(images)[..., 0]
        h, w = images.shape[1:3]
        row = np.full((h, len(images) * (w + pad) - pad), np.nan)
        for i, im in enumerate(images):
            row[:, i * (w + pad): i * (w + pad) + w] = im
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    out = np.full((len(rows) * (rows[0].shape[0] + pad) - pad, width), np.nan)
    h = rows[0].shape[0]
    for j, row in enumerate(rows):
        out[j * (h + pad): j * (h + pad) + h, : row.shape[1]] = row
    return out


def plot_image_rows(rows: Sequence[np.ndarray], labels: Sequence[str], *,
                    vmin: float, vmax: float, title: str = ""):
    """Rows of greyscale images with a label per row (values clipped to the range)."""
    from matplotlib.figure import Figure

    n = max(len(r) for r in rows)
    fig = Figure(figsize=(max(4.0, 0.55 * n + 1.5), 0.75 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, images, label in zip(axes, rows, labels):
        grid = np.clip(np.nan_to_num(image_grid([images]), nan=vmin, posinf=vmax,
                                     neginf=vmin), vmin, vmax)
        ax.imshow(grid, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# 4. Bias of the log-det estimator (Fig. 9).


def _bias_interceptor(max_terms: int, n_probes: int):
    """An interceptor that, in every ``InvertibleBlock.__call__``, sows the exact log-det
    of the residual branch, the exact ``n``-term series and ``n_probes`` Hutchinson
    estimates of it for ``n = 1..max_terms`` (rng stream ``"logdet"``)."""

    def intercept(next_fun, args, kwargs, context):
        block = context.module
        if context.method_name != "__call__" or not isinstance(block, blocks.InvertibleBlock):
            return next_fun(*args, **kwargs)
        x = args[0]
        h = block.norm(x)[0] if block.actnorm == "before" else x
        prepared = kwargs.get("prepared")
        if prepared is None:
            prepared = block.prepare(h, train=False)
        g = block.branch.build(prepared)
        _, jac = logdet_lib.jacobian(g, h)
        d = jac.shape[-1]
        exact = jnp.linalg.slogdet(jnp.eye(d, dtype=jac.dtype) + jac)[1]
        power, acc, series = jac, jnp.zeros_like(exact), []
        for k in range(1, max_terms + 1):
            acc = acc + (-1.0) ** (k + 1) * jnp.trace(power, axis1=-2, axis2=-1) / k
            series.append(acc)
            power = power @ jac
        v = logdet_lib.sample_probes(block.make_rng("logdet"), (n_probes,) + h.shape,
                                     "gaussian", h.dtype)
        _, apply = logdet_lib.linear_map(g, h, "vjp")
        w, acc, estimates = v, jnp.zeros(v.shape[:2], h.dtype), []
        axes = tuple(range(2, v.ndim))
        for k in range(1, max_terms + 1):
            w = jax.vmap(apply)(w)
            acc = acc + (-1.0) ** (k + 1) * jnp.sum(w * v, axis=axes) / k
            estimates.append(acc)
        block.sow("intermediates", "analysis_exact", exact)
        block.sow("intermediates", "analysis_series", jnp.stack(series, -1))       # (B, n)
        block.sow("intermediates", "analysis_estimates", jnp.stack(estimates, -1))  # (S, B, n)
        block.sow("intermediates", "analysis_dim", jnp.full((), d, jnp.int32))
        return next_fun(*args, **kwargs)

    return intercept


def _collect(tree, name: str) -> list[np.ndarray]:
    """All values sown under ``name`` (stacked blocks split along their leading axis)."""
    out = []

    def visit(node):
        if isinstance(node, dict) or hasattr(node, "items"):
            for k, v in node.items():
                if k == name:
                    for leaf in v:
                        out.append(np.asarray(leaf))
                else:
                    visit(v)
    visit(tree)
    return out


def block_values(model: nn.Module, variables: dict, x: Array, key: Array, *,
                 max_terms: int, n_probes: int) -> dict[str, np.ndarray]:
    """Per residual block of a density model at inputs ``x``: ``exact`` ``(T, B)``,
    ``series`` ``(T, B, n)``, ``estimates`` ``(T, S, B, n)`` and ``dim`` ``(T,)``."""

    def run(v, x, key):
        with nn.intercept_methods(_bias_interceptor(max_terms, n_probes)):
            _, state = model.apply(v, x, rngs={"logdet": key}, mutable=["intermediates"])
        return state["intermediates"]

    inter = jax.jit(run)(variables, x, key)
    out = {}
    for name in ("exact", "series", "estimates", "dim"):
        parts = _collect(inter, f"analysis_{name}")
        rank = {"exact": 1, "series": 2, "estimates": 3, "dim": 0}[name]
        split = []
        for p in parts:   # unstacked (rank) or stacked over scanned blocks (rank + 1)
            split.extend([p] if p.ndim == rank else list(p))
        out[name] = np.stack(split)
    return out


def logdet_bias(t: Trained, x: np.ndarray, key: Array, *, max_terms: int = 20,
                n_probes: int = 4, batch_size: int = 100,
                lipschitz_bound: str = "auto") -> dict[str, Any]:
    """Bias and standard deviation of the power-series log-det estimator of a density
    model against the exact value (the sum over its residual blocks), for
    ``n = 1..max_terms`` terms, over the examples ``x`` with ``n_probes`` probes each.

    Returns per ``n``: ``series_bias`` (mean of the exact ``n``-term series minus the exact
    log-det: the estimator's true bias), ``series_max_abs_error``, ``estimate_bias`` and
    ``estimate_std`` (mean and standard deviation of single-probe Hutchinson estimates
    minus the exact value), the same relative to the mean ``|exact|``, and
    ``theorem3_bound`` (the sum over blocks of ``logdet.bias_bound(L_t, d_t, n)`` with
    ``L_t`` the product of the block's conv operator norms); and per example the exact
    log-det of the residual blocks (``exact``).
    """
    key_batches = []
    for i in range(0, len(x), batch_size):
        xb = jnp.asarray(x[i:i + batch_size])
        key_batches.append(block_values(t.model, t.variables, xb, jax.random.fold_in(key, i),
                                        max_terms=max_terms, n_probes=n_probes))
    exact = np.concatenate([b["exact"] for b in key_batches], axis=1).sum(0)         # (B,)
    series = np.concatenate([b["series"] for b in key_batches], axis=1).sum(0)       # (B, n)
    est = np.concatenate([b["estimates"] for b in key_batches], axis=2).sum(0)       # (S, B, n)
    dims = key_batches[0]["dim"]
    bounds = evaluation.block_lipschitz_bounds(
        t.params, t.model_state["spectral"], coeff=t.model.coeff,
        padding=t.model.padding, bound=lipschitz_bound)
    terms = np.arange(1, max_terms + 1)
    theorem3 = [float(sum(logdet_lib.bias_bound(b.lipschitz, b.dim, int(n)) for b in bounds))
                for n in terms]
    err_series = series - exact[:, None]
    err_est = est - exact[None, :, None]
    scale = float(np.mean(np.abs(exact)))
    return dict(
        model=t.name, examples=int(len(x)), probes_per_example=int(n_probes),
        blocks=int(len(dims)), block_dims=[int(d) for d in dims],
        block_lipschitz=[b.lipschitz for b in bounds], terms=terms.tolist(),
        exact_mean=float(np.mean(exact)), exact_abs_mean=scale,
        series_bias=err_series.mean(0).tolist(),
        series_max_abs_error=np.abs(err_series).max(0).tolist(),
        estimate_bias=err_est.mean((0, 1)).tolist(),
        estimate_std=err_est.reshape(-1, max_terms).std(0).tolist(),
        relative_series_bias=(err_series.mean(0) / scale).tolist(),
        relative_estimate_bias=(err_est.mean((0, 1)) / scale).tolist(),
        relative_estimate_std=(err_est.reshape(-1, max_terms).std(0) / scale).tolist(),
        theorem3_bound=theorem3, exact=exact.tolist())


def plot_logdet_bias(result: dict):
    """Fig. 9: |bias| and standard deviation against the number of terms, with the bound."""
    from matplotlib.figure import Figure

    n = np.asarray(result["terms"])
    fig = Figure(figsize=(10, 4))
    ax, ax_rel = fig.subplots(1, 2)
    floor = 1e-12
    ax.semilogy(n, np.maximum(np.abs(result["series_bias"]), floor), "o-", ms=3,
                label="|bias| of the n-term series (exact, dense J)")
    ax.semilogy(n, np.maximum(np.abs(result["estimate_bias"]), floor), "s-", ms=3,
                label="|mean error| of the Hutchinson estimate")
    ax.semilogy(n, np.maximum(result["estimate_std"], floor), "^-", ms=3,
                label="std of the Hutchinson estimate (1 probe)")
    ax.semilogy(n, np.maximum(result["theorem3_bound"], floor), "k--",
                label="Theorem 3 bound (sum over blocks)")
    ax.set_xlabel("terms in the power series")
    ax.set_ylabel("nats per example")
    ax.set_xticks(n[::max(1, len(n) // 10)])
    ax.legend(fontsize=7)
    exact = result["exact_mean"]
    mean = exact + np.asarray(result["estimate_bias"])
    std = np.asarray(result["estimate_std"])
    ax_rel.plot(n, mean, "s-", ms=3, label="estimator mean")
    ax_rel.fill_between(n, mean - std, mean + std, alpha=0.25, label="+- 1 std")
    ax_rel.axhline(exact, color="k", lw=0.8, label="exact (mean over examples)")
    ax_rel.set_xlabel("terms in the power series")
    ax_rel.set_ylabel("residual-block log-det (nats)")
    ax_rel.legend(fontsize=7)
    fig.suptitle(f"{result['examples']} examples x {result['probes_per_example']} probes, "
                 f"{result['blocks']} blocks", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# 5. Runtime comparison (Table 5).

RUNTIME_MODELS = ("glow", "iresnet", "iresnet_sn", "iresnet_sn_logdet")


def runtime_flows(*, n_blocks: int, hidden: int, coeff: float = 0.9, n_power_iter: int = 5,
                  n_terms: int = 5) -> dict[str, nn.Module]:
    """The four flows of Table 5, ``n_blocks`` blocks with ``hidden`` inner channels each:
    Glow (ActNorm, invertible 1x1 conv, affine coupling with a 3x3-1x1-3x3 conv net) and
    the i-ResNet (ActNorm, ``x + g(x)`` with the 3x3-1x1-3x3 branch) without constraint,
    with spectral normalization, and with spectral normalization and the power-series
    log-det."""
    def ires(c, ld):
        block = models_common.conv_block(hidden=hidden, coeff=c, n_power_iter=n_power_iter,
                                         activation="elu", leading_activation=True,
                                         logdet=ld)
        return flow.BlockStack(block, n=n_blocks)

    none = logdet_lib.LogDetConfig("none")
    return {
        "glow": flow.BlockStack(glow_lib.GlowStep(hidden=(hidden,), mixing="1x1"),
                                n=n_blocks),
        "iresnet": ires(None, none),
        "iresnet_sn": ires(coeff, none),
        "iresnet_sn_logdet": ires(coeff, logdet_lib.LogDetConfig("series", n_terms=n_terms)),
    }


def _timed(fn, *args, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"compile_seconds": compile_s, "seconds": statistics.median(times),
            "min_seconds": min(times)}


def runtime_comparison(*, shape: Sequence[int] = (16, 16, 12), batch: int = 32,
                       n_blocks: int = 8, hidden: int = 64, repeats: int = 5,
                       n_power_iter: int = 5, n_terms: int = 5, seed: int = 0
                       ) -> dict[str, Any]:
    """Seconds for one forward+backward pass (gradient of ``mean(|z|^2 / 2 - log_det)``
    with respect to the parameters; spectral normalization runs its ``n_power_iter``
    training iterations) of each flow of ``runtime_flows``, and the ratios to Glow."""
    flows = runtime_flows(n_blocks=n_blocks, hidden=hidden, n_power_iter=n_power_iter,
                          n_terms=n_terms)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch,) + tuple(shape)),
                    jnp.float32)
    key = jax.random.key(seed)
    out: dict[str, Any] = {"shape": list(shape), "batch": batch, "blocks": n_blocks,
                           "hidden": hidden, "n_power_iter": n_power_iter,
                           "n_terms": n_terms, "repeats": repeats,
                           "device": jax.devices()[0].device_kind, "models": {}}
    for name, f in flows.items():
        variables = dict(jax.jit(f.init)({"params": key, "logdet": key}, x))
        params = variables.pop("params")

        def step(params, state, x, key, f=f):
            def loss(params):
                (z, ld), _ = f.apply({"params": params, **state}, x, train=True,
                                     rngs={"logdet": key}, mutable=["spectral"])
                return jnp.mean(0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, -1) - ld)
            return jax.value_and_grad(loss)(params)

        out["models"][name] = _timed(step, params, variables, x, key, repeats=repeats)
    glow_s = out["models"]["glow"]["seconds"]
    for name, r in out["models"].items():
        r["ratio_to_glow"] = r["seconds"] / glow_s
    return out


def plot_runtime(result: dict):
    """Table 5 as bars: seconds per forward+backward pass and the ratio to Glow."""
    from matplotlib.figure import Figure

    names = list(result["models"])
    secs = [result["models"][n]["seconds"] for n in names]
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), [1e3 * s for s in secs], color=["C0", "C1", "C2", "C3"])
    for b, n in zip(bars, names):
        ax.annotate(f"{result['models'][n]['ratio_to_glow']:.2f}x",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8)
    labels = {"glow": "Glow", "iresnet": "i-ResNet", "iresnet_sn": "i-ResNet\n+ SN",
              "iresnet_sn_logdet": "i-ResNet\n+ SN + log-det"}
    ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("ms per forward+backward")
    ax.set_title(f"batch {result['batch']}, {result['blocks']} blocks, "
                 f"{result['hidden']} channels, input {tuple(result['shape'])} "
                 f"({result['device']})", fontsize=8)
    fig.tight_layout()
    return fig


def runtime_markdown(result: dict) -> str:
    """The runtime table as Markdown (seconds and ratio to Glow)."""
    lines = ["| model | s per forward+backward | ratio to Glow | compile s |",
             "|---|---|---|---|"]
    for name, r in result["models"].items():
        lines.append(f"| {name} | {r['seconds']:.4f} | {r['ratio_to_glow']:.2f} | "
                     f"{r['compile_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# 6. Samples.


def sample_images(t: Trained, n: int, key: Array, *, temperature: float = 1.0
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """``n`` samples of a density model (prior draws through the fixed-point inverse)."""
    model = t.model
    fn = jax.jit(lambda v, k: model.apply(v, n, temperature=temperature, method="sample",
                                          rngs={"sample": k}))
    x = np.asarray(fn(t.variables, key))
    lo, hi = -0.5, 0.5
    return x, {"model": t.name, "samples": int(n), "temperature": float(temperature),
               "train_steps": t.step, "finite": bool(np.all(np.isfinite(x))),
               "min": float(np.nanmin(x)), "max": float(np.nanmax(x)),
               "fraction_in_data_range": float(np.mean((x >= lo) & (x <= hi))),
               "last_train_metrics": t.metrics}


# --------------------------------------------------------------------------------------
# Files.


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def write_json(path: str, value: Any) -> None:
    """JSON with non-finite floats written as ``null``."""
    with open(path, "w") as f:
        json.dump(_clean(value), f, indent=1)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: v for k, v in r.items()})


def save_figure(fig, path: str, dpi: int = 100) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
