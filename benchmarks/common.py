"""What the benchmark scripts share: timing, XLA's FLOP and memory figures, the library's
training step on synthetic data, the machine's facts and the JSON results.

Every script writes one envelope with ``write``: ``benchmarks/results/<name>.json`` holds
``results``, ``machine`` (CPU, backend, device, versions, git commit, allocator),
``command`` and ``timestamp_utc``. ``python -m benchmarks.report`` turns those files into
the tables of docs/performance.md.

JAX is imported inside the functions that need it: ``benchmarks.reference_torch`` (the
official PyTorch code) uses this module without it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

try:
    import resource
except ImportError:  # not on Windows
    resource = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")

# The official code's times at the reference configuration and the goals (docs/reference.md).
with open(os.path.join(ROOT, "benchmarks", "reference.json")) as _f:
    REFERENCE = json.load(_f)
# docs/reference.md's goals that are not ratios to the official code's times
LOGDET_OVERHEAD_GOAL = 3.0     # step with log-det (best estimator) / step without
COMPILE_GOAL_SECONDS = 20.0    # each jitted function
FLOP_RATE_GOAL = 1 / 3         # the log-det step, as a fraction of the matmul rate


def reference_key(key: str) -> str:
    """The official code's step a key of ``benchmarks.anchor`` is compared with: the
    tolerance inverses with its 20-iteration inverse, the Neumann-gradient step with its
    5-term log-det step."""
    kind, what = key.split(".", 1)
    if what.startswith("inverse_tol"):
        return f"{kind}.inverse20"
    if what == "train_logdet_neumann":
        return "density.train_logdet"
    return key


# ---------------------------------------------------------------------------- timing

def timed(call: Callable[[], Any], repeats: int, warmup: int = 0) -> dict[str, Any]:
    """Calls ``call`` ``warmup`` times, then times ``repeats`` calls (``call`` waits for its
    own result, e.g. ``jax.block_until_ready``): ``median``, ``min``, ``times`` (seconds)
    and the last call's ``output``."""
    for _ in range(warmup):
        call()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "times": times,
            "output": out}


def _cpu_seconds() -> float | None:
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program, or ``None`` where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) if cost else None
    except Exception:  # cost analysis is optional on some backends
        return None


def memory_analysis(compiled) -> dict[str, float]:
    """XLA's memory analysis of a compiled program in GiB (``{}`` where the backend has
    none): ``temp_gib`` (scratch), ``total_gib`` (arguments + outputs + scratch - aliased)
    and XLA's other ``*_size_in_bytes`` fields, as ``*_size_gib``."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    get = lambda f: getattr(m, f, 0) or 0  # noqa: E731
    out = {f.replace("_in_bytes", "_gib"): get(f) / 2 ** 30 for f in fields if hasattr(m, f)}
    out["temp_gib"] = get("temp_size_in_bytes") / 2 ** 30
    out["total_gib"] = (get("argument_size_in_bytes") + get("output_size_in_bytes")
                        + get("temp_size_in_bytes") - get("alias_size_in_bytes")) / 2 ** 30
    return out


def compile_and_time(fn: Callable, *args, repeats: int = 15, warmup: int = 2
                     ) -> dict[str, Any]:
    """Compiles ``jax.jit(fn)`` for ``args`` and times it.

    Returns ``compile`` (seconds for tracing + lowering + compilation) and its parts
    ``compile_lower`` (tracing and lowering, Python) and ``compile_xla`` (XLA's passes and
    code generation), ``compile_cpu`` (the process's CPU seconds over the whole compile,
    on every thread), ``median`` and ``min`` seconds per call over ``repeats`` calls after
    ``warmup`` calls, XLA's ``flops`` (or ``None``), the last ``output`` and the
    ``compiled`` program (for ``memory_analysis``).
    """
    import jax

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = {"compile": t2 - t0, "compile_lower": t1 - t0, "compile_xla": t2 - t1,
           "flops": xla_flops(compiled), "compiled": compiled}
    if cpu0 is not None:
        out["compile_cpu"] = _cpu_seconds() - cpu0
    r = timed(lambda: jax.block_until_ready(compiled(*args)), repeats, warmup)
    return {**out, "median": r["median"], "min": r["min"], "output": r["output"]}


def matmul_gflops(n: int = 1024, repeats: int = 10, dtype=None, precision=None) -> float:
    """Matmul rate of this machine (GFLOP/s) for an ``n x n x n`` product on random data
    through XLA (float32 at the default precision unless told otherwise)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype or jnp.float32)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    r = timed(lambda: jax.block_until_ready(f(a, a)), repeats, warmup=1)
    return 2 * n ** 3 / r["median"] / 1e9


# ------------------------------------------------- the library's training step, synthetic

