"""absl-flag experiment binaries (``python -m experiments.<name> --help``).

The training and evaluation binaries call ``setup_run()`` first thing in ``main``: quieter
logs, and a persistent cache of compiled XLA programs (``--compilation_cache_dir``), so
that a resumed or repeated run loads its training and evaluation steps instead of
compiling them again (the ANCHORS.md density model's log-det training step: 21.5 s to
trace, lower and compile, 4.7 s from the cache on a 2-core CPU). ``analyses`` calls only
``quiet_logs()``: its runtime table reports compile seconds.
"""

import os

from absl import flags, logging

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "iresnet_jax", "xla")

_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", DEFAULT_CACHE_DIR,
    "Directory of JAX's persistent compilation cache (programs that took over a second "
    "to compile are stored and reused by later runs); empty to turn it off. "
    "JAX_COMPILATION_CACHE_DIR, when set, takes precedence.")


def quiet_logs() -> None:
    """Log at WARNING unless ``--verbosity`` was given (Orbax logs every save at INFO)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def use_compilation_cache(path: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at ``path`` (default: the
    ``--compilation_cache_dir`` flag) and returns the directory in use, or ``None`` when
    it is off. Leaves JAX's setting alone when ``JAX_COMPILATION_CACHE_DIR`` is set."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = _CACHE_DIR.value if path is None else path
    if not path:
        return None
    import jax  # not at import time: train.py relaunches itself before importing JAX

    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def setup_run() -> None:
    """What every binary does first: ``quiet_logs()`` and ``use_compilation_cache()``."""
    quiet_logs()
    use_compilation_cache()
