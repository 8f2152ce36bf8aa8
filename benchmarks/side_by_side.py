"""Ours and the official PyTorch i-ResNet, timed side by side in one process.

ANCHORS.md's goals are fractions of the reference's time "on the same machine, same
shapes, timed in the same run", and this machine's speed drifts by 10-20% between runs.
This script builds, for each ANCHORS.md key, our jitted function (as ``benchmarks.ab``
builds it, from the ``anchors_*`` presets) and the official code's (as
``benchmarks.reference_torch`` builds it, from a local checkout) and times them in
interleaved rounds (``--rounds`` rounds of ``--calls`` calls of each, the order
alternating between rounds, each side's calls preceded by one untimed call), so that both
see the same machine and each is timed in its steady state. The reference runs in a
worker process (``reference_torch --serve``) that waits while ours runs and vice versa:
in one process, XLA's and PyTorch's thread pools got in each other's way (the
reference's 20-iteration inverses ran 2.5 times slower than alone). The reference's
inverses (thousands of small eager ops) are its least stable timings on a 2-core machine:
on 2026-11-29 its 20-iteration density inverse took 0.55-1.5 s between runs, alone or
interleaved; compare them over several runs and take the reference's fastest for a
conservative ratio. It prints one JSON object
with, per key, both medians and mins, their ratio (ours / reference) and the ANCHORS.md
goal; our compile seconds; both libraries' matmul rates.

Pairs as in ANCHORS.md: the tolerance inverses (plain iteration, benchmarks.anchor's
relative step test) against the reference's 20-iteration inverse, the Neumann-gradient
step against its 5-term log-det step.

    python -m benchmarks.side_by_side --repo /path/to/invertible-resnet
    python -m benchmarks.side_by_side --repo ... --keys density.train_logdet,classifier.train

Needs ``torch`` and the checkout (see ``benchmarks/reference_torch.py`` for the fixes the
checkout needs). Both libraries use 2 threads here; they run one after the other, never
at once. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax

from benchmarks import ab
from benchmarks import anchor
from benchmarks import reference_torch
from benchmarks import report
from benchmarks.timing import matmul_gflops
from iresnet_jax import runtime


def _their_key(key: str) -> str:
    if key.endswith("inverse_tol"):
        return key.replace("inverse_tol", "inverse20")
    if key.endswith("neumann"):
        return "density.train_logdet"
    return key


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True,
                        help="a local checkout of github.com/jhjacobsen/invertible-resnet")
    parser.add_argument("--keys", default=",".join(ab.KEYS),
                        help="comma-separated keys (default: all of " + ", ".join(ab.KEYS) + ")")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls of each per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ab.KEYS]
    if unknown:
        parser.error(f"unknown keys {unknown}; known: {ab.KEYS}")
    reference_torch.load_torch(parser, args.repo, args.threads)   # checks torch and repo
    if argv is None:
        runtime.relaunch_with_hugepages()
    # The reference runs in a worker process, one side at a time: in one process, the two
    # libraries' thread pools slowed the reference's small-op inverses 2.5-fold.
    # It runs with glibc's default allocator, as ANCHORS.md's reference did (not with the
    # huge-page setting this process inherited from its relaunch).
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                if t and t != runtime.SETTING]
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    worker = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.reference_torch", "--repo", args.repo,
         "--threads", str(args.threads), "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
    info = json.loads(worker.stdout.readline())

    def reference_calls(key: str, n: int) -> list[float]:
        worker.stdin.write(f"{key} {n}\n")
        return json.loads(worker.stdout.readline())

    results: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                     "jax": jax.__version__, "rounds": args.rounds,
                     "calls_per_round": args.calls, "allocator": runtime.status(),
                     "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
                     "matmul_gflops_xla": matmul_gflops(),
                     "matmul_gflops_torch": info.pop("matmul_gflops")}
    results.update({f"reference.{k}": v for k, v in info.items()})
    results["reference.glibc_tunables"] = env["GLIBC_TUNABLES"]
    for key in keys:
        fn, fargs = ab.build(key, {}, None, anchor.BATCH, anchor.SHAPE)
        t0 = time.perf_counter()
        ours = jax.jit(fn).lower(*fargs).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(ours(*fargs))
        reference_calls(_their_key(key), 1)   # warm-up
        times: dict = {"ours": [], "reference": []}
        for r in range(args.rounds):
            order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
            for side in order:
                # One untimed call after each switch, for both sides: the first call after
                # the other library ran found cold caches and re-faulted buffers (our
                # 11 ms density forward had a median of 19 ms over min 11 ms without it).
                if side == "reference":
                    reference_calls(_their_key(key), 1)
                    times[side] += reference_calls(_their_key(key), args.calls)
                    continue
                jax.block_until_ready(ours(*fargs))
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    jax.block_until_ready(ours(*fargs))
                    times[side].append(time.perf_counter() - t0)
        entry = {"ours": statistics.median(times["ours"]), "ours_min": min(times["ours"]),
                 "reference": statistics.median(times["reference"]),
                 "reference_min": min(times["reference"]),
                 "reference_key": _their_key(key), "compile": compile_s}
        entry["ratio"] = entry["ours"] / entry["reference"]
        if key in anchor.GOALS:
            entry["goal"] = anchor.GOALS[key]
        results[key] = entry
        print(f"{key}: ours {entry['ours']:.4f} s, reference {entry['reference']:.4f} s, "
              f"ratio {entry['ratio']:.3f}" + (f" (goal {entry['goal']})" if "goal" in entry
                                               else ""), file=sys.stderr, flush=True)
    worker.stdin.close()
    worker.wait()
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report.emit(results, args.output)
    return results


if __name__ == "__main__":
    main()
