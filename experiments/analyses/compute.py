"""The numbers of the analyses on trained models (``models.Trained``).

* ``singular_values`` (Fig. 6): the largest singular value of every conv operator, from
  the 2-D FFT of the kernel (Sedghi et al., 2019; exact for circular padding) and by power
  iteration on the zero-padded operator the model applies;
* ``reconstruct`` (Fig. 7): ``F^{-1}(F(x))`` with a fixed number of fixed-point
  iterations per block;
* ``fixed_point_convergence`` (Fig. 8): reconstruction error and time after ``k``
  iterations per block, every ``k`` from one compiled program;
* ``logdet_bias`` (Fig. 9): the exact log-det of every residual block of a density
  model against the truncated series (exact and Hutchinson) and Theorem 3's bound;
* ``sample_images``: samples of a density model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax import blocks, flow, layers, lipschitz, logdet
from iresnet_jax.train import evaluation

Array = jax.Array

# --------------------------------------------------------------------------------------
# Singular values of the convolution operators (Fig. 6).


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
        if context.method_name == "weights" and isinstance(module, layers.SpectralConv):
            found.setdefault(tuple(module.path), dict(
                hw=tuple(int(s) for s in args[0].shape[1:3]), padding=module.padding,
                coeff=module.coeff))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, rngs={"logdet": jax.random.key(0)}),
                       variables, jnp.asarray(x[:1]))
    # The convs of one branch share a parent path; stacked (scanned) branches are listed
    # block by block.
    groups: dict[tuple, list[tuple]] = {}
    for path in found:
        groups.setdefault(path[:-1], []).append(path)
    out = []
    for paths in groups.values():
        lead = np.shape(_get(variables["params"], paths[0])["kernel"])[:-4]
        count = math.prod(lead)

        def stacked(collection, leaf, p):
            a = np.asarray(_get(variables[collection], p)[leaf])
            return a.reshape((count,) + a.shape[-4:])

        kernels = [stacked("params", "kernel", p) for p in paths]
        us = [None if found[p]["coeff"] is None else stacked("spectral", "u", p)
              for p in paths]
        for b in range(count):
            for p, k, u in zip(paths, kernels, us):
                info = found[p]
                kernel = k[b] if u is None else lipschitz.effective_conv_kernel(
                    k[b], u[b], info["coeff"], info["padding"])
                out.append(ConvLayer("/".join(p) + (f"[{b}]" if lead else ""),
                                     np.asarray(kernel), info["hw"], info["padding"]))
    return out


def fold_kernel(kernel: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
    """The kernel of the same circular convolution on an ``n x m`` grid with its taps
    wrapped modulo ``(n, m)`` (for a kernel larger than the input, e.g. 3x3 on 2x2)."""
    kernel = np.asarray(kernel)
    n, m = (int(s) for s in spatial_shape)
    kh, kw = kernel.shape[:2]
    if kh <= n and kw <= m:
        return kernel
    # The anchor's offset only multiplies the transfer function by a phase, which leaves
    # the singular values unchanged.
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
      ``fft``: from the 2-D FFT of the kernel on the ``n x m`` grid, exact for circular
      padding; ``fft_zero_padding_bound``: the same on the grid enlarged by the kernel's
      reach, an upper bound for zero padding; ``power``: ``n_power_iter`` power
      iterations on the operator with ``padding`` from a random start (from below).
    """
    kernel = np.asarray(kernel)
    n, m = (int(s) for s in spatial_shape)
    kh, kw = kernel.shape[:2]
    fft = float(jnp.max(lipschitz.conv_singular_values(
        jnp.asarray(fold_kernel(kernel, (n, m))), (n, m))))
    bound = float(jnp.max(lipschitz.conv_singular_values(
        jnp.asarray(kernel), (n + kh - 1, m + kw - 1))))
    k = jnp.asarray(kernel)
    u0 = np.random.default_rng(seed).normal(size=(1, n, m, kernel.shape[2]))
    power = float(_power_norm(k, jnp.asarray(u0, k.dtype), n_iter=int(n_power_iter),
                              padding=padding))
    return {"fft": fft, "fft_zero_padding_bound": bound, "power": power}


