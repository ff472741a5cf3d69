"""The training API on the tiny model: events, checkpoints, what changes, determinism, loading in diffusers."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from tests.conftest import subject_image
from trainer.config import load_preset
from trainer.training.encode import encode_example, encode_prompts, free_encoders
from trainer.dataset.prepare import prepare_image
from trainer.events import CheckpointSaved, Failed, Finished, Placed, PreviewsRendered, Progress, Started, Status
from trainer.training.loop import train_lora
from trainer.model.loading import load_parts, resolve_model
from trainer.runs.folder import RunFolder
from trainer.training.previews import PreviewRenderer
from trainer.training.job import run_training


def tiny_config(**overrides):
    settings = dict(steps=4, save_every=2, resolution=64, preview_steps=2, trigger="ohwx",
                    caption="a photo of [trigger], a red ball", sample_prompts=("[trigger] in the snow",),
                    model="tiny-demo")
    return load_preset("quick-test-250").config(**{**settings, **overrides})


def run_events(tmp_path, **overrides):
    image, mask = subject_image()
    run = RunFolder.create(tmp_path, tiny_config(**overrides), image, mask)
    return run, list(run_training(run))


def test_events_arrive_in_order_with_finite_loss_and_expected_checkpoints(tmp_path):
    run, events = run_events(tmp_path)
    kinds = [type(e) for e in events]
    assert kinds[0] is Status
    started = kinds.index(Started)
    assert kinds[:started].count(Placed) == 1  # where it runs, once the model is resolved and the tier chosen
    assert all(k is Status for k in kinds[:started] if k is not Placed)
    assert kinds[-1] is Finished and not events[-1].stopped and events[-1].last_step == 4
    assert Failed not in kinds

    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert all(math.isfinite(p.loss) and p.loss > 0 for p in progress)

    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [e.step for e in saved] == [2, 4]
    assert [e.path.name for e in saved] == ["lora-000002.safetensors", "lora-000004.safetensors"]
    for e in saved:
        assert e.path.stat().st_size == e.size_bytes
        # previews come right after their checkpoint, labelled with its step
        after = events[events.index(e) + 1:]
        rendered = next(x for x in after if isinstance(x, PreviewsRendered))
        assert rendered.step == e.step

    previews = [e for e in events if isinstance(e, PreviewsRendered)]
    assert [e.step for e in previews] == [0, 2, 4]  # step 0 = the base model
    for e in previews:
        assert [p.prompt for p in e.previews] == ["a photo of ohwx, a red ball", "ohwx in the snow"]
        assert all(p.path.is_file() for p in e.previews)

    manifest = RunFolder.open(run.path)
    assert manifest.status == "finished"
    assert [c["step"] for c in manifest.checkpoints] == [2, 4]
    assert all(len(c["previews"]) == 2 for c in manifest.checkpoints)
    assert manifest.model == "tiny-demo" and manifest.model_path.endswith("tiny-demo")


def test_saved_keys_are_transformer_lora_keys_with_rank_in_metadata(tmp_path):
    run, events = run_events(tmp_path, rank=8)
    path = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    tensors = safetensors.torch.load_file(path)
    assert tensors, "empty checkpoint"
    for key, value in tensors.items():
        assert key.startswith("transformer.") and ("lora_A" in key or "lora_B" in key), key
        assert "base_model.model" not in key
        assert 8 in value.shape
    # the final output layer must not be adapted, the single blocks' output projection must be
    assert not any(k.startswith("transformer.proj_out.") for k in tensors)
    assert any(k.startswith("transformer.single_transformer_blocks.0.proj_out.") for k in tensors)
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["rank"] == "8" and meta["alpha"] == "8.0" and meta["trigger_word"] == "ohwx"
    assert '"transformer.r": 8' in meta["lora_adapter_metadata"]


def _prepared(tmp_path, cfg):
    image, mask = subject_image()
    run = RunFolder.create(tmp_path, cfg, image, mask)
    parts = load_parts(resolve_model("tiny-demo"))
    train_image = prepare_image(image, mask, cfg.resolution)
    run.train_size = train_image.size
    prompts = encode_prompts(parts, cfg.preview_prompts, cfg.max_text_tokens)
    example = encode_example(parts, train_image, cfg.training_caption, prompts, True, 0.0)
    free_encoders(parts)
    return run, parts, example, PreviewRenderer(parts, prompts)


def test_only_lora_parameters_change(tmp_path):
    cfg = tiny_config(preview_at_start=False)
    run, parts, example, renderer = _prepared(tmp_path, cfg)
    before = {n: p.detach().clone() for n, p in parts.transformer.named_parameters()}
    list(train_lora(parts, example, cfg, run, renderer, lambda: False))
    after = dict(parts.transformer.named_parameters())
    lora_changed = 0
    for name, param in after.items():
        if ".lora_" in name:
            lora_changed += int(name.endswith("lora_B.default.weight") and param.abs().sum() > 0)
            continue
        base_name = name.replace(".base_layer", "")
        assert torch.equal(param, before.get(name, before.get(base_name))), f"base weight {name} changed"
    assert lora_changed > 0, "no LoRA weight was trained"


def test_same_seed_gives_identical_lora_on_cpu(tmp_path):
    _, first = run_events(tmp_path / "a")
    _, second = run_events(tmp_path / "b")
    _, other = run_events(tmp_path / "c", seed=7)
    load = lambda events: safetensors.torch.load_file([e for e in events if isinstance(e, CheckpointSaved)][-1].path)
    a, b, c = load(first), load(second), load(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_stop_ends_within_one_step_and_keeps_checkpoints(tmp_path):
    image, mask = subject_image()
    run = RunFolder.create(tmp_path, tiny_config(steps=50, save_every=2, preview_at_start=False), image, mask)
    events = []
    for event in run_training(run, should_stop=lambda: any(isinstance(e, CheckpointSaved) for e in events)):
        events.append(event)
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.stopped
    assert finished.last_step == 2  # stopped at the first check after the step-2 save
    assert run.checkpoint_path(2).is_file()
    assert RunFolder.open(run.path).status == "stopped"


def test_checkpoint_loads_in_diffusers_and_changes_its_output(tmp_path):
    from diffusers import FluxPipeline

    run, events = run_events(tmp_path, steps=6, save_every=6, learning_rate=5e-2)
    ckpt = [e for e in events if isinstance(e, CheckpointSaved)][-1].path
    pipe = FluxPipeline.from_pretrained(resolve_model("tiny-demo"))
    pipe.set_progress_bar_config(disable=True)
    generate = lambda: pipe("a photo of ohwx", height=64, width=64, num_inference_steps=2, output_type="np",
                            generator=torch.Generator().manual_seed(0)).images[0]
    base = generate()
    pipe.load_lora_weights(ckpt)
    assert pipe.transformer.peft_config, "no adapter was loaded"
    with_lora = generate()
    assert abs(base - with_lora).mean() > 1e-4, "the LoRA had no effect on the output"
    pipe.unload_lora_weights()
    assert abs(base - generate()).max() < 1e-5


def test_failure_is_an_event_with_a_message_not_an_exception(tmp_path):
    run, events = run_events(tmp_path, model=str(tmp_path / "no-such-folder"))
    assert isinstance(events[-1], Failed) and events[-1].kind == "user"
    assert "neither an existing folder nor a Hugging Face id" in events[-1].message
    assert RunFolder.open(run.path).status == "failed"


def test_masked_run_weights_the_background_out(tmp_path):
    cfg = tiny_config()
    _, parts, example, _ = _prepared(tmp_path, cfg)
    w = example.weights[0, 0]
    assert w.min() == 0.0 and w.max() == 1.0
    h, wd = w.shape
    assert w[0, 0] == 0.0 and w[h // 2, wd // 2] == 1.0  # corner = background, centre = subject


def test_freeing_the_encoders_keeps_the_preview_pipeline_on_the_training_device(tmp_path):
    """diffusers derives a pipeline's device from the VAE's first parameter (the encoder's): once the encoder is
    freed, that must still be the training device, or previews silently run on another device."""
    from trainer.training.previews import PreviewRenderer

    cfg = tiny_config()
    _, parts, _, renderer = _prepared(tmp_path, cfg)  # _prepared frees the encoders
    assert parts.vae.encoder is None and parts.text_encoder is None and parts.text_encoder_2 is None
    first_param = next(parts.vae.parameters())
    assert first_param.device == parts.device
    assert renderer._pipe.device == parts.device


def test_a_preview_round_rendered_as_one_batch_matches_one_image_renders(tmp_path):
    """Each image of the batch starts from its own generator seeded with the preview seed: the same noise as a
    one-image render of its prompt, so batching changes no preview (a shared generator would)."""
    import numpy as np

    cfg = tiny_config(sample_prompts=("[trigger] in the snow", "[trigger] on a beach"))
    run, parts, example, renderer = _prepared(tmp_path, cfg)
    w, h = run.train_size
    prompts = list(cfg.preview_prompts)
    batch = renderer.render_batch(prompts, 7, w, h, 2, 3.5)
    singles = [renderer.render(p, 7, w, h, 2, 3.5) for p in prompts]
    assert len(batch) == len(prompts) == 3
    for one, many in zip(singles, batch):
        diff = np.abs(np.asarray(one, dtype=np.int16) - np.asarray(many, dtype=np.int16))
        assert diff.max() <= 2, diff.max()  # uint8 rounding of float32 batched arithmetic
    assert np.asarray(batch[0]).tobytes() != np.asarray(batch[1]).tobytes(), "different prompts gave one image"
    assert renderer.render_batch(prompts, 7, w, h, 2, 3.5, should_stop=lambda: True) is None


def test_lean_previews_render_a_round_one_image_at_a_time(tmp_path):
    """A small-card tier (``lean_previews``) renders a round image by image: the transformer never sees a batch
    larger than one, and the round is exactly the one-image renders. Otherwise the round is one batch."""
    import numpy as np

    cfg = tiny_config(sample_prompts=("[trigger] in the snow", "[trigger] on a beach"))
    run, parts, example, renderer = _prepared(tmp_path, cfg)
    w, h = run.train_size
    prompts = list(cfg.preview_prompts)
    batch_sizes = []
    hook = parts.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        assert len(renderer.render_round(prompts, 7, w, h, 2, 3.5)) == 3
        assert set(batch_sizes) == {3}
        batch_sizes.clear()
        parts.lean_previews = True
        lean = renderer.render_round(prompts, 7, w, h, 2, 3.5)
        assert set(batch_sizes) == {1}
    finally:
        hook.remove()
    singles = [renderer.render(p, 7, w, h, 2, 3.5) for p in prompts]
    assert [np.asarray(i).tobytes() for i in lean] == [np.asarray(i).tobytes() for i in singles]
    assert renderer.render_round(prompts, 7, w, h, 2, 3.5, should_stop=lambda: True) is None


def test_speed_and_eta_come_from_the_typical_step_not_one_off_slow_ones():
    # On a GPU the first step compiles (~30 s) and a later one captures CUDA graphs; the steady step is ~0.12 s.
    from trainer.training.loop import StepTimer

    timer = StepTimer()
    rates = [timer.add(s) for s in [28.0, 0.12, 0.12, 0.12, 6.0] + [0.12] * 10]
    assert rates[0] == pytest.approx(1 / 28.0)
    assert rates[-1] == pytest.approx(1 / 0.12)  # a mean would say 0.36 it/s: an ETA 23x too long
    assert all(r == pytest.approx(1 / 0.12) for r in rates[5:])


def test_a_compiled_run_says_so_before_its_slow_first_step(tmp_path, monkeypatch):
    # Compilation only happens on a CUDA GPU; here accelerate_transformer is made to report it did, to check that
    # the page and the CLI are told why the first step takes a minute.
    import trainer.training.loop

    monkeypatch.setattr(trainer.training.loop, "accelerate_transformer", lambda *args, **kwargs: True)
    _, events = run_events(tmp_path, steps=2, save_every=2)
    first_progress = next(i for i, e in enumerate(events) if isinstance(e, Progress))
    notes = [e.message for e in events[:first_progress] if isinstance(e, Status) and "Compiling" in e.message]
    assert notes == ["Compiling the model for this GPU (PyTorch's default attention): the first training step and "
                     "the first previews take up to a minute or two each; the compiled code is cached on disk for "
                     "later jobs"]
    assert isinstance(events[-1], Finished) and not events[-1].stopped
