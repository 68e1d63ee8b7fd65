"""Train a diffusion model, or the autoencoder of a latent diffusion model.

    python train.py [--config configs/<name>.py[:variant]] [--workdir DIR] [--config.key=value]
    python train.py --config ... --compile_for v5e:4x4   # sized for a TPU topology, no TPU
    python train.py --config ... --compile_for h100:8    # or for eight H100s, no GPU

With no arguments: the embedded default (configs/default.py, 8x8 digits, offline) into
./outputs/default. A config with `task = "autoencoder"` (configs/vae_shapes.py) trains an
AutoencoderKL instead and ends by measuring its held-out PSNR and latent scaling factor, stored
in the workdir's autoencoder.json. Rerunning the same command resumes from the workdir's latest
checkpoint; SIGTERM saves one before exiting. The workdir holds config.json (the model is rebuilt
from it by sample.py), checkpoints/, TensorBoard metrics in tb/ and sample grids in samples/.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jdiff import aot, cli, sharding, trainer, validate

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = str(ROOT / "configs" / "default.py")

if __name__ == "__main__":  # ml_collections applies --config.KEY overrides as the flag is defined
    cli.check_config_argv(sys.argv, DEFAULT_CONFIG)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Config file (path[:variant]).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default ./outputs/<config>).")
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, "Only compile the train step for this TPU topology (v5e:2x2, "
    "v5p:4x4x4, ...; libtpu needed, no TPU) or these NVIDIA GPUs (h100:8, h100:2x8; the "
    "gpu-aot extra, no GPU) and report its per-chip memory, FLOPs and estimated time "
    "(jdiff.aot); nothing is trained or written.",
)  # fmt: skip


def default_workdir(config_path: str) -> pathlib.Path:
    """./outputs/<config name>[_<variant>] in the current directory."""
    name, _, variant = pathlib.Path(config_path).name.partition(":")
    stem = pathlib.Path(name).stem + (f"_{variant}" if variant else "")
    return pathlib.Path.cwd() / "outputs" / stem


def main(argv) -> None:
    """Train the config's run in --workdir (resuming it); expected failures end in one line
    (`jdiff.cli`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    validate.check_applies(config, cli.overridden_keys(sys.argv))
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
    if _COMPILE_FOR.value:
        aot.run(config, _COMPILE_FOR.value, flag="--compile_for")
        return
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = pathlib.Path(_WORKDIR.value or default_workdir(config_path))
    print(f"config: {config_path}", flush=True)
    print(f"compilation cache: {sharding.enable_compilation_cache()}", flush=True)
    d = config.distributed
    sharding.initialize_distributed(coordinator_address=d.coordinator_address,
                                    num_processes=d.num_processes, process_id=d.process_id,
                                    auto=d.auto, timeout_s=d.timeout_s)  # fmt: skip
    sharding.reuse_host_memory()  # XLA's CPU buffers without page faults each step
    trainer.train(config, workdir)


if __name__ == "__main__":
    cli.run_absl(main, trainer.NonFiniteLoss)
