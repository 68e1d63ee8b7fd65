"""Measure a ControlNet trained on the embedded shapes: how often samples follow the control.

    python benchmarks/eval_adapters.py --base outputs/ldm_shapes \
        --controlnet outputs/controlnet_shapes/controlnet [--num 480] [--guidance_scale 3]
        [--vae outputs/vae_shapes_decoder]

Runs by hand (minutes on a CPU) after `configs/controlnet_shapes.py`. For `--num` renders of
each split (the test split's seen combinations, the held-out ones), the prompt is the colour
alone ("a red shape") and the control image the render's silhouette; each sample is read by
the rule checker (`shapes.describe`) and counted right when its shape and position are the
control image's and its colour the prompt's. The same prompts without the ControlNet are the
baseline (shape and position then by chance: 1 in 12). `--vae` decodes with another
autoencoder of the same latents (`vae_shapes_decoder`: the decoder fine-tuned, the encoder
frozen). Prints the README's rows and writes them to `outputs/controlnet_adherence.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np

from jdiff import interop, pipelines, sharding
from jdiff.data import pipeline, shapes


def _read(split: str, num: int) -> tuple[np.ndarray, list]:
    source = pipeline.load_source("shapes", split=split)
    index = np.random.default_rng(0).permutation(len(source))[:num]
    images = np.stack([source[int(i)]["image"] for i in index])
    return images, shapes.describe(images)


def _sample(model, params, prompts, controls, net, args) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), args.batch):
        extra = {}
        if net is not None:
            extra = {"controlnet": net, "control_image": controls[i : i + args.batch]}
        x = model.txt2img(params, prompts[i : i + args.batch], jax.random.key(i),
                          guidance_scale=args.guidance_scale, num_steps=args.num_steps,
                          method="ddim", eta=1.0, **extra)  # fmt: skip
        out.append(np.asarray(x))
    return np.round((np.concatenate(out) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def _score(samples: np.ndarray, scenes: list) -> dict:
    read = shapes.describe(samples)
    pairs = list(zip(read, scenes, strict=True))
    count = len(pairs)

    def share(test):
        return round(100.0 * sum(bool(r) and test(r, s) for r, s in pairs) / count, 1)

    return {
        "all": share(lambda r, s: (r.colour, r.shape, r.position) ==
                     (s.colour, s.shape, s.position)),
        "shape_and_position": share(lambda r, s: (r.shape, r.position) == (s.shape, s.position)),
        "colour": share(lambda r, s: r.colour == s.colour),
        "shape": share(lambda r, s: r.shape == s.shape),
        "position": share(lambda r, s: r.position == s.position),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="outputs/ldm_shapes")
    parser.add_argument("--controlnet", default="outputs/controlnet_shapes/controlnet")
    parser.add_argument("--num", type=int, default=480)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--num_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--vae", default=None, help="decode with this autoencoder's workdir")
    args = parser.parse_args()
    sharding.enable_compilation_cache()
    p = pipelines.trained.pretrained_from_workdir(args.base)
    if args.vae:
        from jdiff import autoencoder

        p.params["autoencoder"] = autoencoder.load(args.vae)[1]
    model = pipelines.LatentDiffusion.from_pretrained(p)
    net = interop.load_controlnet(args.controlnet)
    results = {}
    for split in ("test", "held_out"):
        images, scenes = _read(split, args.num)
        prompts = [s.colour_caption for s in scenes]
        controls = shapes.silhouettes(images)
        for name, with_net in (("ControlNet", net), ("no ControlNet", None)):
            samples = _sample(model, p.params, prompts, controls, with_net, args)
            results[f"{split}, {name}"] = _score(samples, scenes)
            print(f"| {split} | {name} | {results[f'{split}, {name}']} |", flush=True)
    out = pathlib.Path(f"outputs/controlnet_adherence{'_vae' if args.vae else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
