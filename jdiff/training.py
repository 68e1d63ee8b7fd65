"""Training: the train state as one pytree, a pure train step, the optimizers from a config.

`train_step(state, batch, key) -> (state, metrics)`, jitted once (donating the state), takes a
loss's gradient and applies an optax update and the EMA: for diffusion models the loss draws t
per example and noises in closed form (`make_train_step`); for the autoencoder of latent
diffusion it is reconstruction + KL (`make_autoencoder_step`); `make_step` is their shared part.
A step whose loss, gradient or updated parameters are not finite leaves the state as it was
and records its number in `state.nonfinite_step`, so no bad parameters reach a checkpoint.
Only the `make_*` factories read a config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jdiff import adapters, conditioning, diffusion, losses, superres
from jdiff.conditioning import Conditioning, Control
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.schedules import Schedule

LOSSES = ("simple", "hybrid")
RECONSTRUCTION_LOSSES = ("l1", "l2")
TASKS = ("diffusion", "autoencoder", "latent_diffusion")
OPTIMIZERS = ("adam", "adamw")
AUTOENCODER_TRAINABLE = ("all", "decoder")
DECODER_PARAMS = ("post_quant_conv", "decoder")  # an AutoencoderKL's decoder side


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, one pytree (checkpointed whole)."""

    step: jax.Array  # int32 [], micro-steps taken (optimizer updates x accumulate_steps)
    params: Any
    ema_params: Any
    opt_state: Any
    nonfinite_step: jax.Array  # int32 [], the first step (1-based) that went non-finite, or -1


def ema_decay(num_updates: jax.Array, max_decay: float) -> jax.Array:
    """min(max_decay, (1 + n) / (10 + n)): a warm-up so early EMA weights follow the model (a
    plain 0.9999 over a few thousand updates stays near the initial weights)."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: the EMA starts at the parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def make_init(
    model: UNet | AutoencoderKL,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    image_shape: tuple[int, int, int],
) -> Callable[[], TrainState]:
    """init() -> the step-0 TrainState; `jax.eval_shape(init)` is a checkpoint's restore target
    and `jax.jit(init, out_shardings=...)` makes the parameters where they belong."""

    def init() -> TrainState:
        x = jnp.zeros((1, *image_shape))
        if isinstance(model, AutoencoderKL):
            return init_state(model.init(key, x)["params"], optimizer)
        labels = {} if model.num_class_embeds is None else {"class_labels": jnp.zeros(1, int)}
        return init_state(model.init(key, x, jnp.zeros(1), **labels)["params"], optimizer)

    return init


def make_step(
    loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]],
    optimizer: optax.GradientTransformation,
    *,
    ema_max_decay: float = 0.9999,
    accumulate_steps: int = 1,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The pure train step around any `loss_fn(params, batch, key) -> (loss, metrics)`: the
    gradient, the optax update, the EMA (moving on optimizer updates, so with `accumulate_steps`
    micro-steps per update only every k-th step moves it) and the non-finite guard.

    The step's key is fold_in(key, state.step) of the run's root key, so a resumed run draws the
    same randomness. Arguments after the key (`frozen`: weights that do not train, e.g. the base
    model under a LoRA) go to `loss_fn` after its key, undifferentiated. Returns (state,
    {"loss", "grad_norm", **metrics}).
    """

    def train_step(state: TrainState, batch: dict, key: jax.Array, *frozen):
        key = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (value, metrics), grads = grad_fn(state.params, batch, key, *frozen)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        num_updates = (state.step + 1) // accumulate_steps
        decay = jnp.where(
            (state.step + 1) % accumulate_steps == 0, ema_decay(num_updates, ema_max_decay), 1.0
        )
        # e + (1 - d)(p - e), not d e + (1 - d) p: a frozen parameter's EMA stays bit-exact
        ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), state.ema_params, params)

        grad_norm = optax.tree.norm(grads)
        # the updated parameters too: a huge learning rate overflows them from finite gradients
        finite = (
            jnp.isfinite(value) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        )
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        first_bad = jnp.where(  # numbered as checkpoints are: the state after it has step + 1
            (state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step
        )
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_step=first_bad,
        )
        return new_state, {"loss": value, "grad_norm": grad_norm, **metrics}

    return train_step


