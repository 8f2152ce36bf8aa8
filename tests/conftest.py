"""Shared test fixtures: float64 on demand, small random inputs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("MPLBACKEND", "Agg")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from iresnet_jax import tuning  # noqa: E402

# The CPU settings the binaries use (no restart: pytest's processes keep running).
tuning.setup(relaunch=False)

# Many tests compile the same programs (same model, fresh closures): a persistent
# compilation cache shared by the test processes turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("IRESNET_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "iresnet_jax_test_cache")))
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
