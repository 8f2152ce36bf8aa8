"""Training and evaluation of the image models on tiny configurations of digits.

One train step, a checkpoint and a resume per task; the train step is traced once; 8
simulated CPU devices give the same loss as 1; the bits/dim protocol picks the number of
series terms that its bias bound requires; the binaries take the estimator settings from
the command line.
"""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from experiments.configs import digits_classifier, digits_density
from iresnet_jax import lipschitz, logdet, train
from iresnet_jax.train import evaluation, parallel, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {
    "classification": dict(stages=(1, 1, 1), hidden=4),
    "density": dict(blocks_per_scale=(1, 1, 1), hidden=4),
}


def _config(task, **overrides):
    c = (digits_density if task == "density" else digits_classifier).get_config()
    c.model.update(TINY[task])
    if task == "density":
        c.model.logdet.n_terms = 2
    c.batch_size = 16
    c.eval_batch_size = 120
    c.init_batch_size = 64
    c.log_every = 1
    c.checkpoint_every = 1
    c.update(overrides)
    return c


@pytest.fixture(scope="module", params=["classification", "density"])
def trained(request, tmp_path_factory):
    """A tiny model trained for 1 step, then resumed for a 2nd (checkpoint at each)."""
    task = request.param
    workdir = str(tmp_path_factory.mktemp(task))
    lines = []
    first = train.train_and_evaluate(_config(task, num_steps=1), workdir,
                                     print_fn=lines.append)
    second = train.train_and_evaluate(_config(task, num_steps=2), workdir,
                                      print_fn=lines.append)
    return task, workdir, first, second, lines


def test_train_checkpoint_and_resume(trained):
    task, workdir, first, second, lines = trained
    assert first["final"]["step"] == 1 and first["steps_this_run"] == 1
    assert any("resumed from checkpoint at step 1" in line for line in lines)
    assert second["final"]["step"] == 2 and second["steps_this_run"] == 1
    metric = "test_accuracy" if task == "classification" else "test_bits_per_dim"
    assert second["metric"] == metric and np.isfinite(second["final"][metric])
    with open(f"{workdir}/metrics.json") as f:
        written = json.load(f)
    assert written["final"]["step"] == 2 and written["processes"] == 1
    with open(f"{workdir}/metrics.jsonl") as f:
        assert any("train/loss" in line for line in f)


def test_evaluate_workdir(trained):
    task, workdir, _, second, _ = trained
    if task == "classification":
        out = evaluation.evaluate_workdir(workdir, print_fn=lambda s: None)
        assert out["test_accuracy"] == pytest.approx(second["final"]["test_accuracy"])
        return
    out = evaluation.evaluate_workdir(workdir, bias_tol=0.05, se_tol=1.0, max_passes=3,
                                      print_fn=lambda s: None)
    assert out["bias_bound"] <= 0.05 and out["passes"] == 2 and out["se_target_met"]
    assert np.isfinite(out["test_bits_per_dim"]) and out["standard_error"] < 1.0
    # The chosen number of terms is the smallest whose bound meets the tolerance.
    lips = np.array(out["block_lipschitz"])
    assert np.all(lips < 1)
    r = train.restore(workdir)
    bounds = evaluation.block_lipschitz_bounds(r.variables["params"],
                                               r.variables["spectral"], coeff=0.9)
    nats = 0.05 * 64 * np.log(2)
    n = out["n_terms"]
    assert evaluation.model_bias_bound(bounds, n) <= nats
    assert n == 1 or evaluation.model_bias_bound(bounds, n - 1) > nats


def test_terms_for_model_bias_matches_bias_bound():
    bounds = [evaluation.BlockBound(f"b{i}", lip, dim, (), ())
              for i, (lip, dim) in enumerate([(0.7, 196), (0.73, 196), (0.5, 98)])]
    for tol in (1e-1, 1e-3, 1e-6):
        n = evaluation.terms_for_model_bias(bounds, tol)
        total = lambda k: sum(logdet.bias_bound(b.lipschitz, b.dim, k) for b in bounds)
        assert total(n) <= tol < total(n - 1)
    with pytest.raises(ValueError, match=">= 1"):
        evaluation.terms_for_model_bias(bounds + [evaluation.BlockBound("x", 1.2, 4, (), ())],
                                        1e-3)


