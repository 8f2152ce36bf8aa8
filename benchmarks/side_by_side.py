"""Ours and the official PyTorch i-ResNet, timed in interleaved rounds on one machine.

docs/reference.md's goals are fractions of the official code's time on the same machine,
and a machine's speed drifts between runs. For each key of ``benchmarks.anchor`` this
script builds our jitted function (``anchor.build``) and the official code's counterpart
(``benchmarks.reference_torch``, from a local checkout; the tolerance inverses against
its 20-iteration inverse, the Neumann-gradient step against its 5-term log-det step) and
times them in ``--rounds`` rounds of ``--calls`` calls of each, the order alternating
between rounds and each side's calls preceded by one untimed call, so that both see the
same machine in their steady state. The official code runs in a worker process
(``reference_torch --serve``, with glibc's default allocator) that waits while ours runs
and vice versa: the two libraries' thread pools slow each other down in one process.
Its inverses (thousands of small eager ops) are its least stable timings; compare them
over several runs.

Per key: both medians and minima, their ratio (ours / official), the goal and our
compile seconds; both libraries' matmul rates. Needs ``torch`` and the checkout (see
``benchmarks/reference_torch.py``)::

    python -m benchmarks.side_by_side --repo /path/to/invertible-resnet \
        --torch_python /path/to/torch-env/bin/python
    python -m benchmarks.side_by_side --repo ... --keys density.train_logdet,classifier.train

Writes ``benchmarks/results/side_by_side.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import jax

from benchmarks import anchor, common, reference_torch
from iresnet_jax import tuning


def main(argv=None) -> dict:
    common.setup(argv)
    parser = common.parser(__doc__)
    parser.add_argument("--repo", required=True,
                        help="a local checkout of github.com/jhjacobsen/invertible-resnet")
    parser.add_argument("--keys", default=",".join(anchor.KEYS),
                        help="comma-separated keys of benchmarks.anchor (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls of each per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--torch_python", default=sys.executable,
                        help="the Python interpreter that has torch (PyTorch is not a "
                             "dependency of this project: install it in its own "
                             "environment); default: this one")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    unknown = [k for k in keys if k not in anchor.KEYS]
    if unknown:
        parser.error(f"unknown keys {unknown}; known: {', '.join(anchor.KEYS)}")
    if args.torch_python == sys.executable:
        reference_torch.load_torch(parser, args.repo, args.threads)  # checks torch and repo
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in env.get("GLIBC_TUNABLES", "").split(":")
                                     if t and t != tuning.SETTING)
    worker = subprocess.Popen(
        [args.torch_python, "-m", "benchmarks.reference_torch", "--repo", args.repo,
         "--threads", str(args.threads), "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
    info = json.loads(worker.stdout.readline())

    def official(key: str, n: int) -> list[float]:
        worker.stdin.write(f"{common.reference_key(key)} {n}\n")
        return json.loads(worker.stdout.readline())

    results: dict = {"rounds": args.rounds, "calls_per_round": args.calls,
                     "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
                     "matmul_gflops_xla": common.matmul_gflops(),
                     "matmul_gflops_torch": info.pop("matmul_gflops"),
                     "reference_glibc_tunables": env["GLIBC_TUNABLES"]}
    results.update({f"reference.{k}": v for k, v in info.items()})
    for key in keys:
        fn, fargs, _ = anchor.build(key)
        t0 = time.perf_counter()
        ours = jax.jit(fn).lower(*fargs).compile()
        compile_s = time.perf_counter() - t0
        official(key, 1)   # warm-up
        times: dict = {"ours": [], "reference": []}
        for r in range(args.rounds):
            for side in (("ours", "reference") if r % 2 == 0 else ("reference", "ours")):
                # One untimed call after each switch: the first call after the other
                # library ran finds cold caches.
                if side == "reference":
                    official(key, 1)
                    times[side] += official(key, args.calls)
                else:
                    times[side] += common.timed(
                        lambda: jax.block_until_ready(ours(*fargs)), args.calls,
                        warmup=1)["times"]
        entry = {"reference_key": common.reference_key(key), "compile": compile_s}
        for side, ts in times.items():
            entry[side], entry[f"{side}_min"] = statistics.median(ts), min(ts)
        entry["ratio"] = entry["ours"] / entry["reference"]
        goal_key = key.removesuffix("_plain").removesuffix("_anderson")
        if goal_key in anchor.GOALS:
            entry["goal"] = anchor.GOALS[goal_key]
        results[key] = entry
        print(f"{key}: ours {entry['ours']:.4f} s, official {entry['reference']:.4f} s, "
              f"ratio {entry['ratio']:.3f}", file=sys.stderr, flush=True)
    worker.stdin.close()
    worker.wait()
    common.write("side_by_side", results, common.command("side_by_side", argv),
                 args.results_dir)
    return results


if __name__ == "__main__":
    main()
