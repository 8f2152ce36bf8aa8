r"""How fast could a step be if every convolution and dot ran as this machine's best GEMM?

A FLOP rate against a large square matmul says little about a model whose products are
thin: the ANCHORS.md density model's convolutions contract over 36-288 values into 4-32
channels, and their kernel gradients contract over 12,544 values into 36 x 32 matrices.
This script gives the step's own ceiling. It compiles one ``benchmarks.ab`` key, reads
every ``convolution`` and ``dot`` of XLA's optimized HLO, and writes each as the matrix
product with the same FLOPs (``M x K`` times ``K x N``: for a convolution ``K`` is its
window times its input features, ``N`` its output features, ``M`` the rest of its
output). It then times each distinct product as a plain jitted ``jnp.matmul`` of row-major
operands, in both orientations (``C`` and ``C^T``), keeps the faster, and subtracts the
time of a jitted call that does nothing (dispatch). The ceiling is
the step's FLOPs over the sum of those best times: what the step would reach if every
product ran like an isolated, ideally laid-out GEMM of its shape and everything else
(elementwise work, transposes, patches, power iterations, scheduling) were free.

    python -m benchmarks.gemm_ceiling --key density.train_logdet

prints one JSON object: XLA's FLOP count of the step, the FLOPs the products found cover,
the step's median seconds and FLOP rate, the ceiling's seconds and rate, the float32
1024x1024 matmul rate measured in the same run, and both rates as fractions of it, with
the products grouped by shape (count, FLOPs, best seconds per call, rate). Products inside
loops are counted once, as XLA's cost analysis counts them. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import ab
from benchmarks.timing import matmul_gflops, timed_calls, xla_flops
from iresnet_jax import runtime

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)$")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _field(rest: str, name: str) -> str | None:
    m = re.search(name + r"=\{?([^},]*(?:,[^},]*)*)\}?", rest)
    return m.group(1) if m else None


def products(hlo_text: str) -> list[tuple[int, int, int, int]]:
    """``(batch, M, K, N)`` of every ``dot`` and ``convolution`` in ``hlo_text``."""
    shapes, found = {}, []
    lines = hlo_text.splitlines()
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(3))
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m or m.group(4) not in ("dot", "convolution"):
            continue
        out, op, rest = _dims(m.group(3)), m.group(4), m.group(5)
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        if len(operands) < 2 or operands[0] not in shapes or operands[1] not in shapes:
            raise ValueError(f"cannot read the operands of: {line.strip()[:200]}")
        lhs, rhs = shapes[operands[0]], shapes[operands[1]]
        if op == "dot":
            lc = _dims(_field(rest, "lhs_contracting_dims") or "")
            lb = _dims(_field(rest, "lhs_batch_dims") or "")
            rb = _dims(_field(rest, "rhs_batch_dims") or "")
            rc = _dims(_field(rest, "rhs_contracting_dims") or "")
            batch = math.prod(lhs[d] for d in lb)
            k = math.prod(lhs[d] for d in lc)
            m_ = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
            n = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
            found.append((batch, m_, k, n))
            continue
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
        window = re.search(r"window=\{size=([\dx]+)", rest)
        if not labels:
            raise ValueError(f"convolution without dim_labels: {line.strip()[:200]}")
        for name in ("feature_group_count", "batch_group_count"):
            g = re.search(name + r"=(\d+)", rest)
            if g and int(g.group(1)) != 1:
                raise ValueError(f"grouped convolution not handled: {line.strip()[:200]}")
        lhs_l, rhs_l, out_l = labels.groups()
        taps = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
        k = taps * rhs[rhs_l.index("i")]
        n = out[out_l.index("f")]
        found.append((1, math.prod(out) // n, k, n))
    return found


def _median_call(fn, args, calls: int) -> float:
    """Median seconds of ``calls`` calls of ``jax.jit(fn)`` after one warm-up call."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return statistics.median(timed_calls(lambda: compiled(*args), calls)[0])


