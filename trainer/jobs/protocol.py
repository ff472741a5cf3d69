"""The app <-> training-process protocol: how a job runs in processes of its own and how they talk back.

A job that needs several GPUs (``trainer.jobs.multigpu``) runs ``python -m trainer train ... --prepared`` under torchrun
(``torchrun_command``). The training process's main rank appends every event to a JSON-lines file (``EventSink``: one
``trainer.events.to_json_line`` per event, flushed at once); the app tails that file (``JsonlTail``) and gets the same
typed events back. The app asks for a stop by creating a stop file; the processes also stop when the app's own
process has gone (``stop_check``). Nothing else crosses the boundary: no pickles, no sockets, the token only in the
child's environment.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from trainer.events import Event, from_json_line, to_json_line

log = logging.getLogger(__name__)


def torchrun_command(processes: int, trainer_args: list[str]) -> list[str]:
    """``python -m trainer <trainer_args>`` once per process under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "trainer", *trainer_args]


class EventSink:
    """Every event as one JSON line, flushed at once, so a reader tailing the file sees it as it happens."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event: Event) -> None:
        self._file.write(to_json_line(event))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def stop_check(stop_file: Path | None, parent_pid: int | None):
    """``should_stop`` for a training process: the stop file exists, or the app that started the job has ended."""
    def should_stop() -> bool:
        if stop_file is not None and stop_file.exists():
            return True
        if parent_pid:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, someone else's
                pass
        return False
    return should_stop


class JsonlTail:
    """Complete lines appended to a file since the last read (a half-written last line waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None
        self._partial = b""

    def read(self) -> list[Event]:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")
            except FileNotFoundError:
                return []
        data = self._partial + self._file.read()
        *lines, self._partial = data.split(b"\n")
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(from_json_line(line.decode("utf-8")))
            except ValueError:  # JSONDecodeError and unknown events are ValueErrors
                log.warning("skipped an unreadable event line: %r", line[:200])
        return events

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    __del__ = close
