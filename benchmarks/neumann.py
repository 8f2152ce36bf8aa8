"""Benchmark of the Neumann-series log-det gradient (issue 6: Residual Flows estimators).

The ANCHORS.md density block: input 64x14x14x4, ActNorm, then a spectrally normalized conv
branch 3x3 -> 1x1 -> 3x3 of width 32, c = 0.9, ELU, 5 power iterations per training call,
one Gaussian Hutchinson probe. Times the gradient of the loss
``mean(0.5 |y|^2 - log_det)`` (standard-normal prior minus log-det) with respect to the
parameters, differentiating through the series (``gradient="autodiff"``) against the
Neumann-series gradient (``gradient="neumann"``), for the 5-term series and for the
Russian-roulette estimator (geometric p = 0.5, 2 exact terms, at most 20), and reports
XLA's memory estimate of each compiled step (``compiled.memory_analysis()``). The
10- and 20-term series show how memory grows with the number of terms.

    python -m benchmarks.neumann            # full table (about a minute on 2 CPU cores)
    python -m benchmarks.neumann --quick    # the two 5-term series rows only

Prints one JSON object; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp

from benchmarks.timing import compile_and_time
from iresnet_jax import blocks, logdet
from iresnet_jax import runtime


def _memory(fn, *args) -> dict[str, int | None]:
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        mem = None
    if mem is None:
        return {"temp_bytes": None, "argument_bytes": None, "output_bytes": None}
    return {"temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 5-term series rows")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (64, 14, 14, 4))
    results = {"backend": jax.default_backend(), "devices": len(jax.devices()),
               "machine": platform.machine(), "shape": list(x.shape), "width": 32,
               "coeff": 0.9, "n_power_iter": 5, "probe": "gaussian", "n_samples": 1}

    def make(cfg):
        return blocks.InvertibleBlock(blocks.ConvBranch(hidden=32, coeff=0.9, n_power_iter=5),
                                      logdet=cfg)

    variables = jax.jit(make(logdet.LogDetConfig("none")).init)(jax.random.key(1), x)
    rngs = {"logdet": jax.random.key(2)}

    configs = {"series5": logdet.LogDetConfig("series", n_terms=5)}
    if not args.quick:
        configs["series10"] = logdet.LogDetConfig("series", n_terms=10)
        configs["series20"] = logdet.LogDetConfig("series", n_terms=20)
        configs["roulette"] = logdet.LogDetConfig("roulette", n_exact=2, max_terms=20)

    for name, base in configs.items():
        for gradient in ("autodiff", "neumann"):
            model = make(logdet.LogDetConfig(**{**base.__dict__, "gradient": gradient}))

            def loss(params, spectral, x, model=model):
                (y, ld), state = model.apply({"params": params, "spectral": spectral}, x,
                                             train=True, rngs=rngs, mutable=["spectral"])
                prior = 0.5 * jnp.sum(y ** 2, axis=(1, 2, 3))
                return jnp.mean(prior - ld), state

            grad_fn = jax.value_and_grad(loss, has_aux=True)
            fargs = (variables["params"], variables["spectral"], x)
            r = compile_and_time(grad_fn, *fargs, repeats=args.repeats)
            key = f"{name}.{gradient}"
            results[key] = r["median"]
            results[f"{key}.min"] = r["min"]
            results[f"{key}.compile"] = r["compile"]
            results[f"{key}.gflop"] = (r["flops"] or 0.0) / 1e9
            results[f"{key}.loss"] = float(r["output"][0][0])
            results[f"{key}.memory"] = _memory(grad_fn, *fargs)
        results[f"{name}.ratio_neumann_to_autodiff"] = (results[f"{name}.neumann"]
                                                        / results[f"{name}.autodiff"])
    results["roulette.expected_terms"] = logdet.LogDetConfig("roulette").expected_terms
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    runtime.relaunch_with_hugepages()  # huge pages for XLA's buffers, see runtime.py
    main()
