"""Resume (docs/RELIABILITY.md points 1, 3, 11, 19): kill -9 then --resume is bit-identical; damaged saves are skipped.

The expensive end-to-end check runs the real CLI in subprocesses (an uninterrupted reference and a run that is
SIGKILLed mid-run, at the same time, then the resume). The rest runs in-process on the CPU tiny model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import subject_image
from trainer.runs import lifecycle, state
from trainer.config import load_preset
from trainer.errors import UserError
from trainer.events import CheckpointSaved, Failed, Finished, Progress, Status
from trainer.runs.folder import RunFolder
from trainer.training.job import run_training

ROOT = Path(__file__).resolve().parent.parent


# ---- helpers shared with the other reliability tests ------------------------------------------------------------

def tiny_config(**overrides):
    """A run that takes a few seconds on the CPU: 64 px, no preview prompts beyond the caption, no step-0 preview."""
    settings = dict(steps=4, save_every=1, resolution=64, preview_steps=1, trigger="ohwx",
                    caption="a photo of [trigger], a red ball", model="tiny-demo", preview_at_start=False)
    return load_preset("quick-test-250").config(**{**settings, **overrides})


def new_run(folder: Path, **overrides) -> RunFolder:
    image, mask = subject_image((96, 112))
    return RunFolder.create_at(folder, tiny_config(**overrides), image, mask)


def lora_of(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def assert_same_lora(a: Path, b: Path) -> None:
    x, y = lora_of(a), lora_of(b)
    assert x.keys() == y.keys() and x
    for key in x:
        assert torch.equal(x[key], y[key]), f"{key} differs between {a} and {b}"


def cli_env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


# ---- plan point 1: kill -9 mid-run, resume, identical weights ---------------------------------------------------

def test_sigkill_mid_run_then_resume_gives_bit_identical_lora(tmp_path):
    image, _ = subject_image((96, 112))
    image.save(tmp_path / "subject ü.png")  # spaces and non-ASCII in every path (plan point 19)
    train = ["train", "--image", tmp_path / "subject ü.png", "--caption", "a photo of [trigger]", "--trigger", "ohwx",
             "--model", "tiny-demo", "--steps", 6, "--save-every", 3, "--resolution", 64, "--seed", 5]
    command = lambda out: [sys.executable, "-m", "trainer", *map(str, train), "--output", str(out)]
    env = cli_env(OMP_NUM_THREADS="1")  # the same for all three processes; one thread each, as they run side by side
    # The reference and the victim run side by side (same code, same thread settings).
    victim_dir = tmp_path / "victim run é"
    reference = subprocess.Popen(command(tmp_path / "reference"), cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(victim_dir), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in victim.stderr:  # kill after step 4: past the step-3 checkpoint, before the step-6 one
            seen.append(line)
            if " 4/6 " in line:
                os.kill(victim.pid, signal.SIGKILL)
                break
        assert victim.wait(timeout=120) == -signal.SIGKILL, "".join(seen)
    finally:
        if victim.poll() is None:
            victim.kill()
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err

    killed = json.loads((victim_dir / "run.json").read_text())
    assert killed["status"] == "running"  # what a crash leaves behind
    assert not (victim_dir / "lora-000006.safetensors").exists()

    resumed = cli("train", "--output", victim_dir, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert "Resumed from the checkpoint at step" in resumed.stderr
    assert " 1/6 " not in resumed.stderr and " 4/6 " in resumed.stderr  # it did not start over
    manifest = json.loads((victim_dir / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert [c["step"] for c in manifest["checkpoints"]] == [3, 6]
    for step in (3, 6):
        name = f"lora-{step:06d}.safetensors"
        assert_same_lora(tmp_path / "reference" / name, victim_dir / name)
    # nothing half-written was left behind
    assert not [p for p in (victim_dir).rglob("*.tmp")]


# ---- plan point 3: damaged newest save is skipped with a warning -----------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 4-step run (a save after every step), copied by each test that damages it."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    run = new_run(folder)
    events = list(run_training(run))
    assert isinstance(events[-1], Finished) and not events[-1].stopped, events[-1]
    return folder


def copy_as_crashed(src: Path, dst: Path, status: str = "running") -> RunFolder:
    import shutil

    shutil.copytree(src, dst)
    run = RunFolder.open(dst)
    run.set_status(status)
    return run


def resume_run(run: RunFolder):
    return list(run_training(RunFolder.open(run.path), resume=True))


def test_resume_from_last_state_reproduces_the_remaining_checkpoints(finished_run, tmp_path):
    run = copy_as_crashed(finished_run, tmp_path / "run")
    for step in (3, 4):  # as if killed after the step-2 save
        run.checkpoint_path(step).unlink()
        for f in state.state_files(run.path, step):
            f.unlink()
    events = resume_run(run)
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert [e.step for e in events if isinstance(e, Progress)] == [3, 4]
    for step in (3, 4):
        assert_same_lora(finished_run / run.checkpoint_path(step).name, run.checkpoint_path(step))
    assert [c["step"] for c in RunFolder.open(run.path).checkpoints] == [1, 2, 3, 4]


def test_a_resumed_job_shows_the_whole_loss_curve(tmp_path):
    """Each checkpoint keeps the losses of its steps in run.json; a resumed job's events start with them, so the
    page's loss plot shows the steps trained before the interruption too, with the same values."""
    from trainer.events import LossHistory
    from ui.view import RunView

    first = list(run_training(new_run(tmp_path / "run")))
    assert isinstance(first[-1], Finished)
    trained = [(e.step, e.loss) for e in first if isinstance(e, Progress)]
    run = RunFolder.open(tmp_path / "run")
    assert [s for s, _ in run.loss_history()] == [1, 2, 3, 4]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(run.loss_history(), trained))
    for step in (3, 4):  # as if killed after the step-2 save
        run.checkpoint_path(step).unlink()
        for f in state.state_files(run.path, step):
            f.unlink()
    run.set_status("interrupted")
    events = resume_run(run)
    history = [e for e in events if isinstance(e, LossHistory)]
    assert len(history) == 1 and [s for s, _ in history[0].points] == [1, 2]
    assert events.index(history[0]) < min(i for i, e in enumerate(events) if isinstance(e, Progress))
    view = RunView()
    for event in events:
        view.apply(event)
    assert [s for s, _ in view.losses] == [1, 2, 3, 4]  # the plot: before the interruption, then after
    assert [s for s, _ in RunFolder.open(run.path).loss_history()] == [1, 2, 3, 4]


