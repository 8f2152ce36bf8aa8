"""Faults a user can cause or suffer, injected: kills, damaged checkpoints, NaNs, mistakes.

Every test injects the fault and checks the answer: a killed run resumes to the
parameters of an uninterrupted one, a damaged checkpoint is reported and passed over, a
NaN stops the run with the last good checkpoint intact, the evaluation's standard-error
loop stops by its rule, each boundary error names the problem, and every fixed-point
inverse reports its worst residual and how many examples did not converge.
"""

import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import digits_classifier, digits_density, overrides, toy_default
from iresnet_jax import flow, models, train
from iresnet_jax.data import images
from iresnet_jax.train import checkpoint, evaluation, pipeline, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
# The tiny image runs of this file, as command-line overrides (binaries) and in-process.
TINY = {
    "density": ["--config=experiments/configs/digits_density.py",
                "--config.model.blocks_per_scale=(1,1,1)", "--config.model.hidden=4",
                "--config.model.logdet.n_terms=2"],
    "classification": ["--config=experiments/configs/digits_classifier.py",
                       "--config.model.stages=(1,1,1)", "--config.model.hidden=4"],
}
COMMON = ["--config.batch_size=16", "--config.init_batch_size=32",
          "--config.eval_batch_size=360", "--config.log_every=1"]


def _config(task="density", **kw):
    c = (digits_density if task == "density" else digits_classifier).get_config()
    if task == "density":
        c.model.update(blocks_per_scale=(1, 1, 1), hidden=4)
        c.model.logdet.n_terms = 2
    else:
        c.model.update(stages=(1, 1, 1), hidden=4)
    c.update(batch_size=16, init_batch_size=32, eval_batch_size=360, log_every=1,
             checkpoint_every=1, num_steps=STEPS)
    c.update(kw)
    return c


def _quiet(_):
    pass


def _params(workdir, step=None):
    """``(step, params)`` of a workdir's newest intact checkpoint (or of ``step``'s)."""
    run = train.setup(pipeline.load_config(str(workdir)), init=False)
    ck = train.Checkpointer(str(workdir))
    try:
        state = ck.restore(run.state, step=step)
    finally:
        ck.close()
    return int(state.step), jax.device_get(state.params)


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _damage(step_dir, how):
    """Overwrites a few bytes of one file of a checkpoint, or removes one."""
    step_dir = pathlib.Path(step_dir)
    if how == "partial":
        (step_dir / "default" / "_METADATA").unlink()
        return
    if how == "metadata":
        target = step_dir / "default" / "_METADATA"
    else:   # the largest array file
        target = max((p for p in (step_dir / "default").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
    with open(target, "r+b") as f:
        f.seek(target.stat().st_size // 2)
        f.write(b"\xff\xfe\x00\x13\x37")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny density run of STEPS steps, a checkpoint at every step."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train.train_and_evaluate(_config(), str(workdir), print_fn=_quiet)
    return workdir, result


# ------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("how", ["data", "metadata", "partial"])
def test_damaged_newest_checkpoint_resumes_from_the_one_before(reference, tmp_path, how):
    ref, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref, workdir)
    _damage(workdir / "checkpoints" / str(STEPS), how)
    lines = []
    result = train.train_and_evaluate(_config(), str(workdir), print_fn=lines.append)
    text = "\n".join(lines)
    assert f"damaged checkpoint passed over: step {STEPS}:" in text
    assert f"resumed from checkpoint at step {STEPS - 1}" in text
    assert result["steps_this_run"] == 1 and result["final"]["step"] == STEPS
    step, params = _params(workdir)            # the damaged one was replaced
    assert step == STEPS
    _assert_same(params, _params(ref)[1])
    steps = [row["step"] for row in _lines(workdir) if "train/loss" in row]
    assert steps == list(range(1, STEPS + 1))  # the replayed step wrote no second line


def test_save_cut_by_a_kill_is_ignored(reference, tmp_path):
    """Orbax writes a step under a temporary name and renames it when complete: what a kill
    mid-save leaves is not a checkpoint."""
    ref, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref, workdir)
    unfinished = workdir / "checkpoints" / f"{STEPS + 1}.orbax-checkpoint-tmp-1796619146"
    shutil.copytree(workdir / "checkpoints" / str(STEPS), unfinished)
    _damage(unfinished, "metadata")
    lines = []
    result = train.train_and_evaluate(_config(), str(workdir), print_fn=lines.append)
    assert f"resumed from checkpoint at step {STEPS}" in "\n".join(lines)
    assert not any("damaged" in line for line in lines)
    assert result["steps_this_run"] == 0 and result["final"]["step"] == STEPS


def test_digest_catches_what_orbax_reads_without_error(tmp_path):
    """Bytes overwritten in an array file can restore without an error, with other values;
    the digest saved with each checkpoint is what tells."""
    import optax
    import orbax.checkpoint as ocp

    state = train.TrainState.create(params={"w": jnp.arange(1000, dtype=jnp.float32)},
                                    model_state={}, tx=optax.sgd(0.1),
                                    rng=jax.random.key_data(jax.random.key(0)))
    ck = train.Checkpointer(str(tmp_path))
    assert ck.save(state)
    ck.close()
    _damage(tmp_path / "checkpoints" / "0", "data")
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                                    item_handlers=ocp.StandardCheckpointHandler())
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_tree())
    abstract[checkpoint.DIGEST] = jax.ShapeDtypeStruct((32,), np.uint8)
    raw = manager.restore(0, args=ocp.args.StandardRestore(abstract))   # no error...
    manager.close()
    assert not np.array_equal(raw["params"]["w"], state.params["w"])   # ...other values
    ck = train.Checkpointer(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError,
                       match="step 0: ValueError: its contents do not match the digest"):
        ck.restore(state)
    ck.close()


