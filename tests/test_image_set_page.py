"""The page's set of 1 to 10 images (ui/image_set.py, ui/set_step.py, ui/schedule_step.py): the set's own logic on
plain values, then a whole set through the app's API with gradio_client (add, pick, own mask, captions, epochs, a
tiny-demo run whose previews stream, and a run folder holding every image, mask and caption)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import subject_image
from trainer import api
from ui import image_set, schedule_step
from ui.dataset_step import Dataset, refine
from ui.image_set import ImageSet

TRIGGER = "ohwx"


def picture(tmp_path: Path, name: str, size) -> Path:
    path = tmp_path / name
    subject_image(size)[0].save(path)
    return path


def one(tmp_path, name="a.png", size=(160, 200)) -> tuple[ImageSet, Path]:
    path = picture(tmp_path, name, size)
    image, mask = subject_image(size)
    return image_set.with_new_source(None, Dataset(image, mask, "uploaded mask"), str(path), None, True, "u2netp",
                                     "cap a"), path


# ---- the set's logic ------------------------------------------------------------------------------------------


def test_a_switch_is_told_from_a_real_change_of_the_edited_images_source(tmp_path):
    images, path = one(tmp_path)
    copy = tmp_path / "copy in the cache.png"  # Gradio hands the loaded file back under another path
    copy.write_bytes(path.read_bytes())
    assert not image_set.source_changed(images, str(copy), None, True, "u2netp")
    assert image_set.source_changed(images, str(copy), None, True, "isnet-general-use")
    assert image_set.source_changed(images, str(copy), None, False, "u2netp")
    assert image_set.source_changed(images, str(picture(tmp_path, "b.png", (200, 200))), None, True, "u2netp")
    assert image_set.source_changed(ImageSet(), str(copy), None, True, "u2netp")


def test_painted_strokes_survive_a_switch_and_add_remove_move_keep_each_image_its_own(tmp_path):
    images, _ = one(tmp_path)
    image, mask = subject_image((160, 200))
    strokes = Image.new("RGBA", (160, 200), (0, 0, 0, 0))
    strokes.paste((0, 200, 0, 255), (0, 0, 40, 40))  # green: the top-left corner becomes subject
    editor = {"background": None, "layers": [strokes], "composite": None}
    live = refine(images.items[0].dataset, None, 0, 0, editor, 512)
    assert np.asarray(live.mask)[10, 10] == 255 and np.asarray(live.raw_mask)[10, 10] == 0

    images = image_set.save_live(images, live, caption="my caption", controls=(None, True, "u2netp", 0.0, 0, 0),
                                 editor=editor)
    images = image_set.add_files(images, [str(picture(tmp_path, "b.png", (240, 180))),
                                          str(picture(tmp_path, "c.png", (200, 200))),
                                          str(picture(tmp_path, "a again.png", (160, 200)))], False, "u2netp")
    assert [i.name for i in images.items] == ["a.png", "b.png", "c.png"]
    assert "'a again.png' was left out" in images.skipped[0] and "'a.png'" in images.skipped[0]
    saved = images.items[0]
    assert saved.caption == "my caption"
    # the strokes are in the saved base mask: refined again with no strokes, it is the painted mask
    again = refine(saved.dataset, None, 0, 0, None, 512)
    assert np.array_equal(np.asarray(again.mask), np.asarray(live.mask))
    assert images.items[1].dataset.mask is None  # added without masking

    images = image_set.moved(image_set.picked(images, 2), -1)
    assert [i.name for i in images.items] == ["a.png", "c.png", "b.png"] and images.current == 1
    images = image_set.with_caption(images, 2, "[trigger] sideways")
    images = image_set.removed(images)
    assert [i.name for i in images.items] == ["a.png", "b.png"] and images.current == 1
    trained = image_set.training_images(images, images.items[1].dataset, "live caption of b")
    assert [(i.name, i.caption) for i in trained] == [("a.png", "my caption"), ("b.png", "live caption of b")]
    assert trained[0].image.size == (160, 200) and trained[1].image.size == (240, 180)
    assert image_set.training_images(image_set.removed(images), None, "x") is None  # one image: today's path


def test_a_set_is_refused_past_ten_images_and_its_advice_names_the_set_and_each_image(tmp_path):
    images, _ = one(tmp_path)
    paths = [str(picture(tmp_path, f"p{i}.png", (100 + 8 * i, 120))) for i in range(10)]
    with pytest.raises(api.UserError, match="at most 10"):
        image_set.add_files(images, paths, False, "u2netp")
    images = image_set.add_files(images, paths[:2], False, "u2netp")
    text = image_set.set_summary(images)
    assert "**3 images**" in text and "⚠️ Set: The set mixes shapes" not in text
    wide = image_set.add_files(images, [str(picture(tmp_path, "wide.png", (400, 120)))], False, "u2netp")
    text = image_set.set_summary(wide)
    assert "⚠️ Set: The set mixes shapes" in text and "'wide.png'" in text
    assert "⚠️ 2. p0.png: The picture is 100x120" in text  # each image's own advice, by its place and name


def test_epochs_follow_steps_and_steps_follow_epochs_without_a_loop():
    three = ImageSet(items=(None, None, None))  # only its size counts here
    assert schedule_step.on_steps_change(40, None, three, 1, 1) == 13.33
    assert schedule_step.on_steps_change(40, 13.33, three, 1, 1).__class__.__name__ != "float"  # agrees: left as is
    assert schedule_step.on_epochs_change(4, 40, three, 1, 1) == 12
    assert schedule_step.on_epochs_change(4, 40, three, 2, 1) == 6  # batch 2: half the steps
    # the echo of the steps box's own update leaves steps alone (2 steps of 3 images = 0.67 epochs, ceil would give 3)
    assert not isinstance(schedule_step.on_epochs_change(0.67, 2, three, 1, 1), int)
    assert schedule_step.on_steps_change(400, None, None, 1, 1) == 400  # one image: an epoch is a step
    note = schedule_step.schedule_note(12, 6, three, 2, 2, 4e-4)
    assert "**3 images**" in note and "4 images per step" in note and "12 steps = **16.00 epochs**" in note
    assert "step 6 (epoch 8.00), step 12 (epoch 16.00)" in note
    assert "sqrt(4) = 0.0008" in note
    assert "as set" in schedule_step.schedule_note(400, 50, None, 1, 1, 4e-4)


# ---- the whole set through the API ----------------------------------------------------------------------------


def test_a_set_of_three_through_the_api_trains_each_image_with_its_mask_and_caption(tmp_path):
    from gradio_client import handle_file

    from tests.helpers_app import launched_app
    from tests.test_app_api import follow_to_end, new_client, prepare

    sizes = {"first.png": (160, 200), "second.png": (240, 180), "third.png": (200, 200)}
    paths = {name: picture(tmp_path, name, size) for name, size in sizes.items()}
    own_mask = tmp_path / "second mask.png"
    square = Image.new("L", sizes["second.png"], 0)
    square.paste(255, (60, 40, 180, 150))
    square.save(own_mask)
    with launched_app(tmp_path) as app:
        client = new_client(app, tmp_path, "set")
        prepare(client, paths["first.png"])
        strip, info = client.predict([handle_file(str(paths["second.png"])), handle_file(str(paths["third.png"]))],
                                     api_name="/add_images")
        assert len(strip) == 3 and "**3 images**" in info, info
        assert [item["caption"] for item in strip] == ["1. first.png", "2. second.png", "3. third.png"]
        client.predict(0, "a photo of [trigger], close up", api_name="/caption_image")
        client.predict(2, "[trigger] on a table", api_name="/caption_image")
        _, info = client.predict(1, api_name="/pick_image")
        assert "editing **2. second.png**" in info
        _, description = client.predict(handle_file(str(paths["second.png"])), handle_file(str(own_mask)), True,
                                        "u2netp", api_name="/prepare_dataset")
        assert "**your mask**" in description and "240×180" in description
        # /train as before, the edited image's caption first; its length in epochs (steps left out): 2 x 3 images
        assert client.predict(None, caption="a side view of [trigger]", trigger=TRIGGER, prompts="",
                              preset="character-rank4-400", save_every=3, model="tiny-demo", epochs=2,
                              api_name="/train") == "Starting…"
        updates = follow_to_end(client)
        run = app.manager.jobs_for(client.session_hash)[-1].run

    progress, _, gallery, checkpoints = updates[-1]
    assert progress.startswith("**Finished: 6 steps, 2 checkpoint(s).**"), progress
    assert "epoch **2.00 / 2.00** of 3 images" in progress
    assert "step 3 (epoch 1.00), step 6 (epoch 2.00)" in progress
    assert len(updates) > 2 and not updates[0][0].startswith("**Finished"), "progress was not streamed"
    labels = [item["caption"] for item in gallery]
    assert labels == ["step 6 · epoch 2.00 · a photo of ohwx, close up", "step 3 · epoch 1.00 · a photo of ohwx, close up",
                      "base model (step 0) · a photo of ohwx, close up"]  # the newest first
    assert all(Path(item["image"]).is_file() for item in gallery)
    assert len(checkpoints) == 2

    manifest = json.loads((run.path / "run.json").read_text())
    entries = manifest["dataset"]["images"] if isinstance(manifest["dataset"], dict) else manifest["dataset"]
    assert [(e["name"], e["caption"]) for e in entries] == [
        ("first.png", "a photo of [trigger], close up"), ("second.png", "a side view of [trigger]"),
        ("third.png", "[trigger] on a table")]
    assert manifest["config"]["steps"] == 6
    for entry, (name, size) in zip(entries, sizes.items()):
        with Image.open(run.path / entry["image"]) as stored, Image.open(paths[name]) as original:
            assert stored.size == size and np.array_equal(np.asarray(stored.convert("RGB")),
                                                          np.asarray(original.convert("RGB")))
        assert entry["mask"], f"{name} has no mask"
    with Image.open(run.path / entries[1]["mask"]) as stored:
        assert np.array_equal(np.asarray(stored), np.asarray(square))  # its own mask, not the automatic one
    with Image.open(run.path / entries[2]["mask"]) as automatic:
        disc = np.asarray(subject_image(sizes["third.png"])[1]) > 127
        found = np.asarray(automatic) > 127
        assert (disc & found).sum() / (disc | found).sum() > 0.8  # the automatic mask found the disc


def test_train_passes_the_batch_size_and_a_length_in_epochs_and_a_set_of_one_trains_as_before(tmp_path):
    from trainer.jobs.manager import JobManager
    from ui.training_step import TrainingController

    manager = JobManager(runner=lambda run, should_stop, token=None: iter(()))
    try:
        controller = TrainingController(manager, tmp_path / "runs")
        image, mask = subject_image()
        first = Dataset(image, mask, "uploaded mask")
        images, _ = one(tmp_path)
        images = image_set.add_files(images, [str(picture(tmp_path, "b.png", (240, 180))),
                                              str(picture(tmp_path, "c.png", (200, 200)))], False, "u2netp")
        args = ("alice", first, "a photo of [trigger]", TRIGGER, "", "quick-test-250", 4, None, 4e-4, 2, "tiny-demo")
        controller.start(*args, batch_size=2, epochs=4, images=image_set.training_images(images, first, "cap a"))
        job = manager.latest_for("alice")
        list(job.follow())
        config = job.run.config
        assert (config.batch_size, config.steps, config.learning_rate) == (2, 6, 4e-4)  # 3 x 4 / 2; the rule is the job's
        assert config.caption == "cap a" and job.run.image_count == 3
        assert (job.run.path / "dataset" / "image-02.png").is_file()

        controller.start("bob", first, "a photo of [trigger]", TRIGGER, "", "quick-test-250", 4, 8, 4e-4, 4,
                         "tiny-demo", images=image_set.training_images(one(tmp_path, "solo.png")[0], first, "x"))
        job = manager.latest_for("bob")
        list(job.follow())
        assert job.run.image_count == 1 and job.run.config.batch_size == 1 and job.run.config.steps == 8
        assert job.run.config.caption == "a photo of [trigger]"
        assert not list((job.run.path / "dataset").glob("image-*.png"))  # the one-image layout
    finally:
        manager.shutdown()


# ---- a new upload in the editor: the caption, and a refused file ------------------------------------------------


def upload(tmp_path, file, images, caption, dataset=None):
    """``set_step.on_source_change`` for the editor's upload box (no automatic mask: quick, and beside the point)."""
    from ui import set_step

    return set_step.on_source_change(str(file) if file else None, None, False, "u2netp", images, caption, dataset,
                                     progress=lambda *a, **k: None)


