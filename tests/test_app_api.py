"""End to end through the app's API with ``gradio_client``: the same calls the page makes.

upload → mask → caption → preset → train → previews → download, on the CPU tiny-demo model with tiny
settings; plus the refusals a user can run into (bad uploads, no image, a second job), Stop, and
isolation between two sessions. Each API client is one session (its session hash is its owner id).
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.conftest import subject_image
from trainer.events import Progress
from tests.helpers_app import launched_app, write_subject_png

CAPTION, TRIGGER = "a photo of [trigger]", "ohwx"
EXTRA_PROMPT = "[trigger] as a watercolor painting"
RUN_TIMEOUT = 300  # seconds; a 4-step tiny-demo run takes ~20 s on a free 2-core CPU


@pytest.fixture
def app(tmp_path):
    with launched_app(tmp_path) as running:
        yield running


def new_client(app, tmp_path: Path, name: str) -> Client:
    return Client(app.url, verbose=False, download_files=str(tmp_path / "downloads" / name))


def prepare(client: Client, path: Path):
    """/prepare_dataset: (overlay image path or None, description markdown)."""
    return client.predict(handle_file(str(path)), None, True, "u2netp", api_name="/prepare_dataset")


def train(client: Client, steps: int, save_every: int, prompts: str = EXTRA_PROMPT) -> str:
    """/train with the page's order of inputs; the owner (BrowserState) is None, so the session is the owner."""
    return client.predict(None, CAPTION, TRIGGER, prompts, "character-rank4-400", 4, steps, 4e-4, save_every,
                          "tiny-demo", api_name="/train")


def follow_to_end(client: Client, timeout: float = RUN_TIMEOUT) -> list[tuple]:
    """/follow until the job ends; every streamed update, in order."""
    job = client.submit(None, api_name="/follow")
    job.result(timeout=timeout)
    outputs = job.outputs()
    assert outputs, "/follow streamed nothing"
    return outputs


