"""One i-ResNet conv block: forward, log-det, gradient and inverse.

The density model's block at the reference configuration's second shape (docs/
reference.md): input 64x14x14x4 (``--shape``), ActNorm, then a spectrally normalized
branch 3x3 -> 1x1 -> 3x3 of width 32, c = 0.9, ELU, 5 power iterations per training
call, the convs as ``conv="auto"`` computes them on this backend (``--conv``). Times
(median seconds per call, with the compile seconds ``*.compile``):

* ``forward``: the block without log-det;
* ``forward_logdet_<mode>``: with the 5-term power-series log-det (one Gaussian probe)
  for each mode of the series (``vjp``, ``jvp``, ``split``);
* ``grad_logdet_<mode>``: the gradient of ``mean(|y|^2 / 2 - log_det)`` with respect to
  the parameters through it (training call), with XLA's ``*.gflops_per_s``;
* ``inverse_tol1e-6``: the inverse to a step of 1e-6, its iterations and
  reconstruction error.

    python -m benchmarks.block

Writes ``benchmarks/results/block.json``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import common
from iresnet_jax import blocks, conv, logdet, tuning

MODES = ("vjp", "jvp", "split")
COEFF, N_POWER_ITER = 0.9, 5


def add_block_arguments(parser) -> None:
    """``--shape``, ``--width`` and ``--conv`` of the block benchmarks."""
    parser.add_argument("--shape", default="64,14,14,4", help="input shape B,H,W,C")
    parser.add_argument("--width", type=int, default=32, help="hidden channels")
    parser.add_argument("--conv", default="auto", choices=("auto",) + conv.IMPLS,
                        help="auto: what the density model uses on this backend")


def block_setup(args) -> tuple[jax.Array, dict]:
    """The input of ``--shape`` and the settings of the block the arguments describe."""
    shape = tuple(int(s) for s in args.shape.split(","))
    impl = tuning.conv_impl("multiscale_density") if args.conv == "auto" else args.conv
    x = jax.random.normal(jax.random.key(0), shape)
    return x, {"shape": list(shape), "width": args.width, "conv": impl}


def make_block(settings: dict, cfg: logdet.LogDetConfig) -> blocks.InvertibleBlock:
    return blocks.InvertibleBlock(
        blocks.ConvBranch(hidden=settings["width"], coeff=COEFF, n_power_iter=N_POWER_ITER,
                          conv=settings["conv"]),
        logdet=cfg)


def training_loss(model, rngs):
    """``(params, spectral, x) -> (mean(|y|^2 / 2 - log_det), new spectral state)``."""
    def loss(params, spectral, x):
        (y, ld), state = model.apply({"params": params, "spectral": spectral}, x,
                                     train=True, rngs=rngs, mutable=["spectral"])
        return jnp.mean(0.5 * jnp.sum(y.reshape(y.shape[0], -1) ** 2, -1) - ld), state

    return loss


def main(argv=None) -> dict:
    common.setup(argv)
    parser = common.parser(__doc__)
    add_block_arguments(parser)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    x, settings = block_setup(args)
    results: dict = {**settings, "coeff": COEFF, "n_power_iter": N_POWER_ITER,
                     "repeats": args.repeats}
    plain = make_block(settings, logdet.LogDetConfig("none"))
    variables = jax.jit(plain.init)(jax.random.key(1), x)
    rngs = {"logdet": jax.random.key(2)}

    def record(name, r, **extra):
        results[name], results[f"{name}.compile"] = r["median"], r["compile"]
        results.update({f"{name}.{k}": v for k, v in extra.items()})

    r = common.compile_and_time(lambda v, x: plain.apply(v, x)[0], variables, x,
                                repeats=args.repeats)
    record("forward", r)
    y = r["output"]
    for mode in MODES:
        model = make_block(settings, logdet.LogDetConfig("series", n_terms=5, mode=mode))
        r = common.compile_and_time(lambda v, x: model.apply(v, x, rngs=rngs), variables, x,
                                    repeats=args.repeats)
        record(f"forward_logdet_{mode}", r)
        r = common.compile_and_time(jax.grad(training_loss(model, rngs), has_aux=True),
                                    variables["params"], variables["spectral"], x,
                                    repeats=args.repeats)
        record(f"grad_logdet_{mode}", r, gflops_per_s=(r["flops"] or 0) / r["median"] / 1e9)

    def invert(v, y):
        x_rec, inter = plain.apply(v, y, method="inverse", mutable=["intermediates"])
        return x_rec, inter["intermediates"]["inverse_iterations"][0]

    r = common.compile_and_time(invert, variables, y, repeats=args.repeats)
    x_rec, iters = r["output"]
    record("inverse_tol1e-6", r, max_iterations=int(iters.max()),
           recon_error=float(jnp.max(jnp.abs(x_rec - x))))
    common.write("block", results, common.command("block", argv), args.results_dir)
    return results


if __name__ == "__main__":
    main()
