"""Everything torch.distributed: init, FSDP2 sharding, gathering full weights for sampling, reductions.

The only module besides train.py that imports torch.distributed. Every function also works without
torchrun (world size 1, no process group): sharding is then skipped and reductions are identities.

It does not: checkpoint (train.py uses torch.distributed.checkpoint directly) or pick devices for you
beyond "cuda:<local_rank> if CUDA else cpu".
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def init() -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; return (rank, world_size, device)."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def shard(model: torch.nn.Module, mixed_bf16: bool) -> torch.nn.Module:
    """FSDP2 as in torchtitan's apply_fsdp: `fully_shard` each decoder block, then the root (which owns
    the embeddings, final norm and the possibly tied lm_head). With `mixed_bf16` parameters are cast to
    bf16 for compute and gradients reduced in fp32. No-op at world size 1."""
    if not is_distributed():
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)  # reshard_after_forward=True: ZeRO-3-like memory
    fully_shard(model, mp_policy=mp)
    return model


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather the full weights once for a whole `generate` call instead of on every decode step.

    Memory: while inside, every rank holds the full parameters (in the mixed-precision param dtype)
    on top of its shards, i.e. about 1x the model size extra per rank. Without FSDP it does nothing.
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        yield model
        return
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            # Back to fully_shard's defaults: blocks reshard after forward; the root does not (its
            # parameters, e.g. the LM head used right after the forward, stay gathered until backward).
            m.set_reshard_after_forward(m is not model, recurse=False)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place and returned); identity at world size 1."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to all ranks (e.g. the failure set built on rank 0)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_lists(items: list) -> list:
    """Concatenate each rank's list of picklable items, in rank order, on every rank."""
    if not is_distributed():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]
