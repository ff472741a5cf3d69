"""``trainer.runs.recorder.RunRecorder``: the one writer of run.json during a job, folding the job's events.

The twin of ``ui.view.RunView``: replaying a job's events into a fresh recorder gives the run.json the job wrote.
Synthetic histories check every event kind; the real job (tiny model, CPU) checks the twin property for a
finished, a resumed and a failed run, and that nothing but the recorder writes run.json while it trains.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tests.conftest import subject_image
from tests.test_resume import new_run, tiny_config
from trainer.events import (CheckpointSaved, Failed, Finished, LossHistory, Placed, Preview, PreviewsRendered,
                            Progress, Started, Status, event_from_dict, event_to_dict, from_json_line, to_json_line)
from trainer.runs import folder as folder_module
from trainer.runs.folder import MANIFEST, RunFolder
from trainer.runs.recorder import RunRecorder
from trainer.training.job import run_training


def manifest(run: RunFolder) -> dict:
    return json.loads((run.path / MANIFEST).read_text())


def previews(run: RunFolder, step: int) -> PreviewsRendered:
    return PreviewsRendered(step=step, previews=(Preview(path=run.preview_path(step, 0), prompt="a", seed=1),
                                                 Preview(path=run.preview_path(step, 1), prompt="b", seed=1)))


def a_run(tmp_path: Path, **overrides) -> RunFolder:
    image, mask = subject_image((96, 112))
    return RunFolder.create(tmp_path, tiny_config(**overrides), image, mask, run_id="r")


def fresh_twin(run: RunFolder) -> RunFolder:
    """The run folder object as ``RunFolder.create`` left it, in memory (nothing is written through it)."""
    return RunFolder(path=run.path, config=run.config, model=run.config.model, gpus=run.gpus, writable=False)


def replay(run: RunFolder, events) -> dict:
    twin = fresh_twin(run)
    recorder = RunRecorder(twin, write=False)
    for event in events:
        recorder.record(event)
    return twin.to_dict()


# ---- every event kind, folded into run.json -------------------------------------------------------------------

def test_each_event_kind_lands_in_run_json(tmp_path):
    run = a_run(tmp_path, steps=4, save_every=2)
    recorder = RunRecorder(run)
    assert manifest(run)["status"] == "created"

    assert not recorder.record(Status("Resolving model tiny-demo"))  # news for the page only
    recorder.record(Placed(model_path=Path("/models/tiny-demo"), memory_tier="16gb", devices=("cuda:1",)))
    on_disk = manifest(run)
    assert on_disk["status"] == "loading" and on_disk["model_path"] == "/models/tiny-demo"
    assert on_disk["memory_tier"] == "16gb" and on_disk["gpus"] == 1  # devices are the page's; gpus is creation's

    recorder.record(Started(run_dir=run.path, total_steps=4, checkpoint_steps=(2, 4), train_width=64,
                            train_height=80))
    assert manifest(run)["status"] == "running" and manifest(run)["train_size"] == [64, 80]
    recorder.record(previews(run, 0))
    assert [p["path"] for p in manifest(run)["base_previews"]] == ["samples/lora-000000-00.png",
                                                                   "samples/lora-000000-01.png"]
    for step in (1, 2):
        assert not recorder.record(Progress(step=step, total_steps=4, loss=0.5 / step, steps_per_second=1.0,
                                            eta_seconds=1.0))
    recorder.record(CheckpointSaved(step=2, path=run.checkpoint_path(2), size_bytes=10, losses=((1, 0.5), (2, 0.25))))
    recorder.record(previews(run, 2))
    recorder.record(CheckpointSaved(step=4, path=run.checkpoint_path(4), size_bytes=10, losses=((3, 0.125),)))
    checkpoints = manifest(run)["checkpoints"]
    assert [(c["step"], c["path"], c["losses"]) for c in checkpoints] == [
        (2, "lora-000002.safetensors", [[1, 0.5], [2, 0.25]]), (4, "lora-000004.safetensors", [[3, 0.125]])]
    assert [p["prompt"] for p in checkpoints[0]["previews"]] == ["a", "b"] and checkpoints[1]["previews"] == []
    assert not recorder.record(LossHistory(points=((1, 0.5),)))  # the curve is kept per checkpoint already

    recorder.record(Finished(run_dir=run.path, last_step=4, stopped=True))
    assert manifest(run)["status"] == "stopped"
    recorder.record(Finished(run_dir=run.path, last_step=4, stopped=False))
    assert manifest(run)["status"] == "finished" and manifest(run)["message"] == ""
    assert manifest(run)["format"] == 1
    reopened = RunFolder.open(run.path)
    assert reopened.loss_history() == ((1, 0.5), (2, 0.25), (3, 0.125)) and reopened.train_size == (64, 80)
    assert reopened.to_dict() == run.to_dict()


def test_a_failure_is_recorded_with_its_message(tmp_path):
    run = a_run(tmp_path)
    recorder = RunRecorder(run)
    recorder.record(Placed(model_path="/models/tiny-demo", memory_tier="full", devices=("cpu",)))
    recorder.record(Failed("The disk is full.", "user", 3))
    assert (manifest(run)["status"], manifest(run)["message"]) == ("failed", "The disk is full.")


def test_only_changes_are_written_and_a_resumed_jobs_repeated_history_changes_nothing(tmp_path, monkeypatch):
    run = a_run(tmp_path)
    recorder = RunRecorder(run)
    recorder.record(Started(run_dir=run.path, total_steps=4, checkpoint_steps=(2, 4), train_width=64, train_height=80))
    recorder.record(CheckpointSaved(step=2, path=run.checkpoint_path(2), size_bytes=10, losses=((1, 0.5), (2, 0.25))))
    recorder.record(previews(run, 2))
    writes = []
    monkeypatch.setattr(RunFolder, "save", lambda self: writes.append(self.status))
    # what a resumed job announces first: the checkpoints and previews it had (trainer.training.job._saved_so_far)
    for event in (LossHistory(points=((1, 0.5), (2, 0.25))),
                  CheckpointSaved(step=2, path=run.checkpoint_path(2), size_bytes=10, losses=((1, 0.5), (2, 0.25))),
                  previews(run, 2),
                  Started(run_dir=run.path, total_steps=4, checkpoint_steps=(2, 4), train_width=64, train_height=80)):
        assert not recorder.record(event)
    assert writes == []
    recorder.record(Finished(run_dir=run.path, last_step=4, stopped=False))
    assert writes == ["finished"]


def test_a_recorder_that_does_not_write_only_folds(tmp_path):
    run = a_run(tmp_path)
    before = (run.path / MANIFEST).read_bytes()
    follower = RunRecorder(run, write=False)
    assert follower.record(Placed(model_path="/m", memory_tier="full", devices=("cuda:0", "cuda:1")))
    follower.record(Finished(run_dir=run.path, last_step=0, stopped=False))
    assert run.status == "finished" and run.model_path == "/m"
    assert (run.path / MANIFEST).read_bytes() == before


def test_an_old_run_json_without_the_newer_keys_opens_and_records(tmp_path):
    run = a_run(tmp_path)
    old = manifest(run)
    for key in ("gpus", "memory_tier", "model_path", "message"):
        del old[key]
    old["checkpoints"] = [{"step": 2, "path": "lora-000002.safetensors", "previews": []}]  # no losses yet
    (run.path / MANIFEST).write_text(json.dumps(old))
    reopened = RunFolder.open(run.path)
    assert (reopened.gpus, reopened.memory_tier, reopened.loss_history()) == (1, "", ())
    RunRecorder(reopened).record(Finished(run_dir=run.path, last_step=2, stopped=True))
    assert manifest(reopened)["status"] == "stopped" and manifest(reopened)["checkpoints"][0]["step"] == 2


# ---- the new event fields across the process boundary ---------------------------------------------------------

def test_placed_and_checkpoint_losses_round_trip_and_old_lines_still_parse():
    for event in (Placed(model_path=Path("/models/FLUX.1-dev"), memory_tier="24gb", devices=("cuda:2", "cuda:3")),
                  Placed(model_path=Path("/m"), memory_tier="full", devices=("cpu",)),
                  CheckpointSaved(step=4, path=Path("/r/lora-000004.safetensors"), size_bytes=9,
                                  losses=((3, 0.5), (4, 0.25)))):
        back = from_json_line(to_json_line(event))
        assert back == event and type(back) is type(event)
        assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event
    assert isinstance(from_json_line(to_json_line(Placed("/m", "full", ("cpu",)))).model_path, Path)
    old = from_json_line('{"type": "CheckpointSaved", "step": 2, "path": "/r/a.safetensors", "size_bytes": 5}')
    assert old == CheckpointSaved(step=2, path=Path("/r/a.safetensors"), size_bytes=5, losses=())


# ---- the twin property, on real jobs --------------------------------------------------------------------------

def run_json_writers(monkeypatch) -> list[str]:
    """Who wrote run.json: the name of the first function up the stack that is not RunFolder's own."""
    writers = []
    real = folder_module.atomic_write_json

    def write(path, data):
        if Path(path).name == MANIFEST:
            names = [f.function for f in inspect.stack()[1:6]]
            writers.append(next(n for n in names if n not in ("save", "record_checkpoint", "record_previews",
                                                                "set_status")))
        return real(path, data)

    monkeypatch.setattr(folder_module, "atomic_write_json", write)
    return writers


