"""Evaluation: Fréchet distance, nearest neighbours, and the digits classifier's verdicts."""

import json

import numpy as np
import pytest
import scipy.linalg

from jdiff import evaluation, images


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((300, 6)) * 2.0 + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(ca @ cb).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * cross)
    np.testing.assert_allclose(evaluation.frechet_distance(a, b), expected, rtol=1e-8)
    assert abs(evaluation.frechet_distance(a, a)) < 1e-8


def test_nearest_distances():
    reference = np.array([[0.0, 0.0], [3.0, 4.0]])
    x = np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    np.testing.assert_allclose(evaluation.nearest_distances(x, reference), [0.0, 1.0, 5.0])


def test_held_out_digits_judged_as_the_ceiling(tmp_path):
    """Evaluating the held-out images themselves: the same verdicts as the ceiling, a Fréchet
    distance of zero, and nearest-training distances equal to the held-out ones."""
    test_x, test_y = evaluation.load_split("digits", "test", image_size=8)
    path = tmp_path / "held_out.npz"
    np.savez(path, images=images.to_uint8(test_x), labels=test_y)
    result = evaluation.main([str(path)])
    assert result["held_out"]["accuracy"] >= 0.95
    # asked-for labels: the true ones are recognised as such (nearly) as often as at all
    own = result["samples"]["recognised_as_label"]
    assert result["samples"]["recognised"] - 0.02 <= own <= result["samples"]["recognised"]
    assert result["samples"]["recognised"] == result["held_out"]["recognised"] >= 0.9
    assert abs(result["frechet_samples_vs_held_out"]) < 1e-4  # rounding of the square roots
    assert result["frechet_train_vs_held_out"] > 1.0
    distances = result["nearest_train_distance_median"]
    assert distances["samples"] == distances["held_out"] > 0  # held-out is not in train
    assert json.loads(path.with_suffix(".eval.json").read_text()) == result


def test_prompt_adherence_of_real_renders():
    """Real renders with their own captions follow them fully; with a changed colour, none do."""
    from jdiff.data import shapes

    pairs = shapes.examples("test", 1, seed=3) + shapes.examples("held_out", 1, seed=3)
    pixels = np.stack([image for _, image in pairs])
    captions = [scene.caption for scene, _ in pairs]
    result = evaluation.prompt_adherence(pixels, captions)
    assert result["seen"]["count"] == 36 and result["held_out"]["count"] == 12
    assert result["seen"]["all"] == result["held_out"]["all"] == 1.0

    recoloured = [
        shapes.Scene((s.colour + 1) % len(shapes.COLOURS), s.shape, s.position).caption
        for s, _ in pairs
    ]
    wrong = evaluation.prompt_adherence(pixels, recoloured)
    groups = [wrong[g] for g in wrong]
    assert all(g["all"] == 0.0 and g["colour"] == 0.0 and g["shape"] == 1.0 for g in groups)
    with pytest.raises(ValueError, match="48 images for 1 prompts"):
        evaluation.prompt_adherence(pixels, captions[:1])
