"""Measure inpainting, outpainting and super-resolution on the embedded shapes' test split.

    python benchmarks/eval_image_tasks.py [--ldm outputs/ldm_shapes]
        [--inpaint outputs/inpaint_shapes] [--sr outputs/sr_shapes] [--num 720]
        [--vae outputs/vae_shapes_decoder]

Runs by hand (minutes on a CPU) after training the models; prints the README's tables and
writes them to outputs/image_tasks.json. Every figure is on the test split (renders no model
trained on); "real" rows are the same images untouched, the ceiling. `--vae` decodes (and
encodes) every model with that autoencoder instead of its own, one whose decoder alone was
fine-tuned from it; a workdir given as "none" is skipped.

- Inpainting: a mask over 60-80% of each image's object (its bounding box cut from a random
  side); the completed image (known pixels pasted) judged by the rule checker against its
  caption, and the mismatch at the mask border before any paste (mean |Δ| in [-1, 1] units
  over the known pixels within 2 px of the mask). Methods: RePaint with the text-to-image
  model (any model), and the model trained for inpainting. The caption is the prompt. The
  autoencoder's own reconstruction, known pixels pasted, is the ceiling of latent methods.
- Outpainting: the right 8 columns removed and regenerated (overlap 4): Fréchet distance of
  the whole canvases to the real images (a classifier of the 48 scenes as the feature
  space) beside real-vs-real, and the seam statistic at column 24.
- Super-resolution (8x8 -> 32x32, box-downsampled inputs, the empty prompt): PSNR, SSIM and
  consistency (the output box-downsampled back vs the input) for the model (projected onto
  its input over `--projection` of the schedule, and without), for bicubic upsampling, the
  checker's verdicts and the Fréchet distance to the real images.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jdiff import autoencoder, data, evaluation, images, inpainting, pipelines, superres  # noqa: E402
from jdiff.data import shapes  # noqa: E402


def object_masks(x_uint8: np.ndarray, rng: np.random.Generator, cover=(0.6, 0.8)):
    """Masks [N, 32, 32, 1] over a `cover` share of each object's bounding box, cut from a
    random side (and 1 px beyond it), and the share of the object's pixels each covers."""
    x = x_uint8.astype(np.float32)
    masks = np.zeros((*x.shape[:3], 1), np.float32)
    shares = []
    for i, image in enumerate(x):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        obj = np.linalg.norm(image - np.median(border, axis=0), axis=-1) > 40
        ys, xs = np.nonzero(obj)
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        f = rng.uniform(*cover)
        side = rng.integers(4)
        if side == 0:  # from the left
            right = left + int(np.ceil(f * (right - left)))
        elif side == 1:
            left = right - int(np.ceil(f * (right - left)))
        elif side == 2:
            bottom = top + int(np.ceil(f * (bottom - top)))
        else:
            top = bottom - int(np.ceil(f * (bottom - top)))
        masks[i, max(top - 1, 0) : bottom + 1, max(left - 1, 0) : right + 1] = 1.0
        shares.append(float((masks[i, ..., 0] > 0)[obj].mean()))
    return masks, np.asarray(shares)


def checker(x_uint8, captions) -> dict:
    """The rule checker's verdicts: share with every attribute right, and per attribute."""
    seen = shapes.describe(x_uint8)
    asked = [shapes.parse(c) for c in captions]
    out = {"all": float(np.mean([s == a for s, a in zip(seen, asked, strict=True)]))}
    for name in ("colour", "shape", "position"):
        out[name] = float(np.mean([s is not None and getattr(s, name) == getattr(a, name)
                                   for s, a in zip(seen, asked, strict=True)]))  # fmt: skip
    return out


