"""Evaluation of trained image models: accuracy, and bits/dim with the paper's protocol.

Bits/dim protocol (appendix C.3), for a density model restored from a workdir:

1. **Lipschitz bound per block.** For every residual branch ``g_t`` (three convs with
   1-Lipschitz activations between them), ``L_t = prod_i ||W_i||_2`` with ``W_i`` the
   *effective* (spectrally normalized, as used at evaluation) conv operator on inputs of
   the block's real size and zero padding. By default (``bound="auto"``) each norm is
   exact: 1x1 convs from the SVD of the ``C_in x C_out`` matrix, kxk convs from the SVD
   of the dense operator matrix where it is small enough, otherwise by power iteration to
   convergence (an estimate, flagged as such in the report). ``bound="circular"`` gives a
   certified upper bound at any size: the exact singular values of the circular conv on
   the grid enlarged by the kernel's reach (Sedghi et al. 2019), which dominate the
   zero-padded operator's but are loose on small grids (on 2x2 and 4x4 inputs they
   exceeded 1 for convs whose true norm is 0.9). All in float64.
2. **Number of series terms.** The bias of the whole log-det estimate is at most the sum
   of the per-block Theorem 3 bounds ``sum_t bias_bound(L_t, d_t, n)`` (``d_t`` the
   block's input dimension); ``n`` is the smallest number of terms that makes it at most
   ``bias_tol`` bits/dim (default 1e-4), i.e. ``bias_tol * D * ln 2`` nats.
3. **Hutchinson samples.** Passes over the test set, each with fresh probes and fresh
   dequantization noise, until the standard error of the mean over passes (the Monte
   Carlo error of the estimate of the test-set bits/dim) is below ``se_tol`` (default
   1e-4).

The report gives the estimate, its standard error, and the bias bound.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from iresnet_jax import lipschitz
from iresnet_jax import logdet as logdet_lib
from iresnet_jax.train import parallel, pipeline

EVALUATION_FILE = "evaluation.json"


@dataclasses.dataclass(frozen=True)
class BlockBound:
    """Lipschitz bound of one residual branch: the product of its convs' operator norms
    (``how`` says how each norm was obtained, see ``conv_operator_norm``)."""
    path: str
    lipschitz: float
    dim: int
    norms: tuple[float, ...]
    how: tuple[str, ...]


def _branches(tree: Any, path: tuple = ()):
    """Yields ``(path, subtree)`` for every dict with keys conv0, conv1, ... (a branch)."""
    if not hasattr(tree, "keys"):
        return
    if "conv0" in tree or "dense0" in tree:
        yield path, tree
        return
    for k in tree.keys():
        yield from _branches(tree[k], path + (k,))


def _get(tree: Any, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def block_lipschitz_bounds(params: Any, spectral: Any, *, coeff: float,
                           padding: str = "SAME", bound: str = "auto",
                           stored_sigma: bool = False) -> list[BlockBound]:
    """``Lip(g_t) <= prod_i ||W_i||`` for every spectrally normalized conv or dense branch
    in ``params``, conv norms from ``lipschitz.conv_operator_norm(..., bound)``, dense
    norms from the SVD. ``stored_sigma``: the layers normalize by their stored ``sigma``.

    Scanned stacks (kernels with leading block axes) yield one bound per block.
    """
    bounds = []
    for path, branch in _branches(params):
        spec = _get(spectral, path)
        kind, nd = ("conv", 4) if "conv0" in branch else ("dense", 2)
        names = sorted((k for k in branch.keys() if k.startswith(kind)),
                       key=lambda k: int(k[len(kind):]))
        kernels = [np.asarray(branch[n]["kernel"]) for n in names]
        us = [np.asarray(spec[n]["u"]) for n in names]
        sigmas = [np.asarray(spec[n]["sigma"], np.float64) for n in names]
        lead = kernels[0].shape[:-nd]
        count = int(np.prod(lead)) if lead else 1
        kernels = [k.reshape((count,) + k.shape[-nd:]) for k in kernels]
        us = [u.reshape((count,) + u.shape[len(lead):]) for u in us]
        sigmas = [s.reshape(count) for s in sigmas]
        for b in range(count):
            norms, hows = [], []
            for k, u, sigma in zip(kernels, us, sigmas):
                k64 = k[b].astype(np.float64)
                if stored_sigma:
                    eff = k64 / max(1.0, float(sigma[b]) / coeff)
                elif kind == "conv":
                    eff = lipschitz.effective_conv_kernel(k64, u[b], coeff, padding)
                else:
                    u64 = u[b].astype(np.float64)
                    own = np.linalg.norm(u64 @ k64) / max(np.linalg.norm(u64), 1e-30)
                    eff = k64 / max(1.0, float(own) / coeff)
                if kind == "conv":
                    norm, how = lipschitz.conv_operator_norm(eff, u[b].shape[1:3], padding,
                                                             bound, u=u[b])
                else:
                    norm, how = float(np.linalg.norm(eff, 2)), "exact-dense"
                norms.append(norm)
                hows.append(how)
            dim = int(np.prod(us[0][b].shape[1:] if kind == "conv" else us[0][b].shape))
            name = "/".join(str(p) for p in path) + (f"[{b}]" if lead else "")
            bounds.append(BlockBound(name, float(np.prod(norms)), dim, tuple(norms),
                                     tuple(hows)))
    return bounds


def model_bias_bound(bounds: list[BlockBound], n_terms: int) -> float:
    """Theorem 3 summed over blocks: a bound (nats) on the bias of the log-det estimate."""
    total = 0.0
    for dim in sorted({b.dim for b in bounds}):
        lips = np.array([b.lipschitz for b in bounds if b.dim == dim])
        total += float(np.sum(logdet_lib.bias_bound(lips, dim, n_terms)))
    return total


def terms_for_model_bias(bounds: list[BlockBound], tol: float, max_terms: int = 10000
                         ) -> int:
    """Smallest ``n >= 1`` with ``model_bias_bound(bounds, n) <= tol`` (nats)."""
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if not bounds:
        raise ValueError("no residual branches found: is this a density model?")
    worst = max(b.lipschitz for b in bounds)
    if worst >= 1:
        raise ValueError(f"a block has certified Lipschitz bound {worst:.4f} >= 1: the "
                         "power series does not converge and Theorem 3 does not apply")
    lo, hi = 1, 1
    while model_bias_bound(bounds, hi) > tol:
        lo, hi = hi, 2 * hi
        if hi > max_terms:
            raise ValueError(f"more than {max_terms} series terms needed for a bias below "
                             f"{tol} nats (largest Lipschitz bound {worst:.4f})")
    if model_bias_bound(bounds, lo) <= tol:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if model_bias_bound(bounds, mid) <= tol:
            hi = mid
        else:
            lo = mid
    return hi


def hutchinson_passes(run_pass: Callable[[int], float], *, se_tol: float, min_passes: int = 2,
                      max_passes: int = 100) -> dict[str, Any]:
    """Calls ``run_pass(k)`` (one Monte Carlo estimate) until the standard error of the
    mean of the estimates is at most ``se_tol`` (at least ``min_passes``, at most
    ``max_passes`` calls)."""
    if min_passes < 2:
        raise ValueError(f"min_passes must be >= 2 to estimate a standard error, got "
                         f"{min_passes}")
    values: list[float] = []
    se = math.inf
    while len(values) < max_passes:
        values.append(float(run_pass(len(values))))
        if len(values) >= min_passes:
            se = float(np.std(values, ddof=1) / math.sqrt(len(values)))
            if se <= se_tol:
                break
    return {"estimate": float(np.mean(values)), "standard_error": se,
            "passes": len(values), "se_target_met": se <= se_tol, "per_pass": values}


def evaluate_workdir(workdir: str, *, bias_tol: float = 1e-4, se_tol: float = 1e-4,
                     n_samples: int = 1, min_passes: int = 2, max_passes: int = 100,
                     bound: str = "auto", batch_size: int | None = None,
                     print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluates the newest checkpoint of a workdir on its test set.

    Toy densities: the test NLL; classifiers: accuracy and cross-entropy; image density
    models: the bits/dim protocol of this module's docstring. Writes
    ``<workdir>/evaluation.json`` and returns the same dict.
    """
    r = pipeline.restore(workdir)
    config, model, task = r.config, r.model, r.task
    if batch_size:
        config.eval_batch_size = int(batch_size)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.eval_batch_size, mesh, "batch_size")
    key = jax.random.fold_in(jax.random.key(config.seed), 3)
    out: dict[str, Any] = {"workdir": os.path.abspath(workdir), "step": r.step,
                           "task": config.task, "dataset": task.name}
    variables = r.variables
    if config.task != "density":
        step = jax.jit(pipeline.make_eval_step(model, task))
        out.update(pipeline.evaluate(task, variables, key, step, mesh))
        print_fn(f"{task.metric} {out[task.metric]:.4f} at step {r.step}")
    else:
        test = task.test
        bounds = block_lipschitz_bounds(variables["params"], variables["spectral"],
                                        coeff=model.coeff, padding=model.padding,
                                        bound=bound,
                                        stored_sigma=getattr(model, "stored_sigma", False))
        hows = [h for b in bounds for h in b.how]
        how_counts = {h: hows.count(h) for h in sorted(set(hows))}
        nats_per_bpd = test.dim * math.log(2.0)
        n_terms = terms_for_model_bias(bounds, bias_tol * nats_per_bpd)
        bias = model_bias_bound(bounds, n_terms) / nats_per_bpd
        print_fn(f"{len(bounds)} blocks, Lip(g) <= product of conv norms in "
                 f"[{min(b.lipschitz for b in bounds):.4f}, "
                 f"{max(b.lipschitz for b in bounds):.4f}] (c^3 = {model.coeff ** 3:.4f}; "
                 f"conv norms: {how_counts}); {n_terms} series terms give a bias bound of "
                 f"{bias:.2e} bits/dim")
        # The truncated series whatever trained: the bias bound is for n_terms terms.
        eval_model = model.clone(logdet=logdet_lib.LogDetConfig(
            "series", n_terms=n_terms, n_samples=n_samples, mode="auto"))
        step = jax.jit(pipeline.make_eval_step(eval_model, task))

        def run_pass(k: int) -> float:
            m = pipeline.evaluate(task, variables, jax.random.fold_in(key, k), step, mesh)
            print_fn(f"pass {k + 1}: {m['test_bits_per_dim']:.5f} bits/dim")
            return m["test_bits_per_dim"]

        result = hutchinson_passes(run_pass, se_tol=se_tol, min_passes=min_passes,
                                   max_passes=max_passes)
        out.update(test_bits_per_dim=result["estimate"],
                   standard_error=result["standard_error"], bias_bound=bias,
                   n_terms=n_terms, bias_tol=bias_tol, se_tol=se_tol,
                   passes=result["passes"], se_target_met=result["se_target_met"],
                   per_pass=result["per_pass"], probes_per_example_per_pass=n_samples,
                   conv_norms=how_counts, block_lipschitz=[b.lipschitz for b in bounds])
        print_fn(f"test bits/dim {result['estimate']:.5f} +- "
                 f"{result['standard_error']:.1e} (standard error, {result['passes']} "
                 f"passes), bias <= {bias:.1e}")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, EVALUATION_FILE), "w") as f:
            json.dump(out, f, indent=1)
    return out