def singular_values(models: Sequence, *, n_power_iter: int = 200) -> list[dict[str, Any]]:
    """One row per (model, conv layer) with the largest singular values of
    ``conv_norms``."""
    rows = []
    for t in models:
        for i, layer in enumerate(conv_layers(t.model, t.variables, t.test_inputs(1))):
            norms = conv_norms(layer.kernel, layer.spatial_shape, layer.padding,
                               n_power_iter=n_power_iter, seed=i)
            rows.append(dict(model=t.name, coeff=t.coeff, layer=i, path=layer.path,
                             kernel_shape="x".join(str(s) for s in layer.kernel.shape),
                             input_hw="x".join(str(s) for s in layer.spatial_shape),
                             padding=layer.padding, power_iterations=n_power_iter, **norms))
    return rows


# --------------------------------------------------------------------------------------
# Reconstructions and fixed-point convergence (Figs. 7, 8).


def forward(t, model: nn.Module | None = None):
    """``(variables, x) -> F(x)``: a classifier's invertible features, a flow's latents."""
    model = model or t.model
    if t.config.task == "classification":
        return lambda v, x: model.apply(v, x, method="features")
    return lambda v, x: model.apply(v, x, rngs={"logdet": jax.random.key(0)})[0]


def reconstruct(t, x: np.ndarray, *, max_iter: int = 100
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """``F^{-1}(F(x))`` with the model's own inverse set to run exactly ``max_iter``
    fixed-point iterations per block (``tol = rtol = 0``, as in appendix B); per-image
    max and mean absolute errors."""
    model = t.model.clone(inverse_config=dataclasses.replace(
        t.model.inverse_config, tol=0.0, rtol=0.0, max_iter=max_iter))
    z = jax.jit(forward(t, model))(t.variables, jnp.asarray(x))
    x_rec, sown = jax.jit(lambda v, z: model.apply(v, z, method="inverse",
                                                   mutable=["intermediates"]))(t.variables, z)
    x_rec = np.asarray(x_rec)
    err = np.abs(x_rec - x).reshape(len(x), -1)
    with np.errstate(invalid="ignore"):
        per_max, per_mean = err.max(axis=1), err.mean(axis=1)
    finite = bool(np.all(np.isfinite(x_rec)))
    return x_rec, {"model": t.name, "coeff": t.coeff, "iterations": max_iter,
                   "max_error": float(np.max(per_max)) if finite else math.inf,
                   "mean_error": float(np.mean(per_mean)) if finite else math.inf,
                   "finite": finite, "per_image_max_error": per_max.tolist(),
                   "inverse": flow.inverse_report(sown)}


def fixed_point_convergence(t, x: np.ndarray, iterations: Sequence[int], *,
                            repeats: int = 1) -> list[dict[str, Any]]:
    """Reconstruction error after ``k`` plain fixed-point iterations in every block for
    each ``k`` in ``iterations`` (``k`` is traced: one compiled program), with the seconds
    per batch of the inverse (median of ``repeats`` calls after a warm-up)."""
    model = t.model
    inverse = jax.jit(lambda v, z, k: model.apply(v, z, n_iter=k, method="inverse"))
    z = jax.jit(forward(t))(t.variables, jnp.asarray(x))
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


# --------------------------------------------------------------------------------------
# Bias of the log-det estimator (Fig. 9).


def _bias_interceptor(max_terms: int, n_probes: int):
    """Sows, in every ``InvertibleBlock.__call__``, the exact log-det of the residual
    branch, the exact ``n``-term series and ``n_probes`` Hutchinson estimates of it for
    ``n = 1..max_terms`` (probes from the rng stream ``"logdet"``)."""

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
        _, jac = logdet.jacobian(g, h)
        series = [logdet.exact_series(jac, n) for n in range(1, max_terms + 1)]
        v = logdet.sample_probes(block.make_rng("logdet"), (n_probes,) + h.shape,
                                 "gaussian", h.dtype)
        _, apply = logdet.linear_map(g, h, "vjp")
        w, acc, estimates = v, jnp.zeros(v.shape[:2], h.dtype), []
        axes = tuple(range(2, v.ndim))
        for k in range(1, max_terms + 1):
            w = jax.vmap(apply)(w)
            acc = acc + (-1.0) ** (k + 1) * jnp.sum(w * v, axis=axes) / k
            estimates.append(acc)
        block.sow("intermediates", "analysis_exact", logdet.dense.logdet_identity_plus(jac))
        block.sow("intermediates", "analysis_series", jnp.stack(series, -1))       # (B, n)
        block.sow("intermediates", "analysis_estimates", jnp.stack(estimates, -1))  # (S, B, n)
        block.sow("intermediates", "analysis_dim", jnp.full((), jac.shape[-1], jnp.int32))
        return next_fun(*args, **kwargs)

    return intercept


def _collect(tree, name: str) -> list[np.ndarray]:
    """Every value sown under ``name``, in the order of the forward pass."""
    out = []

    def visit(node):
        for k, v in node.items():
            if k == name:
                out.extend(np.asarray(leaf) for leaf in v)
            elif hasattr(v, "items"):
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
    for name, rank in (("exact", 1), ("series", 2), ("estimates", 3), ("dim", 0)):
        split = []
        for p in _collect(inter, f"analysis_{name}"):   # one block, or a scanned stack
            split.extend([p] if p.ndim == rank else list(p))
        out[name] = np.stack(split)
    return out


def logdet_bias(t, x: np.ndarray, key: Array, *, max_terms: int = 20, n_probes: int = 4,
                batch_size: int = 100, lipschitz_bound: str = "auto") -> dict[str, Any]:
    """Bias and standard deviation of the power-series log-det estimator of a density
    model against the exact log-det of its residual blocks (their sum), for
    ``n = 1..max_terms`` terms, over the examples ``x`` with ``n_probes`` probes each.

    Returns per ``n``: ``series_bias`` (mean error of the exact ``n``-term series: the
    estimator's true bias), ``series_max_abs_error``, ``estimate_bias`` and
    ``estimate_std`` (mean and standard deviation of single-probe Hutchinson errors), the
    same relative to the mean ``|exact|``, and ``theorem3_bound`` (Theorem 3 summed over
    the blocks, with each block's Lipschitz bound the product of its conv norms); and per
    example the exact log-det of the residual blocks (``exact``).
    """
    parts = [block_values(t.model, t.variables, jnp.asarray(x[i:i + batch_size]),
                          jax.random.fold_in(key, i), max_terms=max_terms, n_probes=n_probes)
             for i in range(0, len(x), batch_size)]
    exact = np.concatenate([b["exact"] for b in parts], axis=1).sum(0)          # (B,)
    series = np.concatenate([b["series"] for b in parts], axis=1).sum(0)        # (B, n)
    est = np.concatenate([b["estimates"] for b in parts], axis=2).sum(0)        # (S, B, n)
    dims = parts[0]["dim"]
    bounds = evaluation.block_lipschitz_bounds(
        t.state.params, t.state.model_state["spectral"], coeff=t.model.coeff,
        padding=t.model.padding, bound=lipschitz_bound)
    terms = np.arange(1, max_terms + 1)
    err_series = series - exact[:, None]
    err_est = est - exact[None, :, None]
    est_std = err_est.reshape(-1, max_terms).std(0)
    scale = float(np.mean(np.abs(exact)))
    return dict(
        model=t.name, examples=int(len(x)), probes_per_example=int(n_probes),
        blocks=int(len(dims)), block_dims=[int(d) for d in dims],
        block_lipschitz=[b.lipschitz for b in bounds], terms=terms.tolist(),
        exact_mean=float(np.mean(exact)), exact_abs_mean=scale,
        series_bias=err_series.mean(0).tolist(),
        series_max_abs_error=np.abs(err_series).max(0).tolist(),
        estimate_bias=err_est.mean((0, 1)).tolist(), estimate_std=est_std.tolist(),
        relative_series_bias=(err_series.mean(0) / scale).tolist(),
        relative_estimate_bias=(err_est.mean((0, 1)) / scale).tolist(),
        relative_estimate_std=(est_std / scale).tolist(),
        theorem3_bound=[evaluation.model_bias_bound(bounds, int(n)) for n in terms],
        exact=exact.tolist())


# --------------------------------------------------------------------------------------
# Samples.


def sample_images(t, n: int, key: Array, *, temperature: float = 1.0
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """``n`` samples of a density model (prior draws through the fixed-point inverse)."""
    model = t.model
    fn = jax.jit(lambda v, k: model.apply(v, n, temperature=temperature, method="sample",
                                          rngs={"sample": k}, mutable=["intermediates"]))
    x, sown = fn(t.variables, key)
    x = np.asarray(x)
    return x, {"model": t.name, "samples": int(n), "temperature": float(temperature),
               "inverse": flow.inverse_report(sown),
               "train_steps": t.step, "finite": bool(np.all(np.isfinite(x))),
               "min": float(np.nanmin(x)), "max": float(np.nanmax(x)),
               "fraction_in_data_range": float(np.mean((x >= -0.5) & (x <= 0.5))),
               "last_train_metrics": t.metrics}