def test_no_intact_checkpoint_is_a_clear_error_and_nothing_is_deleted(reference, tmp_path):
    ref, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref, workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert steps == [STEPS - 2, STEPS - 1, STEPS]   # max_to_keep=3
    for s in steps:
        _damage(workdir / "checkpoints" / str(s), "metadata")
    before = _tree_digest(workdir / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError) as e:
        train.train_and_evaluate(_config(), str(workdir), print_fn=_quiet)
    message = str(e.value)
    assert "no intact checkpoint" in message and "nothing was deleted" in message
    for s in steps:
        assert f"step {s}: " in message
    assert _tree_digest(workdir / "checkpoints") == before


def test_checkpoint_of_another_model_names_the_first_mismatching_parameter(reference,
                                                                          tmp_path):
    ref, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref, workdir)
    c = _config()
    c.model.hidden = 8
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=re.escape(
                           "checkpoint at step 4 does not fit the model of the config: "
                           "parameter ['scales_0']['layers_0']['branch']['conv0']['bias'] "
                           "is shape (4,) in the checkpoint but shape (8,) in the model")):
        train.train_and_evaluate(c, str(workdir), print_fn=_quiet)


def test_metrics_file_drops_a_line_cut_by_a_kill(tmp_path):
    w = train.MetricWriter(str(tmp_path), tensorboard=False)
    w.write_scalars(1, {"loss": 1.0})
    w.write_scalars(2, {"loss": 2.0})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                 # the kill came mid-line
    w = train.MetricWriter(str(tmp_path), tensorboard=False)
    w.write_scalars(2, {"loss": 2.0})              # replayed after the resume: skipped
    w.write_scalars(2, {"eval/x": 5.0})            # other keys at that step: written
    w.write_scalars(3, {"loss": 3.0})
    w.close()
    rows = _lines(tmp_path)
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                    {"step": 2, "eval/x": 5.0}, {"step": 3, "loss": 3.0}]


# ------------------------------------------------------------------------------------
# NaN


def test_nan_in_a_batch_stops_the_run_and_keeps_the_last_good_checkpoint(
        reference, tmp_path, monkeypatch):
    ref, _ = reference
    clean = tasks.Density.train_batch

    def poisoned(self, step):
        batch = clean(self, step)
        if step == 2:
            image = batch["image"].astype(np.float32)
            image[0, 0, 0, 0] = np.nan
            batch = {**batch, "image": image}
        return batch

    monkeypatch.setattr(tasks.Density, "train_batch", poisoned)
    with pytest.raises(ValueError, match=r"input batch of step 2\['image'\] contains 1 NaN"):
        train.train_and_evaluate(_config(), str(tmp_path), print_fn=_quiet)
    step, params = _params(tmp_path)
    assert step == 2
    _assert_same(params, _params(ref, step=2)[1])


