"""Several processes, one run: JAX's multi-process runtime, and a launcher for one machine.

Every process runs the same program on its share of every batch: ``jax.distributed``
connects them, the mesh of ``parallel.make_mesh`` spans the devices of all of them, the
train state is replicated and each batch split along the mesh, Orbax writes each
checkpoint once and every process restores it, and process 0 writes the metrics and
figures (``pipeline.train_and_evaluate``). On CPUs the collectives run over gloo.

* ``initialize(...)``: connects this process; the binaries call it first
  (``experiments.setup_run``). In a process started by ``launch`` it reads its place from
  the environment; on a cluster ``jax.distributed.initialize()`` detects it (SLURM, TPU
  pods) or takes an explicit coordinator address, process count and id.
* ``launch(n)``: starts ``n`` copies of the running command on this machine, each pinned to
  its share of the CPUs, and waits for them; when one fails, the others are stopped
  within a second and the launcher exits with a message naming it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import jax

COORDINATOR = "IRESNET_JAX_COORDINATOR"
NUM_PROCESSES = "IRESNET_JAX_NUM_PROCESSES"
PROCESS_ID = "IRESNET_JAX_PROCESS_ID"
CPUS = "IRESNET_JAX_CPUS"
LAUNCHER = "IRESNET_JAX_LAUNCHER"


def launched() -> bool:
    """Whether this process was started by ``launch``."""
    return PROCESS_ID in os.environ


def initialize(*, auto: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Connects this process to the others, before JAX starts its backends.

    A process started by ``launch`` takes its place from the environment; otherwise
    ``auto`` lets ``jax.distributed.initialize`` detect the cluster, and the explicit
    arguments name the coordinator, the process count and this process's id. Returns
    whether ``jax.distributed`` was initialized.
    """
    if launched():
        _die_with_launcher()
        coordinator_address = os.environ[COORDINATOR]
        num_processes = int(os.environ[NUM_PROCESSES])
        process_id = int(os.environ[PROCESS_ID])
        if os.environ.get(CPUS):   # before XLA starts its threads, which inherit it
            os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS].split(",")})
    elif not (auto or coordinator_address):
        return False
    # CPU collectives over gloo (the CPU client has none by default); no effect on the
    # GPU and TPU clients.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def _die_with_launcher() -> None:
    """Linux: this process gets SIGKILL when the launcher dies (no orphaned ranks)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.get(LAUNCHER, os.getppid())):
        os._exit(1)   # the launcher died before the line above


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cpu_shares(n: int) -> list[set[int] | None]:
    """The CPUs of each of ``n`` processes (``None``: not pinned, fewer CPUs than n)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return [None] * n
    if len(cpus) < n:
        return [None] * n
    per = len(cpus) // n
    return [set(cpus[k * per:(k + 1) * per]) for k in range(n)]


def _status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def launch(n: int, argv: list[str] | None = None, *, poll_seconds: float = 0.2,
           print_fn=print) -> int:
    """Runs ``argv`` (default: this process's command line) as ``n`` processes of one
    ``jax.distributed`` run on this machine and returns 0 when all succeed.

    Each process gets its id, the count and a coordinator address in its environment
    (``initialize`` reads them) and is pinned to ``1/n`` of the CPUs. When a process
    fails, the others are stopped, and the return value is the failed one's status.
    """
    if int(n) != n or n < 2:
        raise ValueError(f"launch needs at least 2 processes, got {n!r}")
    if argv is None:
        argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv)[1:])
    coordinator = f"localhost:{_free_port()}"
    children = []
    for k, cpus in enumerate(_cpu_shares(n)):
        env = {**os.environ, COORDINATOR: coordinator, NUM_PROCESSES: str(n),
               PROCESS_ID: str(k), CPUS: ",".join(map(str, sorted(cpus or ()))),
               LAUNCHER: str(os.getpid())}
        children.append(subprocess.Popen(argv, env=env))
    print_fn(f"launched {n} processes (coordinator {coordinator})")
    try:
        while True:
            codes = [c.poll() for c in children]
            failed = [k for k, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                k = failed[0]
                print_fn(f"process {k} of {n} failed ({_status(codes[k])}); stopping the "
                         "others")
                return codes[k] if codes[k] > 0 else 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll_seconds)
    finally:
        _stop([c for c in children if c.poll() is None])


def _stop(children, grace_seconds: float = 5.0) -> None:
    for c in children:
        c.terminate()
    deadline = time.monotonic() + grace_seconds
    for c in children:
        try:
            c.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
