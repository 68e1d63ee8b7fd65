"""Compiling for a TPU topology that is not attached (jdiff.aot): the report of a tiny run
compiled by libtpu for v5e:2x2 with fsdp 2, the collectives read from HLO, and SD's
architectures sized without their weights."""

import importlib
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from runs import ROOT

from jdiff import aot, programs, sharding, topologies
from jdiff.nn import attention
from jdiff.validate import InputError


def test_a_tiny_run_compiled_for_v5e_2x2_reports_its_chips(tmp_path):
    """The tiny config, data 2 x fsdp 2 (every array split: fsdp_min_size 1), compiled by
    `python -m jdiff.aot` for four v5e chips: the parameters, EMA and optimizer state per chip
    are the shardings' shares, the step all-gathers the parameters and reduces gradients. At
    16x16 the one-level U-Net attends over 256 tokens, so the step runs the Pallas kernel and
    the report adds what the compiler could not count."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra")
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "jdiff.aot", f"--config={ROOT}/configs/default.py:tiny",
               "--topology=v5e:2x2", "--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=1",
               "--config.data.image_size=16", f"--json={out}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "compiled for v5e:2x2 (4 x TPU v5e, 16 GiB HBM each)" in done.stdout
    assert "of 16: fits" in done.stdout and "all-gather" in done.stdout
    assert report["chips"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2}
    assert report["batch_per_chip"] == 2.0  # the tiny config's 8 over four chips

    config = importlib.import_module("configs.default").get_config("tiny")
    state = jax.eval_shape(programs.train_parts(config).init)
    whole = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(state.params))
    shares = report["state"]
    params = shares["parameters"]
    # split in two but for arrays with no even axis (a 3-channel kernel's bias, scalars)
    assert whole / 2 <= params < 0.55 * whole
    assert shares["EMA parameters"] == params
    assert 2 * params <= shares["optimizer state"] < 2.2 * params  # Adam's two moments
    memory = report["memory"]
    assert memory["arguments"] >= sum(shares.values()) and memory["aliased"] > 0  # donated
    assert report["fits"] and 0 < report["total_bytes"] < 2**30
    assert 1e6 < report["flops"] < 1e12 and report["estimate_s"] > 0 and 0 < report["mfu"] < 1
    ops = report["collectives"]
    assert ops["all-gather"][0] > 0 and ops["all-gather"][1] > 0
    assert ("reduce-scatter" in ops) or ("all-reduce" in ops)
    # the Pallas kernels: the compiler's estimate leaves them out, added at the chip's peak
    assert 0 < report["kernel_flops"] < report["flops"]
    assert report["estimated_by"] in ("compiler+kernels", "roofline")
    assert report["estimate_s"] >= report["kernel_flops"] / (197 * 1e12)
    assert "in Pallas kernels the compiler cannot cost" in done.stdout


def test_a_sampler_compiled_for_v5e_counts_every_step_of_its_loop():
    """--program=sample: the whole sampler (8 DDIM steps, guidance) for four chips; XLA counts
    its loop's body once, so the model call, compiled apart, is added for the other 7. At the
    compiler's least effort (the quick compile), which the report says."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra")
    config = importlib.import_module("configs.default").get_config("tiny")
    config.sample.update(num_samples=8, num_steps=8, method="ddim")
    report = aot.compile_for(config, "v5e:2x2", "sample", effort=-1.0)
    assert report.program == "sampler" and report.batch_per_chip == 2.0 and report.effort == -1
    assert set(report.state) == {"parameters"} and report.fits
    loop = report.loop
    assert loop["uncounted_calls"] == 7 and loop["call_flops"] > 0
    counted = report.flops - 7 * loop["call_flops"]  # what XLA counted: the body once, at least
    assert counted >= 0.99 * loop["call_flops"]  # one model call
    # outside the loop a tiny pixel sampler costs next to nothing: 8 calls in all, not 1
    assert 8 * loop["call_flops"] <= 1.01 * report.flops < 9 * loop["call_flops"]
    assert report.estimate_s > 7 * loop["call_estimate_s"] > 0
    assert "7 more calls are added" in aot.describe(report)
    assert "at effort -1: mesh" in aot.describe(report)


