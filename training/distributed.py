"""Data-parallel encoder training with torch DDP, launched by `torchrun`.

    torchrun --nproc-per-node 2 -m seqguard.cli train --events log.jsonl --out runs/m   # 2 CPU processes, gloo
    torchrun --nproc-per-node 8 -m seqguard.cli train ...                               # 8 GPUs, NCCL

Every rank reads and featurises the whole log (the featuriser replays cross-user contexts in
global order, which does not shard), then trains on its own share of the user batches; DDP
averages the gradients, so all ranks hold the same weights after every step. Rank 0 alone
exports ONNX, fits the forests and writes the artifact; the other ranks stop after training.
Without torchrun (WORLD_SIZE unset or 1) nothing here is used and training is single-process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_max(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def all_sum(self, *values: float) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()


def init_from_env() -> DistContext | None:
    """Join the process group torchrun describes in the environment; None when not launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistContext(rank, dist.get_world_size(), device)


def shutdown(ctx: DistContext | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


def rank_schedule(n_batches: int, world: int, permutation) -> list[list[int | None]]:
    """Steps of `world` consecutive (similar-length) batches, in the epoch's shuffled order.

    Ranks of one step get batches of similar length, so padding them to a common window count
    wastes little; a rank without a batch in the last step runs fully-masked windows (zero loss)
    so that every rank makes the same number of collective calls.
    """
    chunks = [list(range(i, min(i + world, n_batches))) for i in range(0, n_batches, world)]
    steps = []
    for ci in permutation(len(chunks)):
        c = chunks[ci]
        steps.append(c + [None] * (world - len(c)))
    return steps
