"""Exports load in diffusers' own loader and render the same image; kohya keys match the real FLUX.1-dev.

Three levels:
* the tiny pipeline: a checkpoint written by the trainer's own ``save_lora``, exported to each layout and loaded
  with ``FluxPipeline.load_lora_weights``, renders the same image as the checkpoint itself (and not the base image);
* diffusers' kohya converter hard-codes FLUX.1's single-block widths (3072 / 12288), so the tiny model's single
  blocks are checked on a pipeline whose transformer has FLUX.1's width (one single block, tiny everything else);
* the real FLUX.1-dev architecture on the meta device: the kohya key list equals the checked-in golden list, and
  a small random LoRA on every targeted layer goes through diffusers' converter back to exactly its matrices.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from trainer import cli
from trainer.errors import UserError
from trainer.families import FLUX1
from trainer.model.lora import add_lora, save_lora
from trainer.review.export import export_lora, read_lora, to_kohya

GOLDEN = Path(__file__).parent / "golden" / "flux_dev_kohya_keys.txt"
GOLDEN_RANK = 4
SIZE, STEPS = 32, 2
FLUX_WIDTH_SINGLE = dict(patch_size=1, in_channels=16, num_layers=0, num_single_layers=1, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
                         axes_dims_rope=(16, 56, 56), guidance_embeds=True)


# ---------------------------------------------------------------- helpers

def _random_checkpoint(transformer, path: Path, rank: int, alpha: float, seed: int, keep=lambda name: True) -> Path:
    """A checkpoint exactly as the trainer writes it (``add_lora`` + ``save_lora``), with random non-zero B."""
    add_lora(transformer, rank, alpha, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    save_lora(transformer, path, extra_metadata={"base_model": "tiny-demo", "step": "250", "rank": str(rank),
                                                 "alpha": str(alpha), "resolution": "512", "trigger_word": "ohwx",
                                                 "caption": "a photo of ohwx", "hf_token": "hf_" + "x" * 34})
    if not all(keep(k) for k in safetensors.torch.load_file(path)):
        tensors = {k: v for k, v in safetensors.torch.load_file(path).items() if keep(k)}
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata()
        safetensors.torch.save_file(tensors, path, metadata=meta)
    transformer.unload_lora()  # back to the plain base model
    return path


def _render(pipe, lora: Path | None) -> torch.Tensor:
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="under_test")
    try:
        return pipe(prompt="a photo of ohwx", width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(1), output_type="pt").images[0]
    finally:
        if lora is not None:
            pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_width_pipe(tiny_pipe):
    """The tiny pipeline with a transformer as wide as FLUX.1's (one single block, random bf16-range weights)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_WIDTH_SINGLE)
    transformer = transformer.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    pipe = FluxPipeline(scheduler=tiny_pipe.scheduler, vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder,
                        tokenizer=tiny_pipe.tokenizer, text_encoder_2=tiny_pipe.text_encoder_2,
                        tokenizer_2=tiny_pipe.tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_same_image(a: torch.Tensor, b: torch.Tensor):
    assert torch.allclose(a, b, atol=1e-4), f"images differ by up to {(a - b).abs().max():.3g}"


def _assert_different_image(a: torch.Tensor, b: torch.Tensor):
    assert (a - b).abs().max() > 0.02, "the LoRA had no visible effect, so the comparison proves nothing"


# ---------------------------------------------------------------- loading in diffusers: the same image

@pytest.mark.parametrize("alpha", [4.0, 8.0])  # alpha = rank (what we train) and alpha != rank (scaling must survive)
def test_both_exports_render_the_checkpoints_image_on_the_tiny_pipeline(tiny_pipe, tmp_path, alpha):
    transformer = tiny_pipe.transformer
    # diffusers' kohya converter only knows FLUX.1's single-block widths; single blocks are tested at that width below.
    checkpoint = _random_checkpoint(transformer, tmp_path / "lora-000250.safetensors", 4, alpha, seed=3)
    double_only = _random_checkpoint(transformer, tmp_path / "double.safetensors", 4, alpha, seed=4,
                                     keep=lambda k: "single_transformer_blocks" not in k)

    base = _render(tiny_pipe, None)
    original = _render(tiny_pipe, checkpoint)
    _assert_different_image(original, base)
    diffusers_file = export_lora(checkpoint, "diffusers", tmp_path / "out-diffusers.safetensors")
    _assert_same_image(_render(tiny_pipe, diffusers_file), original)

    original_double = _render(tiny_pipe, double_only)
    _assert_different_image(original_double, base)
    kohya_file = export_lora(double_only, "kohya", tmp_path / "out-kohya.safetensors")
    _assert_same_image(_render(tiny_pipe, kohya_file), original_double)


def test_kohya_single_blocks_render_the_same_image_at_flux_width(flux_width_pipe, tmp_path):
    checkpoint = _random_checkpoint(flux_width_pipe.transformer, tmp_path / "wide.safetensors", 4, 4.0, seed=5)
    keys = safetensors.torch.load_file(checkpoint)
    assert any("proj_mlp" in k for k in keys) and any("single_transformer_blocks.0.proj_out" in k for k in keys)
    base = _render(flux_width_pipe, None)
    original = _render(flux_width_pipe, checkpoint)
    _assert_different_image(original, base)
    kohya_file = export_lora(checkpoint, "kohya", tmp_path / "wide-kohya.safetensors")
    names = set(safetensors.torch.load_file(kohya_file))
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in names
    assert "lora_unet_single_blocks_0_linear2.lora_up.weight" in names
    _assert_same_image(_render(flux_width_pipe, kohya_file), original)


# ---------------------------------------------------------------- the real FLUX.1-dev architecture (meta device)

def _flux_dev_targets() -> dict[str, tuple[int, int]]:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX1.transformer_config)
    pattern = re.compile(FLUX1.lora_target_modules)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name)}


