"""Compile time, step time and XLA's memory estimate of the paper's CIFAR-10 density model.

The model of ``models.build("paper_cifar10_density")``: initial squeeze, 3 scale-blocks of
32 i-ResNet blocks (96 blocks), 512 filters, c = 0.9, 5 power iterations, 5-term series
with one Gaussian probe, learned diagonal Gaussian prior. The timed function is the whole
training step (dequantization, log-likelihood with the log-det estimate, gradient, Adamax
update; ``iresnet_jax.train.steps.make_train_step``), jitted with the state donated.

Prints one JSON object:

* ``compile_seconds_by_blocks_per_scale``: compile time of the train step at ``--batch``
  for 2, 8 and 32 blocks per scale (identical blocks are one ``nn.scan`` body, so compile
  time should not grow with depth);
* ``step_seconds``: steady-state seconds per training step at ``--batch`` (median);
* ``memory_batch_<N>``: ``compiled.memory_analysis()`` of the train step at
  ``--memory_batch`` without and with per-block remat (compiled, not run).

    python -m benchmarks.density_model [--batch=2] [--memory_batch=64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.timing import init_train_state, memory_analysis
from iresnet_jax import models
from iresnet_jax import runtime
from iresnet_jax.train import steps

SHAPE = (32, 32, 3)
DIM = 32 * 32 * 3
TX = optax.adamax(0.003)   # one instance: the optimizer is static metadata of the state


def _state(model, batch: int, abstract: bool):
    x = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (max(batch, 8),) + SHAPE),
                    jnp.float32)
    return init_train_state(model, x, TX, abstract=abstract)


def _pixels(batch: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(1).integers(0, 256, (batch,) + SHAPE),
                       jnp.float32)


def _compile(model, batch: int):
    step = jax.jit(steps.make_train_step(model, "density", n_bins=256, dim=DIM),
                   donate_argnums=(0,))
    state = _state(model, batch, abstract=True)
    pixels = jax.ShapeDtypeStruct((batch,) + SHAPE, jnp.float32)
    t0 = time.perf_counter()
    compiled = step.lower(state, {"image": pixels}).compile()
    return compiled, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--memory_batch", type=int, default=64)
    parser.add_argument("--depths", default="2,8,32", help="blocks per scale to compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_memory", action="store_true")
    args = parser.parse_args()

    results = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "load_average_1min_at_start": round(os.getloadavg()[0], 2),
               "machine": platform.machine(), "batch": args.batch,
               "model": "paper_cifar10_density"}
    full = models.build("paper_cifar10_density")
    results["num_params"] = models.count_params(_state(full, 1, abstract=True).params)

    compile_s = {}
    compiled_full = None
    for depth in (int(d) for d in args.depths.split(",")):
        model = models.build("paper_cifar10_density", blocks_per_scale=(depth,) * 3)
        compiled, seconds = _compile(model, args.batch)
        compile_s[str(depth)] = round(seconds, 2)
        if depth == 32:
            compiled_full = compiled
        print(f"blocks per scale {depth}: compiled in {seconds:.1f} s", flush=True)
    results["compile_seconds_by_blocks_per_scale"] = compile_s

    if compiled_full is None:
        compiled_full, _ = _compile(full, args.batch)
    state = _state(full, args.batch, abstract=False)
    batch = {"image": _pixels(args.batch)}
    state, metrics = compiled_full(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = compiled_full(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    results["step_seconds"] = statistics.median(times)
    results["step_seconds_all"] = [round(t, 3) for t in times]
    results["loss"] = float(metrics["loss"])
    print(f"step: {results['step_seconds']:.2f} s at batch {args.batch}", flush=True)

    if not args.skip_memory:
        for remat in (False, True):
            model = models.build("paper_cifar10_density", remat=remat)
            compiled, seconds = _compile(model, args.memory_batch)
            key = f"memory_batch_{args.memory_batch}" + ("_remat" if remat else "")
            results[key] = {**memory_analysis(compiled), "compile_seconds": round(seconds, 2)}
            print(f"{key}: {results[key]}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    runtime.relaunch_with_hugepages()  # huge pages for XLA's buffers, see runtime.py
    main()
