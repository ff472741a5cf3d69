"""Injected faults (docs/RELIABILITY.md points 2, 4, 5, 6, 7, 9, 10) on the CPU tiny model.

Each fault is injected where it really happens: the training step raises CUDA's out-of-memory error, the loss
turns NaN, the gradients turn infinite, the disk reports too little space or fsync fails with ENOSPC, and a
subprocess is SIGKILLed in the middle of writing a checkpoint.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import subject_image
from tests.test_resume import ROOT, lora_of, new_run, tiny_config
from trainer.runs import diskspace
from trainer.training import step as train_step
from trainer.training import job as train
from trainer.runs import lifecycle, state
from trainer.config import list_presets
from trainer.errors import UserError
from trainer.events import CheckpointSaved, Failed, Finished, PreviewsRendered, Progress, Started
from trainer.jobs.manager import JobManager
from trainer.runs.folder import RunFolder
from trainer.training.job import run_training


def saved_files(run: RunFolder) -> list[Path]:
    return sorted(run.path.glob("*.safetensors")) + sorted((run.path / state.STATE_DIR).glob("*.safetensors"))


def assert_all_finite(run: RunFolder) -> None:
    for path in saved_files(run):
        for key, value in safetensors.torch.load_file(path).items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{path.name}:{key} is not finite"


def value(update):
    """A page output: either the value itself or a gr.update(value=...) dict."""
    return update.get("value") if isinstance(update, dict) and "__type__" in update else update


def no_temp_files(run: RunFolder) -> bool:
    return not [p for p in run.path.rglob("*.tmp")]


# ---- plan point 4: disk too small ----------------------------------------------------------------------------

def test_too_little_free_space_is_refused_before_training_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: diskspace.RESERVE_BYTES + 10_000)
    run = new_run(tmp_path / "run")
    events = list(run_training(run))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "user"
    assert failed.message.startswith("Not enough free disk space for this run")
    assert not any(isinstance(e, (Started, Progress)) for e in events)
    assert saved_files(run) == []
    assert RunFolder.open(run.path).status == "failed"


def test_disk_filling_up_mid_run_fails_cleanly_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    checks = []

    def free(path):  # plenty for the start check and the first two saves, then the disk is "full"
        checks.append(path)
        return 10 ** 12 if len(checks) <= 3 else diskspace.RESERVE_BYTES

    monkeypatch.setattr(diskspace, "free_bytes", free)
    run = new_run(tmp_path / "run")
    events = list(run_training(run))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "user", failed
    assert failed.message.startswith("The disk is full: the checkpoint at step 3 could not be saved")
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [1, 2]
    assert [p.name for p in saved_files(run)] == ["lora-000001.safetensors", "lora-000002.safetensors",
                                                 "state-000001.safetensors", "state-000002.safetensors"]
    for step in (1, 2):
        state.load_state(RunFolder.open(run.path), step)  # intact, resumable
    assert no_temp_files(run)

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 10 ** 12)  # space freed: resume finishes the run
    resumed = list(run_training(RunFolder.open(run.path), resume=True))
    assert isinstance(resumed[-1], Finished) and not resumed[-1].stopped
    assert [e.step for e in resumed if isinstance(e, Progress)] == [3, 4]


def test_enospc_while_writing_a_checkpoint_is_a_clear_failure_with_no_partial_file(tmp_path, monkeypatch):
    from trainer import fsutil

    real_fsync = os.fsync

    def fsync(fd):
        if "lora-000002.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    run = new_run(tmp_path / "run")
    events = list(run_training(run))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "user" and "The disk is full" in failed.message
    assert run.checkpoint_path(1).is_file() and not run.checkpoint_path(2).exists()
    assert no_temp_files(run)
    assert "Traceback" not in failed.message


# ---- plan point 2: killed while writing a checkpoint ----------------------------------------------------------

KILL_WHILE_WRITING = r"""
import os, signal, sys
from pathlib import Path
target, run_dir = sys.argv[1], Path(sys.argv[2])
real_fdopen = os.fdopen

