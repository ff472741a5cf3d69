"""Data-parallel training on several processes, run on the CPU with the gloo backend (the GPU path is NCCL).

The same launcher a rented multi-GPU box uses (torchrun, as accelerate launch does) starts two trainer
processes; the gradient averaging itself is checked against a hand-computed mean.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

from tests.conftest import subject_image
from trainer.training.distributed import DistributedContext, context_from_environment
from trainer.training.schedule import scaled_learning_rate

ROOT = Path(__file__).resolve().parent.parent


def test_learning_rate_scales_with_the_square_root_of_the_gpu_count():
    assert scaled_learning_rate(1e-4, 1) == 1e-4
    assert scaled_learning_rate(1e-4, 4) == pytest.approx(2e-4)  # docs/PRACTICE.md §7: 1e-4 at batch 1 -> 2e-4 at 4
    assert scaled_learning_rate(4e-4, 2) == pytest.approx(4e-4 * 2 ** 0.5)


def test_context_comes_from_the_launcher_environment():
    assert context_from_environment({}) == DistributedContext()
    ctx = context_from_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert ctx.enabled and not ctx.is_main and ctx.world_size == 2
    assert ctx.noise_seed(42) != DistributedContext().noise_seed(42) == 42  # rank 0 keeps the run's seed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _average_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistributedContext(rank=rank, world_size=2, local_rank=rank)
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.full((3,), float(rank + 1))  # rank 0: 1, rank 1: 2 -> mean 1.5
    b.grad = torch.arange(4.0).view(2, 2) * (rank + 1)  # mean = arange * 1.5
    ctx.average_gradients([a, b])
    out[rank] = (a.grad.clone(), b.grad.clone(), ctx.any(rank == 1), ctx.average(float(rank)))
    dist.destroy_process_group()


def test_gradients_are_averaged_and_decisions_agreed_across_processes():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_average_worker, args=(port, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        a, b, anyone, mean = results[rank]
        assert torch.equal(a, torch.full((3,), 1.5))
        assert torch.equal(b, torch.arange(4.0).view(2, 2) * 1.5)
        assert anyone is True  # rank 1 said stop: both stop
        assert mean == pytest.approx(0.5)


def test_two_process_run_trains_one_identical_lora_and_writes_files_once(tmp_path):
    image, _ = subject_image((256, 320))
    image.save(tmp_path / "in.png")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
         "train", "--image", str(tmp_path / "in.png"), "--caption", "a photo of [trigger]", "--trigger", "ohwx",
         "--model", "tiny-demo", "--steps", "4", "--save-every", "2", "--resolution", "64", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "learning rate 0.0004 x sqrt(2) = 0.000566" in err
    assert err.count("LoRA identical in all 2 processes at step 2") == 1  # checked, and printed once
    assert "LoRA identical in all 2 processes at step 4" in err
    assert err.count("finished at step 4") == 1  # one progress stream for two processes
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["gpus"] == 2
    assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "lora-000000-00.png", "lora-000002-00.png", "lora-000004-00.png"]
    lora = safetensors.torch.load_file(out / "lora-000004.safetensors")
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
