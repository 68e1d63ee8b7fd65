"""Bad input at the door of every program: each case of the table exits non-zero with one
`error:` line naming the problem and no traceback, before anything is compiled or written.

The cases run as real processes (`train.py`, `sample.py`, `python -m jdiff.evaluation`,
`python -m jdiff.interop`), a few at a time, once for the whole table, each forked from one
process that imported the libraries (`forked_programs.py`); the tests then read their
outcomes. sample.py's cases use the shared tiny run, which none of them may change.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from runs import ROOT, XLA_FLAGS

DEFAULT = f"--config={ROOT / 'configs' / 'default.py'}"
TINY = f"{DEFAULT}:tiny"
SD_TINY = f"--config={ROOT / 'configs' / 'sd_finetune.py'}:tiny"
LDM_TINY = f"--config={ROOT / 'configs' / 'ldm_shapes.py'}:tiny"

# (id, program, arguments, a fragment the error line must contain). "{run}": the tiny trained
# workdir; "{f}": a folder of bad files the fixture writes; "{new}": a fresh directory per case.
# image-size-odd needs a U-Net of two levels or more: the default's (the tiny one has one).
CASES = [
    # train.py: the config file and its keys
    ("unknown-key", "train", [TINY, "--config.train.nosuch=1"], "config.train has no key 'nosuch'"),
    ("misspelt-section", "train", [TINY, "--config.trian.num_steps=1"], "mean config.train?"),
    ("misspelt-key", "train", [TINY, "--config.train.num_step=5"], "config.train.num_steps?"),
    ("missing-config", "train", ["--config={f}/nope.py"], "no such file"),
    ("broken-config", "train", ["--config={f}/broken.py"], "SyntaxError"),
    ("unknown-variant", "train", [f"{DEFAULT}:huge"], "unknown variant 'huge'"),
    ("not-an-int", "train", [TINY, "--config.train.num_steps=abc"], "invalid literal"),
    ("unknown-flag", "train", [TINY, "--nosuchflag=1"], "nosuchflag"),
    ("extra-argument", "train", [TINY, "extra"], "unexpected arguments"),
    # train.py: values
    ("num-steps-0", "train", [TINY, "--config.train.num_steps=0"], "config.train.num_steps=0"),
    ("num-steps-negative", "train", [TINY, "--config.train.num_steps=-5"], "num_steps=-5"),
    ("keep-0", "train", [TINY, "--config.train.keep_checkpoints=0"], "keep_checkpoints=0"),
    ("checkpoint-every-0", "train", [TINY, "--config.train.checkpoint_every=0"], "every=0"),
    ("log-every-0", "train", [TINY, "--config.train.log_every=0"], "log_every=0"),
    ("class-dropout-2", "train", [TINY, "--config.train.class_dropout=2.0"], "class_dropout=2.0"),
    ("ema-decay-1.5", "train", [TINY, "--config.train.ema_max_decay=1.5"], "ema_max_decay=1.5"),
    ("batch-0", "train", [TINY, "--config.data.batch_size=0"], "batch_size=0"),
    ("image-size-odd", "train", [DEFAULT, "--config.data.image_size=7"], "multiple of 2"),
    ("channels-0", "train", [TINY, "--config.data.channels=0"], "channels=0"),
    ("lr-nan", "train", [TINY, "--config.optim.learning_rate=nan"], "learning_rate=nan"),
    ("lr-negative", "train", [TINY, "--config.optim.learning_rate=-1"], "learning_rate=-1"),
    ("lr-1e30", "train", [TINY, "--config.optim.learning_rate=1e30"], "learning_rate=1e+30"),
    ("optimizer", "train", [TINY, "--config.optim.name=sgd"], "'adam', 'adamw'"),
    ("b1", "train", [TINY, "--config.optim.b1=2"], "optim.b1=2"),
    ("accumulate-0", "train", [TINY, "--config.optim.accumulate_steps=0"], "accumulate_steps=0"),
    ("grad-clip-negative", "train", [TINY, "--config.optim.grad_clip=-1"], "grad_clip=-1"),
    ("schedule", "train", [TINY, "--config.diffusion.schedule=cosinus"], "'cosine'"),
    ("timesteps-1", "train", [TINY, "--config.diffusion.num_timesteps=1"], "num_timesteps=1"),
    ("prediction", "train", [TINY, "--config.diffusion.prediction_type=x"], "'v_prediction'"),
    ("loss", "train", [TINY, "--config.diffusion.loss=l3"], "'hybrid'"),
    ("betas", "train", [TINY, "--config.diffusion.schedule=linear",
                        "--config.diffusion.beta_start=0.5"], "below beta_end"),
    ("dtype", "train", [TINY, "--config.model.dtype=float64"], "model.dtype='float64'"),
    ("attention-unknown", "train", [TINY, "--config.model.attention_implementation=flash"],
     "model.attention_implementation='flash'"),
    ("attention-pallas-on-cpu", "train", [TINY, "--config.model.attention_implementation=pallas"],
     "runs on a TPU only, and this run is on the cpu"),
    ("seed", "train", [TINY, "--config.seed=-1"], "seed=-1"),
    ("process-id", "train", [TINY, "--config.distributed.process_id=3"], "process_id=3"),
    ("grid-guidance", "train", [TINY, "--config.sample.guidance_scale=nan"], "guidance_scale=nan"),
    ("grid-method", "train", [TINY, "--config.sample.method=foo"], "sample.method='foo'"),
    ("grid-samples-0", "train", [TINY, "--config.sample.num_samples=0"], "num_samples=0"),
    # train.py: settings the config's model would not use
    ("dropout-unconditional", "train", [TINY, "--config.model.class_conditional=False",
                                        "--config.train.class_dropout=0.2"], "a class-cond"),
    ("betas-cosine", "train", [TINY, "--config.diffusion.beta_end=0.05"], "(not cosine)"),
    ("snr-hybrid", "train", [TINY, "--config.diffusion.loss=hybrid",
                             "--config.diffusion.snr_gamma=5"], "snr_gamma=5.0 does not apply"),
    ("grid-eta-euler", "train", [TINY, "--config.sample.method=euler",
                                 "--config.sample.options.eta=0.5"], "sample.method='ddim'"),
    ("workdir-is-file", "train", [TINY, "--workdir={f}/notes.txt"], "is a file"),
    ("resume-accumulate", "train", [TINY, "--workdir={run}", "--config.optim.accumulate_steps=2"],
     "optim.accumulate_steps differ"),
    ("resume-grad-clip", "train", [TINY, "--workdir={run}", "--config.optim.grad_clip=0"],
     "optim.grad_clip"),
    ("resume-model", "train", [TINY, "--workdir={run}", "--config.model.class_conditional=False"],
     "model differ"),
    # train.py: LoRA and ControlNet runs
    ("lora-without-pretrained", "train", [SD_TINY, "--config.lora.rank=4"],
     "config.lora.rank trains LoRA adapters on pretrained weights"),
    ("controlnet-unknown", "train", [SD_TINY, "--config.controlnet.conditioning=pose"],
     "controlnet.conditioning='pose'"),
    # sample.py: numbers
    ("guidance-nan", "sample", ["--workdir={run}", "--guidance_scale=nan"], "--guidance_scale=nan"),
    ("guidance-inf", "sample", ["--workdir={run}", "--guidance_scale=inf"], "--guidance_scale=inf"),
    ("guidance-1e30", "sample", ["--workdir={run}", "--guidance_scale=1e30"], "<= 100"),
    ("eta-nan", "sample", ["--workdir={run}", "--eta=nan"], "--eta=nan"),
    ("eta-negative", "sample", ["--workdir={run}", "--eta=-1"], "--eta=-1"),
    ("samples-0", "sample", ["--workdir={run}", "--num_samples=0"], "--num_samples=0"),
    ("samples-negative", "sample", ["--workdir={run}", "--num_samples=-3"], "--num_samples=-3"),
    ("steps-0", "sample", ["--workdir={run}", "--num_steps=0"], "--num_steps=0"),
    ("noise-level", "sample", ["--workdir={run}", "--noise_level=999"], "--noise_level=999"),
    ("overlap-negative", "sample", ["--workdir={run}", "--overlap=-1"], "--overlap=-1"),
    ("method", "sample", ["--workdir={run}", "--method=foo"], "--method"),
    ("non-utf8-prompt", "sample", ["--workdir={run}", b"--prompt=\xff\xfe"], "not valid UTF-8"),
    # sample.py: options that do not apply to a pixel model, and missing pairs
    ("prompt-to-pixels", "sample", ["--workdir={run}", "--prompt=a cat"], "text-conditional"),
    ("negative-to-pixels", "sample", ["--workdir={run}", "--negative_prompt=x"], "--negative_p"),
    ("overlap-without-outpaint", "sample", ["--workdir={run}", "--overlap=2"], "--overlap does"),
    ("noise-level-without-upscale", "sample", ["--workdir={run}", "--noise_level=5"],
     "--noise_level does not apply"),
    ("eta-with-euler", "sample", ["--workdir={run}", "--method=euler", "--eta=0.5"], "DDIM's"),
    ("trajectory-repaint", "sample", ["--workdir={run}", "--init_image={f}/image.png",
                                      "--mask={f}/mask.png", "--trajectory"], "--trajectory"),
    ("dtype-to-workdir", "sample", ["--workdir={run}", "--dtype=bfloat16"], "--pretrained"),
    ("lora-to-workdir", "sample", ["--workdir={run}", "--lora={f}/random.safetensors"],
     "--lora does not apply"),
    ("controlnet-to-workdir", "sample", ["--workdir={run}", "--controlnet={f}/image.png",
                                         "--control_image={f}/image.png"],
     "--controlnet does not apply"),
    ("step-to-pretrained", "sample", ["--pretrained={f}/random.safetensors", "--step=3"],
     "--step does not apply"),
    ("init-image-alone", "sample", ["--workdir={run}", "--init_image={f}/image.png"],
     "--init_image"),
    ("strength-to-pixels", "sample", ["--workdir={run}", "--strength=0.5"], "--strength"),
    ("projection-to-pixels", "sample", ["--workdir={run}", "--projection=0.5"], "--projection"),
    ("jumps-without-mask", "sample", ["--workdir={run}", "--jump_length=3"], "--jump_length"),
    ("upscale-pixels", "sample", ["--workdir={run}", "--upscale={f}/image.png"], "super-res"),
    ("vae-pixels", "sample", ["--workdir={run}", "--vae={run}"], "--vae does not apply"),
    ("mask-alone", "sample", ["--workdir={run}", "--mask={f}/mask.png"], "needs --init_image"),
    ("mask-and-outpaint", "sample", ["--workdir={run}", "--init_image={f}/image.png",
                                     "--mask={f}/mask.png", "--outpaint=left=2"], "pass one"),
    ("mask-other-size", "sample", ["--workdir={run}", "--init_image={f}/image.png",
                                   "--mask={f}/mask5x13.png"], "is 5x13 pixels"),
    ("mask-not-an-image", "sample", ["--workdir={run}", "--init_image={f}/image.png",
                                     "--mask={f}/notes.txt"], "--mask"),
    ("missing-image", "sample", ["--workdir={run}", "--init_image={f}/nowhere.png",
                                 "--mask={f}/mask.png"], "nowhere.png"),
    ("outpaint-syntax", "sample", ["--workdir={run}", "--init_image={f}/image.png",
                                   "--outpaint=sideways"], "--outpaint"),
    # sample.py: where to sample from
    ("neither", "sample", [], "exactly one of --workdir"),
    ("both", "sample", ["--workdir={run}", "--pretrained={f}"], "exactly one of --workdir"),
    ("no-workdir", "sample", ["--workdir={f}/nowhere"], "config.json not found"),
    ("workdir-is-file-s", "sample", ["--workdir={f}/notes.txt"], "config.json not found"),
    ("config-json-not-json", "sample", ["--workdir={f}/garbled_run"], "not the JSON"),
    ("config-json-missing-keys", "sample", ["--workdir={f}/partial_run"], "lacks the section"),
    ("no-such-step", "sample", ["--workdir={run}", "--step=99"], "no checkpoint 99"),
    ("pretrained-random", "sample", ["--pretrained={f}/random.safetensors", "--prompt=x"],
     "random.safetensors"),
    ("pretrained-truncated", "sample", ["--pretrained={f}/truncated.safetensors", "--prompt=x"],
     "truncated.safetensors"),
    ("pretrained-missing", "sample", ["--pretrained={f}/nowhere", "--prompt=x"], "nowhere"),
    # python -m jdiff.evaluation
    ("eval-floats", "evaluation", ["{f}/floats.npz"], "expected uint8"),
    ("eval-not-npz", "evaluation", ["{f}/notes.txt"], "notes.txt"),
    ("eval-garbled-npz", "evaluation", ["{f}/garbled.npz"], "is not an .npz"),
    ("eval-no-images", "evaluation", ["{f}/noimages.npz"], "holds no 'images'"),
    ("eval-labels", "evaluation", ["{f}/labels.npz"], "3 labels for 4 images"),
    ("eval-missing", "evaluation", ["{f}/nowhere.npz"], "nowhere.npz"),
    ("eval-reference-alone", "evaluation", ["{f}/labels.npz", "--reference={f}"], "--inception"),
    # python -m jdiff.interop
    ("interop-random", "interop", ["{f}/random.safetensors", "--output={new}"], "random.safet"),
    ("interop-truncated", "interop", ["{f}/truncated.safetensors", "--output={new}"],
     "truncated.safetensors"),
    ("interop-text", "interop", ["{f}/notes.txt", "--output={new}"], "notes.txt"),
    ("interop-missing", "interop", ["{f}/nowhere", "--output={new}"], "nowhere"),
    ("interop-output-full", "interop", ["{f}/random.safetensors", "--output={f}"], "--output"),
    ("interop-output-file", "interop", ["{f}/random.safetensors", "--output={f}/notes.txt"],
     "--output"),
    # python -m jdiff.aot, and train.py --compile_for (refused before any compile)
    ("aot-no-topology", "aot", [TINY], "--topology is required"),
    ("aot-unknown-chip", "aot", [TINY, "--topology=v9:2x2"], "expected <chip>:<shape>"),
    ("aot-no-shape", "aot", [TINY, "--topology=v5e"], "expected <chip>:<shape>"),
    ("aot-no-such-topology", "aot", [TINY, "--topology=v5e:3x7"], "libtpu has no such"),
    ("aot-batch", "aot", [TINY, "--topology=v5e:2x2", "--config.data.batch_size=6"],
     "does not split over the mesh's 4 chips"),
    ("aot-effort", "aot", [TINY, "--topology=v5e:2x2", "--effort=2"], "--effort=2.0"),
    # the TPU compiler's own verdict (4M 8x8 images per chip): no traceback
    ("aot-does-not-fit", "aot", [TINY, "--topology=v5e:2x2", "--effort=-1",
                                 "--config.data.batch_size=16777216"],
     "does NOT fit v5e:2x2"),
    ("aot-fsdp", "aot", [TINY, "--topology=v5e:2x2", "--config.mesh.fsdp=3"], "fsdp=3"),
    ("aot-unknown-key", "aot", [TINY, "--topology=v5e:2x2", "--config.mesh.fsdp_size=2"],
     "config.mesh has no key"),
    ("aot-pretrained", "aot", [SD_TINY, "--topology=v5e:2x2", "--config.latent.pretrained={f}"],
     "to size it without its weights"),
    ("aot-autoencoder", "aot", [LDM_TINY, "--topology=v5e:2x2",
                                "--config.latent.autoencoder_workdir={new}"],
     "holds no trained autoencoder"),
    ("compile-for", "train", [TINY, "--compile_for=v5p:2x"], "--compile_for 'v5p:2x'"),
]  # fmt: skip

PROGRAMS = {
    "train": [str(ROOT / "train.py")],
    "sample": [str(ROOT / "sample.py")],
    "evaluation": ["-m", "jdiff.evaluation"],
    "interop": ["-m", "jdiff.interop"],
    "aot": ["-m", "jdiff.aot"],
}


def write_bad_files(folder: pathlib.Path, run: pathlib.Path) -> None:
    """Every file the table feeds the programs."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not an image, an array or weights\n")
    (folder / "broken.py").write_text("def get_config(:\n")
    Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(folder / "image.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(folder / "mask.png")
    Image.fromarray(np.full((13, 5), 255, np.uint8)).save(folder / "mask5x13.png")
    (folder / "random.safetensors").write_bytes(rng.bytes(1000))
    save_file({"w": rng.standard_normal((64, 64), np.float32)}, folder / "whole.safetensors")
    whole = (folder / "whole.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.safetensors").unlink()
    np.savez(folder / "floats.npz", images=rng.standard_normal((4, 8, 8, 1)).astype(np.float32))
    (folder / "garbled.npz").write_bytes(rng.bytes(500))
    np.savez(folder / "noimages.npz", x=np.zeros(3))
    np.savez(folder / "labels.npz", images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.arange(3))
    (folder / "garbled_run").mkdir()
    (folder / "garbled_run" / "config.json").write_text("{ not json")
    (folder / "partial_run").mkdir()
    stored = json.loads((run / "config.json").read_text())
    del stored["config"]["model"], stored["config"]["diffusion"]
    (folder / "partial_run" / "config.json").write_text(json.dumps(stored))


def fill(arg, run, folder, new):
    if isinstance(arg, bytes):
        return arg
    return arg.format(run=run, f=folder, new=new)


@pytest.fixture(scope="module")
def outcomes(uninterrupted, tmp_path_factory):
    """{case id: (exit status, output)} of every case, 3 at a time (`forked_programs.py`:
    processes forked from one that imported the libraries once); also checks that the tiny
    run is unchanged by them."""
    run = uninterrupted[0]
    folder = tmp_path_factory.mktemp("bad_files")
    write_bad_files(folder, run)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    env.pop("JDIFF_DEBUG", None)
    cases = []
    for name, program, args, _ in CASES:
        new = tmp_path_factory.mktemp(f"new_{name}")
        argv = [*PROGRAMS[program], *(fill(a, run, folder, new) for a in args)]
        argv = [{"bytes": list(a)} if isinstance(a, bytes) else a for a in argv]
        cases.append({"name": name, "argv": argv})
    (folder / "cases.json").write_text(json.dumps(cases))
    command = [sys.executable, str(ROOT / "tests" / "forked_programs.py"), "cases.json",
               "outcomes.json", "--parallel=3", "--timeout=300"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800,
                          cwd=folder)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = {k: tuple(v) for k, v in json.loads((folder / "outcomes.json").read_text()).items()}
    after = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    results["_run_unchanged"] = before == after
    return results


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_a_nonzero_exit(outcomes, case):
    name, _, _, fragment = case
    status, output = outcomes[name]
    errors = [line for line in output.splitlines() if re.match(r"(\S+: )?error: ", line)]
    assert status != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and fragment in errors[0], output[-2000:]


def test_the_table_changed_nothing_of_the_run_it_used(outcomes):
    assert outcomes["_run_unchanged"]


def test_the_table_covers_every_program():
    programs = [c[1] for c in CASES]
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert {p: programs.count(p) for p in PROGRAMS} == {
        p: programs.count(p) for p in PROGRAMS if programs.count(p) >= 6
    }


def test_closed_loop_reports_are_dropped_even_when_another_thread_writes_between():
    """The traceback tensorstore prints from its thread once orbax's loop is closed goes,
    though the main thread's error line lands in its middle (as it did in CI); the error
    line, another thread's real traceback and a progress bar's partial line all stay."""
    import io
    import threading

    from jdiff.cli import _ClosedLoopReports

    base = "/usr/lib/python3.11/asyncio/base_events.py"
    closed = [
        "Traceback (most recent call last):\n",
        f'  File "{base}", line 806, in call_soon_threadsafe\n',
        "    self._check_closed()\n",
        f'  File "{base}", line 519, in _check_closed\n',
        "    raise RuntimeError('Event loop is closed')\n",
        "RuntimeError: Event loop is closed\n",
    ]
    real = ["Traceback (most recent call last):\n", '  File "x.py", line 1\n', "ValueError: no\n"]
    out = io.StringIO()
    stream = _ClosedLoopReports(out)
    halfway, resumed = threading.Event(), threading.Event()

    def background():
        for i, line in enumerate(closed):
            if i == 3:
                halfway.set()
                resumed.wait(10)
            stream.write(line[:5])  # in pieces, as print writes them
            stream.write(line[5:])

    thread = threading.Thread(target=background)
    thread.start()
    assert halfway.wait(10)
    stream.write(" 50%|#####     | 2/4\r")
    print("error: checkpoint 4 could not be written", file=stream, flush=True)
    resumed.set()
    thread.join(10)
    for line in real[:2]:
        stream.write(line)
    stream.close_reports()  # the exit: a traceback cut short that is not asyncio's stays
    assert out.getvalue() == " 50%|#####     | 2/4\rerror: checkpoint 4 could not be written\n" + (
        "".join(real[:2])
    )
