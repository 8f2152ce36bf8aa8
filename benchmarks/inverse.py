"""Benchmark of the fixed-point inverse: plain iteration against Anderson acceleration.

One spectrally normalized conv branch (ANCHORS.md shapes: input 64x14x14x4, width 32,
3x3 -> 1x1 -> 3x3, ELU) at c in {0.5, 0.9, 0.99}. The weights are scaled up (x3) and the
power iteration converged (100 steps) so that every conv's constraint is active
(operator norm = c). ``y = x + g(x)`` for Gaussian ``x``; each method solves
``x + g(x) = y`` to tolerance 1e-6 (per example: ``max|x^k - x^{k-1}| <= 1e-6``).
Two weight settings: the scaled initialization ("random") and "aligned" weights that make
the plain iteration slow (see ``branch_function``). Reported per setting, c and method:
median seconds per call (jitted), evaluations of g per example (max and mean; for both
methods one per iteration), whether every example converged, the largest reported
residual, and the max error against the known ``x``.

    python -m benchmarks.inverse            # c = 0.5, 0.9, 0.99
    python -m benchmarks.inverse --coeffs 0.9

Prints one JSON object; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import compile_and_time
from iresnet_jax import blocks, inverse, lipschitz
from iresnet_jax import runtime

METHODS = ("plain", "anderson")


def branch_function(coeff: float, x: jax.Array, weights: str = "random"):
    """The pure ``g`` of a conv branch whose spectral constraint is active.

    ``weights="random"``: the initialization scaled by 3. ``"aligned"``: the last conv is
    the adjoint of the first and the 1x1 conv the identity (then scaled by 3), so ``J_g``
    is close to symmetric positive semi-definite with spectral radius near ``c^3``: the
    plain iteration's rate approaches its worst case (a constructed case: the trained
    digits classifier measured by ``benchmarks.inverse_bound`` is far from it).
    """
    branch = blocks.ConvBranch(hidden=32, coeff=coeff, n_power_iter=5)
    variables = jax.jit(branch.init)(jax.random.key(1), x)
    params = variables["params"]
    if weights == "aligned":
        k0 = params["conv0"]["kernel"]
        params = {**params,
                  "conv1": {**params["conv1"], "kernel": jnp.eye(32)[None, None]},
                  "conv2": {**params["conv2"],
                            "kernel": jnp.transpose(k0[::-1, ::-1], (0, 1, 3, 2))}}
    elif weights != "random":
        raise ValueError(f"weights must be 'random' or 'aligned', got {weights!r}")
    params = jax.tree.map(lambda p: 3.0 * p, params)
    with lipschitz.power_iterations(100):
        _, state = jax.jit(lambda p, s: branch.apply({"params": p, "spectral": s}, x,
                                                     train=True, mutable=["spectral"]))(
            params, variables["spectral"])
    variables = {"params": params, **state}
    return branch.apply(variables, x, method="function")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coeffs", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max_iter", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--weights", nargs="+", default=["random", "aligned"],
                        choices=["random", "aligned"])
    args = parser.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (64, 14, 14, 4))
    results = {"backend": jax.default_backend(), "machine": platform.machine(),
               "shape": list(x.shape), "width": 32, "tol": args.tol,
               "max_iter": args.max_iter}
    for weights in args.weights:
        for coeff in args.coeffs:
            g = branch_function(coeff, x, weights)
            y = jax.jit(lambda x: x + g(x))(x)
            row = {}
            for method in METHODS:
                def solve(y, method=method):
                    return inverse.fixed_point(g, y, tol=args.tol, max_iter=args.max_iter,
                                               method=method)
                r = compile_and_time(solve, y, repeats=args.repeats, warmup=1)
                x_rec, info = r["output"]
                iters = np.asarray(info.iterations)
                row[method] = {
                    "seconds": r["median"], "compile": r["compile"],
                    "g_evaluations_max": int(iters.max()),
                    "g_evaluations_mean": float(iters.mean()),
                    "all_converged": bool(np.all(np.asarray(info.converged))),
                    "max_residual": float(np.max(np.asarray(info.residual))),
                    "max_error": float(jnp.max(jnp.abs(x_rec - x))),
                }
            row["time_ratio_anderson_to_plain"] = (row["anderson"]["seconds"]
                                                   / row["plain"]["seconds"])
            results[f"{weights}.c={coeff}"] = row
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    runtime.relaunch_with_hugepages()  # huge pages for XLA's buffers, see runtime.py
    main()
