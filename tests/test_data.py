"""The data pipeline: embedded digits as a tfds data set, catalogue names, batches that resume."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jdiff import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(data_dir):
    return data.load_source("digits", data_dir=data_dir)


def test_embedded_digits_are_a_tfds_data_set(digits, data_dir):
    assert len(digits) == 1497 and data.num_classes(digits) == 10
    record = digits[0]
    assert record["image"].shape == (8, 8, 1) and record["image"].dtype == np.uint8
    labels = np.array([digits[i]["label"] for i in range(len(digits))])
    assert set(labels) == set(range(10))
    assert max(int(digits[i]["image"].max()) for i in range(50)) == 255  # 16 -> 255
    test = data.load_source("digits", split="test", data_dir=data_dir)
    assert len(test) == 300
    train_images = {digits[i]["image"].tobytes() for i in range(len(digits))}
    assert not any(test[i]["image"].tobytes() in train_images for i in range(20))


def test_batches_are_a_function_of_step(digits):
    batches = data.Batches(digits, batch_size=32, image_size=8, seed=3, random_flip=True)
    a, b = batches(5), batches(5)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (32, 8, 8, 1) and a["image"].dtype == np.float32
    assert a["image"].min() == -1.0 and a["image"].max() == 1.0
    assert not np.array_equal(batches(6)["image"], a["image"])
    stream = batches.iterate(4)
    np.testing.assert_array_equal(next(stream)["label"], batches(4)["label"])
    np.testing.assert_array_equal(next(stream)["image"], a["image"])


def test_each_process_reads_its_rows_of_the_global_batch(digits):
    whole = data.Batches(digits, batch_size=8, image_size=8, seed=1)(7)
    parts = [data.Batches(digits, batch_size=8, image_size=8, seed=1, process_index=i,
                          process_count=4)(7) for i in range(4)]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        data.Batches(digits, batch_size=8, image_size=8, process_count=3)


def test_one_epoch_visits_every_record_once(digits):
    n = len(digits)
    order = data.Batches(digits, batch_size=1, image_size=8, seed=0).order
    first, second = [int(order[p]) for p in range(n)], [int(order[p]) for p in range(n, 2 * n)]
    assert sorted(first) == list(range(n)) == sorted(second) and first != second


def test_preprocess_crop_resize_flip():
    image = np.zeros((6, 10, 3), np.uint8)
    image[:, :2] = 255  # a stripe cropped away by the centre square (columns 2..7)
    image[:, 2] = 255  # the square's first column
    out = data.preprocess(image, image_size=6)
    assert out.shape == (6, 6, 3)
    assert (out[:, 0] == 1).all() and (out[:, 1:] == -1).all()
    np.testing.assert_array_equal(data.preprocess(image, image_size=6, flip=True), out[:, ::-1])
    assert data.preprocess(image, image_size=3).shape == (3, 3, 3)


def test_catalogue_name_reads_a_prepared_data_set():
    with tfds.testing.mock_data(num_examples=12):
        source = data.load_source("mnist", split="train")
        assert len(source) == 12 and source[0]["image"].shape == (28, 28, 1)
        batch = data.Batches(source, batch_size=4, image_size=16, seed=0)(0)
    assert batch["image"].shape == (4, 16, 16, 1)


def test_missing_data_set_fails_fast_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar10 --file_format=array_record"):
        data.load_source("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown data set 'no_such_set'"):
        data.load_source("no_such_set", data_dir=str(tmp_path))


def test_processes_starting_together_prepare_a_data_set_once(tmp_path):
    """Two processes (two test workers, two hosts on one disk) asking for an unprepared
    embedded data set at once: both get all of it, neither fails on the other's files."""
    import subprocess
    import sys

    read = "import sys; from jdiff import data; print(len(data.load_source('digits', " + (
        "split='test', data_dir=sys.argv[1])))"
    )
    processes = [subprocess.Popen([sys.executable, "-c", read, str(tmp_path)], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (out, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0 and out.split()[-1] == "300", err[-2000:]
