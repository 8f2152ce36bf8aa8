"""Several processes, one run, through the launcher users call (``--config.processes=2``):
the same losses and parameters as one process on the same global batch, checkpoints that
move between two processes and one, and a dead rank that stops the group."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import iresnet_jax
from iresnet_jax.train import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {
    "classification": ["--config.model.stages=(1, 1, 1)", "--config.model.hidden=4"],
    "density": ["--config.model.blocks_per_scale=(1, 1, 1)", "--config.model.hidden=4",
                "--config.model.logdet.n_terms=2"],
}


def _env() -> dict:
    """One CPU device per process (the test session simulates 8)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", ""))
    return env


def _command(task: str, workdir, steps: int, processes: int) -> list[str]:
    config = "digits_classifier" if task == "classification" else "digits_density"
    return [sys.executable, "-m", "experiments.train",
            f"--config={ROOT}/experiments/configs/{config}.py", f"--workdir={workdir}",
            *TINY[task], "--config.batch_size=16", "--config.eval_batch_size=120",
            "--config.init_batch_size=64", "--config.log_every=1",
            "--config.checkpoint_every=1", f"--config.num_steps={steps}",
            f"--config.processes={processes}"]


def _train(task, workdir, steps, processes) -> dict:
    out = subprocess.run(_command(task, workdir, steps, processes), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def _losses(workdir) -> dict[int, float]:
    """Train loss per step (a resumed run's lines follow the first run's)."""
    losses = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "train/loss" in record:
                losses[record["step"]] = record["train/loss"]
    return losses


def _assert_same_params(a, b):
    (_, va), (_, vb) = iresnet_jax.load(str(a)), iresnet_jax.load(str(b))
    leaves_a, tree_a = jax.tree.flatten(va["params"])
    leaves_b, tree_b = jax.tree.flatten(vb["params"])
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task, first, then", [
    ("classification", 2, 1),   # a checkpoint of the group resumes in one process
    ("density", 1, 2),          # and one process's in the group
])
def test_two_processes_match_one(task, first, then, tmp_path):
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    reference = _train(task, one, 3, 1)
    part = _train(task, mixed, 2, first)
    assert part["processes"] == first and part["devices"] == first
    final = _train(task, mixed, 3, then)
    assert final["processes"] == then and final["steps_this_run"] == 1
    expected, got = _losses(one), _losses(mixed)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)],
                               [expected[s] for s in (1, 2, 3)], rtol=1e-4)
    metric = reference["metric"]
    assert final["final"][metric] == pytest.approx(reference["final"][metric], rel=1e-4)
    _assert_same_params(one, mixed)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """Process id of each rank started by the launcher ``launcher_pid``."""
    ranks = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if env.get(distributed.LAUNCHER.encode()) == str(launcher_pid).encode():
            ranks[int(env[distributed.PROCESS_ID.encode()])] = int(entry.name)
    return ranks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dead_rank_stops_the_group(tmp_path):
    workdir = tmp_path / "run"
    log = open(tmp_path / "launcher.log", "w+")
    launcher = subprocess.Popen(_command("classification", workdir, 100_000, 2), cwd=ROOT,
                                env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (os.path.exists(workdir / "metrics.jsonl") and len(_losses(workdir)) >= 2):
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        ranks = _rank_pids(launcher.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        code = launcher.wait(timeout=60)
        assert time.monotonic() - killed < 30
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert code != 0
    assert "process 1 of 2 failed (killed by signal 9)" in (tmp_path / "launcher.log").read_text()
    assert not _rank_pids(launcher.pid)   # rank 0 is gone too
    log.close()


def test_launch_reports_a_failing_rank():
    lines = []
    code = distributed.launch(2, [sys.executable, "-c", "import os, sys; sys.exit(3 if "
                                  f"os.environ['{distributed.PROCESS_ID}'] == '1' else 0)"],
                              print_fn=lines.append)
    assert code == 3
    assert any("process 1 of 2 failed (exit status 3)" in line for line in lines)
    with pytest.raises(ValueError, match="at least 2 processes"):
        distributed.launch(1)
