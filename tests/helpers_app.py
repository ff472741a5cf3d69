"""Launch the real app on a free loopback port for end-to-end tests (gradio_client and the browser).

Follows gradio's own ``client/python/test/test_client.py::connect`` pattern: launch with
``prevent_thread_lock=True``, hand out the URL, and always ``close()`` afterwards. The launch settings
mirror ``app.py`` (queue, ``max_file_size``, ``allowed_paths``) so the tests exercise what users run.
"""
from __future__ import annotations

import os
import secrets
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.conftest import subject_image


@dataclass
class RunningApp:
    url: str
    manager: "JobManager"  # noqa: F821 - imported lazily
    runs_root: Path

    @property
    def jobs(self) -> list:
        """Every job submitted to this app, oldest first, whoever owns it (a browser's owner id is encrypted
        in its localStorage, so a browser test cannot look its jobs up by owner)."""
        return list(self.manager.submitted)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched_app(tmp_path: Path) -> Iterator[RunningApp]:
    """Build the app with a fresh ``JobManager`` and a runs folder under ``tmp_path``; yield its URL.

    The browser-state secret is fixed for the app's lifetime (as ``app.py``'s per-installation secret is),
    so a reloaded page decrypts the owner id it stored.
    """
    from trainer.dataset.images import MAX_FILE_BYTES
    from trainer.jobs.manager import JobManager
    from ui.app import build_app

    runs_root = Path(tmp_path) / "runs"
    runs_root.mkdir(parents=True, exist_ok=True)
    # Each app gets its own Gradio cache. Gradio names cached files by their content and, when a server shuts down,
    # deletes every file it created; the shutdown finishes on the server's thread, which can outlive close()'s
    # 5 s wait. With one shared cache a closed app then deleted the next app's copy of the same upload or mask
    # preview (same image, same path): the browser's mask preview never loaded (CI, 2026-11-22 and later).
    previous_cache = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(Path(tmp_path) / "gradio-cache")
    class RecordingJobManager(JobManager):
        """A plain ``JobManager`` that also remembers what was submitted, for the tests to inspect."""

        def __init__(self):
            super().__init__()
            self.submitted = []

        def submit(self, owner, run, token=None):
            job = super().submit(owner, run, token=token)
            self.submitted.append(job)
            return job

    manager = RecordingJobManager()
    demo = build_app(manager, runs_root, state_secret=secrets.token_urlsafe(32))
    try:
        demo.queue(default_concurrency_limit=4)
        _, local_url, _ = demo.launch(
            prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
            max_file_size=MAX_FILE_BYTES, allowed_paths=[str(runs_root)], show_error=False, quiet=True)
        yield RunningApp(url=local_url, manager=manager, runs_root=runs_root)
    finally:
        demo.close()
        server_thread = getattr(getattr(demo, "server", None), "thread", None)
        if server_thread is not None:
            server_thread.join(60)  # the lifespan shutdown (cache deletion) is over before the next test starts
        manager.shutdown()
        if previous_cache is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous_cache


def write_subject_png(folder: Path, name: str = "subject.png", size: tuple[int, int] = (160, 200)) -> Path:
    """``subject_image(size)`` saved as a real PNG file, ready to upload."""
    path = Path(folder) / name
    subject_image(size)[0].save(path, format="PNG")
    return path
