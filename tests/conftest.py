"""Test set-up: 8 CPU devices, JAX's persistent compilation cache, the repo on sys.path."""

import os
import pathlib
import shutil
import sys

# the suite runs on the CPU (with libtpu installed, for the TPU compiles, JAX would first try
# to start a TPU backend in every process); set JAX_PLATFORMS to run it elsewhere
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # train.py, sample.py, configs/

from runs import XLA_FLAGS  # noqa: E402

# before any backend starts: the tests' programs compiled with LLVM's cheapest optimisation
# level (a third less compile time, which is most of the suite's; the same XLA graphs)
os.environ["XLA_FLAGS"] = XLA_FLAGS

# eight simulated CPU devices for the sharding tests (before any backend starts); everything
# else runs on the first
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("JDIFF_JAX_CACHE", str(ROOT / ".jax_cache"))
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# parity tolerances are float32's: on a GPU, JAX's default matmul precision is TF32
jax.config.update("jax_default_matmul_precision", "highest")


def made_once(tmp_path_factory, worker_id: str, name: str, make) -> tuple[pathlib.Path, str]:
    """(directory, what make returned, as text): a directory that `make(directory)` fills once
    per test run. Under pytest-xdist the first worker to ask makes it, under a file lock, and
    the others wait for it and share it (each worker trained its own copy before)."""
    if worker_id == "master":  # one process: an ordinary session fixture
        path = tmp_path_factory.mktemp(name)
        return path, str(make(path))
    from filelock import FileLock

    path = tmp_path_factory.getbasetemp().parent / name  # shared by this run's workers
    done = path.with_name(f"{name}.made")
    with FileLock(f"{path}.lock", timeout=1200):  # fail, not hang, if the maker hangs
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a maker that failed part-way
            path.mkdir()
            done.write_text(str(make(path)))
    return path, done.read_text()


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, worker_id):
    """(workdir, grid): the tiny config trained 4 steps in one go (checkpoints at 2 and 4),
    shared by the training tests and the bad-input table (which must not change it)."""
    from runs import tiny_config

    from jdiff import trainer

    workdir, grid = made_once(tmp_path_factory, worker_id, "uninterrupted",
                              lambda path: trainer.train(tiny_config(), path))  # fmt: skip
    return workdir, pathlib.Path(grid)


@pytest.fixture(scope="session")
def tiny_vae_workdir(tmp_path_factory, worker_id):
    """configs/vae_shapes.py:tiny trained by train.py (3 steps, f = 2): the autoencoder the
    latent-diffusion tests build on."""
    import importlib

    from jdiff import trainer

    def make(path):
        config = importlib.import_module("configs.vae_shapes").get_config("tiny")
        config.mesh.data = 1
        return trainer.train(config, path)

    return made_once(tmp_path_factory, worker_id, "vae_shapes_tiny", make)[0]


@pytest.fixture(scope="session")
def tiny_vae_decoder_workdir(tiny_vae_workdir, tmp_path_factory, worker_id):
    """configs/vae_shapes_decoder.py:tiny: the decoder of `tiny_vae_workdir` fine-tuned for 3
    steps by train.py, its encoder frozen."""
    import importlib

    from jdiff import trainer

    def make(path):
        config = importlib.import_module("configs.vae_shapes_decoder").get_config("tiny")
        config.autoencoder.init_from = str(tiny_vae_workdir)
        config.mesh.data = 1
        return trainer.train(config, path)

    return made_once(tmp_path_factory, worker_id, "vae_shapes_decoder_tiny", make)[0]


# the modules by their time on two workers (fresh clone, 2026-12-05/06), longest first: the two
# workers take them in this order (a long one left for last would run alone); the rest follow
# in their own order
LONGEST_FIRST = [
    "test_latent", "test_pretrained", "test_sdxl", "test_controlnet", "test_image_conditioned",
    "test_adapters", "test_training",
    "test_sharding", "test_evaluation", "test_unet", "test_vae", "test_aot", "test_samplers",
    "test_checkpoints", "test_losses", "test_bad_inputs",
]  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order