def _attention_gradient(mesh, spec, implementation):
    """(compiled, traced jaxpr) of an attention's value and gradient over q, k, v of `spec`,
    the batch split over `mesh`, traced with `mesh` in context."""

    def loss(q, k, v):
        out = attention.attention(q, k, v, implementation=implementation)
        return (out.astype(jnp.float32) ** 2).sum()

    step = jax.value_and_grad(loss, argnums=(0, 1, 2))
    jitted = jax.jit(sharding.traced_in(mesh, step),
                     in_shardings=(sharding.batch_sharding(mesh),) * 3)  # fmt: skip
    traced = jitted.trace(spec, spec, spec)
    return traced.lower().compile(), traced.jaxpr.jaxpr


def test_attention_for_a_tpu_is_the_pallas_kernel_and_its_flops_are_counted():
    """Traced with a v5e mesh in context, None is the Pallas flash kernel (a Mosaic call in
    the compiled program) whose gradient holds a fraction of the plain path's temporaries;
    the backward kernels, which carry no cost estimate, are counted from their bodies:
    dK, dV (4 products) and dQ (3 products) of 2·b·h·l²·d each, per chip."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra")
    aot._cpu_only()
    devices = aot.topology_devices("v5e:2x2")
    mesh = sharding.make_mesh(data=4, fsdp=1, devices=devices)
    b, length, heads, d = 8, 4096, 2, 64  # (at 1,024 the plain path kept no scores either)
    spec = jax.ShapeDtypeStruct((b, length, heads, d), jnp.bfloat16)
    # the suite's "highest" precision has no Mosaic form for bfloat16 operands
    with jax.default_matmul_precision("default"):
        ours, jaxpr = _attention_gradient(mesh, spec, None)
        plain, plain_jaxpr = _attention_gradient(mesh, spec, "xla")
    kernels, none = aot.kernel_flops(jaxpr), aot.kernel_flops(plain_jaxpr)
    assert "tpu_custom_call" in ours.as_text() and "tpu_custom_call" not in plain.as_text()
    temporaries = [c.memory_analysis().temp_size_in_bytes for c in (ours, plain)]
    scores = (b // 4) * heads * length * length * 4  # one float32 score matrix per chip
    assert temporaries[1] >= scores > 4 * temporaries[0]
    assert kernels == 7 * 2 * (b // 4) * heads * length * length * d and none == 0


def test_collectives_are_read_from_compiled_hlo():
    hlo = "\n".join([
        "  %ag = f32[8,128]{1,0:T(8,128)} all-gather(f32[4,128]{1,0} %p), dimensions={0}",
        "  %ar = (f32[64]{0}, bf16[2,3]{1,0}) all-reduce(%a, %b), to_apply=%add",
        "  %s = (f32[4]{0}, f32[8]{0}) all-gather-start(f32[4]{0} %q), dimensions={0}",
        "  %d = f32[8]{0} all-gather-done((f32[4]{0}, f32[8]{0}) %s)",
        "  %rs = bf16[16,2]{1,0} reduce-scatter(bf16[32,2]{1,0} %g), dimensions={0}",
        "  %x = f32[8,128]{1,0} add(%ag, %ag)",
    ])  # fmt: skip
    assert aot.collectives(hlo) == {
        "all-gather": (2, 8 * 128 * 4 + 8 * 4),  # the async one by its -start, its output
        "reduce-scatter": (1, 16 * 2 * 2),
        "all-reduce": (1, 64 * 4 + 6 * 2),
    }


def test_stable_diffusion_is_sized_without_its_weights():
    """latent.pretrained=sd_v1 / sd_v2_1: the U-Net and text encoder of SD 1.5 and 2.1, their
    parameter counts those of the released models (diffusers' and transformers' counts), and
    the batch that train.py's fine-tuning feeds (cached latents and caption encodings)."""
    config = importlib.import_module("configs.sd_finetune").get_config()
    counts = {}
    for name in ("sd_v1", "sd_v2_1"):
        config.latent.pretrained = name
        program = programs.train_parts(config)
        params = jax.eval_shape(program.init).params
        counts[name] = [sum(math.prod(a.shape) for a in jax.tree.leaves(params[part]))
                        for part in ("unet", "text_encoder")]  # fmt: skip
    assert counts == {"sd_v1": [859_520_964, 123_060_480], "sd_v2_1": [865_910_724, 340_387_840]}
    shapes = {k: (v.shape, str(v.dtype)) for k, v in program.batch.items()}
    assert shapes == {"latent_mean": ((8, 32, 32, 4), "float32"),
                      "latent_std": ((8, 32, 32, 4), "float32"), "ids": ((8, 77), "int32"),
                      "context": ((8, 77, 1024), "bfloat16")}  # fmt: skip
    # the sampler at 512 px: prompts' ids in, the guided U-Net call on 2 x 8 latents of 64x64
    config.data.image_size, config.latent.pretrained = 512, "sd_v1"
    sampler = programs.sample_program(config)
    assert [getattr(a, "shape", None) for a in sampler.args[2:4]] == [(8, 77), (8, 77)]
    assert [a.shape for a in sampler.call.args[1:]] == [(16, 64, 64, 4), (16,), (16, 77, 768)]
    assert sampler.uncounted == 49  # DDIM-50: the loop's body counted once by XLA
    vae = sum(math.prod(a.shape) for a in jax.tree.leaves(sampler.args[1]))
    assert vae == 83_653_863  # SD's autoencoder, as released