def damage(run: RunFolder, step: int, how: str) -> None:
    import pickle

    tensors, meta = state.state_files(run.path, step)
    ckpt = run.checkpoint_path(step)
    if how == "truncate_state":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif how == "flip_state_byte":  # same size, one bit of one weight changed: only the checksum can tell
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif how == "drop_state_json":  # killed between the tensors and the JSON commit mark
        meta.unlink()
    elif how == "truncate_checkpoint":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif how == "garbage_checkpoint":
        ckpt.write_bytes(b"\x00" * 64)
    elif how == "pickle_as_state":
        tensors.write_bytes(pickle.dumps({"step": step}))


# Each case damages the newest save (step 4) one way and the one before it (step 3) another way.
@pytest.mark.parametrize("newest,previous", [("truncate_state", "garbage_checkpoint"),
                                             ("flip_state_byte", "truncate_checkpoint"),
                                             ("drop_state_json", "pickle_as_state")])
def test_damaged_newest_saves_are_skipped_with_a_warning(finished_run, tmp_path, newest, previous):
    run = copy_as_crashed(finished_run, tmp_path / "run")
    damage(run, 4, newest)
    damage(run, 3, previous)
    events = resume_run(run)
    statuses = [e.message for e in events if isinstance(e, Status)]
    for step in (4, 3):
        assert any(f"Skipping the save of step {step}" in m for m in statuses), statuses
    assert "Resumed from the checkpoint at step 2" in statuses
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert [e.step for e in events if isinstance(e, Progress)] == [3, 4]
    for step in (3, 4):  # re-trained from step 2's state, bit for bit
        assert_same_lora(finished_run / run.checkpoint_path(step).name, run.checkpoint_path(step))
        state.load_state(RunFolder.open(run.path), step)  # and the new states are intact


def test_no_usable_state_at_all_is_refused(finished_run, tmp_path):
    run = copy_as_crashed(finished_run, tmp_path / "run")
    for step in range(1, 5):
        state.state_files(run.path, step)[0].write_bytes(b"not a state")
    events = resume_run(run)
    assert isinstance(events[-1], Failed) and events[-1].kind == "user"
    assert "can't be resumed" in events[-1].message
    assert run.checkpoint_path(4).is_file()  # a refusal deletes nothing


