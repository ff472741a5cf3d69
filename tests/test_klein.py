"""FLUX.2 [klein] as a second model family, on ``tiny-klein`` (built in code in the real on-disk layout, random weights).

The same flow as FLUX.1: a run trains end to end with finite losses, saves klein transformer LoRA keys that load in
diffusers' own ``Flux2KleinPipeline`` and change its output, resumes bit-identically, exports in the diffusers layout
and in the original-name layout (ComfyUI's and diffusers' FLUX.2 converter) rendering the same image, and a LoRA of
one family offered to the other says which family it is for. The full-size 4B architecture is checked on the meta
device: its LoRA targets and the exported key list.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import subject_image
from trainer.config import load_preset
from trainer.errors import UserError
from trainer.events import CheckpointSaved, Failed, Finished, Placed, PreviewsRendered, Progress
from trainer.families import FLUX1, FLUX2_KLEIN, family_of_folder, family_of_spec
from trainer.model.loading import load_parts, resolve_model
from trainer.review.export import export_lora
from trainer.runs import state
from trainer.runs.folder import RunFolder
from trainer.training.job import run_training


@pytest.fixture(autouse=True)
def klein_in_data_dir(isolated_data_dir, tiny_klein_dir):
    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)


def klein_config(**overrides):
    settings = dict(steps=4, save_every=2, resolution=64, preview_steps=2, trigger="ohwx",
                    caption="a photo of [trigger], a red ball", sample_prompts=("[trigger] in the snow",),
                    model="tiny-klein", learning_rate=2e-2)  # large: 4 steps must visibly move the tiny model
    return load_preset("quick-test-250").config(**{**settings, **overrides})


def train(folder: Path, **overrides):
    image, mask = subject_image()
    run = RunFolder.create_at(folder, klein_config(**overrides), image, mask)
    return run, list(run_training(run))


@pytest.fixture(scope="module")
def klein_run(tmp_path_factory, tiny_klein_dir):
    from trainer import runtime

    data = tmp_path_factory.mktemp("kdata")
    (data / "models").mkdir()
    (data / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    with runtime.using(runtime.Runtime.from_environment({"ONE_IMAGE_LORA_DATA_DIR": str(data)})):
        return train(tmp_path_factory.mktemp("klein") / "run")


def test_the_family_is_told_from_the_spec_and_the_folder(tiny_klein_dir):
    assert family_of_spec("tiny-klein") is FLUX2_KLEIN and family_of_spec("tiny-demo") is FLUX1
    assert family_of_spec("black-forest-labs/FLUX.2-klein-base-4B") is FLUX2_KLEIN
    assert family_of_folder(tiny_klein_dir) is FLUX2_KLEIN
    assert json.loads((tiny_klein_dir / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    parts = load_parts(resolve_model("tiny-klein"))
    assert parts.family is FLUX2_KLEIN and parts.text_encoder_2 is None and parts.is_tiny_demo


def test_an_unknown_pipeline_folder_says_what_it_is(tmp_path, tiny_klein_dir):
    shutil.copytree(tiny_klein_dir, tmp_path / "m")
    index = tmp_path / "m" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionPipeline.*FLUX.1.*FLUX.2"):
        resolve_model(str(tmp_path / "m"))
    shutil.rmtree(tmp_path / "m" / "text_encoder")
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "Flux2KleinPipeline"}))
    with pytest.raises(UserError, match="missing text_encoder. A FLUX.2 \\[klein\\] model needs"):
        resolve_model(str(tmp_path / "m"))


def test_a_klein_run_trains_end_to_end_with_finite_losses_and_previews(klein_run):
    run, events = klein_run
    assert not [e for e in events if isinstance(e, Failed)], events[-1]
    assert isinstance(events[-1], Finished) and not events[-1].stopped and events[-1].last_step == 4
    losses = [e.loss for e in events if isinstance(e, Progress)]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    assert [e.step for e in events if isinstance(e, PreviewsRendered)] == [0, 2, 4]
    (placed,) = [e for e in events if isinstance(e, Placed)]
    assert Path(placed.model_path).name == "tiny-klein"
    assert RunFolder.open(run.path).status == "finished"


def test_klein_checkpoints_hold_klein_lora_keys_and_say_their_family(klein_run):
    _, events = klein_run
    path = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    tensors = safetensors.torch.load_file(path)
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors}
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in modules
    assert "transformer_blocks.0.ff.linear_in" in modules and "transformer_blocks.1.attn.add_q_proj" in modules
    assert not any(m.startswith(("proj_out", "x_embedder", "context_embedder")) for m in modules)
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["family"] == "flux2-klein"


def test_only_the_lora_changes_and_it_loads_in_diffusers_klein_pipeline(klein_run):
    from diffusers import Flux2KleinPipeline

    _, events = klein_run
    checkpoint = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    folder = resolve_model("tiny-klein")
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def render():
        return pipe(prompt="a photo of ohwx", height=64, width=48, num_inference_steps=2, guidance_scale=1.0,
                    max_sequence_length=64, text_encoder_out_layers=(1, 2, 3),
                    generator=torch.Generator().manual_seed(1), output_type="pt").images[0]

    base = render()
    pipe.load_lora_weights(str(checkpoint), adapter_name="trained")
    with_lora = render()
    assert (with_lora - base).abs().max() > 1e-3, "the trained LoRA had no effect in diffusers"
    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base weights were never touched
    assert torch.allclose(render(), base)


def test_exports_render_the_checkpoints_image_in_diffusers(klein_run, tmp_path):
    from diffusers import Flux2KleinPipeline

    _, events = klein_run
    checkpoint = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    pipe = Flux2KleinPipeline.from_pretrained(resolve_model("tiny-klein"))

    def render(lora: Path):
        pipe.load_lora_weights(str(lora), adapter_name="x")
        try:
            return pipe(prompt="ohwx", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                        max_sequence_length=32, text_encoder_out_layers=(1, 2, 3),
                        generator=torch.Generator().manual_seed(3), output_type="pt").images[0]
        finally:
            pipe.unload_lora_weights()

    original = render(checkpoint)
    original_layout = export_lora(checkpoint, "kohya", tmp_path / "klein-comfyui.safetensors")
    keys = safetensors.torch.load_file(original_layout)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
    assert "diffusion_model.single_blocks.1.linear1.lora_B.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)  # diffusers' FLUX.2 converter refuses alpha keys
    # diffusers' own converter maps every key back (it raises on any key it leaves over)
    converted = Flux2KleinPipeline.lora_state_dict(str(original_layout))
    assert {k for k in converted if k.startswith("transformer.")}
    assert torch.allclose(render(original_layout), original, atol=1e-5)
    diffusers_layout = export_lora(checkpoint, "diffusers", tmp_path / "klein-diffusers.safetensors")
    assert torch.allclose(render(diffusers_layout), original, atol=1e-5)


def test_klein_resume_is_bit_identical(klein_run, tmp_path):
    run, _ = klein_run
    shutil.copytree(run.path, tmp_path / "run")
    copy = RunFolder.open(tmp_path / "run")
    copy.set_status("running")
    for step in (4,):
        copy.checkpoint_path(step).unlink()
        for f in state.state_files(copy.path, step):
            f.unlink()
    events = list(run_training(RunFolder.open(copy.path), resume=True))
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert [e.step for e in events if isinstance(e, Progress)] == [3, 4]
    a = safetensors.torch.load_file(run.checkpoint_path(4))
    b = safetensors.torch.load_file(copy.checkpoint_path(4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_of_the_other_family_says_which_family_it_is_for(klein_run, tmp_path):
    from trainer.review.inference import LoraPipeline

    _, events = klein_run
    klein_lora = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    engine = LoraPipeline.load(resolve_model("tiny-demo"))
    with pytest.raises(UserError, match="trained on FLUX.2 \\[klein\\].*FLUX.1 \\[dev\\]"):
        engine.adapter_for(klein_lora)


def test_the_full_size_klein_lora_targets_every_block_projection():
    import re

    model = FLUX2_KLEIN.meta_transformer()
    assert 3.8e9 < sum(p.numel() for p in model.parameters()) < 3.95e9  # klein 4B
    pattern = re.compile(FLUX2_KLEIN.lora_target_modules)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    assert len(targets) == 5 * 12 + 20 * 2  # 12 projections per double block, 2 fused ones per single block
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in targets)
    # every target has a name in the original layout, so the ComfyUI export covers the whole LoRA
    from trainer.review.export import kohya_groups

    groups = kohya_groups(targets, FLUX2_KLEIN.kohya)
    assert sorted(m for parts in groups.values() for m in parts) == sorted(targets)
    assert "diffusion_model.double_blocks.4.txt_mlp.2" in groups and "diffusion_model.single_blocks.19.linear2" in groups


def test_klein_has_its_own_memory_tiers():
    from trainer.model.tiers import choose_tier

    def tier(gib, family):
        return choose_tier("auto", torch.device("cpu"), gpu=("card", gib), family=family).tier

    # a third of FLUX.1's size: klein keeps bf16 weights on the 24 and 16 GB cards where FLUX.1 needs fp8
    assert (tier(23.6, FLUX2_KLEIN).weights, tier(23.6, FLUX1).weights) == ("bf16", "fp8")
    assert tier(15.6, FLUX2_KLEIN).weights == "bf16" and tier(15.6, FLUX2_KLEIN).gradient_checkpointing
    assert tier(11.6, FLUX2_KLEIN).weights == "fp8" and tier(11.6, FLUX1).weights == "nf4"
    with pytest.raises(UserError, match="FLUX.2 \\[klein\\] needs a GPU with at least 12 GB"):
        tier(7.5, FLUX2_KLEIN)
