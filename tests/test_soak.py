"""A bounded soak (docs/RELIABILITY.md point 20): many concurrent gradio_client sessions against the real app.

Eight API sessions upload their own image over and over (``/prepare_dataset``) while two of them also train
tiny-demo runs (``/train`` + ``/follow``). Afterwards: the server's memory is roughly where it was after the
first round, Gradio's upload cache did not grow with the repetitions, each session saw only its own image and
its own run, and the token given to the server through the environment appears in nothing it wrote.
To stay within about a minute on two shared cores, the trainings run at 64 px (the preset is otherwise unchanged).
"""
from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.helpers_app import launched_app
from tests.test_security import CANARY, files_containing

SESSIONS = 8
TRAINERS = 2
ROUNDS = 4
TIME_BUDGET_S = 30  # soak rounds stop early once this is spent (the training still finishes)
MEMORY_SLACK_MB = 120


def session_image(folder: Path, index: int) -> tuple[Path, tuple[int, int, int]]:
    """A distinct flat-coloured subject per session, so a mixed-up result is visible in the returned overlay."""
    from PIL import ImageDraw

    colour = (40 + 25 * index, 200 - 20 * index, (90 * index) % 256)
    image = Image.new("RGB", (96, 112), (235, 235, 235))
    ImageDraw.Draw(image).rectangle((20, 20, 76, 92), fill=colour)
    path = folder / f"session-{index}.png"
    image.save(path)
    return path, colour


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 1e6


def cache_files(folder: Path) -> int:
    """Files in Gradio's cache, after the app's sweep of the empty files gr.File leaks (see diskspace)."""
    from trainer.runs.diskspace import sweep_empty_temp_files

    sweep_empty_temp_files(folder, older_than_s=0)
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


@pytest.fixture
def small_training(monkeypatch):
    """The chosen preset at 64 px: the same code path, a CPU-friendly size."""
    from trainer import api

    real = api.load_preset

    class Small:
        def __init__(self, preset):
            self.preset = preset

        def config(self, **overrides):
            return self.preset.config(**{**overrides, "resolution": 64, "preview_at_start": False})

    monkeypatch.setattr(api, "load_preset", lambda name: Small(real(name)))  # what api.training_config calls


def test_concurrent_sessions_memory_flat_cache_bounded_each_sees_only_its_own(tmp_path, monkeypatch, small_training):
    from gradio_client import Client, handle_file

    from trainer.runs.store import owner_folder_name as owner_folder

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))
    monkeypatch.setenv("HF_TOKEN", CANARY)
    runs_root = tmp_path / "runs"
    images = [session_image(tmp_path, i) for i in range(SESSIONS)]
    with launched_app(tmp_path) as app:
        url = app.url
        clients = [Client(url, verbose=False, download_files=str(tmp_path / "downloads" / str(i)))
                   for i in range(SESSIONS)]

        def prepare(i: int):
            overlay, description = clients[i].predict(handle_file(str(images[i][0])), None, False, "u2netp",
                                                      api_name="/prepare_dataset")
            pixels = np.asarray(Image.open(overlay).convert("RGB"))
            centre = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2].astype(int)
            assert np.abs(centre - np.array(images[i][1])).max() <= 12, (i, centre, images[i][1])  # its own image
            return description

        def train_and_follow(i: int):
            clients[i].predict(None, "a photo of [trigger]", "ohwx", "", "quick-test-250", 4, 2, 4e-4, 1,
                               "tiny-demo", api_name="/train")
            job = clients[i].submit(None, api_name="/follow")
            job.result(timeout=240)
            return job.outputs()[-1]

        def follow_once(i: int):
            job = clients[i].submit(None, api_name="/follow")
            job.result(timeout=60)
            return job.outputs()[-1]

        with ThreadPoolExecutor(max_workers=SESSIONS + TRAINERS) as pool:
            # Warm-up: every session uploads, the first one trains (imports, model load, caches all happen here).
            list(pool.map(prepare, range(SESSIONS)))
            finals = [train_and_follow(0)]
            baseline_mb, baseline_files = rss_mb(), cache_files(tmp_path / "gradio-cache")
            started = time.monotonic()
            # Soak: the other training runs while all sessions keep uploading.
            trainings = [pool.submit(train_and_follow, i) for i in range(1, TRAINERS)]
            rounds = 1
            while rounds < ROUNDS and time.monotonic() - started < TIME_BUDGET_S:
                list(pool.map(prepare, range(SESSIONS)))
                rounds += 1
            finals += [t.result(timeout=300) for t in trainings]
            others = list(pool.map(follow_once, range(TRAINERS, SESSIONS)))
        end_mb, end_files = rss_mb(), cache_files(tmp_path / "gradio-cache")

        for i, final in enumerate(finals):
            text, _, gallery, files = final[0], final[1], final[2], final[3]
            assert "Finished: 2 steps" in text, text
            own = runs_root / owner_folder(clients[i].session_hash)
            runs = list(own.iterdir())
            assert len(runs) == 1, runs  # one run per training session, in its own folder
            assert len(files) == 2 and len(gallery) == 2
            assert {Path(f).name for f in files} == {p.name for p in runs[0].glob("*.safetensors")}
        for i, final in zip(range(TRAINERS, SESSIONS), others):
            assert "Step" not in final[0] and not final[3] and not final[2], final  # nothing of anyone else's
            assert not (runs_root / owner_folder(clients[i].session_hash)).exists()
        assert len(list(runs_root.iterdir())) == TRAINERS

    print(f"soak: {rounds} rounds x {SESSIONS} sessions, RSS {baseline_mb:.0f} -> {end_mb:.0f} MB, "
          f"cache files {baseline_files} -> {end_files}")
    assert rounds >= 2, "the time budget allowed only the warm-up round"
    assert end_mb - baseline_mb < MEMORY_SLACK_MB, (baseline_mb, end_mb)
    # repeated uploads of the same files don't pile up (same content, same cache entry); the second training's
    # checkpoints and previews are the only new files
    assert end_files - baseline_files <= TRAINERS * 8, (baseline_files, end_files)
    assert files_containing(tmp_path, CANARY) == []
