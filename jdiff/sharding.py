"""The JAX runtime of a program: compilation cache, (later) meshes and multi-host set-up."""

from __future__ import annotations

import os
import pathlib

import jax


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Turn on JAX's persistent compilation cache, so a second run skips the compiles.

    Args:
      directory: default $JDIFF_JAX_CACHE, else ~/.cache/jdiff/jax.
    """
    default = os.environ.get("JDIFF_JAX_CACHE", pathlib.Path.home() / ".cache" / "jdiff" / "jax")
    path = pathlib.Path(directory or default).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
