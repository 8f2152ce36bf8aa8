"""Shared test settings and fixtures: 8 simulated CPU devices, fast compiles, a shared
compilation cache, float64 on demand."""

import os
import tempfile

# The tests check values, not speed: XLA's cheapest code generation compiles in about
# two thirds of the time. Subprocesses (binaries, notebook kernels) inherit the settings.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("MPLBACKEND", "Agg")
# Many tests compile the same programs (same model, fresh closures): a persistent
# compilation cache shared by the test processes and their subprocesses turns the
# repeats into cache hits.
CACHE = os.environ.get("IRESNET_TEST_JAX_CACHE",
                       os.path.join(tempfile.gettempdir(), "iresnet_jax_test_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from iresnet_jax import tuning  # noqa: E402

# The CPU settings the binaries use (no restart: pytest's processes keep running).
tuning.setup(relaunch=False)

jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def x64():
    """Runs the test with 64-bit floats enabled (for comparisons against dense linear algebra)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    return jax.random.key(0)
