"""Data parallelism over the processes of one machine, for small models on CPU.

A small model's training step leaves most of a multi-core CPU idle: XLA:CPU runs its many
tiny kernels one after another, and the toy main job's step (30 blocks of a 2-48-48-2 MLP,
batch 125) ran as fast pinned to one core as on two. Two *processes*, each with its own
XLA runtime on its own core, each computing the gradient of half the batch, do twice the
work in the same time, if averaging the gradients is cheap. Through JAX's multi-process
collectives (``jax.distributed`` with the gloo CPU backend) it is not on one machine: one
``psum`` of the toy model's 78k gradient entries took 1.9 ms over loopback TCP, and the
data-parallel step of batch 250 took as long as one process's (14.4 against 14.8 ms). A
``ProcessGroup`` averages through shared memory instead: each process writes its gradient
vector into its slot, and reads the others' once all have written (a few microseconds).

Each process runs an ordinary single-process JAX program; the group only exchanges
NumPy vectors between jitted calls:

* ``ProcessGroup.create(n, slot_bytes)`` (in the launching process, rank 0) allocates the
  shared memory; ``spawn(target, group, args)`` starts ranks ``1..n-1`` as fresh Python
  processes (``multiprocessing``'s spawn start method: no fork of a running XLA runtime),
  each calling ``target(group.handle(rank), *args)``, which attaches with
  ``ProcessGroup.attach``;
* ``group.mean(vector)`` returns the elementwise mean over the processes (the same bits in
  every process); ``group.broadcast(tree)`` returns rank 0's pytree of arrays everywhere
  (the start state, restored or fresh, so that all ranks begin identical);
* a rank that fails sets the group's abort flag, and the others raise instead of waiting
  for it; a rank whose peers have exited raises too.

``data_parallel_step`` builds a train step from a gradient function and an update function
with the exchange between them. Measured on the toy main job (2-core x86 VM, 3,000 steps,
``python -m experiments.toy_density --config.num_steps=3000``): batch 250 in two
processes, each pinned to one CPU (``pin_threads``), 93 steps/s; unpinned 77 steps/s; batch
125 in one process 103 steps/s; batch 250 in one process 68 steps/s. The exchange itself
costs microseconds; what a data-parallel step loses against a one-process step of half
the batch is the Python work that no longer overlaps with XLA's (batch sampling, two
dispatches, the update), on a core that the process has to itself.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from multiprocessing import shared_memory
from typing import Any, Callable, Sequence

import numpy as np

_HEADER = 64  # bytes: n int64 round counters (n <= 6) and an int64 abort flag at the end
_MAX_PROCESSES = (_HEADER // 8) - 1
_LIVENESS_CHECK_S = 0.5


class PeerFailedError(RuntimeError):
    """Another process of the group failed or exited while this one waited for it."""


@dataclasses.dataclass(frozen=True)
class Handle:
    """What a spawned process needs to attach (picklable)."""
    name: str
    n: int
    rank: int
    slot_bytes: int
    lock: Any


def available_cpus() -> list[int]:
    """The CPUs this process may run on (``os.sched_getaffinity``; all where unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def pin_threads(cpus: Sequence[int]) -> bool:
    """Restricts every thread of this process (XLA's thread pool included, which exists
    once JAX has run) to ``cpus``; ``True`` if it could. ``os.sched_setaffinity(0, ...)``
    alone would move only the calling thread."""
    cpus = set(cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    ok = False
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
            ok = True
        except (AttributeError, OSError):  # not Linux, or the thread just ended
            continue
    return ok


class ProcessGroup:
    """``n`` processes of one machine that average vectors through shared memory.

    Rounds alternate between two sets of ``n`` slots, so one counter per process and one
    wait per round suffice: a process can overwrite a slot set only after every process
    has finished the round before, which is when the slots were last read.
    """

    def __init__(self, handle: Handle, shm: shared_memory.SharedMemory, *, owner: bool):
        self.n, self.rank, self.slot_bytes = handle.n, handle.rank, handle.slot_bytes
        self._handle, self._shm, self._owner = handle, shm, owner
        self._lock = handle.lock
        self._counters = np.ndarray((self.n,), np.int64, buffer=shm.buf, offset=0)
        self._abort = np.ndarray((1,), np.int64, buffer=shm.buf, offset=_HEADER - 8)
        self._slots = np.ndarray((2, self.n, self.slot_bytes), np.uint8, buffer=shm.buf,
                                 offset=_HEADER)
        self._round = 0
        self.workers: list[multiprocessing.process.BaseProcess] = []  # spawn() adds

    @classmethod
    def create(cls, n: int, slot_bytes: int) -> "ProcessGroup":
        """Rank 0's group, with shared memory for ``n`` payloads of ``slot_bytes``."""
        if not 2 <= n <= _MAX_PROCESSES:
            raise ValueError(f"a ProcessGroup has 2 to {_MAX_PROCESSES} processes, got {n}")
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        slot_bytes = -(-slot_bytes // 64) * 64
        shm = shared_memory.SharedMemory(create=True, size=_HEADER + 2 * n * slot_bytes)
        np.ndarray((_HEADER,), np.uint8, buffer=shm.buf)[:] = 0
        lock = multiprocessing.get_context("spawn").Lock()
        return cls(Handle(shm.name, n, 0, slot_bytes, lock), shm, owner=True)

    @classmethod
    def attach(cls, handle: Handle) -> "ProcessGroup":
        """The group in a spawned process (``handle`` from ``spawn``)."""
        # The owner unlinks the memory. Python >= 3.13: track=False keeps this process's
        # resource tracker out of it; before 3.13 a spawned process shares the owner's
        # tracker, where registering the name again changes nothing.
        try:
            shm = shared_memory.SharedMemory(name=handle.name, track=False)
        except TypeError:
            shm = shared_memory.SharedMemory(name=handle.name)
        return cls(handle, shm, owner=False)

    def handle(self, rank: int) -> Handle:
        return dataclasses.replace(self._handle, rank=rank)

    # -- failure handling ---------------------------------------------------------------
    def abort(self) -> None:
        """Tells the other processes to stop waiting for this one."""
        with self._lock:
            self._abort[0] = 1

    def _peers_alive(self) -> bool:
        if self.rank == 0:
            return all(w.is_alive() or w.exitcode == 0 for w in self.workers)
        parent = multiprocessing.parent_process()
        return parent is None or parent.is_alive()

    def _wait(self, target: int) -> None:
        spins, next_check = 0, time.monotonic() + _LIVENESS_CHECK_S
        while True:
            with self._lock:
                done = int(self._counters.min()) >= target
                aborted = bool(self._abort[0])
            if aborted:
                raise PeerFailedError("another training process failed (its error is "
                                      "printed above); stopping")
            if done:
                return
            spins += 1
            if spins < 2000:
                os.sched_yield()
                continue
            time.sleep(2e-4)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _LIVENESS_CHECK_S
                if not self._peers_alive():
                    raise PeerFailedError("another training process exited while this "
                                          "one waited for it; stopping")

    def _exchange(self, payload: np.ndarray) -> np.ndarray:
        """Writes this process's bytes, waits for all, returns the ``(n, nbytes)`` view of
        every process's payload of this round (valid until the round after next)."""
        data = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
        if data.size > self.slot_bytes:
            raise ValueError(f"payload of {data.size} bytes exceeds the group's slots of "
                             f"{self.slot_bytes} bytes")
        parity = self._round % 2
        self._slots[parity, self.rank, :data.size] = data
        self._round += 1
        with self._lock:
            self._counters[self.rank] = self._round
        self._wait(self._round)
        return self._slots[parity, :, :data.size]

    # -- collectives --------------------------------------------------------------------
    def mean(self, vector: np.ndarray) -> np.ndarray:
        """The elementwise mean of every process's ``vector`` (same shape and dtype in all;
        summed in rank order, so every process gets the same bits)."""
        vector = np.asarray(vector)
        views = self._exchange(vector).view(vector.dtype)
        total = views[0].copy()
        for i in range(1, self.n):
            total += views[i]
        return (total / vector.dtype.type(self.n)).reshape(vector.shape)

    def broadcast(self, tree: Any) -> Any:
        """Rank 0's pytree of arrays, in every process (``tree`` gives the structure,
        shapes and dtypes elsewhere)."""
        import jax

        leaves, treedef = jax.tree.flatten(tree)
        arrays = [np.asarray(leaf) for leaf in leaves]
        sizes = [a.nbytes for a in arrays]
        if self.rank == 0:
            payload = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays]) \
                if arrays else np.zeros((0,), np.uint8)
        else:
            payload = np.zeros((sum(sizes),), np.uint8)
        got = self._exchange(payload)[0]
        out, offset = [], 0
        for a, size in zip(arrays, sizes):
            out.append(got[offset:offset + size].copy().view(a.dtype).reshape(a.shape))
            offset += size
        return jax.tree.unflatten(treedef, out)

    def close(self) -> None:
        """Waits for the workers (rank 0; terminates any still running after 30 s) and
        releases the shared memory."""
        for w in self.workers:
            w.join(timeout=30)
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)
        self._counters = self._abort = self._slots = None
        try:
            self._shm.close()
        except BufferError:  # a view is still alive somewhere; the OS frees it at exit
            pass
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass


