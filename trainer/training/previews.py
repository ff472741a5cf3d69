"""Render preview images with the transformer already in memory, LoRA active, from cached embeddings.

No reload and no text encoders: the prompts were encoded once before training. The same seed is used for
every checkpoint so the previews of one prompt differ only by what the LoRA learned. With a preview model
(``trainer.training.preview_model``: klein's distilled model) the images come from it, the training LoRA's
weights copied in first, at its own steps and guidance.
"""
from __future__ import annotations

import dataclasses

from typing import Callable

import torch
from PIL import Image

from trainer.training.encode import PromptEmbedding
from trainer.training.accel.graphs import preview_autocast


class PreviewRenderer:
    def __init__(self, parts, prompts: dict[str, PromptEmbedding], preview_model=None):
        self._prompts = prompts
        # A pipeline of the parts already loaded: no text encoders (embeddings are cached), same transformer.
        self._family = parts.family
        self._training_transformer = parts.transformer
        self._preview_model = preview_model
        if preview_model is not None:
            parts_for_pipe = dataclasses.replace(parts, transformer=preview_model.transformer)
        else:
            parts_for_pipe = parts
        self._pipe = self._family.pipeline_for(parts_for_pipe, text_encoders=False)
        self._parts = parts
        self._device = parts.device
        self._dtype = parts.dtype

    @property
    def rendered_with(self) -> str:
        """Which preview model draws the previews ("" when it is the base model being trained)."""
        return self._preview_model.label if self._preview_model is not None else ""

    def render(self, prompt: str, seed: int, width: int, height: int, steps: int, guidance: float,
               should_stop: Callable[[], bool] = lambda: False) -> Image.Image | None:
        """One image; ``None`` when ``should_stop`` turned true while it was being denoised."""
        images = self.render_batch([prompt], seed, width, height, steps, guidance, should_stop)
        return None if images is None else images[0]

    def render_round(self, prompts: list[str], seed: int, width: int, height: int, steps: int, guidance: float,
                     should_stop: Callable[[], bool] = lambda: False) -> list[Image.Image] | None:
        """A checkpoint's previews: one batch, or one image at a time where the memory tier asks for lean previews
        (read at render time: the tier is applied to the parts after this renderer may have been built)."""
        if not getattr(self._parts, "lean_previews", False):
            return self.render_batch(prompts, seed, width, height, steps, guidance, should_stop)
        images = []
        for prompt in prompts:
            image = self.render(prompt, seed, width, height, steps, guidance, should_stop)
            if image is None:
                return None
            images.append(image)
        return images

    def render_batch(self, prompts: list[str], seed: int, width: int, height: int, steps: int, guidance: float,
                     should_stop: Callable[[], bool] = lambda: False) -> list[Image.Image] | None:
        """One image per prompt, denoised together as one batch; ``None`` if ``should_stop`` turned true meanwhile.

        Each image gets its own generator seeded with ``seed``, so it starts from the same noise as a one-image
        render of that prompt and differs from it only by batched arithmetic. A preview round is 3 images: one batch
        of 3 keeps the GPU busier than 3 batches of 1 (bench/RESULTS.md).
        """
        embeddings = [self._prompts[p] for p in prompts]
        stopped = False
        if self._preview_model is not None:  # its own sampler settings, the LoRA as trained so far
            steps, guidance = self._preview_model.steps, self._preview_model.guidance
            self._preview_model.sync_lora(self._training_transformer)

        def check_stop(pipe, step, timestep, callback_kwargs):
            nonlocal stopped
            if should_stop():
                stopped = True
                pipe._interrupt = True  # the pipeline's own early exit
            return callback_kwargs

        generators = [torch.Generator(device=self._device).manual_seed(seed) for _ in prompts]
        was_training = self._pipe.transformer.training
        self._pipe.transformer.eval()
        try:
            with preview_autocast(self._pipe.transformer, self._device, self._dtype):
                images = self._pipe(**self._family.pipeline_inputs(embeddings, guidance), width=width, height=height,
                                    num_inference_steps=steps, generator=generators,
                                    callback_on_step_end=check_stop).images
        finally:
            self._pipe.transformer.train(was_training)
            self._pipe._interrupt = False
        return None if stopped else list(images)
