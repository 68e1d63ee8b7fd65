"""The accelerators a run can be compiled for without one attached: each chip's published
figures (`CHIPS`: HBM per chip, bf16 peak, HBM bandwidth), topology names ("v5e:2x4" for a TPU
slice, "h100:8" / "h100:2x8" for NVIDIA GPUs: `chip_of`), and their abstract devices
(`topology_devices`): XLA's TPU compiler from libtpu (the `[tpu]` extra), its GPU compiler
from JAX's CUDA plugin and cuDNN (the `[gpu-aot]` extra), each reading the chip's description
instead of the hardware. `jdiff.aot` compiles for them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile

from jdiff.validate import InputError


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator's published figures: memory (HBM) per chip, dense bf16 peak, HBM
    bandwidth; a GPU's `target` is its description for XLA's GPU compiler (`gpu_target`)."""

    name: str
    hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float
    platform: str = "tpu"  # or "gpu"
    target: str = ""


def gpu_target(name: str, *, sms: int, clock_ghz: float, smem_per_sm: int, smem_per_block: int,
               l2: int, memory: int, bandwidth: float, capability: tuple[int, int],
               fp32_per_sm: int) -> str:  # fmt: skip
    """An NVIDIA GPU as XLA's GPU compiler reads it without one attached (its
    `GpuTargetConfigProto` in text form): the multiprocessors, their shared memory and
    registers, the L2 cache, the memory and its bandwidth, the compute capability, cuDNN 9.12
    (the oldest jax[cuda13] 0.10.2 takes) and CUDA 13."""
    major, minor = capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_sm} threads_per_core_limit: 2048 core_count: {sms}
  fpus_per_core: {fp32_per_sm} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {int(bandwidth)} l2_cache_size: {l2}
  clock_rate_ghz: {clock_ghz} device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_per_block}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 }}
device_description_str: "{name}"
"""


def _gpu(name: str, tflops: float, **spec) -> Chip:
    target = gpu_target(name, **spec)
    return Chip(name, spec["memory"] / 2**30, tflops, spec["bandwidth"] / 1e9, "gpu", target)


# NVIDIA's published figures (SXM parts; memory as CUDA reports it: 80 GB parts hold a little
# under 80 GiB), dense bf16 peaks without sparsity
_HOPPER = dict(sms=132, clock_ghz=1.98, smem_per_sm=233472, smem_per_block=232448,
               l2=50 * 2**20, capability=(9, 0), fp32_per_sm=128)  # fmt: skip
CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1228),
    "v5e": Chip("TPU v5e", 16, 197, 819),
    "v5p": Chip("TPU v5p", 95, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 918, 1640),
    "a100": _gpu(
        "NVIDIA A100-SXM4-80GB",
        312,
        sms=108,
        clock_ghz=1.41,
        smem_per_sm=167936,
        smem_per_block=166912,
        l2=40 * 2**20,
        memory=81920 * 2**20,
        bandwidth=2.039e12,
        capability=(8, 0),
        fp32_per_sm=64,
    ),
    "h100": _gpu("NVIDIA H100 80GB HBM3", 989, memory=81559 * 2**20, bandwidth=3.35e12, **_HOPPER),
    "h200": _gpu("NVIDIA H200", 989, memory=143771 * 2**20, bandwidth=4.8e12, **_HOPPER),
}


def usable_gib(chip: Chip) -> float:
    """The memory a run may use of one chip: a TPU's HBM; of a GPU's, the share JAX's allocator
    takes, `XLA_PYTHON_CLIENT_MEM_FRACTION` (0.75 unless set in this environment, as it would
    be in the run's)."""
    if chip.platform != "gpu":
        return chip.hbm_gib
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction <= 1:  # NaN too
        raise InputError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r}: the share of a GPU's "
                         "memory JAX takes is a number in (0, 1], 0.75 by default")  # fmt: skip
    return chip.hbm_gib * fraction


def chip_of(topology: str, flag: str = "--topology") -> Chip:
    """The chip of a topology name: a TPU slice ("v5e:2x2", "v5p:4x4x4", ...) or NVIDIA GPUs
    ("h100:8": eight in one host; "h100:2x8": two hosts of eight); InputError otherwise."""
    kind, sep, shape = topology.partition(":")
    chip = CHIPS.get(kind)
    pattern = r"\d+(x\d+)?" if chip is not None and chip.platform == "gpu" else r"\d+(x\d+){1,2}"
    if chip is None or not sep or not re.fullmatch(pattern, shape):
        raise InputError(f"{flag} {topology!r}: expected <chip>:<shape> with a chip of "
                         f"{sorted(CHIPS)}: v5e:2x2, v5e:8x8, v5p:2x2x1, ... for TPUs, h100:8 "
                         "(GPUs in one host) or h100:2x8 (hosts x GPUs) for GPUs")  # fmt: skip
    return chip


@contextlib.contextmanager
def _captured_output(sink: list[str]):
    """libtpu, loaded off a TPU VM, prints its probes of the missing hardware on the process'
    own stdout and stderr: they are kept in `sink`, not shown."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile("w+") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            sink.append(f.read())


def topology_devices(topology: str, flag: str = "--topology") -> list:
    """The abstract devices of `topology` (no TPU or GPU attached needed; libtpu, or JAX's CUDA
    plugin and cuDNN, installed are)."""
    chip = chip_of(topology, flag)
    import importlib.util

    if chip.platform == "gpu":
        return _gpu_devices(topology, chip, flag)
    if importlib.util.find_spec("libtpu") is None:
        raise InputError(f"{flag} {topology}: compiling for a TPU needs libtpu, which is "
                         "not installed: pip install -e '.[tpu]'")  # fmt: skip
    from jax.experimental import topologies

    # libtpu's lockfile keeps a second process off a host's chips; this one uses none, so
    # compiles may run side by side (and on a TPU VM beside its training)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    probes: list[str] = []
    try:
        with _captured_output(probes):
            description = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # libtpu's own errors for a shape it does not have
        first = (str(e).splitlines() or [""])[0][:200]
        raise InputError(f"{flag} {topology}: libtpu has no such topology "
                         f"({type(e).__name__}: {first})") from None  # fmt: skip
    return list(description.devices)


def _gpu_devices(topology: str, chip: Chip, flag: str) -> list:
    """The abstract GPUs of "h100:8" / "h100:2x8" from JAX's CUDA plugin, described by the
    chip's target (`costs.gpu_target`) rather than by an attached GPU."""
    import importlib.util

    if importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
        raise InputError(f"{flag} {topology}: compiling for an NVIDIA GPU needs JAX's CUDA "
                         "plugin and cuDNN, which are not installed: "
                         "pip install -e '.[gpu-aot]'")  # fmt: skip
    from jax.experimental import topologies

    hosts, _, gpus = topology.partition(":")[2].rpartition("x")
    description = topologies.get_topology_desc(platform="cuda", target_config=chip.target,
                                               topology=f"1x{hosts or 1}x{gpus}")  # fmt: skip
    return list(description.devices)