def make_train_step(
    model: UNet,
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    *,
    loss: str = "simple",
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    ema_max_decay: float = 0.9999,
    accumulate_steps: int = 1,
    null_class: int | None = None,
    class_dropout: float = 0.0,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The pure diffusion train step for `model` (jit it; donate the state).

    Args:
      loss: "simple" (DDPM eq. 14, `prediction_type` target, optional min-SNR-γ weights) or
        "hybrid" (IDDPM L_simple + λ L_vlb for a learned-range variance, 2C outputs).
      accumulate_steps: micro-steps per optimizer update (the optimizer must be wrapped in
        `optax.MultiSteps` with the same k, as `make_optimizer` does); the EMA moves on updates.
      null_class: for a class-conditional model, the label of "no class"; each label is
        replaced by it with probability `class_dropout` (classifier-free guidance training).

    Returns:
      train_step(state, batch, key): batch {"image": [B, H, W, C] in [-1, 1], "label": int [B]};
      see `make_step`. Returns (state, {"loss", "grad_norm"}).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")

    def loss_fn(params, batch, key):
        k_loss, k_label = jax.random.split(key)
        k_loss, k_dropout = jax.random.split(k_loss)
        cond = Conditioning()
        if null_class is not None:
            drop = jax.random.bernoulli(k_label, class_dropout, batch["label"].shape)
            cond = Conditioning(class_labels=jnp.where(drop, null_class, batch["label"]))
        fn = conditioning.make_model_fn(model, params, deterministic=False,
                                        rngs={"dropout": k_dropout})  # fmt: skip
        model_fn = conditioning.bind(fn, cond)

        x0 = batch["image"]
        if loss == "hybrid":
            return losses.hybrid_loss(model_fn, schedule, x0, k_loss), {}
        value = losses.diffusion_loss(
            model_fn, schedule, x0, k_loss, prediction_type=prediction_type, snr_gamma=snr_gamma
        )
        return value, {}

    return make_step(loss_fn, optimizer, ema_max_decay=ema_max_decay,
                     accumulate_steps=accumulate_steps)  # fmt: skip


def make_autoencoder_step(
    model: AutoencoderKL,
    optimizer: optax.GradientTransformation,
    *,
    reconstruction: str = "l1",
    kl_weight: float = 1e-6,
    trainable: str = "all",
    ema_max_decay: float = 0.9999,
    accumulate_steps: int = 1,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The pure train step of a KL-regularised autoencoder (LDM's first stage, without the
    perceptual and adversarial terms, which need downloaded or co-trained networks).

    loss = mean |x - D(z)| (or squared, `reconstruction="l2"`) + kl_weight * KL(q(z|x) || N(0, I))
    / (H W C), z ~ q(z|x): LDM sums both terms over an image's elements, so dividing both by the
    element count keeps its ratio, and its kl_weight (1e-6), while the loss reads as a per-pixel
    error. Returns (state, {"loss", "grad_norm", "reconstruction", "kl"}), kl in nats per image.

    `trainable="decoder"` fine-tunes the decoder alone (Stability's ft-EMA/ft-MSE VAEs): no
    gradient reaches the encoder, and with an optimizer from `freeze_encoder` it stays exactly
    as it was, so the latents, the scaling factor and every latent model trained on them keep
    their meaning.
    """
    if trainable not in AUTOENCODER_TRAINABLE:
        raise ValueError(f"trainable={trainable!r}; expected one of {AUTOENCODER_TRAINABLE}")
    if reconstruction not in RECONSTRUCTION_LOSSES:
        raise ValueError(
            f"reconstruction={reconstruction!r}; expected one of {RECONSTRUCTION_LOSSES}"
        )
    if kl_weight < 0:
        raise ValueError(f"kl_weight={kl_weight} must be >= 0")

    def loss_fn(params, batch, key):
        x = batch["image"]
        if trainable == "decoder":  # the encoder's backward pass is never computed
            params = {k: v if k in DECODER_PARAMS else jax.lax.stop_gradient(v)
                      for k, v in params.items()}  # fmt: skip
        recon, posterior = model.apply({"params": params}, x, key)
        error = recon - x
        error = jnp.abs(error) if reconstruction == "l1" else jnp.square(error)
        rec, kl = error.mean(), posterior.kl().mean()
        value = rec + kl_weight * kl / math.prod(x.shape[1:])
        return value, {"reconstruction": rec, "kl": kl}

    return make_step(loss_fn, optimizer, ema_max_decay=ema_max_decay,
                     accumulate_steps=accumulate_steps)  # fmt: skip


def make_latent_init(
    unet: UNet,
    text: CLIPTextModel,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    latent_shape: tuple[int, int, int],
) -> Callable[[], TrainState]:
    """init() -> the step-0 TrainState of a text-conditional latent model, whose parameters
    are {"unet": ..., "text_encoder": ...} (both trained)."""

    def init() -> TrainState:
        k_unet = jax.random.split(key)[0]
        text_params = init_text_encoder(text, key)
        context = jnp.zeros((1, text.max_position_embeddings, text.hidden_size))
        x = jnp.zeros((1, *latent_shape[:-1], unet.in_channels))  # latents + any conditioning
        labels = {} if unet.num_class_embeds is None else {"class_labels": jnp.zeros(1, int)}
        unet_params = unet.init(k_unet, x, jnp.zeros(1), context=context, **labels)["params"]
        return init_state({"unet": unet_params, "text_encoder": text_params}, optimizer)

    return init


def init_text_encoder(text: CLIPTextModel, key: jax.Array) -> dict:
    """The text encoder's step-0 parameters as `make_latent_init(..., key)` draws them (from
    the second half of its key): what a frozen encoder keeps for the whole run."""
    ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    return text.init(jax.random.split(key)[1], ids)["params"]


def make_latent_train_step(
    unet: UNet,
    text: CLIPTextModel,
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    *,
    empty_ids: jax.Array,
    scaling_factor: float,
    caption_dropout: float = 0.1,
    empty_context: jax.Array | None = None,
    empty_text_embeds: jax.Array | None = None,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    ema_max_decay: float = 0.9999,
    accumulate_steps: int = 1,
    noise_augmentation: Schedule | None = None,
    max_noise_level: int = 0,
    noise_level_power: float = 1.0,
    lora: adapters.LoRA | None = None,
    controlnet: Any = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """The pure train step of a text-conditional latent diffusion model (LDM, Rombach et al.
    2022, with the text transformer trained jointly).

    batch: {"latent_mean", "latent_std": [B, h, w, c] (the frozen autoencoder's posterior,
    cached), "ids": int [B, L] (tokenized captions)}. Each step draws z = mean + std · ε,
    scales it by `scaling_factor`, replaces each caption by the empty prompt's `empty_ids` [L]
    with probability `caption_dropout` (so the same model serves classifier-free guidance),
    encodes the captions to the U-Net's `context`, and takes the diffusion loss on z.

    A frozen text encoder's contexts are computed once: a batch with "context" [B, L, D] (the
    cached encodings) uses them, and the empty prompt's `empty_context` [L, D], instead of
    running the encoder (freeze its parameters with `freeze_text_encoder`). SDXL's batches add
    the cached pooled "text_embeds" [B, P] (dropped to `empty_text_embeds` [P] with their
    captions) and the size/crop "time_ids" [B, K].

    Image conditioning by concatenation: a batch with "extra" [B, h, w, k] (an inpainting
    model's mask and masked-image latents, a super-resolution model's low-resolution image)
    has it concatenated to the U-Net's input channels. With `noise_augmentation` (a schedule;
    SD's x4 upscaler's is linear), "extra" is first noised to a level in 0..max_noise_level per
    example (`superres.draw_noise_levels` with `noise_level_power`; 1 is SD's uniform draw),
    and the level is the U-Net's class label, so that sampling can choose how far to trust the
    low-resolution input.

    With `lora` (its alphas and layers; `adapters.init`), the state's parameters are the
    adapter's factors (`adapters.as_tree`) and the step takes the frozen base parameters
    after its key: `step(state, batch, key, base)`; each step merges the factors into the base
    (`adapters.merge`), so only the factors are differentiated, updated and kept.

    With `controlnet` (an `nn.controlnet.ControlNetModel` of the U-Net's shape), the state's
    parameters are the ControlNet's and the step takes the frozen model's parameters after
    its key, as with a LoRA: batches add "control" [B, H, W, k] (uint8, the control images),
    which the ControlNet reads at scale 1 (Zhang et al. 2023; the U-Net frozen).
    """
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout={caption_dropout}; expected 0 <= p < 1")
    if noise_level_power <= 0:  # checked here, at build time, not at the first step
        raise ValueError(f"noise_level_power={noise_level_power}; expected > 0")
    empty_ids = jnp.asarray(empty_ids, jnp.int32)

    def loss_fn(params, batch, key, controlnet_params=None):
        k_z, k_drop, k_loss, k_dropout = jax.random.split(key, 4)
        added = {}
        mean = batch["latent_mean"]
        z = scaling_factor * (mean + batch["latent_std"] * jax.random.normal(k_z, mean.shape))
        drop = jax.random.bernoulli(k_drop, caption_dropout, (mean.shape[0], 1))
        if "context" in batch:  # a frozen encoder's cached output
            if empty_context is None:
                raise ValueError("a batch with cached 'context' needs empty_context")
            context = jnp.where(drop[..., None], empty_context[None], batch["context"])
            if "text_embeds" in batch:  # SDXL: the second encoder's pooled output too
                embeds = jnp.where(drop, empty_text_embeds[None], batch["text_embeds"])
                added = {"text_embeds": embeds, "time_ids": batch["time_ids"]}
        else:
            ids = jnp.where(drop, empty_ids[None], batch["ids"])
            context = text.apply({"params": params["text_encoder"]}, ids).last_hidden_state

        cond = Conditioning(context=context, concat=batch.get("extra"), **added)
        if noise_augmentation is not None:
            k_level, k_aug = jax.random.split(k_drop)
            level = superres.draw_noise_levels(k_level, mean.shape[0], max_noise_level,
                                               noise_level_power)  # fmt: skip
            noise = jax.random.normal(k_aug, cond.concat.shape)
            extra = diffusion.q_sample(noise_augmentation, cond.concat, level, noise)
            cond = cond.replace(concat=extra, class_labels=level)
        rngs = {"dropout": k_dropout}
        if controlnet is None:
            fn = conditioning.make_model_fn(unet, params["unet"], deterministic=False, rngs=rngs)
        else:  # the control images at scale 1
            images = batch["control"].astype(jnp.float32) / 255.0
            cond = cond.replace(control=Control((images,), jnp.ones((mean.shape[0], 1))))
            fn = conditioning.make_controlled_model_fn(
                unet, params["unet"], [controlnet], [controlnet_params], deterministic=False,
                rngs=rngs,
            )  # fmt: skip
        model_fn = conditioning.bind(fn, cond)

        value = losses.diffusion_loss(
            model_fn, schedule, z, k_loss, prediction_type=prediction_type, snr_gamma=snr_gamma
        )
        return value, {}

    if lora is not None:
        full_loss = loss_fn

        def loss_fn(factors, batch, key, base):
            adapter = adapters.from_tree(factors, lora.alpha)
            return full_loss(adapters.merge(base, [adapter], [1.0]), batch, key)

    elif controlnet is not None:
        model_loss = loss_fn

        def loss_fn(controlnet_params, batch, key, base):
            return model_loss(base, batch, key, controlnet_params)

    return make_step(loss_fn, optimizer, ema_max_decay=ema_max_decay,
                     accumulate_steps=accumulate_steps)  # fmt: skip


def freeze_text_encoder(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on the U-Net's parameters, none on the text encoders' (latent models whose
    parameters are {"unet", "text_encoder"} and SDXL's "text_encoder_2"): they stay as they
    were initialised or loaded, and keep no optimizer state."""

    def labels(params):
        return {k: "train" if k == "unet" else "frozen" for k in params}

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def freeze_encoder(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on an autoencoder's decoder side (`DECODER_PARAMS`), none on its encoder
    side, which stays exactly as loaded (no weight decay either) and keeps no optimizer state."""

    def labels(params):
        missing = set(DECODER_PARAMS) - set(params)
        if missing:
            raise ValueError(f"not an AutoencoderKL's parameters: no {sorted(missing)} among "
                             f"{sorted(params)}")  # fmt: skip
        return {k: "train" if k in DECODER_PARAMS else "frozen" for k in params}

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_autoencoder_optimizer(config: Any) -> optax.GradientTransformation:
    """The optimizer of an autoencoder run: `config.optim`'s, on the decoder side alone when
    `config.autoencoder.trainable` is "decoder"."""
    optimizer = make_optimizer(config.optim)
    trainable = config.autoencoder.get("trainable", "all")
    if trainable not in AUTOENCODER_TRAINABLE:
        raise ValueError(
            f"autoencoder.trainable={trainable!r}; expected one of {AUTOENCODER_TRAINABLE}"
        )
    return freeze_encoder(optimizer) if trainable == "decoder" else optimizer


def make_optimizer(optim: Any) -> optax.GradientTransformation:
    """optax Adam/AdamW from `config.optim`: linear warm-up to `learning_rate`, then constant
    (`cosine_decay_steps` 0) or a cosine decay to 0 at update `cosine_decay_steps`; global-norm
    gradient clipping (`grad_clip`, 0 for none); `optax.MultiSteps` over `accumulate_steps`
    micro-batches."""
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r}; expected one of {OPTIMIZERS}")
    if optim.learning_rate <= 0 or optim.accumulate_steps < 1 or optim.warmup_steps < 0:
        raise ValueError(
            "optim.learning_rate must be > 0, optim.accumulate_steps >= 1, optim.warmup_steps >= 0"
        )
    decay_steps = optim.get("cosine_decay_steps", 0)
    if decay_steps and decay_steps <= optim.warmup_steps:
        raise ValueError("optim.cosine_decay_steps must exceed optim.warmup_steps (or be 0)")
    if decay_steps:
        lr = optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, optim.warmup_steps, decay_steps, end_value=0.0
        )
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps),
             optax.constant_schedule(optim.learning_rate)],
            [optim.warmup_steps],
        )  # fmt: skip
    decay = optim.weight_decay if optim.name == "adamw" else 0.0
    tx = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=decay)
    if optim.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
    if optim.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulate_steps)
    return tx
