"""Command-line overrides of a config (``--config.<field>=value``) checked against it, so a
misspelled field is named with the nearest valid ones instead of a traceback."""

from __future__ import annotations

import difflib
import importlib.util
import sys

import ml_collections


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
    """``None`` if ``path`` (``"model.logdet.n_terms"``) names a field of ``config``,
    else a message naming the unknown part and the nearest valid fields."""
    node, seen = config, []
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            where = "config" + "".join(f".{p}" for p in seen)
            near = difflib.get_close_matches(part, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(where + '.' + n for n in near)}?" if near else ""
            return (f"unknown config field {where}.{part}{hint} (fields of {where}: "
                    f"{', '.join(valid) or 'none, it is a value'})")
        node, seen = node[part], seen + [part]
    return None


def override_paths(argv: list[str], flag: str = "config") -> list[str]:
    """The field paths of the ``--<flag>.<path>=value`` arguments in ``argv``."""
    prefix = f"--{flag}."
    return [a[len(prefix):].split("=", 1)[0] for a in argv if a.startswith(prefix)]


def load(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file ``path``."""
    spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_argv(argv: list[str] | None = None, default_config: str | None = None,
               flag: str = "config") -> None:
    """Exits with a message (status 1) if an override in
    ``argv`` names no field of the config file given by ``--<flag>=`` (or
    ``default_config``); call it before ``app.run``."""
    argv = sys.argv if argv is None else argv
    paths = override_paths(argv, flag)
    files = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")]
    config_file = files[-1] if files else default_config
    if not paths or not config_file:
        return
    config = load(config_file.split(":", 1)[0])
    for path in paths:
        message = unknown_field(config, path)
        if message:
            sys.exit(f"FATAL Flags parsing error: --{flag}.{path}: {message}")