def test_conv_operator_norms():
    from iresnet_jax import conv

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 3))
    dense, how = lipschitz.conv_operator_norm(kernel, (5, 4), bound="dense")
    exact = float(np.linalg.norm(np.asarray(conv.conv_dense_matrix(kernel, (5, 4))), 2))
    assert how == "dense" and dense == pytest.approx(exact, rel=1e-6)
    power, how = lipschitz.conv_operator_norm(kernel, (5, 4), bound="power")
    assert how == "power" and power == pytest.approx(dense, rel=1e-4)
    circular, _ = lipschitz.conv_operator_norm(kernel, (5, 4), bound="circular")
    assert circular >= dense * (1 - 1e-9)        # a certified upper bound
    one, how = lipschitz.conv_operator_norm(kernel[1:2, 1:2], (5, 4))
    assert how == "exact-1x1" and one == pytest.approx(np.linalg.norm(kernel[1, 1], 2))


def test_eight_devices_give_the_same_loss_as_one_and_one_trace():
    """Three density steps (dequantization noise, Hutchinson probes, spectral updates) on
    one device and on eight; the 1-device step is guarded to be traced only once."""
    assert jax.device_count() == 8   # tests/conftest.py sets the XLA flag
    r = train.setup(_config("density"))
    chex.clear_trace_counter()
    step = train.make_train_step(r.model, r.task)
    results = []
    for devices, fn in ((jax.devices()[:1], chex.assert_max_traces(step, n=1)),
                        (jax.devices(), step)):
        mesh = parallel.make_mesh(devices)
        jitted = jax.jit(fn, in_shardings=(parallel.replicated(mesh),
                                           parallel.batch_sharding(mesh)),
                         out_shardings=parallel.replicated(mesh))
        s = parallel.replicate(r.state, mesh)
        losses = []
        for i in range(3):
            s, metrics = jitted(s, parallel.shard_batch(r.task.train_batch(i), mesh))
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(s.params), int(s.step)))
    (loss1, params1, step1), (loss8, params8, step8) = results
    assert step1 == step8 == 3
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params1, params8)


def test_batch_size_must_divide_the_devices():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        parallel.check_batch_size(12, mesh)


def test_density_config_selects_the_training_estimator(tmp_path):
    """``config.model.logdet`` reaches the model unchanged (``mode="auto"``: the series
    from both ends when it can); the Neumann gradient trains; the bits/dim evaluation
    keeps the truncated series whatever trained."""
    task = train.setup(_config("density")).task
    expected = {(): ("series", "autodiff", "split"),
                (("gradient", "neumann"),): ("series", "neumann", "vjp"),
                (("method", "roulette"),): ("roulette", "autodiff", "vjp"),
                (("mode", "jvp"),): ("series", "autodiff", "jvp")}
    for overrides, want in expected.items():
        c = _config("density")
        c.model.logdet.update(dict(overrides))
        ld = pipeline.build_model(c, task).logdet
        assert (ld.method, ld.gradient, ld.mode) == want
    c = _config("density", num_steps=1)
    c.model.logdet.gradient = "neumann"
    result = train.train_and_evaluate(c, str(tmp_path / "neumann"), print_fn=lambda s: None)
    assert result["final"]["step"] == 1
    assert np.isfinite(result["final"]["test_bits_per_dim"])


def _binary(tmp_path, module, *flags):
    """Runs ``python -m module --workdir=... flags`` and returns its written config."""
    workdir = tmp_path / module.split(".")[-1]
    from conftest import FAST_COMPILE

    env = {**os.environ, "IRESNET_JAX_NO_RELAUNCH": "1",
           "XLA_FLAGS": FAST_COMPILE}   # one device, as a user's run
    done = subprocess.run([sys.executable, "-m", module, f"--workdir={workdir}", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "metrics.json").read_text())["final"]["step"] == 1
    return json.loads((workdir / "config.json").read_text())


def test_binaries_take_the_estimator_settings_from_the_command_line(tmp_path):
    toy = _binary(tmp_path, "experiments.toy_density", "--config.num_steps=1",
                  "--config.model.n_blocks=1", "--config.model.hidden=(4,)",
                  "--config.n_test=64", "--config.eval_batch_size=64",
                  "--config.grid_size=4", "--config.n_plot_samples=0",
                  "--config.model.logdet.method=roulette",
                  "--config.model.logdet.gradient=neumann")
    assert (toy["model"]["logdet"]["method"], toy["model"]["logdet"]["gradient"]) == (
        "roulette", "neumann")
    image = _binary(tmp_path, "experiments.train",
                    "--config=experiments/configs/digits_density.py", "--config.num_steps=1",
                    "--config.model.blocks_per_scale=(1,1,1)", "--config.model.hidden=4",
                    "--config.batch_size=16", "--config.init_batch_size=32",
                    "--config.eval_batch_size=360", "--config.model.logdet.method=roulette",
                    "--config.model.logdet.gradient=neumann",
                    "--config.model.inverse.method=anderson")
    assert (image["model"]["logdet"]["method"], image["model"]["logdet"]["gradient"]) == (
        "roulette", "neumann")
    assert image["model"]["inverse"]["method"] == "anderson"
