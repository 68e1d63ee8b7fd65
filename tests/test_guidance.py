import jax
import jax.numpy as jnp
import numpy as np
import oracle

from jdiff import conditioning, diffusion, guidance, samplers, schedules
from jdiff.conditioning import Conditioning

SCHED = schedules.get_schedule("linear")


def _cond_model(x, t, context):
    return 0.5 * x + context


def test_classifier_free_combines_one_batched_call():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return _cond_model(x, t, context)

    x = jnp.ones((3, 2))
    t = jnp.full((3,), 10.0)
    cond = jnp.array([[1.0, 2.0]] * 3)
    fn = guidance.classifier_free(model, cond, jnp.zeros((1, 2)), 7.5)
    out = fn(x, t)
    assert calls == [6]  # conditional and unconditional batched together
    e_u, e_c = 0.5 * x, 0.5 * x + cond
    np.testing.assert_allclose(out, e_u + 7.5 * (e_c - e_u), rtol=1e-6)
    # scale 1 is the conditional model alone, 0 the unconditional one
    np.testing.assert_allclose(guidance.classifier_free(model, cond, 0 * cond, 1.0)(x, t), e_c)
    np.testing.assert_allclose(guidance.classifier_free(model, cond, 0 * cond, 0.0)(x, t), e_u)


def test_classifier_free_batches_every_field_and_skips_scale_one():
    """A conditioning of several fields is batched field by field, the null's broadcast; a
    scale of exactly 1 known at build time runs the conditional half alone."""
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        assert all(leaf.shape[0] == x.shape[0] for leaf in jax.tree.leaves(c))
        return x * c.class_labels[:, None] + c.context.sum(1) + c.concat

    x, t = jnp.ones((3, 2)), jnp.full((3,), 10.0)
    cond = Conditioning(context=jnp.ones((3, 4, 2)), class_labels=jnp.array([1.0, 2.0, 3.0]),
                        concat=jnp.full((3, 2), 0.5))  # fmt: skip
    null = cond.replace(context=jnp.zeros((1, 4, 2)), class_labels=jnp.zeros(3))  # concat kept
    e_c = model(x, t, cond)
    e_u = model(x, t, null.replace(context=jnp.zeros((3, 4, 2))))
    calls.clear()
    out = guidance.classifier_free(model, cond, null, 3.0)(x, t)
    assert calls == [6]
    np.testing.assert_allclose(out, e_u + 3.0 * (e_c - e_u), rtol=1e-6)
    calls.clear()
    np.testing.assert_array_equal(guidance.classifier_free(model, cond, null, 1.0)(x, t), e_c)
    assert calls == [3]  # the unconditional half skipped
    calls.clear()
    traced = jax.jit(lambda s: guidance.classifier_free(model, cond, null, s)(x, t))(1.0)
    assert calls == [6]  # a traced scale is decided at run time: both halves, the same result
    np.testing.assert_allclose(traced, e_c, rtol=1e-6)


def test_make_model_fn_concatenates_and_passes_the_fields():
    seen = {}

    class Net:
        def apply(self, variables, x, t, **kwargs):
            seen.update(kwargs, x=x)
            return jnp.concatenate([x, x], axis=-1)  # a learned variance's 2C outputs

    x = jnp.zeros((2, 4, 4, 3))
    cond = Conditioning(context=jnp.ones((2, 5, 8)), concat=jnp.ones((2, 4, 4, 1)))
    out = conditioning.make_model_fn(Net(), {}, out_channels=4)(x, jnp.zeros(2), cond)
    assert seen["x"].shape == (2, 4, 4, 4) and set(seen) == {"x", "context"}
    assert out.shape == (2, 4, 4, 4)
    assert conditioning.network_kwargs(Conditioning()) == {}