GIB = 2**30


@pytest.mark.parametrize(("fixed", "slope", "refused_from", "start", "largest"), [
    (1.8, 0.35, None, 4, 40),  # 40 x 0.35 + 1.8 = 15.8 GiB of 16; 41 is over
    (1.8, 0.35, 37, 4, 36),  # the compiler refuses before the bytes reach 16 GiB
    (1.8, 0.1, 44, 4, 36),  # the compiler's limit far below 16 GiB, the search cut short
    (1.8, 0.35, None, 64, 40),  # from above
    (6.0, 0.01, None, 1, 16),  # bytes hardly grow: 1, 2, then at most 8x the last
    (15.0, 2.0, None, 1, 0),  # not even one example
])  # fmt: skip
def test_the_batch_search_brackets_the_largest_batch_that_fits(fixed, slope, refused_from,
                                                               start, largest):  # fmt: skip
    """`largest_batch` over a program whose bytes grow linearly with the batch: it returns the
    largest that fits, having compiled it and (but for a search cut short) one more that does
    not, within its budget of compiles."""

    def need(batch):
        if refused_from is not None and batch >= refused_from:
            return None  # the compiler's RESOURCE_EXHAUSTED
        return int((fixed + slope * batch) * GIB)

    budget = {0.01: 3, 0.1: 5}.get(slope, aot.SEARCH_COMPILES)
    found = aot.largest_batch(need, start, 16 * GIB, compiles=budget)
    text = aot.describe_search(found, "v5e:2x2", 4, "data.batch_size")
    assert found.largest == largest and len(found.tried) <= budget
    if largest:
        assert need(largest) <= 16 * GIB and found.tried[largest] == need(largest)
    if found.verified:
        assert (largest + 1) in found.tried and (need(largest + 1) or 17 * GIB) > 16 * GIB
    elif refused_from is not None:  # 4, 8, 64, 36, 50: cut short inside the bracket
        assert "36 per chip (50 does not; 37-49 not tried: the search stopped after 5" in text
    else:  # 1 -> 2 -> 16 in three compiles, all fitting: the answer is a lower bound
        assert slope == 0.01 and sorted(found.tried) == [1, 2, 16]
        assert "at least; the search stopped after 3 compiles" in aot.describe_search(
            found, "v5e:2x2", 4, "data.batch_size"
        )