def _best_seconds(batch: int, m: int, k: int, n: int, calls: int,
                  dispatch: float) -> float:
    """Median seconds of the faster orientation of a row-major ``[M, K] @ [K, N]``, less
    ``dispatch`` (the time of a call that does nothing; at least a tenth is kept)."""
    rng = np.random.default_rng(0)
    best = math.inf
    for rows, cols in ((m, n), (n, m)):
        a = jnp.asarray(rng.normal(size=(batch, rows, k)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(batch, k, cols)), jnp.float32)
        s = _median_call(jnp.matmul, (a, b), calls)
        best = min(best, max(s - dispatch, 0.1 * s))
    return best


def ceiling(key: str, *, calls: int = 20, step_calls: int = 10, min_flops: float = 0.0,
            overrides: dict | None = None, preset: str | None = None, batch: int = 64,
            shape: tuple[int, ...] = (28, 28, 1)) -> dict:
    """The JSON object described in the module docstring, for ``benchmarks.ab`` key (the
    ANCHORS.md models unless ``preset`` / ``overrides`` / ``batch`` / ``shape`` say
    otherwise, as in ``benchmarks.ab.build``)."""
    fn, args = ab.build(key, overrides or {}, preset, batch, shape)
    compiled = jax.jit(fn).lower(*args).compile()
    step_flops = xla_flops(compiled)
    if not step_flops:
        raise ValueError(f"XLA gives no FLOP count for {key!r} on this backend")
    counts = collections.Counter(products(compiled.as_text()))
    jax.block_until_ready(compiled(*args))
    step_s = statistics.median(timed_calls(lambda: compiled(*args), step_calls)[0])
    matmul = matmul_gflops()
    # What a jitted call costs when it does nothing (dispatch and synchronization).
    tiny = jnp.zeros((2, 2), jnp.float32)
    dispatch = _median_call(lambda a, b: a[0, 0] + b[0, 0], (tiny, tiny), 5 * calls)
    groups, covered, ideal = [], 0.0, 0.0
    for (batch, m, k, n), count in sorted(counts.items(), key=lambda kv: -kv[1] * math.prod(
            kv[0])):
        flops = 2.0 * batch * m * k * n
        if flops < min_flops:
            continue
        s = _best_seconds(batch, m, k, n, calls, dispatch)
        covered += count * flops
        ideal += count * s
        groups.append({"batch": batch, "m": m, "k": k, "n": n, "count": count,
                       "gflop_each": flops / 1e9, "best_seconds": s,
                       "gflops": flops / s / 1e9})
    matmul = max(matmul, matmul_gflops())
    step_rate = step_flops / step_s / 1e9
    ceiling_rate = covered / ideal / 1e9 if ideal else float("nan")
    return {
        "key": key, "xla_flops": step_flops, "product_flops": covered,
        "product_share_of_xla_flops": covered / step_flops,
        "step_seconds": step_s, "step_gflops": step_rate,
        "ceiling_seconds": ideal, "ceiling_gflops": ceiling_rate,
        "matmul_gflops": matmul, "dispatch_seconds": dispatch,
        "step_fraction_of_matmul_rate": step_rate / matmul,
        "ceiling_fraction_of_matmul_rate": ceiling_rate / matmul,
        "step_fraction_of_ceiling": ideal / step_s * step_flops / covered,
        "products": groups,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--key", default="density.train_logdet", choices=ab.KEYS)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per product shape")
    parser.add_argument("--step_calls", type=int, default=10)
    parser.add_argument("--min_flops", type=float, default=0.0,
                        help="leave out products of fewer FLOPs (e.g. 1e6)")
    args = parser.parse_args(argv)
    if argv is None:
        runtime.relaunch_with_hugepages()
    result = ceiling(args.key, calls=args.calls, step_calls=args.step_calls,
                     min_flops=args.min_flops)
    result["allocator"] = runtime.status()
    print(json.dumps(result, indent=1))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
