"""Several processes, one run: torch.distributed set up from the launcher's environment.

`torchrun` and `accelerate launch` (multi-GPU) both export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; the process group is initialised from those (gloo on CPU, NCCL on
CUDA). `accelerate.Accelerator()` is not used for this: on a machine without CUDA it reports a
single process unless ACCELERATE_USE_CPU is set (accelerate only selects MULTI_CPU when asked for
the CPU), so under `torchrun` on CPU every process believed it was alone, trained on all the data
and wrote the same run directory.

Gradients are reduced explicitly (one all-reduce per step of the trainable parameters' gradients,
weighted by each process's batch size), so every process applies the same update and the
replicas stay identical; the training step never goes around a wrapper that would do it.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

from kano.core.errors import KanoError


class Dist:
    """rank / world of this process and the few collectives the trainer needs (no-ops when alone)."""

    def __init__(self, device: torch.device, world: int = 1, rank: int = 0, local_rank: int = 0):
        self.device, self.world, self.rank, self.local_rank = device, world, rank, local_rank
        self.backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None, resolve) -> "Dist":
        """`resolve(device) -> torch.device` validates --device; under a launcher CUDA means cuda:LOCAL_RANK."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls(resolve(device))
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise KanoError(f"a multi-process launch (WORLD_SIZE={world}) must set {', '.join(missing)} (torchrun and "
                            "accelerate launch do), got none")
        if not torch.distributed.is_available():
            raise KanoError(f"WORLD_SIZE={world} needs torch.distributed, got a torch build without it")
        dev = resolve(device)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", local_rank)
            if dev.index >= torch.cuda.device_count():
                raise KanoError(f"LOCAL_RANK {local_rank} must name one of the {torch.cuda.device_count()} CUDA devices, got {dev}")
            torch.cuda.set_device(dev)
        self = cls(dev, world, rank, local_rank)
        self.backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(self.backend, timeout=datetime.timedelta(hours=2))
        return self

    def close(self) -> None:
        if self.backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.backend = None

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        x = t.to(self._comm_device())
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
        return x.to(t.device)

    def reduce_step(self, params: list[torch.nn.Parameter], n_local: int, stats: list[float]) -> tuple[int, list[float]]:
        """Average the gradients over all processes' samples of this step, in place.

        Each process's gradient is the gradient of its batch mean; weighted by its batch size n_r and
        divided by Σ n_r it becomes the gradient of the mean over the step's whole global batch (a
        process with an empty batch contributes zeros). `stats` (per-process batch means, e.g. the
        loss terms) ride in the same all-reduce. Returns (Σ n_r, global means of stats).
        """
        if self.world == 1:
            return n_local, stats
        dev = self._comm_device()
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().to(dev, torch.float32) * n_local for p in params]
        extra = torch.tensor([float(n_local)] + [s * n_local for s in stats], dtype=torch.float32, device=dev)
        vec = torch.cat(parts + [extra])
        torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.SUM)
        total = float(vec[-len(extra)])
        off = 0
        for p in params:
            k = p.numel()
            g = (vec[off:off + k] / total).view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
            off += k
        means = (vec[-len(extra) + 1:] / total).tolist() if stats else []
        return int(total), means

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Start every replica from rank 0's trainable parameters."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                x = p.data.to(self._comm_device()).contiguous()
                torch.distributed.broadcast(x, src=0)
                p.data.copy_(x.to(p.device))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise KanoError(f"{name} must be an integer, got {raw!r}") from None
