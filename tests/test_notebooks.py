"""The Colab notebooks in ``notebooks/``.

* They are committed without outputs, execution counts or execution timings.
* Every name they import or reach by attribute from ``iresnet_jax`` (or ``experiments``)
  exists in the library (static check with ``ast``: a rename breaks this test before
  anyone opens a notebook).
* Each runs top to bottom in a fresh kernel, offline, at the tiny settings selected by
  ``IRESNET_NOTEBOOK_QUICK=1``, and shows its plots inline.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import pathlib
import tempfile
import time
import types

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "classifier.ipynb", "density.ipynb"}
CHECKED_PACKAGES = ("iresnet_jax", "experiments")
CELL_TIMEOUT_S = 1200   # per cell; generous for a loaded 2-core machine


def _ids(path: pathlib.Path) -> str:
    return path.stem


def _code(nb) -> str:
    """The notebook's code cells as one Python source (IPython magics and shell lines
    blanked, so line numbers still match)."""
    lines = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            lines.append("" if line.lstrip().startswith(("%", "!")) else line)
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Static checks.


def test_the_notebooks_exist():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name}: code cell {i} has outputs (clear them)"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
        assert "execution" not in cell.metadata, f"{path.name}: code cell {i} has timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_installs_first_and_has_quick_settings(path):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    assert "pip" in first and "install" in first and "git+" in first, first
    assert 'find_spec("iresnet_jax")' in first, "the install must be skipped when installed"
    assert "REPO_URL" in first and "PLACEHOLDER" in first
    assert "IRESNET_NOTEBOOK_QUICK" in _code(nb)


def _resolve(dotted: str):
    """The object named by a dotted path (modules imported as needed), or raise."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        obj = _attribute(obj, part, ".".join(parts[:i]))
    return obj


_UNKNOWN = object()


def _attribute(obj, name: str, prefix: str):
    """``obj.name`` for modules (importing submodules) and classes (attributes, dataclass
    fields, annotations); ``_UNKNOWN`` for anything whose attributes cannot be known
    statically (instances, functions). Raises ``AttributeError`` if it does not exist."""
    if obj is _UNKNOWN:
        return _UNKNOWN
    if isinstance(obj, types.ModuleType):
        if hasattr(obj, name):
            return getattr(obj, name)
        try:
            return importlib.import_module(f"{obj.__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{obj.__name__}.{name}":
                raise
            raise AttributeError(f"{prefix}.{name}") from None
    if inspect.isclass(obj):
        if hasattr(obj, name):
            return getattr(obj, name)
        fields = ({f.name for f in dataclasses.fields(obj)}
                  if dataclasses.is_dataclass(obj) else set())
        annotations = set()
        for klass in obj.__mro__:
            annotations |= set(getattr(klass, "__annotations__", {}))
        if name in fields or name in annotations:
            return _UNKNOWN
        raise AttributeError(f"{prefix}.{name}")
    return _UNKNOWN


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """``a.b.c`` as ``("a", ["b", "c"])``, or ``None`` if it does not start at a name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return node.id, attrs[::-1]


def missing_library_names(source: str) -> list[str]:
    """Names of ``iresnet_jax`` / ``experiments`` that ``source`` imports or reaches by
    attribute access from an imported module or class, and that do not exist."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}   # local name -> dotted path in a checked package
    missing: list[str] = []

    def checked(module: str | None) -> bool:
        return bool(module) and module.split(".")[0] in CHECKED_PACKAGES

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not checked(alias.name):
                    continue
                try:
                    importlib.import_module(alias.name)
                except ModuleNotFoundError:
                    missing.append(alias.name)
                    continue
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and checked(node.module):
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                try:
                    _resolve(dotted)
                except (AttributeError, ModuleNotFoundError):
                    missing.append(dotted)
                    continue
                aliases[alias.asname or alias.name] = dotted

    # A name the code assigns to is not (only) the imported object: do not check it.
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            aliases.pop(node.id, None)
        elif isinstance(node, ast.arg):
            aliases.pop(node.arg, None)

    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _chain(node)
        if chain is None or chain[0] not in aliases:
            continue
        name, attrs = chain
        dotted = ".".join([aliases[name]] + attrs)
        try:
            _resolve(dotted)
        except (AttributeError, ModuleNotFoundError):
            missing.append(dotted)
    return sorted(set(missing))


def test_name_check_catches_missing_names():
    source = "\n".join([
        "import iresnet_jax",
        "import iresnet_jax.no_such_module",
        "from iresnet_jax import logdet, no_such_name",
        "from iresnet_jax.train import evaluation as ev",
        "from iresnet_jax.models import ToyIResNet",
        "logdet.exact(g, x)",
        "logdet.no_such_function(g, x)",
        "ev.block_lipschitz_bounds",
        "ev.BlockBound.lipschitz",                     # a dataclass field: fine
        "ev.BlockBound.no_such_field",
        "iresnet_jax.lipschitz.conv_singular_values",
        "iresnet_jax.lipschitz.not_there",
        "ToyIResNet.log_prob",
        "ToyIResNet.no_such_method",
        "config = object()",
        "config.anything",                               # not a library name
    ])
    assert missing_library_names(source) == sorted([
        "iresnet_jax.no_such_module", "iresnet_jax.no_such_name",
        "iresnet_jax.logdet.no_such_function",
        "iresnet_jax.train.evaluation.BlockBound.no_such_field",
        "iresnet_jax.lipschitz.not_there",
        "iresnet_jax.models.ToyIResNet.no_such_method",
    ])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_uses_only_existing_library_names(path):
    nb = nbformat.read(path, as_version=4)
    source = _code(nb)
    assert missing_library_names(source) == []
    # The check saw the library at all (guards against a parser that silently skips).
    assert "iresnet_jax" in source


# --------------------------------------------------------------------------------------
# Execution.


def _kernel_name(tmp_path: pathlib.Path, monkeypatch) -> str:
    """``python3``, the kernel that ipykernel provides (jupyter_client runs it with this
    interpreter). Where no spec named so can be found, ipykernel installs one into a
    temporary prefix that ``JUPYTER_PATH`` then points at."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
        return "python3"
    except NoSuchKernel:
        from ipykernel import kernelspec

        prefix = tmp_path / "jupyter_prefix"
        kernelspec.install(kernel_name="python3", prefix=str(prefix))
        monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
            [str(prefix / "share" / "jupyter")] + [p for p in [os.environ.get("JUPYTER_PATH")]
                                                   if p]))
        return "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_at_quick_settings(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this process's environment: quick settings, this checkout's
    # package first, temporary directories (the notebooks' workdirs) under tmp_path, the
    # suite's persistent compilation cache and fast compiles; no Agg backend and no
    # simulated devices (set by conftest for the other tests): plots must render inline on
    # one CPU device, as in Colab.
    monkeypatch.setenv("IRESNET_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setenv("TMPDIR", str(work))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    from conftest import FAST_COMPILE

    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    cache = os.environ.get("IRESNET_TEST_JAX_CACHE",
                           os.path.join(tempfile.gettempdir(), "iresnet_jax_test_cache"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    kernel = _kernel_name(tmp_path, monkeypatch)

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.time()
    client.execute()   # raises CellExecutionError, with the cell and traceback, on failure
    seconds = time.time() - start
    print(f"{path.name}: {seconds:.0f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} showed no plot"
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "quick settings" in text     # the kernel saw IRESNET_NOTEBOOK_QUICK=1
