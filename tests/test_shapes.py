"""The embedded captioned scenes: grammar, held-out combinations, the rule checker, tfds."""

import numpy as np
import pytest

from jdiff import data
from jdiff.data import shapes


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    names = ("train", "test", "held_out")
    return {s: data.load_source("shapes", split=s, data_dir=data_dir) for s in names}


def _records(source):
    return [source[i] for i in range(len(source))]


def test_grammar_round_trips_and_holds_out_twelve_combinations():
    scenes = shapes.all_scenes()
    assert len(scenes) == 48 and [s.label for s in scenes] == list(range(48))
    assert all(shapes.parse(s.caption) == s for s in scenes)
    assert shapes.parse("  A Red Circle at the Top Left ") == shapes.Scene(0, 0, 0)
    held = [s for s in scenes if s.held_out]
    assert len(held) == 12
    seen = [s for s in scenes if not s.held_out]
    # every pair of attributes of a held-out combination is seen in training
    for h in held:
        assert any(s.colour == h.colour and s.shape == h.shape for s in seen)
        assert any(s.colour == h.colour and s.position == h.position for s in seen)
        assert any(s.shape == h.shape and s.position == h.position for s in seen)
    with pytest.raises(ValueError, match="not of the form"):
        shapes.parse("a purple circle at the top left")
    with pytest.raises(ValueError, match=r"outside 0\.\.47"):
        shapes.Scene.from_label(48)


def test_splits_are_tfds_sources_with_captions(splits):
    assert [len(splits[s]) for s in ("train", "test", "held_out")] == [7200, 720, 600]
    assert data.num_classes(splits["train"]) == 48
    record = splits["train"][0]
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    scene = shapes.Scene.from_label(record["label"])
    assert record["caption"].decode() == scene.caption
    assert (record["colour"], record["shape"], record["position"]) == (
        scene.colour, scene.shape, scene.position)  # fmt: skip
    labels = {name: {int(r["label"]) for r in _records(src)} for name, src in splits.items()}
    assert len(labels["train"]) == 36 and labels["test"] == labels["train"]
    assert labels["held_out"] == {s.label for s in shapes.all_scenes() if s.held_out}
    train = {r["image"].tobytes() for r in _records(splits["train"])}
    assert not any(r["image"].tobytes() in train for r in _records(splits["test"]))


def test_checker_reads_every_render_of_every_split(splits):
    for source in splits.values():
        records = _records(source)
        found = shapes.describe(np.stack([r["image"] for r in records]))
        assert found == [shapes.Scene.from_label(r["label"]) for r in records]


def test_checker_rejects_what_is_not_a_scene():
    blank = np.full((2, 32, 32, 3), 40, np.uint8)
    blank[1] += np.random.default_rng(0).integers(0, 20, (32, 32, 3), dtype=np.uint8)
    assert shapes.describe(blank) == [None, None]
    with pytest.raises(ValueError, match=r"RGB images \[N, H, W, 3\]"):
        shapes.describe(np.zeros((32, 32, 3)))


def test_renders_vary_and_batches_are_rgb(splits):
    renders = shapes.examples("train", 2, seed=0)
    pairs = zip(renders[:36], renders[36:], strict=True)  # two renders of each combination
    assert all(x[0] == y[0] and not np.array_equal(x[1], y[1]) for x, y in pairs)
    batch = data.Batches(splits["train"], batch_size=16, image_size=32, seed=0)(3)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].shape == (16,)
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
