"""Several GPUs on one box: queued jobs of different visitors run at the same time, one per GPU.

The runner is a stand-in (no GPU here): it records which device the job manager gave it and waits until
released, so the test can see both jobs running at once and the third one queued.
"""
from __future__ import annotations

import threading

from tests.conftest import subject_image
from trainer.config import TrainingConfig
from trainer.events import Finished, Placed, Progress, Status
from trainer.jobs.manager import JobManager
from trainer.runs.folder import RunFolder
from ui.view import RunView


def test_jobs_of_different_visitors_run_side_by_side_one_per_gpu(tmp_path):
    started = threading.Barrier(3, timeout=30)  # both workers + the test
    release = threading.Event()
    seen: dict[str, str] = {}

    def runner(run, should_stop, token=None, device=None):
        seen[run.path.name] = device
        yield Placed(model_path="tiny-demo", memory_tier="full", devices=(device,))  # as run_training does,
        yield Status("Loading model")  # then says what it does there
        if len(seen) <= 2:  # the first two meet the test at the barrier; the third comes after they end
            started.wait()
        release.wait(30)
        yield Progress(step=1, total_steps=1, loss=1.0, steps_per_second=1.0, eta_seconds=0.0)
        yield Finished(run_dir=run.path, last_step=1, stopped=False)

    manager = JobManager(runner=runner, devices=["cuda:0", "cuda:1"])
    image, mask = subject_image()
    jobs = [manager.submit(owner, RunFolder.create(tmp_path, TrainingConfig(), image, mask, run_id=owner))
            for owner in ("alice", "bob", "carol")]
    started.wait()  # alice's and bob's jobs are running at the same time
    assert sorted(seen.values()) == ["cuda:0", "cuda:1"]
    assert {j.state for j in jobs[:2]} == {"running"} and jobs[2].state == "queued"
    assert manager.queue_position(jobs[2]) == 1
    views = []
    for job in jobs[:2]:
        view = RunView()
        for event in job.events:
            view.apply(event)
        views.append(view.progress_markdown())
    assert sorted(v.split("· on ")[1].split("*")[0].split()[1] for v in views) == ["0", "1"]  # "on GPU 0", "on GPU 1"
    release.set()
    for job in jobs:
        list(job.follow())
    assert [j.state for j in jobs] == ["finished"] * 3
    assert seen["carol"] in ("cuda:0", "cuda:1")  # the third ran once a GPU was free
    manager.shutdown()


def test_one_device_means_no_pinning(tmp_path):
    calls = []

    def runner(run, should_stop, token=None, **extra):
        calls.append(extra)
        yield Finished(run_dir=run.path, last_step=0, stopped=False)

    manager = JobManager(runner=runner)
    image, mask = subject_image()
    job = manager.submit("alice", RunFolder.create(tmp_path, TrainingConfig(), image, mask))
    list(job.follow())
    assert calls == [{}] and job.device is None
    manager.shutdown()
