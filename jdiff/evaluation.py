"""Judging generated samples: a classifier's verdicts, Fréchet distance in its feature space,
and nearest-training-neighbour distances (memorisation is not success).

    python -m jdiff.evaluation SAMPLES.npz [--data digits]
    python -m jdiff.evaluation SAMPLES(.npz|/) --reference REAL(.npz|/) --inception pt_inception.pth
    python -m jdiff.evaluation SAMPLES.npz --clip CLIP_DIR

trains the small classifier on the data set's train split (seeded, seconds on a CPU), then
prints and stores next to the samples (`.eval.json`) the figures for the samples beside the
same figures for the held-out split, which are the ceiling. Samples written with prompts (a
text-to-image model of the embedded shapes) are judged instead by the shapes' rule checker:
the share that shows what its prompt asks for, seen and held-out combinations apart.

With --reference: FID (the TF-FID Inception-v3 of `jdiff.nn.inception`, weights from a path
you give) and KID between the samples and a reference set; with --clip: the CLIP score of the
samples against their prompts (a transformers CLIPModel directory). Any other feature space:
`frechet_distance` and `kernel_inception_distance` take feature rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff import data
from jdiff.autoencoder import in_chunks
from jdiff.data import shapes
from jdiff.nn.classifier import SmallClassifier


def load_split(name: str, split: str, *, image_size: int, data_dir: str | None = None):
    """(images float32 [N, S, S, C] in [-1, 1], labels int32 [N]) of a whole split."""
    source = data.load_source(name, split=split, data_dir=data_dir)
    records = [source[i] for i in range(len(source))]
    x = np.stack([data.preprocess(r["image"], image_size=image_size) for r in records])
    return x, np.asarray([int(r["label"]) for r in records], np.int32)


def train_classifier(x, labels, key, *, num_classes: int, steps: int = 1500, batch_size: int = 128):
    """Fit `SmallClassifier` with Adam (lr 1e-3) on (x, labels); returns its parameters.

    A jitted step in a Python loop: on XLA's CPU backend, convolutions inside a `lax.scan`
    body ran 16x slower (measured), and this runs once per evaluation, not per sample. The
    step's key is folded in inside the step: an eager `fold_in` per step cost more than the
    step itself (8 of 12 s for 1,500 steps on two CPU cores).
    """
    model, tx = SmallClassifier(num_classes), optax.adam(1e-3)
    k_init, k_batches = jax.random.split(key)
    params = model.init(k_init, x[:1])["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, i):
        idx = jax.random.randint(jax.random.fold_in(k_batches, i), (batch_size,), 0, len(x))

        def loss(p):
            logits, _ = model.apply({"params": p}, x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        params, opt_state = step(params, opt_state, np.int32(i))
    return params


@functools.partial(jax.jit, static_argnums=2)
def _apply(params, x, num_classes: int):
    return SmallClassifier(num_classes).apply({"params": params}, x)


def classify(params, x, *, num_classes: int):
    """(probabilities [N, K], features [N, F]) for images x [N, S, S, C] in [-1, 1]."""
    logits, features = _apply(params, x, num_classes)
    return np.asarray(jax.nn.softmax(logits)), np.asarray(features, np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa - μb‖² + tr(Σa + Σb - 2 (Σa^½ Σb Σa^½)^½) between Gaussians fitted to feature rows
    a [N, F] and b [M, F] (Heusel et al. 2017); float64, symmetric square roots by eigh."""

    def sqrtm(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    def trace_sqrtm(m):  # tr √m = Σ √λ: the eigenvalues alone, no eigenvectors
        return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = sqrtm(cov_a)
    cross = trace_sqrtm(root_a @ cov_b @ root_a)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD² between feature rows a [N, F] and b [M, F]
    under the cubic polynomial kernel k(x, y) = (x·y / F + 1)³, averaged over `subsets` random
    subsets of min(subset_size, N, M) rows of each; returns (mean, standard deviation). Unlike
    FID it is unbiased: near 0 (and possibly negative) for two samples of one distribution."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m, d = min(subset_size, len(a), len(b)), a.shape[1]
    if m < 2 or b.shape[1] != d:
        raise ValueError(
            f"KID needs >= 2 rows of equal width in each set; got {a.shape}, {b.shape}"
        )
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / d + 1.0) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def nearest_distances(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance from each row of x [N, ...] to its nearest row of reference [M, ...]."""
    a, b = x.reshape(len(x), -1).astype(np.float64), reference.reshape(len(reference), -1)
    d2 = (a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :]
    return np.sqrt(np.clip(d2.min(1), 0, None))


def judge(x, params, *, num_classes: int, threshold: float = 0.9, labels=None) -> dict:
    """The classifier's verdicts on x: share recognised with p >= threshold, class shares, and
    with `labels` (what each image was asked to be) the share recognised as its own label."""
    probs, _ = classify(params, x, num_classes=num_classes)
    counts = np.bincount(probs.argmax(1), minlength=num_classes)
    verdicts = {
        "recognised": float((probs.max(1) >= threshold).mean()),
        "class_shares": (counts / len(x)).round(4).tolist(),
    }
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise ValueError(f"{len(x)} images but labels of shape {labels.shape}")
        own = probs[np.arange(len(x)), labels]
        verdicts["recognised_as_label"] = float((own >= threshold).mean())
    return verdicts


def evaluate(samples: np.ndarray, *, name: str = "digits", image_size: int = 8, seed: int = 0,
             data_dir: str | None = None, labels=None) -> dict:  # fmt: skip
    """Figures for samples [N, S, S, C] in [-1, 1] and, as the ceiling, the held-out split.

    `labels`: the classes a class-conditional model was asked for (also judged per sample).

    Fréchet distances compare equal-sized sets (the held-out split's size) so their bias is
    the same: samples vs held-out, and training images vs held-out.
    """
    train_x, train_y = load_split(name, "train", image_size=image_size, data_dir=data_dir)
    test_x, test_y = load_split(name, "test", image_size=image_size, data_dir=data_dir)
    k = int(train_y.max()) + 1
    params = train_classifier(jnp.asarray(train_x), jnp.asarray(train_y), jax.random.key(seed),
                              num_classes=k)  # fmt: skip
    n = min(len(samples), len(test_x))
    rng = np.random.default_rng(seed)
    train_subset = train_x[rng.choice(len(train_x), n, replace=False)]
    sets = {"samples": samples[:n], "test": test_x[:n], "train": train_subset}
    feats = {key: classify(params, v, num_classes=k)[1] for key, v in sets.items()}
    probs, _ = classify(params, test_x, num_classes=k)
    return {
        "num_samples": len(samples),
        "samples": judge(samples, params, num_classes=k, labels=labels),
        "held_out": judge(test_x, params, num_classes=k)
        | {"accuracy": float((probs.argmax(1) == test_y).mean())},
        "frechet_samples_vs_held_out": frechet_distance(feats["samples"], feats["test"]),
        "frechet_train_vs_held_out": frechet_distance(feats["train"], feats["test"]),
        "nearest_train_distance_median": {
            "samples": float(np.median(nearest_distances(samples, train_x))),
            "held_out": float(np.median(nearest_distances(test_x, train_x))),
        },
    }


def prompt_adherence(images: np.ndarray, prompts: list[str]) -> dict:
    """How well images of the embedded shapes follow their captions, judged by the rule checker
    `shapes.describe` (right on every real render): the share whose colour, shape and position
    all match the prompt, and each attribute's share, for seen and held-out combinations apart.

    images: uint8 [N, 32, 32, 3]; prompts: N captions of the shapes grammar.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    asked = [shapes.parse(p) for p in prompts]
    seen = shapes.describe(images)
    result = {}
    for group, held in (("seen", False), ("held_out", True)):
        pairs = [(a, s) for a, s in zip(asked, seen, strict=True) if a.held_out == held]
        if not pairs:
            continue
        figures = {"count": len(pairs),
                   "all": float(np.mean([s is not None and s == a for a, s in pairs]))}  # fmt: skip
        for attribute in ("colour", "shape", "position"):
            matches = [s is not None and getattr(s, attribute) == getattr(a, attribute)
                       for a, s in pairs]  # fmt: skip
            figures[attribute] = float(np.mean(matches))
        result[group] = figures
    return result


# ----------------------------------------------------------------------------- reference networks


def read_samples(path: pathlib.Path) -> dict:
    """The arrays of a sample.py `.npz`, refused with a ValueError naming the file when it is
    not one: not an .npz, no uint8 "images" [N, H, W, C] (e.g. floats, which would be read as
    black), or labels / prompts that do not match them in number."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a sample.py .npz)")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz (sample.py writes one beside each grid)")
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz ({e})") from None
    x = stored.get("images")
    if x is None:
        raise ValueError(f"{path} holds no 'images' array (has {sorted(stored)})")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3) or not len(x):
        raise ValueError(f"{path}: 'images' is {x.dtype} {list(x.shape)}; expected uint8 "
                         "[N, H, W, 1 or 3] (0..255), as sample.py writes")  # fmt: skip
    for name in ("labels", "prompts"):
        if name in stored and stored[name].size and len(stored[name]) != len(x):
            raise ValueError(f"{path}: {len(stored[name])} {name} for {len(x)} images")
    return stored


def load_images(path) -> np.ndarray:
    """uint8 [N, H, W, 3] from an `.npz` (its "images") or a folder of image files (sorted by
    name; all of one size). Greyscale becomes RGB."""
    from PIL import Image

    path = pathlib.Path(path)
    if path.suffix == ".npz":
        with np.load(path) as stored:
            if "images" not in stored:
                raise ValueError(f"{path} holds no 'images' array (has {sorted(stored)})")
            x = stored["images"]
    elif path.is_dir():
        suffixes = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(f"{path} holds no image files")
        x = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({a.shape for a in x}) > 1:
            raise ValueError(f"the images in {path} differ in size; resize them to one size")
        x = np.stack(x)
    else:
        raise FileNotFoundError(f"{path}: expected an .npz of images or a folder of images")
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: images must be uint8 [N, H, W, 1 or 3]; got {x.dtype} "
                         f"{x.shape}")  # fmt: skip
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


@jax.jit
def _inception(params, images):
    from jdiff.nn.inception import FIDInception

    return FIDInception().apply({"params": params}, images.astype(jnp.float32) / 127.5 - 1.0)


def inception_features(params, images: np.ndarray, *, batch_size: int = 50) -> np.ndarray:
    """FID Inception pool3 features float64 [N, 2048] of uint8 images [N, H, W, 3] (compiled
    once per batch shape)."""
    return in_chunks(functools.partial(_inception, params), images, batch_size).astype(np.float64)


def fid_kid(params, samples: np.ndarray, reference: np.ndarray, *, batch_size: int = 50,
            kid_subset_size: int = 1000) -> dict:  # fmt: skip
    """FID and KID (mean, std) between uint8 image sets, in FID-Inception features."""
    a = inception_features(params, samples, batch_size=batch_size)
    b = inception_features(params, reference, batch_size=batch_size)
    kid, kid_std = kernel_inception_distance(a, b, subset_size=kid_subset_size)
    return {"fid": frechet_distance(a, b), "kid": kid, "kid_std": kid_std,
            "num_samples": len(a), "num_reference": len(b)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CLIP:
    """A CLIP model for scoring: module, parameters, tokenizer and image processing."""

    model: Any
    params: Any
    tokenizer: Any
    processing: Any

    def score(self, images: np.ndarray, prompts, *, batch_size: int = 32) -> np.ndarray:
        """CLIP score of each uint8 image [N, H, W, 3] against its prompt: [N] (torchmetrics'
        `CLIPScore` per pair: max(100 · cos, 0))."""
        from jdiff.nn import clip

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        ids = self.tokenizer(list(prompts))
        v = {"params": self.params}
        text = in_chunks(jax.jit(lambda t: self.model.apply(v, t, method="encode_text")), ids,
                         batch_size)  # fmt: skip
        pixels = self.processing(np.asarray(images))
        image = in_chunks(jax.jit(lambda p: self.model.apply(v, p, method="encode_image")),
                          pixels, batch_size)  # fmt: skip
        return clip.clip_score(text, image)


def load_inception(path, *, allow_pickle: bool = False) -> dict:
    """`nn.inception.FIDInception` parameters from pytorch-fid's weights file (`.pth`, a pickle:
    pass allow_pickle=True for a file you trust; read with torch's weights_only loader) or a
    `.safetensors` / `.npz` holding the same state dict."""
    from jdiff.interop import files
    from jdiff.nn import inception

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file. The FID Inception weights are pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (its FID_WEIGHTS_URL); download it where you "
            "have a network and pass its path"
        )
    if path.suffix == ".npz":
        with np.load(path) as stored:
            return inception.from_torch_state(dict(stored))
    return inception.from_torch_state(files.read_weights(path, allow_pickle=allow_pickle))


def load_clip(directory) -> CLIP:
    """A transformers `CLIPModel` directory (config.json, model.safetensors, the tokenizer's
    vocab.json + merges.txt or tokenizer.json, preprocessor_config.json), e.g. a local copy of
    openai/clip-vit-large-patch14."""
    from jdiff import interop
    from jdiff.nn import clip
    from jdiff.tokenizer import CLIPTokenizer

    directory = pathlib.Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} is not a CLIP model directory (no config.json)")
    fields = interop.clip_config_from_transformers(json.loads((directory / "config.json")
                                                              .read_text()))  # fmt: skip
    model = clip.CLIPModel(**fields)
    size = fields["vision"]["image_size"]
    ids = jnp.zeros((1, fields["text"]["max_position_embeddings"]), jnp.int32)
    template = jax.eval_shape(model.init, jax.random.key(0), ids, jnp.zeros((1, size, size, 3)))
    weights = directory / "model.safetensors"
    if not weights.exists():
        weights = directory / "model.safetensors.index.json"
    params = interop.clip_from_transformers(interop.read_weights(weights), template["params"])
    processing = clip.ImageProcessing(shortest_edge=size, crop_size=size)
    if (directory / "preprocessor_config.json").exists():
        pre = json.loads((directory / "preprocessor_config.json").read_text())
        edge = pre.get("size", {})
        crop = pre.get("crop_size", size)
        processing = clip.ImageProcessing(
            shortest_edge=edge.get("shortest_edge", size) if isinstance(edge, dict) else edge,
            crop_size=crop.get("height", size) if isinstance(crop, dict) else crop,
            image_mean=tuple(pre.get("image_mean", clip.OPENAI_MEAN)),
            image_std=tuple(pre.get("image_std", clip.OPENAI_STD)),
        )
    length = fields["text"]["max_position_embeddings"]
    tokenizer = CLIPTokenizer.from_pretrained(directory, max_length=length)
    return CLIP(model, jax.tree.map(jnp.asarray, params), tokenizer, processing)


def _write(result: dict, out: pathlib.Path) -> dict:
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return result


def reference_metrics(args) -> dict:
    """FID / KID against --reference and CLIP score against the samples' prompts."""
    samples = load_images(args.samples)
    result: dict = {}
    if args.reference:
        params = load_inception(args.inception, allow_pickle=args.allow_pickle)
        reference = load_images(args.reference)
        result |= fid_kid(params, samples, reference, batch_size=args.batch_size)
    if args.clip:
        if args.samples.suffix != ".npz" or "prompts" not in np.load(args.samples):
            raise ValueError("--clip scores samples against their prompts: pass an .npz that "
                             "sample.py wrote for a text model (it stores 'prompts')")  # fmt: skip
        prompts = [str(p) for p in np.load(args.samples)["prompts"]]
        scores = load_clip(args.clip).score(samples, prompts)
        result |= {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std())}
    return result


def main(argv: list[str] | None = None) -> dict:
    """`python -m jdiff.evaluation SAMPLES`: the metrics of a sample file or folder, printed and
    returned."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "samples", type=pathlib.Path, help="a sample.py .npz (with --reference: or a folder)"
    )
    parser.add_argument("--data", default="digits", help="the data set the model learned")
    parser.add_argument("--image_size", type=int, default=8)
    parser.add_argument("--reference", type=pathlib.Path,
                        help="FID and KID against these images (.npz or folder); needs "
                        "--inception")  # fmt: skip
    parser.add_argument("--inception", type=pathlib.Path,
                        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a "
                        ".safetensors / .npz of its state dict)")  # fmt: skip
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read a .pth (pickle) Inception file: only one you trust")  # fmt: skip
    parser.add_argument("--clip", type=pathlib.Path,
                        help="a transformers CLIPModel directory: CLIP score of the samples "
                        "against their prompts")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=50)
    args = parser.parse_args(argv)
    if args.reference and not args.inception:
        parser.error("--reference needs --inception PATH (FID's Inception weights; see "
                     "jdiff/nn/inception.py for where to get them)")  # fmt: skip
    folder = args.samples.is_dir()
    out = args.samples / "eval.json" if folder else args.samples.with_suffix(".eval.json")
    if args.reference or args.clip:
        try:
            return _write(reference_metrics(args), out)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    if folder:
        parser.error("a folder of samples needs --reference or --clip")
    stored = read_samples(args.samples)
    if "prompts" in stored:  # text-to-image samples of the embedded shapes: the rule checker
        result = prompt_adherence(stored["images"], [str(p) for p in stored["prompts"]])
        return _write(result, out)
    images = stored["images"].astype(np.float32) / 127.5 - 1.0
    labels = stored["labels"] if "labels" in stored and stored["labels"].size else None
    result = evaluate(images, name=args.data, image_size=args.image_size, labels=labels)
    return _write(result, out)


if __name__ == "__main__":
    from jdiff import cli

    cli.guarded(main)()
