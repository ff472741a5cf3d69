"""Previews drawn by klein's distilled model while the LoRA trains on the base (trainer/training/preview_model.py).

The stand-in for FLUX.2-klein-4B is tiny-klein's folder with its transformer replaced by one of other random
weights and ``is_distilled`` set, in the real on-disk layout: the same text encoder, VAE and architecture, so the
LoRA fits both, and a different transformer, so an image tells which one drew it.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import subject_image
from tests.test_klein import klein_config
from trainer.errors import UserError
from trainer.events import CheckpointSaved, Failed, PreviewsRendered, Status
from trainer.families import FLUX2_KLEIN
from trainer.model.loading import resolve_model
from trainer.runs.folder import RunFolder
from trainer.training.job import run_training


@pytest.fixture(autouse=True)
def klein_in_data_dir(isolated_data_dir, tiny_klein_dir):
    (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory, tiny_klein_dir):
    from diffusers import Flux2Transformer2DModel

    folder = tmp_path_factory.mktemp("distilled") / "tiny-klein-distilled"
    shutil.copytree(tiny_klein_dir, folder)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(123)
    Flux2Transformer2DModel(**FLUX2_KLEIN.tiny_transformer_config).save_pretrained(folder / "transformer")
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "is_distilled": True}))
    return folder


def train(folder, **overrides):
    image, mask = subject_image()
    run = RunFolder.create_at(folder, klein_config(**overrides), image, mask)
    return run, list(run_training(run))


def render(folder, checkpoint=None, size=(48, 64), steps=4, guidance=1.0):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder)
    if checkpoint is not None:
        pipe.load_lora_weights(str(checkpoint))
    image = pipe(prompt="ohwx in the snow", width=size[0], height=size[1], num_inference_steps=steps, guidance_scale=guidance,
                 text_encoder_out_layers=(1, 2, 3), generator=torch.Generator().manual_seed(1)).images[0]
    return np.asarray(image, dtype=np.int16)


def test_previews_come_from_the_distilled_model_with_the_lora_as_trained(tmp_path, distilled_dir):
    run, events = train(tmp_path / "run", preview_model=str(distilled_dir))
    assert not [e for e in events if isinstance(e, Failed)]
    said = [e.message for e in events if isinstance(e, Status)]
    assert any("Previews render with tiny-klein-distilled (4 steps, guidance 1)" in m for m in said), said
    rounds = [e for e in events if isinstance(e, PreviewsRendered)]
    assert rounds and all(r.rendered_with.startswith("tiny-klein-distilled") for r in rounds)
    last = [e for e in events if isinstance(e, CheckpointSaved)][-1]
    preview = np.asarray(Image.open(rounds[-1].previews[0].path).convert("RGB"), dtype=np.int16)
    assert rounds[-1].step == last.step
    # What the user gets by loading that checkpoint into the distilled pipeline, at its own settings
    expected = render(distilled_dir, last.path)
    assert np.abs(preview - expected).max() <= 2, "the preview is not the distilled model with this checkpoint"
    # ... and neither the distilled model without the LoRA (4 tiny steps move it a little: more than the tolerance
    # above) nor the base model at the preview's settings
    assert np.abs(preview - render(distilled_dir)).max() > 2
    assert np.abs(preview - render(resolve_model("tiny-klein"), last.path)).max() > 10


def test_small_card_tiers_preview_on_the_base_model_and_say_why(tmp_path, distilled_dir):
    run, events = train(tmp_path / "run", preview_model=str(distilled_dir), memory_tier="16gb", steps=2)
    assert not [e for e in events if isinstance(e, Failed)]
    said = " ".join(e.message for e in events if isinstance(e, Status))
    assert "Previews render on the base model" in said and "'16gb'" in said
    assert all(r.rendered_with == "" for r in events if isinstance(r, PreviewsRendered))


def test_a_preview_model_of_another_family_or_shape_is_refused_by_name(tmp_path, distilled_dir, tiny_model_dir):
    _, events = train(tmp_path / "a", preview_model=str(tiny_model_dir))
    failed = [e for e in events if isinstance(e, Failed)]
    assert failed and "is FLUX.1" in failed[0].message and "same family" in failed[0].message
    assert not list((tmp_path / "a").glob("*.safetensors"))

    wider = tmp_path / "wider"
    shutil.copytree(distilled_dir, wider)
    config = wider / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_single_layers": 3}))
    _, events = train(tmp_path / "b", preview_model=str(wider))
    failed = [e for e in events if isinstance(e, Failed)]
    assert failed and "num_single_layers" in failed[0].message


def test_flux1_has_no_distilled_preview_model(tmp_path, distilled_dir):
    with pytest.raises(UserError):
        resolve_model(str(tmp_path / "nowhere"))
    image, mask = subject_image()
    cfg = klein_config(model="tiny-demo", preview_model=str(distilled_dir))
    run = RunFolder.create_at(tmp_path / "run", cfg, image, mask)
    failed = [e for e in run_training(run) if isinstance(e, Failed)]
    assert failed and "FLUX.1" in failed[0].message and "no distilled model" in failed[0].message


def test_try_it_and_compare_render_with_the_model_that_drew_the_previews(tmp_path, distilled_dir):
    """A run previewed by the distilled model opens in Try it / Compare rendering with it, at its own settings, and
    gives back the preview image; the base model stays one choice away."""
    from trainer.review.inference import InferenceService
    from trainer.runs.store import owner_folder_name
    from ui.compare_grids import stream_grid
    from ui.compare_tab import on_run_selected
    from ui.tryit_tab import generate, run_defaults

    owner, name = "owner-1", "20260101-000000-lora-0000abcd"
    runs_root = tmp_path / "runs"
    run, events = train(runs_root / owner_folder_name(owner) / name, preview_model=str(distilled_dir))
    defaults = run_defaults(runs_root, owner, name)
    assert defaults["render_with"]["value"] == str(distilled_dir)
    assert [spec for _, spec in defaults["render_with"]["choices"]] == ["", str(distilled_dir),
                                                                        FLUX2_KLEIN.distilled_hub_id]
    assert (defaults["steps"], defaults["guidance"]) == (4, 1.0)
    last = [e for e in events if isinstance(e, PreviewsRendered)][-1]
    service = InferenceService()
    lora, plain, _ = generate(service, runs_root, owner, name, last.step, 1.0, "[trigger] in the snow", 1, 48, 64,
                              4, 1.0, str(distilled_dir))
    preview = np.asarray(Image.open(last.previews[0].path).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(lora, dtype=np.int16) - preview).max() <= 2
    assert np.abs(np.asarray(plain, dtype=np.int16) - render(distilled_dir)).max() <= 2  # the distilled model alone
    base_lora, _, _ = generate(service, runs_root, owner, name, last.step, 1.0, "[trigger] in the snow", 1, 48, 64,
                               4, 1.0, "")
    assert np.abs(np.asarray(base_lora, dtype=np.int16) - preview).max() > 10  # the base model draws otherwise

    shown = on_run_selected(runs_root, owner, name)
    assert shown["render_with"]["value"] == str(distilled_dir) and shown["sample_steps"] == 4
    *_, final = stream_grid(service, runs_root, owner, name, ([last.step], "1", "1.0", "[trigger] in the snow", 48,
                                                              64, 4), render_with=str(distilled_dir))
    assert final[-1].render_with == str(distilled_dir)
    cell = final[-1].grids.cell(0, 0, 1)
    assert (cell["steps"], cell["guidance"]) == (4, 1.0)
    with pytest.raises(UserError, match="is FLUX.1"):
        generate(service, runs_root, owner, name, last.step, 1.0, "x", 1, 48, 64, 4, 1.0,
                 str(resolve_model("tiny-demo")))
    service.close()
