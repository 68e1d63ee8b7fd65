"""Data sets that ship with jdiff's dependencies, as tensorflow-datasets builders (no network).

Each prepares in well under a second into `array_record` files that `tfds.data_source` reads with
random access, so the default training run works offline on a fresh machine. `EMBEDDED` maps a
config's data set name to its builder; add an entry for another embedded set.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from jdiff.data import shapes


class JdiffDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits (UCI optdigits): 1,797 8x8 grey images, 10 classes.

    Pixel counts 0..16 are scaled to uint8 0..255 (rounded). Every sixth image (300 in all) is
    the `test` split, the other 1,497 are `train`. The images are inside the scikit-learn wheel.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's bundled 8x8 handwritten digits, 10 classes.",
            features=features,
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits

        digits = load_digits()
        index = np.arange(len(digits.target))
        return {
            "train": self._generate_examples(digits, index[index % 6 != 0]),
            "test": self._generate_examples(digits, index[index % 6 == 0]),
        }

    def _generate_examples(self, digits, index):
        for i in index:
            image = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)[..., None]
            yield int(i), {"image": image, "label": int(digits.target[i])}


class JdiffShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned 32x32 RGB scenes of one coloured shape (`jdiff.data.shapes`), rendered here.

    4 colours x 3 shapes x 4 positions; `train` (200 renders of each of the 36 seen
    combinations) and `test` (20 each) hold the seen combinations, `held_out` (50 renders of each
    of the other 12) the combinations no model trains on. `label` indexes all 48 combinations,
    so class-conditional models train on it unchanged; `caption` is the scene's sentence.
    """

    VERSION = tfds.core.Version("1.0.0")
    SPLITS: ClassVar[dict[str, int]] = {"train": 200, "test": 20, "held_out": 50}  # per combination

    def _info(self) -> tfds.core.DatasetInfo:
        size = shapes.SIZE
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=[s.caption for s in shapes.all_scenes()]),
                "colour": tfds.features.ClassLabel(names=shapes.COLOURS),
                "shape": tfds.features.ClassLabel(names=shapes.SHAPES),
                "position": tfds.features.ClassLabel(names=shapes.POSITIONS),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural captioned scenes: a coloured shape in one of four quadrants.",
            features=features,
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self.SPLITS.items()}

    def _generate_examples(self, split, count):
        for i, (scene, image) in enumerate(shapes.examples(split, count, seed=0)):
            yield (
                i,
                {
                    "image": image,
                    "caption": scene.caption,
                    "label": scene.label,
                    "colour": scene.colour,
                    "shape": scene.shape,
                    "position": scene.position,
                },
            )


EMBEDDED = {"digits": JdiffDigits, "shapes": JdiffShapes}
