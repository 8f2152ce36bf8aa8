"""Times the official PyTorch i-ResNet at the reference configuration, on this machine.

docs/reference.md gives the official code's times as measured on another 2-core machine
(``benchmarks/reference.json``). To compare ratios from one machine, this script builds
the same two models from a local checkout of the official code
(github.com/jhjacobsen/invertible-resnet; not part of this project, and not downloaded by
it) and times them the way ``benchmarks.anchor`` times ours: ``density.forward``,
``density.train``, ``density.train_logdet``, ``density.inverse20``,
``classifier.forward``, ``classifier.train``, ``classifier.inverse20`` (medians of
``--repeats`` calls after ``--warmup``, with ``*.min``), the inverses' max reconstruction
errors, the parameter counts (checked against 51,680 and 214,650) and a float32
1024x1024 matmul rate through torch. ``python -m benchmarks.anchor --reference
benchmarks/results/reference_torch.json`` then reports our times as fractions of these.
This script does not import JAX.

Needs ``torch`` (not a dependency of this project; the reference times used 2.13, CPU
build) and the checkout::

    python -m benchmarks.reference_torch --repo /path/to/invertible-resnet

The checkout needs small fixes to run on current PyTorch and NumPy: ``matrix_utils.py``
imports ``zero_gradients`` from ``torch.autograd.gradcheck`` (removed in PyTorch 1.9;
only its exact-trace function uses it, so guard the import) and calls ``np.float``
(removed in NumPy 1.24; use ``float``). Older revisions of ``models/conv_iResNet.py`` also
pass a stray ``clipping`` argument in the multiscale model's ``_make_stack`` methods.

The models: density, ``multiscale_conv_iResNet((1, 28, 28), [4, 4, 4], [1, 2, 1],
[32, 32, 32], init_squeeze=True, coeff=0.9, density_estimation=True, numTraceSamples=1,
numSeriesTerms=5, n_power_iter=5, actnorm=True, learn_prior=True, nonlin="elu")``;
classifier, ``conv_iResNet((1, 28, 28), [4, 4, 4], [1, 2, 2], [32, 32, 32], init_ds=1,
inj_pad=3, coeff=0.9, nClasses=10, n_power_iter=5, actnorm=True, nonlin="elu")``.
Training steps are ``zero_grad`` + training forward (5 power iterations per spectrally
normalized conv) + loss + ``backward``, without the optimizer update; the evaluation
forward runs in ``eval()`` mode under ``no_grad`` without the log-det; the inverses run 20
fixed-point iterations per block. ``--serve`` is the worker mode of
``benchmarks.side_by_side``. Writes ``benchmarks/results/reference_torch.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import numpy as np

from benchmarks import common

BATCH = 64
N_BINS = 256
DIM = 28 * 28
PARAMS = {"density": 51_680, "classifier": 214_650}


def _matmul_gflops(torch, n: int = 1024, repeats: int = 10) -> float:
    a = torch.randn(n, n)
    return 2 * n ** 3 / common.timed(lambda: a @ a, repeats, warmup=1)["median"] / 1e9


def build(repo: str):
    """The two models of the reference configuration from the checkout at ``repo``."""
    sys.path.insert(0, os.path.abspath(repo))
    from models.conv_iResNet import conv_iResNet, multiscale_conv_iResNet
    density = multiscale_conv_iResNet(
        (1, 28, 28), [4, 4, 4], [1, 2, 1], [32, 32, 32], init_squeeze=True, coeff=0.9,
        density_estimation=True, numTraceSamples=1, numSeriesTerms=5, n_power_iter=5,
        actnorm=True, learn_prior=True, nonlin="elu")
    classifier = conv_iResNet(
        (1, 28, 28), [4, 4, 4], [1, 2, 2], [32, 32, 32], init_ds=1, inj_pad=3, coeff=0.9,
        density_estimation=False, nClasses=10, numTraceSamples=0, numSeriesTerms=0,
        n_power_iter=5, actnorm=True, nonlin="elu")
    return density, classifier


def inputs(torch):
    """Batch-64 MNIST-shaped inputs: dequantized pixels in [0, 1) and labels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, N_BINS, (BATCH, 1, 28, 28)).astype(np.float32)
    x = torch.from_numpy((pixels + rng.uniform(size=pixels.shape).astype(np.float32))
                         / N_BINS)
    labels = torch.from_numpy(rng.integers(0, 10, (BATCH,)).astype(np.int64))
    return x, labels


