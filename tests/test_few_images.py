"""From one image to a few: the set, its epochs and steps, aspect buckets, batch size, the learning-rate rule, resume,
bad input in the set, set advice, the CLI's --dataset. On the CPU tiny models (tiny-demo and tiny-klein)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from tests.conftest import subject_image
from tests.test_images import bomb_png
from tests.test_resume import assert_same_lora, cli, tiny_config
from trainer import api
from trainer.dataset import advice, imageset
from trainer.dataset.imageset import SetImage
from trainer.dataset.prepare import SIDE_MULTIPLE, prepare_image, training_size
from trainer.errors import UserError
from trainer.events import (CheckpointSaved, Failed, Finished, Progress, Started, Status, from_json_line,
                            to_json_line)
from trainer.runs import state
from trainer.runs.folder import RunFolder
from trainer.training import schedule
from trainer.training.job import run_training


def scene(size, disc=(240, 40, 40), ground=(30, 120, 200), at=0.5) -> tuple[Image.Image, Image.Image]:
    """A disc of colour ``disc`` centred at ``at`` (a fraction of the width) on a ``ground`` background; its mask."""
    w, h = size
    box = (int(w * (at - 0.22)), int(h * 0.25), int(w * (at + 0.22)), int(h * 0.8))
    image = Image.new("RGB", size, ground)
    ImageDraw.Draw(image).ellipse(box, fill=disc)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask


def a_set(shapes=((96, 128), (128, 96), (112, 112))) -> list[SetImage]:
    """Pictures of different shapes and content, each with its mask and its own caption."""
    colours = ((240, 40, 40), (40, 200, 60), (250, 220, 30), (200, 60, 220))
    out = []
    for index, size in enumerate(shapes):
        image, mask = scene(size, disc=colours[index % 4], at=0.3 + 0.2 * (index % 3))
        out.append(SetImage(f"view{index}.png", image, mask, f"a photo of [trigger], view {index}"))
    return out


def train_set(folder: Path, items, **overrides):
    run = RunFolder.create_set_at(folder, tiny_config(**overrides), items)
    return run, list(run_training(run))


def finished(events):
    assert isinstance(events[-1], Finished) and not events[-1].stopped, events[-1]
    return events


# ---- epochs and steps, the learning-rate rule, the order ---------------------------------------------------------

def test_epochs_and_steps_on_the_practitioners_cases():
    assert schedule.steps_for_epochs(100, images=20) == 2000  # batch 1: one image per step
    assert schedule.steps_for_epochs(100, images=20, batch_size=4) == 500
    assert schedule.steps_for_epochs(100, images=20, batch_size=4, gpus=2) == 250  # each GPU takes 250 steps
    # and the reverse: the steps shown as epochs of this set
    assert schedule.epochs_at_step(2000, images=20) == 100
    assert schedule.epochs_at_step(500, images=20, batch_size=4) == 100
    assert schedule.epochs_at_step(250, images=20, batch_size=4, gpus=2) == 100
    assert schedule.epochs_at_step(30, images=4) == 7.5  # checkpoints fall mid-epoch: fractional epochs
    assert schedule.steps_for_epochs(400, images=1) == 400  # one image: an epoch is a step, as before sets
    assert schedule.steps_for_epochs(1, images=3, batch_size=2) == 2  # the last epoch is never cut short


def test_the_learning_rate_rule_is_one_function_for_batch_and_gpus():
    from trainer.training import distributed

    assert schedule.scaled_learning_rate(1e-4, gpus=1, batch_size=4) == pytest.approx(2e-4)  # PRACTICE.md §7's example
    assert schedule.scaled_learning_rate(4e-4, gpus=2) == pytest.approx(4e-4 * math.sqrt(2))
    assert schedule.scaled_learning_rate(4e-4, gpus=2, batch_size=4) == pytest.approx(4e-4 * math.sqrt(8))
    assert schedule.scaled_learning_rate(4e-4) == 4e-4  # exactly: batch 1 on one GPU is the setting itself
    assert api.scaled_learning_rate is schedule.scaled_learning_rate  # the page asks the same function
    assert not hasattr(distributed, "scaled_learning_rate")  # no second owner of the rule
    assert schedule.learning_rate_note(4e-4) == ""
    assert "x sqrt(8) = 0.00113" in schedule.learning_rate_note(4e-4, batch_size=4, gpus=2)


def test_every_epoch_shows_every_image_once_in_a_seeded_order_split_over_gpus():
    order = [schedule.sample_indices(5, seed=7, step=s)[0] for s in range(1, 16)]
    epochs = [order[i:i + 5] for i in range(0, 15, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs)  # each epoch: every image once
    assert len({tuple(e) for e in epochs}) > 1  # shuffled afresh per epoch
    assert order == [schedule.sample_indices(5, seed=7, step=s)[0] for s in range(1, 16)]  # seeded: the same again
    assert order != [schedule.sample_indices(5, seed=8, step=s)[0] for s in range(1, 16)]
    # batch 2 on 3 processes: each takes its own adjacent slice of the step's 6 positions of the same order
    flat = [schedule.sample_indices(5, seed=7, step=s)[0] for s in range(1, 31)]
    for step in (1, 2, 5):
        slices = [schedule.sample_indices(5, 7, step, batch_size=2, gpus=3, rank=r) for r in range(3)]
        assert sum(slices, []) == flat[(step - 1) * 6:step * 6]
    assert schedule.sample_indices(1, seed=3, step=9, batch_size=3) == [0, 0, 0]  # one image: always that image


def test_the_length_can_be_asked_in_epochs_through_the_front_door():
    request = dict(caption="a photo of [trigger]", model="tiny-demo", images=4)
    config, _ = api.training_config(api.RunRequest(**request, epochs=100, overrides={"batch_size": 4}))
    assert config.steps == 100 and config.batch_size == 4
    config, _ = api.training_config(api.RunRequest(**request, epochs=100, gpus=2))
    assert config.steps == 200
    with pytest.raises(UserError, match="steps or in epochs, not both"):
        api.training_config(api.RunRequest(**request, epochs=2, overrides={"steps": 5}))
    with pytest.raises(UserError, match="batch_size must be between 1 and 16"):
        api.training_config(api.RunRequest(**request, overrides={"batch_size": 0}))


# ---- aspect buckets --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [512, 1024])
@pytest.mark.parametrize("shape", [(1000, 1000), (2000, 3000), (3000, 2000), (1536, 2048), (1080, 1920), (4000, 1700)])
def test_bucketed_sizes_keep_the_aspect_and_the_area(shape, resolution):
    width, height = shape
    w, h = training_size(width, height, resolution)
    assert w % SIDE_MULTIPLE == 0 and h % SIDE_MULTIPLE == 0  # VAE 8x, then 2x2 patches (both families)
    assert 0.9 * resolution ** 2 <= w * h <= resolution ** 2  # the same area for every shape
    # the shape is kept up to the rounding of each side to 16 pixels
    assert abs(w / h - width / height) <= (width / height) * (SIDE_MULTIPLE / min(w, h) + SIDE_MULTIPLE / max(w, h))
    tall = prepare_image(Image.new("RGB", shape), Image.new("L", shape, 255), resolution)
    assert tall.size == (w, h) and tall.mask.shape[-2:] == (h, w)  # no square crop


# ---- one image behaves exactly as before -------------------------------------------------------------------------

def test_a_set_of_one_trains_bit_identically_to_the_single_image_entry(tmp_path):
    # augmentation and whole-image steps on: every random stream of the one-image path is exercised
    settings = dict(steps=4, save_every=2, augment_probability=0.5, unmasked_probability=0.3)
    image, mask = subject_image((96, 112))
    single = RunFolder.create_at(tmp_path / "single", tiny_config(**settings), image, mask)
    finished(list(run_training(single)))
    as_set, events = train_set(tmp_path / "set", [SetImage("own name.png", image, mask, "")], **settings)
    finished(events)
    for step in (2, 4):
        assert_same_lora(single.checkpoint_path(step), as_set.checkpoint_path(step))
    # the same folder and the same checkpoint metadata as before sets: nothing says "set" about a set of one
    assert sorted(p.name for p in (single.path / "dataset").iterdir()) == ["image.png", "mask.png"]
    meta = safetensors.safe_open(str(as_set.checkpoint_path(4)), "pt").metadata()
    assert "images" not in meta and "epoch" not in meta
    # ... while a second image does change the result (so the comparison above could fail)
    other, _ = scene((112, 96), disc=(40, 200, 60))
    two, events = train_set(tmp_path / "two", [SetImage("a.png", image, mask, ""), SetImage("b.png", other, None, "")],
                            **settings)
    finished(events)
    a, b = safetensors.torch.load_file(single.checkpoint_path(4)), safetensors.torch.load_file(two.checkpoint_path(4))
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ---- several images: the run, its record, its resume ---------------------------------------------------------------

@pytest.fixture(scope="module")
def set_run(tmp_path_factory, tiny_model_dir):
    """A 3-picture run of three shapes, batch 2, augmentation on, a save every 2 steps: the reference for resume."""
    from trainer import runtime

    data = tmp_path_factory.mktemp("data")
    (data / "models").mkdir()
    (data / "models" / "tiny-demo").symlink_to(tiny_model_dir, target_is_directory=True)
    with runtime.using(runtime.Runtime.from_environment({"ONE_IMAGE_LORA_DATA_DIR": str(data)})):
        run, events = train_set(tmp_path_factory.mktemp("set") / "run", a_set(), steps=6, save_every=2, batch_size=2,
                                augment_probability=0.3)
    return run, finished(events)


def test_a_set_trains_each_image_at_its_own_size_and_says_how_steps_count(set_run):
    run, events = set_run
    items = a_set()
    started = next(e for e in events if isinstance(e, Started))
    assert started.images == 3 and started.batch_size == 2 and started.gpus == 1
    assert started.train_sizes == tuple(training_size(i.image.width, i.image.height, 64) for i in items)
    assert (started.train_width, started.train_height) == started.train_sizes[0]  # the previews' size: the first's
    assert started.epochs == 4.0  # 6 steps x 2 images per step / 3 images
    assert started.learning_rate == pytest.approx(run.config.learning_rate * math.sqrt(2))
    assert any(isinstance(e, Status) and "x sqrt(2)" in e.message for e in events)  # the rule is reported
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [(e.step, e.epoch) for e in saved] == [(2, 4 / 3), (4, 8 / 3), (6, 4.0)]
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, Progress))
    # the optimizer really trained at the scaled rate (the training state keeps its hyper-parameters)
    meta = json.loads(state.state_files(run.path, 2)[1].read_text())
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(run.config.learning_rate * math.sqrt(2))


def test_the_run_folder_keeps_every_image_mask_and_caption_and_run_json_lists_them(set_run):
    run, _ = set_run
    manifest = json.loads((run.path / "run.json").read_text())
    listed = manifest["dataset"]["images"]
    assert [e["name"] for e in listed] == ["view0.png", "view1.png", "view2.png"]
    assert [e["caption"] for e in listed] == [f"a photo of [trigger], view {i}" for i in range(3)]
    for entry, item in zip(listed, a_set()):
        assert np.array_equal(np.asarray(Image.open(run.path / entry["image"])), np.asarray(item.image))
        assert np.array_equal(np.asarray(Image.open(run.path / entry["mask"])), np.asarray(item.mask))
    assert [(c["step"], c["epoch"]) for c in manifest["checkpoints"]] == [(2, 1.3333), (4, 2.6667), (6, 4.0)]
    assert manifest["schedule"]["images"] == 3 and manifest["schedule"]["batch_size"] == 2
    assert manifest["schedule"]["train_sizes"] == [[48, 64], [64, 48], [64, 64]]
    reopened = RunFolder.open(run.path).load_set()
    assert [i.caption for i in reopened] == [e["caption"] for e in listed]
    meta = safetensors.safe_open(str(run.checkpoint_path(6)), "pt").metadata()
    assert meta["images"] == "3" and meta["batch_size"] == "2" and meta["epoch"] == "4"


def test_resuming_a_set_mid_epoch_is_bit_identical(set_run, tmp_path):
    reference, _ = set_run
    shutil.copytree(reference.path, tmp_path / "run")
    run = RunFolder.open(tmp_path / "run")
    for step in (4, 6):  # as if killed after the step-2 save: mid-epoch (4 pictures seen of 3 + 3)
        run.checkpoint_path(step).unlink()
        for f in state.state_files(run.path, step):
            f.unlink()
    run.set_status("interrupted")
    events = finished(list(run_training(RunFolder.open(run.path), resume=True)))
    assert [e.step for e in events if isinstance(e, Progress)] == [3, 4, 5, 6]
    for step in (4, 6):  # the shuffled order continued where it was, as did every random stream
        assert_same_lora(reference.checkpoint_path(step), run.checkpoint_path(step))


def test_a_set_whose_captions_changed_is_not_resumed(set_run, tmp_path):
    reference, _ = set_run
    shutil.copytree(reference.path, tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    manifest["dataset"]["images"][2]["caption"] = "something else"  # edited after the saves
    manifest["status"] = "interrupted"
    (tmp_path / "run" / "run.json").write_text(json.dumps(manifest))
    for f in (*state.state_files(tmp_path / "run", 6), tmp_path / "run" / "lora-000006.safetensors"):
        f.unlink()
    events = list(run_training(RunFolder.open(tmp_path / "run"), resume=True))
    assert isinstance(events[-1], Failed) and "different settings" in events[-1].message


def test_the_new_event_fields_cross_the_process_boundary():
    started = Started(run_dir=Path("/r"), total_steps=6, checkpoint_steps=(2, 6), train_width=48, train_height=64,
                      images=3, batch_size=2, gpus=2, learning_rate=8e-4, epochs=8.0, train_sizes=((48, 64), (64, 48)))
    saved = CheckpointSaved(step=2, path=Path("/r/lora-000002.safetensors"), size_bytes=10, epoch=2.5)
    for event in (started, saved, Progress(step=1, total_steps=6, loss=0.5, steps_per_second=1.0, eta_seconds=5.0,
                                           epoch=1.25)):
        assert from_json_line(to_json_line(event)) == event
    old = '{"type": "Started", "run_dir": "/r", "total_steps": 4, "checkpoint_steps": [4], "train_width": 64, ' \
          '"train_height": 64}'
    assert from_json_line(old).images == 1  # an event line from before sets still parses


@pytest.mark.parametrize("model", ["tiny-demo", "tiny-klein"])
def test_a_set_of_several_shapes_trains_on_both_families(model, tmp_path, isolated_data_dir, tiny_klein_dir):
    if model == "tiny-klein":
        (isolated_data_dir / "models" / "tiny-klein").symlink_to(tiny_klein_dir, target_is_directory=True)
    items = a_set(((96, 128), (128, 96)))
    run, events = train_set(tmp_path / "run", items, model=model, steps=4, save_every=2, batch_size=2,
                            learning_rate=2e-2)
    finished(events)
    started = next(e for e in events if isinstance(e, Started))
    assert started.train_sizes == ((48, 64), (64, 48))
    assert [e.epoch for e in events if isinstance(e, CheckpointSaved)] == [2.0, 4.0]
    first = safetensors.torch.load_file(run.checkpoint_path(2))
    last = safetensors.torch.load_file(run.checkpoint_path(4))
    assert all(torch.isfinite(t).all() for t in last.values())
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained


# ---- bad input in the set ---------------------------------------------------------------------------------------

def write_folder(folder: Path, count: int, captions: bool = True) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        image, _ = scene((96 + 8 * index, 112), disc=(20 * index % 255, 200, 40), at=0.3 + 0.04 * index)
        name = f"pic{index:02d}.png"
        image.save(folder / name)
        if captions:
            (folder / name).with_suffix(".txt").write_text(f"a photo of [trigger], pose {index}\n")
        names.append(name)
    return names


def test_a_bomb_among_good_pictures_is_left_out_by_name_and_the_others_kept(tmp_path):
    names = write_folder(tmp_path / "set", 3)
    (tmp_path / "set" / "bomb.png").write_bytes(bomb_png(12000, 12000))
    loaded = imageset.load_folder(tmp_path / "set")
    assert loaded.names == names
    assert len(loaded.skipped) == 1 and "'bomb.png' was left out" in loaded.skipped[0]
    assert "12000x12000" in loaded.skipped[0]  # the gate's own reason
    assert [i.caption for i in loaded.images] == [f"a photo of [trigger], pose {i}" for i in range(3)]


def test_a_duplicate_picture_is_left_out_naming_the_one_it_repeats(tmp_path):
    write_folder(tmp_path / "set", 2)
    Image.open(tmp_path / "set" / "pic01.png").save(tmp_path / "set" / "zcopy.webp", lossless=True)
    loaded = imageset.load_folder(tmp_path / "set")
    assert loaded.names == ["pic00.png", "pic01.png"]
    assert len(loaded.skipped) == 1
    assert "'zcopy.webp' was left out" in loaded.skipped[0] and "same picture as 'pic01.png'" in loaded.skipped[0]


def test_eleven_pictures_are_refused_naming_the_ones_over_the_limit(tmp_path):
    write_folder(tmp_path / "set", 11)
    with pytest.raises(UserError, match=r"11 images were given; a set holds at most 10.*'pic10.png'"):
        imageset.load_folder(tmp_path / "set")
    paths = [tmp_path / "set" / f"pic{i:02d}.png" for i in range(11)]
    with pytest.raises(UserError, match="at most 10"):
        imageset.load_images(paths, ["x"])


def test_a_set_with_nothing_usable_is_refused_and_one_bad_picture_keeps_its_own_message(tmp_path):
    (tmp_path / "a.png").write_text("not a picture")
    (tmp_path / "b.png").write_bytes(bomb_png(12000, 12000))
    with pytest.raises(UserError, match="None of the images can be used: 'a.png' was left out.*'b.png' was left out"):
        imageset.load_images([tmp_path / "a.png", tmp_path / "b.png"])
    with pytest.raises(UserError, match="^The image 'a.png' is not a PNG, JPEG or WEBP image"):
        imageset.load_images([tmp_path / "a.png"])
    with pytest.raises(UserError, match="2 images and 3 captions"):
        imageset.load_images([tmp_path / "a.png", tmp_path / "b.png"], ["x", "y", "z"])


def test_a_mask_of_the_wrong_shape_leaves_its_picture_out(tmp_path):
    write_folder(tmp_path / "set", 2)
    (tmp_path / "set" / "masks").mkdir()
    Image.new("L", (300, 100), 255).save(tmp_path / "set" / "masks" / "pic00.png")
    loaded = imageset.load_folder(tmp_path / "set")
    assert loaded.names == ["pic01.png"]
    assert "'pic00.png' was left out" in loaded.skipped[0] and "300x100" in loaded.skipped[0]


# ---- set advice -------------------------------------------------------------------------------------------------

def test_set_advice_names_mixed_shapes_a_much_smaller_picture_and_near_duplicates(tmp_path):
    varied = a_set(((120, 160), (128, 160), (136, 160)))  # similar shapes, different pictures, similar sizes
    assert advice.set_advice(varied) == []
    assert advice.set_advice(varied[:1]) == []  # one picture: image_advice's job

    mixed = a_set(((96, 160), (160, 96), (128, 128)))
    codes = [(a.code, a.message) for a in advice.set_advice(mixed)]
    assert [c for c, _ in codes] == ["mixed_aspect"]
    assert "'view1.png' is wide" in codes[0][1] and "'view0.png' is tall" in codes[0][1]

    small = varied[:2] + [SetImage("tiny.png", varied[2].image.resize((60, 80)), None, "")]  # a quarter of the pixels
    found = advice.set_advice(small)
    assert [a.code for a in found] == ["much_smaller"] and "'tiny.png' is 60x80" in found[0].message

    # the same shot re-saved as a JPEG a little brighter is not an exact duplicate (it loads) but adds nothing
    image = varied[1].image.point(lambda v: min(255, v + 6))
    image.save(tmp_path / "again.jpg", quality=85)
    again = SetImage("again.jpg", Image.open(tmp_path / "again.jpg").convert("RGB"), None, "")
    found = advice.set_advice([*varied, again])
    assert [a.code for a in found] == ["near_duplicate"]
    assert "'view1.png' and 'again.jpg' are nearly the same picture" in found[0].message


# ---- the CLI -------------------------------------------------------------------------------------------------------

def test_cli_trains_a_dataset_folder_in_the_kohya_layout(tmp_path):
    folder = tmp_path / "my set"
    write_folder(folder, 2)
    (folder / "masks").mkdir()
    _, mask = scene((96, 112), at=0.3)
    mask.save(folder / "masks" / "pic00.png")
    cut, cut_mask = scene((128, 96), disc=(250, 220, 30), at=0.7)  # a transparent PNG: its alpha is its mask
    cut = cut.convert("RGBA")
    cut.putalpha(cut_mask)
    cut.save(folder / "pic02.png")  # no pic02.txt: --caption is its caption
    (folder / "broken.png").write_bytes(bomb_png(12000, 12000))
    (folder / "notes.md").write_text("not part of the set")
    out = tmp_path / "run"
    result = cli("train", "--dataset", folder, "--caption", "a photo of [trigger]", "--trigger", "ohwx",
                 "--preset", "quick-test-250", "--model", "tiny-demo", "--epochs", 2, "--save-every", 3,
                 "--resolution", 64, "--seed", 3, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "warning: 'broken.png' was left out" in result.stderr
    assert "training 6 steps = 2 epochs of 3 pictures" in result.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["config"]["steps"] == 6
    listed = manifest["dataset"]["images"]
    assert [e["name"] for e in listed] == ["pic00.png", "pic01.png", "pic02.png"]
    assert [e["caption"] for e in listed] == ["a photo of [trigger], pose 0", "a photo of [trigger], pose 1",
                                              "a photo of [trigger]"]
    assert np.array_equal(np.asarray(Image.open(out / listed[0]["mask"])), np.asarray(mask))  # masks/pic00.png
    assert np.array_equal(np.asarray(Image.open(out / listed[2]["mask"])), np.asarray(cut_mask))  # its alpha
    assert listed[1]["mask"] and (out / listed[1]["mask"]).is_file()  # the automatic one
    assert [(c["step"], c["epoch"]) for c in manifest["checkpoints"]] == [(3, 1.0), (6, 2.0)]
    assert manifest["config"]["caption"] == "a photo of [trigger], pose 0"  # the previews re-create the first


def test_cli_repeated_image_and_one_image_dataset_match_the_single_image_run(tmp_path):
    image, mask = subject_image((96, 112))
    (tmp_path / "one").mkdir()
    image.save(tmp_path / "one" / "ball.png")
    (tmp_path / "one" / "ball.txt").write_text("a photo of [trigger], a red ball")
    mask.save(tmp_path / "mask.png")
    common = ["--trigger", "ohwx", "--model", "tiny-demo", "--steps", 2, "--save-every", 2, "--resolution", 64,
              "--mask", tmp_path / "mask.png", "--seed", 4]
    single = cli("train", "--image", tmp_path / "one" / "ball.png", "--caption", "a photo of [trigger], a red ball",
                 *common, "--output", tmp_path / "a")
    assert single.returncode == 0, single.stderr
    as_set = cli("train", "--dataset", tmp_path / "one", *common, "--output", tmp_path / "b")
    assert as_set.returncode == 0, as_set.stderr
    assert_same_lora(tmp_path / "a" / "lora-000002.safetensors", tmp_path / "b" / "lora-000002.safetensors")
    other, _ = scene((112, 96))
    other.save(tmp_path / "other.png")
    two = cli("train", "--image", tmp_path / "one" / "ball.png", "--image", tmp_path / "other.png", "--caption", "x",
              "--mask", tmp_path / "mask.png", "--model", "tiny-demo", "--output", tmp_path / "c")
    assert two.returncode == 2 and "--mask and --subject-point are for one --image" in two.stderr


def test_two_processes_train_different_pictures_of_a_set_into_one_identical_lora(tmp_path):
    """Data parallel on the CPU (gloo): each process takes its own picture of the step, the LoRA stays identical."""
    import os
    import subprocess
    import sys

    write_folder(tmp_path / "set", 3)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", "train",
         "--dataset", str(tmp_path / "set"), "--trigger", "ohwx", "--model", "tiny-demo", "--epochs", "2",
         "--save-every", "3", "--resolution", "64", "--no-mask", "--output", str(out)],
        cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "training 3 steps = 2 epochs of 3 pictures (batch 1 x 2 processes per step" in err  # 3 x 2 / (1 x 2)
    assert "2 processes: 2 images per step, learning rate 0.0004 x sqrt(2) = 0.000566" in err
    assert "LoRA identical in all 2 processes at step 3" in err
    manifest = json.loads((out / "run.json").read_text())
    assert [(c["step"], c["epoch"]) for c in manifest["checkpoints"]] == [(3, 2.0)]
    assert manifest["schedule"]["gpus"] == 2
