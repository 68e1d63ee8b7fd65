"""The U-Net: parameter counts, forward parity with diffusers, shapes for every option, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from reference import perturbed

from jdiff import interop
from jdiff.nn import VARIANTS, UNet
from jdiff.nn.layers import timestep_embedding

T_EVAL = np.array([3.5, 999.0], np.float32)  # fractional and last timesteps


def init_shapes(model, x_shape, **kwargs):
    """Parameter shapes without allocating them."""
    x, t = jnp.zeros(x_shape), jnp.zeros(x_shape[0])
    return jax.eval_shape(lambda k: model.init(k, x, t, **kwargs), jax.random.key(0))["params"]


def num_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "variant, x_shape, context_dim, expected",
    [
        ("ddpm_cifar10", (1, 32, 32, 3), None, 35_746_307),
        ("sd_v1", (1, 8, 8, 4), 768, 859_520_964),
        ("sd_v2_1", (1, 8, 8, 4), 1024, 865_910_724),
        ("sdxl_base", (1, 8, 8, 4), 2048, 2_567_463_684),
        ("sdxl_refiner", (1, 8, 8, 4), 1280, 2_259_526_660),
    ],
)
def test_parameter_counts(variant, x_shape, context_dim, expected):
    kwargs = {} if context_dim is None else {"context": jnp.zeros((1, 77, context_dim))}
    ids = {"sdxl_base": 6, "sdxl_refiner": 5}.get(variant)  # sizes, crop (, aesthetic score)
    if ids:  # the pooled embedding of OpenCLIP bigG: 1280 wide
        kwargs |= {"text_embeds": jnp.zeros((1, 1280)), "time_ids": jnp.zeros((1, ids))}
    params = init_shapes(UNet(**VARIANTS[variant]), x_shape, **kwargs)
    assert num_params(params) == expected
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


SDXL_CONFIGS = {  # as the released config.json files give them (the fields that differ)
    "sdxl_base": {
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
        "projection_class_embeddings_input_dim": 2816,
    },
    "sdxl_refiner": {
        "block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 2560,
    },
}  # fmt: skip


@pytest.mark.parametrize("variant", list(SDXL_CONFIGS))
def test_sdxl_configs_translate_to_the_variants_and_diffusers_counts(variant):
    """SDXL base's and refiner's configurations, built by diffusers on the meta device (no
    memory): jdiff reads them as its variants, and diffusers counts the same parameters."""
    config = {**SDXL_CONFIGS[variant], "addition_embed_type": "text_time",
              "addition_time_embed_dim": 256, "use_linear_projection": True,
              "addition_embed_type_num_heads": 64, "sample_size": 128}  # fmt: skip
    with torch.device("meta"):
        torch_model = UNet2DConditionModel(**config)
    fields = interop.unet_config_from_diffusers(dict(torch_model.config))
    assert UNet(**fields) == UNet(**VARIANTS[variant])
    expected = {"sdxl_base": 2_567_463_684, "sdxl_refiner": 2_259_526_660}[variant]
    assert sum(p.numel() for p in torch_model.parameters()) == expected
    back = interop.unet_config_to_diffusers(UNet(**fields), 128)
    assert interop.unet_config_from_diffusers(back) == fields


def test_timestep_embedding_matches_diffusers_and_float64():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.5, 17.0, 999.0], np.float32)
    for flip, shift, dim in [(False, 1, 32), (True, 0, 320), (True, 0, 7)]:
        half = dim // 2
        angles = t[:, None].astype(np.float64) * 1e4 ** (-np.arange(half) / (half - shift))
        exact = np.concatenate([np.sin(angles), np.cos(angles)][:: -1 if flip else 1], axis=-1)
        exact = np.pad(exact, ((0, 0), (0, dim % 2)))
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
        ours = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
        # a float32 angle of up to 999 rad is exact to 999 * 2^-24 = 6e-5: that is the limit
        np.testing.assert_allclose(ours, exact, atol=6e-5)
        np.testing.assert_allclose(ours, ref, atol=1.2e-4)


DIFFUSERS_TINY = {
    "ddpm": (UNet2DModel, {
        "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1,
        "norm_num_groups": 8, "norm_eps": 1e-6, "flip_sin_to_cos": False, "freq_shift": 1,
        "downsample_padding": 0, "attention_head_dim": None,
    }),
    # IDDPM-style: scale-shift norm, learned variance (2C out), class labels, 16-channel heads
    "iddpm_class": (UNet2DModel, {
        "sample_size": 16, "in_channels": 3, "out_channels": 6, "block_out_channels": (32, 64),
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D"), "layers_per_block": 2,
        "norm_num_groups": 8, "resnet_time_scale_shift": "scale_shift", "num_class_embeds": 5,
        "attn_norm_num_groups": 8,
        "attention_head_dim": 16, "downsample_padding": 1,
    }),
    # SD 1.x: heads given as "attention_head_dim", 1x1-conv projections, eps 1e-5
    "sd1": (UNet2DConditionModel, {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1,
        "norm_num_groups": 8, "cross_attention_dim": 24, "attention_head_dim": 2,
    }),
    # SD 2.x: per-block heads, linear projections, upcast, two transformer layers; 9 input
    # channels as the inpainting U-Net (latent + mask + masked latent)
    "sd2_inpaint": (UNet2DConditionModel, {
        "sample_size": 16, "in_channels": 9, "out_channels": 4, "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1,
        "norm_num_groups": 8, "cross_attention_dim": 24, "attention_head_dim": (2, 4),
        "use_linear_projection": True, "upcast_attention": True,
        "transformer_layers_per_block": 2,
    }),
    # SDXL: a first level without attention, more transformer layers deeper, a 2048-wide
    # context in the real one, the pooled text embedding and six size/crop ids added to the
    # time embedding ("text_time")
    "sdxl": (UNet2DConditionModel, {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 2,
        "norm_num_groups": 8, "cross_attention_dim": 24, "attention_head_dim": (2, 4),
        "use_linear_projection": True, "transformer_layers_per_block": (1, 2),
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 12 + 6 * 8,
    }),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DIFFUSERS_TINY))
def test_forward_matches_diffusers(name):
    cls, config = DIFFUSERS_TINY[name]
    torch_model = perturbed(cls(**config))
    model = UNet(**interop.unet_config_from_diffusers(dict(torch_model.config)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, config["in_channels"]), np.float32)
    kwargs, torch_kwargs = {}, {}
    if "cross_attention_dim" in config:
        context = rng.standard_normal((2, 7, config["cross_attention_dim"]), np.float32)
        kwargs["context"] = jnp.asarray(context)
        torch_kwargs["encoder_hidden_states"] = torch.from_numpy(context)
    if config.get("num_class_embeds"):
        labels = np.array([0, 4])
        kwargs["class_labels"] = jnp.asarray(labels)
        torch_kwargs["class_labels"] = torch.from_numpy(labels)
    if config.get("addition_embed_type"):  # pooled text [2, 12]; sizes, crop, target size
        pooled = rng.standard_normal((2, 12), np.float32)
        ids = np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 8, 0, 768, 1344]], np.float32)
        kwargs |= {"text_embeds": jnp.asarray(pooled), "time_ids": jnp.asarray(ids)}
        torch_kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled),
                                             "time_ids": torch.from_numpy(ids)}  # fmt: skip

    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = interop.from_diffusers(state, init_shapes(model, x.shape, **kwargs))
    ours = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(T_EVAL), **kwargs)
    with torch.no_grad():
        ref = torch_model(
            torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(T_EVAL), **torch_kwargs
        ).sample.permute(0, 2, 3, 1)
    ref = ref.numpy()
    assert ours.shape == ref.shape
    assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() <= 1e-4


def test_torch_key_renames_module_lists_only():
    assert interop.torch_key(("time_embedding", "linear_1", "kernel")) == (
        "time_embedding.linear_1.weight"
    )
    path = ("down_blocks_0", "attentions_1", "transformer_blocks_0", "ff", "net_0", "proj", "bias")
    assert interop.torch_key(path) == (
        "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.bias"
    )
    assert interop.torch_key(("mid_block", "attentions_0", "to_out_0", "kernel")) == (
        "mid_block.attentions.0.to_out.0.weight"
    )


def test_from_diffusers_names_every_mismatch():
    template = {"conv_in": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32),
                            "bias": jax.ShapeDtypeStruct((8,), jnp.float32)}}  # fmt: skip
    state = {"conv_in.weight": np.zeros((8, 3, 3, 5)), "extra.weight": np.zeros(1)}
    with pytest.raises(ValueError) as err:
        interop.from_diffusers(state, template)
    message = str(err.value)
    assert "missing conv_in.bias" in message
    assert "unused extra.weight" in message
    assert "conv_in.weight: shape (3, 5, 3, 8)" in message


def test_config_from_diffusers_rejects_what_jdiff_lacks():
    base = dict(UNet2DConditionModel(**DIFFUSERS_TINY["sd1"][1]).config)
    with pytest.raises(ValueError, match="addition_embed_type"):
        interop.unet_config_from_diffusers({**base, "addition_embed_type": "text"})
    # absent fields take the diffusers class's defaults, as diffusers does
    plain = interop.unet_config_from_diffusers({"_class_name": "UNet2DModel"})
    assert plain["block_out_channels"] == (224, 448, 672, 896) and plain["in_channels"] == 3
    fields = interop.unet_config_from_diffusers(base)
    assert fields["num_attention_heads"] == 2 and "attention_head_dim" not in fields


@pytest.fixture(scope="module")
def tiny():
    """The tiny DDPM-shaped U-Net and its parameters, shared by the option tests."""
    model = UNet(**VARIANTS["tiny"])
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros(2))["params"]
    return model, params, x


def test_deterministic_and_dropout(tiny):
    model, params, x = tiny
    apply = jax.jit(model.apply, static_argnames="deterministic")
    t = jnp.array([5.0, 500.0])
    a = apply({"params": params}, x, t)
    b = apply({"params": params}, x, t)
    np.testing.assert_array_equal(a, b)
    rngs = {"dropout": jax.random.key(3)}
    c = apply({"params": params}, x, t, deterministic=False, rngs=rngs)
    d = apply({"params": params}, x, t, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(a, c)  # dropout 0.1 is on in training mode


def test_output_depends_on_t_and_scalar_t_broadcasts(tiny):
    model, params, x = tiny
    out = model.apply({"params": params}, x, jnp.array([10.0, 10.0]))
    np.testing.assert_allclose(model.apply({"params": params}, x, 10.0), out, atol=1e-6)
    assert not np.allclose(model.apply({"params": params}, x, 900.0), out, atol=1e-3)


def test_remat_same_params_same_gradients(tiny):
    model, params, x = tiny
    remat = model.clone(remat=True)
    assert jax.tree.structure(init_shapes(remat, x.shape)) == jax.tree.structure(params)

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, x, jnp.array([1.0, 2.0])) ** 2)

    g, g_remat = (jax.jit(jax.grad(loss(m)))(params) for m in (model, remat))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params(tiny):
    model, params, x = tiny
    bf16 = model.clone(dtype=jnp.bfloat16)
    shapes = init_shapes(bf16, x.shape)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    t = jnp.array([5.0, 500.0])
    ref = model.apply({"params": params}, x, t)
    out = jax.jit(bf16.apply)({"params": params}, x, t)
    assert out.dtype == jnp.float32
    assert 0 < np.abs(out - ref).max() / np.abs(ref).max() < 0.05


def test_attention_implementations_agree_on_the_whole_unet(tiny):
    """The default and the explicit paths: the same U-Net output within float32 rounding."""
    model, params, x = tiny
    t = jnp.array([5.0, 500.0])
    ref = model.clone(attention_implementation="xla").apply({"params": params}, x, t)
    for implementation in (None, "chunked"):
        out = model.clone(attention_implementation=implementation).apply({"params": params}, x, t)
        np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, kwargs, out_channels",
    [
        ({"out_channels": 6}, {}, 6),  # learned variance
        ({"in_channels": 7}, {}, 3),  # image + mask + low-res conditioning
        ({"num_class_embeds": 11}, {"class_labels": jnp.array([10, 0])}, 3),  # 10 + null
        ({"resnet_time_scale_shift": "scale_shift", "mid_block_type": None}, {}, 3),
    ],
)
def test_option_shapes(overrides, kwargs, out_channels):
    model = UNet(**{**VARIANTS["tiny"], **overrides})
    x = jnp.ones((2, 8, 8, model.in_channels))
    out, _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), x, jnp.ones(2), **kwargs)
    )
    assert out.shape == (2, 8, 8, out_channels) and out.dtype == jnp.float32


def test_tiny_cond_shapes_with_context():
    model = UNet(**VARIANTS["tiny_cond"])
    x, context = jnp.ones((3, 8, 8, 4)), jnp.ones((3, 5, 24))
    out, _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), x, jnp.ones(3), context=context)
    )
    assert out.shape == (3, 8, 8, 4)


SDXL_TINY = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 60}  # fmt: skip


@pytest.mark.parametrize(
    "overrides, kwargs, shape, match",
    [
        ({}, {}, (1, 9, 9, 3), "divisible by 2"),
        ({}, {}, (1, 8, 8, 4), r"x must be \[B, H, W, 3\]"),
        ({"down_block_types": ("DownBlock2D", "Nope")}, {}, (1, 8, 8, 3), "'Nope' is not one"),
        ({"num_class_embeds": 3}, {}, (1, 8, 8, 3), "class_labels must be given"),
        ({}, {"context": jnp.ones((1, 2, 4))}, (1, 8, 8, 3), "no block cross-attends"),
        ({"block_out_channels": (32, 60)}, {}, (1, 8, 8, 3), "norm_num_groups"),
        ({"attention_head_dim": 8, "num_attention_heads": 2}, {}, (1, 8, 8, 3), "not both"),
        ({"attention_implementation": "flash"}, {}, (1, 8, 8, 3), "attention_implementation"),
        ({}, {"time_ids": jnp.ones((1, 6))}, (1, 8, 8, 3), "no addition_embed_type"),
        (SDXL_TINY, {"time_ids": jnp.ones((1, 6))}, (1, 8, 8, 3), r"needs text_embeds=\[B, P\]"),
        (
            SDXL_TINY,
            {"time_ids": jnp.ones((1, 5)), "text_embeds": jnp.ones((1, 12))},
            (1, 8, 8, 3),
            r"P \+ K x 8 = projection_class_embeddings_input_dim 60",
        ),
    ],
)
def test_bad_input_errors(overrides, kwargs, shape, match):
    """Each bad input names itself and what would fit."""
    model = UNet(**{**VARIANTS["tiny"], **overrides})
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.ones(shape), jnp.ones(1), **kwargs)
        )


def test_cross_attention_needs_context():
    model = UNet(**VARIANTS["tiny_cond"])
    with pytest.raises(ValueError, match="pass context"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8, 8, 4)), jnp.ones(1)))
