"""Random-access tfds sources -> preprocessed, per-process batches that resume from a step.

A batch is a pure function of (seed, step): the data set's records in grain's epoch-wise
shuffled order, `batch_size` consecutive positions per step. Resuming at step s needs no
iterator state, and the global batch is the same whatever the number of processes (each reads
only its own rows).
"""

from __future__ import annotations

import concurrent.futures
import functools
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import filelock
import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jdiff.data.embedded import EMBEDDED


def load_source(name: str, *, split: str = "train", data_dir: str | None = None) -> Sequence:
    """A random-access source of {"image": uint8 [H, W, C], "label": int} records.

    Args:
      name: an embedded data set (`EMBEDDED`, prepared on first use, offline) or any tfds
        catalogue name (`mnist`, `cifar10`, `celeb_a`, ...), which must already be prepared in
        `array_record` format.
      split: a tfds split expression ("train", "test", "train[:90%]", ...).
      data_dir: tfds' data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).

    Raises:
      ValueError: the name is neither embedded nor in the tfds catalogue.
      FileNotFoundError: a catalogue data set is not prepared here; the message says how to.
    """
    if name in EMBEDDED:
        make = functools.partial(EMBEDDED[name], data_dir=data_dir, file_format="array_record")
        folder = pathlib.Path(make().data_dir).parent  # <data_dir>/<name>
        folder.mkdir(parents=True, exist_ok=True)
        # processes starting together (test workers, a pod's hosts on one disk) prepare it once:
        # the others wait, then read it (a builder made after the wait: one made before it
        # knows no splits)
        with filelock.FileLock(folder / ".prepare.lock", timeout=600):
            builder = make()
            builder.download_and_prepare()  # a no-op once prepared
        return builder.as_data_source(split=split)
    try:
        # download=False: with no network, tfds would otherwise retry for minutes
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown data set {name!r}: not embedded {sorted(EMBEDDED)} and not in the "
            "tensorflow-datasets catalogue"
        ) from None
    except (NotImplementedError, AssertionError, FileNotFoundError, OSError) as e:
        where = f"--data_dir {data_dir} " if data_dir else ""
        raise FileNotFoundError(
            f"tfds data set {name!r} (split {split!r}) is not prepared in array_record format "
            f"here, and jdiff does not download at training time. Prepare it once on a machine "
            f"with network (catalogue sets need TensorFlow: pip install -e '.[tf]'):\n"
            f"  tfds build {name} --file_format=array_record {where}\n"
            f"or train on an embedded data set: {sorted(EMBEDDED)}"
        ) from e


def num_classes(source: Any) -> int | None:
    """The number of label classes of a tfds source (None when it has no class label)."""
    features = getattr(getattr(source, "dataset_info", None), "features", {})
    label = features["label"] if "label" in features else None
    return getattr(label, "num_classes", None)


def preprocess(image: np.ndarray, *, image_size: int, flip: bool = False) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [image_size, image_size, C] in [-1, 1].

    A non-square image is centre-cropped to a square, then resized (PIL bicubic, antialiased)
    when its size differs; `flip` mirrors it left-right.
    """
    h, w = image.shape[:2]
    if (h, w) != (image_size, image_size):
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = image[top : top + s, left : left + s]
        pil = Image.fromarray(square[..., 0] if square.shape[-1] == 1 else square)
        image = np.asarray(pil.resize((image_size, image_size), Image.BICUBIC))
        image = image.reshape(image_size, image_size, -1)
    if flip:
        image = image[:, ::-1]
    return image.astype(np.float32) / 127.5 - 1.0


class Batches:
    """Global batch `step` of an endless, epoch-wise shuffled stream; this process's rows.

    Batch s holds stream positions s·B ... (s+1)·B - 1; position p is record `order[p]` of
    grain's shuffle (a new permutation each epoch, seeded by `seed`); the random flip of a
    position is drawn from (seed, p). Process i of n reads rows i·B/n ... (i+1)·B/n - 1.
    """

    def __init__(
        self,
        source: Sequence,
        *,
        batch_size: int,
        image_size: int,
        seed: int = 0,
        random_flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by {process_count} processes"
            )
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.image_size, self.random_flip = image_size, random_flip
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self.order = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """{"image": float32 [B/n, S, S, C] in [-1, 1], "label": int32 [B/n]} of global step."""
        start = step * self.batch_size + self.offset
        positions = range(start, start + self.local)
        records = [self.source[int(self.order[p])] for p in positions]
        flips = [self.random_flip and np.random.default_rng((self.seed, p)).random() < 0.5
                 for p in positions]  # fmt: skip
        images = [preprocess(r["image"], image_size=self.image_size, flip=f)
                  for r, f in zip(records, flips, strict=True)]  # fmt: skip
        labels = [int(r.get("label", 0)) for r in records]
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}

    def iterate(self, start_step: int, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
        """Batches start_step, start_step + 1, ..., read `prefetch` ahead on a thread."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = [pool.submit(self, s) for s in range(start_step, start_step + prefetch)]
            step = start_step + prefetch
            while True:
                yield pending.pop(0).result()
                pending.append(pool.submit(self, step))
                step += 1


class ArrayBatches(Batches):
    """`Batches` over in-memory arrays with a leading example axis (e.g. an autoencoder's cached
    latents and the captions' token ids): the same shuffled order, resumable from any step,
    each process its own rows; batch s is {name: array[rows of s]}."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        *,
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"arrays of different lengths: { {k: len(a) for k, a in arrays.items()} }"
            )
        super().__init__(range(sizes.pop()), batch_size=batch_size, image_size=0, seed=seed,
                         process_index=process_index, process_count=process_count)  # fmt: skip
        self.arrays = arrays

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        start = step * self.batch_size + self.offset
        rows = np.asarray([int(self.order[p]) for p in range(start, start + self.local)])
        return {name: array[rows] for name, array in self.arrays.items()}
