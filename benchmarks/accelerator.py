"""The paper-sized models on an accelerator: step times, memory and float32 precision.

One script for a short GPU/TPU session (it also runs on CPU at ``--tiny`` sizes, which is
how the test suite checks it). Sections run in order of importance and each is skipped
once ``--deadline`` seconds have passed; the JSON is rewritten after every section, so a
run stopped early keeps what it measured.

* ``device``: backend, device kind, JAX/Flax versions, float32 matmul rate at the default
  precision (TF32 on NVIDIA GPUs) and at ``"highest"`` (true float32), bf16 rate.
* ``cifar10_density``: the whole library training step (``train.steps.make_train_step``:
  dequantization, bits/dim with the 5-term log-det, gradient, Adamax update, state
  donated) of ``models.build("paper_cifar10_density")`` (96 blocks, 512 channels) at
  ``--density_batch``, with per-block remat (what ``configs/cifar10_density.py`` uses)
  and without: compile seconds, median seconds per step, images per second, XLA's memory
  estimate and the device's peak bytes in use.
* ``cifar10_classifier``: the same for ``paper_cifar10_classifier`` (39 blocks) at
  ``--classifier_batch``, with the epoch time it implies (50,000 images).
* ``table5``: ``analysis.runtime_comparison`` (one forward+backward of Glow, i-ResNet,
  + spectral norm, + log-det) at a paper-like size (16x16x12, 512 channels).
* ``precision``: max reconstruction error of the density model's fixed-point inverse at
  initialization and the spread of its log-det estimate, at the default matmul precision
  and at ``"highest"`` (TF32 rounding is ~1e-3 relative; spectral normalization bounds
  hold for the exact operator).

    python -m benchmarks.accelerator --output /tmp/accelerator.json
    python -m benchmarks.accelerator --precision=highest --sections=cifar10_density
    python -m benchmarks.accelerator --tiny          # CPU smoke test (about 2 minutes)

On one H200 the whole script took 7 minutes (compiles of 16-40 s per step; see
``benchmarks/results/accelerator_h200.json``): give a short lease ``--deadline`` and
``--sections``, and read partial results from ``--output``.

Nothing is asserted; read the numbers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.timing import init_train_state, matmul_gflops, memory_analysis
from iresnet_jax import models
from iresnet_jax.train import steps

CIFAR_SHAPE = (32, 32, 3)
TX = optax.adamax(0.003)   # one instance: the optimizer is static metadata of the state


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _peak_gib() -> float | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2 ** 30


def time_train_step(model, task: str, batch: int, shape, repeats: int) -> dict:
    """Compile and time the library's jitted training step of ``model``."""
    dim = int(np.prod(shape))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.integers(0, 256, (batch,) + tuple(shape)), jnp.float32)}
    if task == "classification":
        data["image"] = data["image"] / 255.0 - 0.5
        data["label"] = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)

    state = init_train_state(model, data["image"][:min(batch, 8)] / 256.0 - 0.5, TX)
    n_params = models.count_params(state.params)
    step = jax.jit(steps.make_train_step(model, task, n_bins=256, dim=dim),
                   donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    holder = {"state": state}

    def call():
        holder["state"], m = compiled(holder["state"], data)
        return m

    med, best = _median_seconds(call, repeats)
    metrics = jax.device_get(call())
    return {"batch": batch, "params": n_params, "compile_seconds": round(compile_s, 2),
            "step_seconds": med, "step_seconds_min": best,
            "examples_per_second": batch / med, "loss": float(metrics["loss"]),
            "xla_memory": memory_analysis(compiled), "peak_gib_so_far": _peak_gib()}


def precision_check(preset: str, overrides: dict, batch: int, shape) -> dict:
    """Reconstruction error and log-det spread at the default and the highest precision."""
    model = models.build(preset, **overrides)
    x = jax.random.uniform(jax.random.key(3), (batch,) + tuple(shape), jnp.float32, -0.5, 0.5)
    variables = jax.jit(model.init)({"params": jax.random.key(0),
                                     "logdet": jax.random.key(1)}, x)
    out = {}
    for name in ("default", "highest"):
        with jax.default_matmul_precision(None if name == "default" else "highest"):
            def roundtrip(v, x, key):
                z = model.apply(v, x, rngs={"logdet": key})
                z = z[0] if isinstance(z, tuple) else z
                return z, model.apply(v, z, method="inverse")

            def logp(v, x, key):
                return model.apply(v, x, method="log_prob", rngs={"logdet": key})

            z, xr = jax.jit(roundtrip)(variables, x, jax.random.key(4))
            lp = jax.jit(logp)(variables, x, jax.random.key(5))
        out[name] = {"recon_max_abs_error": float(jnp.max(jnp.abs(xr - x))),
                     "log_prob_first": float(lp[0])}
    out["log_prob_difference_default_vs_highest"] = abs(
        out["default"]["log_prob_first"] - out["highest"]["log_prob_first"])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models and sizes (a CPU smoke test of this script)")
    parser.add_argument("--density_batch", type=int, default=64)
    parser.add_argument("--classifier_batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=1e9,
                        help="seconds after which the remaining sections are skipped")
    parser.add_argument("--sections", default="device,cifar10_density,cifar10_classifier,"
                        "table5,precision")
    parser.add_argument("--output", default="", help="also write the JSON to this file")
    parser.add_argument("--precision", default="default", choices=("default", "highest"),
                        help="matmul precision of the timed steps (highest: true float32 "
                        "on GPUs, whose default is TF32)")
    args = parser.parse_args()
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    t_start = time.perf_counter()
    tiny = args.tiny
    if tiny:
        args.density_batch, args.classifier_batch, args.repeats = 4, 4, 2
    density_kw = dict(blocks_per_scale=(1, 1, 1), hidden=8) if tiny else {}
    classifier_kw = dict(stages=(1, 1, 1), hidden=(4, 4, 4)) if tiny else {}
    results: dict = {"sections_skipped": [], "matmul_precision": args.precision}

    def save():
        text = json.dumps(results, indent=1, default=float)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        return text

    def run(name, fn):
        if name not in args.sections.split(","):
            return
        if time.perf_counter() - t_start > args.deadline:
            results["sections_skipped"].append(name)
            print(f"{name}: skipped (deadline)", flush=True)
            return
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # keep the other sections' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        results[name + "_wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(results[name], default=float)[:1500]}", flush=True)
        save()

    def device():
        n = 256 if tiny else 8192
        return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                "device_count": jax.device_count(),
                "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax")},
                "matmul_tflops_f32_default": matmul_gflops(n) / 1e3,
                "matmul_tflops_f32_highest": matmul_gflops(n, precision="highest") / 1e3,
                "matmul_tflops_bf16": matmul_gflops(n, dtype=jnp.bfloat16) / 1e3}

    def density():
        out = results["cifar10_density"] = {}
        for remat in (True, False):
            model = models.build("paper_cifar10_density", remat=remat, **density_kw)
            out["remat" if remat else "no_remat"] = time_train_step(
                model, "density", args.density_batch, CIFAR_SHAPE, args.repeats)
            save()   # keep the first measurement if the run is stopped during the second
        return out

    def classifier():
        model = models.build("paper_cifar10_classifier", **classifier_kw)
        r = time_train_step(model, "classification", args.classifier_batch, CIFAR_SHAPE,
                            args.repeats)
        r["epoch_seconds_50k"] = 50000 / r["examples_per_second"]
        return r

    def table5():
        from iresnet_jax import analysis
        size = dict(shape=(4, 4, 12), batch=2, n_blocks=1, hidden=8) if tiny else dict(
            shape=(16, 16, 12), batch=64, n_blocks=32, hidden=512)
        r = analysis.runtime_comparison(**size, repeats=args.repeats)
        r["paper_seconds"] = {"glow": 0.72, "iresnet": 0.31, "iresnet_sn": 0.57,
                              "iresnet_sn_logdet": 1.88}
        return r

    def precision():
        return precision_check("paper_cifar10_density", density_kw, 2 if tiny else 16,
                               CIFAR_SHAPE)

    run("device", device)
    run("cifar10_density", density)
    run("cifar10_classifier", classifier)
    run("table5", table5)
    run("precision", precision)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    print(save())


if __name__ == "__main__":
    main()