def _lora_state(targets, rank: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fan_in, fan_out) in targets.items():
        if device == "meta":
            a, b = torch.empty(rank, fan_in, device="meta"), torch.empty(fan_out, rank, device="meta")
        else:
            a, b = torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen)
        state[f"transformer.{name}.lora_A.weight"] = a
        state[f"transformer.{name}.lora_B.weight"] = b
    return state


def _golden_lines() -> list[str]:
    from trainer.review.export import lora_from_state_dict

    kohya = to_kohya(lora_from_state_dict(_lora_state(_flux_dev_targets(), GOLDEN_RANK, "meta")))
    return [f"{key} {list(value.shape)}" for key, value in sorted(kohya.items())]


def test_kohya_keys_for_flux_dev_match_the_golden_list():
    lines = _golden_lines()
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("\n".join(lines) + "\n")
    golden = GOLDEN.read_text().splitlines()
    assert lines == golden
    # Sanity of the golden list itself: 19 double and 38 single blocks, the fused shapes of the original model.
    assert sum(1 for line in golden if line.endswith("img_attn_qkv.alpha []")) == 19
    assert sum(1 for line in golden if line.endswith("linear1.alpha []")) == 38
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight [9216, 12]" in golden
    assert "lora_unet_single_blocks_37_linear1.lora_up.weight [21504, 16]" in golden
    assert "lora_unet_single_blocks_37_linear2.lora_down.weight [4, 15360]" in golden
    assert not any("base_model" in line or "lora_A" in line or "transformer." in line for line in golden)


def test_diffusers_converter_maps_a_flux_dev_kohya_export_back_exactly():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from trainer.review.export import lora_from_state_dict

    original = _lora_state(_flux_dev_targets(), rank=1, device="cpu")
    kohya = to_kohya(lora_from_state_dict(original))
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    assert set(back) == set(original)  # every key consumed, none invented
    for key, value in original.items():
        assert torch.equal(back[key], value), key


# ---------------------------------------------------------------- files: names, metadata, errors

