"""The README and docs/ stay right: every Python block runs, every command names modules,
flags, config files and config fields that exist, and no text points outside the
repository."""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _blocks(page: pathlib.Path, kinds: tuple[str, ...]) -> list[str]:
    return [body for kind, body in FENCE.findall(page.read_text()) if kind in kinds]


def _ids(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, ("python",))], ids=_ids)
def test_python_blocks_run(page, tmp_path):
    """The Python blocks of a page run in order in one fresh interpreter."""
    code = "\n\n".join(_blocks(page, ("python",)))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _commands(page: pathlib.Path) -> list[list[str]]:
    """Every ``python -m module ...`` command of the page's shell blocks."""
    out = []
    for body in _blocks(page, ("bash", "sh")):
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for part in re.split(r"&&|;", line.split(" #")[0]):
                words = shlex.split(part)
                if len(words) > 2 and words[0] in ("python", "python3") and words[1] == "-m":
                    out.append(words[2:])
    return out


@functools.lru_cache(maxsize=None)
def _help(module: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return done.stdout + done.stderr


def _config_has(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


def _load_config(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("doc_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


DEFAULT_CONFIGS = {"experiments.toy_density": "experiments/configs/toy_default.py",
                   "experiments.toy_compare": "experiments/configs/toy_default.py"}


@pytest.mark.parametrize("page", [p for p in PAGES if _commands(p)], ids=_ids)
def test_commands_name_what_exists(page):
    sys.path.insert(0, str(ROOT))
    for words in _commands(page):
        module, args = words[0], words[1:]
        if module in ("pip", "venv", "pytest"):
            continue
        assert importlib.util.find_spec(module) is not None, f"{page.name}: no module {module}"
        config_path = DEFAULT_CONFIGS.get(module)
        overrides = []
        for arg in args:
            if not arg.startswith("--"):
                continue
            name, _, value = arg[2:].partition("=")
            if name == "config":
                config_path = value
            elif name.startswith("config."):
                overrides.append(name[len("config."):])
            else:
                assert re.search(rf"--(\[no\])?{re.escape(name)}\b", _help(module)), (
                    f"{page.name}: {module} has no flag --{name}")
        if config_path or overrides:
            assert config_path, f"{page.name}: {module} overrides config fields without one"
            assert (ROOT / config_path).exists(), f"{page.name}: no file {config_path}"
            config = _load_config(ROOT / config_path)
            for field in overrides:
                assert _config_has(config, field), (
                    f"{page.name}: {config_path} has no field {field}")


def test_no_text_points_outside_the_repository():
    pattern = re.compile(r"ANCHORS\.md|SPEC\.md|SPEC section|\.\./shared")
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.ipynb"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    bad = [f for f in files if (ROOT / f).exists() and f != "tests/test_docs.py"
           and pattern.search((ROOT / f).read_text(errors="ignore"))]
    assert bad == []


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
