"""CPU tuning, in one place: what the binaries call once, and the measured choices.

On GPUs and TPUs nothing here runs. On a CPU backend ``setup()``:

* re-executes the program once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >=
  2.35, transparent huge pages available): XLA:CPU allocates every call's buffers anew,
  and without huge pages each call page-faults its working set back in, 4 KiB at a time;
* turns off partitionable threefry, whose draws of multi-dimensional shapes compile
  several times slower on XLA:CPU (random numbers differ from GPU runs; on one device
  nothing else changes).

``conv_impl(model)`` is the convolution implementation a config's ``conv="auto"`` means:
``"xla"`` off the CPU, and on a CPU the faster matrix-product forms measured for each
image model (docs/performance.md). Set ``IRESNET_JAX_NO_RELAUNCH=1`` to skip the restart.
"""

from __future__ import annotations

import os
import platform
import sys

import jax

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
NO_RELAUNCH = "IRESNET_JAX_NO_RELAUNCH"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"

# model name (``models.MODELS``) -> conv implementation on CPU
CPU_CONV = {"classifier": "matmul", "multiscale_density": "hybrid"}


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def conv_impl(model: str) -> str:
    """The implementation ``conv="auto"`` stands for in ``model`` on this backend."""
    return CPU_CONV.get(model, "xla") if on_cpu() else "xla"


def _glibc_version() -> tuple[int, ...] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def _thp_mode() -> str | None:
    """The active transparent-huge-page mode (``always``, ``madvise``, ``never``)."""
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepages_enabled(environ=None) -> bool:
    """Whether this process was started with ``glibc.malloc.hugetlb`` in its tunables."""
    environ = os.environ if environ is None else environ
    return TUNABLE in environ.get("GLIBC_TUNABLES", "")


def allocator_status() -> dict:
    """What a benchmark records about this process's allocator."""
    return {"glibc": ".".join(map(str, _glibc_version() or ())) or None,
            "transparent_hugepages": _thp_mode(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def relaunch_environment(environ=None) -> dict | None:
    """The environment to re-execute with, or ``None`` where a restart would not help
    (tunable already set, opted out, not Linux with glibc >= 2.35, huge pages off)."""
    environ = dict(os.environ if environ is None else environ)
    if hugepages_enabled(environ) or environ.get(NO_RELAUNCH):
        return None
    if not sys.platform.startswith("linux"):
        return None
    version = _glibc_version()
    if version is None or version < (2, 35) or _thp_mode() not in ("always", "madvise"):
        return None
    existing = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = f"{existing}:{SETTING}" if existing else SETTING
    environ[NO_RELAUNCH] = "1"
    return environ


def setup(*, relaunch: bool = True) -> None:
    """What a binary calls first in ``main``; does nothing off the CPU.

    ``relaunch``: re-execute the program once with huge pages (this call then does not
    return); ``False`` only sets the in-process options (tests, notebooks).
    """
    if not on_cpu():
        return
    if relaunch:
        environ = relaunch_environment()
        argv = getattr(sys, "orig_argv", None)
        if environ is not None and argv and sys.executable:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable] + list(argv[1:]), environ)
    jax.config.update("jax_threefry_partitionable", False)