def test_exports_have_no_peft_prefix_and_carry_training_facts_but_no_token(tiny_pipe, tmp_path, monkeypatch):
    secret = "hf_" + "S" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    checkpoint = _random_checkpoint(tiny_pipe.transformer, tmp_path / "c.safetensors", 4, 4.0, seed=1)
    # A peft-saved file with leaked prefixes reads the same.
    peft_style = {k.replace("transformer.", "base_model.model.", 1): v
                  for k, v in safetensors.torch.load_file(checkpoint).items()}
    safetensors.torch.save_file(peft_style, tmp_path / "peft.safetensors")
    assert read_lora(tmp_path / "peft.safetensors").modules == read_lora(checkpoint).modules
    for fmt in ("kohya", "diffusers"):
        for source in (checkpoint, tmp_path / "peft.safetensors"):
            out = export_lora(source, fmt, tmp_path / f"{source.stem}-{fmt}.safetensors")
            assert secret.encode() not in out.read_bytes()
            keys = list(safetensors.torch.load_file(out))
            assert not any(k.startswith("base_model") or ".base_model." in k for k in keys)
            if fmt == "kohya":
                assert all(k.startswith("lora_unet_") for k in keys)
                assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
            else:
                assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
        with safetensors.safe_open(str(tmp_path / f"c-{fmt}.safetensors"), "pt") as f:
            meta = f.metadata()
        for key, value in {"base_model": "tiny-demo", "rank": "4", "alpha": "4.0", "steps": "250",
                           "resolution": "512", "trigger_word": "ohwx", "caption": "a photo of ohwx"}.items():
            assert meta[key] == value, key
        assert "hf_token" not in meta and not any(v.startswith("hf_") for v in meta.values())
        if fmt == "kohya":
            assert "lora_adapter_metadata" not in meta  # diffusers would apply it to the converted keys
            assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "flux1"
        else:
            adapter = json.loads(meta["lora_adapter_metadata"])
            assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 4.0


def test_kohya_fuses_qkv_block_diagonally(tiny_pipe, tmp_path):
    checkpoint = _random_checkpoint(tiny_pipe.transformer, tmp_path / "c.safetensors", 4, 4.0, seed=2)
    lora = read_lora(checkpoint)
    kohya = to_kohya(lora)
    down = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    up = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 12.0  # alpha / rank kept at 4 / 4
    fused_delta = up @ down * (12.0 / down.shape[0])
    parts = [lora.b[f"transformer_blocks.0.attn.to_{p}"] @ lora.a[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv"]
    assert torch.allclose(fused_delta, torch.cat(parts), atol=1e-6)


def test_export_cli(tiny_pipe, tmp_path, capsys):
    checkpoint = _random_checkpoint(tiny_pipe.transformer, tmp_path / "lora-000010.safetensors", 4, 4.0, seed=1)
    out = tmp_path / "exported.safetensors"
    assert cli.main(["export", str(checkpoint), "--format", "kohya", "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in safetensors.torch.load_file(out))

    assert cli.main(["export", str(tmp_path / "missing.safetensors"), "--format", "kohya",
                     "--output", str(out)]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    # Exporting a kohya file again is refused with a sentence, not a traceback.
    assert cli.main(["export", str(out), "--format", "diffusers", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "kohya layout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", str(checkpoint), "--format", "ckpt", "--output", str(out)])


def test_partial_fused_group_is_refused_for_kohya(tmp_path):
    from trainer.review.export import lora_from_state_dict

    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(UserError, match="fuses them"):
        to_kohya(lora_from_state_dict(state))


def test_export_refuses_files_that_are_not_sane_lora_safetensors(tmp_path):
    """A path from the user goes through trainer.model.weights: no pickles, no oversized headers, LoRA keys only."""
    import struct

    from trainer.errors import UserError
    from trainer.review.export import read_lora

    pickle_file = tmp_path / "model.safetensors"
    pickle_file.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle renamed .safetensors
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    not_lora = tmp_path / "base.safetensors"
    safetensors.torch.save_file({"transformer.proj_out.weight": torch.zeros(2, 2)}, not_lora)
    for bad, expected in ((pickle_file, r"safetensors|damaged|header"), (huge_header, r"header"),
                          (not_lora, r"not a Flux LoRA")):
        with pytest.raises(UserError, match=expected):
            read_lora(bad)
