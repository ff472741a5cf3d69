"""Background jobs: a queue, worker threads, per-owner access, stop and re-attach.

A job runs ``run_training`` on a worker thread and appends every event to its history; readers (a
browser tab, the CLI) follow that history from any index, so a reloaded page re-attaches by reading it
from the start. Jobs belong to an owner (a browser's id, or the logged-in user): every lookup takes the
owner, and another owner's job is simply not found. There are as many workers as devices; extra jobs
wait in a queue and know their position.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from trainer.errors import UserError
from trainer.events import TERMINAL_EVENTS, Event, Failed, Finished, Status
from trainer.runs import RunFolder
from trainer.train import run_training

log = logging.getLogger(__name__)
Runner = Callable[..., Iterator[Event]]
ACTIVE_STATES = ("queued", "running")


@dataclass(eq=False)
class Job:
    id: str
    owner: str
    run: RunFolder
    token: str | None = field(default=None, repr=False)  # never printed, never written
    state: str = "queued"  # queued → running → finished | stopped | failed
    events: list[Event] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    resume: bool = False  # continue the run from its newest training state
    device: str | None = None  # the GPU a worker gave it ("cuda:1"); None when there is one device

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._changed = threading.Condition()

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    def publish(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            if isinstance(event, Finished):
                self.state = "stopped" if event.stopped else "finished"
            elif isinstance(event, Failed):
                self.state = "failed"
            self._changed.notify_all()

    def set_state(self, state: str) -> None:
        with self._changed:
            self.state = state
            self._changed.notify_all()

    def wait_for_events(self, start: int, timeout: float) -> list[Event]:
        """Events from index ``start`` on; waits up to ``timeout`` seconds when there are none yet."""
        with self._changed:
            if len(self.events) <= start and self.active:
                self._changed.wait(timeout)
            return self.events[start:]

    def follow(self, start: int = 0, poll: float = 0.5) -> Iterator[Event]:
        """Every event from ``start`` until the job ends (blocking)."""
        index = start
        while True:
            new = self.wait_for_events(index, poll)
            for event in new:
                yield event
            index += len(new)
            if not self.active and index >= len(self.events):
                return


def gpu_devices() -> list[str]:
    """One worker per CUDA GPU when there are several: different visitors' jobs then run side by side."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] if count > 1 else []


class JobManager:
    def __init__(self, runner: Runner = run_training, workers: int = 1, devices: list[str] | None = None):
        """``devices``: one worker pinned to each (e.g. ``gpu_devices()``); otherwise ``workers`` unpinned workers."""
        self._runner = runner
        self._jobs: dict[str, Job] = {}
        self._queue: "queue.Queue[Job | None]" = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        slots = list(devices) if devices else [None] * workers
        self._threads = [threading.Thread(target=self._work, args=(device,), name=f"train-worker-{i}", daemon=True)
                         for i, device in enumerate(slots)]
        for t in self._threads:
            t.start()

    # ---- submitting and finding
    def submit(self, owner: str, run: RunFolder, token: str | None = None) -> Job:
        """Queue a job. One active job per owner: a second Train click is refused, not queued twice."""
        with self._lock:
            if self._active_for(owner) is not None:
                raise UserError("You already have a training job running or queued. Stop it first, or wait for it "
                                "to finish.")
            job = Job(id=f"job-{next(self._ids)}-{run.path.name}", owner=owner, run=run, token=token)
            self._jobs[job.id] = job
            self._queue.put(job)
        return job

    def resume(self, owner: str, run_dir: Path, token: str | None = None,
               allowed_root: Path | None = None) -> Job:
        """Queue a job that continues the run in ``run_dir`` from its newest intact training state.

        Only a run folder this app wrote (``trainer.resume.open_for_resume``), inside ``allowed_root`` when
        given (the owner's own folder), that no other owner's job has touched and that no job is training now.
        """
        from trainer.resume import open_for_resume

        run_dir = Path(run_dir)
        if allowed_root is not None:
            root = Path(allowed_root).resolve()
            if run_dir.is_symlink() or not run_dir.resolve().is_relative_to(root) or run_dir.resolve() == root:
                raise UserError("That run is not one of yours.")
        resolved = run_dir.resolve()
        with self._lock:
            for other in self._jobs.values():
                if other.run.path.resolve() != resolved:
                    continue
                if other.owner != owner:
                    raise UserError("That run is not one of yours.")
                if other.active:
                    raise UserError("That run is already training.")
            if self._active_for(owner) is not None:
                raise UserError("You already have a training job running or queued. Stop it first, or wait for it "
                                "to finish.")
            run = open_for_resume(run_dir)
            job = Job(id=f"job-{next(self._ids)}-{run.path.name}", owner=owner, run=run, token=token, resume=True)
            self._jobs[job.id] = job
            self._queue.put(job)
        return job

    def known_run_paths(self) -> list[Path]:
        """Run folders of every job this manager holds (a restart check must leave them alone)."""
        return [j.run.path for j in list(self._jobs.values())]

    def get(self, job_id: str, owner: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def jobs_for(self, owner: str) -> list[Job]:
        return sorted((j for j in self._jobs.values() if j.owner == owner), key=lambda j: j.created)

    def latest_for(self, owner: str) -> Job | None:
        jobs = self.jobs_for(owner)
        return jobs[-1] if jobs else None

    def active_for(self, owner: str) -> Job | None:
        with self._lock:
            return self._active_for(owner)

    def _active_for(self, owner: str) -> Job | None:
        return next((j for j in self._jobs.values() if j.owner == owner and j.active), None)

    def queue_position(self, job: Job) -> int:
        """0 when running (or done), else how many queued jobs are ahead of it, plus one."""
        if job.state != "queued":
            return 0
        with self._lock:
            waiting = [j for j in self._jobs.values() if j.state == "queued"]
        waiting.sort(key=lambda j: j.created)
        return waiting.index(job) + 1

    def stop(self, job_id: str, owner: str) -> bool:
        job = self.get(job_id, owner)
        if job is None or not job.active:
            return False
        job.request_stop()
        if job.state == "queued":  # never started: nothing to wind down
            job.publish(Finished(run_dir=job.run.path, last_step=0, stopped=True))
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        for job in list(self._jobs.values()):
            job.request_stop()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)

    # ---- the worker
    def _work(self, device: str | None = None) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.state != "queued":  # stopped while waiting
                continue
            job.device = device
            job.set_state("running")
            try:
                extra = {"resume": True} if job.resume else {}
                if device is not None:
                    extra["device"] = device
                    job.publish(Status(f"Running on GPU {device.split(':')[-1]}"))
                for event in self._runner(job.run, should_stop=lambda: job.stop_requested, token=job.token, **extra):
                    job.publish(event)
                    if isinstance(event, TERMINAL_EVENTS):
                        break
            except Exception:  # the runner turns failures into events; this is a last line of defence
                log.exception("job %s crashed", job.id)
                job.publish(Failed("The training worker crashed; the server log has the details. Saved "
                                   "checkpoints are kept.", "internal"))
            if job.active:  # the runner ended without a terminal event
                job.publish(Finished(run_dir=job.run.path, last_step=0, stopped=job.stop_requested))