def test_run_killed_before_its_first_checkpoint_starts_again_from_step_zero(tmp_path):
    run = new_run(tmp_path / "run", steps=2, save_every=2)
    run.set_status("running")
    events = list(run_training(RunFolder.open(run.path), resume=True))
    assert any(isinstance(e, Status) and "starts again from step 0" in e.message for e in events)
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2]
    assert isinstance(events[-1], Finished)


def test_changed_settings_are_not_resumed(finished_run, tmp_path):
    run = copy_as_crashed(finished_run, tmp_path / "run")
    manifest = json.loads((run.path / "run.json").read_text())
    manifest["config"]["learning_rate"] = 1e-3  # someone edited run.json after the saves
    (run.path / "run.json").write_text(json.dumps(manifest))
    events = resume_run(run)
    assert isinstance(events[-1], Failed) and "different settings" in events[-1].message


# ---- the CLI's --resume: only folders this app wrote ------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    """``python -m trainer`` in-process (the subprocess path is covered by the kill -9 test above)."""
    from trainer.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_resume_refuses_folders_the_app_did_not_write(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "run.json").write_text("{not json")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "run.json").write_text(json.dumps({"format": 7, "config": {}}))
    (tmp_path / "checkpoints-only").mkdir()  # someone else's LoRA folder
    (tmp_path / "checkpoints-only" / "lora-000100.safetensors").write_bytes(b"\0" * 16)
    for folder in ("empty", "garbage", "foreign", "missing", "checkpoints-only"):
        code, err = run_cli(capsys, "train", "--output", tmp_path / folder, "--resume")
        assert code == 2, err
        assert err.startswith("error: ") and "not a run folder written by this app" in err and "Traceback" not in err


