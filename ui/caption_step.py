"""Step 3's auto-caption: Florence-2 (``trainer/dataset/caption.py``) writes a detailed caption — everything in the
picture, as the practitioners ask — for the image being edited, or for every image of the set, with ``[trigger]``
where the subject is named. The user edits the result; nothing is trained on a caption they have not seen.

The model downloads on first use (about 0.5 GB for base); offline, the message says how to get it. It is freed
before any training job starts (the job manager does it).
"""
from __future__ import annotations

from typing import Callable

import gradio as gr

from trainer import api
from trainer.errors import UserError
from ui import image_set
from ui.image_set import ImageSet
from ui.set_step import strip_value
from ui.session import user_errors

DEFAULT_TRIGGER = "ohwx"  # the trigger box's start
NOTE = ("Florence-2 writes a detailed caption and puts [trigger] where it names the subject: read it, move [trigger] "
        "if needed, and delete what should not be learned as part of the subject. First use downloads the model.")


def caption_current(dataset, model: str, progress: Callable[[float, str], None] = lambda f, m: None) -> str:
    """A caption for the image being edited."""
    if dataset is None:
        raise UserError("Upload an image first (step 1), then ask for its caption.")
    return api.caption_images([dataset.image], model=model or api.DEFAULT_CAPTION_MODEL, progress=progress)[0]


def caption_every(images: ImageSet | None, dataset, caption: str, model: str,
                  progress: Callable[[float, str], None] = lambda f, m: None) -> tuple[str, ImageSet]:
    """Captions for every image of the set (the edited one's into the caption box); a single image: just it."""
    images = image_set.save_live(images, dataset, caption)
    if not images.items:
        return caption_current(dataset, model, progress), images
    texts = api.caption_images([item.dataset.image for item in images.items],
                               model=model or api.DEFAULT_CAPTION_MODEL, progress=progress)
    for index, text in enumerate(texts):
        images = image_set.with_caption(images, index, text)
    return texts[images.current], images


def length_note(caption: str, trigger: str, model: str, preset: str | None) -> str:
    """How many tokens the caption is (the trigger word in it) for the model's text encoders, and, when it is longer
    than one reads, that the rest is ignored (``api.caption_length``; the CLI says the same)."""
    text = (caption or "").strip()
    if not text:
        return ""
    try:
        max_tokens = api.load_preset(preset).config().max_text_tokens if preset else None
    except UserError:
        max_tokens = None
    length = api.caption_length(api.TrainingConfig(trigger=(trigger or "").strip()).with_trigger(text),
                                (model or api.default_model()).strip(), max_tokens)
    return "  \n".join([length.summary(), *(f"⚠️ {w}" for w in length.warnings())])


def connect_length(note, caption_box, trigger, model, preset) -> None:
    """The caption's length follows the caption, the trigger word, the model and the preset."""
    for box in (caption_box, trigger, model, preset):
        box.change(length_note, [caption_box, trigger, model, preset], note, api_name=False, trigger_mode="always_last")


def build(caption_box, set_state, dataset_state, strip, set_info, model0: str, preset0: str):
    """The caption's length and the buttons under the caption box, wired; returns the length's Markdown (wired to
    the trigger, model and preset by ``connect_length`` once they exist; ``model0``/``preset0``: theirs at start)."""
    note = gr.Markdown(length_note(caption_box.value, DEFAULT_TRIGGER, model0, preset0), elem_id="caption-length")
    with gr.Row():
        model = gr.Dropdown(choices=list(api.CAPTION_MODELS), value=api.DEFAULT_CAPTION_MODEL,
                            allow_custom_value=True, label="Caption model", elem_id="caption-model", scale=2)
        one = gr.Button("Write the caption for this image", elem_id="caption-one", scale=1)
        every = gr.Button("Caption all images", elem_id="caption-all", scale=1)
    gr.Markdown(NOTE)

    @user_errors
    def on_one(dataset, model_, progress=gr.Progress()):
        return caption_current(dataset, model_, lambda f, m: progress(f, desc=m))

    @user_errors
    def on_every(images, dataset, caption, model_, progress=gr.Progress()):
        text, images = caption_every(images, dataset, caption, model_, lambda f, m: progress(f, desc=m))
        return text, images, strip_value(images), image_set.set_summary(images)

    one.click(on_one, [dataset_state, model], caption_box, api_name="auto_caption", concurrency_limit=1)
    every.click(on_every, [set_state, dataset_state, caption_box, model], [caption_box, set_state, strip, set_info],
                api_name="auto_caption_all", concurrency_limit=1)
    return note
