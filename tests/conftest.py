"""Test setup: 8 fake CPU devices so sharding code runs on one machine."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, its workers and the CLI subprocesses the
# tests start: many tests compile the same tiny-model programs (an SFT start, a resumed run).
# Fresh per run (a stale cache could hide a compile error), under pytest's own cache directory.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax", str(os.getppid())
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
