"""Test setup: 8 simulated CPU devices, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxclr import cpu  # noqa: E402

# As the jobs do, before the CPU backend starts (faster steps on XLA:CPU).
cpu.prepare()

import jax  # noqa: E402  (must follow the XLA_FLAGS above)

jax.config.update("jax_enable_x64", False)

import tempfile  # noqa: E402

# Identical programs are compiled by several tests (same model, same mesh);
# the persistent cache lets later ones reuse the executable.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXCLR_TEST_CACHE",
                                 os.path.join(tempfile.gettempdir(),
                                              "jaxclr_test_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
