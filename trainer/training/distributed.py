"""One job on several GPUs: data parallel, batch 1 on each GPU by default (what practitioners recommend).

Every process holds the whole model and the same cached images; each draws its own noise and noise level, so with
one image N GPUs see N noised copies per step. The LoRA gradients are averaged across processes by PyTorch's
DistributedDataParallel, in buckets that are sent while backward is still running (a single all-reduce after
backward measured 1.43x on 2 GPUs: bench/RESULTS.md), so every process applies the identical update and the
LoRA stays identical everywhere. The learning rate is scaled by sqrt(N x batch size) (docs/PRACTICE.md §7; the rule is
``trainer.training.schedule.scaled_learning_rate``). With a set of several images each process trains its own slice of
the step's samples (``schedule.sample_indices``). Only the main process writes checkpoints, previews and run.json.

Processes are started by ``torchrun``/``accelerate launch`` (RANK, WORLD_SIZE, LOCAL_RANK in the
environment) or by ``python -m trainer train --gpus N``, which re-launches itself through torchrun.
NCCL on CUDA; gloo on the CPU, which is how the tests run it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def noise_seed(self, seed: int) -> int:
        """Rank 0 keeps the run's own seed (a 1-GPU run is unchanged); the others draw different noise."""
        return seed + 1_000_003 * self.rank

    def data_parallel(self, module: torch.nn.Module, compress_bf16: bool = False) -> torch.nn.Module:
        """``module`` wrapped so backward averages its trainable (LoRA) gradients across processes.

        ``init_sync=False``: the frozen 12B base is identical everywhere already (same files) and must not be
        broadcast; the LoRA is broadcast by ``broadcast_parameters``. ``compress_bf16`` halves the bytes sent.
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(module, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                                      broadcast_buffers=False, gradient_as_bucket_view=True, init_sync=False)
        if compress_bf16:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return ddp

    # ---- collective operations (no-ops on one process)
    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """One flattened all-reduce after backward: the simple way, kept as the benchmark's reference."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def average(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (so Stop or a NaN on one rank stops them all together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def identical_everywhere(self, params: list[torch.nn.Parameter]) -> tuple[bool, float]:
        """(True, checksum) when every process holds the same LoRA: its checksum's min and max agree."""
        local = torch.stack([p.detach().double().abs().sum() + p.detach().double().sum() * 1e-3 for p in params]).sum()
        if not self.enabled:
            return True, float(local)
        low, high = local.clone().to(self._collective_device()), local.clone().to(self._collective_device())
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(low.item() == high.item()), float(high.item())

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Start from rank 0's LoRA exactly, whatever each process's initialisation drew."""
        if not self.enabled:
            return
        for p in params:
            dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def context_from_environment(environ=os.environ) -> DistributedContext:
    """The process's place in a torchrun/accelerate launch; a single process when none is set."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    return DistributedContext(rank=int(environ["RANK"]), world_size=world,
                              local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])))


def initialise(context: DistributedContext) -> None:
    if not context.enabled or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(context.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", context.local_rank))
    else:
        dist.init_process_group("gloo")


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
