"""The embedded default: a class-conditional DDPM on scikit-learn's 8x8 handwritten digits,
offline, on a CPU.

    python train.py            # = --config configs/default.py --workdir outputs/default

No download: the digits ship inside the scikit-learn wheel and are prepared as a tfds data set
on first use. On 2 CPU cores it trains 3,000 steps (cosine-decayed AdamW, EMA, labels dropped
to a null class 10% of the time) in about 6 minutes, compile included, and ends by writing a
grid of 64 samples (DDIM, 50 steps, η=1, EMA weights, digits 0..9 cycling) to
outputs/default/samples/ and printing its path. Of 1,000 samples, 97.3% are recognised by
jdiff.evaluation's classifier and 95.9% as the digit asked for (98.3% of real held-out digits
are recognised); `--guidance_scale 2` in sample.py makes it 100%, with less variety. The
unconditional model (`--config.model.class_conditional=False`) reaches 92.2%. Interrupt it at
any time; the same command resumes from the last checkpoint.
`--config configs/default.py:tiny` is the few-step, one-level variant the tests run.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(
        {
            "name": "digits",  # embedded (jdiff.data.EMBEDDED) or any prepared tfds name
            "split": "train",
            "data_dir": "",  # "": $TFDS_DATA_DIR or ~/tensorflow_datasets
            "image_size": 8,
            "channels": 1,
            "random_flip": False,  # digits are not mirror-symmetric
            "batch_size": 64,  # global, over all devices and processes
        }
    )
    c.model = ml_collections.ConfigDict(
        {
            "variant": "tiny",  # a jdiff.nn.VARIANTS entry, then field overrides
            "overrides": {
                "block_out_channels": (32, 64),
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "dropout": 0.0,
            },
            "class_conditional": True,  # labels + a null class: classifier-free guidance
            "dtype": "float32",  # compute dtype ("bfloat16" on accelerators); params float32
            "remat": False,
            # nn.attention's kernel: "auto" picks per platform (TPU: the Pallas flash kernel;
            # CPU: the chunked path from 1,024 tokens), or "xla", "cudnn", "chunked", "pallas"
            "attention_implementation": "auto",
        }
    )
    c.diffusion = ml_collections.ConfigDict(
        {
            "schedule": "cosine",  # at 8x8: Fréchet 14.5 vs linear's 21.6 (README)
            "num_timesteps": 1000,
            "beta_start": 1e-4,  # linear, scaled_linear, sigmoid only
            "beta_end": 0.02,
            "prediction_type": "epsilon",
            "loss": "simple",  # or "hybrid" (learned variance, IDDPM)
            "snr_gamma": 0.0,  # min-SNR-γ weighting; 0 is off
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "name": "adamw",
            "learning_rate": 1e-3,
            "warmup_steps": 200,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "accumulate_steps": 1,
            "cosine_decay_steps": 3000,  # 0: constant after warm-up
        }
    )
    c.train = ml_collections.ConfigDict(
        {
            "num_steps": 3000,
            "log_every": 100,
            "checkpoint_every": 500,
            "keep_checkpoints": 3,
            "sample_every": 0,  # 0: only at the end
            "ema_max_decay": 0.9999,
            "class_dropout": 0.1,  # class-conditional only: P(label -> null class)
        }
    )
    c.mesh = ml_collections.ConfigDict(
        {
            "data": -1,  # data-parallel size; -1: all devices not used by fsdp
            "fsdp": 1,  # parameter sharding size (1: replicated parameters)
            "fsdp_min_size": 2**18,  # smaller arrays stay replicated
        }
    )
    c.distributed = ml_collections.ConfigDict(
        {
            "auto": False,  # jax.distributed.initialize() with cluster detection (TPU pods, SLURM)
            "coordinator_address": "",  # explicit set-up: "host:port" of process 0 ...
            "num_processes": 1,  # ... the number of processes (> 1 turns it on) ...
            "process_id": 0,  # ... and this one's index
            "timeout_s": 300,  # fail, do not hang, when the coordinator does not answer
        }
    )
    c.sample = ml_collections.ConfigDict(
        {
            "method": "ddim",
            "num_steps": 50,
            "num_samples": 64,
            "guidance_scale": 1.0,
            "options": {"eta": 1.0},  # the sampler's own options (diffusers' names)
        }
    )
    if arg == "tiny":
        c.data.batch_size = 8
        # one level (attention, no down/upsampling): its train step compiles in 60% of the
        # two-level model's time, and compiles are most of the test suite's
        c.model.overrides = {"block_out_channels": (32,), "down_block_types": ("AttnDownBlock2D",),
                             "up_block_types": ("AttnUpBlock2D",), "layers_per_block": 1,
                             "norm_num_groups": 8}  # fmt: skip
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2, sample_every=0)
        # The attention key bias has an identically zero gradient (softmax ignores a shift
        # shared by all logits), so its "gradient" is rounding noise that Adam with eps=1e-8
        # turns into ±lr steps whatever the device count (measured 2e-5 relative). eps=1e-6
        # keeps the sharding tests' comparisons about sharding: every parameter agrees to 2e-7.
        c.optim.update(warmup_steps=2, cosine_decay_steps=0, eps=1e-6)
        c.sample.update(num_steps=2, num_samples=4)
    elif arg:
        raise ValueError(f"configs/default.py: unknown variant {arg!r}; expected 'tiny' or none")
    return c
