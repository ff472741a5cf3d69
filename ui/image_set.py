"""Step 1 for a set of 1 to ``api.MAX_IMAGES`` images: the thumbnail strip, add / remove / reorder, and which image
the step-1/2/3 editor is editing.

The editor (upload, mask controls, painted corrections, caption) always edits one image, "the image being edited";
an ``ImageSet`` (a ``gr.State``) keeps every image with its own mask, mask settings and caption. Picking a thumbnail
saves the edited image into the set (its painted strokes baked into its base mask) and loads the picked one into the
editor. Loading sets the editor's controls, and Gradio's change events then fire for them: ``source_changed`` tells
those echoes (the same file, own mask and mask settings as the image was made from) from a real change, so a switch
never redoes a mask. A set of one image is the page as it always was.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from trainer import api
from trainer.errors import UserError
from ui import dataset_step
from ui.dataset_step import Dataset

# The editor's mask controls an image keeps: (own mask file, use mask, mask model, threshold, softness, grow).
DEFAULT_CONTROLS = (None, True, api.MASK_MODELS[0], 0.0, 0, 0)
THUMB_SIDE = 160


@dataclass(frozen=True)
class SetItem:
    name: str
    dataset: Dataset  # its image and mask (painted corrections baked into the base mask)
    caption: str = ""
    image_path: str | None = None  # the file it came from (the editor's upload box shows it)
    controls: tuple = DEFAULT_CONTROLS
    signature: tuple = ()  # what its base mask was made from: (image digest, own-mask digest, use mask, model)
    provenance: dict | None = None  # a grown set's picture: where it came from (trainer.grow.lineage)


@dataclass(frozen=True)
class ImageSet:
    items: tuple[SetItem, ...] = ()
    current: int = 0  # the image being edited
    skipped: tuple[str, ...] = field(default=())  # the last "Add images"' files left out, with the reason
    refused: str = ""  # the editor's upload (or own mask) the image gate refused, its reason: what Train says
    # An emptied set of one remembers its picture (its digest) and the caption box as it was then: the next upload
    # is a new picture only if it differs, and the caption is the old picture's only if nobody typed since.
    emptied: tuple[str | None, str] | None = None
    lineage: dict | None = None  # a set from the Grow tab: its round and the run its candidates came from

    @property
    def size(self) -> int:
        return len(self.items)


def _digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def signature(image_file, mask_file, use_mask, mask_model) -> tuple:
    return (_digest(image_file), _digest(mask_file) if use_mask else None, bool(use_mask), mask_model)


def source_changed(image_set: ImageSet | None, image_file, mask_file, use_mask, mask_model) -> bool:
    """False when the editor's upload, own mask and mask settings are what the image being edited was made from (the
    echo of loading it): nothing to redo."""
    if not image_set or not image_set.items:
        return True
    return image_set.items[image_set.current].signature != signature(image_file, mask_file, use_mask, mask_model)


def with_new_source(image_set: ImageSet | None, dataset: Dataset | None, image_file, mask_file, use_mask,
                    mask_model, caption: str = "") -> ImageSet:
    """The set after the editor's upload (or own mask, or mask settings) made the edited image ``dataset`` anew. A
    set of one follows the upload box exactly: emptied with it. In a larger set, an emptied box keeps the image
    (Remove takes it out)."""
    image_set = image_set or ImageSet()
    if dataset is None:
        if image_set.size > 1:
            return image_set
        old = image_set.items[0] if image_set.items else None
        return ImageSet(emptied=(old.signature[0], caption or "") if old else image_set.emptied)
    item = SetItem(name=Path(image_file).name if image_file else "image", dataset=dataset, caption=caption,
                   image_path=image_file, signature=signature(image_file, mask_file, use_mask, mask_model),
                   controls=(mask_file, bool(use_mask), mask_model, *DEFAULT_CONTROLS[3:]))
    if not image_set.items:
        return ImageSet(items=(item,), current=0)
    old = image_set.items[image_set.current]
    item = replace(item, caption=caption if old.signature[:1] != item.signature[:1] else old.caption,
                   controls=(mask_file, bool(use_mask), mask_model, *old.controls[3:]))
    return _with_item(image_set, image_set.current, item)


CAPTION_TEMPLATE = "a photo of [trigger]"  # the caption box's start (ui/app.py), and a new picture's


def caption_for_new_picture(image_set: ImageSet | None, image_file, caption: str) -> str | None:
    """The caption box for the picture ``image_file`` the editor is about to take: ``CAPTION_TEMPLATE`` when the box
    holds a caption written for a different picture, else None (the box stays as it is).

    Why reset rather than keep: a caption describes one picture (its pose, clothes, background), and one kept from
    the previous picture trains this one on a description of another, silently. The old text is shown in the
    picture's description, so nothing typed is lost. Kept: the first picture's box (typed before the upload, for it),
    the same picture again (a switch's echo, an API client re-sending its file, a mask setting), a box typed into
    since the previous picture was taken out, and the template itself."""
    image_set = image_set or ImageSet()
    text = (caption or "").strip()
    if image_set.items:
        previous = image_set.items[image_set.current].signature[:1]
    elif image_set.emptied is not None and (image_set.emptied[1] or "").strip() == text:
        previous = image_set.emptied[:1]
    else:
        return None
    if not text or text == CAPTION_TEMPLATE or previous == (_digest(image_file),):
        return None
    return CAPTION_TEMPLATE


def caption_reset_note(old_caption: str) -> str:
    return (f"✏️ A new picture: its caption (step 3) is back to the template, as the one in the box described the "
            f"previous picture. It was: “{old_caption.strip()}” — paste it back if it fits this one too.")


def no_image_message(image_set: ImageSet | None) -> str:
    """What Train says with no image to train: why the last upload was refused, when it was."""
    if image_set is not None and image_set.refused:
        return (f"There is no image to train: your upload was refused. {image_set.refused} Upload a PNG, JPEG or WEBP "
                "picture in step 1 (or another mask in step 2), then press Train again.")
    return "Upload an image first (step 1)."


def _with_item(image_set: ImageSet, index: int, item: SetItem) -> ImageSet:
    items = list(image_set.items)
    items[index] = item
    return replace(image_set, items=tuple(items))


def baked(dataset: Dataset | None, editor) -> Dataset | None:
    """The edited image with its painted strokes made part of its base mask: refining it again with no strokes (and
    the same threshold, softness and grow) gives the same mask."""
    if dataset is None or dataset_step.base_mask(dataset) is None:
        return dataset
    return replace(dataset, raw_mask=api.apply_strokes(dataset_step.base_mask(dataset), editor))


def save_live(image_set: ImageSet | None, dataset: Dataset | None, caption=None, controls=None,
              editor=None) -> ImageSet:
    """The set with the editor's live state (its dataset, and the caption and mask controls when given) saved into
    the image being edited."""
    image_set = image_set or ImageSet()
    if dataset is None or not image_set.items:
        return image_set
    old = image_set.items[image_set.current]
    return _with_item(image_set, image_set.current, replace(
        old, dataset=baked(dataset, editor), caption=old.caption if caption is None else caption,
        controls=old.controls if controls is None else (old.controls[0], *controls[1:])))


def add_files(image_set: ImageSet | None, paths: list[str], use_mask: bool, mask_model: str,
              stage=None) -> ImageSet:
    """The set with the pictures at ``paths`` added at its end, each with its own mask (its transparency, else the
    automatic one). Bad files and repeats are left out by name (``skipped``); more than ``MAX_IMAGES`` is refused."""
    image_set = image_set or ImageSet()
    if not paths:
        return replace(image_set, skipped=())
    if image_set.size + len(paths) > api.MAX_IMAGES:
        raise UserError(f"A set holds at most {api.MAX_IMAGES} images: it has {image_set.size}, and {len(paths)} "
                        f"more were added. Add at most {max(0, api.MAX_IMAGES - image_set.size)}.")
    loaded = api.load_images(paths)
    skipped = list(loaded.skipped)
    by_name = {Path(p).name: p for p in paths}
    items = list(image_set.items)
    for index, picture in enumerate(loaded.images):
        twin = next((i.name for i in items if _same_pixels(i.dataset.image, picture.image)), None)
        if twin is not None:
            skipped.append(f"'{picture.name}' was left out: it is the same picture as '{twin}', already in the set.")
            continue
        if stage:
            stage(index / len(loaded.images), f"Masking '{picture.name}'")
        if use_mask:
            choice = api.choose_mask(picture.image, None, auto=True, model=mask_model)
            dataset = Dataset(picture.image, choice.mask, choice.source, mask_warning=choice.warning,
                              mask_network=choice.network)
        else:
            dataset = Dataset(picture.image, None, "none")
        path = by_name.get(picture.name)
        items.append(SetItem(name=picture.name, dataset=dataset, image_path=path,
                             controls=(None, bool(use_mask), mask_model, *DEFAULT_CONTROLS[3:]),
                             signature=signature(path, None, use_mask, mask_model)))
    return replace(image_set, items=tuple(items), skipped=tuple(skipped))


def from_pictures(pictures: list, paths: list[str], mask_model: str, lineage: dict | None = None) -> ImageSet:
    """A set made of pictures that already have their masks and captions (``api.SetImage``s, e.g. the Grow tab's
    originals and ticked candidates, read from their folder at ``paths``), the first being edited."""
    items = []
    for picture, path in zip(pictures, paths):
        source = "none" if picture.mask is None else "automatic"
        items.append(SetItem(name=picture.name, dataset=Dataset(picture.image, picture.mask, source),
                             caption=picture.caption, image_path=path, provenance=picture.provenance,
                             controls=(None, True, mask_model, *DEFAULT_CONTROLS[3:]),
                             signature=signature(path, None, True, mask_model)))
    return ImageSet(items=tuple(items), current=0, lineage=lineage)


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def removed(image_set: ImageSet) -> ImageSet:
    """The set without the image being edited; the next one (or the new last) is edited."""
    if not image_set.items:
        return image_set
    items = image_set.items[:image_set.current] + image_set.items[image_set.current + 1:]
    return replace(image_set, items=items, current=min(image_set.current, max(0, len(items) - 1)), skipped=())


def moved(image_set: ImageSet, by: int) -> ImageSet:
    """The set with the image being edited moved ``by`` places (-1: earlier); it stays the one being edited."""
    to = image_set.current + by
    if not image_set.items or not 0 <= to < image_set.size:
        return image_set
    items = list(image_set.items)
    items[image_set.current], items[to] = items[to], items[image_set.current]
    return replace(image_set, items=tuple(items), current=to, skipped=())


def picked(image_set: ImageSet, index) -> ImageSet:
    index = int(index)
    if not 0 <= index < image_set.size:
        raise UserError(f"There is no image {index + 1}: the set has {image_set.size}.")
    return replace(image_set, current=index, skipped=())


def with_caption(image_set: ImageSet, index, caption: str) -> ImageSet:
    index = int(index)
    if not 0 <= index < image_set.size:
        raise UserError(f"There is no image {index + 1}: the set has {image_set.size}.")
    return _with_item(image_set, index, replace(image_set.items[index], caption=caption or ""))


def thumbnails(image_set: ImageSet | None) -> list[tuple[Image.Image, str]]:
    """The strip: each image with its mask shown (dimmed background), labelled with its place and file name."""
    out = []
    for index, item in enumerate((image_set or ImageSet()).items):
        thumb = dataset_step.overlay(item.dataset)
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out.append((thumb, f"{index + 1}. {item.name}"))
    return out


def set_summary(image_set: ImageSet | None) -> str:
    """Advice for the set as a whole and for each of its images, and the files the last addition left out."""
    image_set = image_set or ImageSet()
    lines = [f"❌ {text}" for text in image_set.skipped]
    if image_set.size <= 1:
        return "  \n".join(lines + [f"One image. Add up to {api.MAX_IMAGES - 1} more (other angles, expressions, "
                                    "settings) to train a set: each keeps its own mask and caption."])
    lines.insert(0, f"**{image_set.size} images** (editing **{image_set.current + 1}. "
                    f"{image_set.items[image_set.current].name}**: pick a thumbnail to edit another). Each has its "
                    "own mask and caption; the trigger word is shared.")
    for advice in api.set_advice([api.SetImage(i.name, i.dataset.image, i.dataset.mask) for i in image_set.items]):
        lines.append(f"⚠️ Set: {advice.message}")
    for index, item in enumerate(image_set.items):
        for advice in api.image_advice(item.dataset.image, item.dataset.mask):
            lines.append(f"⚠️ {index + 1}. {item.name}: {advice.message}")
    return "  \n".join(lines)


def training_images(image_set: ImageSet | None, dataset: Dataset | None, caption: str) -> list | None:
    """The set to train, with the edited image's live mask and caption: ``api.SetImage``s, or None for a set of one
    (which trains through the one-image path, exactly as before sets existed)."""
    if image_set is None or image_set.size <= 1:
        return None
    image_set = save_live(image_set, dataset, caption=caption)
    out = []
    for index, item in enumerate(image_set.items):
        live = dataset if index == image_set.current and dataset is not None else item.dataset
        out.append(api.SetImage(name=item.name, image=live.image, mask=live.mask, caption=(item.caption or "").strip(),
                                provenance=item.provenance))
    return out


def lineage_of(image_set: ImageSet | None) -> dict | None:
    """A grown set's round and parent run, for the run that trains it (None: an ordinary set)."""
    return image_set.lineage if image_set is not None and image_set.size > 1 else None
