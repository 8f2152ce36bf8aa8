"""The paper-sized models on an accelerator: step times, memory, Table 5, float32 precision.

For a short GPU/TPU session (``--tiny`` runs it on a CPU at tiny sizes, which is how the
tests check it). Sections run in order of importance, each skipped once ``--deadline``
seconds have passed, and the JSON is rewritten after every section, so a run stopped
early keeps what it measured:

* ``device``: backend, device kind, the float32 matmul rate at the default precision
  (TF32 on NVIDIA GPUs) and at ``"highest"`` (true float32), the bf16 rate;
* ``cifar10_density``: the library's whole training step (``train.pipeline``: bits/dim
  with the 5-term log-det, gradient, Adamax update, the state donated) of
  ``experiments/configs/cifar10_density.py`` (96 blocks, 512 channels) at
  ``--density_batch``, with per-block remat (the config's setting) and without: compile
  seconds, median seconds per step, images per second, XLA's memory estimate and the
  device's peak bytes in use;
* ``cifar10_classifier``: the same for ``cifar10_classifier.py`` (39 blocks, its SGD) at
  ``--classifier_batch``, with the epoch time it implies (50,000 images);
* ``table5``: ``experiments.analyses.runtime_comparison`` (one forward and backward pass
  of Glow, i-ResNet, + spectral norm, + log-det) at a paper-like size (16x16x12, 512
  channels, 32 blocks);
* ``precision``: max reconstruction error of the density model's inverse at
  initialization and its log-density, at the default matmul precision and at
  ``"highest"``.

    python -m benchmarks.accelerator
    python -m benchmarks.accelerator --precision=highest --sections=cifar10_density
    python -m benchmarks.accelerator --tiny          # CPU smoke test

Compiles take 15-40 s per step on a GPU: give a short session ``--deadline`` and
``--sections``. Writes ``benchmarks/results/accelerator_<device>.json`` (e.g.
``accelerator_h200.json``; ``--tiny``: ``accelerator_tiny.json``).
"""

from __future__ import annotations

import json
import re
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from experiments.configs import cifar10_classifier, cifar10_density
from iresnet_jax import models

CIFAR_SHAPE = (32, 32, 3)
SECTIONS = ("device", "cifar10_density", "cifar10_classifier", "table5", "precision")
PAPER_TABLE5_SECONDS = {"glow": 0.72, "iresnet": 0.31, "iresnet_sn": 0.57,
                        "iresnet_sn_logdet": 1.88}


def _peak_gib() -> float | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend reports memory
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2 ** 30


def time_train_step(config, batch: int, shape, repeats: int, **overrides) -> dict:
    """Compiles and times the library's training step of ``config``'s model (with
    ``overrides``) on ``batch`` synthetic images of ``shape``."""
    step = common.compile_train_step(config, shape, batch, **overrides)
    r = common.run_train_step(step, repeats)
    return {"batch": batch, "params": step["params"], "compile_seconds": step["compile"],
            "step_seconds": r["median"], "step_seconds_min": r["min"],
            "examples_per_second": batch / r["median"], "loss": r["loss"],
            "xla_memory": step["memory"], "peak_gib_so_far": _peak_gib()}


def precision_check(spec, overrides: dict, batch: int, shape) -> dict:
    """Reconstruction error and log-density at the default and the highest precision."""
    model = models.build(spec, input_shape=tuple(shape), **overrides)
    x = jax.random.uniform(jax.random.key(3), (batch,) + tuple(shape), jnp.float32, -0.5, 0.5)
    variables = jax.jit(model.init)({"params": jax.random.key(0),
                                     "logdet": jax.random.key(1)}, x)
    out = {}
    for name in ("default", "highest"):
        with jax.default_matmul_precision(None if name == "default" else "highest"):
            def roundtrip(v, x):
                z = model.apply(v, x, rngs={"logdet": jax.random.key(4)})[0]
                return model.apply(v, z, method="inverse")

            def log_prob(v, x):
                return model.apply(v, x, method="log_prob", rngs={"logdet": jax.random.key(5)})

            xr = jax.jit(roundtrip)(variables, x)
            lp = jax.jit(log_prob)(variables, x)
        out[name] = {"recon_max_abs_error": float(jnp.max(jnp.abs(xr - x))),
                     "log_prob_first": float(lp[0])}
    out["log_prob_difference_default_vs_highest"] = abs(
        out["default"]["log_prob_first"] - out["highest"]["log_prob_first"])
    return out