def wait_for_output(job, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outputs = job.outputs()
        if outputs and predicate(outputs[-1]):
            return outputs[-1]
        if job.done():
            break
        time.sleep(0.2)
    last = job.outputs()[-1][0] if job.outputs() else None
    raise AssertionError(f"timed out waiting for {what}; last progress: {last!r}")


def loss_steps(update) -> list[int]:
    return [int(row[0]) for row in update[1]["data"]]


def load_checkpoint(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def assert_lora_checkpoint(path: str) -> dict:
    assert Path(path).is_file(), f"checkpoint {path} was not downloaded"
    assert path.endswith(".safetensors")
    tensors = load_checkpoint(path)
    assert tensors, f"{path} holds no tensors"
    for key in tensors:
        assert key.startswith("transformer."), key
        assert "lora" in key, key
    return tensors


# ---------------------------------------------------------------------------------------------------------


def test_upload_mask_caption_preset_train_previews_download(app, tmp_path):
    client = new_client(app, tmp_path, "main")

    # 1-2. upload: the automatic mask dims the background and leaves the subject as it is
    overlay_path, description = prepare(client, write_subject_png(tmp_path))
    assert "automatic background removal" in description
    assert "160×200" in description
    assert overlay_path and Path(overlay_path).is_file()
    original = subject_image()[0]
    with Image.open(overlay_path) as overlay:
        overlay = overlay.convert("RGB")
    assert overlay.size == original.size
    subject, background = (80, 100), (5, 5)  # the disc's centre; a corner of the sky
    assert all(abs(a - b) <= 20 for a, b in zip(overlay.getpixel(subject), original.getpixel(subject)))
    assert sum(overlay.getpixel(background)) < 0.6 * sum(original.getpixel(background)), "background not dimmed"

    # 3-5. caption, preset (overridden to tiny settings) and model; /train only queues the job
    assert train(client, steps=4, save_every=2) == "Starting…"

    # 6. follow the stream to the end
    updates = follow_to_end(client)
    final = updates[-1]
    progress, plot, gallery, checkpoints = final
    assert progress.startswith("**Finished: 4 steps, 2 checkpoint(s).**"), progress
    assert "Step **4 / 4** (100%)" in progress
    assert len(updates) > 1 and not updates[0][0].startswith("**Finished"), "progress was not streamed"
    seen = [len(loss_steps(u)) for u in updates]
    assert seen == sorted(seen), "the loss curve lost points while streaming"

    # loss curve: one finite point per step, on numeric axes
    assert plot["columns"] == ["step", "loss"]
    for update in updates:
        if update[1]["data"]:
            assert update[1]["datatypes"] == {"step": "quantitative", "loss": "quantitative"}, update[1]
    assert loss_steps(final) == [1, 2, 3, 4]
    assert all(math.isfinite(float(row[1])) for row in plot["data"])

    # previews: every checkpoint, the newest first, then the base model at step 0, each prompt labelled with its step
    prompts = ["a photo of ohwx", "ohwx as a watercolor painting"]
    labels = [item["caption"] for item in gallery]
    assert labels == [f"{step} · {prompt}" for step in ("step 4", "step 2", "base model (step 0)")
                      for prompt in prompts]
    sizes = set()
    for item in gallery:
        assert Path(item["image"]).is_file(), item
        with Image.open(item["image"]) as im:
            sizes.add(im.size)
    assert len(sizes) == 1 and min(sizes.pop()) >= 64

    # checkpoints: downloaded by the client, LoRA-only safetensors, identical to the files in the run folder
    assert [Path(p).name for p in checkpoints] == ["lora-000002.safetensors", "lora-000004.safetensors"]
    first, last = (assert_lora_checkpoint(p) for p in checkpoints)
    assert first.keys() == last.keys()
    assert any(not first[k].equal(last[k]) for k in first), "steps 3-4 did not change the LoRA"
    for path in checkpoints:
        on_server = list(app.runs_root.rglob(Path(path).name))
        assert len(on_server) == 1 and on_server[0].read_bytes() == Path(path).read_bytes()

    # the job is over: Stop has nothing to stop, and /follow replays the finished run
    assert client.predict(None, api_name="/stop") == "Nothing is running."
    assert follow_to_end(client)[-1][0] == progress


def test_bad_uploads_get_a_clear_message_not_a_traceback(app, tmp_path):
    client = new_client(app, tmp_path, "bad")

    text_as_png = tmp_path / "notes.png"
    text_as_png.write_text("these are my notes, not a picture\n")
    overlay, description = prepare(client, text_as_png)
    assert overlay is None
    assert description.startswith("❌ ")
    assert "not a PNG, JPEG or WEBP image" in description
    assert "Traceback" not in description and "Error" not in description

    gif_as_png = tmp_path / "animation.png"
    subject_image()[0].save(gif_as_png, format="GIF")
    overlay, description = prepare(client, gif_as_png)
    assert overlay is None
    assert description.startswith("❌ ") and "GIF" in description and "export it as PNG or JPEG" in description
    assert "Traceback" not in description

    # A real .gif does not get through Gradio's own file-type filter (file_types on the upload box).
    gif = tmp_path / "animation.gif"
    subject_image()[0].save(gif, format="GIF")
    with pytest.raises(AppError) as refused:
        prepare(client, gif)
    assert "Invalid file type" in str(refused.value) and ".png" in str(refused.value)
    assert "Traceback" not in str(refused.value)

    # None of these left an image behind for training, and Train says why: the upload was refused, and the reason.
    with pytest.raises(AppError) as refused:
        train(client, steps=4, save_every=2)
    said = str(refused.value)
    assert "your upload was refused" in said and "GIF" in said and "Upload a PNG, JPEG or WEBP" in said, said
    assert app.manager.jobs_for(client.session_hash) == []


def test_train_without_an_image_says_to_upload_one(app, tmp_path):
    client = new_client(app, tmp_path, "empty")
    with pytest.raises(AppError) as refused:
        train(client, steps=4, save_every=2)
    message = str(refused.value)
    assert re.search(r"upload an image", message, re.IGNORECASE), message
    assert "Traceback" not in message
    assert app.manager.jobs_for(client.session_hash) == []
    # /follow with no job: an empty training section, not an error
    progress, plot, gallery, checkpoints = follow_to_end(client, timeout=30)[-1]
    assert progress == "" and plot["data"] == [] and gallery == [] and not checkpoints


def test_the_loss_plot_is_numeric_even_before_the_first_step(app, tmp_path):
    # The page's load event calls the same follow as /follow; with no job yet it sends an empty curve, and
    # that first value decides the plot's axis types in the browser.
    client = new_client(app, tmp_path, "plot")
    plot = follow_to_end(client, timeout=30)[-1][1]
    assert plot["data"] == []
    assert plot["datatypes"] == {"step": "quantitative", "loss": "quantitative"}


def test_one_job_at_a_time_and_stop_keeps_the_saved_checkpoints(app, tmp_path):
    client = new_client(app, tmp_path, "stop")
    prepare(client, write_subject_png(tmp_path))
    assert train(client, steps=40, save_every=2, prompts="") == "Starting…"

    # a second Train while the first runs is refused with a message, and nothing is queued
    with pytest.raises(AppError, match="already running"):
        train(client, steps=40, save_every=2, prompts="")
    jobs = app.manager.jobs_for(client.session_hash)
    assert len(jobs) == 1
    job = jobs[0]

    stream = client.submit(None, api_name="/follow")
    wait_for_output(stream, lambda u: bool(u[3]), RUN_TIMEOUT, "the first checkpoint")
    assert job.active

    assert client.predict(None, api_name="/stop") == "Stopping after the current step…"
    stopped_at = time.monotonic()
    step_at_stop = max((e.step for e in list(job.events) if isinstance(e, Progress)), default=0)

    stream.result(timeout=120)
    waited = time.monotonic() - stopped_at
    progress, plot, _, checkpoints = stream.outputs()[-1]
    found = re.match(r"\*\*Stopped at step (\d+)\. (\d+) checkpoint\(s\) kept\.\*\*", progress)
    assert found, progress
    last_step, kept = int(found.group(1)), int(found.group(2))
    assert step_at_stop <= last_step <= step_at_stop + 1 < 40, (step_at_stop, last_step)
    assert waited < 60, f"Stop took {waited:.0f} s"
    assert job.state == "stopped"
    assert max(loss_steps(stream.outputs()[-1])) == last_step

    # the checkpoints saved before Stop are kept: streamed, downloadable and on disk
    assert kept >= 1 and len(checkpoints) == kept
    expected = [f"lora-{s:06d}.safetensors" for s in range(2, last_step + 1, 2)]
    assert [Path(p).name for p in checkpoints] == expected
    for path in checkpoints:
        assert_lora_checkpoint(path)
        assert (job.run.path / Path(path).name).is_file()

    assert client.predict(None, api_name="/stop") == "Nothing is running."


def test_two_sessions_do_not_see_each_others_job(app, tmp_path):
    alice, bob = new_client(app, tmp_path, "alice"), new_client(app, tmp_path, "bob")
    assert alice.session_hash != bob.session_hash
    prepare(alice, write_subject_png(tmp_path))
    train(alice, steps=40, save_every=20, prompts="")
    alice_job = app.manager.latest_for(alice.session_hash)
    stream = alice.submit(None, api_name="/follow")
    wait_for_output(stream, lambda u: "Step **" in u[0], RUN_TIMEOUT, "alice's first step")

    # Bob sees no job, cannot stop Alice's, and cannot train on Alice's uploaded image.
    progress, plot, gallery, checkpoints = follow_to_end(bob, timeout=30)[-1]
    assert progress == "" and plot["data"] == [] and gallery == [] and not checkpoints
    assert bob.predict(None, api_name="/stop") == "Nothing is running."
    assert alice_job.active and not alice_job.stop_requested
    with pytest.raises(AppError, match="Upload an image first"):
        train(bob, steps=4, save_every=2)

    # Bob's own job waits behind Alice's (one worker); his /follow shows his place in the queue, not her run.
    prepare(bob, write_subject_png(tmp_path, "bob.png"))
    assert train(bob, steps=4, save_every=2, prompts="") == "Starting…"
    bob_stream = bob.submit(None, api_name="/follow")
    queued = wait_for_output(bob_stream, lambda u: bool(u[0]), 30, "bob's queue position")
    assert queued[0].startswith("**Queued**: position 1."), queued[0]
    assert queued[1]["data"] == [] and queued[2] == [] and not queued[3]
    assert bob.predict(None, api_name="/stop") == "Stopping after the current step…"
    bob_stream.result(timeout=30)
    assert bob_stream.outputs()[-1][0].startswith("**Stopped at step 0. 0 checkpoint(s) kept.**")

    # Alice's run went on untouched, and only her stop ends it.
    assert alice_job.active
    latest = stream.outputs()[-1]
    assert "Queued" not in latest[0] and "Step **" in latest[0]
    assert alice.predict(None, api_name="/stop") == "Stopping after the current step…"
    stream.result(timeout=120)
    assert stream.outputs()[-1][0].startswith("**Stopped at step ")
    assert [j.owner for j in app.manager.jobs_for(alice.session_hash)] == [alice.session_hash]




def test_train_api_takes_left_out_settings_from_the_named_preset(app, tmp_path):
    # gradio_client fills a left-out input with its component's initial value; the page's controls start at the
    # first preset's values, so /train used to train a style preset with the character preset's background
    # augmentation (and, left out by keyword, its rank and learning rate).
    from trainer.config import load_preset

    style, first = load_preset("style-rank16-2000").config(), load_preset("character-rank4-400").config()
    loss = ("background_weight", "normalize_mask", "unmasked_probability", "augment_probability")
    assert style.augment_probability != first.augment_probability, "the presets must differ for this test"
    assert (style.rank, style.learning_rate) != (first.rank, first.learning_rate)
    given = dict(background_weight=0.1, normalize_mask=False, unmasked_probability=0.2, augment_probability=0.5)
    calls = {  # two sessions, one job each (the second is queued behind the first)
        "positional": lambda c: c.predict(None, CAPTION, TRIGGER, "", "style-rank16-2000", 4, 2, 4e-4, 1,
                                          "tiny-demo", api_name="/train"),
        "keywords": lambda c: c.predict(None, caption=CAPTION, trigger=TRIGGER, prompts="", preset="style-rank16-2000",
                                        steps=2, save_every=1, model="tiny-demo", api_name="/train", **given),
    }
    clients = []
    for name, call in calls.items():
        client = new_client(app, tmp_path, name)
        prepare(client, write_subject_png(tmp_path))
        try:
            assert call(client) == "Starting…"
            config = app.manager.jobs_for(client.session_hash)[-1].run.config
        finally:
            clients.append(client)
        if name == "positional":  # loss settings left out: the named preset's
            assert {f: getattr(config, f) for f in loss} == {f: getattr(style, f) for f in loss}
            assert (config.rank, config.steps, config.learning_rate, config.save_every) == (4, 2, 4e-4, 1)
        else:  # rank and learning rate left out: the named preset's; given loss settings win over the preset's
            assert (config.rank, config.learning_rate, config.steps) == (style.rank, style.learning_rate, 2)
            assert {f: getattr(config, f) for f in loss} == given
    for client in clients:
        client.predict(None, api_name="/stop")
        follow_to_end(client)


def test_own_backgrounds_go_into_the_run_and_a_bad_one_is_refused(app, tmp_path):
    """/train with the user's own background photos (the page's "Your own backgrounds" upload): they are stored
    in the run's dataset/backgrounds/, where the job's augmentation bank reads them. A file that is not an image
    is refused with its name, and no run is created."""
    client = new_client(app, tmp_path, "backgrounds")
    prepare(client, write_subject_png(tmp_path))
    photo = tmp_path / "beach photo.jpg"
    Image.new("RGB", (320, 240), (30, 160, 220)).save(photo)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture")

    with pytest.raises(AppError) as refused:
        client.predict(None, caption=CAPTION, trigger=TRIGGER, prompts="", preset="character-rank4-400", steps=2,
                       save_every=2, model="tiny-demo", backgrounds=[handle_file(str(not_an_image))],
                       api_name="/train")
    assert "notes.png" in str(refused.value) and "Traceback" not in str(refused.value)
    assert app.manager.jobs_for(client.session_hash) == []

    assert client.predict(None, caption=CAPTION, trigger=TRIGGER, prompts="", preset="character-rank4-400", steps=2,
                          save_every=2, model="tiny-demo", backgrounds=[handle_file(str(photo))],
                          api_name="/train") == "Starting…"
    run = app.manager.jobs_for(client.session_hash)[-1].run
    stored = sorted((run.path / "dataset" / "backgrounds").iterdir())
    assert [p.name for p in stored] == ["00.png"]
    with Image.open(stored[0]) as kept:
        assert kept.size == (320, 240) and kept.getpixel((5, 5)) == (30, 160, 220)
    follow_to_end(client)


def test_a_click_on_the_subject_redoes_the_automatic_mask_and_not_a_given_one(app, tmp_path):
    """/subject_point is the page's click on the preview (x, y in the image's pixels). On the subject the automatic
    mask already covers, nothing changes; with the user's own mask there is no automatic mask to redo."""
    import numpy as np

    client = new_client(app, tmp_path, "point")
    image, mask = subject_image((160, 200))
    path = tmp_path / "subject.png"
    image.save(path)
    overlay_before, info = prepare(client, path)
    assert "Click the subject" in info
    ys, xs = np.nonzero(np.asarray(mask) > 127)
    overlay_after, info_after = client.predict("u2netp", float(xs.mean()), float(ys.mean()), api_name="/subject_point")
    assert np.array_equal(np.asarray(Image.open(overlay_after)), np.asarray(Image.open(overlay_before)))
    assert "automatic background removal" in info_after

    own_mask = tmp_path / "own mask.png"
    mask.save(own_mask)
    client.predict(handle_file(str(path)), handle_file(str(own_mask)), True, "u2netp", api_name="/prepare_dataset")
    with pytest.raises(AppError) as refused:
        client.predict("u2netp", 10.0, 10.0, api_name="/subject_point")
    assert "redoes the automatic mask" in str(refused.value) and "your own mask" in str(refused.value)


def test_a_reloaded_page_shows_the_running_jobs_settings_not_the_defaults(tmp_path):
    # The page's load event fills the form from controller.job_settings before it re-attaches to the job.
    import gradio as gr

    from trainer.events import Finished
    from trainer.jobs.manager import JobManager
    from ui.dataset_step import Dataset
    from ui.training_step import SETTINGS, TrainingController, settings_updates

    manager = JobManager(runner=lambda run, should_stop, token=None: iter([Finished(run.path, 0, False)]))
    try:
        controller = TrainingController(manager, tmp_path / "runs")
        assert controller.job_settings("alice") is None
        assert settings_updates(None) == (gr.skip(),) * len(SETTINGS)  # no job: the form stays as it is
        image, mask = subject_image()
        controller.start("alice", Dataset(image, mask, "uploaded mask"), "[trigger] in a red coat", "zkx",
                         "[trigger] on a beach\n[trigger] at night", "style-rank16-2000", 8, 120, 2e-4, 30, "tiny-demo",
                         loss_settings={"background_weight": 0.1, "augment_probability": 0.5}, memory_tier="16gb",
                         batch_size=2)
        settings = controller.job_settings("alice")
        assert settings == dict(
            preset="style-rank16-2000", caption="[trigger] in a red coat", trigger="zkx",
            prompts="[trigger] on a beach\n[trigger] at night", rank=8, steps=120, learning_rate=2e-4, save_every=30,
            batch_size=2, model="tiny-demo", memory_tier="16gb", gpus=1, preview_model="",
            background_weight=0.1, normalize_mask=True, unmasked_probability=0.0, augment_probability=0.5)
        values = dict(zip(SETTINGS, settings_updates(settings)))
        assert values["steps"] == 120 and values["preset"] == "style-rank16-2000" and values["caption"].startswith("[")
        assert values["preview_model"]["value"] == "" and "choices" in values["preview_model"]
        assert controller.job_settings("bob") is None  # only the owner's own job
    finally:
        manager.shutdown()


def test_fixing_the_cause_of_a_refused_train_clears_its_red_error(tmp_path):
    # Gradio keeps an event's "Error" on its outputs until another event outputs to them: an upload or an edit of a
    # setting runs one on the progress box (the browser test sees the red Error go).
    from trainer.jobs.manager import JobManager
    from ui.app import build_app

    demo = build_app(JobManager(), tmp_path / "runs")
    by_id = {b.elem_id: b._id for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    clearing = [fn for fn in demo.fns.values() if [o._id for o in fn.outputs] == [by_id["progress"]]
                and not fn.inputs and not fn.queue]
    triggers = {(getattr(block, "elem_id", None), event) for fn in clearing for block, event in
                ((demo.blocks.get(t[0]) if isinstance(t[0], int) else t[0], t[1]) for t in fn.targets)}
    assert ("image-upload", "change") in triggers and ("caption", "input") in triggers, triggers
