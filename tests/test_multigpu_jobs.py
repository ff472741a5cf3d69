"""One app job on several "GPUs": the job manager runs ``python -m trainer train --prepared`` under torchrun and
follows its events (trainer.jobs.multigpu). No GPU here: the manager is given two CPU "devices", so the job's two
processes run data-parallel on the CPU with gloo, sharing its cores; the GPU path differs only in NCCL and
CUDA_VISIBLE_DEVICES. The runner is the real one: real processes, real training, real files.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import subject_image
from trainer.cli import main as cli_main
from trainer.config import TrainingConfig
from trainer.events import (CheckpointSaved, Failed, Finished, LossHistory, Placed, Preview, PreviewsRendered,
                            Progress, Started, Status, describe_devices, event_from_dict, event_to_dict, from_json_line,
                            to_json_line)
from trainer.errors import UserError
from trainer.jobs.manager import JobManager
from trainer.jobs.multigpu import child_environment
from trainer.runs.folder import RunFolder
from ui.view import RunView

CPU_DEVICES = ["cpu:0", "cpu:1"]  # two gloo processes; on the CPU they share its cores
TOKEN = "hf_test_token_that_must_not_leak"


def prepared_run(root: Path, name: str, steps: int = 4, save_every: int = 2) -> RunFolder:
    """A run folder as the app creates it, asking for 2 devices (the tiny model, 64 px: seconds per run)."""
    image, mask = subject_image((128, 160))
    cfg = TrainingConfig(model="tiny-demo", steps=steps, save_every=save_every, resolution=64)
    return RunFolder.create(root, cfg, image, mask, run_id=name, gpus=2)


def training_processes(run: RunFolder) -> dict[int, dict[str, str]]:
    """pid → environment of every live process training ``run`` through the app (torchrun and its ranks)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"--events-jsonl" not in args or str(run.path).encode() not in args:
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
            found[int(proc.name)] = {"cmdline": " ".join(a.decode(errors="replace") for a in args), **env}
        except OSError:  # ended meanwhile
            continue
    return found