def test_a_jobs_events_replayed_give_the_run_json_it_wrote_and_only_the_recorder_wrote_it(tmp_path, monkeypatch):
    run = new_run(tmp_path / "run", steps=4, save_every=2, preview_at_start=True)
    writers = run_json_writers(monkeypatch)
    events = list(run_training(run))
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert writers and set(writers) == {"record"}, writers  # RunRecorder.record, nothing else, while the job ran
    on_disk = manifest(run)
    assert on_disk["status"] == "finished" and on_disk["memory_tier"] and on_disk["model_path"].endswith("tiny-demo")
    assert [c["step"] for c in on_disk["checkpoints"]] == [2, 4]
    assert [s for c in on_disk["checkpoints"] for s, _ in c["losses"]] == [1, 2, 3, 4]
    assert replay(run, events) == on_disk
    placed = [e for e in events if isinstance(e, Placed)]
    assert len(placed) == 1 and placed[0].devices == ("cpu",)


def test_a_resumed_jobs_events_replayed_give_its_run_json(tmp_path):
    from trainer.runs import state

    run = new_run(tmp_path / "run", steps=4, save_every=1)
    assert isinstance(list(run_training(run))[-1], Finished)
    for step in (3, 4):  # as if killed after the step-2 save
        run.checkpoint_path(step).unlink()
        for f in state.state_files(run.path, step):
            f.unlink()
    run = RunFolder.open(run.path)
    run.set_status("interrupted", "The server stopped while this run was training.")
    events = list(run_training(RunFolder.open(run.path), resume=True))
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    on_disk = manifest(run)
    assert on_disk["status"] == "finished" and on_disk["message"] == ""
    assert [c["step"] for c in on_disk["checkpoints"]] == [1, 2, 3, 4]
    assert [s for c in on_disk["checkpoints"] for s, _ in c["losses"]] == [1, 2, 3, 4]
    assert replay(run, events) == on_disk  # the repeated history rebuilds what was saved before the interruption


def test_a_failed_jobs_events_replayed_give_its_run_json(tmp_path):
    run = new_run(tmp_path / "run", model=str(tmp_path / "no-such-model"))
    events = list(run_training(run))
    assert isinstance(events[-1], Failed) and events[-1].kind == "user"
    on_disk = manifest(run)
    assert on_disk["status"] == "failed" and on_disk["message"] == events[-1].message
    assert replay(run, events) == on_disk


def test_a_failure_that_cannot_be_recorded_still_reaches_the_user(tmp_path, monkeypatch):
    run = new_run(tmp_path / "run", model=str(tmp_path / "no-such-model"))

    def full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunFolder, "save", full_disk)
    events = list(run_training(run))
    assert isinstance(events[-1], Failed) and events[-1].kind == "user"
    assert manifest(run)["status"] == "created"  # nothing could be written; the event still told the user
