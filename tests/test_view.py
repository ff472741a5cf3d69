"""``ui.view.RunView``: what the training section shows, computed from trainer events alone.

Replaying a job's event history into a fresh view must rebuild the page exactly (that is how a reloaded
tab re-attaches), so these tests build histories by hand and check the text and lists the page shows.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.events import (CheckpointSaved, Failed, Finished, Preview, PreviewsRendered, Progress, Started,
                            Status)
from ui.view import RunView, format_duration

RUN = Path("/runs/r1")
CAPTION, EXTRA = "a photo of ohwx", "ohwx as a watercolor painting"


def previews(step: int) -> PreviewsRendered:
    return PreviewsRendered(step=step, previews=(
        Preview(path=RUN / "previews" / f"{step:06d}-00.png", prompt=CAPTION, seed=42),
        Preview(path=RUN / "previews" / f"{step:06d}-01.png", prompt=EXTRA, seed=42),
    ))


def progress(step: int, total: int = 4, loss: float = 0.5) -> Progress:
    return Progress(step=step, total_steps=total, loss=loss, steps_per_second=2.0, eta_seconds=(total - step) / 2.0)


def history(total: int = 4, every: int = 2) -> list:
    """A complete, successful run's events, in the order ``run_training`` produces them."""
    events = [Status("Resolving model tiny-demo"), Status("Loading model"),
              Started(run_dir=RUN, total_steps=total, checkpoint_steps=tuple(range(every, total + 1, every)),
                      train_width=448, train_height=560),
              Status("Rendering base-model previews (step 0)"), previews(0)]
    for step in range(1, total + 1):
        events.append(progress(step, total, loss=1.0 / step))
        if step % every == 0:
            events += [CheckpointSaved(step=step, path=RUN / f"lora-{step:06d}.safetensors", size_bytes=150_000),
                       Status(f"Rendering previews for step {step}"), previews(step)]
    events.append(Finished(run_dir=RUN, last_step=total, stopped=False))
    return events


def replay(events) -> RunView:
    view = RunView()
    for event in events:
        view.apply(event)
    return view


def test_replaying_a_finished_run_rebuilds_everything_the_page_shows():
    view = replay(history())
    assert not view.running
    assert view.status == "Finished: 4 steps, 2 checkpoint(s)."
    assert view.losses == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]
    assert view.checkpoint_files == [str(RUN / "lora-000002.safetensors"), str(RUN / "lora-000004.safetensors")]
    assert view.train_size == (448, 560)
    text = view.progress_markdown()
    assert text.startswith("**Finished: 4 steps, 2 checkpoint(s).**")
    assert "Step **4 / 4** (100%)" in text
    assert "loss 0.2500" in text
    assert "2 checkpoint(s) saved, 0.3 MB in all" in text
    assert "⚠️" not in text and "Queued" not in text


def test_replay_is_deterministic_so_a_reloaded_tab_sees_the_same_page():
    events = history(total=6, every=3)
    for cut in range(len(events) + 1):  # a tab reloaded at any point of the run
        first, again = replay(events[:cut]), replay(events[:cut])
        assert first == again
        assert first.progress_markdown() == again.progress_markdown()


def test_a_running_job_shows_its_step_percentage_speed_and_eta():
    events = history(total=4)
    view = replay(events[:events.index(progress(2, 4, 0.5)) + 1])
    assert view.running
    assert view.status == "Training"
    text = view.progress_markdown()
    assert "Step **2 / 4** (50%)" in text
    assert "loss 0.5000 · 2.00 it/s · ETA 0:01" in text
    assert "checkpoint(s) saved" not in text  # the step-2 checkpoint event has not arrived yet


def test_before_training_starts_the_phase_is_shown_and_the_job_counts_as_running():
    view = replay([Status("Resolving model tiny-demo"), Status("Loading model")])
    assert view.running
    assert view.progress_markdown() == "**Loading model**"
    assert view.losses == [] and view.previews == [] and view.checkpoint_files == []


