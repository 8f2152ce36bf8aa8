"""Benchmark of one i-ResNet conv block (issue: core library).

Input 14x14x4, hidden width 32, batch 64, c = 0.9, ELU, branch 3x3 -> 1x1 -> 3x3, 5 power
iterations per training call. Prints one JSON object: steady-state seconds per call
(median) and compile seconds for the forward pass, the forward pass with the 5-term
power-series log-det (vjp and jvp), the gradient of the latter, and the inverse at
tolerance 1e-6 with its iteration count and reconstruction error.

    python -m benchmarks.block
"""

from __future__ import annotations

import json
import platform

import jax
import jax.numpy as jnp

from benchmarks.timing import compile_and_time
from iresnet_jax import blocks, logdet
from iresnet_jax import runtime


def main():
    x = jax.random.normal(jax.random.key(0), (64, 14, 14, 4))
    results = {"backend": jax.default_backend(), "devices": len(jax.devices()),
               "machine": platform.machine(), "shape": list(x.shape), "width": 32}

    def make(method, mode="vjp"):
        return blocks.InvertibleBlock(
            blocks.ConvBranch(hidden=32, coeff=0.9, n_power_iter=5),
            logdet=logdet.LogDetConfig(method, n_terms=5, mode=mode))

    plain = make("none")
    variables = jax.jit(plain.init)(jax.random.key(1), x)
    rngs = {"logdet": jax.random.key(2)}

    r = compile_and_time(lambda v, x: plain.apply(v, x)[0], variables, x)
    results["forward"], results["forward.compile"] = r["median"], r["compile"]
    y = r["output"]

    for mode in ("vjp", "jvp"):
        model = make("series", mode)
        r = compile_and_time(lambda v, x: model.apply(v, x, rngs=rngs), variables, x)
        results[f"forward_logdet_{mode}"] = r["median"]
        results[f"forward_logdet_{mode}.compile"] = r["compile"]

        def loss(params, spectral, x):
            (y, ld), state = model.apply({"params": params, "spectral": spectral}, x,
                                         train=True, rngs=rngs, mutable=["spectral"])
            return jnp.mean(0.5 * jnp.sum(y ** 2, axis=(1, 2, 3)) - ld), state

        grad_fn = jax.grad(loss, has_aux=True)
        r = compile_and_time(grad_fn, variables["params"], variables["spectral"], x)
        results[f"grad_logdet_{mode}"] = r["median"]
        results[f"grad_logdet_{mode}.compile"] = r["compile"]
        results[f"grad_logdet_{mode}.gflops"] = (r["flops"] or 0) / r["median"] / 1e9

    def invert(v, y):
        x_rec, inter = plain.apply(v, y, method="inverse", mutable=["intermediates"])
        return x_rec, inter["intermediates"]["inverse_iterations"][0]

    r = compile_and_time(invert, variables, y)
    x_rec, iters = r["output"]
    results["inverse_tol1e-6"] = r["median"]
    results["inverse_tol1e-6.compile"] = r["compile"]
    results["inverse_tol1e-6.max_iterations"] = int(iters.max())
    results["inverse_tol1e-6.recon_error"] = float(jnp.max(jnp.abs(x_rec - x)))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    runtime.relaunch_with_hugepages()  # huge pages for XLA's buffers, see runtime.py
    main()
