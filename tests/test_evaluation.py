"""Evaluation: Fréchet distance, nearest neighbours, and the digits classifier's verdicts."""

import json
import pathlib

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


def seeded_inception_state(seed: int = 0) -> dict[str, np.ndarray]:
    """Random FID-Inception weights in pytorch-fid's layout, a pure function of the seed
    (He-scaled convolutions, batch-norm statistics away from the identity)."""
    from jdiff.nn import inception

    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in sorted(inception.torch_shapes().items()):
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith(("running_var", "bn.weight")):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, running_mean
            value = rng.normal(0.0, 0.1, shape)
        state[name] = value.astype(np.float32)
    return state


def reference_inputs() -> dict[str, np.ndarray]:
    """Images in [-1, 1] to upsample (48 px) and downsample (310 px) to Inception's 299."""
    rng = np.random.default_rng(1)
    small = np.cumsum(rng.uniform(-0.2, 0.2, (2, 48, 48, 3)), axis=1)
    large = np.cumsum(rng.uniform(-0.05, 0.05, (1, 310, 310, 3)), axis=2)
    return {k: np.clip(v, -1, 1).astype(np.float32) for k, v in (("small", small),
                                                                  ("large", large))}  # fmt: skip


def test_fid_inception_equals_pytorch_fid():
    """pool3 features of seeded random weights equal those of pytorch-fid's own InceptionV3
    (`tests/data/fid_inception_reference.npz`, written once by running pytorch-fid 0.3.0 on
    the same weights and images: torchvision cannot be installed beside the CPU torch here)."""
    import jax

    from jdiff.nn import inception

    params = inception.from_torch_state(seeded_inception_state())
    reference = np.load(pathlib.Path(__file__).parent / "data" / "fid_inception_reference.npz")
    apply = jax.jit(inception.FIDInception().apply)
    for name, x in reference_inputs().items():
        ours = np.asarray(apply({"params": params}, x))
        assert ours.shape == (len(x), 2048)
        scale = np.abs(reference[name]).max()
        np.testing.assert_allclose(ours, reference[name], atol=1e-4 * scale, rtol=0)

    state = seeded_inception_state()
    with pytest.raises(ValueError, match="1 missing"):
        missing = "Mixed_7c.branch_pool.bn.weight"
        inception.from_torch_state({k: v for k, v in state.items() if k != missing})
    state["Mixed_5b.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"][:1]
    with pytest.raises(ValueError, match=r"Mixed_5b.branch1x1.conv.weight has shape \(1,"):
        inception.from_torch_state(state)
