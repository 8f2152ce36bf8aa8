"""Training and evaluation of the image models on tiny configurations of digits.

One train step, a checkpoint and a resume per task; the train step is traced once; 8
simulated CPU devices give the same loss as 1; the bits/dim protocol picks the number of
series terms that its bias bound requires.
"""

import json

import chex
import jax
import numpy as np
import pytest

from experiments.configs import digits_classifier, digits_density
from iresnet_jax import data, lipschitz, logdet
from iresnet_jax.train import evaluation, experiment, parallel, steps

TINY = {
    "classification": dict(stages=(1, 1, 1), hidden=4),
    "density": dict(blocks_per_scale=(1, 1, 1), hidden=4, n_terms=2),
}


def _config(task, **overrides):
    c = (digits_density if task == "density" else digits_classifier).get_config()
    c.model.update(TINY[task])
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
    first = experiment.train_and_evaluate(_config(task, num_steps=1), workdir,
                                          print_fn=lines.append)
    second = experiment.train_and_evaluate(_config(task, num_steps=2), workdir,
                                           print_fn=lines.append)
    return task, workdir, first, second, lines


def test_train_checkpoint_and_resume(trained):
    task, workdir, first, second, lines = trained
    assert first["final_step"] == 1 and first["steps_this_run"] == 1
    assert any("resumed from checkpoint at step 1" in line for line in lines)
    assert second["final_step"] == 2 and second["steps_this_run"] == 1
    metric = "accuracy" if task == "classification" else "bits_per_dim"
    assert np.isfinite(second["eval"][metric])
    with open(f"{workdir}/summary.json") as f:
        assert json.load(f)["final_step"] == 2
    with open(f"{workdir}/metrics.jsonl") as f:
        assert any("train/loss" in line for line in f)


def test_evaluate_workdir(trained):
    task, workdir, _, second, _ = trained
    if task == "classification":
        out = evaluation.evaluate_workdir(workdir, print_fn=lambda s: None)
        assert out["accuracy"] == pytest.approx(second["eval"]["accuracy"])
        return
    out = evaluation.evaluate_workdir(workdir, bias_tol=0.05, se_tol=1.0, max_passes=3,
                                      print_fn=lambda s: None)
    assert out["bias_bound"] <= 0.05 and out["passes"] == 2 and out["se_target_met"]
    assert np.isfinite(out["bits_per_dim"]) and out["standard_error"] < 1.0
    # The chosen number of terms is the smallest whose bound meets the tolerance.
    lips = np.array(out["block_lipschitz"])
    assert np.all(lips < 1)
    r = evaluation.restore(workdir)
    bounds = evaluation.block_lipschitz_bounds(r["params"], r["model_state"]["spectral"],
                                               coeff=0.9)
    nats = 0.05 * 64 * np.log(2)
    n = out["n_terms"]
    assert evaluation.model_bias_bound(bounds, n) <= nats
    assert n == 1 or evaluation.model_bias_bound(bounds, n - 1) > nats


def test_inverse_bound_reads_a_trained_workdir(trained):
    from benchmarks import inverse_bound
    _, workdir, _, _, _ = trained
    r = inverse_bound.run_trained(workdir, batch=2, k_max=30)
    (entry,) = r["models"].values()
    assert entry["step"] == 2 and len(entry["blocks"]) == 3
    for row in entry["blocks"]:   # each conv normalized to <= 0.9, ELU 1-Lipschitz
        assert 0 < row["sigma_max"] <= 0.9 ** 3 + 1e-5
        assert row["krylov_iterations"] <= row["plain_iterations"] <= 30
        assert row["measured_iterations"] >= 1


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
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 3))
    dense, how = evaluation.conv_operator_norm(kernel, (5, 4), bound="dense")
    exact = float(np.linalg.norm(np.asarray(lipschitz.conv_dense_matrix(kernel, (5, 4))), 2))
    assert how == "dense" and dense == pytest.approx(exact, rel=1e-6)
    power, how = evaluation.conv_operator_norm(kernel, (5, 4), bound="power")
    assert how == "power" and power == pytest.approx(dense, rel=1e-4)
    circular, _ = evaluation.conv_operator_norm(kernel, (5, 4), bound="circular")
    assert circular >= dense * (1 - 1e-9)        # a certified upper bound
    one, how = evaluation.conv_operator_norm(kernel[1:2, 1:2], (5, 4))
    assert how == "exact-1x1" and one == pytest.approx(np.linalg.norm(kernel[1, 1], 2))