def functions(repo: str, torch) -> tuple[dict, dict]:
    """``({key: zero-argument callable}, info)`` for the keys of ``benchmarks.anchor``
    that the official code has, on the models of
    the checkout at ``repo``; ``info`` has the parameter counts and, per inverse, a
    callable returning its max reconstruction error."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x, labels = inputs(torch)
    density, classifier = build(repo)
    info: dict = {}
    for name, model in (("density", density), ("classifier", classifier)):
        n = sum(p.numel() for p in model.parameters())
        info[f"{name}.params"] = n
        if n != PARAMS[name]:
            print(f"warning: the {name} model has {n:,} parameters, the reference's has "
                  f"{PARAMS[name]:,}", file=sys.stderr)
    bits = DIM * math.log(2.0)

    def density_step(ignore_logdet):
        def step():
            density.train()
            density.zero_grad(set_to_none=True)
            _, logpz, trace = density(x, ignore_logdet=ignore_logdet)
            loss = -(logpz + trace).mean() / bits + math.log2(N_BINS)
            loss.backward()
        return step

    def evaluate(model, call):
        def forward():
            model.eval()
            with torch.no_grad():
                return call()
        return forward

    def classifier_step():
        classifier.train()
        classifier.zero_grad(set_to_none=True)
        logits, _ = classifier(x)
        F.cross_entropy(logits, labels).backward()

    # ActNorm initializes from its first batch (here in an evaluation forward). The
    # inverses start from latents computed at their first call, i.e. after the keys timed
    # before them: the official code's inverse times depend on the process's history (the
    # density model's varied about 3-fold within one process), and this order gave its
    # fastest ones.
    evaluate(density, lambda: density(x, ignore_logdet=True)[0])()
    evaluate(classifier, lambda: classifier(x)[0])()
    latents: dict = {}

    def inverse(name, model, call):
        def run():
            if name not in latents:
                latents[name] = evaluate(model, call)()
            return model.inverse(latents[name], max_iter=20)
        return run

    fns = {
        "density.forward": evaluate(density, lambda: density(x, ignore_logdet=True)[0]),
        "density.train": density_step(True),
        "density.train_logdet": density_step(False),
        "density.inverse20": inverse("density", density,
                                     lambda: density(x, ignore_logdet=True)[0]),
        "classifier.forward": evaluate(classifier, lambda: classifier(x)[0]),
        "classifier.train": classifier_step,
        "classifier.inverse20": inverse("classifier", classifier,
                                        lambda: classifier(x)[1]),
    }
    info["density.inverse20.recon_error"] = lambda: float(
        (fns["density.inverse20"]() - x).abs().max())
    info["classifier.inverse20.recon_error"] = lambda: float(
        (fns["classifier.inverse20"]() - x).abs().max())
    return fns, info


def main(argv=None) -> dict:
    parser = common.parser(__doc__)
    parser.add_argument("--repo", required=True,
                        help="a local checkout of github.com/jhjacobsen/invertible-resnet")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve", action="store_true",
                        help="worker mode for benchmarks.side_by_side: read lines 'KEY N' "
                             "on stdin, answer each with a JSON list of N call times")
    args = parser.parse_args(argv)
    torch = load_torch(parser, args.repo, args.threads)
    if args.serve:
        return serve(args.repo, torch)
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "batch": BATCH, "repeats": args.repeats, "warmup": args.warmup,
                     "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
                     "matmul_gflops": _matmul_gflops(torch)}
    fns, info = functions(args.repo, torch)
    for key, fn in fns.items():
        r = common.timed(fn, args.repeats, args.warmup)
        results[key], results[f"{key}.min"] = r["median"], r["min"]
        print(f"{key}: {r['median']:.4f} s (min {r['min']:.4f})", file=sys.stderr)
    for key, value in info.items():
        results[key] = value() if callable(value) else value
    common.write("reference_torch", results, common.command("reference_torch", argv),
                 args.results_dir)
    return results


def serve(repo: str, torch) -> dict:
    """Worker loop: a JSON line with the info first, then for each stdin line ``KEY N``
    one JSON line with the seconds of ``N`` calls of ``KEY``."""
    with contextlib.redirect_stdout(sys.stderr):   # the official code prints as it builds
        fns, info = functions(repo, torch)
        info = {k: (v() if callable(v) else v) for k, v in info.items()}
    print(json.dumps({**info, "matmul_gflops": _matmul_gflops(torch)}), flush=True)
    for line in sys.stdin:
        key, n = line.split()
        print(json.dumps(common.timed(fns[key], int(n))["times"]), flush=True)
    return info


def load_torch(parser, repo: str, threads: int):
    """``torch`` with ``threads`` threads, after checking the checkout (parser errors)."""
    if not os.path.isfile(os.path.join(repo, "models", "conv_iResNet.py")):
        parser.error(f"--repo {repo!r} has no models/conv_iResNet.py: pass a checkout "
                     "of github.com/jhjacobsen/invertible-resnet")
    try:
        import torch
    except ImportError:
        parser.error("this needs torch (pip install torch); it is not a dependency of "
                     "iresnet-jax")
    torch.set_num_threads(threads)
    return torch


if __name__ == "__main__":
    main()
