"""`python -m jdiff.interop SOURCE --output DIR`: convert pretrained weights (a diffusers
directory, an original single file or a jdiff checkpoint) to a jdiff checkpoint (orbax), which
`train.py` (`config.pretrained`) and `sample.py` read, with `--format diffusers` to a
diffusers-format directory, or with `--format single_file` to one original-layout
.safetensors file (SD 1.x, 2.x, XL)."""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from jdiff.interop import single_file
from jdiff.interop.converted import write_converted
from jdiff.interop.diffusers_dir import save_pretrained
from jdiff.interop.pretrained import load_pretrained


def main(argv: list[str] | None = None) -> None:
    """`python -m jdiff.interop SOURCE --output DIR` (a diffusers directory or single file to a
    jdiff checkpoint, or with `--format diffusers` to a diffusers-format directory). Bad input
    raises ValueError / OSError; `python -m jdiff.interop` turns them into one line."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m jdiff.interop",
        description="Convert Stable Diffusion / DDPM weights: a diffusers-format directory, an "
        "original single-file .safetensors or a jdiff checkpoint in; a jdiff checkpoint (orbax) "
        "or a diffusers-format directory out.",
    )
    parser.add_argument("source", help="diffusers directory, .safetensors file or jdiff checkpoint")
    parser.add_argument("--output", required=True,
                        help="the new directory (single_file: file) to write")  # fmt: skip
    parser.add_argument(
        "--format",
        choices=("jdiff", "diffusers", "single_file"),
        default="jdiff",
        help="jdiff: orbax checkpoint + configs; diffusers: diffusers-format; single_file: "
        "one original-layout .safetensors (--output names the file)",
    )
    parser.add_argument(
        "--prediction_type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="override (single files cannot tell; SD1 epsilon, SD2 v)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="override the default image size (single files: SD1 512, SD2 768)",
    )
    parser.add_argument(
        "--allow_pickle",
        action="store_true",
        help="read pickle-based .ckpt/.bin files (only from sources you trust)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    output = pathlib.Path(args.output)
    if args.format == "single_file":
        if output.suffix != ".safetensors" or output.exists():
            raise ValueError(f"--output {output}: --format single_file writes a new "
                             ".safetensors file; name one that does not exist")  # fmt: skip
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output} exists and is not an empty directory; choose another")
    pretrained = load_pretrained(
        args.source,
        prediction_type=args.prediction_type,
        image_size=args.image_size,
        allow_pickle=args.allow_pickle,
    )
    write = {"jdiff": write_converted, "diffusers": save_pretrained,
             "single_file": single_file.save}[args.format]  # fmt: skip
    written = write(pretrained, output)
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in pretrained.params.items()}  # fmt: skip
    print(f"{args.format} checkpoint: {written}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"scheduler: {pretrained.scheduler.method} {pretrained.scheduler.options_for()}")


if __name__ == "__main__":
    main()