def test_cli_resume_refuses_new_settings_finished_runs_and_missing_arguments(finished_run, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--output", finished_run, "--resume", "--steps", 10)
    assert code == 2 and "drop --steps" in err
    code, err = run_cli(capsys, "train", "--output", finished_run, "--resume")
    assert code == 2 and "already finished" in err
    code, err = run_cli(capsys, "train", "--output", tmp_path / "new")
    assert code == 2 and "train needs --image and --caption (or --resume" in err


def test_open_for_resume_refuses_a_symlinked_manifest(finished_run, tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "run.json").symlink_to(finished_run / "run.json")
    with pytest.raises(UserError, match="not a run folder written by this app"):
        lifecycle.open_for_resume(tmp_path / "fake")


def test_the_same_run_is_never_trained_by_two_processes(finished_run, tmp_path):
    run = copy_as_crashed(finished_run, tmp_path / "run")
    lock = lifecycle.RunLock(run.path).acquire()
    try:
        events = resume_run(run)
        assert isinstance(events[-1], Failed) and "being trained by another process" in events[-1].message
        assert lifecycle.is_locked(run.path)
    finally:
        lock.release()
    assert not lifecycle.is_locked(run.path)


# ---- plan point 11: a server restart marks running jobs interrupted and offers Resume ----------------------------

def test_restart_marks_live_runs_interrupted_and_job_manager_resumes_them(finished_run, tmp_path):
    from trainer.jobs.manager import JobManager
    from trainer.runs.store import owner_folder_name as owner_folder
    from ui.training_step import TrainingController

    runs_root = tmp_path / "runs"
    owner_root = runs_root / owner_folder("alice")
    crashed = copy_as_crashed(finished_run, owner_root / "20260101-000000-lora-aaaa", status="running")
    for step in (3, 4):
        crashed.checkpoint_path(step).unlink()
    loading = copy_as_crashed(finished_run, owner_root / "20260101-000001-lora-bbbb", status="loading")
    done = copy_as_crashed(finished_run, owner_root / "20260101-000002-lora-cccc", status="finished")
    live = copy_as_crashed(finished_run, owner_root / "20260101-000003-lora-dddd", status="running")
    held = lifecycle.RunLock(live.path).acquire()  # another process is still training this one
    try:
        marked = lifecycle.mark_interrupted(runs_root)
    finally:
        held.release()
    assert sorted(marked) == sorted([crashed.path, loading.path])
    statuses = {p.name: RunFolder.open(p).status for p in (crashed.path, loading.path, done.path, live.path)}
    assert statuses == {crashed.path.name: "interrupted", loading.path.name: "interrupted",
                        done.path.name: "finished", live.path.name: "running"}

    manager = JobManager()
    try:
        controller = TrainingController(manager, runs_root)
        assert controller.resumable_run("alice") == loading.path  # newest interrupted run first
        assert controller.resumable_run("bob") is None
        with pytest.raises(UserError, match="not one of yours"):  # bob can't resume alice's run by path
            manager.resume("bob", crashed.path, allowed_root=runs_root / owner_folder("bob"))
        job = manager.resume("alice", crashed.path, allowed_root=owner_root)
        with pytest.raises(UserError):  # and not twice
            manager.resume("alice", crashed.path, allowed_root=owner_root)
        events = list(job.follow(poll=0.1))
        assert isinstance(events[-1], Finished) and not events[-1].stopped, events[-1]
        assert [e.step for e in events if isinstance(e, Progress)] == [3, 4]
        assert_same_lora(finished_run / crashed.checkpoint_path(4).name, crashed.checkpoint_path(4))
        assert RunFolder.open(crashed.path).status == "finished"
        assert controller.resumable_run("alice") == loading.path
    finally:
        manager.shutdown()


def test_controller_resume_and_follow_show_the_resumed_job(finished_run, tmp_path):
    from trainer.jobs.manager import JobManager
    from trainer.runs.store import owner_folder_name as owner_folder
    from ui.training_step import TrainingController

    runs_root = tmp_path / "runs"
    crashed = copy_as_crashed(finished_run, runs_root / owner_folder("carol") / "20260101-000000-lora-eeee",
                              status="interrupted")
    crashed.checkpoint_path(4).unlink()
    manager = JobManager()
    try:
        controller = TrainingController(manager, runs_root)
        assert "Resuming" in controller.resume("carol")
        updates = list(controller.follow("carol"))
        progress_text = updates[-1][0]
        assert "Finished" in progress_text and "4 / 4" in progress_text
        with pytest.raises(UserError, match="no interrupted run"):
            controller.resume("carol")
    finally:
        manager.shutdown()


def test_resume_through_the_app_api(finished_run, tmp_path):
    """The page's Resume button is the /resume endpoint; /follow then streams the resumed job."""
    from gradio_client import Client

    from tests.helpers_app import launched_app
    from trainer.runs.store import owner_folder_name as owner_folder

    with launched_app(tmp_path) as app:
        runs_root, url = app.runs_root, app.url
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        other = Client(url, verbose=False, download_files=str(tmp_path / "downloads-other"))
        crashed = copy_as_crashed(finished_run, runs_root / owner_folder(client.session_hash) / "20260101-lora-ffff",
                                  status="interrupted")
        crashed.checkpoint_path(4).unlink()
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="no interrupted run"):
            other.predict(None, api_name="/resume")  # another session has nothing to resume (and can't see this)
        result = client.predict(None, api_name="/resume")
        message = result[0] if isinstance(result, (list, tuple)) else result
        assert message.startswith("Resuming"), result
        job = client.submit(None, api_name="/follow")
        job.result(timeout=240)
        final = job.outputs()[-1]
        assert "Finished: 4 steps" in final[0], final[0]
        files = final[3]["value"] if isinstance(final[3], dict) and "__type__" in final[3] else final[3]
        assert len(files) == 4  # the checkpoints from before the interruption are shown again, plus the new one
    assert_same_lora(finished_run / crashed.checkpoint_path(4).name, crashed.checkpoint_path(4))


def test_the_background_state_writer_snapshots_at_save_time_and_reports_write_errors(tmp_path):
    """Training goes on while a state is written: what lands on disk is the state as of ``save``, and a write
    that fails is raised to the training thread."""
    from trainer.model.lora import add_lora
    from trainer.model.loading import load_parts, resolve_model

    parts = load_parts(resolve_model("tiny-demo"))
    params = add_lora(parts.transformer, 4, 4.0, seed=0)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator, mask_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    cfg = tiny_config()
    run = new_run(tmp_path / "run")
    before = params[0].detach().clone()
    writer = state.StateWriter()
    writer.save(run.path, 1, parts.transformer, optimizer, generator, mask_generator, cfg)
    with torch.no_grad():
        params[0].add_(1.0)  # the next training step changes the weights while the write may still be running
    writer.wait()
    state_file, json_file = state.state_files(run.path, 1)
    saved = safetensors.torch.load_file(state_file)
    name = state.lora_named_parameters(parts.transformer)[0][0]
    assert torch.equal(saved[f"lora.{name}"], before.float()) and json_file.is_file()

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the run folder should be")
    writer.save(blocked, 2, parts.transformer, optimizer, generator, mask_generator, cfg)
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # the error is raised once
