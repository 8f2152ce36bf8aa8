"""The fixed-point inverse: the plain iteration against Anderson acceleration.

One spectrally normalized conv branch (the block of ``benchmarks.block``: input
64x14x14x4, width 32, 3x3 -> 1x1 -> 3x3, ELU) at c in {0.5, 0.9, 0.99}, its weights
scaled up (x3) and the power iteration converged (100 steps) so that every conv's
constraint is active (operator norm = c). ``y = x + g(x)`` for Gaussian ``x``; each
method solves ``x + g(x) = y`` to a step of 1e-6 per example. Two weight settings: the
scaled initialization (``random``) and ``aligned`` weights that make the plain iteration
slow (see ``branch_function``). Per setting, c and method: median seconds per call,
evaluations of g per example (max and mean; one per iteration for both methods), whether
every example converged, the largest residual and the max error against the known ``x``.

    python -m benchmarks.inverse            # c = 0.5, 0.9, 0.99
    python -m benchmarks.inverse --coeffs 0.9

Writes ``benchmarks/results/inverse.json``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.block import add_block_arguments, block_setup
from iresnet_jax import blocks, inverse, layers

METHODS = ("plain", "anderson")


def branch_function(coeff: float, x: jax.Array, weights: str = "random", *,
                    width: int = 32, conv: str = "xla"):
    """The pure ``g`` of a conv branch whose spectral constraint is active.

    ``weights="random"``: the initialization scaled by 3. ``"aligned"``: the last conv is
    the adjoint of the first and the 1x1 conv the identity (then scaled by 3), so ``J_g``
    is close to symmetric positive semi-definite with spectral radius near ``c^3``: the
    plain iteration's rate approaches its worst case (a constructed case; trained models
    are far from it).
    """
    branch = blocks.ConvBranch(hidden=width, coeff=coeff, n_power_iter=5, conv=conv)
    variables = jax.jit(branch.init)(jax.random.key(1), x)
    params = variables["params"]
    if weights == "aligned":
        k0 = params["conv0"]["kernel"]
        params = {**params,
                  "conv1": {**params["conv1"], "kernel": jnp.eye(width)[None, None]},
                  "conv2": {**params["conv2"],
                            "kernel": jnp.transpose(k0[::-1, ::-1], (0, 1, 3, 2))}}
    elif weights != "random":
        raise ValueError(f"weights must be 'random' or 'aligned', got {weights!r}")
    params = jax.tree.map(lambda p: 3.0 * p, params)
    with layers.power_iterations(100):
        _, state = jax.jit(lambda p, s: branch.apply({"params": p, "spectral": s}, x,
                                                     train=True, mutable=["spectral"]))(
            params, variables["spectral"])
    return branch.apply({"params": params, **state}, x, method="function")


def main(argv=None) -> dict:
    common.setup(argv)
    parser = common.parser(__doc__)
    add_block_arguments(parser)
    parser.add_argument("--coeffs", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max_iter", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--weights", nargs="+", default=["random", "aligned"],
                        choices=["random", "aligned"])
    args = parser.parse_args(argv)
    x, settings = block_setup(args)
    results: dict = {**settings, "tol": args.tol, "max_iter": args.max_iter,
                     "repeats": args.repeats}
    for weights in args.weights:
        for coeff in args.coeffs:
            g = branch_function(coeff, x, weights, width=args.width, conv=settings["conv"])
            y = jax.jit(lambda x: x + g(x))(x)
            row = {}
            for method in METHODS:
                def solve(y, method=method):
                    return inverse.fixed_point(g, y, tol=args.tol, max_iter=args.max_iter,
                                               method=method)
                r = common.compile_and_time(solve, y, repeats=args.repeats, warmup=1)
                x_rec, info = r["output"]
                iters = np.asarray(info.iterations)
                row[method] = {
                    "seconds": r["median"], "compile": r["compile"],
                    "g_evaluations_max": int(iters.max()),
                    "g_evaluations_mean": float(iters.mean()),
                    "all_converged": bool(np.all(np.asarray(info.converged))),
                    "max_residual": float(np.max(np.asarray(info.residual))),
                    "max_error": float(jnp.max(jnp.abs(x_rec - x)))}
            row["time_ratio_anderson_to_plain"] = (row["anderson"]["seconds"]
                                                   / row["plain"]["seconds"])
            results[f"{weights}.c={coeff}"] = row
    common.write("inverse", results, common.command("inverse", argv), args.results_dir)
    return results


if __name__ == "__main__":
    main()