class HalfThenDie:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def flush(self): self.f.flush()
    def fileno(self): return self.f.fileno()
    def write(self, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{self.f.fileno()}")).startswith("." + target + "."):
            self.f.write(data[: len(data) // 2]); self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # the power goes out halfway through the write
        return self.f.write(data)

os.fdopen = lambda fd, *a, **k: HalfThenDie(real_fdopen(fd, *a, **k))
from trainer.runs.folder import RunFolder
from trainer.training.job import run_training
for event in run_training(RunFolder.open(run_dir)):
    pass
"""


def test_kill_during_checkpoint_and_state_writes_leaves_no_partial_file_under_the_final_name(tmp_path):
    targets = ["lora-000002.safetensors", "state-000002.safetensors"]
    runs = {t: new_run(tmp_path / t.replace(".", "_"), steps=2) for t in targets}
    procs = {t: subprocess.Popen([sys.executable, "-c", KILL_WHILE_WRITING, t, str(runs[t].path)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for t in targets}
    for target, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == -9, out

    for target, run in runs.items():
        leftovers = [p.name for p in run.path.rglob("*.tmp")]
        # The state is written on a background thread, so the kill can also catch another atomic write (run.json)
        # halfway: every leftover is a temporary file, none carries a final name, and resume removes them.
        assert any(name.startswith("." + target + ".") for name in leftovers), leftovers
        assert all(lifecycle._TMP_NAME.match(name) for name in leftovers), leftovers
        json.loads((run.path / "run.json").read_text())  # the manifest under its final name is whole
        final = run.path / target if target.startswith("lora") else run.path / state.STATE_DIR / target
        if target.startswith("lora"):
            assert not final.exists()  # half a checkpoint never carries the final name
        else:
            assert run.checkpoint_path(2).is_file() and not final.exists()
        lora_of(run.checkpoint_path(1))  # the previous checkpoint loads
        state.load_state(RunFolder.open(run.path), 1)

    # Resuming one of them removes the leftovers and the step-2 checkpoint that has no state, then finishes.
    run = runs["state-000002.safetensors"]
    events = list(run_training(RunFolder.open(run.path), resume=True))
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert [e.step for e in events if isinstance(e, Progress)] == [2]
    assert no_temp_files(run)


# ---- plan point 5: CUDA out of memory --------------------------------------------------------------------------

def test_cuda_oom_at_step_k_names_a_smaller_preset_keeps_checkpoints_frees_memory_and_next_job_runs(tmp_path,
                                                                                                  monkeypatch):
    real_step, calls = train_step.training_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(*args, **kwargs)

    transformers = []
    real_load = train.load_parts

    def load_parts(folder, *args, **kwargs):
        parts = real_load(folder, *args, **kwargs)
        transformers.append(weakref.ref(parts.transformer))
        return parts

    monkeypatch.setattr(train_step, "training_step", step)  # TrainStep looks it up there
    monkeypatch.setattr(train, "load_parts", load_parts)
    big = new_run(tmp_path / "alice", rank=16)
    small = new_run(tmp_path / "bob", steps=2)
    manager = JobManager()
    try:
        first = manager.submit("alice", big)
        second = manager.submit("bob", small)
        while first.state == "queued":
            time.sleep(0.01)
        assert manager.queue_position(second) == 1
        events = list(first.follow(poll=0.1))
        failed = events[-1]
        assert isinstance(failed, Failed) and failed.kind == "out_of_memory"
        assert failed.message == train.oom_advice(big.config, "full") and "GPU ran out of memory" in failed.message
        assert transformers[0]() is None, "the model was still referenced when the failure was announced"
        assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [1, 2]
        assert big.checkpoint_path(1).is_file() and big.checkpoint_path(2).is_file()
        assert RunFolder.open(big.path).status == "failed"

        after = list(second.follow(poll=0.1))  # the queue moves on
        assert isinstance(after[-1], Finished) and not after[-1].stopped, after[-1]
    finally:
        manager.shutdown()


def test_oom_advice_names_a_preset_that_needs_less_memory():
    from trainer.config import load_preset

    for name in ("character-rank16-500", "style-rank16-2000"):
        cfg = load_preset(name).config()
        message = train.oom_advice(cfg)
        smaller = [p.name for p in list_presets() if train._memory_key(p.settings) < train._memory_key(cfg)]
        assert smaller and any(f"'{s}'" in message for s in smaller), message
        assert f"'{name}'" not in message
    smallest = min(list_presets(), key=lambda p: train._memory_key(p.settings))
    message = train.oom_advice(smallest.config())  # nothing smaller: say what else lowers memory
    assert "gradient checkpointing" in message and "resolution" in message


# ---- plan point 6: NaN / inf ----------------------------------------------------------------------------------

def test_nan_loss_stops_within_one_step_and_nothing_non_finite_is_saved(tmp_path, monkeypatch):
    real_step, calls = train_step.training_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_step, "training_step", step)  # TrainStep looks it up there
    run = new_run(tmp_path / "run")
    events = list(run_training(run))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "not_finite" and failed.last_step == 2
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2]  # step 3 never completed
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [1, 2]
    assert_all_finite(run)
    assert RunFolder.open(run.path).status == "failed"


def test_infinite_gradients_never_reach_a_saved_checkpoint(tmp_path, monkeypatch):
    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def clip(params, max_norm, *args, **kwargs):
        calls["n"] += 1
        params = list(params)
        if calls["n"] == 2:
            for p in params:
                p.grad.fill_(float("inf"))  # the loss was finite, the update is not
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    run = new_run(tmp_path / "run")
    events = list(run_training(run))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.kind == "not_finite", failed
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [1]
    assert not run.checkpoint_path(2).exists()
    assert_all_finite(run)


# ---- plan points 9, 10: one Train click = one job; Stop within a step, then start again ------------------------

def test_stop_takes_effect_within_one_step_and_training_can_start_again(tmp_path):
    manager = JobManager()
    try:
        job = manager.submit("alice", new_run(tmp_path / "long", steps=200, save_every=200))
        while not any(isinstance(e, Progress) and e.step >= 2 for e in list(job.events)):
            assert job.active, job.events[-1]
            time.sleep(0.02)
        assert manager.stop(job.id, "alice")
        done_at_request = max(e.step for e in list(job.events) if isinstance(e, Progress))
        events = list(job.follow(poll=0.1))
        finished = events[-1]
        assert isinstance(finished, Finished) and finished.stopped
        assert finished.last_step <= done_at_request + 1, (finished.last_step, done_at_request)
        assert max(e.step for e in events if isinstance(e, Progress)) <= done_at_request + 1
        assert RunFolder.open(job.run.path).status == "stopped"

        again = manager.submit("alice", new_run(tmp_path / "again", steps=2))  # Stop didn't break anything
        assert isinstance(list(again.follow(poll=0.1))[-1], Finished)
        assert not again.events[-1].stopped
    finally:
        manager.shutdown()


def slow_runner(release: threading.Event):
    def runner(run, should_stop, token=None, resume=False):
        while not release.is_set() and not should_stop():
            time.sleep(0.01)
        yield Finished(run_dir=run.path, last_step=0, stopped=should_stop())
    return runner


def test_many_simultaneous_train_clicks_give_exactly_one_job(tmp_path):
    from ui.dataset_step import Dataset
    from trainer.runs.store import owner_folder_name as owner_folder
    from ui.training_step import TrainingController

    release = threading.Event()
    manager = JobManager(runner=slow_runner(release))
    controller = TrainingController(manager, tmp_path / "runs")
    image, mask = subject_image()
    dataset = Dataset(image, mask, "uploaded mask")
    clicks = 6
    barrier, results = threading.Barrier(clicks), []

    def click():
        barrier.wait()
        try:
            results.append(controller.start("alice", dataset, "a photo of [trigger]", "ohwx", "", "quick-test-250",
                                            4, 4, 4e-4, 2, "tiny-demo"))
        except UserError as err:
            results.append(f"refused: {err}")

    threads = [threading.Thread(target=click) for _ in range(clicks)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(not r.startswith("refused") for r in results) == 1, results
        assert len(manager.jobs_for("alice")) == 1
        assert len(list((tmp_path / "runs" / owner_folder("alice")).iterdir())) == 1  # refused clicks left no folder
    finally:
        release.set()
        manager.shutdown()


# ---- plan point 7: closing the tab doesn't stop the job; reopening re-attaches -------------------------------------

def test_closing_the_page_keeps_the_job_and_reopening_reattaches(tmp_path):
    from ui.training_step import TrainingController

    manager = JobManager()
    controller = TrainingController(manager, tmp_path / "runs")
    try:
        manager.submit("alice", new_run(tmp_path / "runs" / "run", steps=3, preview_at_start=True))
        page = controller.follow("alice")
        next(page)  # the tab shows one update…
        page.close()  # …and is closed
        job = manager.latest_for("alice")
        list(job.follow(poll=0.1))
        assert isinstance(job.events[-1], Finished) and not job.events[-1].stopped  # it kept running
        reopened = list(controller.follow("alice"))  # a new tab re-attaches from the job's history
        text, losses, gallery, files = (value(x) for x in reopened[-1][:4])
        assert "Finished: 3 steps" in text
        assert [int(s) for s in losses["step"]] == [1, 2, 3]
        assert len(files) == 3 and all(Path(f).is_file() for f in files)
        assert len(gallery) == 1 + 3  # step 0 and one preview per checkpoint
    finally:
        manager.shutdown()
