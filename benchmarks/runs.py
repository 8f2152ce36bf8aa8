r"""The documented jobs, rerun exactly as the README and docs/ give them, with their results.

Each job runs its commands as subprocesses in a fresh work directory, with the
compilation cache off (so the seconds include compiling, as on a fresh machine), and
writes ``benchmarks/results/runs_<job>.json`` with each command, its wall seconds and
the JSON it wrote (``metrics.json``, ``evaluation.json``, ``compare.json``,
``summary.json``); the figures the docs show are copied to docs/figures/.

    python -m benchmarks.runs toy            # the main job (a few minutes)
    python -m benchmarks.runs toy_compare    # i-ResNet against Glow on three densities
    python -m benchmarks.runs digits         # the image models on digits, and evaluation
    python -m benchmarks.runs analyses       # the paper's analyses at quick settings
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common

FIGURES = os.path.join(common.ROOT, "docs", "figures")
DIGITS = ("digits_classifier", "digits_vanilla", "digits_batchnorm", "digits_density")


def _run(args: list[str], workdir: str) -> dict:
    """Runs ``python -m args...`` from the repository root; its command and seconds."""
    command = "python -m " + " ".join(args)
    print(f"$ {command}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args, "--compilation_cache_dir="],
                   cwd=common.ROOT, check=True)
    return {"command": command.replace(workdir, "WORKDIR"),
            "seconds": time.perf_counter() - t0}


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _figure(src: str, name: str) -> None:
    shutil.copyfile(src, os.path.join(FIGURES, name))


def toy(w: str) -> dict:
    out = _run(["experiments.toy_density", f"--workdir={w}/toy"], w)
    out["metrics"] = _json(f"{w}/toy/metrics.json")
    _figure(f"{w}/toy/{out['metrics']['figure']}", "toy_checkerboard_iresnet.png")
    return out


def toy_compare(w: str) -> dict:
    out = _run(["experiments.toy_compare", f"--workdir={w}/compare",
                "--config.num_steps=4000"], w)
    out["rows"] = _json(f"{w}/compare/compare.json")
    for row in out["rows"]:
        if row["dataset"] == "2spirals":
            name = "iresnet" if row["model"] == "toy_iresnet" else row["model"]
            _figure(f"{w}/compare/2spirals_{name}/{row['figure']}", f"toy_2spirals_{name}.png")
    return out


def digits(w: str) -> dict:
    out = {}
    for name in DIGITS:
        run = _run(["experiments.train", f"--config=experiments/configs/{name}.py",
                    f"--workdir={w}/{name}"], w)
        flags = ["--n_samples=4", "--max_passes=28"] if name.endswith("density") else []
        evaluation = _run(["experiments.evaluate", f"--workdir={w}/{name}", *flags], w)
        out[name] = {"train": run, "metrics": _json(f"{w}/{name}/metrics.json"),
                     "evaluate": evaluation,
                     "evaluation": _json(f"{w}/{name}/evaluation.json")}
    return out


def analyses(w: str) -> dict:
    out = _run(["experiments.analyses", f"--workdir={w}/analyses", "--quick"], w)
    out["summary"] = _json(f"{w}/analyses/summary.json")
    for name in ("singular_values", "reconstructions", "fixed_point_convergence",
                 "logdet_bias", "runtime", "samples"):
        _figure(f"{w}/analyses/{name}.png", f"analyses_{name}.png")
    return out


JOBS = {"toy": toy, "toy_compare": toy_compare, "digits": digits, "analyses": analyses}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("job", choices=sorted(JOBS))
    p.add_argument("--workdir", default="", help="where the runs go (default: a temporary "
                                                  "directory, removed afterwards)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="iresnet_runs_")
    try:
        results = JOBS[args.job](workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    common.write(f"runs_{args.job}", results, f"python -m benchmarks.runs {args.job}",
                 args.results_dir)


if __name__ == "__main__":
    main()
