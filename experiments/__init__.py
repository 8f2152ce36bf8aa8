"""absl-flag experiment binaries (``python -m experiments.<name> --help``)."""

from absl import flags, logging


def quiet_logs() -> None:
    """Log at WARNING unless ``--verbosity`` was given (Orbax logs every save at INFO)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
