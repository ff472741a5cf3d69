"""One app job on several GPUs: the CLI's data-parallel path in a subprocess, followed through its events.

A worker thread of the app cannot drive N GPUs in one process, so a job that asks for N > 1 GPUs runs

    python -m torch.distributed.run --standalone --nproc_per_node=N -m trainer train --output RUN --prepared \\
        --events-jsonl CONTROL/events.jsonl --stop-file CONTROL/stop --parent-pid APP_PID

which is what ``python -m trainer train --gpus N`` runs too (``trainer.jobs.protocol.torchrun_command``), on the run folder
the app already created (``--prepared``: its run.json and dataset/, settings from its run.json).

- **Events**: the main process appends every event to ``events.jsonl`` as one JSON line, flushed
  (``trainer.events.to_json_line``); ``run_on_gpus`` tails that file and yields the same typed events, so the
  page, re-attach, stop, checkpoints and previews work exactly as for a one-GPU job. The terminal event
  (Finished / Failed) is passed on only once the processes have exited, so the GPUs are free when the job manager
  hands them to the next job.
- **Stop**: ``should_stop()`` → the stop file is created; every process checks it before each step and they agree
  through ``dist.any`` (``trainer.training.loop.train_lora``), so all stop at the same step and the run ends
  ``Finished(stopped=True)`` with what was saved. The processes also stop if the app's process disappears.
- **Crash**: processes that exit without a terminal event (a process killed, out of host memory, a bug) become a
  ``Failed`` event with the exit status and the last error line; run.json says "failed"; checkpoints are kept.
- **run.json**: the main process records every event in it (``run_training``'s ``RunRecorder``); this side writes
  it only in the crash case, when no process is left to (a ``RunRecorder`` on a freshly opened ``RunFolder``). The
  app's ``RunFolder`` object follows the job by folding the same events in memory (``RunRecorder(write=False)``),
  so it ends as run.json does without copying it back from disk.
- **Devices**: the page hears of the job's devices from ``Placed``, in the app's numbering (``cuda:2``, not the
  processes' own ``cuda:0``).
- **Token**: only as ``HF_TOKEN`` in the child processes' environment: never on the command line, never in a file.
- **Control folder**: a private temporary folder per job (mode 0700, outside the run folder, which the app serves),
  removed when the job ends.
- **Devices**: ``cuda:i`` labels become ``CUDA_VISIBLE_DEVICES`` (process k uses the job's k-th GPU). ``cpu:i``
  labels run the processes on the CPU with the gloo backend (how the tests run it): they share the CPU's cores.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from trainer.events import TERMINAL_EVENTS, Event, Failed, Placed, describe_devices
from trainer.jobs.protocol import JsonlTail, torchrun_command
from trainer.runs.folder import RunFolder
from trainer.runs.recorder import RunRecorder

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the trainer package (for the child's PYTHONPATH)
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
POLL_SECONDS = 0.2
EXIT_GRACE_SECONDS = 120.0  # after the terminal event, how long the processes get to exit on their own
STOP_GRACE_SECONDS = 60.0  # when the reader goes away (app shutdown): how long a stop may take before they are ended
FINISHED_STATUSES = ("finished", "stopped", "failed")


def child_environment(devices: Sequence[str], token: str | None, environ: Mapping[str, str] = os.environ) -> dict:
    """The training processes' environment: the job's token (or none), the job's GPUs, the trainer importable."""
    env = {k: v for k, v in environ.items() if k not in TOKEN_VARIABLES}
    if token:
        env["HF_TOKEN"] = token
    if all(d.startswith("cuda") for d in devices):
        ids = [int(d.split(":")[1]) if ":" in d else 0 for d in devices]
        parent = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        # cuda:i in this process is the i-th of our own visible devices
        env["CUDA_VISIBLE_DEVICES"] = ",".join(parent[i] if parent else str(i) for i in ids)
    elif all(d.startswith("cpu") for d in devices):
        env["CUDA_VISIBLE_DEVICES"] = ""  # processes on the CPU, gloo
    else:
        raise ValueError(f"one job's devices must all be GPUs or all CPU: {list(devices)}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else [])])
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    return env


def run_on_gpus(run: RunFolder, should_stop: Callable[[], bool] = lambda: False, token: str | None = None,
                devices: Sequence[str] = ("cuda:0", "cuda:1")) -> Iterator[Event]:
    """Train the prepared ``run`` data-parallel on ``devices`` (one process each); yields its events, ends with
    exactly one Finished or Failed."""
    devices = list(devices)
    if len(devices) < 2:
        raise ValueError("run_on_gpus needs two devices or more; one-device jobs run in process (run_training)")
    control = Path(tempfile.mkdtemp(prefix="lora-job-"))  # 0700
    events_path, stop_path = control / "events.jsonl", control / "stop"
    args = ["train", "--output", str(run.path), "--prepared", "--events-jsonl", str(events_path),
            "--stop-file", str(stop_path), "--parent-pid", str(os.getpid())]
    output: deque[str] = deque(maxlen=60)
    proc: subprocess.Popen | None = None
    follower = RunRecorder(run, write=False)  # the main process writes run.json; this object follows in memory
    try:
        try:
            proc = subprocess.Popen(torchrun_command(len(devices), args), env=child_environment(devices, token),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
        except OSError as err:
            log.error("could not start the training processes: %s", err)
            yield Failed(f"The training processes could not be started ({err.strerror or err}).", "internal")
            return
        reader = threading.Thread(target=_collect, args=(proc.stdout, output), name="multigpu-output", daemon=True)
        reader.start()
        tail = JsonlTail(events_path)
        terminal: Event | None = None
        terminal_at = 0.0
        last_step = 0
        while True:
            exited = proc.poll() is not None
            for event in tail.read():  # read after poll: whatever was written before the exit is seen
                last_step = getattr(event, "step", last_step)
                if terminal is not None:
                    continue
                if isinstance(event, Placed):  # the processes number their GPUs from 0; the page shows the app's
                    event = replace(event, devices=tuple(devices))
                _follow(follower, event)
                if isinstance(event, TERMINAL_EVENTS):
                    terminal, terminal_at = event, time.monotonic()  # held back until the processes have exited
                else:
                    yield event
            if exited:
                break
            if should_stop() and not stop_path.exists():
                stop_path.touch()
            if terminal is not None and time.monotonic() - terminal_at > EXIT_GRACE_SECONDS:
                log.warning("the training processes did not exit %.0f s after the run ended; ending them",
                            EXIT_GRACE_SECONDS)
                _end(proc)
            time.sleep(POLL_SECONDS)
        reader.join(10)
        if terminal is None:
            terminal = _crash_event(run, proc.returncode, list(output), describe_devices(devices), last_step)
            _follow(follower, terminal)
        elif proc.returncode != 0:
            log.info("training processes exited with status %s after %s", proc.returncode, type(terminal).__name__)
        tail.close()
        shutil.rmtree(control, ignore_errors=True)  # before the job ends: nothing of it is left behind
        yield terminal
    finally:
        if proc is not None and proc.poll() is None:  # the reader went away (app shutdown): stop them, then end them
            try:
                stop_path.touch()
            except OSError:
                pass
            try:
                proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _end(proc)
        shutil.rmtree(control, ignore_errors=True)


def _collect(stream, lines: deque) -> None:
    """The processes' output: kept (the last lines) for a crash message, and in the server log."""
    for line in stream:
        line = line.rstrip("\n")
        lines.append(line)
        log.debug("[training processes] %s", line)
    stream.close()


def _crash_event(run: RunFolder, returncode: int, output: list[str], where: str, last_step: int) -> Failed:
    log.error("training processes exited with status %s without finishing; their last output:\n%s",
              returncode, "\n".join(output))
    saved = _saved_checkpoints(run)
    message = (f"Training on {where} ended unexpectedly (exit status {returncode}) before it finished"
               f"{_reason(output)}. The {saved} checkpoint(s) saved so far are kept; the server log has the details.")
    failed = Failed(message, "internal", last_step)
    try:  # no process is left to record it: a recorder on what they left on disk does
        on_disk = RunFolder.open(run.path)
        if on_disk.status not in FINISHED_STATUSES:
            RunRecorder(on_disk).record(failed)
    except Exception:  # a damaged run.json is often why it crashed
        log.warning("could not record the failure in run.json", exc_info=True)
    return failed


def _follow(follower: RunRecorder, event: Event) -> None:
    """The app's RunFolder object follows the job; a mismatch there must not end the job (run.json is the record)."""
    try:
        follower.record(event)
    except Exception:
        log.warning("could not follow %s in the job's run folder object", type(event).__name__, exc_info=True)


def _reason(output: list[str]) -> str:
    """The most telling line of the processes' output: the CLI's ``error:`` line, a signal, or an exception."""
    for pattern in (r"^error: (.+)$", r"\b(Signal \d+ \(SIG\w+\)) received", r"exitcode\s*:\s*(-\d+)",
                    r"^(\w+(?:Error|Exception): .+)$"):
        for line in reversed(output):
            match = re.search(pattern, line.strip())
            if match:
                reason = match.group(1)
                if reason.startswith("-"):
                    reason = f"a process was killed by signal {reason[1:]}"
                elif reason.startswith("Signal "):
                    reason = f"a process received s{reason[1:]}"
                return f": {reason[:300]}"
    return ""


def _saved_checkpoints(run: RunFolder) -> int:
    try:
        return sum(1 for c in RunFolder.open(run.path).checkpoints if (run.path / c["path"]).is_file())
    except Exception:
        return len(list(run.path.glob(f"{run.config.name}-*.safetensors")))


def _end(proc: subprocess.Popen) -> None:
    """torchrun passes SIGTERM on to its processes; SIGKILL only if that is ignored."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
