"""Step 1's set controls on the page: the thumbnail strip, Add images, Remove, Move, and their API endpoints
(/add_images, /pick_image, /caption_image, /remove_image, /move_image). The set itself is ``ui.image_set``.

Every handler that changes which image is edited loads it into the editor (``Editor.load_outputs``): its dataset,
upload box, own mask, mask settings, painted-corrections editor (strokes baked), mask views and caption.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import gradio as gr

from trainer import api
from trainer.errors import UserError
from ui import dataset_step, image_set
from ui.image_set import ImageSet
from ui.session import user_errors

NO_IMAGE = "Upload one image. A transparent PNG's transparency is used as its mask."


@dataclass
class Editor:
    """The page's components that edit one image (from ui/app.py), and the set's."""
    set_state: Any
    dataset_state: Any
    preview: Any
    image_info: Any
    image_file: Any
    mask_file: Any
    use_mask: Any
    mask_model: Any
    threshold: Any
    softness: Any
    grow: Any
    editor: Any
    mask_full: Any
    mask_tokens: Any
    mask_info: Any
    caption: Any
    preset: Any
    background_weight: Any
    strip: Any = None
    set_info: Any = None

    @property
    def load_outputs(self) -> list:
        return [self.dataset_state, self.preview, self.image_info, self.image_file, self.mask_file, self.use_mask,
                self.mask_model, self.threshold, self.softness, self.grow, self.editor, self.mask_full,
                self.mask_tokens, self.mask_info, self.caption, self.set_state, self.strip, self.set_info]

    @property
    def live_inputs(self) -> list:
        return [self.set_state, self.dataset_state, self.caption, self.mask_file, self.use_mask, self.mask_model,
                self.threshold, self.softness, self.grow, self.editor, self.preset, self.background_weight]


def build_strip():
    """The strip and its buttons, placed under the upload. (strip, set info, add box, earlier, later, remove)."""
    strip = gr.Gallery(label="The set: pick an image to edit it (its mask and caption below)", columns=10, rows=1,
                       height=170, allow_preview=False, object_fit="contain", elem_id="image-strip")
    with gr.Row():
        add = gr.File(label=f"Add images (a set holds 1 to {api.MAX_IMAGES})", file_count="multiple",
                      file_types=[".png", ".jpg", ".jpeg", ".webp"], type="filepath", elem_id="add-images")
        with gr.Column():
            earlier = gr.Button("◀ Move earlier", size="sm", elem_id="move-earlier")
            later = gr.Button("Move later ▶", size="sm", elem_id="move-later")
            remove = gr.Button("Remove this image", size="sm", variant="stop", elem_id="remove-image")
    set_info = gr.Markdown(image_set.set_summary(None), elem_id="set-info")
    return strip, set_info, add, earlier, later, remove


def strip_value(images: ImageSet | None):
    images = images or ImageSet()
    return gr.update(value=image_set.thumbnails(images), selected_index=images.current if images.items else None)


def refresh(images: ImageSet | None):
    """(strip, set info) for the set as it is."""
    return strip_value(images), image_set.set_summary(images)


def load(images: ImageSet, preset, background_weight) -> tuple:
    """Values for ``Editor.load_outputs``: the image being edited, in the editor."""
    if not images.items:
        return (None, None, NO_IMAGE, None, None, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), None, None,
                None, "", gr.skip(), images, strip_value(images), image_set.set_summary(images))
    item = images.items[images.current]
    mask_file, use_mask, model, threshold, softness, grow = item.controls
    dataset, shown, full, tokens, summary = dataset_step.on_mask_adjust(
        item.dataset, threshold, softness, grow, None, preset, background_weight)
    return (dataset, shown, dataset_step.describe(item.dataset), item.image_path, mask_file, use_mask, model,
            threshold, softness, grow, dataset_step.editor_value(dataset), full, tokens, summary, item.caption,
            images, strip_value(images), image_set.set_summary(images))


def _saved(images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor):
    return image_set.save_live(images, dataset, caption=caption,
                               controls=(mask_file, use_mask, model, threshold, softness, grow), editor=editor)


def on_source_change(image_file, mask_file, use_mask, mask_model, images, caption, dataset=None,
                     progress=gr.Progress()):
    """The editor's upload, own mask or mask settings changed: make the edited image anew, unless it is the echo of
    loading it (a switch) or the same file again. (dataset state, preview, description, set state, caption reset: the
    caption box's new text for a new picture, else None; a state, so /prepare_dataset answers as it always did).

    Unchanged, the states are kept (no new mask: painted corrections survive) but the preview and description are
    answered again from the live ``dataset``: an API client that uploads the same file twice still gets its image."""
    images = images or ImageSet()
    if not image_set.source_changed(images, image_file, mask_file, use_mask, mask_model):
        if dataset is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), None
        return gr.skip(), dataset_step.overlay(dataset), dataset_step.describe(dataset), gr.skip(), None
    if not image_file and images.size > 1:
        return (gr.skip(), gr.skip(), "The image being edited stays in the set: **Remove this image** takes it out.",
                gr.skip(), None)
    new_caption = image_set.caption_for_new_picture(images, image_file, caption) if image_file else None
    dataset, shown, text, refusal = dataset_step.made_dataset(image_file, mask_file, use_mask, mask_model, progress)
    if refusal and images.size > 1:  # the set keeps the image being edited as it was (and trains with it)
        return gr.skip(), gr.skip(), f"{text}  \nThe image being edited is unchanged.", gr.skip(), None
    if dataset is None:
        new_caption = None
    elif new_caption is not None:
        text += "  \n" + image_set.caption_reset_note(caption)
    images = image_set.with_new_source(images, dataset, image_file, mask_file, use_mask, mask_model,
                                       caption if new_caption is None else new_caption)
    return dataset, shown, text, replace(images, refused=refusal), new_caption


def new_mask_if_fresh(dataset, *rest):
    """``dataset_step.on_new_mask`` for a dataset just made (its mask unadjusted), nothing for an echo."""
    if dataset is not None and dataset.raw_mask is None:
        return dataset_step.on_new_mask(dataset, *rest)
    return (gr.skip(),) * 6


def connect(e: Editor, add, earlier, later, remove, then=None) -> None:
    """Wire the strip and its buttons (and the set's API endpoints). ``then``: a ``.then`` kwargs dict run after every
    change to the set (the epochs box follows the set's size)."""
    after = (lambda dep: dep.then(**then)) if then else (lambda dep: dep)

    @user_errors
    def on_add(files, images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor,
               preset, background_weight, progress=gr.Progress()):
        images = _saved(images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor)
        added = image_set.add_files(images, [str(f) for f in files or []], use_mask, model,
                                    stage=lambda fraction, what: progress(fraction, desc=what))
        added = _captioned(added, images.size, caption)
        if not images.items and added.items:
            added = image_set.picked(added, 0)
        return (*load(added, preset, background_weight), None)

    @user_errors
    def on_pick(images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor, preset,
                background_weight, evt: gr.SelectData):
        images = _saved(images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor)
        return load(image_set.picked(images, evt.index), preset, background_weight)

    def on_remove(images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor, preset,
                  background_weight):
        images = _saved(images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor)
        return load(image_set.removed(images), preset, background_weight)

    def on_move(by):
        def handler(images, dataset, caption, mask_file, use_mask, model, threshold, softness, grow, editor, preset,
                    background_weight):
            images = image_set.moved(_saved(images, dataset, caption, mask_file, use_mask, model, threshold, softness,
                                            grow, editor), by)
            return images, strip_value(images), image_set.set_summary(images)
        return handler

    strip_outputs = [e.set_state, e.strip, e.set_info]
    after(add.upload(on_add, [add, *e.live_inputs], [*e.load_outputs, add], api_name=False, concurrency_limit=2))
    after(e.strip.select(on_pick, e.live_inputs, e.load_outputs, api_name=False, concurrency_limit=2))
    after(remove.click(on_remove, e.live_inputs, e.load_outputs, api_name=False, concurrency_limit=2))
    after(earlier.click(on_move(-1), e.live_inputs, strip_outputs, api_name=False))
    after(later.click(on_move(1), e.live_inputs, strip_outputs, api_name=False))
    _connect_api(e, after)


def _captioned(images: ImageSet, first_new: int, caption: str) -> ImageSet:
    """Added images start with the caption being written (each then gets its own)."""
    for index in range(first_new, images.size):
        if not images.items[index].caption:
            images = image_set.with_caption(images, index, caption or "")
    return images


def _connect_api(e: Editor, after) -> None:
    """The set for API clients (their page is the API): add files, pick the image to edit, caption one, remove, move.
    Each answers (strip, set info); the picked image is then edited by /prepare_dataset and /subject_point."""
    api_files = gr.File(file_count="multiple", visible=False)
    api_index = gr.Number(value=0, precision=0, visible=False)
    api_text = gr.Textbox(value="", visible=False)
    buttons = [gr.Button(visible=False) for _ in range(5)]
    outputs = [e.dataset_state, e.set_state, e.strip, e.set_info]

    def answer(images: ImageSet):
        live = images.items[images.current].dataset if images.items else None
        return live, images, image_set.thumbnails(images), image_set.set_summary(images)  # plain: the API's answer

    @user_errors
    def add_api(files, use_mask, model, images, dataset, caption=image_set.CAPTION_TEMPLATE):
        images = image_set.save_live(images, dataset)
        added = _captioned(image_set.add_files(images, [str(f) for f in files or []], bool(use_mask), model),
                           images.size, caption)
        return answer(image_set.picked(added, 0) if added.items and not images.items else added)

    @user_errors
    def pick_api(index, images, dataset):
        return answer(image_set.picked(image_set.save_live(images, dataset), index))

    @user_errors
    def caption_api(index, text, images, dataset):
        images = image_set.with_caption(image_set.save_live(images, dataset), index, text)
        return images, image_set.thumbnails(images), image_set.set_summary(images)

    def remove_api(images, dataset):
        return answer(image_set.removed(image_set.save_live(images, dataset)))

    def move_api(by, images, dataset):
        return answer(image_set.moved(image_set.save_live(images, dataset), int(by)))

    add_b, pick_b, caption_b, remove_b, move_b = buttons
    api_use_mask = gr.Checkbox(value=True, visible=False)
    api_model = gr.Textbox(value=api.default_mask_model(), visible=False)
    states = [e.set_state, e.dataset_state]
    after(add_b.click(add_api, [api_files, api_use_mask, api_model, *states], outputs, api_name="add_images"))
    after(pick_b.click(pick_api, [api_index, *states], outputs, api_name="pick_image"))
    caption_b.click(caption_api, [api_index, api_text, *states], [e.set_state, e.strip, e.set_info],
                    api_name="caption_image")
    after(remove_b.click(remove_api, states, outputs, api_name="remove_image"))
    after(move_b.click(move_api, [api_index, *states], outputs, api_name="move_image"))
