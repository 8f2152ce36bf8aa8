"""absl-flag binaries (``python -m experiments.<name> --help``) and their configs.

Every binary calls ``setup_run()`` first in ``main``: the CPU tuning of
``iresnet_jax.tuning`` (nothing off the CPU), quieter logs, JAX's persistent compilation
cache (``--compilation_cache_dir``), so a resumed or repeated run loads its compiled
steps instead of compiling them again, and with ``--jax_distributed``
``jax.distributed.initialize()`` (multi-host runs).
"""

import os

from absl import flags, logging

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "iresnet_jax", "xla")

_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", DEFAULT_CACHE_DIR,
    "Directory of JAX's persistent compilation cache (programs that took over a second "
    "to compile are stored and reused by later runs); empty to turn it off. "
    "JAX_COMPILATION_CACHE_DIR, when set, takes precedence.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Connect this process to the others of a multi-host run "
    "with jax.distributed.initialize(), which detects the cluster (SLURM, TPU pods) or "
    "takes --coordinator_address, --num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-host runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id (multi-host runs).")


def quiet_logs() -> None:
    """Log at WARNING unless ``--verbosity`` was given (Orbax logs every save at INFO)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def use_compilation_cache(path: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at ``path`` (default: the flag) and
    returns the directory in use, or ``None`` when it is off. ``JAX_COMPILATION_CACHE_DIR``
    takes precedence."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = _CACHE_DIR.value if path is None else path
    if not path:
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def setup_run(*, cache: bool = True) -> None:
    """What every binary does first: quiet logs, the connection to the other processes
    of a run (``train.distributed.initialize``), the CPU tuning and (``cache``) the
    compilation cache."""
    from iresnet_jax import tuning
    from iresnet_jax.train import distributed

    quiet_logs()
    connected = distributed.initialize(
        auto=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    tuning.setup(relaunch=not connected)   # a restart would drop the connection
    if cache:
        use_compilation_cache()
