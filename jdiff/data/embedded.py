"""Data sets that ship with jdiff's dependencies, as tensorflow-datasets builders (no network).

Each prepares in well under a second into `array_record` files that `tfds.data_source` reads with
random access, so the default training run works offline on a fresh machine. `EMBEDDED` maps a
config's data set name to its builder; add an entry for another embedded set.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


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


EMBEDDED = {"digits": JdiffDigits}
