r"""Kernel gradients of one conv: six separate convolutions against one over a stacked batch.

With the autodiff gradient of the 5-term log-det series, every conv of a block receives six
kernel gradients (the forward pass and the five VJPs of the series), and XLA:CPU compiles
each as its own convolution with its own transposed operands. Their sum is also one
kernel gradient over the six (input, cotangent) pairs stacked along the batch axis. This
script measures, for the ANCHORS.md density model's conv shapes (batch 64), the compile
seconds and the median seconds per call of:

* ``separate``: the six kernel gradients of ``lax.conv`` added up;
* ``batched``: one ``lax.conv`` kernel gradient over the stacked batch;
* ``batched_patches``: one kernel gradient of ``lipschitz.conv2d_patches`` (im2col and a
  matrix product) over the stacked batch;

and the largest relative difference of the two batched results from ``separate``.

    python -m benchmarks.wgrad --repeats 20

Nothing is asserted; compare the variants within one run.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.timing import compile_and_time
from iresnet_jax import lipschitz

# (spatial size, C_in, C_out) of the 3x3 convs of the ANCHORS.md density model.
SHAPES = ((14, 4, 32), (14, 32, 4), (7, 8, 32), (7, 32, 8))
N_PAIRS = 6
BATCH = 64


def _lax_conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_grad(conv, x, dy, kernel_shape):
    """``d <conv(x, K), dy> / dK``: the kernel gradient of ``conv`` at ``(x, dy)``."""
    _, pull = jax.vjp(lambda k: conv(x, k), jnp.zeros(kernel_shape, x.dtype))
    return pull(dy)[0]


def _stack(a):
    return a.reshape((-1,) + a.shape[2:])


def variants(kernel_shape):
    def separate(xs, dys):
        return sum(kernel_grad(_lax_conv, xs[i], dys[i], kernel_shape)
                   for i in range(xs.shape[0]))

    def batched(xs, dys):
        return kernel_grad(_lax_conv, _stack(xs), _stack(dys), kernel_shape)

    def batched_patches(xs, dys):
        return kernel_grad(lipschitz.conv2d_patches, _stack(xs), _stack(dys), kernel_shape)

    return {"separate": separate, "batched": batched, "batched_patches": batched_patches}


def measure(size, c_in, c_out, repeats):
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(N_PAIRS, BATCH, size, size, c_in)), jnp.float32)
    dys = jnp.asarray(rng.normal(size=(N_PAIRS, BATCH, size, size, c_out)), jnp.float32)
    out, values = {}, {}
    for name, fn in variants((3, 3, c_in, c_out)).items():
        r = compile_and_time(fn, xs, dys, repeats=repeats, warmup=1)
        values[name] = r["output"]
        out[name] = {"compile": r["compile"], "median": r["median"]}
    scale = float(jnp.max(jnp.abs(values["separate"])))
    for name in ("batched", "batched_patches"):
        out[name]["max_relative_difference"] = float(
            jnp.max(jnp.abs(values[name] - values["separate"]))) / scale
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    results = {"backend": jax.default_backend(), "pairs": N_PAIRS, "batch": BATCH,
               "repeats": args.repeats}
    for size, c_in, c_out in SHAPES:
        results[f"{size}x{size}x{c_in}->{c_out}"] = measure(size, c_in, c_out, args.repeats)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