def test_max_batch_reports_at_the_largest_batch_and_every_try(monkeypatch, tmp_path, capsys):
    """`jdiff.aot --max_batch` (`run(max_batch=True)`): a compile per try with the config's
    batch key set to per-chip batch x chips (here the compiler stood in for by a program whose
    bytes grow by 1 GiB an example, refused from 14 per chip), one line per try, the report
    at the largest that fits, and the search in the JSON."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra")
    config = importlib.import_module("configs.default").get_config("tiny")
    config.mesh.fsdp = 2
    seen = []

    def compile_for(trial, topology, program, flag, *, effort):
        per_chip = trial.data.batch_size // 4
        seen.append(trial.data.batch_size)
        if per_chip >= 14:
            raise aot.DoesNotFit("does NOT fit", "HLO temporaries (17G) exceed (15.75G)")
        memory = {"arguments": per_chip * GIB, "outputs": 0, "aliased": 0,
                  "temporaries": GIB // 2, "code": 0}  # fmt: skip
        return aot.Report(topology, "train step", aot.CHIPS["v5e"], 16, 4, {"data": 2, "fsdp": 2},
                          per_chip, {}, memory, 1e12, 1e9, 0.1, "compiler", {}, 1.0)  # fmt: skip

    monkeypatch.setattr(aot, "compile_for", compile_for)
    out = tmp_path / "report.json"
    report = aot.run(config, "v5e:2x2", json_path=str(out), max_batch=True)
    printed = capsys.readouterr().out
    assert report.batch_per_chip == 13 and config.data.batch_size == 8  # the config untouched
    assert seen[0] == 8 and 13 * 4 in seen and 14 * 4 in seen  # from the config's 2 per chip
    assert "    13 per chip (data.batch_size=52): 13.500 GiB, fits" in printed
    assert "    14 per chip (data.batch_size=56): does NOT fit (XLA's TPU compiler: HLO" in printed
    assert (
        "largest batch that fits v5e:2x2: 13 per chip (14 per chip does not), "
        "data.batch_size=52 over its 4 chips"
    ) in printed
    assert "~520 examples/s over the 4 chips" in printed  # 52 a step, 0.1 s
    search = json.loads(out.read_text())["batch_search"]
    assert search["largest_batch_per_chip"] == 13 and search["verified"]
    assert search["tried"]["14"] is None and search["tried"]["13"] == 13.5 * GIB


def test_products_and_convolutions_are_counted_forward_and_backward():
    """`program_flops` (what the report counts where XLA gives no cost analysis): a 3x3
    convolution is 2 x outputs x (input channels x 9) and its gradients (inputs, kernel) the
    same again each; a product 2·M·N·K, three times with its two gradients."""
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    m = jnp.ones((5, 7))

    def loss(x, w, m):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return y.sum() + (m @ m.T).sum()

    conv, product = 2 * (2 * 8 * 8 * 6) * (4 * 9), 2 * 5 * 5 * 7
    assert aot.program_flops(jax.make_jaxpr(loss)(x, w, m).jaxpr) == conv + product
    grads = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w, m).jaxpr
    assert aot.program_flops(grads) == 3 * conv + 3 * product


def _gpu_plugin():
    pytest.importorskip("jax_plugins.xla_cuda13", reason="the [gpu-aot] extra's CUDA plugin")


def test_attention_for_a_gpu_is_cudnn_flash_attention_and_its_flops_are_counted():
    """Traced with a mesh of two H100s (no GPU attached: JAX's CUDA plugin and the chip's
    description), None on 16-bit heads is cuDNN's flash attention, forward and backward (fused
    attention calls in the compiled program), whose gradient holds no score matrix; its FLOPs
    are counted from the shapes (4 and 10 x b·h·l²·d), the plain path's from its products."""
    _gpu_plugin()
    aot._cpu_only()
    mesh = sharding.make_mesh(data=2, fsdp=1, devices=aot.topology_devices("h100:2"))
    b, length, heads, d = 4, 2048, 2, 64
    spec = jax.ShapeDtypeStruct((b, length, heads, d), jnp.bfloat16)
    (ours, jaxpr), (plain, plain_jaxpr) = (_attention_gradient(mesh, spec, implementation)
                                           for implementation in (None, "xla"))  # fmt: skip
    ours_flops, plain_flops = aot.program_flops(jaxpr), aot.program_flops(plain_jaxpr)
    assert "__cudnn$fmha" in ours.as_text() and "__cudnn$fmha" not in plain.as_text()
    assert "fmhaSoftmaxBackward" in ours.as_text()
    temporaries = [c.memory_analysis().temp_size_in_bytes for c in (ours, plain)]
    scores = (b // 2) * heads * length * length * 2  # one bfloat16 score matrix per GPU
    assert temporaries[1] >= scores > 4 * temporaries[0]
    unit = b * heads * length * length * d
    assert ours_flops == 14 * unit and plain_flops == 12 * unit
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # what the default takes there
        bf16, f32 = jnp.bfloat16, jnp.float32
        assert attention.resolve(None, 4096, 4096, 40, bf16) == "cudnn"  # SD 1.x at 512 px
        assert attention.resolve(None, 4096, 77, 40, bf16) is None  # odd: the text's 77 keys
        assert attention.resolve(None, 256, 256, 160, bf16) is None  # wider than 128
        assert attention.resolve(None, 4096, 4096, 64, f32) is None  # cuDNN's is 16-bit


def test_a_tiny_sampler_compiled_for_two_h100s_reports_per_gpu():
    """`compile_for(..., "h100:2", "sample")`: the tiny run's whole sampler (8 DDIM steps with
    guidance) by XLA's GPU compiler for two H100s, fsdp 2: the parameters split in two and
    gathered, the FLOPs jdiff's count (XLA has no cost analysis for a GPU it cannot see: every
    step of the loop counted, no call compiled apart) and the time those FLOPs at the bf16
    peak, said to be a lower bound; the memory against JAX's share of a GPU."""
    _gpu_plugin()
    config = importlib.import_module("configs.default").get_config("tiny")
    config.mesh.update(fsdp=2, fsdp_min_size=1)
    config.sample.update(num_samples=4, num_steps=8, method="ddim")
    report = aot.compile_for(config, "h100:2", "sample")
    assert report.chips == 2 and report.mesh == {"data": 1, "fsdp": 2}
    assert report.chip.name == "NVIDIA H100 80GB HBM3" and report.chip.platform == "gpu"
    assert report.batch_per_chip == 2 and report.fits and report.estimated_by == "peak"
    params = jax.eval_shape(programs.train_parts(config).init).params
    whole = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params))
    assert whole / 2 <= report.state["parameters"] < 0.55 * whole
    # 8 guided U-Net calls (2 x 4 images each) and next to nothing else, shared by 2 GPUs
    call = programs.sample_program(config).call
    once = aot.program_flops(jax.make_jaxpr(call.fn)(*call.args).jaxpr)
    assert report.bytes_accessed == 0 and report.loop is None
    assert 8 * once / 2 <= report.flops < 9 * once / 2
    assert report.estimate_s == report.flops / 989e12
    assert "all-gather" in report.collectives
    assert report.usable_gib == pytest.approx(0.75 * 81559 / 1024)  # JAX's default share
    text = aot.describe(report)
    assert "2 x NVIDIA H100 80GB HBM3" in text and "XLA gives no cost analysis" in text
    assert "JAX's share of the 79.65: XLA_PYTHON_CLIENT_MEM_FRACTION" in text
    assert "images/s over the 2 chips" in text and "so <= " in text


def test_a_gpu_run_may_use_the_share_of_memory_jax_takes(monkeypatch):
    """A GPU's verdict is against the memory JAX's allocator takes of it
    (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set); a TPU's against its whole HBM; a
    malformed share is refused by name."""
    h100 = topologies.CHIPS["h100"]
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert topologies.usable_gib(h100) == 0.75 * h100.hbm_gib
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert topologies.usable_gib(h100) == 0.9 * h100.hbm_gib
    assert topologies.usable_gib(topologies.CHIPS["v5e"]) == 16
    for bad in ("1.5", "nan", "most"):
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", bad)
        with pytest.raises(InputError, match="XLA_PYTHON_CLIENT_MEM_FRACTION="):
            topologies.usable_gib(h100)