def test_a_new_picture_resets_the_caption_written_for_the_previous_one_and_says_what_it_was(tmp_path):
    a, b = picture(tmp_path, "a.png", (160, 200)), picture(tmp_path, "b.png", (200, 160))
    dataset, _, text, images, reset = upload(tmp_path, a, None, "ohwx in a red coat, typed before the upload")
    assert reset is None and images.items[0].caption == "ohwx in a red coat, typed before the upload"  # the first

    again = tmp_path / "a, re-sent.png"  # the same picture under another path (an API client re-sending it)
    again.write_bytes(a.read_bytes())
    assert upload(tmp_path, again, images, "ohwx in a red coat", dataset)[4] is None  # the same picture: kept
    assert upload(tmp_path, a, images, image_set.CAPTION_TEMPLATE)[4] is None  # the template: nothing to reset

    _, _, text, replaced, reset = upload(tmp_path, b, images, "ohwx in a red coat")  # replaced without clearing
    assert reset == image_set.CAPTION_TEMPLATE and replaced.items[0].caption == image_set.CAPTION_TEMPLATE
    assert "back to the template" in text and "“ohwx in a red coat”" in text

    # the usual way: the box cleared (×), then another picture; the caption is reset unless typed into since
    emptied = upload(tmp_path, None, images, "ohwx in a red coat")[3]
    assert emptied.size == 0 and upload(tmp_path, b, emptied, "ohwx in a red coat")[4] == image_set.CAPTION_TEMPLATE
    assert upload(tmp_path, b, emptied, "ohwx, written for b")[4] is None
    assert upload(tmp_path, a, emptied, "ohwx in a red coat")[4] is None  # the same picture back


def test_a_refused_upload_is_what_train_says_and_a_set_keeps_its_edited_image(tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    dataset, shown, text, images, reset = upload(tmp_path, notes, None, "a photo of [trigger]")
    assert dataset is None and shown is None and text.startswith("❌") and reset is None
    said = image_set.no_image_message(images)
    assert "your upload was refused" in said and "not a PNG, JPEG or WEBP image" in said and "Upload a PNG" in said
    assert image_set.no_image_message(upload(tmp_path, None, images, "x")[3]) == "Upload an image first (step 1)."

    a, b = picture(tmp_path, "a.png", (160, 200)), picture(tmp_path, "b.png", (200, 160))
    first, _, _, images, _ = upload(tmp_path, a, None, "cap a")
    images = image_set.add_files(images, [str(b)], False, "u2netp")
    assert images.size == 2
    import gradio as gr

    out = upload(tmp_path, notes, images, "cap a", first)  # states skipped: the edited image stays, and trains
    assert out[0] == gr.skip() and out[3] == gr.skip() and "❌" in out[2] and "unchanged" in out[2]
