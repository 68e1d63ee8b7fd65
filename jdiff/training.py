"""Training: the train state as one pytree, a pure train step, and the factories from a config.

`train_step(state, batch, key) -> (state, metrics)` draws t per example, noises in closed form,
takes the loss's gradient, applies an optax update and the EMA; jit it once (donating the state).
A step whose loss or gradient is not finite leaves the state as it was and records its number
in `state.nonfinite_step`, so no bad parameters reach a checkpoint. Only the `make_*` factories
read a config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jdiff import losses, schedules
from jdiff.nn import VARIANTS, UNet
from jdiff.schedules import Schedule

LOSSES = ("simple", "hybrid")
OPTIMIZERS = ("adam", "adamw")


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, one pytree (checkpointed whole)."""

    step: jax.Array  # int32 [], micro-steps taken (optimizer updates x accumulate_steps)
    params: Any
    ema_params: Any
    opt_state: Any
    nonfinite_step: jax.Array  # int32 [], the first step with a non-finite loss, or -1


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
    model: UNet,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    image_shape: tuple[int, int, int],
) -> Callable[[], TrainState]:
    """init() -> the step-0 TrainState; `jax.eval_shape(init)` is a checkpoint's restore target
    and `jax.jit(init, out_shardings=...)` makes the parameters where they belong."""

    def init() -> TrainState:
        x = jnp.zeros((1, *image_shape))
        labels = {} if model.num_class_embeds is None else {"class_labels": jnp.zeros(1, int)}
        return init_state(model.init(key, x, jnp.zeros(1), **labels)["params"], optimizer)

    return init


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
    """The pure train step for `model` (jit it; donate the state).

    Args:
      loss: "simple" (DDPM eq. 14, `prediction_type` target, optional min-SNR-γ weights) or
        "hybrid" (IDDPM L_simple + λ L_vlb for a learned-range variance, 2C outputs).
      accumulate_steps: micro-steps per optimizer update (the optimizer must be wrapped in
        `optax.MultiSteps` with the same k, as `make_optimizer` does); the EMA moves on updates.
      null_class: for a class-conditional model, the label of "no class"; each label is
        replaced by it with probability `class_dropout` (classifier-free guidance training).

    Returns:
      train_step(state, batch, key): batch {"image": [B, H, W, C] in [-1, 1], "label": int [B]};
      key is the run's root key, the step's own is fold_in(key, state.step), so a resumed run
      draws the same noise. Returns (state, {"loss", "grad_norm"}).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")

    def loss_fn(params, x0, labels, key):
        k_loss, k_dropout = jax.random.split(key)
        kwargs = {} if labels is None else {"class_labels": labels}

        def model_fn(x, t):
            rngs = {"dropout": k_dropout}
            return model.apply({"params": params}, x, t, deterministic=False, rngs=rngs, **kwargs)

        if loss == "hybrid":
            return losses.hybrid_loss(model_fn, schedule, x0, k_loss)
        return losses.diffusion_loss(
            model_fn, schedule, x0, k_loss, prediction_type=prediction_type, snr_gamma=snr_gamma
        )

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        k_loss, k_label = jax.random.split(key)
        labels = None
        if null_class is not None:
            drop = jax.random.bernoulli(k_label, class_dropout, batch["label"].shape)
            labels = jnp.where(drop, null_class, batch["label"])
        value, grads = jax.value_and_grad(loss_fn)(state.params, batch["image"], labels, k_loss)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        num_updates = (state.step + 1) // accumulate_steps
        decay = jnp.where(
            (state.step + 1) % accumulate_steps == 0, ema_decay(num_updates, ema_max_decay), 1.0
        )
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        first_bad = jnp.where(
            (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
        )
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_step=first_bad,
        )
        return new_state, {"loss": value, "grad_norm": grad_norm}

    return train_step


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


def make_schedule(diffusion: Any) -> Schedule:
    """The noise schedule of `config.diffusion` (its beta_start/beta_end unused by "cosine")."""
    betas = {}
    if diffusion.schedule != "cosine":
        betas = {"beta_start": diffusion.get("beta_start"), "beta_end": diffusion.get("beta_end")}
    return schedules.get_schedule(diffusion.schedule, diffusion.num_timesteps, **betas)


def make_model(config: Any, num_classes: int | None = None) -> UNet:
    """The U-Net of `config.model` (a `VARIANTS` name plus field overrides) for the data's
    channels: 2 x channels out for a learned variance, a null class added to `num_classes`."""
    model = config.model
    if model.variant not in VARIANTS:
        raise ValueError(f"model.variant={model.variant!r}; expected one of {sorted(VARIANTS)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in model.overrides.items()}
    fields = {**VARIANTS[model.variant], **overrides}
    channels = config.data.channels
    learned = config.diffusion.loss == "hybrid"
    fields.update(in_channels=channels, out_channels=channels * (2 if learned else 1))
    if model.class_conditional:
        if num_classes is None:
            raise ValueError("model.class_conditional needs a data set with class labels")
        fields["num_class_embeds"] = num_classes + 1  # the last is the null class
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if model.dtype not in dtypes:
        raise ValueError(f"model.dtype={model.dtype!r}; expected one of {sorted(dtypes)}")
    return UNet(**fields, dtype=dtypes[model.dtype], remat=model.remat)
