"""A one-minute tour: one i-ResNet block's round trip and log-determinant.

    python -m experiments.demo
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from iresnet_jax import blocks, logdet


def main():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    exact_block = blocks.InvertibleBlock(blocks.ConvBranch(hidden=16, coeff=0.9),
                                         logdet=logdet.LogDetConfig("exact"))
    variables = jax.jit(exact_block.init)(jax.random.key(1), x)
    t0 = time.time()
    y, ld_exact = jax.jit(exact_block.apply)(variables, x)
    x_rec = jax.jit(lambda v, y: exact_block.apply(v, y, method="inverse"))(variables, y)
    print(f"round trip max error: {float(jnp.max(jnp.abs(x_rec - x))):.2e}")
    series_block = exact_block.clone(logdet=logdet.LogDetConfig("series", n_terms=10,
                                                                n_samples=64))
    _, ld_series = jax.jit(lambda v, x: series_block.apply(
        v, x, rngs={"logdet": jax.random.key(2)}))(variables, x)
    for i in range(3):
        print(f"example {i}: exact log-det {float(ld_exact[i]):+.4f}, "
              f"10-term series (64 probes) {float(ld_series[i]):+.4f}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
