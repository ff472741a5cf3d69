"""Background jobs: a queue, worker threads, per-owner access, stop and re-attach.

A job runs ``run_training`` on a worker thread and appends every event to its history; readers (a
browser tab, the CLI) follow that history from any index, so a reloaded page re-attaches by reading it
from the start. Jobs belong to an owner (a browser's id, or the logged-in user): every lookup takes the
owner, and another owner's job is simply not found. There are as many workers as devices; extra jobs
wait in a queue and know their position.

Several GPUs for one job: a job asks for ``gpus`` devices (its run folder's ``gpus``, 1 by default). The
manager's devices are a pool, and the rule is strict first-come, first-served: the oldest queued job starts
as soon as as many devices as it asks for are free, and the jobs behind it wait until it has started (so a
2-GPU job is never starved by a stream of 1-GPU jobs; the price is that a free GPU can idle while the job at
the head waits for a second one). A job holds its devices until its runner has ended, so no other job is given
them meanwhile. A job with N > 1 devices runs through ``multi_runner`` (``trainer.jobs.multigpu.run_on_gpus``: N
data-parallel processes under torchrun) instead of ``runner``; it needs a manager with N devices or more
(``devices=gpu_devices()``; on the CPU, tests pass ``["cpu:0", "cpu:1"]``: two gloo processes sharing the CPU).
A resumed job always runs on one device, as ``python -m trainer train --resume`` does. The page learns which
devices a job got from its runner's ``Placed`` event; the manager itself writes no run.json (the runner records).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from trainer.errors import UserError
from trainer.events import TERMINAL_EVENTS, Event, Failed, Finished
from trainer.runs.folder import RunFolder
from trainer.training.job import run_training

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
    device: str | None = None  # the GPU a worker gave a one-GPU job ("cuda:1"); None when there is one device
    gpus: int = 1  # devices it asks for; more than one runs it data-parallel in that many processes
    devices: tuple[str, ...] = ()  # every device it holds while it runs: ("cuda:0", "cuda:2"), or (device,)

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
    def __init__(self, runner: Runner = run_training, workers: int = 1, devices: list[str] | None = None,
                 multi_runner: Runner | None = None):
        """``devices``: a pool of devices, one worker each (e.g. ``gpu_devices()``); otherwise ``workers`` unpinned
        workers. ``multi_runner`` runs a job that holds several devices (default ``trainer.jobs.multigpu.run_on_gpus``)."""
        if multi_runner is None:
            from trainer.jobs.multigpu import run_on_gpus as multi_runner
        self._runner = runner
        self._multi_runner = multi_runner
        self._jobs: dict[str, Job] = {}
        self._waiting: list[Job] = []  # queued jobs, oldest first
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job queued or stopped, devices freed, shutdown
        self._closing = False
        self._ids = itertools.count(1)
        self._slots: list[str | None] = list(devices) if devices else [None] * workers
        self._free = list(range(len(self._slots)))  # indices into _slots
        self._threads = [threading.Thread(target=self._work, name=f"train-worker-{i}", daemon=True)
                         for i in range(len(self._slots))]
        for t in self._threads:
            t.start()

    @property
    def devices(self) -> list[str]:
        """The devices jobs are pinned to ([] when the workers are unpinned: one device)."""
        return [d for d in self._slots if d is not None]

    @property
    def max_gpus(self) -> int:
        """The most devices one job can ask for."""
        return len(self.devices) if self.devices else 1

    # ---- submitting and finding
    def submit(self, owner: str, run: RunFolder, token: str | None = None, gpus: int | None = None) -> Job:
        """Queue a job on ``gpus`` devices (default: the run folder's ``gpus``). One active job per owner: a second
        Train click is refused, not queued twice."""
        gpus = run.gpus if gpus is None else gpus
        if not isinstance(gpus, int) or gpus < 1:
            raise UserError(f"The number of GPUs must be a whole number of 1 or more, got {gpus!r}.")
        if gpus > self.max_gpus:
            raise UserError(f"This server can give a job at most {self.max_gpus} GPU(s); {gpus} were asked for.")
        with self._lock:
            if self._active_for(owner) is not None:
                raise UserError("You already have a training job running or queued. Stop it first, or wait for it "
                                "to finish.")
            job = Job(id=f"job-{next(self._ids)}-{run.path.name}", owner=owner, run=run, token=token, gpus=gpus)
            self._jobs[job.id] = job
            self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:  # holding the lock
        self._waiting.append(job)
        self._changed.notify_all()

    def resume(self, owner: str, run_dir: Path, token: str | None = None,
               allowed_root: Path | None = None) -> Job:
        """Queue a job that continues the run in ``run_dir`` from its newest intact training state.

        Only a run folder this app wrote (``trainer.runs.lifecycle.open_for_resume``), inside ``allowed_root`` when
        given (the owner's own folder), that no other owner's job has touched and that no job is training now.
        """
        from trainer.runs.lifecycle import open_for_resume

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
            self._enqueue(job)
        return job

    def known_run_paths(self) -> list[Path]:
        """Run folders of every job this manager holds (a restart check must leave them alone)."""
        with self._lock:
            return [j.run.path for j in self._jobs.values()]

    def get(self, job_id: str, owner: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def jobs_for(self, owner: str) -> list[Job]:
        with self._lock:  # a submit on another thread may be adding to the dict
            jobs = [j for j in self._jobs.values() if j.owner == owner]
        return sorted(jobs, key=lambda j: j.created)

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
        with self._lock:  # one read under the lock: a job that starts meanwhile can't vanish between two reads
            if job.state != "queued":
                return 0
            waiting = sorted((j for j in self._jobs.values() if j.state == "queued"), key=lambda j: j.created)
        return waiting.index(job) + 1

    def stop(self, job_id: str, owner: str) -> bool:
        job = self.get(job_id, owner)
        if job is None or not job.active:
            return False
        job.request_stop()
        with self._lock:
            if job.state == "queued":  # never started: nothing to wind down
                job.publish(Finished(run_dir=job.run.path, last_step=0, stopped=True))
                self._changed.notify_all()  # the jobs behind it may start now
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closing = True
            for job in self._waiting:
                if job.state == "queued":
                    job.publish(Finished(run_dir=job.run.path, last_step=0, stopped=True))
            self._waiting.clear()
            self._changed.notify_all()
        for job in list(self._jobs.values()):
            job.request_stop()
        for t in self._threads:
            t.join(timeout)

    # ---- the workers
    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closing:
                        return
                    self._waiting = [j for j in self._waiting if j.state == "queued"]  # drop jobs stopped while queued
                    if self._waiting and len(self._free) >= self._waiting[0].gpus:
                        job = self._waiting.pop(0)
                        taken, self._free = self._free[:job.gpus], self._free[job.gpus:]
                        job.devices = tuple(d for d in (self._slots[i] for i in taken) if d is not None)
                        job.device = job.devices[0] if job.gpus == 1 and job.devices else None
                        job.set_state("running")  # under the lock: queue positions never see it half-started
                        break
                    self._changed.wait()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._free = sorted(self._free + taken)
                    self._changed.notify_all()

    def _run(self, job: Job) -> None:
        from trainer.dataset.caption import free as free_captioner

        free_captioner()  # the page's caption model gives its (GPU) memory back before any training starts
        try:
            extra: dict = {"resume": True} if job.resume else {}
            runner = self._runner
            if job.gpus > 1:
                runner, extra["devices"] = self._multi_runner, job.devices
            elif job.device is not None:
                extra["device"] = job.device
            events = runner(job.run, should_stop=lambda: job.stop_requested, token=job.token, **extra)
            try:
                for event in events:
                    job.publish(event)
                    if isinstance(event, TERMINAL_EVENTS):
                        break
            finally:
                getattr(events, "close", lambda: None)()  # a runner's clean-up runs before the devices are freed
        except Exception:  # the runner turns failures into events; this is a last line of defence
            log.exception("job %s crashed", job.id)
            job.publish(Failed("The training worker crashed; the server log has the details. Saved "
                               "checkpoints are kept.", "internal"))
        if job.active:  # the runner ended without a terminal event
            job.publish(Finished(run_dir=job.run.path, last_step=0, stopped=job.stop_requested))