def _state_and_batch(task, devices):
    config = _config(task)
    train, _ = experiment.load_data(config)
    model = experiment.build_model(config, train)
    normalizer = experiment.normalizer_for(config, train)
    tx = experiment.make_tx(config, train)
    init_batch = experiment.init_batch(config, train, normalizer)
    state = experiment.create_state(config, model, init_batch, tx)
    batches = data.TrainBatches(train, config.batch_size, 0, normalizer=normalizer)
    return model, train, state, batches


def test_eight_devices_give_the_same_loss_as_one_and_one_trace():
    """Three density steps (dequantization noise, Hutchinson probes, spectral updates) on
    one device and on eight; the 1-device step is guarded to be traced only once."""
    assert jax.device_count() == 8   # tests/conftest.py sets the XLA flag
    model, train, state, batches = _state_and_batch("density", None)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    repl, shard = parallel.replicated(mesh1), parallel.batch_sharding(mesh1)
    chex.clear_trace_counter()
    step = steps.make_train_step(model, "density", n_bins=train.n_bins, dim=train.dim)
    one = jax.jit(chex.assert_max_traces(step, n=1), in_shardings=(repl, shard),
                  out_shardings=(repl, repl))
    mesh8 = parallel.make_mesh()
    eight, _ = experiment.jitted_steps(model, "density", train.n_bins, train.dim, mesh8)
    results = []
    for mesh, fn in ((mesh1, one), (mesh8, eight)):
        s = parallel.replicate(state, mesh)
        losses = []
        for i in range(3):
            s, metrics = fn(s, parallel.shard_batch(batches(i), mesh))
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


def test_staged_density_training_runs_and_resumes(tmp_path):
    """``config.staged=True``: two block-by-block density steps (the second after a
    resume) on one device; the staged step refuses classifiers and several devices."""
    one = jax.devices()[:1]
    workdir = str(tmp_path / "staged")
    first = experiment.train_and_evaluate(_config("density", num_steps=1, staged=True),
                                          workdir, devices=one, print_fn=lambda s: None)
    lines = []
    second = experiment.train_and_evaluate(_config("density", num_steps=2, staged=True),
                                           workdir, devices=one, print_fn=lines.append)
    assert first["final_step"] == 1 and second["final_step"] == 2
    assert any("resumed from checkpoint at step 1" in line for line in lines)
    assert np.isfinite(second["eval"]["bits_per_dim"])
    with open(f"{workdir}/metrics.jsonl") as f:
        losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="applies to multiscale density models"):
        experiment.train_and_evaluate(_config("classification", num_steps=1, staged=True),
                                      str(tmp_path / "cls"), devices=one)
    with pytest.raises(ValueError, match="runs on one device, got a mesh of 8"):
        experiment.train_and_evaluate(_config("density", num_steps=1, staged=True),
                                      str(tmp_path / "eight"))


def test_density_config_selects_the_training_estimator(tmp_path):
    """``--config.model.logdet_method`` / ``logdet_gradient`` / ``logdet_mode`` reach the
    model (``"auto"``: the series from both ends when it can); the Neumann gradient
    trains; the bits/dim evaluation keeps the truncated series whatever trained."""
    cfg = _config("density")
    train_data, _ = experiment.load_data(cfg)
    expected = {(): ("series", "autodiff", "split"),
                (("logdet_gradient", "neumann"),): ("series", "neumann", "vjp"),
                (("logdet_method", "roulette"),): ("roulette", "autodiff", "vjp"),
                (("logdet_mode", "jvp"),): ("series", "autodiff", "jvp")}
    for overrides, want in expected.items():
        c = _config("density")
        c.model.update(dict(overrides))
        ld = experiment.build_model(c, train_data).logdet
        assert (ld.method, ld.gradient, ld.mode) == want
    c = _config("density", num_steps=1)
    c.model.logdet_gradient = "neumann"
    result = experiment.train_and_evaluate(c, str(tmp_path / "neumann"),
                                           devices=jax.devices()[:1], print_fn=lambda s: None)
    assert result["final_step"] == 1 and np.isfinite(result["eval"]["bits_per_dim"])