# JAX settings a spawned process takes over from its parent: the persistent compilation
# cache, so that a worker loads the programs an earlier run (or another rank) compiled.
_INHERITED_JAX_SETTINGS = ("jax_compilation_cache_dir",
                           "jax_persistent_cache_min_compile_time_secs",
                           "jax_persistent_cache_min_entry_size_bytes")


def _inherited_jax_settings() -> dict:
    import jax

    settings = {}
    for name in _INHERITED_JAX_SETTINGS:
        try:
            settings[name] = getattr(jax.config, name)
        except AttributeError:  # an older or newer JAX without this option
            continue
    return settings


def _bootstrap(target, jax_settings: dict, handle: Handle, *args) -> None:
    import jax

    for name, value in jax_settings.items():
        if value is not None:
            jax.config.update(name, value)
    target(handle, *args)


def spawn(target: Callable[..., Any], group: ProcessGroup, args: tuple = ()) -> None:
    """Starts ranks ``1..n-1`` of ``group``: ``target(handle, *args)`` in fresh processes,
    with this process's persistent-compilation-cache settings.

    ``target`` must be importable (a module-level function) and must call
    ``ProcessGroup.attach(handle)``.
    """
    ctx = multiprocessing.get_context("spawn")
    settings = _inherited_jax_settings()
    for rank in range(1, group.n):
        p = ctx.Process(target=_bootstrap,
                        args=(target, settings, group.handle(rank)) + tuple(args),
                        name=f"iresnet-jax rank {rank}", daemon=True)
        p.start()
        group.workers.append(p)


def data_parallel_step(grad_fn: Callable, apply_fn: Callable, group: ProcessGroup):
    """A train step ``(state, local_batch) -> (state, metrics)`` that averages over the
    group between two jitted functions.

    ``grad_fn(state, batch) -> vector`` (jitted; a float vector: the loss, the gradients
    and anything else to average, e.g. from ``jax.flatten_util.ravel_pytree``) and
    ``apply_fn(state, mean_vector) -> (state, metrics)`` (jitted).
    """
    def step(state, batch):
        return apply_fn(state, group.mean(np.asarray(grad_fn(state, batch))))

    return step
