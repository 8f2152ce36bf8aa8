"""Process-level settings of the binaries: the CPU tuning (``iresnet_jax.tuning``) and the
persistent compilation cache (``experiments``)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from iresnet_jax import tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def supported(monkeypatch):
    """A Linux machine with glibc 2.36 and transparent huge pages on request."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(tuning, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(tuning, "_thp_mode", lambda: "madvise")


def test_relaunch_environment_sets_the_tunable_and_the_loop_guard(supported):
    env = tuning.relaunch_environment({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env[tuning.NO_RELAUNCH] == "1" and env["PATH"] == "/bin"
    # The relaunched process (or a user who exported the tunable) is left alone.
    assert tuning.relaunch_environment(env) is None
    assert tuning.hugepages_enabled(env)


def test_relaunch_environment_keeps_the_users_other_tunables(supported):
    env = tuning.relaunch_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_no_relaunch_where_it_cannot_help(supported, monkeypatch):
    assert tuning.relaunch_environment({tuning.NO_RELAUNCH: "1"}) is None
    monkeypatch.setattr(tuning, "_thp_mode", lambda: "never")
    assert tuning.relaunch_environment({}) is None
    monkeypatch.setattr(tuning, "_thp_mode", lambda: "always")
    monkeypatch.setattr(tuning, "_glibc_version", lambda: (2, 31))   # tunable unknown
    assert tuning.relaunch_environment({}) is None
    monkeypatch.setattr(tuning, "_glibc_version", lambda: None)      # musl, macOS
    assert tuning.relaunch_environment({}) is None
    monkeypatch.setattr(tuning, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tuning.relaunch_environment({}) is None


def test_relaunch_restarts_the_program_once_with_the_same_arguments(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(
        "import os, sys\n"
        "from iresnet_jax import tuning\n"
        "print('start', sys.argv[1:], flush=True)\n"
        "tuning.setup()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", tuning.NO_RELAUNCH)}
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    if tuning.relaunch_environment(env) is None:   # this machine: nothing to gain
        assert out == ["start ['--flag=1']", "tunables "]
    else:
        assert out == ["start ['--flag=1']", "start ['--flag=1']",
                       "tunables glibc.malloc.hugetlb=1"]


def test_status_reports_the_setting():
    s = tuning.allocator_status()
    assert set(s) == {"glibc", "transparent_hugepages", "glibc_tunables"}
    assert s["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", "")


def test_the_package_is_an_ordinary_import_of_the_public_api():
    code = ("import sys\n"
            "import iresnet_jax\n"
            "assert 'jax' in sys.modules and 'flax' in sys.modules\n"
            "for name in ('logdet.power_series', 'logdet.LogDetConfig', 'inverse.fixed_point',"
            " 'inverse.InverseConfig', 'lipschitz.conv_singular_values', 'conv.conv2d',"
            " 'layers.SpectralConv', 'blocks.InvertibleBlock', 'flow.DensityFlow',"
            " 'models.build', 'load'):\n"
            "    obj = iresnet_jax\n"
            "    for part in name.split('.'):\n"
            "        obj = getattr(obj, part)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "ok"


def test_conv_implementation_and_threefry_are_chosen_by_backend(monkeypatch):
    import jax

    assert tuning.conv_impl("classifier") == "matmul"            # these tests run on CPU
    assert tuning.conv_impl("multiscale_density") == "hybrid"
    assert tuning.conv_impl("toy_iresnet") == "xla"
    before = jax.config.jax_threefry_partitionable
    try:
        tuning.setup(relaunch=False)
        assert jax.config.jax_threefry_partitionable is False
    finally:
        jax.config.update("jax_threefry_partitionable", before)
    monkeypatch.setattr(tuning, "on_cpu", lambda: False)         # a GPU or TPU backend
    assert tuning.conv_impl("classifier") == "xla"
    jax.config.update("jax_threefry_partitionable", True)
    try:
        tuning.setup()                                          # does nothing there
        assert jax.config.jax_threefry_partitionable is True
    finally:
        jax.config.update("jax_threefry_partitionable", before)


@pytest.mark.parametrize("binary", ["train", "evaluate", "toy_compare",
                                    "analyses/__main__"])
def test_binaries_set_up_first(binary):
    """Each binary's ``main`` starts with ``setup_run`` (CPU tuning, logs, cache)."""
    path = ROOT / "experiments" / f"{binary}.py"
    text = path.read_text()
    main = text[text.index("def main("):]
    body = [line.strip() for line in main.splitlines()[1:] if line.strip()
            and not line.strip().startswith(("if len(argv)", "raise app.UsageError",
                                             "del argv", '"""'))]
    assert body[0].startswith("setup_run("), body[:3]
    # The restart lives in iresnet_jax.tuning and nowhere else in the library.
    library = [p for p in (ROOT / "iresnet_jax").rglob("*.py") if "execve" in p.read_text()]
    assert [p.name for p in library] == ["tuning.py"]


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
