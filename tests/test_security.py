"""Security (docs/RELIABILITY.md points 8, 14, 15, 16): weights from outside, the token, paths, visitors apart."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import subject_image
from tests.test_resume import ROOT, cli, cli_env, new_run
from tests.test_reliability import slow_runner
from trainer.model import weights
from trainer.config import TrainingConfig
from trainer.errors import UserError
from trainer.events import Finished
from trainer.jobs.manager import JobManager
from trainer.runs.folder import RunFolder

CANARY = "hf_CANARYtokenDoNotLeak0123456789abcdef"


# ---- plan point 15: weights from outside ---------------------------------------------------------------------

def lora_tensors(kohya: bool = False) -> dict[str, torch.Tensor]:
    if kohya:
        return {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 64),
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4),
                "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}


def test_real_loras_in_both_layouts_load(tmp_path):
    for kohya in (False, True):
        path = tmp_path / f"lora-{kohya}.safetensors"
        safetensors.torch.save_file(lora_tensors(kohya), path, metadata={"rank": "4"})
        tensors, metadata = weights.load_lora(path)
        assert tensors.keys() == lora_tensors(kohya).keys() and metadata == {"rank": "4"}


def test_a_checkpoint_written_by_training_loads(tmp_path):
    from trainer.training.job import run_training

    run = new_run(tmp_path / "run", steps=1)
    list(run_training(run))
    tensors, metadata = weights.load_lora(run.checkpoint_path(1))
    assert tensors and metadata["software"] == "one-image-lora"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_files_are_refused_by_name(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save(lora_tensors(), path)
    with pytest.raises(UserError, match="pickle"):
        weights.load_lora(path)


def test_pickles_renamed_to_safetensors_are_refused(tmp_path):
    zipped = tmp_path / "zip.safetensors"
    torch.save(lora_tensors(), zipped)  # torch's zip format
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    for path in (zipped, raw):
        with pytest.raises(UserError, match="pickle|damaged"):
            weights.load_lora(path)
    other = tmp_path / "lora.txt"
    other.write_text("hello")
    with pytest.raises(UserError, match="must be a .safetensors file"):
        weights.load_lora(other)


def test_oversized_header_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")  # claims a 1 TB header
    with pytest.raises(UserError, match="header"):
        weights.load_lora(path)
    # a real header just over the cap, too
    monkeypatch.setattr(weights, "MAX_HEADER_BYTES", 64)
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(lora_tensors(), path)
    with pytest.raises(UserError, match="more than the 64 bytes allowed"):
        weights.load_safetensors(path, max_header_bytes=64)


def header_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header,data,why", [
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1000]}}, b"\0" * 16, "outside"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "a.lora_B.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "overlap"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, "size"),
    ({"a.lora_A.weight": {"dtype": "OBJ", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    ({"__metadata__": {"x": 1}}, b"", "metadata"),
])
def test_malformed_headers_are_refused(tmp_path, header, data, why):
    with pytest.raises(UserError, match="damaged"):
        weights.load_lora(header_file(tmp_path / "bad.safetensors", header, data))


def test_truncated_file_and_foreign_keys_and_nan_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(lora_tensors(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UserError, match="damaged"):
        weights.load_lora(cut)

    model = tmp_path / "model.safetensors"  # a full model (or anything else) is not a LoRA
    safetensors.torch.save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, model)
    with pytest.raises(UserError, match="not a Flux LoRA"):
        weights.load_lora(model)

    nan = tmp_path / "nan.safetensors"
    bad = lora_tensors()
    bad["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(bad, nan)
    with pytest.raises(UserError, match="non-finite"):
        weights.load_lora(nan)


# ---- plan point 16: the token never leaves the process --------------------------------------------------------

def files_containing(folder: Path, needle: str) -> list[Path]:
    hits = []
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if needle.encode() in data or needle.encode("utf-16-le") in data:
                hits.append(path)
    return hits


def test_token_canary_cli_writes_and_prints_it_nowhere(tmp_path, isolated_data_dir):
    image, _ = subject_image((96, 112))
    image.save(tmp_path / "subject.png")
    env = cli_env(HF_TOKEN=CANARY, ONE_IMAGE_LORA_DATA_DIR=str(isolated_data_dir))
    ok = cli("train", "--image", tmp_path / "subject.png", "--caption", "a photo of [trigger]", "--trigger", "ohwx",
             "--model", "tiny-demo", "--steps", 2, "--save-every", 1, "--resolution", 64, "--output",
             tmp_path / "run", env=env)
    assert ok.returncode == 0, ok.stderr
    # A Hub model with the token, offline: the failure message must not carry it either.
    hub = cli("train", "--image", tmp_path / "subject.png", "--caption", "a photo", "--model",
              "some-org/private-flux", "--output", tmp_path / "hub-run", env=env)
    assert hub.returncode == 2 and hub.stderr.count("\n") <= 2 and "Traceback" not in hub.stderr
    resumed = cli("train", "--output", tmp_path / "hub-run", "--resume", env=env)
    for out in (ok, hub, resumed):
        assert CANARY not in out.stdout and CANARY not in out.stderr
    assert files_containing(tmp_path, CANARY) == []
    assert files_containing(isolated_data_dir, CANARY) == []
    help_text = cli("train", "--help").stdout
    assert "token" not in help_text.lower()  # never on a command line


def test_token_canary_through_a_job_and_the_page(tmp_path, caplog, monkeypatch):
    from ui.training_step import TrainingController

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    manager = JobManager()
    controller = TrainingController(manager, tmp_path / "runs")
    try:
        job = manager.submit("alice", new_run(tmp_path / "runs" / "a", steps=1), token=CANARY)
        updates = list(controller.follow("alice"))
        failing = manager.submit("alice", new_run(tmp_path / "runs" / "b", model="some-org/private-flux"), token=CANARY)
        failed_updates = list(controller.follow("alice"))
        assert isinstance(job.events[-1], Finished)
        assert "Hugging Face" in failing.events[-1].message or "can't be reached" in failing.events[-1].message
        texts = [repr(job), repr(failing), repr(job.events), repr(failing.events), repr(updates),
                 repr(failed_updates), caplog.text]
        assert not [t for t in texts if CANARY in t]
        assert files_containing(tmp_path, CANARY) == []
    finally:
        manager.shutdown()


# ---- plan point 14: paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "..", "a/b", "a\\b", ".hidden"])
def test_odd_lora_names_are_refused(name):
    with pytest.raises(UserError, match="plain file name"):
        TrainingConfig(name=name)


def test_cli_refuses_traversal_in_name(tmp_path):
    image, _ = subject_image((96, 112))
    image.save(tmp_path / "subject.png")
    out = cli("train", "--image", tmp_path / "subject.png", "--caption", "x", "--model", "tiny-demo",
              "--name", "../../escaped", "--output", tmp_path / "run")
    assert out.returncode == 2 and "plain file name" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.parent.glob("escaped*"))


def test_owner_ids_and_model_paths_cannot_escape_the_runs_folder(tmp_path):
    from ui.dataset_step import Dataset
    from trainer.runs.store import owner_folder_name as owner_folder
    from ui.training_step import TrainingController

    release = threading.Event()
    manager = JobManager(runner=slow_runner(release))
    runs_root = tmp_path / "data" / "runs"
    controller = TrainingController(manager, runs_root)
    image, mask = subject_image()
    try:
        evil = "../../../../outside"
        controller.start(evil, Dataset(image, mask, "automatic"), "a photo", "", "", "quick-test-250", 4, 2, 4e-4, 1,
                         "tiny-demo")
        (folder,) = list((runs_root / owner_folder(evil)).iterdir())
        assert folder.resolve().is_relative_to(runs_root.resolve())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
        release.set()
        list(manager.latest_for(evil).follow(poll=0.05))
    finally:
        release.set()
        manager.shutdown()


def test_a_model_path_that_is_not_a_model_is_a_message(tmp_path):
    from trainer.training.job import run_training

    for spec in ("../../../etc", "/etc", "~/", "..\\..\\windows"):
        run = new_run(tmp_path / f"run{abs(hash(spec))}", model=spec)
        events = list(run_training(run))
        assert events[-1].kind == "user", (spec, events[-1])


def test_resume_only_inside_the_owners_own_folder(tmp_path):
    from trainer.runs.store import owner_folder_name as owner_folder

    runs_root = tmp_path / "runs"
    alice_run = new_run(runs_root / owner_folder("alice") / "run")
    alice_run.set_status("interrupted")
    bob_root = runs_root / owner_folder("bob")
    bob_root.mkdir(parents=True)
    (bob_root / "link").symlink_to(alice_run.path, target_is_directory=True)
    manager = JobManager(runner=slow_runner(threading.Event()))
    try:
        for path in (alice_run.path, bob_root / ".." / owner_folder("alice") / "run", bob_root / "link", bob_root,
                     Path("/etc")):
            with pytest.raises(UserError, match="not one of yours"):
                manager.resume("bob", path, allowed_root=bob_root)
        with pytest.raises(UserError, match="not a run folder written by this app"):
            manager.resume("alice", runs_root, allowed_root=tmp_path)
    finally:
        manager.shutdown()


# ---- plan point 8: visitors apart; a queue with positions --------------------------------------------------------

def test_owners_cannot_see_follow_stop_or_download_each_others_jobs(tmp_path):
    from ui.dataset_step import Dataset
    from trainer.runs.store import owner_folder_name as owner_folder
    from ui.training_step import TrainingController

    release = threading.Event()
    manager = JobManager(runner=slow_runner(release), workers=1)
    runs_root = tmp_path / "runs"
    controller = TrainingController(manager, runs_root)
    image, mask = subject_image()
    dataset = Dataset(image, mask, "automatic")
    try:
        controller.start("alice", dataset, "a photo", "", "", "quick-test-250", 4, 2, 4e-4, 1, "tiny-demo")
        controller.start("bob", dataset, "a photo", "", "", "quick-test-250", 4, 2, 4e-4, 1, "tiny-demo")
        alice, bob = manager.latest_for("alice"), manager.latest_for("bob")
        deadline = time.monotonic() + 10
        while alice.state != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert alice.state == "running" and manager.queue_position(alice) == 0
        assert bob.state == "queued" and manager.queue_position(bob) == 1  # one GPU: bob waits, and knows where
        assert "position 1" in next(controller.follow("bob"))[0]

        assert manager.get(alice.id, "bob") is None
        assert manager.stop(alice.id, "bob") is False and alice.active and not alice.stop_requested
        assert manager.jobs_for("bob") == [bob] and manager.latest_for("mallory") is None
        assert controller.stop("mallory") == "Nothing is running."
        assert alice.active
        (mallory_view,) = list(controller.follow("mallory"))
        assert str(alice.run.path) not in repr(mallory_view)
        # files: per-owner folders named by a hash that reveals nothing about the owner id
        assert alice.run.path.parent == runs_root / owner_folder("alice") != bob.run.path.parent
        assert "alice" not in str(alice.run.path) and len(owner_folder("alice")) == 20

        assert controller.stop("bob") == "Stopping after the current step…"  # bob stops only his own
        assert alice.active and not alice.stop_requested
    finally:
        release.set()
        manager.shutdown()