def test_previews_are_labelled_with_their_step_and_the_base_model_is_step_0():
    view = replay(history(total=4, every=2))
    labels = [label for _, label in view.previews]
    assert labels == [
        f"base model (step 0) · {CAPTION}", f"base model (step 0) · {EXTRA}",
        f"step 2 · {CAPTION}", f"step 2 · {EXTRA}",
        f"step 4 · {CAPTION}", f"step 4 · {EXTRA}",
    ]
    assert [path for path, _ in view.previews][:2] == [str(RUN / "previews" / "000000-00.png"),
                                                      str(RUN / "previews" / "000000-01.png")]


def test_stopped_and_finished_runs_read_differently():
    events = history(total=10, every=2)
    cut = events.index(previews(4)) + 1  # stopped after the step-4 checkpoint and its previews
    stopped = replay(events[:cut] + [Finished(run_dir=RUN, last_step=5, stopped=True)])
    assert not stopped.running
    assert stopped.status == "Stopped at step 5. 2 checkpoint(s) kept."
    assert stopped.progress_markdown().startswith("**Stopped at step 5. 2 checkpoint(s) kept.**")
    assert "Finished" not in stopped.progress_markdown()

    finished = replay(events)
    assert finished.status == "Finished: 10 steps, 5 checkpoint(s)."
    assert "Stopped" not in finished.progress_markdown()


def test_stopped_while_queued_keeps_nothing_and_says_so():
    view = replay([Finished(run_dir=RUN, last_step=0, stopped=True)])
    assert not view.running
    assert view.progress_markdown() == "**Stopped at step 0. 0 checkpoint(s) kept.**"


def test_queue_position_replaces_the_progress_text_while_waiting():
    view = RunView(queue_position=2)
    assert view.progress_markdown() == ("**Queued**: position 2. It starts when the jobs ahead of it finish.")
    view.queue_position = 1
    assert "position 1" in view.progress_markdown()
    view.queue_position = 0  # it started: the normal progress text comes back
    view.apply(Status("Loading model"))
    assert "Queued" not in view.progress_markdown()
    assert view.progress_markdown() == "**Loading model**"


def test_a_failed_run_shows_its_message_and_keeps_what_was_saved():
    message = ("The loss became nan at step 3, so training stopped before saving it. Lower the learning rate; "
               "the checkpoints saved so far are intact.")
    events = history(total=4)
    cut = events.index(previews(2)) + 1
    view = replay(events[:cut] + [Failed(message, "not_finite", last_step=2)])
    assert not view.running
    assert view.status == "Failed"
    assert view.error == message
    text = view.progress_markdown()
    assert text.startswith("**Failed**")
    assert text.endswith(f"⚠️ {message}")
    assert "1 checkpoint(s) saved" in text
    assert view.checkpoint_files == [str(RUN / "lora-000002.safetensors")]


def test_a_failure_before_training_shows_only_the_message():
    view = replay([Status("Resolving model black-forest-labs/FLUX.1-dev"),
                   Failed("FLUX.1-dev is gated: accept its license and set HF_TOKEN.", "user")])
    assert view.progress_markdown() == "**Failed**  \n⚠️ FLUX.1-dev is gated: accept its license and set HF_TOKEN."
    assert "Step" not in view.progress_markdown()


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.4, "0:59"), (61, "1:01"), (3600, "1:00:00"),
                                           (3725, "1:02:05"), (-3, "0:00")])
def test_durations_read_as_clock_times(seconds, text):
    assert format_duration(seconds) == text


def test_the_devices_come_from_placed():
    """The job says where it runs (``Placed``); the page names GPUs and several processes, not a lone CPU."""
    from trainer.events import Placed

    def shown(devices):
        view = replay([Status("Resolving model tiny-demo"),
                       Placed(model_path="/models/tiny-demo", memory_tier="full", devices=devices),
                       Status("Loading model")])
        return view.gpu, view.progress_markdown()

    assert shown(("cuda:1",)) == ("GPU 1", "**Loading model** · on GPU 1")
    assert shown(("cuda:0", "cuda:2"))[0] == "GPUs 0, 2"
    assert shown(("cpu:0", "cpu:1"))[0] == "2 CPU processes (gloo; they share the CPU)"
    assert shown(("cpu",)) == ("", "**Loading model**")
    assert shown(("cpu:0",))[0] == ""
    # a Status that reads like the job manager's old note is only a status now
    assert replay([Status("Running on GPUs 0, 1")]).gpu == ""