def synthetic_task(config, shape, classes: int = 10):
    """The pipeline's task of ``config.task`` (its loss and metrics, ``train.tasks``) on
    random 8-bit images of ``shape`` (a batch of them per split) instead of its dataset."""
    import numpy as np

    from iresnet_jax.data import ImageData
    from iresnet_jax.train import tasks

    rng = np.random.default_rng(0)
    n = max(64, config.batch_size)
    splits = [ImageData("synthetic", split, rng.integers(0, 256, (n,) + tuple(shape),
                                                           dtype=np.uint8),
                        np.arange(n, dtype=np.int32) % classes, 256, classes)
              for split in ("train", "test")]
    return tasks.make(config, data=tuple(splits))


def compile_train_step(config, shape, batch: int, **overrides) -> dict[str, Any]:
    """The library's training step (``train.pipeline.make_train_step``: the task's loss,
    the gradient, the optimizer update of ``config.optimizer``, the state donated) of
    ``config``'s model with ``overrides``, compiled for ``batch`` synthetic images of
    ``shape`` without allocating a state: ``compiled``, ``compile`` (seconds),
    ``memory`` (``memory_analysis``), ``flops``, ``params`` (count), and ``init()``, which
    makes the initialized state and a batch to run it on."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iresnet_jax import distributions, models
    from iresnet_jax.train import optim, pipeline

    task = synthetic_task(config, shape)
    model = models.build(config.model, **task.model_fields, **overrides)
    tx = optim.make(config.optimizer, 1000)
    rng = np.random.default_rng(0)
    if config.task == "density":
        data = {"image": jnp.asarray(rng.integers(0, 256, (batch,) + tuple(shape)),
                                     jnp.float32)}
        x_init = distributions.dequantize(jax.random.key(0), data["image"][:8])
    else:
        data = {"image": jnp.asarray(rng.uniform(-0.5, 0.5, (batch,) + tuple(shape)),
                                     jnp.float32),
                "label": jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)}
        x_init = data["image"][:8]

    def create(x):
        return pipeline.create_state(config, model, x, tx)

    abstract = jax.eval_shape(create, x_init)
    step = jax.jit(pipeline.make_train_step(model, task), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(abstract, data).compile()
    return {"compiled": compiled, "compile": time.perf_counter() - t0,
            "memory": memory_analysis(compiled), "flops": xla_flops(compiled),
            "params": models.count_params(abstract.params),
            "init": lambda: (create(x_init), data)}


def run_train_step(step: dict[str, Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Times ``repeats`` steps of ``compile_train_step``'s program (each on the state the
    last returned): ``median``, ``min`` seconds and the last ``loss``."""
    import jax

    state, data = step["init"]()
    holder = {"state": state}

    def call():
        holder["state"], metrics = step["compiled"](holder["state"], data)
        return jax.block_until_ready(metrics)

    r = timed(call, repeats, warmup)
    return {"median": r["median"], "min": r["min"], "loss": float(r["output"]["loss"])}


# ------------------------------------------------------------------ machine and results

def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict[str, Any]:
    """The facts a result needs to be read: CPU model and count, load average, backend and
    device (where JAX is loaded), package versions, git commit (and whether tracked files
    had local changes), allocator settings."""
    facts: dict[str, Any] = {
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_available": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count()),
        "platform": platform.platform(), "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "versions": {p: v for p in VERSIONS if (v := _version(p))},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "allocator": {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}}
    if "jax" in sys.modules:
        import jax

        from iresnet_jax import tuning

        facts.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                     device_count=jax.device_count(), allocator=tuning.allocator_status())
    return facts


def _jsonable(value):
    if hasattr(value, "tolist"):   # numpy and JAX scalars and arrays
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def command(name: str, argv: list[str] | None = None) -> str:
    """The command line of ``python -m benchmarks.<name>`` with ``argv`` (default: this
    process's arguments)."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", f"benchmarks.{name}", shlex.join(argv)]).strip()


def write(name: str, results: dict, command: str, directory: str | None = None, *,
          echo: bool = True) -> str:
    """Writes ``<directory>/<name>.json`` (default ``benchmarks/results/``): ``results``,
    ``machine()``, the ``command`` line and the UTC time, indented with sorted keys;
    prints it (``echo``) and returns the path."""
    envelope = {"benchmark": name, "command": command, "machine": machine(),
                "results": results,
                "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC")}
    text = json.dumps(envelope, indent=1, sort_keys=True, default=_jsonable)
    directory = directory or RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        f.write(text + "\n")
    if echo:
        print(text, flush=True)
    return path


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by a script's docstring, with ``--results_dir``."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", default=RESULTS_DIR,
                   help="where the JSON goes (default: benchmarks/results)")
    return p


def setup(argv) -> None:
    """What a JAX benchmark's ``main`` calls first: ``tuning.setup()``, which on a CPU
    restarts the process with huge pages (only when run as a program, ``argv is None``)."""
    from iresnet_jax import tuning

    tuning.setup(relaunch=argv is None)
