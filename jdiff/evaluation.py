"""Judging generated samples: a classifier's verdicts, Fréchet distance in its feature space,
and nearest-training-neighbour distances (memorisation is not success).

    python -m jdiff.evaluation SAMPLES.npz [--data digits]

trains the small classifier on the data set's train split (seeded, seconds on a CPU), then
prints and stores next to the samples (`.eval.json`) the figures for the samples beside the
same figures for the held-out split, which are the ceiling. Samples written with prompts (a
text-to-image model of the embedded shapes) are judged instead by the shapes' rule checker:
the share that shows what its prompt asks for, seen and held-out combinations apart.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff import data
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
    body ran 16x slower (measured), and this runs once per evaluation, not per sample.
    """
    model, tx = SmallClassifier(num_classes), optax.adam(1e-3)
    k_init, k_batches = jax.random.split(key)
    params = model.init(k_init, x[:1])["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key):
        idx = jax.random.randint(key, (batch_size,), 0, len(x))

        def loss(p):
            logits, _ = model.apply({"params": p}, x[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        params, opt_state = step(params, opt_state, jax.random.fold_in(k_batches, i))
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

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = sqrtm(cov_a)
    cross = np.trace(sqrtm(root_a @ cov_b @ root_a))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=pathlib.Path, help="an .npz written by sample.py")
    parser.add_argument("--data", default="digits", help="the data set the model learned")
    parser.add_argument("--image_size", type=int, default=8)
    args = parser.parse_args(argv)
    stored = np.load(args.samples)
    if "prompts" in stored:  # text-to-image samples of the embedded shapes: the rule checker
        result = prompt_adherence(stored["images"], [str(p) for p in stored["prompts"]])
        out = args.samples.with_suffix(".eval.json")
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        print(f"written to {out}")
        return result
    images = stored["images"].astype(np.float32) / 127.5 - 1.0
    labels = stored["labels"] if "labels" in stored and stored["labels"].size else None
    result = evaluate(images, name=args.data, image_size=args.image_size, labels=labels)
    out = args.samples.with_suffix(".eval.json")
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
