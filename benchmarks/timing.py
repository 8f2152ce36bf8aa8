"""Timing helpers shared by the benchmark scripts (which print JSON; nothing is asserted)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import jax
import jax.numpy as jnp
import numpy as np

from iresnet_jax.train.state import TrainState


def _cpu_seconds() -> float | None:
    """User + kernel CPU seconds of this process so far (all threads), or ``None``."""
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_calls(call: Callable[[], Any], repeats: int):
    """``(seconds of each of repeats calls, last output, usage)``; ``usage`` holds the
    minor page faults (``page_faults``) and kernel CPU seconds (``system_seconds``) per
    call where ``resource`` exists, else nothing."""
    times, out = [], None
    usage0 = resource.getrusage(resource.RUSAGE_SELF) if resource else None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    usage = {}
    if usage0 is not None:
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        usage["page_faults"] = (usage1.ru_minflt - usage0.ru_minflt) / repeats
        usage["system_seconds"] = (usage1.ru_stime - usage0.ru_stime) / repeats
    return times, out, usage


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program, or ``None`` where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) if cost else None
    except Exception:  # cost analysis is optional on some backends
        return None


def compile_and_time(fn: Callable, *args, repeats: int = 15, warmup: int = 2,
                     donate: tuple[int, ...] = ()) -> dict[str, Any]:
    """Compiles ``jax.jit(fn)`` for ``args`` and times it.

    Returns ``compile`` (seconds for tracing + lowering + compilation) and its parts
    ``compile_lower`` (tracing and lowering to StableHLO, Python) and ``compile_xla``
    (XLA's passes and code generation), ``compile_cpu`` (the process's CPU seconds over
    the whole compile: XLA:CPU generates code on several threads, so this exceeds the
    wall time; it is also less sensitive than wall time to other load on the machine),
    ``median`` and ``min`` seconds per call over ``repeats`` calls after ``warmup``
    calls, XLA's ``flops`` estimate where available, and per timed call the process's
    minor page faults (``page_faults``) and kernel CPU seconds (``system_seconds``),
    which show what re-faulting freshly allocated buffers costs (``iresnet_jax.runtime``).
    """
    jitted = jax.jit(fn, donate_argnums=donate)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cpu1 = _cpu_seconds()
    compile_s = t2 - t0
    parts = {"compile_lower": t1 - t0, "compile_xla": t2 - t1}
    if cpu0 is not None:
        parts["compile_cpu"] = cpu1 - cpu0
    flops = xla_flops(compiled)
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times, out, usage = timed_calls(lambda: compiled(*args), repeats)
    return {"compile": compile_s, **parts, "median": statistics.median(times),
            "min": min(times), "flops": flops, "output": out, **usage}


def time_first_call(fn: Callable, *args, repeats: int = 15, warmup: int = 2
                    ) -> dict[str, Any]:
    """Times a Python function that calls compiled programs (for example
    ``train.staged.StagedDensityGrad``, which compiles its pieces on the first call).

    ``compile`` is the first call's seconds minus the median steady-state call: tracing,
    lowering and compiling every piece. ``median`` and ``min`` as ``compile_and_time``;
    ``flops`` is ``None`` (no single program to count); ``page_faults`` and
    ``system_seconds`` per timed call as ``compile_and_time``.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn(*args))
    times, out, usage = timed_calls(lambda: fn(*args), repeats)
    median = statistics.median(times)
    return {"compile": first - median, "first_call": first, "median": median,
            "min": min(times), "flops": None, "output": out, **usage}


def matmul_gflops(n: int = 1024, repeats: int = 10, dtype=jnp.float32,
                  precision=None) -> float:
    """Matmul rate of this machine (GFLOP/s) for an ``n x n x n`` product on random data
    through XLA (float32 at the default precision unless told otherwise)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    jax.block_until_ready(f(a, a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def init_train_state(model, x, tx, *, abstract: bool = False):
    """The ``TrainState`` of ``model`` initialized on ``x`` (keys 0, 1 for params and
    log-det probes, 2 for the run), jitted; ``abstract=True`` gives only its shapes."""
    def create(x):
        variables = dict(model.init({"params": jax.random.key(0),
                                     "logdet": jax.random.key(1)}, x))
        params = variables.pop("params")
        return TrainState.create(params=params, model_state=variables, tx=tx,
                                 rng=jax.random.key_data(jax.random.key(2)))

    if abstract:
        return jax.eval_shape(create, x)
    return jax.jit(create)(x)


def memory_analysis(compiled) -> dict:
    """XLA's memory analysis of a compiled function in GiB (``{}`` where the backend has
    none): ``temp_gib`` (scratch), ``total_gib`` (arguments + outputs + scratch - aliased),
    and every ``*_in_bytes`` field XLA reports, as ``*_gib``."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if m is None:
        return {}
    get = lambda f: getattr(m, f, 0) or 0  # noqa: E731
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.replace("_in_bytes", "_gib"): get(f) / 2 ** 30 for f in fields if hasattr(m, f)}
    total = (get("argument_size_in_bytes") + get("output_size_in_bytes")
             + get("temp_size_in_bytes") - get("alias_size_in_bytes"))
    out["temp_gib"] = get("temp_size_in_bytes") / 2 ** 30
    out["total_gib"] = total / 2 ** 30
    return out