def result_name(tiny: bool) -> str:
    """``accelerator_<device>`` (``NVIDIA H200`` -> ``accelerator_h200``)."""
    if tiny:
        return "accelerator_tiny"
    kind = jax.devices()[0].device_kind.lower().removeprefix("nvidia ")
    return "accelerator_" + re.sub(r"[^a-z0-9]+", "_", kind).strip("_")


def main(argv=None) -> dict:
    common.setup(argv)
    parser = common.parser(__doc__)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models and sizes (a CPU smoke test of this script)")
    parser.add_argument("--density_batch", type=int, default=64)
    parser.add_argument("--classifier_batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=1e9,
                        help="seconds after which the remaining sections are skipped")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--precision", default="default", choices=("default", "highest"),
                        help="matmul precision of the timed steps (highest: true float32 "
                             "on GPUs, whose default is TF32)")
    args = parser.parse_args(argv)
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    t_start = time.perf_counter()
    tiny = args.tiny
    if tiny:
        args.density_batch, args.classifier_batch, args.repeats = 4, 4, 2
    density_kw = dict(blocks_per_scale=(1, 1, 1), hidden=8) if tiny else {}
    classifier_kw = dict(stages=(1, 1, 1), hidden=(4, 4, 4)) if tiny else {}
    results: dict = {"sections_skipped": [], "matmul_precision": args.precision,
                     "tiny": tiny}
    name, cmd = result_name(tiny), common.command("accelerator", argv)

    def run(section, fn):
        if section not in args.sections.split(","):
            return
        if time.perf_counter() - t_start > args.deadline:
            results["sections_skipped"].append(section)
            print(f"{section}: skipped (deadline)", file=sys.stderr, flush=True)
            return
        t0 = time.perf_counter()
        try:
            results[section] = fn()
        except Exception as e:  # keep the other sections' numbers
            results[section] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        results[section + "_wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{section}: {json.dumps(results[section], default=float)[:1500]}",
              file=sys.stderr, flush=True)
        common.write(name, results, cmd, args.results_dir, echo=False)

    def device():
        n = 256 if tiny else 8192
        return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                "device_count": jax.device_count(),
                "matmul_tflops_f32_default": common.matmul_gflops(n) / 1e3,
                "matmul_tflops_f32_highest": common.matmul_gflops(n, precision="highest") / 1e3,
                "matmul_tflops_bf16": common.matmul_gflops(n, dtype=jnp.bfloat16) / 1e3}

    def density():
        out = results["cifar10_density"] = {}
        for remat in (True, False):
            out["remat" if remat else "no_remat"] = time_train_step(
                cifar10_density.get_config(), args.density_batch, CIFAR_SHAPE, args.repeats,
                remat=remat, **density_kw)
            common.write(name, results, cmd, args.results_dir, echo=False)
        return out

    def classifier():
        r = time_train_step(cifar10_classifier.get_config(), args.classifier_batch,
                            CIFAR_SHAPE, args.repeats, **classifier_kw)
        r["epoch_seconds_50k"] = 50000 / r["examples_per_second"]
        return r

    def table5():
        from experiments.analyses import runtime_comparison

        size = dict(shape=(4, 4, 12), batch=2, n_blocks=1, hidden=8) if tiny else dict(
            shape=(16, 16, 12), batch=64, n_blocks=32, hidden=512)
        return {**runtime_comparison(**size, repeats=args.repeats),
                "paper_seconds": PAPER_TABLE5_SECONDS}

    def precision():
        return precision_check(cifar10_density.get_config().model, density_kw,
                               2 if tiny else 16, CIFAR_SHAPE)

    run("device", device)
    run("cifar10_density", density)
    run("cifar10_classifier", classifier)
    run("table5", table5)
    run("precision", precision)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    common.write(name, results, cmd, args.results_dir)
    return results


if __name__ == "__main__":
    main()
