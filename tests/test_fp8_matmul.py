"""trainer.model.fp8_matmul: the frozen base multiplied in fp8 (``torch._scaled_mm``, which PyTorch also runs on the
CPU), and how a memory tier turns it on (``trainer.model.loading.place_transformer``).

``pytest -s`` prints the measured figures (gradient agreement, the tiny-model loss curves) so they can be quoted.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.test_quantize import (compare, cos, linear_with, lora_figures, realistic_weight, rel, saved_bytes,
                                 tiny_transformer)
from trainer.errors import UserError
from trainer.model import fp8_matmul
from trainer.model.quantize import QuantizedLinear, dequantize, quantize_linears, use_fp8_matmuls, weight_bytes
from trainer.runtime import Runtime, using


def fp8_layer(out_f=96, in_f=128, bias=True, transposed_copy=False) -> QuantizedLinear:
    q = QuantizedLinear.from_linear(linear_with(realistic_weight(out_f, in_f), bias=bias), "fp8")
    assert use_fp8_matmuls(q, transposed_copy=transposed_copy) == {"fp8_matmuls": 1, "kept": 0}
    return q


def exact(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What fp8 codes with their row scales stand for, in float64."""
    return codes.view(fp8_matmul.E4M3).double() * scale.double()


# --- 1. the maths -------------------------------------------------------------------------------------------