def test_guidance_rescale():
    x = jax.random.normal(jax.random.key(0), (2, 8))
    cond = jax.random.normal(jax.random.key(1), (2, 8))
    t = jnp.zeros(2)
    full = guidance.classifier_free(_cond_model, cond, 0 * cond, 5.0, guidance_rescale=1.0)(x, t)
    e_c = _cond_model(x, t, cond)
    np.testing.assert_allclose(jnp.std(full, axis=1), jnp.std(e_c, axis=1), rtol=1e-5)
    plain = guidance.classifier_free(_cond_model, cond, 0 * cond, 5.0)(x, t)
    half = guidance.classifier_free(_cond_model, cond, 0 * cond, 5.0, guidance_rescale=0.5)(x, t)
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * plain, rtol=1e-5, atol=1e-6)


def test_classifier_guidance_shifts_eps_by_the_scaled_gradient():
    model = oracle.eps_model(SCHED)
    target = 0.8

    def log_prob(x, t):  # a Gaussian "classifier" pulling towards `target`
        return -jnp.sum((x - target) ** 2, axis=-1)

    x = jnp.array([[0.1, -0.3]])
    t = jnp.array([400.0])
    fn = guidance.classifier_guidance(model, log_prob, SCHED, 2.0)
    abar = SCHED.alphas_cumprod[400]
    want = model(x, t) - 2.0 * jnp.sqrt(1 - abar) * (-2 * (x - target))
    np.testing.assert_allclose(fn(x, t), want, rtol=1e-5)
    # the same guidance, expressed for a v-prediction model, converts back to the same ε
    v_model = lambda x, t: diffusion.prediction_target(  # noqa: E731
        diffusion.eps_to_x0(x, model(x, t), abar), model(x, t), abar, "v_prediction"
    )
    v_fn = guidance.classifier_guidance(
        v_model, log_prob, SCHED, 2.0, prediction_type="v_prediction"
    )
    np.testing.assert_allclose(diffusion.v_to_eps(x, v_fn(x, t), abar), want, rtol=1e-4, atol=1e-5)


def test_classifier_guidance_moves_samples_towards_the_class():
    model = oracle.eps_model(SCHED)

    def log_prob(x, t):
        return -4.0 * jnp.sum((x - 1.0) ** 2, axis=-1)

    plain = samplers.sample(model, SCHED, jax.random.key(0), (512, 1), method="ddim", num_steps=30)
    guided = samplers.sample(
        guidance.classifier_guidance(model, log_prob, SCHED, 1.0),
        SCHED,
        jax.random.key(0),
        (512, 1),
        method="ddim",
        num_steps=30,
    )
    assert float(guided.mean()) > float(plain.mean()) + 0.1


def test_projection_replaces_x0_over_its_share_of_the_schedule():
    """project_prediction: the wrapped output implies x̂_0 = project(x̂_0) at t >= (1 - share) T
    and the model's own x̂_0 below, for each prediction type; a constant projection at every
    step ends a DDIM run at that constant."""
    import pytest

    schedule = schedules.get_schedule("linear", 1000)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))

    def model_fn(x, t):
        return jnp.tanh(x) * (1 + t[:, None, None, None] / 1000)

    def pinned(v):
        return jnp.full_like(v, 0.25)

    for kind in ("epsilon", "v_prediction", "sample"):
        fn = guidance.project_prediction(model_fn, schedule, pinned, share=0.4,
                                         prediction_type=kind)  # fmt: skip
        for t, projected in ((700.0, True), (300.0, False)):
            tt = jnp.full((2,), t)
            abar = schedules.alpha_bar_at(schedule, tt)[:, None, None, None]
            x0, _ = diffusion.split_prediction(fn(x, tt), x, abar, kind)
            own, _ = diffusion.split_prediction(model_fn(x, tt), x, abar, kind)
            np.testing.assert_allclose(x0, 0.25 if projected else own, atol=1e-5)
    fn = guidance.project_prediction(model_fn, schedule, pinned)
    out = samplers.sample(fn, schedule, jax.random.key(1), (2, 4, 4, 3), method="ddim",
                          num_steps=10, eta=1.0)  # fmt: skip
    np.testing.assert_allclose(out, 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="share of the schedule"):
        guidance.project_prediction(model_fn, schedule, pinned, share=1.5)
