"""Process-level settings of the binaries: the allocator relaunch
(``iresnet_jax.runtime``) and the persistent compilation cache (``experiments``)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from iresnet_jax import runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def supported(monkeypatch):
    """A Linux machine with glibc 2.36 and transparent huge pages on request."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "madvise")


def test_relaunch_environment_sets_the_tunable_and_the_loop_guard(supported):
    env = runtime.relaunch_environment({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env[runtime.NO_RELAUNCH] == "1" and env["PATH"] == "/bin"
    # The relaunched process (or a user who exported the tunable) is left alone.
    assert runtime.relaunch_environment(env) is None
    assert runtime.hugepages_enabled(env)


def test_relaunch_environment_keeps_the_users_other_tunables(supported):
    env = runtime.relaunch_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_no_relaunch_where_it_cannot_help(supported, monkeypatch):
    assert runtime.relaunch_environment({runtime.NO_RELAUNCH: "1"}) is None
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "never")
    assert runtime.relaunch_environment({}) is None
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "always")
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 31))   # tunable unknown
    assert runtime.relaunch_environment({}) is None
    monkeypatch.setattr(runtime, "_glibc_version", lambda: None)      # musl, macOS
    assert runtime.relaunch_environment({}) is None
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runtime.relaunch_environment({}) is None


def test_relaunch_restarts_the_program_once_with_the_same_arguments(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(
        "import os, sys\n"
        "from iresnet_jax import runtime\n"
        "print('start', sys.argv[1:], flush=True)\n"
        "runtime.relaunch_with_hugepages()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", runtime.NO_RELAUNCH)}
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    if runtime.relaunch_environment(env) is None:   # this machine: nothing to gain
        assert out == ["start ['--flag=1']", "tunables "]
    else:
        assert out == ["start ['--flag=1']", "start ['--flag=1']",
                       "tunables glibc.malloc.hugetlb=1"]


def test_status_reports_the_setting():
    s = runtime.status()
    assert set(s) == {"glibc", "transparent_hugepages", "glibc_tunables"}
    assert s["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", "")


def test_runtime_and_the_package_import_without_jax():
    """The binaries restart before their heavy imports: ``iresnet_jax.runtime`` (and the
    package itself, whose submodules load on first use) must not import JAX."""
    code = ("import sys\n"
            "import iresnet_jax\n"
            "from iresnet_jax import runtime\n"
            "assert 'jax' not in sys.modules, 'runtime imported jax'\n"
            "assert iresnet_jax.lipschitz.conv2d is not None\n"
            "assert 'jax' in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "ok"
    with pytest.raises(AttributeError, match="no attribute"):
        import iresnet_jax
        iresnet_jax.not_a_module  # noqa: B018


@pytest.mark.parametrize("binary", ["train", "evaluate", "analyses"])
def test_binaries_restart_before_importing_jax(binary):
    """The restart call comes before the first ``import jax`` of each binary."""
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", f"{binary}.py")
    with open(path) as f:
        text = f.read()
    assert 0 < text.index("runtime.relaunch_with_hugepages()") < text.index("import jax")


def test_binaries_keep_compiled_programs_in_the_persistent_cache(tmp_path):
    """``--compilation_cache_dir`` (read by every training/evaluation binary through
    ``experiments.setup_run``) makes JAX write the compiled programs of a fresh process
    there."""
    cache = tmp_path / "cache"
    code = textwrap.dedent(f"""
        from absl import flags
        import experiments
        flags.FLAGS(["prog", "--compilation_cache_dir={cache}"])
        print(experiments.use_compilation_cache())
        import jax
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
        """)
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=env, cwd=str(ROOT))
    assert out.stdout.strip().splitlines()[-1] == str(cache)
    assert any(cache.iterdir()), "no compiled program was written to the cache"


def test_compilation_cache_can_be_turned_off_and_defers_to_jax_env(monkeypatch):
    import experiments
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert experiments.use_compilation_cache("") is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
    assert experiments.use_compilation_cache("/not/this") == "/somewhere/else"
