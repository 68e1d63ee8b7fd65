"""The JAX runtime of a program: meshes, shardings as data, multi-host set-up, compile cache,
the host allocator.

One `Mesh` with axes ("data", "fsdp"). A batch is split over both; a parameter (or optimizer
moment) is split over "fsdp" along its largest divisible axis when it is big enough, otherwise
replicated. With fsdp = 1 that is plain data parallelism. Model code never names an axis: these
shardings are given to `jax.jit`, and XLA inserts the collectives. A program is traced with its
mesh as the context mesh (`traced_in`), for the one kind of model code XLA cannot partition: a
Pallas kernel, which `nn.attention` runs in `shard_map` over all the mesh's axes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(*, data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ("data", "fsdp") mesh. data = -1 takes all devices not used by fsdp; an explicit
    data x fsdp smaller than the device count uses the first devices (one process only).

    Built with `Mesh` directly: its axes are Auto, under which a data-parallel `jit(grad)` is
    partitioned by XLA (`jax.make_mesh` defaults to Explicit axes in this JAX).
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or data == 0 or data < -1:
        raise ValueError(f"mesh data={data}, fsdp={fsdp}: need fsdp >= 1 and data >= 1 (or -1)")
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp > len(devices):
        raise ValueError(f"mesh data x fsdp = {data * fsdp} > {len(devices)} devices")
    if data * fsdp < len(devices) and jax.process_count() > 1:
        raise ValueError("on several processes the mesh must span every device (data=-1)")
    return Mesh(np.asarray(devices[: data * fsdp]).reshape(data, fsdp), AXES)


def traced_in(mesh: Mesh, fn):
    """`fn`, traced with `mesh` as the context mesh (`jax.sharding.use_abstract_mesh`): what
    `nn.attention` reads to choose a kernel for the mesh's platform (a TPU topology's, when
    compiled from the CPU) and to lay a Pallas kernel over the devices. Wrap before `jax.jit`."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole by every device of `mesh`."""
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shape: tuple[int, ...], *, min_size: int = 2**18) -> NamedSharding:
    """Split the largest axis divisible by the fsdp size over "fsdp" for arrays of at least
    `min_size` elements (small ones are cheaper replicated); otherwise replicate."""
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(mesh: Mesh, abstract_tree: Any, *, min_size: int = 2**18) -> Any:
    """`param_sharding` for every leaf of a tree of arrays or ShapeDtypeStructs (a whole train
    state: parameters, EMA and optimizer moments shard alike; scalars replicate)."""
    return jax.tree.map(lambda x: param_sharding(mesh, x.shape, min_size=min_size), abstract_tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: a restore target that lands arrays in place."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble the global batch from each process's rows (its contiguous share, in order)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def initialize_distributed(
    *,
    coordinator_address: str = "",
    num_processes: int = 1,
    process_id: int = 0,
    auto: bool = False,
    timeout_s: int = 300,
) -> bool:
    """`jax.distributed.initialize` when asked: explicitly (num_processes > 1), by `auto` (TPU
    pods, SLURM and other clusters JAX detects), or by $JAX_COORDINATOR_ADDRESS. A coordinator
    that does not answer within `timeout_s` is an error, not a hang. True if initialised."""
    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=timeout_s,
        )
        return True
    if auto or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    return False


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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def reuse_host_memory() -> bool:
    """Keep the host memory this process frees for its next allocations (glibc's `mallopt`: no
    mmap for large blocks, no trimming of the heap), so the buffers XLA's CPU backend allocates
    and frees on every call come back without being page-faulted in again. On the CPU it makes
    a small U-Net's call about a quarter faster (`benchmarks/RESULTS.md`); the cost is that the
    process keeps its peak memory until it exits. `sample.py` and `train.py` call it; a library
    user may. Returns False (and changes nothing) off the CPU backend (the backend is initialised:
    call it after `initialize_distributed`) or where the C library has no `mallopt`."""
    if jax.default_backend() != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
