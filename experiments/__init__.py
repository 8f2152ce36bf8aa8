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
    "jax_distributed", False, "Call jax.distributed.initialize() first (multi-host runs; "
    "the cluster is detected from the environment).")


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
    """What every binary does first: quiet logs, ``jax.distributed.initialize()`` when
    asked, the CPU tuning and (``cache``) the compilation cache."""
    import jax

    from iresnet_jax import tuning

    quiet_logs()
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    tuning.setup()
    if cache:
        use_compilation_cache()