def test_quantize_rows_spans_the_range_and_survives_zero_rows():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1e-4], [1], [300], [1], [1]])
    x[3] = 0.0
    codes, scale = fp8_matmul.quantize_rows(x)
    assert codes.dtype == fp8_matmul.E4M3 and scale.shape == (5, 1) and scale.dtype == torch.float32
    assert torch.isfinite(codes.float()).all() and scale[3].item() == 1.0 and (codes[3].float() == 0).all()
    live = [0, 1, 2, 4]  # every other row's largest value lands on e4m3's largest, whatever its magnitude
    assert torch.equal(codes[live].float().abs().amax(1), torch.full((4,), fp8_matmul.E4M3_MAX))
    back = exact(codes, scale)
    # within e4m3's rounding: 3 mantissa bits, half a step = 2**-4 of the value (plus subnormals near zero)
    assert ((back - x.double()).abs() <= x.double().abs() * 2 ** -4 + scale.double() * 2 ** -9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_fp8_product_and_close_to_the_dequantized_linear(dtype):
    q = fp8_layer()
    x = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = q(x)
    assert y.shape == (2, 24, 96) and y.dtype == dtype
    # exactly what the quantized operands multiply to (fp32 accumulation; then rounded to the output dtype)
    x_codes, x_scale = fp8_matmul.quantize_rows(x.reshape(-1, 128))
    want = exact(x_codes, x_scale) @ exact(q.weight, q.scale[:, None]).T + q.bias.double()
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert rel(y.reshape(-1, 96).double(), want) < tolerance
    # and close to the layer's own dequantizing matmul: the activations' rounding is all that differs
    ref = F.linear(x.float(), dequantize(q), q.bias.float())
    assert 0.005 < rel(y.float(), ref) < 0.04  # measured 0.025: e4m3's rounding of x, not zero, not a wrong scale


def test_backward_folds_the_weight_scales_into_grad_out_and_gives_the_weight_nothing():
    q = fp8_layer(bias=False)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn(40, 96, generator=torch.Generator().manual_seed(3))
    q(x).backward(g)
    g_codes, g_scale = fp8_matmul.quantize_rows(g * q.scale)
    want = exact(g_codes, g_scale) @ q.weight.view(fp8_matmul.E4M3).double()
    assert rel(x.grad.double(), want) < 1e-5
    ref = g @ dequantize(q)
    assert 0.005 < rel(x.grad, ref) < 0.04
    assert q.weight.grad is None and q.scale.grad is None


def test_the_transposed_copy_gives_the_same_numbers_and_costs_one_byte_per_weight():
    on_the_fly, kept = fp8_layer(), fp8_layer(transposed_copy=True)
    assert on_the_fly.weight_t is None and kept.weight_t.shape == (128, 96)
    assert weight_bytes(kept) == weight_bytes(on_the_fly) + 96 * 128
    assert "weight_t" not in kept.state_dict()  # checkpoints and the state dict never see it
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(4))
    grads = []
    for layer in (on_the_fly, kept):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.square().sum().backward()
        grads.append((y, xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_autograd_keeps_neither_the_input_nor_a_bf16_weight():
    q = fp8_layer(512, 1024, transposed_copy=True)
    own = {t.untyped_storage().data_ptr() for t in (q.weight, q.scale, q.weight_t)}
    x = torch.randn(64, 1024, requires_grad=True)
    total, extra, y = saved_bytes(lambda: q(x), own)
    assert extra == 0  # nothing but the layer's own codes and scales: not x (256 KiB), not x's fp8 codes
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_only_fp8_layers_whose_shapes_fit_switch():
    model = torch.nn.Sequential(linear_with(realistic_weight(64, 128)), linear_with(realistic_weight(40, 64)),
                                linear_with(realistic_weight(24, 40)), linear_with(realistic_weight(32, 24)))
    quantize_linears(model, "fp8", "cpu", skip=lambda name, layer: name in ("0", "3"))
    model[3] = QuantizedLinear.from_linear(model[3], "nf4")
    report = use_fp8_matmuls(model)
    # 0 stays unquantized (skipped), 1 and 2 have a feature count that is no multiple of 16 (40), 3 is nf4
    assert report == {"fp8_matmuls": 0, "kept": 2}
    assert all(getattr(m, "matmul", None) != "fp8" for m in model)
    model[1] = QuantizedLinear.from_linear(linear_with(realistic_weight(48, 64)), "fp8")
    assert use_fp8_matmuls(model) == {"fp8_matmuls": 1, "kept": 1} and model[1].matmul == "fp8"
    assert "matmul=fp8" in repr(model[1])


# --- 2. what it does to training ----------------------------------------------------------------------------

# Measured on this CPU (pytest -s) as loss | grad, per-parameter 5th pct / median | update, with fp8 storage alone
# (tests/test_quantize.py's figures) beside them: the activations' rounding adds about as much again as the weights'.
# Thresholds: 2x margin on 1 - cosine, ~2.5x on the loss difference.
FP8_MATMUL_THRESHOLDS = {
    # fp8-matmul 2.1e-05 | 0.99965, 0.9979 / 0.99946 | 0.9958     (fp8 storage 1.5e-05 | 0.99976, 0.9986 / 0.99965)
    "flux-magnitude": dict(loss=5e-5, grad=0.9993, param_p05=0.9958, param_median=0.9989, update=0.9916),
    # fp8-matmul 4.9e-04 | 0.99903, 0.9961 / 0.99858 | 0.9913     (fp8 storage 4.0e-04 | 0.99940, 0.9977 / 0.99913)
    "tiny-demo": dict(loss=1.5e-3, grad=0.998, param_p05=0.992, param_median=0.9971, update=0.982),
    # fp8-matmul 1.2e-02 | 0.99190, 0.9768 / 0.99359 | 0.9579     (fp8 storage 1.9e-02 | 0.99423, 0.9828 / 0.99540)
    "flux-gain": dict(loss=0.04, grad=0.984, param_p05=0.953, param_median=0.987, update=0.916),
}


@pytest.mark.parametrize("weights", list(FP8_MATMUL_THRESHOLDS))
def test_fp8_matmuls_train_the_same_lora_as_full_precision(weights):
    base = tiny_transformer(None if weights == "tiny-demo" else weights)
    ref = lora_figures(base, "full")
    flat = [torch.cat([x.flatten() for x in g]) for g in ref["grads"]]
    sampling = min(cos(flat[0], f) for f in flat[1:])
    figures = {storage: compare(lora_figures(base, storage), ref) for storage in ("fp8", "fp8-matmul")}
    for storage, c in figures.items():
        print(f"\n{weights} {storage:10}: loss {c['loss']:.2e} | grad {c['grad']:.5f}, per-parameter "
              f"{c['param_p05']:.4f} / {c['param_median']:.5f} | update {c['update']:.4f} | "
              f"vs sampling noise {(1 - c['grad']) / (1 - sampling):.3f}")
    c, limits = figures["fp8-matmul"], FP8_MATMUL_THRESHOLDS[weights]
    assert c["loss"] < limits["loss"] and c["grad"] > limits["grad"] and c["update"] > limits["update"]
    assert c["param_p05"] > limits["param_p05"] and c["param_median"] > limits["param_median"]
    assert (1 - c["grad"]) / (1 - sampling) < 0.3  # far below what another noise draw changes
    # and it really is a different computation from the dequantizing one (a switch that did nothing would tie)
    assert c["grad"] != figures["fp8"]["grad"]


def tiny_example(seed: int = 0):
    """A 32 px picture's cached example for the tiny FLUX.1 (random latents: a fixed target the LoRA can fit)."""
    from trainer.families import FLUX1
    from trainer.training.encode import EncodedExample, PromptEmbedding

    g = torch.Generator().manual_seed(seed)
    caption = PromptEmbedding(prompt="a photo of sks", embeds=torch.randn(1, 8, 32, generator=g),
                              pooled=torch.randn(1, 32, generator=g), text_ids=torch.zeros(8, 3))
    return EncodedExample(latents=torch.randn(1, 4, 16, 16, generator=g), weights=None,
                          image_ids=FLUX1.image_ids(16, 16, "cpu", torch.float32), caption=caption)


def loss_curve(base, fp8: bool, noise_seed: int, learning_rate: float, steps: int = 200) -> list[float]:
    """Losses of a LoRA run on one picture with the trainer's own step (``training_step``: noise, timestep, loss)."""
    import copy

    from trainer.config import TrainingConfig
    from trainer.model.lora import add_lora
    from trainer.training import flow
    from trainer.training.step import training_step

    model = copy.deepcopy(base)
    if fp8:
        quantize_linears(model, "fp8", "cpu")
        assert use_fp8_matmuls(model)["fp8_matmuls"] == 40  # every block layer of the tiny model
    cfg = TrainingConfig(rank=4, learning_rate=learning_rate)
    params = add_lora(model, cfg.rank, cfg.alpha, cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    example, generator = tiny_example(), torch.Generator().manual_seed(noise_seed)
    losses = []
    for _ in range(steps):
        loss = training_step(model, example, cfg, generator, flow.resolution_shift(64), False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def windows(losses: list[float], size: int = 25) -> torch.Tensor:
    return torch.tensor(losses).view(-1, size).mean(1)


# weights, learning rate (higher than the presets' 4e-4 so a tiny model visibly learns in 200 steps), and the bound
# on |fp8 - reference| / |other noise - reference| -- measured 0.02 and 0.26 (flux-gain: every layer amplifies)
CURVES = [("tiny-demo", 2e-3, 0.15), ("flux-gain", 1e-3, 0.5)]


@pytest.mark.parametrize("weights, learning_rate, bound", CURVES)
def test_a_200_step_tiny_run_has_the_same_loss_curve_within_noise(weights, learning_rate, bound):
    base = tiny_transformer(None if weights == "tiny-demo" else weights)
    ref, fp8, other_noise = (loss_curve(base, fp8, seed, learning_rate) for fp8, seed in
                             ((False, 0), (True, 0), (False, 1)))
    ref_w, fp8_w, noise_w = windows(ref), windows(fp8), windows(other_noise)
    print(f"\n{weights}: loss per 25 steps, full precision: {[round(v, 4) for v in ref_w.tolist()]}"
          f"\n                           fp8 matmuls:    {[round(v, 4) for v in fp8_w.tolist()]}"
          f"\n           full precision, other noise:    {[round(v, 4) for v in noise_w.tolist()]}")
    assert ref_w[-1] < 0.85 * ref_w[0] and fp8_w[-1] < 0.85 * fp8_w[0]  # both learn: else "the same" says nothing
    fp8_gap, noise_gap = (fp8_w - ref_w).abs().mean(), (noise_w - ref_w).abs().mean()
    print(f"  |fp8 - ref| {fp8_gap:.5f}, |other noise - ref| {noise_gap:.5f} (mean over 25-step windows): "
          f"ratio {fp8_gap / noise_gap:.3f}")
    # same noise and timesteps as the reference: the fp8 run stays far closer to it than another noise draw is
    assert fp8_gap < bound * noise_gap and fp8_gap > 0


# --- 3. how a job turns it on ---------------------------------------------------------------------------------

def tiny_parts(tmp_path):
    from trainer.families import FLUX1
    from trainer.model.loading import ModelParts

    return ModelParts(transformer=tiny_transformer(), vae=None, text_encoder=None, text_encoder_2=None,
                      tokenizer=None, tokenizer_2=None, scheduler=None, device=torch.device("cpu"),
                      dtype=torch.float32, model_path=tmp_path, family=FLUX1)


def test_supported_needs_an_fp8_gpu_never_the_cpu():
    assert not fp8_matmul.supported("cpu")  # the tiny model on a CPU keeps its exact matmuls
    if not torch.cuda.is_available():
        assert not fp8_matmul.supported("cuda")


def test_the_self_test_passes_where_the_product_is_right_and_fails_softly_otherwise(monkeypatch, caplog):
    assert fp8_matmul.probe("cpu")  # the real product, run where this machine can (PyTorch's CPU kernel)
    real = torch._scaled_mm

    def wrong_scale(a, b, scale_a, scale_b, **kw):  # a kernel that drops the activations' scales
        return real(a, b, torch.ones_like(scale_a), scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", wrong_scale)
    assert not fp8_matmul.probe("cpu") and "self-test" in caplog.text

    def missing(*args, **kwargs):  # a build without row-scaled fp8 kernels for the card
        raise RuntimeError("rowwise scaling is not supported on this device")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    assert not fp8_matmul.probe("cpu") and "not available" in caplog.text


@pytest.mark.parametrize("weights, training, transposed", [("bf16", True, True), ("bf16", False, False),
                                                            ("fp8", True, False)])
def test_place_transformer_on_an_fp8_gpu(tmp_path, monkeypatch, weights, training, transposed):
    """The placing code as a job, the preview model and the renderer call it. An fp8-capable GPU cannot exist here,
    so ``supported`` is made to say yes (the only stand-in); the matmuls then run on the CPU as on the GPU."""
    from trainer.model.loading import place_transformer

    monkeypatch.setattr(fp8_matmul, "supported", lambda device: True)
    parts = tiny_parts(tmp_path)
    with using(Runtime()):
        report = place_transformer(parts, weights, matmul="fp8", training=training)
    layers = [m for m in parts.transformer.modules() if isinstance(m, QuantizedLinear)]
    assert parts.matmul == "fp8" and report["matmul"] == "fp8" and report["fp8_matmuls"] == len(layers) == 40
    assert all(m.matmul == "fp8" and (m.weight_t is not None) == transposed for m in layers)
    out = parts.transformer(**tiny_inputs())[0]
    assert torch.isfinite(out).all()


def tiny_inputs():
    from tests.test_quantize import flux_inputs

    inputs, _ = flux_inputs(0)
    return inputs


@pytest.mark.parametrize("case", ["switch off", "no fp8 gpu", "nf4", "tier says bf16"])
def test_place_transformer_keeps_bf16_matmuls_otherwise(tmp_path, monkeypatch, case):
    from trainer.model.loading import place_transformer

    monkeypatch.setattr(fp8_matmul, "supported", lambda device: case != "no fp8 gpu")
    parts = tiny_parts(tmp_path)
    weights = {"nf4": "nf4", "tier says bf16": "bf16"}.get(case, "fp8")
    matmul = "bf16" if case == "tier says bf16" else "fp8"
    with using(Runtime(fp8_matmul=case != "switch off")):
        report = place_transformer(parts, weights, matmul=matmul)
    assert parts.matmul == "bf16" and report["matmul"] == "bf16"
    assert not any(getattr(m, "matmul", None) == "fp8" for m in parts.transformer.modules())
    if weights == "bf16":  # nothing quantized: the tier's bf16 weights as loaded
        assert not any(isinstance(m, QuantizedLinear) for m in parts.transformer.modules())


def test_the_tiers_ask_for_fp8_matmuls_where_the_weights_are_fp8(tmp_path):
    from trainer.families import family_named
    from trainer.model.tiers import list_tiers, load_tier, tiers_dir

    assert {n: load_tier(n).matmul for n in ("full", "24gb", "16gb", "12gb")} == \
        {"full": FULL_TIER_MATMUL, "24gb": "fp8", "16gb": "fp8", "12gb": "bf16"}
    klein = {t.name: (t.weights, t.matmul) for t in list_tiers(tiers_dir(family_named("flux2-klein")))}
    assert klein["12gb"] == ("fp8", "fp8") and all(m == "bf16" for w, m in klein.values() if w == "bf16")
    good = (tmp_path / "good.toml")
    good.write_text('description = "x"\nmin_card_gib = 1\nweights = "fp8"\ngradient_checkpointing = true\n')
    assert load_tier("good", tmp_path).matmul == "bf16"  # the default: a tier file without the key
    for name, line in (("nf4", 'weights = "nf4"\nmatmul = "fp8"'), ("int8", 'weights = "fp8"\nmatmul = "int8"')):
        (tmp_path / f"{name}.toml").write_text(f'description = "x"\nmin_card_gib = 1\n{line}\n'
                                              'gradient_checkpointing = true\n')
        with pytest.raises(UserError, match="matmul must be one of"):
            load_tier(name, tmp_path)


FULL_TIER_MATMUL = "bf16"


def test_the_switch_is_read_from_the_environment():
    assert Runtime.from_environment({}).fp8_matmul is True
    assert Runtime.from_environment({"ONE_IMAGE_LORA_FP8_MATMUL": "0"}).fp8_matmul is False
    assert "fp8_matmul=off" in dataclasses.replace(Runtime(), fp8_matmul=False).describe()
    with pytest.raises(UserError, match="ONE_IMAGE_LORA_FP8_MATMUL"):
        Runtime.from_environment({"ONE_IMAGE_LORA_FP8_MATMUL": "maybe"})
