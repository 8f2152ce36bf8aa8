"""Training steps as one process and as N processes of one data-parallel run.

The same global batch, once in one process (all CPUs, one device) and once split over N
processes joined by ``jax.distributed`` (the launcher of ``--config.processes``: each
process pinned to its share of the CPUs, gradients all-reduced by JAX's collectives,
gloo on CPUs). Steps: the main job's (``toy.train``, batch 250) and the anchor's
training steps (``benchmarks.anchor``: ``classifier.train``, ``density.train_logdet``,
batch 64). Seconds per step are medians of ``--repeats`` calls after a warm-up.

    python -m benchmarks.processes [--processes 2] [--only toy.train]

Writes ``benchmarks/results/processes.json``: per key ``<key>.one`` and
``<key>.processes`` (seconds per step) and ``<key>.ratio`` (N processes over one).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax

from benchmarks import anchor, common
from iresnet_jax import tuning
from iresnet_jax.train import distributed, parallel, pipeline

KEYS = ("toy.train", "classifier.train", "density.train_logdet")
OUT = "IRESNET_JAX_BENCHMARK_OUT"


def _step(key: str):
    """``(fn, args)``: global-batch arguments, the batch leading every array but params."""
    if key == "toy.train":
        from experiments.configs import toy_default

        r = pipeline.setup(toy_default.get_config())
        return (pipeline.make_train_step(r.model, r.task),
                (r.state, r.task.train_batch(0)), (False, True))
    fn, args, _ = anchor.build(key)
    return fn, args, (False, False) + (True,) * (len(args) - 2)


def measure(keys, repeats: int) -> dict[str, float]:
    """Seconds per step of each key on the mesh of all devices of all processes."""
    mesh = parallel.make_mesh()
    results = {}
    for key in keys:
        fn, args, batched = _step(key)
        placed = [parallel.shard_batch(a, mesh) if b else parallel.replicate(a, mesh)
                  for a, b in zip(args, batched)]
        f = jax.jit(fn)
        r = common.timed(lambda: jax.block_until_ready(f(*placed)), repeats, warmup=2)
        results[key] = r["median"]
        if jax.process_index() == 0:
            print(f"{key}: {r['median']:.4f} s per step on {mesh.size} device(s) in "
                  f"{jax.process_count()} process(es)", file=sys.stderr, flush=True)
    return results


def main(argv=None) -> dict | None:
    parser = common.parser(__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {KEYS}")
    args = parser.parse_args(argv)
    keys = [k for k in KEYS if not args.only or k in args.only.split(",")]
    if distributed.launched():   # one of the N processes
        distributed.initialize()
        tuning.setup(relaunch=False)
        results = measure(keys, args.repeats)
        if jax.process_index() == 0:
            with open(os.environ[OUT], "w") as f:
                json.dump(results, f)
        return None
    common.setup(argv)
    results = {"processes": args.processes, "repeats": args.repeats,
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    one = measure(keys, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[OUT] = os.path.join(tmp, "out.json")
        code = distributed.launch(args.processes, [sys.executable, "-m",
                                                   "benchmarks.processes", *(argv or
                                                                           sys.argv[1:])])
        if code:
            raise SystemExit(f"the {args.processes} processes failed ({code})")
        with open(os.environ.pop(OUT)) as f:
            several = json.load(f)
    for key in keys:
        results[f"{key}.one"] = one[key]
        results[f"{key}.processes"] = several[key]
        results[f"{key}.ratio"] = several[key] / one[key]
    common.write("processes", results, common.command("processes", argv), args.results_dir)
    return results


if __name__ == "__main__":
    main()
