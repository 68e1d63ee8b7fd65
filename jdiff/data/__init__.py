"""Input pipelines over tensorflow-datasets: catalogue data sets by name, and embedded ones."""

from jdiff.data.embedded import EMBEDDED
from jdiff.data.pipeline import ArrayBatches, Batches, load_source, num_classes, preprocess

__all__ = ["EMBEDDED", "ArrayBatches", "Batches", "load_source", "num_classes", "preprocess"]