def wait_for(job, kind, timeout: float = 240.0):
    """The first event of type ``kind`` in the job's history (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in job.wait_for_events(0, timeout=0.5):
            if isinstance(event, kind):
                return event
        if not job.active:
            break
    raise AssertionError(f"no {kind.__name__} event; got {job.events[-3:]}")


def no_token_in_files(root: Path) -> bool:
    return not any(TOKEN.encode() in p.read_bytes() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def manager():
    m = JobManager(devices=CPU_DEVICES)
    yield m
    m.shutdown()


# ---- events across the process boundary ----------------------------------------------------------------------

def test_every_event_round_trips_through_one_json_line():
    run_dir = Path("/runs/a run ü")
    events = [
        Status("Loading model — ü"),
        Started(run_dir=run_dir, total_steps=400, checkpoint_steps=(50, 100), train_width=448, train_height=576),
        Progress(step=3, total_steps=400, loss=0.123456789, steps_per_second=1.5, eta_seconds=265.3),
        LossHistory(points=((1, 0.5), (2, 0.25))),
        CheckpointSaved(step=50, path=run_dir / "lora-000050.safetensors", size_bytes=1234),
        PreviewsRendered(step=50, previews=(Preview(path=run_dir / "samples" / "a.png", prompt="ohwx\n2", seed=1),
                                            Preview(path=run_dir / "samples" / "b.png", prompt="x", seed=2))),
        PreviewsRendered(step=0, previews=()),
        Finished(run_dir=run_dir, last_step=50, stopped=True),
        Failed("The loss became nan at step 3.", "not_finite", 2),
        Failed("no model", "user"),
        Placed(model_path=Path("/models/tiny-demo"), memory_tier="16gb", devices=("cuda:0", "cuda:2")),
        Placed(model_path=Path("/models/x"), memory_tier="full"),
        CheckpointSaved(step=100, path=run_dir / "lora-000100.safetensors", size_bytes=1234,
                        losses=((51, 0.5), (52, 0.25))),
    ]
    for event in events:
        line = to_json_line(event)
        assert line.endswith("\n") and line.count("\n") == 1  # one event, one line
        back = from_json_line(line)
        assert back == event and type(back) is type(event)
        assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event
    assert isinstance(from_json_line(to_json_line(events[1])).run_dir, Path)
    assert isinstance(from_json_line(to_json_line(events[5])).previews[0].path, Path)
    for bad in ('{"type": "Nope"}', '{"type": "Status"}', '{"type": "Status", "message": "a", "extra": 1}', "[1]",
                "not json"):
        with pytest.raises(ValueError):
            from_json_line(bad)


# ---- scheduling (stand-in runners: what matters here is who gets which device, and when) ---------------------

def test_a_two_device_job_waits_for_two_free_devices_and_holds_them(tmp_path):
    release = {name: threading.Event() for name in ("alice", "bob", "carol")}
    seen: dict[str, object] = {}

    def one(run, should_stop, token=None, device=None):
        seen[run.path.name] = device
        release[run.path.name].wait(30)
        yield Finished(run_dir=run.path, last_step=1, stopped=False)

    def several(run, should_stop, token=None, devices=()):
        seen[run.path.name] = tuple(devices)
        yield Placed(model_path="tiny-demo", memory_tier="full", devices=tuple(devices))  # as run_on_gpus does,
        yield Status("Loading model")  # then says what it does there
        release[run.path.name].wait(30)
        yield Finished(run_dir=run.path, last_step=1, stopped=False)

    manager = JobManager(runner=one, multi_runner=several, devices=CPU_DEVICES)
    image, mask = subject_image()
    runs = {n: RunFolder.create(tmp_path, TrainingConfig(), image, mask, run_id=n) for n in release}
    alice = manager.submit("alice", runs["alice"])  # 1 device
    bob = manager.submit("bob", runs["bob"], gpus=2)  # both devices: waits for alice's
    carol = manager.submit("carol", runs["carol"])  # 1 device is free, but bob is first in line
    with pytest.raises(UserError, match="at most 2"):
        manager.submit("dave", runs["carol"], gpus=3)
    time.sleep(0.5)
    assert (alice.state, bob.state, carol.state) == ("running", "queued", "queued")
    assert manager.queue_position(bob) == 1 and manager.queue_position(carol) == 2
    release["alice"].set()
    list(alice.follow())
    wait_for(bob, Placed)
    assert seen["bob"] == ("cpu:0", "cpu:1") and bob.devices == ("cpu:0", "cpu:1") and bob.device is None
    time.sleep(0.3)
    assert carol.state == "queued"  # no device is handed out while bob holds both
    view = RunView()
    for event in bob.events:
        view.apply(event)
    assert "on 2 CPU processes" in view.progress_markdown()
    release["bob"].set()
    release["carol"].set()
    for job in (bob, carol):
        list(job.follow())
    assert [j.state for j in (alice, bob, carol)] == ["finished"] * 3
    assert seen["carol"] in CPU_DEVICES
    manager.shutdown()


def test_one_device_servers_refuse_multi_gpu_jobs(tmp_path):
    manager = JobManager(runner=lambda run, should_stop, token=None: iter(()))
    image, mask = subject_image()
    with pytest.raises(UserError, match="at most 1"):
        manager.submit("alice", RunFolder.create(tmp_path, TrainingConfig(), image, mask), gpus=2)
    manager.shutdown()


def test_the_token_goes_to_the_child_environment_only():
    env = child_environment(["cuda:1", "cuda:3"], "hf_new", {"HF_TOKEN": "hf_old", "HUGGING_FACE_HUB_TOKEN": "x",
                                                             "CUDA_VISIBLE_DEVICES": "4,5,6,7", "PATH": "/bin"})
    assert env["HF_TOKEN"] == "hf_new" and "HUGGING_FACE_HUB_TOKEN" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "5,7"  # cuda:i of the app is the i-th of its own visible GPUs
    assert "HF_TOKEN" not in child_environment(["cuda:0", "cuda:1"], None, {"HF_TOKEN": "hf_old"})
    assert child_environment(CPU_DEVICES, None, {})["CUDA_VISIBLE_DEVICES"] == ""
    assert describe_devices(["cuda:0", "cuda:2"]) == "GPUs 0, 2"


def test_prepared_refuses_a_started_run_and_settings_on_the_command_line(tmp_path, capsys):
    run = prepared_run(tmp_path, "r")
    assert cli_main(["train", "--output", str(run.path), "--prepared", "--steps", "3"]) == 2
    assert "drop --steps" in capsys.readouterr().err
    run.set_status("stopped")  # a lifecycle write: no job holds the run
    events = tmp_path / "events.jsonl"
    assert cli_main(["train", "--output", str(run.path), "--prepared", "--events-jsonl", str(events)]) == 2
    assert "has already started" in capsys.readouterr().err
    failed = from_json_line(events.read_text())  # the reader of the events learns why, too
    assert isinstance(failed, Failed) and failed.kind == "user" and "already started" in failed.message


# ---- the real thing: two processes, one job ------------------------------------------------------------------

def test_a_two_process_job_trains_once_and_streams_the_same_events(tmp_path, manager):
    run = prepared_run(tmp_path, "two")
    job = manager.submit("alice", run, token=TOKEN)
    wait_for(job, Started)
    processes = training_processes(run)
    ranks = [env for env in processes.values() if "RANK" in env]
    assert len(ranks) == 2 and {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert all(env.get("HF_TOKEN") == TOKEN and TOKEN not in env["cmdline"] for env in processes.values())
    events = list(job.follow())

    assert job.state == "finished" and job.devices == ("cpu:0", "cpu:1")
    placed = [e for e in events if isinstance(e, Placed)]  # the job's devices, as the app numbers them
    assert len(placed) == 1 and placed[0].devices == ("cpu:0", "cpu:1") and placed[0].memory_tier
    assert describe_devices(placed[0].devices) == "2 CPU processes (gloo; they share the CPU)"
    assert isinstance(events[-1], Finished) and not events[-1].stopped and events[-1].last_step == 4
    assert sum(isinstance(e, (Finished, Failed)) for e in events) == 1
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]  # one stream, not one per process
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [2, 4]
    assert [e.step for e in events if isinstance(e, PreviewsRendered)] == [0, 2, 4]
    assert all(p.path.is_file() for e in events if isinstance(e, PreviewsRendered) for p in e.previews)
    assert any(isinstance(e, Status) and "identical in all 2 processes" in e.message for e in events)
    manifest = json.loads((run.path / "run.json").read_text())
    assert manifest["gpus"] == 2 and manifest["status"] == "finished"
    assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]
    assert sorted(p.name for p in run.path.glob("*.safetensors")) == ["lora-000002.safetensors",
                                                                      "lora-000004.safetensors"]
    assert run.status == "finished" and len(run.checkpoints) == 2  # the job's RunFolder caught up with run.json
    assert not training_processes(run)  # all exited before the job ended
    assert no_token_in_files(run.path)

    view = RunView()  # a reloaded page replays the history: the same page
    for event in job.follow(0):
        view.apply(event)
    page = view.progress_markdown()
    assert "Finished: 4 steps, 2 checkpoint(s)" in page and "on 2 CPU processes" in page
    assert view.checkpoint_files == [str(run.path / "lora-000002.safetensors"), str(run.path / "lora-000004.safetensors")]


def test_stop_from_the_page_stops_both_processes_and_keeps_the_checkpoints(tmp_path, manager):
    run = prepared_run(tmp_path, "stop", steps=500, save_every=2)
    job = manager.submit("alice", run)
    wait_for(job, CheckpointSaved)
    control = Path(next(iter(training_processes(run).values()))["cmdline"].split("--stop-file ")[1].split()[0]).parent
    assert manager.stop(job.id, "alice")
    events = list(job.follow())
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.stopped and 2 <= finished.last_step < 500
    assert job.state == "stopped"
    assert not training_processes(run) and not control.exists()  # the processes exited; the control folder is gone
    manifest = json.loads((run.path / "run.json").read_text())
    assert manifest["status"] == "stopped" and manifest["checkpoints"][0]["step"] == 2
    assert (run.path / "lora-000002.safetensors").is_file()


def test_a_killed_process_becomes_a_failed_event_that_keeps_the_checkpoints(tmp_path, manager):
    run = prepared_run(tmp_path, "crash", steps=500, save_every=2)
    job = manager.submit("alice", run)
    wait_for(job, CheckpointSaved)
    rank1 = next(pid for pid, env in training_processes(run).items() if env.get("RANK") == "1")
    os.kill(rank1, signal.SIGKILL)
    events = list(job.follow())
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "internal", events[-3:]
    assert "ended unexpectedly" in failed.message and "checkpoint(s) saved so far are kept" in failed.message
    assert job.state == "failed" and not training_processes(run)
    manifest = json.loads((run.path / "run.json").read_text())
    assert manifest["status"] == "failed" and "ended unexpectedly" in manifest["message"]
    assert (run.path / "lora-000002.safetensors").is_file()


def test_a_damaged_run_folder_fails_with_the_reason(tmp_path, manager):
    run = prepared_run(tmp_path, "damaged")
    (run.path / "run.json").write_text('{"format": 1, "config": ')  # cut off mid-write
    job = manager.submit("alice", run)
    events = list(job.follow())
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "user"
    assert "run.json" in failed.message and "could not be read" in failed.message
    assert job.state == "failed" and not training_processes(run)


def test_a_rank_that_builds_tiny_demo_second_keeps_the_first_copy(tmp_path, monkeypatch):
    """A fresh install: both processes of a tiny-demo job build the model at once; the slower must not delete the
    copy the faster one is already loading (it did: FileNotFoundError in the other rank)."""
    from trainer.families import FLUX1
    from trainer.model import tiny

    target = tmp_path / "models" / "tiny-demo"
    real_build = FLUX1.build_tiny_pipeline
    first: dict[str, int] = {}

    def build_while_another_process_finishes():
        pipe = real_build()
        monkeypatch.setattr(FLUX1, "build_tiny_pipeline", real_build)
        tiny.ensure_tiny_model(target, FLUX1)  # the other process: done first
        first["inode"] = (target / "tiny_demo.json").stat().st_ino
        return pipe

    monkeypatch.setattr(FLUX1, "build_tiny_pipeline", build_while_another_process_finishes)
    assert tiny.ensure_tiny_model(target, FLUX1) == target
    assert (target / "tiny_demo.json").stat().st_ino == first["inode"]  # the first copy stayed in place
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tiny-demo-")]  # our copy was cleaned up


# ---- the page: the control, and Train with N GPUs -------------------------------------------------------------

def test_the_page_offers_gpus_only_with_several_devices_and_train_passes_them_on(tmp_path):
    import gradio as gr

    from ui.app import build_app
    from ui.dataset_step import Dataset
    from ui.settings_step import gpus_note
    from ui.training_step import TrainingController

    got: dict[str, tuple] = {}

    def several(run, should_stop, token=None, devices=()):
        got[run.path.name] = tuple(devices)
        yield Finished(run_dir=run.path, last_step=0, stopped=False)

    def control(demo):
        return next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "GPUs for this job")

    one = JobManager(runner=lambda run, should_stop, token=None: iter(()))
    pool = JobManager(runner=lambda run, should_stop, token=None, device=None: iter(()), multi_runner=several,
                      devices=CPU_DEVICES)
    try:
        assert control(build_app(one, tmp_path / "a")).visible is False  # one device: nothing to choose
        offered = control(build_app(pool, tmp_path / "b"))
        assert offered.visible is True and [v for _, v in offered.choices] == [1, 2] and offered.value == 1
        assert "0.0004 × √2 = **0.000566**" in gpus_note(2, 4e-4) and "batch 1 on each GPU" in gpus_note(2, 4e-4)

        image, mask = subject_image()
        controller = TrainingController(pool, tmp_path / "runs")
        args = ("alice", Dataset(image, mask, "uploaded mask"), "a photo of [trigger]", "ohwx", "", "quick-test-250",
                4, 4, 4e-4, 2, "tiny-demo")
        with pytest.raises(UserError, match="at most 2 GPU"):
            controller.start(*args, gpus=3)
        assert not list((tmp_path / "runs").rglob("run.json"))  # refused before any folder was made
        controller.start(*args, gpus=2)
        job = pool.latest_for("alice")
        list(job.follow())
        assert job.gpus == 2 and got[job.run.path.name] == ("cpu:0", "cpu:1")
        assert json.loads((job.run.path / "run.json").read_text())["gpus"] == 2
    finally:
        one.shutdown()
        pool.shutdown()


def test_the_train_api_takes_a_gpu_count_and_a_one_gpu_server_refuses_two(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from tests.helpers_app import launched_app, write_subject_png
    from tests.test_app_api import prepare

    with launched_app(tmp_path) as app:  # JobManager(): one device
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
        prepare(client, write_subject_png(tmp_path))
        with pytest.raises(AppError, match="at most 1 GPU"):
            client.predict(None, "a photo of [trigger]", "ohwx", "", "character-rank4-400", 4, 4, 4e-4, 2,
                           "tiny-demo", gpus=2, api_name="/train")
        assert not app.jobs
