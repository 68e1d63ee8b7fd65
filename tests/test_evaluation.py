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


def test_kernel_inception_distance_is_the_unbiased_mmd():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 5))
    b = rng.standard_normal((30, 5)) + 0.3
    # one subset of every row: the U-statistic written out pair by pair
    k = lambda x, y: (x @ y / 5 + 1) ** 3  # noqa: E731
    m = 30
    kid, std = evaluation.kernel_inception_distance(a[:m], b, subsets=1, subset_size=m)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0
    x, y, z = (rng.standard_normal((500, 5)) for _ in range(3))
    same = evaluation.kernel_inception_distance(x, y, subset_size=200)
    shifted = evaluation.kernel_inception_distance(x, z + 0.3, subset_size=200)
    assert abs(same[0]) < 3 * same[1] + 1e-3 and shifted[0] > 10 * abs(same[0])


def test_clip_score_equals_transformers_clip(tmp_path):
    """A random-weight transformers CLIPModel saved with its image processor: jdiff's CLIP reads
    it, preprocesses images as CLIPImageProcessor does, and scores as its embeddings give."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from jdiff.tokenizer import CLIPTokenizer

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
                       "hidden_act": "gelu"},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = CLIPModel(config).eval()
    reference.save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})  # fmt: skip
    processor.save_pretrained(tmp_path)
    CLIPTokenizer.default().save_pretrained(tmp_path)

    clip = evaluation.load_clip(tmp_path)
    rng = np.random.default_rng(0)
    images = np.cumsum(rng.integers(-20, 21, (3, 40, 56, 3)), axis=2) % 256
    images = images.astype(np.uint8)
    prompts = ["a red circle", "a photo of a cat on a mat", ""]
    expected_pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(clip.processing(images),
                               expected_pixels.permute(0, 2, 3, 1).numpy(), atol=1e-5)  # fmt: skip
    with torch.no_grad():
        out = reference(input_ids=torch.from_numpy(clip.tokenizer(prompts)).long(),
                        pixel_values=expected_pixels)  # fmt: skip
    cos = torch.nn.functional.cosine_similarity(out.text_embeds, out.image_embeds).numpy()
    scores = clip.score(images, prompts)
    np.testing.assert_allclose(scores, np.maximum(100 * cos, 0), atol=1e-3)
    assert scores.shape == (3,) and (scores > 0).sum() >= 2, scores  # not all floored
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        clip.score(images, prompts[:2])


def test_fid_and_kid_from_the_command_line(tmp_path, capsys):
    """python -m jdiff.evaluation SAMPLES --reference REF --inception W: an .npz against a
    folder, the Inception weights from a safetensors file (seeded random weights here)."""
    from PIL import Image
    from safetensors.numpy import save_file

    save_file(seeded_inception_state(), tmp_path / "inception.safetensors")
    rng = np.random.default_rng(0)
    real = (np.cumsum(rng.integers(-30, 31, (12, 32, 32, 3)), axis=1) % 256).astype(np.uint8)
    (tmp_path / "real").mkdir()
    for i, image in enumerate(real):
        Image.fromarray(image).save(tmp_path / "real" / f"{i:02d}.png")
    np.savez(tmp_path / "same.npz", images=real)
    np.savez(tmp_path / "noise.npz", images=rng.integers(0, 256, (10, 32, 32, 3), np.uint8))
    args = ["--reference", str(tmp_path / "real"), "--inception",
            str(tmp_path / "inception.safetensors"), "--batch_size", "8"]  # fmt: skip
    same = evaluation.main([str(tmp_path / "same.npz"), *args])
    noise = evaluation.main([str(tmp_path / "noise.npz"), *args])
    assert abs(same["fid"]) < 1e-3 and same["num_reference"] == 12 == same["num_samples"]
    assert noise["fid"] > 1.0 and noise["kid"] > same["kid"] + 1e-3
    assert json.loads((tmp_path / "noise.eval.json").read_text())["fid"] == noise["fid"]
    with pytest.raises(SystemExit, match="2"):
        evaluation.main([str(tmp_path / "same.npz"), "--reference", str(tmp_path / "real")])
    assert "--reference needs --inception" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="pickle-based checkpoint"):
        (tmp_path / "w.pth").write_bytes(b"")
        evaluation.main([str(tmp_path / "same.npz"), *args[:2], "--inception",
                         str(tmp_path / "w.pth")])  # fmt: skip
