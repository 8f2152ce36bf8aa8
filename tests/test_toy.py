"""Toy 2-D densities: samplers, true densities, the training binary's behaviour."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import toy_default, toy_glow
from iresnet_jax import train
from iresnet_jax.data import toy2d
from iresnet_jax.train import optim


@pytest.mark.parametrize("name", toy2d.DATASETS)
def test_samplers_shapes_and_seeding(name):
    a = toy2d.sample(name, 101, np.random.default_rng(3))
    b = toy2d.sample(name, 101, np.random.default_rng(3))
    assert a.shape == (101, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a)) and np.abs(a).max() < 10


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard"])
def test_true_densities_integrate_to_one(name):
    g = np.linspace(-6, 6, 1201)
    gx, gy = np.meshgrid(g, g)
    p = np.exp(toy2d.log_density(name, np.stack([gx.ravel(), gy.ravel()], 1)))
    assert np.sum(p) * (g[1] - g[0]) ** 2 == pytest.approx(1.0, abs=0.01)


def test_checkerboard_samples_lie_on_its_support():
    x = toy2d.sample("checkerboard", 10000, np.random.default_rng(0))
    assert np.all(np.isfinite(toy2d.log_density("checkerboard", x)))
    assert toy2d.true_nll("checkerboard") == pytest.approx(math.log(32))
    # Mean NLL of samples under the true density is the entropy (Monte Carlo for 8gaussians).
    assert toy2d.true_nll("8gaussians", n=20000) == pytest.approx(2.84, abs=0.05)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="checkerboard, 2spirals"):
        toy2d.sample("chessboard", 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no closed-form"):
        toy2d.log_density("moons", np.zeros((1, 2)))


def tiny_config(**overrides):
    c = toy_default.get_config()
    c.model.update(n_blocks=2, hidden=(8, 8))
    c.batch_size = 64
    c.num_steps = 4
    c.optimizer.warmup_steps = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.log_every = 2
    c.n_test = 256
    c.eval_batch_size = 256
    c.grid_size = 16
    c.n_plot_samples = 64
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.mark.parametrize("model", ["iresnet", "glow"])
def test_training_writes_figure_and_metrics_and_is_deterministic(tmp_path, model):
    c = tiny_config()
    if model == "glow":
        c.model = toy_glow.get_config().model
        c.model.update(n_steps=2, hidden=(8, 8))
    m1 = train.train_and_evaluate(c, str(tmp_path / "a"), print_fn=lambda s: None)
    m2 = train.train_and_evaluate(c, str(tmp_path / "b"), print_fn=lambda s: None)
    assert m1["final"]["test_nll"] == m2["final"]["test_nll"]      # same seed, same result
    assert os.path.getsize(tmp_path / "a" / m1["figure"]) > 1000
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["final"]["step"] == 4 and written["dataset"] == "checkerboard"
    assert written["true_nll"] == pytest.approx(math.log(32))
    assert math.isfinite(written["final"]["test_nll"])
    assert math.isfinite(written["final"]["train_loss"])
    assert written["processes"] == 1 and written["seconds"] > 0
    assert 0.3 < written["density_mass_on_plot_grid"] < 1.05
    assert (tmp_path / "a" / "metrics.jsonl").exists()
    assert (tmp_path / "a" / "config.json").exists()


class _Killed(Exception):
    pass


def test_killed_run_resumes_to_the_state_of_an_uninterrupted_run(tmp_path):
    c = tiny_config(num_steps=6)
    full = train.train_and_evaluate(c, str(tmp_path / "full"), print_fn=lambda s: None)

    def kill_at_step_4(line):
        if line.startswith("step 4/"):
            raise _Killed()  # dies after step 4 is computed, before its checkpoint

    with pytest.raises(_Killed):
        train.train_and_evaluate(c, str(tmp_path / "resumed"), print_fn=kill_at_step_4)
    lines = []
    resumed = train.train_and_evaluate(c, str(tmp_path / "resumed"), print_fn=lines.append)
    assert any("resumed from checkpoint at step 2" in line for line in lines)
    assert resumed["steps_this_run"] == 4
    assert resumed["final"]["test_nll"] == full["final"]["test_nll"]
    a, b = train.restore(str(tmp_path / "full")), train.restore(str(tmp_path / "resumed"))
    jax.tree.map(np.testing.assert_array_equal, a.state.params, b.state.params)


@pytest.mark.parametrize("num_steps", [1, 60, 100])
def test_optimizer_for_runs_shorter_than_the_warmup(num_steps):
    """The default warm-up is 100 steps; a shorter run (a quick try of the main job) must
    still build its schedule and take finite, nonzero steps."""
    tx = optim.make(toy_default.get_config().optimizer, num_steps)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    moved = []
    for _ in range(min(num_steps, 3) + 1):
        updates, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
        assert bool(jnp.all(jnp.isfinite(updates["w"])))
        moved.append(float(jnp.abs(updates["w"]).max()))
    assert max(moved) > 0


@pytest.mark.parametrize("field,value,match", [
    ("num_steps", 0, "num_steps"), ("batch_size", -5, "batch_size"),
    ("dataset", "chessboard", "valid names"), ("task", "gan", "task must be one of"),
])
def test_bad_config_fails_at_once(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path))


def test_bad_model_or_optimizer_settings_fail_at_once(tmp_path):
    c = tiny_config()
    c.model.name = "maf"
    with pytest.raises(ValueError, match="model name must be one of"):
        train.train_and_evaluate(c, str(tmp_path))
    c = tiny_config()
    c.optimizer.learning_rate = 0.0
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        train.train_and_evaluate(c, str(tmp_path))


def test_unwritable_workdir_fails_at_once(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        train.train_and_evaluate(tiny_config(), str(blocker / "run"))
