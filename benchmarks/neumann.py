"""The log-det gradient: differentiating through the series against the Neumann series.

The block of ``benchmarks.block`` (input 64x14x14x4, ActNorm, spectrally normalized
branch 3x3 -> 1x1 -> 3x3 of width 32, c = 0.9, ELU, 5 power iterations per training
call, one Gaussian Hutchinson probe). Times the gradient of ``mean(|y|^2 / 2 - log_det)``
with respect to the parameters with ``gradient="autodiff"`` and ``gradient="neumann"``
(each series in its ``mode="auto"``), for the 5-term series and, without ``--quick``,
the 10- and 20-term series (memory grows with the terms) and the Russian-roulette
estimator (geometric p = 0.5, 2 exact terms, at most 20). Per estimator and gradient:
median and min seconds, compile seconds, XLA's GFLOP and memory estimate
(``*.memory``: ``temp_gib`` and the rest of ``compiled.memory_analysis()``), the loss.

    python -m benchmarks.neumann            # every estimator (about a minute on 2 cores)
    python -m benchmarks.neumann --quick    # the 5-term series only

Writes ``benchmarks/results/neumann.json``.
"""

from __future__ import annotations

import jax

from benchmarks import common
from benchmarks.block import (COEFF, N_POWER_ITER, add_block_arguments, block_setup,
                              make_block, training_loss)
from iresnet_jax import logdet

ESTIMATORS = {"series5": dict(method="series", n_terms=5),
              "series10": dict(method="series", n_terms=10),
              "series20": dict(method="series", n_terms=20),
              "roulette": dict(method="roulette", n_exact=2, max_terms=20)}


def main(argv=None) -> dict:
    common.setup(argv)
    parser = common.parser(__doc__)
    add_block_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="only the 5-term series")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    x, settings = block_setup(args)
    results: dict = {**settings, "coeff": COEFF, "n_power_iter": N_POWER_ITER,
                     "probe": "gaussian", "n_samples": 1, "repeats": args.repeats}
    variables = jax.jit(make_block(settings, logdet.LogDetConfig("none")).init)(
        jax.random.key(1), x)
    rngs = {"logdet": jax.random.key(2)}
    names = ["series5"] if args.quick else list(ESTIMATORS)
    for name in names:
        for gradient in ("autodiff", "neumann"):
            cfg = logdet.LogDetConfig(**ESTIMATORS[name], mode="auto", gradient=gradient)
            grad_fn = jax.value_and_grad(training_loss(make_block(settings, cfg), rngs),
                                         has_aux=True)
            r = common.compile_and_time(grad_fn, variables["params"], variables["spectral"],
                                        x, repeats=args.repeats)
            key = f"{name}.{gradient}"
            results.update({key: r["median"], f"{key}.min": r["min"],
                            f"{key}.compile": r["compile"], f"{key}.mode": cfg.mode,
                            f"{key}.gflop": (r["flops"] or 0.0) / 1e9,
                            f"{key}.loss": float(r["output"][0][0]),
                            f"{key}.memory": common.memory_analysis(r["compiled"])})
        results[f"{name}.ratio_neumann_to_autodiff"] = (results[f"{name}.neumann"]
                                                        / results[f"{name}.autodiff"])
    results["roulette.expected_terms"] = logdet.LogDetConfig(
        **ESTIMATORS["roulette"]).expected_terms
    common.write("neumann", results, common.command("neumann", argv), args.results_dir)
    return results


if __name__ == "__main__":
    main()
