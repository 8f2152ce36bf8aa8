r"""A training step's gradient as data parallelism over the processes of this machine.

XLA:CPU splits each of the ANCHORS.md models' small matrix products over both cores of
this machine, and at these sizes that costs more than it gains (``benchmarks.gemm_ceiling``
run under ``taskset -c 0``: the density model's products run faster one thread each than
two threads each). Two processes, each pinned to one core and each computing the gradient
of half the batch, use the cores without that cost; ``iresnet_jax.train.multiprocess``
averages their gradients through shared memory (the toy main job trains this way).

``time_data_parallel(key, n)`` times one ``benchmarks.ab`` key that way. A first spawned
process compiles the program of one rank (``batch / n`` examples) with the whole machine
(``compile``) into a temporary persistent compilation cache. Then ``n`` rank processes
start, each pinned to its own CPU before JAX starts its runtime (so that XLA sizes its
thread pool for one core: pinning a running process instead left the step 10% slower),
load that program from the cache (``load_seconds``: tracing and loading), and run the
timed calls in lockstep: each call is the jitted gradient of the rank's slice, its
transfer to NumPy and the shared-memory mean of ``(loss, gradients)`` over the ranks, what
``multiprocess.data_parallel_step`` does before the optimizer update; rank 0's times are
reported. The mean is the full batch's gradient wherever the loss is a mean over
independent examples (``tests/test_benchmarks.py`` checks it for the step without log-det);
the log-det keys draw each slice's probes from the same key, so the Hutchinson probes
differ from the one-process step's, not their distribution.

    python -m benchmarks.processes --key density.train_logdet --processes 2

prints one JSON object (``benchmarks.anchor --only ...two_processes`` records the same
keys beside the one-process ones). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue as queue_lib
import statistics
import tempfile
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from benchmarks import ab
from benchmarks.timing import xla_flops
from iresnet_jax import runtime
from iresnet_jax.train import multiprocess

_TRAIN_KEYS = ("density.train", "density.train_logdet", "density.train_logdet_neumann",
               "classifier.train")


def _local(key, overrides, preset, batch, shape, rank, n):
    """``(jitted vector function, args, compile seconds, flops)`` of rank's slice."""
    fn, args = ab.build(key, overrides, preset, batch, shape)
    per = batch // n
    local = tuple(a[rank * per:(rank + 1) * per] if i >= 2 else a
                  for i, a in enumerate(args))   # (params, state, x[, labels])

    def vector(*a):
        (loss, _), grads = fn(*a)
        return ravel_pytree((loss, grads))[0]

    t0 = time.perf_counter()
    compiled = jax.jit(vector).lower(*local).compile()
    compile_s = time.perf_counter() - t0
    return compiled, local, compile_s, xla_flops(compiled)


def _use_cache(cache_dir):
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _compiler(queue, cache_dir, key, overrides, preset, batch, shape, n):
    """Compiles rank 0's program into ``cache_dir`` with the whole machine."""
    try:
        _use_cache(cache_dir)
        compiled, local, compile_s, flops = _local(key, overrides, preset, batch, shape, 0, n)
        nbytes = int(jax.block_until_ready(compiled(*local)).nbytes)
        queue.put({"compile": compile_s, "flops": flops, "nbytes": nbytes})
    except BaseException as e:
        queue.put({"error": repr(e)})
        raise


def _rank(queue, cache_dir, cpu, handle, key, overrides, preset, batch, shape, calls):
    """One rank: pinned before JAX starts its runtime (so that XLA sizes its thread pool
    for one core), loads the program from the cache, then ``calls`` steps of (gradient,
    mean)."""
    multiprocess.pin_threads([cpu])
    group = multiprocess.ProcessGroup.attach(handle)
    try:
        _use_cache(cache_dir)
        compiled, local, load_s, _ = _local(key, overrides, preset, batch, shape,
                                            group.rank, group.n)
        jax.block_until_ready(compiled(*local))
        group.mean(np.zeros(1, np.float32))           # every rank ready
        times, mean = [], None
        for _ in range(calls):
            t0 = time.perf_counter()
            mean = group.mean(np.asarray(compiled(*local)))
            times.append(time.perf_counter() - t0)
        queue.put({"rank": group.rank, "load": load_s, "times": times,
                   "mean": mean if group.rank == 0 else None})
    except BaseException as e:
        group.abort()
        queue.put({"rank": group.rank, "error": repr(e)})
        raise
    finally:
        group.close()


def _get(queue, processes, what):
    """The next message, or a clear error if every process that could send it died."""
    while True:
        try:
            msg = queue.get(timeout=1.0)
        except queue_lib.Empty:
            if not any(p.is_alive() for p in processes):
                raise RuntimeError(f"the {what} processes exited without reporting "
                                   f"(exit codes {[p.exitcode for p in processes]})")
            continue
        if "error" in msg:
            raise RuntimeError(f"a {what} process failed: {msg['error']}")
        return msg


def time_data_parallel(key: str, n: int = 2, *, repeats: int = 7, warmup: int = 1,
                       overrides: dict | None = None, preset: str | None = None,
                       batch: int = 64, shape: tuple[int, ...] = (28, 28, 1)) -> dict:
    """Times ``key``'s gradient as ``n`` processes of ``batch / n`` examples each."""
    if key not in _TRAIN_KEYS:
        raise ValueError(f"{key!r} is not a training key; one of {_TRAIN_KEYS}")
    if n < 2 or batch % n:
        raise ValueError(f"need n >= 2 processes dividing the batch ({batch}), got {n}")
    cpus = multiprocess.available_cpus()
    if len(cpus) < n:
        raise ValueError(f"{n} processes need {n} CPUs; this process may use {len(cpus)}")
    overrides = dict(overrides or {})
    ctx = multiprocessing.get_context("spawn")
    calls = warmup + repeats
    with tempfile.TemporaryDirectory(prefix="iresnet_jax_processes_") as cache_dir:
        queue = ctx.Queue()
        compiler = ctx.Process(target=_compiler, args=(queue, cache_dir, key, overrides,
                                                       preset, batch, shape, n), daemon=True)
        compiler.start()
        info = _get(queue, [compiler], "compiling")
        compiler.join()
        group = multiprocess.ProcessGroup.create(n, slot_bytes=info["nbytes"])
        ranks = [ctx.Process(target=_rank, args=(queue, cache_dir, cpus[r], group.handle(r),
                                                 key, overrides, preset, batch, shape, calls),
                             daemon=True) for r in range(n)]
        try:
            for p in ranks:
                p.start()
            reports = sorted((_get(queue, ranks, "training") for _ in range(n)),
                             key=lambda m: m["rank"])
        finally:
            for p in ranks:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
            group.close()
    times = reports[0]["times"][warmup:]
    median = statistics.median(times)
    out = {"key": key, "processes": n, "batch": batch, "median": median, "min": min(times),
           "compile": info["compile"], "load_seconds": [m["load"] for m in reports],
           "loss": float(reports[0]["mean"][0]), "mean_vector": reports[0]["mean"]}
    if info["flops"]:
        out["flops"] = n * info["flops"]
        out["gflops_per_s"] = n * info["flops"] / median / 1e9
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--key", default="density.train_logdet", choices=_TRAIN_KEYS)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if argv is None:
        runtime.relaunch_with_hugepages()
    r = time_data_parallel(args.key, args.processes, repeats=args.repeats)
    r.pop("mean_vector")
    print(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
