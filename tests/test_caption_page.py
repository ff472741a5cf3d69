"""The page's auto-caption buttons (ui/caption_step.py) on the tiny Florence-2 built in code: the edited image's
caption, and every image of a set captioned into its own slot, through the real captioning code."""
from __future__ import annotations

import pytest
from PIL import Image

from trainer import api
from trainer.errors import UserError
from ui import caption_step, image_set
from ui.dataset_step import Dataset
from ui.image_set import ImageSet, SetItem


@pytest.fixture(scope="module")
def tiny_florence(tmp_path_factory):
    from trainer.model.tiny_florence import ensure_tiny_florence

    return str(ensure_tiny_florence(tmp_path_factory.mktemp("models") / "tiny-caption"))


def picture(colour) -> Dataset:
    return Dataset(image=Image.new("RGB", (64, 48), colour), mask=None, mask_source="none")


def test_the_edited_image_gets_a_caption_with_the_trigger_placeholder(tiny_florence):
    text = caption_step.caption_current(picture((200, 30, 30)), tiny_florence)
    assert text == api.caption_images([picture((200, 30, 30)).image], model=tiny_florence)[0]
    assert text.count("[trigger]") == 1
    with pytest.raises(UserError, match="Upload an image first"):
        caption_step.caption_current(None, tiny_florence)


def test_caption_all_writes_each_images_caption_into_its_own_slot(tiny_florence):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    images = ImageSet(items=tuple(SetItem(f"{i}.png", picture(c), caption="old") for i, c in enumerate(colours)),
                      current=1)
    text, captioned = caption_step.caption_every(images, images.items[1].dataset, "edited in the box", tiny_florence)
    expected = api.caption_images([picture(c).image for c in colours], model=tiny_florence)
    assert [item.caption for item in captioned.items] == expected
    assert text == expected[1] and captioned.current == 1
    assert image_set.set_summary(captioned)  # the page's summary still reads the set
    # one image, no set yet: the edited image only
    alone, empty = caption_step.caption_every(None, picture((9, 9, 9)), "x", tiny_florence)
    assert alone == api.caption_images([picture((9, 9, 9)).image], model=tiny_florence)[0] and not empty.items