def set_history(images: int = 3, batch: int = 2, total: int = 6, every: int = 3) -> list:
    """A set's run: Started tells its size, batch and rate; Progress and CheckpointSaved tell their epochs."""
    per_epoch = images / batch
    events = [Started(run_dir=RUN, total_steps=total, checkpoint_steps=tuple(range(every, total + 1, every)),
                      train_width=448, train_height=560, images=images, batch_size=batch, gpus=1,
                      learning_rate=4e-4 * 2 ** 0.5, epochs=total / per_epoch), previews(0)]
    for step in range(1, total + 1):
        events.append(Progress(step=step, total_steps=total, loss=0.5, steps_per_second=2.0, eta_seconds=0.0,
                               epoch=step / per_epoch))
        if step % every == 0:
            events += [CheckpointSaved(step=step, path=RUN / f"lora-{step:06d}.safetensors", size_bytes=1000,
                                       epoch=step / per_epoch), previews(step)]
    return events


def test_a_sets_run_shows_epochs_beside_steps_and_its_checkpoints_epochs():
    view = replay(set_history()[:6])  # Started, base previews, steps 1-3 and the checkpoint at 3
    view.running = True
    text = view.progress_markdown()
    assert "Step **1 / 6** (17%)" not in text and "Step **3 / 6** (50%) · epoch **2.00 / 4.00** of 3 images" in text
    assert "2 images per step (batch 2 × 1 process(es)): learning rate 0.000566 (√ rule)" in text
    assert "Checkpoints: step 3 (epoch 2.00)" in text
    assert view.checkpoint_files == [str(RUN / "lora-000003.safetensors")]  # named by step, as before
    full = replay(set_history())
    assert "Checkpoints: step 3 (epoch 2.00), step 6 (epoch 4.00)" in full.progress_markdown()
    assert [label for _, label in full.previews][2:4] == [f"step 3 · epoch 2.00 · {CAPTION}",
                                                          f"step 3 · epoch 2.00 · {EXTRA}"]
    assert full.previews[0][1] == f"base model (step 0) · {CAPTION}"


def test_one_image_at_batch_1_reads_exactly_as_before_sets():
    view = replay(history())  # Started with the defaults: images=1, batch 1, one GPU
    text = view.progress_markdown()
    assert "epoch" not in text and "images per step" not in text and "Checkpoints:" not in text
    assert [label for _, label in view.previews][2] == f"step 2 · {CAPTION}"


def test_the_gallery_shows_the_newest_checkpoints_previews_first_each_in_prompt_order():
    # The gallery is a short scroll box: oldest first, the previews just rendered sat below its fold.
    view = replay(history(total=4, every=2))
    assert [label for _, label in view.gallery()] == [
        f"step 4 · {CAPTION}", f"step 4 · {EXTRA}",
        f"step 2 · {CAPTION}", f"step 2 · {EXTRA}",
        f"base model (step 0) · {CAPTION}", f"base model (step 0) · {EXTRA}",
    ]
    assert sorted(view.gallery()) == sorted(view.previews)  # the same previews, only reordered


@pytest.mark.parametrize("total, axis", [(4, [0, 40]), (40, [0, 40]), (500, [0, 500])])
def test_the_loss_axis_spans_the_whole_job_wide_enough_for_whole_step_ticks(total, axis):
    # The plot's range was the steps so far: 2 steps drawn 40 px per tick put ticks at 1, 1.5, 2 (fractional steps).
    events = history(total=total, every=total)
    assert replay(events[:2]).loss_axis() is None  # not started: the plot chooses
    view = replay(events[:4])
    assert view.loss_axis() == axis
    # d3's tick step over the range is 1 or more for any plot up to 2200 px wide (Vega-Lite: a tick per 40 px)
    assert (axis[1] - axis[0]) / (2200 / 40) >= 0.5 ** 0.5
