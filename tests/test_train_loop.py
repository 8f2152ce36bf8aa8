"""The shared training loop: resume, determinism, NaN guard, atomic checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iresnet_jax import train


def _problem(lr=0.1):
    tx = optax.sgd(lr)
    params = {"w": jnp.zeros((3,))}
    state = train.TrainState.create(params=params, model_state={}, tx=tx,
                                    rng=jax.random.PRNGKey(0))
    target = jnp.array([1.0, -2.0, 0.5])

    @jax.jit
    def step(state, batch):
        noise = jax.random.normal(state.step_key(), (3,))

        def loss_fn(p):
            return jnp.sum((p["w"] - target - 0.01 * noise) ** 2) * batch

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return state, step


def test_resume_matches_an_uninterrupted_run(tmp_path):
    state, step = _problem()
    full, _ = train.run(state=state, train_step=step, batch_fn=lambda s: 1.0, num_steps=12,
                        checkpointer=train.Checkpointer(str(tmp_path / "a")),
                        checkpoint_every=5, print_fn=lambda s: None)
    # Interrupted after 7 steps (the last checkpoint is at step 5), then resumed.
    ck = train.Checkpointer(str(tmp_path / "b"))
    train.run(state=state, train_step=step, batch_fn=lambda s: 1.0, num_steps=7,
              checkpointer=ck, checkpoint_every=5, print_fn=lambda s: None)
    assert ck.latest_step() == 7  # the end of a run is always saved
    ck2 = train.Checkpointer(str(tmp_path / "b"))
    lines = []
    resumed, summary = train.run(state=state, train_step=step, batch_fn=lambda s: 1.0,
                                 num_steps=12, checkpointer=ck2, checkpoint_every=5,
                                 print_fn=lines.append)
    assert any("resumed from checkpoint at step 7" in line for line in lines)
    assert summary["steps_this_run"] == 5
    np.testing.assert_array_equal(resumed.params["w"], full.params["w"])
    assert int(resumed.step) == 12


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    state, step = _problem()
    ck = train.Checkpointer(str(tmp_path))
    batch_fn = lambda s: 1.0 if s < 6 else float("nan")
    with pytest.raises(train.NonFiniteLossError, match="step 7"):
        train.run(state=state, train_step=step, batch_fn=batch_fn, num_steps=20,
                  checkpointer=ck, checkpoint_every=3, log_every=1, print_fn=lambda s: None)
    ck = train.Checkpointer(str(tmp_path))
    assert ck.latest_step() == 6
    restored = ck.restore(state)
    assert np.all(np.isfinite(restored.params["w"]))


def test_checkpointer_refuses_non_finite_parameters(tmp_path):
    state, _ = _problem()
    ck = train.Checkpointer(str(tmp_path))
    bad = state.replace(params={"w": jnp.array([1.0, jnp.nan, 0.0])}, step=state.step + 1)
    assert not ck.save(bad)
    assert ck.latest_step() is None
    assert ck.save(state)


def test_workdir_and_batch_checks(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        train.check_workdir(str(blocker / "sub"))
    with pytest.raises(ValueError, match="NaN"):
        train.check_finite_batch({"x": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="positive"):
        state, step = _problem()
        train.run(state=state, train_step=step, batch_fn=lambda s: 1.0, num_steps=0,
                  checkpointer=None)


def test_metric_writer_and_progress(tmp_path):
    w = train.MetricWriter(str(tmp_path))
    w.write_scalars(3, {"loss": 1.5})
    w.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert '"loss": 1.5' in text and '"step": 3' in text
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
    p = train.Progress(100, 0)
    p.update(0)
    line = p.line(10, {"loss": 2.0})
    assert "step 10/100" in line and "steps/s" in line and "ETA" in line