def features_fn(seed: int = 0):
    """A classifier of the 48 scenes trained on the train split: its 64-d features."""
    import flax.serialization

    from jdiff.nn.classifier import SmallClassifier

    train_x, train_y = evaluation.load_split("shapes", "train", image_size=32)
    cached = ROOT / "outputs" / f"shapes_classifier_seed{seed}.msgpack"
    template = SmallClassifier(48).init(jax.random.key(0), train_x[:1])["params"]
    if cached.exists():  # trained by an earlier run of this script
        params = flax.serialization.from_bytes(template, cached.read_bytes())
    else:
        params = evaluation.train_classifier(jax.numpy.asarray(train_x),
                                             jax.numpy.asarray(train_y), jax.random.key(seed),
                                             num_classes=48)  # fmt: skip
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(flax.serialization.to_bytes(params))
    test_x, test_y = evaluation.load_split("shapes", "test", image_size=32)
    probs, _ = evaluation.classify(params, test_x, num_classes=48)
    print(f"scene classifier: held-out accuracy {(probs.argmax(1) == test_y).mean():.3f}")

    def features(x):  # [-1, 1]
        return evaluation.classify(params, np.asarray(x, np.float32), num_classes=48)[1]

    return features, train_x


def timed(label, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    print(f"{label}: {time.perf_counter() - t:.1f} s", flush=True)
    return out


def inpainting_eval(runs, x, x8, captions, masks, key, args) -> dict:
    results = {"real": {"checker": checker(x8, captions)}}
    if runs:  # what a perfect latent model can reach: the autoencoder's reconstruction, pasted
        model, params = next(iter(runs.values()))
        vae = {"params": params["autoencoder"]}

        def roundtrip(v):
            z = model.autoencoder.apply(vae, v, method="encode").mode()
            return model.autoencoder.apply(vae, z, method="decode")

        rec = autoencoder.in_chunks(jax.jit(roundtrip), x, 256)
        pasted = masks * np.clip(rec, -1, 1) + (1 - masks) * x
        results["autoencoder_ceiling"] = {"checker": checker(images.to_uint8(pasted), captions)}
    for name, (model, params) in runs.items():
        kwargs = {"guidance_scale": args.guidance, "num_steps": args.steps}
        if model.is_inpainting:
            out = timed(name, model.inpaint, params, x, masks, captions, key, eta=1.0, **kwargs)
            unpasted = np.asarray(out)
        else:
            out = timed(name, model.inpaint, params, x, masks, captions, key,
                        jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
                        return_unpasted=True, eta=1.0, **kwargs)  # fmt: skip
            unpasted = np.asarray(out[1])
        pasted = masks * unpasted + (1 - masks) * x
        results[name] = {
            "checker": checker(images.to_uint8(pasted), captions),
            "border_mismatch_before_paste": inpainting.border_mismatch(unpasted, x, masks),
            "known_mismatch_before_paste": float(np.abs(unpasted - x)[
                np.broadcast_to(masks == 0, x.shape)].mean()),
        }  # fmt: skip
        images.save_grid(ROOT / "outputs" / f"eval_inpaint_{name}.png",
                         np.concatenate([np.where(masks[:16] > 0, 0, x[:16]), pasted[:16]]),
                         ncols=16)  # fmt: skip
    return results


def outpainting_eval(runs, x, captions, key, features, train_x, args) -> dict:
    n = len(x)
    rng = np.random.default_rng(1)
    train_subset = train_x[rng.choice(len(train_x), n, replace=False)]
    real_f = features(x)
    results = {
        "real_vs_real_frechet": evaluation.frechet_distance(features(train_subset), real_f),
        "real_seam": inpainting.seam_statistic(x, 24),
    }
    for name, (model, params) in runs.items():
        extra = {} if model.is_inpainting else {"jump_length": args.jump_length,
                                                "jump_n_sample": args.jump_n_sample}  # fmt: skip
        canvas = timed(name, model.outpaint, params, x[:, :, :24], captions, key, right=8,
                       overlap=4, guidance_scale=args.guidance, num_steps=args.steps, eta=1.0,
                       **extra)  # fmt: skip
        results[name] = {
            "frechet_to_real": evaluation.frechet_distance(features(canvas), real_f),
            "seam": inpainting.seam_statistic(canvas, 24),
        }
        images.save_grid(ROOT / "outputs" / f"eval_outpaint_{name}.png", canvas[:32], ncols=16)
    return results


def superres_eval(model, params, x, x8, captions, key, features, args) -> dict:
    low = np.asarray(superres.downsample(x, 4))
    bicubic = np.asarray(superres.upsample(low, (32, 32)))
    sr, alone = (np.asarray(timed(f"sr (projection {share})", model.upscale, params, low, key,
                                  num_steps=args.steps, noise_level=args.noise_level, eta=1.0,
                                  project_low_res=share))
                 for share in (args.projection, 0.0))  # fmt: skip
    real_f = features(x)

    def figures(y):
        return {
            "psnr_db": float(autoencoder.psnr(y, x).mean()),
            "ssim": float(superres.ssim(y, x).mean()),
            "consistency_psnr_db": float(autoencoder.psnr(superres.downsample(y, 4), low).mean()),
            "checker": checker(images.to_uint8(y), captions),
            "frechet_to_real": evaluation.frechet_distance(features(y), real_f),
        }

    images.save_grid(ROOT / "outputs" / "eval_sr.png",
                     np.concatenate([bicubic[:16], sr[:16], x[:16]]), ncols=16)  # fmt: skip
    return {"sr": figures(sr), "sr_without_projection": figures(alone),
            "bicubic": figures(bicubic), "real": {"checker": checker(x8, captions)}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ldm", default="outputs/ldm_shapes")
    parser.add_argument("--inpaint", default="outputs/inpaint_shapes")
    parser.add_argument("--sr", default="outputs/sr_shapes")
    parser.add_argument("--num", type=int, default=720)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--jump_length", type=int, default=5)
    parser.add_argument("--jump_n_sample", type=int, default=3)
    parser.add_argument("--noise_level", type=int, default=20)
    parser.add_argument("--projection", type=float, default=0.9)  # SR: project_low_res
    parser.add_argument("--tasks", default="inpaint,outpaint,sr")
    parser.add_argument("--vae", default=None, help="a fine-tuned decoder's workdir")
    parser.add_argument("--out", default="outputs/image_tasks.json")
    args = parser.parse_args()
    tasks = set(args.tasks.split(","))

    source = data.load_source("shapes", split="test")
    records = [source[i] for i in range(min(args.num, len(source)))]
    x8 = np.stack([r["image"] for r in records])
    x = x8.astype(np.float32) / 127.5 - 1.0
    captions = [r["caption"].decode() if isinstance(r["caption"], bytes) else str(r["caption"])
                for r in records]  # fmt: skip
    key = jax.random.key(0)
    runs = {}
    for name, workdir in (("repaint_ldm", args.ldm), ("trained_inpaint", args.inpaint)):
        if workdir != "none" and pathlib.Path(workdir).exists():
            model, params, _ = pipelines.load_latent_diffusion(
                workdir, autoencoder_workdir=args.vae
            )
            runs[name] = (model, params)
    results: dict = {"num_images": len(x), "settings": vars(args)}
    features, train_x = features_fn() if tasks & {"outpaint", "sr"} else (None, None)
    if "inpaint" in tasks:
        masks, shares = object_masks(x8, np.random.default_rng(0))
        results["inpainting"] = inpainting_eval(runs, x, x8, captions, masks, key, args)
        results["inpainting"]["object_share_masked"] = float(shares.mean())
    if "outpaint" in tasks:
        results["outpainting"] = outpainting_eval(runs, x, captions, key, features, train_x, args)
    if "sr" in tasks and args.sr != "none" and pathlib.Path(args.sr).exists():
        model, params, _ = pipelines.load_latent_diffusion(args.sr, autoencoder_workdir=args.vae)
        results["super_resolution"] = superres_eval(model, params, x, x8, captions, key,
                                                    features, args)  # fmt: skip
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
