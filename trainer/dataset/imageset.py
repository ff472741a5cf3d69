"""A set of 1 to ``MAX_IMAGES`` training images, each with its own mask and caption (the trigger word is shared).

Practitioners train a character from a few pictures (4 from different angles make it more poseable); one picture is
a set of one and trains exactly as before. Every file still comes in through the untrusted-image gate
(``trainer.dataset.images``); this module only decides what a set is:

- ``load_images(paths, captions)``: the CLI's repeated ``--image`` (one caption for all, or one per image);
- ``load_folder(dir)``: a kohya-style folder, ``NAME.png`` + ``NAME.txt`` (its caption) + an optional mask in
  ``masks/NAME.png`` (else the picture's own transparency, else the automatic mask, decided later by ``choose_mask``);
  a folder made by ``grow`` also has ``grow.json``: each picture's provenance and the round (``trainer.grow.lineage``).

A bad file among good ones (a decompression bomb, a damaged file, a mask of the wrong shape) or an exact duplicate of
an earlier picture is left out with a sentence naming it (``LoadedSet.skipped``), and the others train: a set of
four with one broken file is still worth training, and the user is told which one. A set with nothing usable left, or
more pictures than ``MAX_IMAGES``, is refused (a ``UserError``): which ten of eleven to keep is the user's choice.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from PIL import Image

from trainer.dataset.images import load_image, load_mask
from trainer.errors import UserError
from trainer.grow import lineage

MAX_IMAGES = 10  # practitioners' few-image sets are 4-10 pictures; more is a different workflow (captioning at scale)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASKS_DIR = "masks"
MAX_CAPTION_BYTES = 16 * 1024  # a caption is a sentence or a tag list; a larger .txt is not one


@dataclass(frozen=True)
class SetImage:
    name: str  # the file it came from (messages, run.json)
    image: Image.Image
    mask: Image.Image | None = None  # "L", white = trained; while loading: the set's own mask file, if any
    caption: str = ""  # "" = the run's caption
    provenance: dict | None = None  # a grown folder's picture: where it came from (trainer.grow.lineage)


@dataclass(frozen=True)
class LoadedSet:
    images: tuple[SetImage, ...]
    skipped: tuple[str, ...] = ()  # one sentence per file left out, naming it
    lineage: dict | None = None  # a grown folder's round and parent run (trainer.grow.lineage), for run.json

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.images]


def load_images(paths: Sequence[str | Path], captions: Sequence[str] = ()) -> LoadedSet:
    """The pictures at ``paths``; ``captions``: none, one for all, or one per picture (in the same order)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("Give at least one image.")
    if len(captions) not in (0, 1, len(paths)):
        raise UserError(f"{len(paths)} images and {len(captions)} captions were given: give one caption for all of "
                        "them, or one per image in the same order.")
    _check_count([p.name for p in paths])
    per_image = list(captions) if len(captions) == len(paths) else [captions[0] if captions else ""] * len(paths)
    return _collect([(p, None, c) for p, c in zip(paths, per_image)])


def load_folder(folder: str | Path) -> LoadedSet:
    """A kohya-style folder: each picture ``NAME.png`` (PNG, JPEG or WEBP), its caption in ``NAME.txt``, its mask in
    ``masks/NAME.png`` (any of the picture formats), all optional but the picture."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"The dataset folder {folder} does not exist or is not a folder.")
    pictures = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                      key=lambda p: p.name)
    if not pictures:
        raise UserError(f"The dataset folder {folder} holds no PNG, JPEG or WEBP pictures (kohya layout: NAME.png with "
                        f"its caption in NAME.txt and an optional mask in {MASKS_DIR}/NAME.png).")
    _check_count([p.name for p in pictures])
    entries = []
    for picture in pictures:
        masks = [folder / MASKS_DIR / f"{picture.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
        entries.append((picture, next((m for m in masks if m.is_file()), None), _read_caption(picture)))
    loaded = _collect(entries)
    grown = lineage.read(folder)  # a folder made by `grow`: each picture's provenance, the round it makes
    if grown is None:
        return loaded
    images = [replace(item, provenance=grown.images.get(item.name)) for item in loaded.images]
    # the originals first: the first picture's caption is the previews' (and a set's first keeps the one-image names)
    images.sort(key=lambda item: ((item.provenance or {}).get("source", {}).get("kind") != "original"))
    return replace(loaded, images=tuple(images), lineage=grown.for_run())


def _check_count(names: list[str]) -> None:
    if len(names) > MAX_IMAGES:
        extra = len(names) - MAX_IMAGES
        raise UserError(f"{len(names)} images were given; a set holds at most {MAX_IMAGES}. Leave out {extra} of them "
                        f"(the most similar views), for instance {', '.join(repr(n) for n in names[MAX_IMAGES:])}.")


def _read_caption(picture: Path) -> str:
    path = picture.with_suffix(".txt")
    if not path.is_file():
        return ""
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise UserError(f"The caption file {path.name} is over {MAX_CAPTION_BYTES // 1024} KB; a caption is a sentence.")
    try:
        return " ".join(path.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        raise UserError(f"The caption file {path.name} is not UTF-8 text; save it as UTF-8.") from None


def _collect(entries: list[tuple[Path, Path | None, str]]) -> LoadedSet:
    """Load every (picture, mask file, caption); leave out what can't train, with the reason, keep the rest."""
    images: list[SetImage] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}  # pixel digest -> the first picture's name
    errors: list[UserError] = []
    for picture, mask_path, caption in entries:
        try:
            image = load_image(picture, what=f"image '{picture.name}'")
            mask = load_mask(mask_path, size=image.size) if mask_path is not None else None
        except UserError as err:
            errors.append(err)
            skipped.append(f"'{picture.name}' was left out: {err}")
            continue
        digest = pixel_digest(image)
        if digest in seen:
            skipped.append(f"'{picture.name}' was left out: it is the same picture as '{seen[digest]}', so it would "
                           "only double that view's weight. Use another angle or expression instead.")
            continue
        seen[digest] = picture.name
        images.append(SetImage(name=picture.name, image=image, mask=mask, caption=caption))
    if not images:
        if len(entries) == 1:
            raise errors[0]  # one picture: its own message, exactly as before sets existed
        raise UserError("None of the images can be used: " + " ".join(skipped))
    return LoadedSet(images=tuple(images), skipped=tuple(skipped))


def pixel_digest(image: Image.Image) -> str:
    """Equal for the same picture whatever file it came from (PNG vs the same pixels re-saved, another file name)."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