def test_nan_in_a_parameter_stops_the_run_and_keeps_the_last_good_checkpoint(
        reference, tmp_path, monkeypatch):
    ref, _ = reference
    make = pipeline.make_train_step

    def make_poisoned(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            params = jax.tree.map(lambda p: jnp.where(state.step == 3, jnp.nan, p),
                                  state.params)
            return state.replace(params=params), metrics

        return step

    monkeypatch.setattr(pipeline, "make_train_step", make_poisoned)
    with pytest.raises(train.NonFiniteLossError, match="training loss became nan at step 4"):
        train.train_and_evaluate(_config(), str(tmp_path), print_fn=_quiet)
    ck = train.Checkpointer(str(tmp_path))
    assert ck.all_steps() == [1, 2]     # step 3's parameters were NaN: not written
    ck.close()
    step, params = _params(tmp_path)
    assert step == 2
    _assert_same(params, _params(ref, step=2)[1])


# ------------------------------------------------------------------------------------
# The evaluation's standard-error loop


def test_standard_error_loop_stops_by_its_rule(reference):
    ref, _ = reference
    kw = dict(bias_tol=0.05, print_fn=_quiet, max_passes=6)
    free = evaluation.evaluate_workdir(str(ref), se_tol=1e-12, **kw)
    values = free["per_pass"]
    assert free["passes"] == 6 and not free["se_target_met"]
    se = {n: float(np.std(values[:n], ddof=1) / math.sqrt(n)) for n in range(2, 7)}
    assert free["standard_error"] == pytest.approx(se[6], rel=1e-9)
    assert free["test_bits_per_dim"] == pytest.approx(np.mean(values), rel=1e-12)
    assert len(set(values)) == 6          # fresh probes and noise in every pass
    # A tolerance first met after several passes: the loop must stop exactly there.
    stop = next(n for n in range(3, 7) if se[n] < min(se[k] for k in range(2, n)))
    out = evaluation.evaluate_workdir(str(ref), se_tol=se[stop], **kw)
    assert out["passes"] == stop and out["se_target_met"]
    assert out["per_pass"] == values[:stop]
    assert out["standard_error"] <= se[stop] < min(se[k] for k in range(2, stop))
    # min_passes holds even when the first two passes meet the tolerance.
    out = evaluation.evaluate_workdir(str(ref), se_tol=1.0, min_passes=3, **kw)
    assert out["passes"] == 3 and out["per_pass"] == values[:3]


# ------------------------------------------------------------------------------------
# Boundary errors


def test_unprepared_dataset_names_it_the_directory_and_the_command(tmp_path):
    # What a half-prepared TFDS directory looks like (TFDS raises a KeyError for it).
    version = tmp_path / "mnist" / "3.0.1"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text(
        '{"name": "mnist", "version": "3.0.1", "fileFormat": "array_record"}')
    for data_dir in (tmp_path, tmp_path / "missing"):
        with pytest.raises(images.DatasetNotPreparedError) as e:
            images.load("mnist", "train", data_dir=str(data_dir))
        message = str(e.value)
        assert "'mnist'" in message and str(data_dir) in message
        assert f"python -m iresnet_jax.data.prepare --dataset=mnist --data_dir={data_dir}" \
            in message
    c = _config(dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(images.DatasetNotPreparedError, match="iresnet_jax.data.prepare"):
        train.train_and_evaluate(c, str(tmp_path / "run"), print_fn=_quiet)


def test_unknown_config_field_names_it_and_the_nearest_valid_ones():
    c = digits_density.get_config()
    assert overrides.unknown_field(c, "model.logdet.n_terms") is None
    message = overrides.unknown_field(c, "nosuchfield")
    assert message.startswith("unknown config field config.nosuchfield (fields of config: ")
    assert "batch_size" in message and "num_steps" in message
    message = overrides.unknown_field(c, "model.hiden")
    assert "did you mean config.model.hidden" in message
    message = overrides.unknown_field(c, "model.logdet.nterms")
    assert "config.model.logdet.nterms; did you mean config.model.logdet.n_terms" in message
    argv = ["train.py", "--config=experiments/configs/digits_density.py",
            "--config.num_steps=3", "--config.batchsize=8"]
    assert overrides.override_paths(argv) == ["num_steps", "batchsize"]
    with pytest.raises(SystemExit, match=r"--config.batchsize: unknown config field "
                                         r"config.batchsize; did you mean config.batch_size"):
        overrides.check_argv(argv)
    overrides.check_argv(argv[:3])      # valid overrides pass


@pytest.mark.parametrize("field,value,match", [
    ("coeff", 1.5, r"config.model.coeff must lie in \(0, 1\)"),
    ("hidden", -4, r"config.model.hidden must not be negative, got -4"),
])
def test_model_values_out_of_range_name_the_field(tmp_path, field, value, match):
    c = _config()
    c.model[field] = value
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(c, str(tmp_path), print_fn=_quiet)


def test_inverse_settings_out_of_range_name_the_field(tmp_path):
    c = _config()
    c.model.inverse.tol = -1.0
    with pytest.raises(ValueError, match=r"config.model \(multiscale_density\): inverse "
                                         r"tol must be >= 0, got -1.0"):
        train.train_and_evaluate(c, str(tmp_path), print_fn=_quiet)


def test_binary_names_a_value_of_the_wrong_type(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.train", *TINY["density"],
         "--config.batch_size=sixteen", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "IRESNET_JAX_NO_RELAUNCH": "1"})
    assert done.returncode != 0
    assert "--config.batch_size=sixteen" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("binary, override, expected", [
    ("experiments.train", "--config.nosuchfield=3",
     "unknown config field config.nosuchfield (fields of config: "),
    ("experiments.toy_density", "--config.model.n_blockz=3",
     "config.model.n_blockz; did you mean config.model.n_blocks?"),
])
def test_binary_names_an_unknown_config_field(tmp_path, binary, override, expected):
    config = [TINY["density"][0]] if binary == "experiments.train" else []
    done = subprocess.run([sys.executable, "-m", binary, *config, override,
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "IRESNET_JAX_NO_RELAUNCH": "1"})
    assert done.returncode != 0
    assert expected in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------
# The inverse never silently wrong


def _toy(coeff, **inverse):
    c = toy_default.get_config()
    c.model.update(n_blocks=2, hidden=(16, 16), coeff=coeff)
    c.model.inverse.update(inverse)
    spec = c.model.to_dict()
    spec["dim"] = 2
    model = models.build(spec)
    x = jax.random.normal(jax.random.key(0), (64, 2)) * 2
    return model, model.init({"params": jax.random.key(1), "logdet": jax.random.key(2)}, x)


def test_inverse_report_counts_unconverged_examples_and_the_worst_residual():
    model, v = _toy(0.99, tol=1e-5, max_iter=3)
    sample = jax.jit(lambda v, k: model.apply(v, 64, method="sample", rngs={"sample": k},
                                              mutable=["intermediates"]))
    x, sown = sample(v, jax.random.key(3))
    report = flow.inverse_report(sown["intermediates"])
    assert report["examples"] == 64 and report["max_iterations"] == 3
    assert report["not_converged"] > 0 and report["worst_residual"] > 1e-5
    # The same numbers from the per-block diagnostics of fixed_point itself.
    leaves = sown["intermediates"]
    residual = np.concatenate([np.asarray(a).reshape(-1, 64) for a in
                               jax.tree.leaves(_pick(leaves, "inverse_residual"))])
    converged = np.concatenate([np.asarray(a).reshape(-1, 64) for a in
                                jax.tree.leaves(_pick(leaves, "inverse_converged"))])
    assert residual.shape[0] == 2                          # one row per block
    assert report["worst_residual"] == float(residual.max())
    assert report["not_converged"] == int(np.sum(~converged.all(0)))
    np.testing.assert_array_equal(converged, residual <= 1e-5)
    model, v = _toy(0.99, tol=1e-5, max_iter=1000)
    x, sown = model.apply(v, 64, method="sample", rngs={"sample": jax.random.key(3)},
                          mutable=["intermediates"])
    report = flow.inverse_report(sown["intermediates"])
    assert report["not_converged"] == 0 and report["worst_residual"] <= 1e-5
    assert "0 of 64 examples not converged" in flow.describe_inverse(report)


def _pick(tree, name):
    if isinstance(tree, dict):
        return [v if k == name else _pick(v, name) for k, v in tree.items()
                if k == name or isinstance(v, dict)]
    return []


def test_toy_run_reports_the_inverse_of_its_samples_and_round_trip(tmp_path):
    c = toy_default.get_config()
    c.model.update(n_blocks=2, hidden=(8, 8), coeff=0.99)
    c.model.inverse.tol = 1e-5
    c.update(batch_size=64, num_steps=2, log_every=1, checkpoint_every=2, n_test=256,
             eval_batch_size=256, grid_size=8, n_plot_samples=64)
    c.optimizer.warmup_steps = 1
    lines = []
    result = train.train_and_evaluate(c, str(tmp_path), print_fn=lines.append)
    written = json.loads((tmp_path / "metrics.json").read_text())["inverse"]
    assert written == result["inverse"]
    samples, trip = written["samples"], written["round_trip"]
    assert samples["examples"] == 64 and trip["examples"] == 256
    for report in (samples, trip):
        assert 0 <= report["not_converged"] <= report["examples"]
        assert 0 < report["worst_residual"] and report["max_iterations"] >= 1
    assert any(line.startswith("samples: inverse: worst residual") for line in lines)
    assert any(line.startswith("round_trip: inverse: worst residual") and
               "largest error" in line for line in lines)
    # The reported round-trip error is the one of the restored model.
    r = train.restore(str(tmp_path))
    x = r.task.test[:256]
    key = jax.random.fold_in(jax.random.key(c.seed), 8)
    z = r.model.apply(r.variables, x, rngs={"logdet": key})[0]
    x_rec = r.model.apply(r.variables, z, method="inverse")
    assert trip["max_error"] == pytest.approx(float(np.max(np.abs(x_rec - x))), rel=1e-3)


# ------------------------------------------------------------------------------------
# kill -9


def _command(task, workdir, processes):
    return [sys.executable, "-m", "experiments.train", *TINY[task], *COMMON,
            f"--config.num_steps={STEPS + 2}", "--config.checkpoint_every=2",
            f"--workdir={workdir}"] + ([f"--config.processes={processes}"]
                                       if processes > 1 else [])


def _env():
    from conftest import FAST_COMPILE

    return {**os.environ, "IRESNET_JAX_NO_RELAUNCH": "1", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": FAST_COMPILE}   # one device per process, as a user's run


def _start(command, log=None):
    """Starts ``command`` in its own process group (output to ``log`` or a pipe)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run(command, kill_after_step=None):
    """Runs ``command``; with ``kill_after_step``, SIGKILLs its whole process group once a
    process has printed that step. Returns its output."""
    p = _start(command)
    out = []
    try:
        for line in p.stdout:
            out.append(line)
            if kill_after_step is not None and line.startswith(f"step {kill_after_step}/"):
                os.killpg(p.pid, signal.SIGKILL)
                break
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = "".join(out)
    if kill_after_step is None:
        assert p.returncode == 0, text[-3000:]
    else:
        assert p.returncode == -signal.SIGKILL, text[-3000:]
    return text


@pytest.mark.parametrize("task,processes", [("classification", 1), ("density", 1),
                                            ("density", 2), ("classification", 2)])
def test_kill_9_at_random_steps_then_the_same_command_ends_as_an_uninterrupted_run(
        tmp_path, task, processes):
    """One process: killed twice, two processes (the launcher): once, each at a random
    step; the uninterrupted run of the same command runs alongside."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _start(_command(task, full, processes), log=tmp_path / "full.log")
    rng = np.random.default_rng([len(task), processes])
    kills = sorted(rng.choice(np.arange(1, STEPS + 2), size=3 - processes, replace=False))
    for k in kills:
        _run(_command(task, killed, processes), kill_after_step=int(k))
    out = _run(_command(task, killed, processes))
    # Checkpoints every 2 steps; a kill just after an even step may come before its save.
    found = re.search(r"resumed from checkpoint at step (\d+)", out)
    last = kills[-1] // 2 * 2
    assert (int(found.group(1)) if found else 0) in (
        {last, last - 2} if kills[-1] % 2 == 0 else {last})
    assert reference.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    step_a, a = _params(full)
    step_b, b = _params(killed)
    assert step_a == step_b == STEPS + 2
    _assert_same(a, b)
    # metrics.jsonl: every step once, with the uninterrupted run's losses.
    rows = lambda w: [(r["step"], r["train/loss"]) for r in _lines(w) if "train/loss" in r]
    assert rows(killed) == rows(full)
    assert [s for s, _ in rows(full)] == list(range(1, STEPS + 3))
