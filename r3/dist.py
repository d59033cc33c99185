"""Everything torch.distributed: init and clean shutdown, stop signals, FSDP2 sharding, gathering full
weights for sampling, reductions.

The only module besides train.py that imports torch.distributed. Every function also works without
torchrun (world size 1, no process group): sharding is then skipped and reductions are identities.
Ranks: RANK (global, 0..world-1) decides who writes files and prints; LOCAL_RANK (this machine's
0..nproc_per_node-1) only picks the GPU. With `--nnodes=2 --nproc_per_node=1` both ranks have
LOCAL_RANK 0.

It does not: checkpoint (train.py uses torch.distributed.checkpoint directly), pick devices for you
beyond "cuda:<local_rank> if CUDA else cpu", or recover a broken process group (a stopped run resumes
from its newest checkpoint instead).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
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


def local_world_size() -> int:
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE): what shares its CPU cores, not the world size."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))


def shutdown() -> None:
    """End of a run: no rank closes its gloo sockets while another is still inside the last collective.

    A barrier alone does not promise that: when it returns on one rank the others have entered it but
    not necessarily left it, and a rank that then destroys the group or exits closes its sockets under
    a peer that may still be reading (gloo issue #155, "Barrier followed by context destruction causes
    some participants to fail"). So after the barrier each rank also checks in through the rendezvous
    store (served by torchrun's agent, which outlives the workers) and waits for all the others.

    NOTE: with FSDP2 the gloo group outlives destroy_process_group: DTensor specs that torch keeps in
    an internal dict hold its DeviceMesh, and through it the group's threads (gloo_tcp_loop, 2x
    pt_gloo_runloop) and sockets, until the process exits (measured on torch 2.13: 4 threads after
    destroy with fully_shard, 1 without). So its sockets close at exit, unsynchronised across ranks,
    which the handshake makes safe: by then no rank has a gloo operation in flight.
    NOTE: the rare abort this guards against did not reproduce here before this change (0 in 98 torchrun
    runs of train.py, tests/dist_worker.py and an FSDP2 exit race, and 0 in 200 barrier+destroy cycles).
    """
    if not dist.is_initialized():
        return
    if is_distributed():
        dist.barrier()
        # NOTE: private API (there since torch 1.x): the store this process group was built on
        store = dist.distributed_c10d._get_default_store()
        store.add("r3/shutdown", 1)
        deadline = time.monotonic() + 60
        while store.add("r3/shutdown", 0) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.01)
    dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only (also before init and after shutdown, from torchrun's RANK)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- stopping: signals

_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # gloo's RuntimeError when a peer exits
_stop_signal: int | None = None  # the first SIGTERM/SIGINT this process got, once install_stop_handlers ran


def _on_stop_signal(signum, frame) -> None:
    global _stop_signal
    if _stop_signal is not None:
        return  # already stopping: a second signal must not interrupt the handler that ends the run
    _stop_signal = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """Make SIGTERM, like Ctrl-C's SIGINT, raise KeyboardInterrupt in the main thread, and only once.

    torchrun starts each worker in a session of its own, so Ctrl-C (SIGINT to the terminal's process
    group) or a SIGTERM reaches only the launcher, which forwards it to every worker and SIGKILLs those
    still alive 30 s later. Only the first signal raises; later ones (a second Ctrl-C, a `kill` of the
    worker and then torchrun's copy) are ignored, so the `except` that prints the one-line message and
    exits is not itself cut short. Call from the main thread (Python's rule for handlers).

    NOTE: Python runs handlers between bytecodes of the main thread, so a rank blocked in a gloo
    collective raises only when the collective returns, or fails because a peer rank already exited
    (a DistError, "Connection closed by peer"): `interrupted` counts that failure as the stop too.
    """
    global _stop_signal
    _stop_signal = None
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _on_stop_signal)


def interrupted(exc: BaseException, grace_s: float = 5.0) -> bool:
    """Whether `exc` ends the run because it was asked to stop: a KeyboardInterrupt, or a collective
    that failed because a peer exited (torch's DistError, or gloo's RuntimeError "Connection closed by
    peer") on a rank that got a stop signal too.

    A rank waiting in a collective usually sees the peer's exit a moment before its own copy of
    torchrun's signal arrives, so a collective error waits up to `grace_s` seconds for that signal.
    An error with no signal (a peer crashed or was killed alone) is not an interrupt: the caller
    should re-raise it.
    """
    if isinstance(exc, KeyboardInterrupt):
        return True
    if not (isinstance(exc, dist.DistError) or any(m in str(exc) for m in _PEER_GONE)):
        return False
    deadline = time.monotonic() + grace_s
    try:
        while _stop_signal is None and time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:  # the signal arrived while we slept
        pass
    return _stop_signal is not None


def exit_now(code: int) -> None:
    """End this process at once with `code` after flushing stdout and stderr, skipping interpreter
    teardown: after an interrupt the process group may be half broken (a peer gone mid-collective),
    and destroying it or running its destructors at exit could block or abort. Files written with
    `with open(...)` and DCP's files are already closed, so nothing on disk is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
