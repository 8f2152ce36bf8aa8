"""The paper's CIFAR-10 density model on this machine: compile time, step time, memory.

The model of ``experiments/configs/cifar10_density.py`` (initial squeeze, 3 scale-blocks
of 32 i-ResNet blocks, 512 filters, c = 0.9, 5 power iterations, the 5-term series with
one Gaussian probe, learned prior, per-block remat). The timed function is the library's
whole training step (``train.pipeline.make_train_step``: dequantization, bits/dim with
the log-det estimate, gradient, Adamax update, the state donated) on synthetic images:

* ``compile_seconds_by_blocks_per_scale``: compile seconds of the step at ``--batch``
  for ``--depths`` blocks per scale (identical blocks are one scanned body, so compile
  time should not grow with depth);
* ``step_seconds``: median seconds per step of the full model at ``--batch``;
* ``memory`` / ``memory_remat``: XLA's memory estimate of the step at ``--memory_batch``
  without and with per-block remat (compiled, not run).

    python -m benchmarks.density_model [--batch 2] [--memory_batch 64]

Writes ``benchmarks/results/density_model.json`` (``--tiny``: width 8 and at most 2
blocks per scale, a smoke test, written as ``density_model_tiny.json``).
"""

from __future__ import annotations

import sys

from benchmarks import common
from experiments.configs import cifar10_density

SHAPE = (32, 32, 3)


def main(argv=None) -> dict:
    common.setup(argv)
    parser = common.parser(__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--memory_batch", type=int, default=64)
    parser.add_argument("--depths", default="",
                        help="blocks per scale to compile (default 2,8,32; --tiny: 1,2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--tiny", action="store_true",
                        help="width 8, at most 2 blocks per scale (a smoke test)")
    args = parser.parse_args(argv)
    config = cifar10_density.get_config()
    tiny = dict(hidden=8) if args.tiny else {}
    depths = [int(d) for d in (args.depths or ("1,2" if args.tiny else "2,8,32")).split(",")]
    full = max(depths) if args.tiny else config.model.blocks_per_scale[0]
    results: dict = {"config": "cifar10_density", "batch": args.batch, "tiny": args.tiny,
                     "blocks_per_scale": full, "repeats": args.repeats}

    steps = {}
    for depth in sorted(set(depths) | {full}):
        steps[depth] = common.compile_train_step(config, SHAPE, args.batch,
                                                 blocks_per_scale=(depth,) * 3, **tiny)
        print(f"blocks per scale {depth}: compiled in {steps[depth]['compile']:.1f} s",
              file=sys.stderr, flush=True)
    results["compile_seconds_by_blocks_per_scale"] = {
        str(d): steps[d]["compile"] for d in depths}
    results["num_params"] = steps[full]["params"]
    r = common.run_train_step(steps[full], args.repeats)
    results.update(step_seconds=r["median"], step_seconds_min=r["min"], loss=r["loss"])
    print(f"step: {r['median']:.2f} s at batch {args.batch}", file=sys.stderr, flush=True)

    if not args.skip_memory:
        for remat in (False, True):
            step = common.compile_train_step(config, SHAPE, args.memory_batch, remat=remat,
                                             blocks_per_scale=(full,) * 3, **tiny)
            results["memory_remat" if remat else "memory"] = {
                **step["memory"], "compile_seconds": step["compile"]}
        results["memory_batch"] = args.memory_batch
    common.write("density_model_tiny" if args.tiny else "density_model", results,
                 common.command("density_model", argv), args.results_dir)
    return results


if __name__ == "__main__":
    main()
