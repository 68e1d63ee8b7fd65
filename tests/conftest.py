"""Test set-up: 8 CPU devices, JAX's persistent compilation cache, the repo on sys.path."""

import os
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # train.py, sample.py, configs/

# eight simulated CPU devices for the sharding tests (before any backend starts); everything
# else runs on the first
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("JDIFF_JAX_CACHE", str(ROOT / ".jax_cache"))
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
