"""The CLIP text encoder: parameter counts, parity with transformers' CLIPTextModel, causal
masking, clip_skip, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference import perturbed

from jdiff import interop
from jdiff.nn import text_encoder


def num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name, expected",
    [("clip_vit_l14", 123_060_480), ("openclip_vit_h14", 340_387_840),
     ("openclip_vit_bigg14", 694_659_840)],  # SDXL's second encoder, with its projection
)  # fmt: skip
def test_sizes(name, expected):
    model = text_encoder.CLIPTextModel(**text_encoder.VARIANTS[name])
    ids = jnp.zeros((1, 77), jnp.int32)
    assert num_params(jax.eval_shape(model.init, jax.random.key(0), ids)) == expected


# SD1-like (quick-GELU, legacy eos_token_id 2: pool at the largest id) and SD2-like (GELU, pool
# at the first end token)
TINY = {
    "sd1": {"hidden_act": "quick_gelu", "eos_token_id": 2},
    "sd2": {"hidden_act": "gelu", "eos_token_id": 999, "num_hidden_layers": 3},
    # SDXL's text_encoder_2: CLIPTextModelWithProjection (GELU, legacy end token, 24-wide
    # projection of the pooled output)
    "sdxl2": {
        "hidden_act": "gelu",
        "eos_token_id": 2,
        "num_hidden_layers": 3,
        "projection_dim": 24,
    },
}
BASE = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 16, "layer_norm_eps": 1e-5,
        "bos_token_id": 998, "pad_token_id": 1}  # fmt: skip


def converted(name):
    cls = (transformers.CLIPTextModelWithProjection if "projection_dim" in TINY[name]
           else transformers.CLIPTextModel)  # fmt: skip
    torch_model = perturbed(cls(transformers.CLIPTextConfig(**BASE | TINY[name])))
    config = torch_model.config.to_dict() | {"architectures": [cls.__name__]}  # as saved
    fields = interop.text_encoder_config_from_transformers(config)
    model = text_encoder.CLIPTextModel(**fields)
    ids = jnp.zeros((1, 16), jnp.int32)
    template = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return torch_model, model, {"params": interop.text_encoder_from_transformers(state, template)}


def token_ids(end: int) -> np.ndarray:
    """Two prompts of 5 and 9 tokens: start token 998, words, end token, end-token padding."""
    ids = np.full((2, 16), end, np.int64)
    ids[:, 0] = 998
    ids[0, 1:5] = [5, 17, 300, 42]
    ids[1, 1:9] = [7, 7, 250, 900, 3, 64, 11, 500]
    ids[0, 5], ids[1, 9] = 999, 999  # the end token
    return ids


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", list(TINY))
def test_forward_matches_transformers(name):
    torch_model, model, params = converted(name)
    ids = token_ids(end=999)
    mask = (np.arange(16)[None] <= np.array([[5], [9]])).astype(np.int64)
    for attention_mask in (None, mask):
        jax_mask = None if attention_mask is None else jnp.asarray(attention_mask)
        out = model.apply(params, jnp.asarray(ids), jax_mask)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(ids), output_hidden_states=True,
                              attention_mask=None if attention_mask is None
                              else torch.from_numpy(attention_mask))  # fmt: skip
        assert rel(out.last_hidden_state, ref.last_hidden_state.numpy()) <= 1e-4
        if "projection_dim" in TINY[name]:  # the projected pooled output, SDXL's text_embeds
            assert rel(out.text_embeds, ref.text_embeds.numpy()) <= 1e-4
        else:
            assert rel(out.pooler_output, ref.pooler_output.numpy()) <= 1e-4
    # SDXL's context: the penultimate layer as it is (no final LayerNorm), the pooled output
    # still from every layer
    n = model.num_hidden_layers
    out = model.apply(params, jnp.asarray(ids), hidden_layer=n - 1)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    assert rel(out.hidden_state, ref.hidden_states[-2].numpy()) <= 1e-4
    assert rel(out.last_hidden_state, ref.last_hidden_state.numpy()) <= 1e-4
    back = interop.text_encoder_config_to_transformers(model)
    assert (
        text_encoder.CLIPTextModel(**interop.text_encoder_config_from_transformers(back)) == model
    )
    # clip_skip=1: the penultimate layer through the final LayerNorm (diffusers' clip_skip)
    skipped = model.apply(params, jnp.asarray(ids), clip_skip=1).last_hidden_state
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
        norm = getattr(torch_model, "text_model", torch_model).final_layer_norm
        penultimate = norm(ref.hidden_states[-2]).numpy()
    assert rel(skipped, penultimate) <= 1e-4


def test_attention_is_causal():
    model = text_encoder.CLIPTextModel(**text_encoder.VARIANTS["tiny"])
    ids = jnp.asarray(token_ids(end=999)[:1])
    params = model.init(jax.random.key(0), ids)
    changed = ids.at[0, 7].set(123)
    a = model.apply(params, ids).last_hidden_state
    b = model.apply(params, changed).last_hidden_state
    np.testing.assert_array_equal(a[:, :7], b[:, :7])  # earlier tokens do not see position 7
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_bfloat16_compute_float32_outputs():
    model = text_encoder.CLIPTextModel(**text_encoder.VARIANTS["tiny"], dtype=jnp.bfloat16)
    ids = jnp.asarray(token_ids(end=999))
    params = model.init(jax.random.key(0), ids)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = model.apply(params, ids)
    assert out.last_hidden_state.dtype == jnp.float32
    ref = text_encoder.CLIPTextModel(**text_encoder.VARIANTS["tiny"]).apply(params, ids)
    assert rel(out.last_hidden_state, np.asarray(ref.last_hidden_state)) < 0.05


def test_bad_inputs_and_configs():
    model = text_encoder.CLIPTextModel(**text_encoder.VARIANTS["tiny"])
    ids = jnp.zeros((1, 16), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="length <= 16"):
        model.apply(params, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="clip_skip=2"):
        model.apply(params, ids, clip_skip=2)
    with pytest.raises(ValueError, match=r"hidden_layer=2; expected 0 \.\. 1"):
        model.apply(params, ids, clip_skip=1, hidden_layer=2)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        interop.text_encoder_config_from_transformers(BASE | {"hidden_act": "relu"})
    # absent fields take transformers' CLIPTextConfig defaults, as transformers does
    assert interop.text_encoder_config_from_transformers({"hidden_size": 32})["hidden_act"] == (
        "quick_gelu"
    )
    with pytest.raises(ValueError, match="expected CLIPTextModel"):
        bert = BASE | {"hidden_act": "gelu", "architectures": ["BertModel"]}
        interop.text_encoder_config_from_transformers(bert)
