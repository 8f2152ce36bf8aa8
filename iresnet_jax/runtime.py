"""Process-level settings for fast CPU runs: transparent huge pages for XLA's buffers.

XLA:CPU allocates the temporary buffers of every call anew (hundreds of MB for a log-det
training step of an image model) and glibc maps allocations above 32 MB fresh from the
kernel, so every call page-faults its whole working set back in, 4 KiB at a time. On the
2-core development VM this cost the ANCHORS.md density model 90,000 page faults and about
0.3 s of kernel time per log-det training step (a third of the step's CPU time). glibc's
tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes malloc ask for transparent huge
pages, which cuts the faults about 200-fold; see the README ("Page faults").

Tunables are read when a process starts, so a binary that wants them re-executes itself
once with the variable set (``relaunch_with_hugepages``); library users can instead
``export GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before starting Python. Nothing here
imports JAX.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
# Set by the relaunched process (guards against a loop); set it to 1 yourself to opt out.
NO_RELAUNCH = "IRESNET_JAX_NO_RELAUNCH"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def status() -> dict:
    """What a benchmark should record about the allocator of this process."""
    return {"glibc": ".".join(map(str, _glibc_version() or ())) or None,
            "transparent_hugepages": _thp_mode(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def relaunch_environment(environ=None) -> dict | None:
    """The environment to re-execute with, or ``None`` when a relaunch would not help.

    ``None`` when: the tunable is already set; ``IRESNET_JAX_NO_RELAUNCH`` is set; not
    Linux with glibc >= 2.35 (older glibc ignores the tunable); transparent huge pages are
    off (``never``) or unknown.
    """
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


def relaunch_with_hugepages() -> None:
    """Re-executes the running program with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

    Call it first thing in a binary's ``if __name__ == "__main__":`` block. Returns
    without doing anything where the setting cannot help (see ``relaunch_environment``)
    or where the command line is unknown; otherwise it does not return.
    """
    environ = relaunch_environment()
    argv = getattr(sys, "orig_argv", None)
    if environ is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + list(argv[1:]), environ)
