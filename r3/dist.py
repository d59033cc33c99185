"""Everything torch.distributed: init and clean shutdown, stop signals, FSDP2 sharding, gathering full
weights for sampling, reductions, naming a collective that timed out.

torch.distributed is imported here and, for DCP's save and load, in r3/checkpoint.py; the scripts
(train.py, sample.py, bench/) reach it only through this module. Every function also works without
torchrun (world size 1, no process group): sharding is then skipped and reductions are identities.
Ranks: RANK (global, 0..world-1) decides who writes files and prints; LOCAL_RANK (this machine's
0..nproc_per_node-1) only picks the GPU. With `--nnodes=2 --nproc_per_node=1` both ranks have LOCAL_RANK 0.

The rule that keeps a run from hanging: every rank issues the same sequence of collectives whatever its
data. No collective sits in a branch that depends on a rank's examples, samples or rewards; a branch
that only some ranks take (a rank with no failed first try skips the reflection) issues none.
The collectives of a train.py run, and why every rank reaches each one:
- `init`, `shard` (fully_shard builds the device mesh): once, at start, on every rank.
- `unsharded(policy)` entering and leaving (FSDP all-gather): around the whole failure build, each
  step's rollout and the whole evaluation, called by step number and flags, never by data. Inside it no
  forward issues a collective, so the ranks may sample different numbers of calls and tokens (the
  sampler refuses to run on a sharded model outside it: `require_gathered`); a nested block is a no-op.
- `all_reduce_sum`: the failure build's success count, each step's statistics, the update's token
  count and loss sums, the evaluation's counts: each called unconditionally at its point.
- `gather_lists`: the failure build's failures (a rank with none sends an empty list).
- the update's FSDP forward/backward collectives and the gradient-norm all-reduce: the same number of
  micro-batches on every rank (each rank holds failures_per_step / world groups of G rows); whether a
  step updates at all is decided from the all-reduced statistics, so all ranks agree.
- checkpoint save (barriers, DCP) and export (`full_state_dict`): by step number; resume's DCP load:
  on every rank when the checkpoint directory (a shared filesystem) holds a checkpoint.
- `shutdown`: barrier and a store check-in, at the end.
A collective that waits longer than the process-group timeout for a rank that never comes (it hung or
died) raises `CollectiveTimeout` naming the operation and the waiting rank; train.py prints it as one line.
NOTE: that is gloo's behaviour (CPU); NCCL's watchdog aborts the process at the timeout instead of raising.

Stopping: torchrun forwards a Ctrl-C or a SIGTERM to every worker once. `install_stop_handlers` makes
the first one a KeyboardInterrupt on each rank; the script catches it, says so in one line and leaves
through `exit_now`, with no teardown collectives with ranks that may be gone. A collective that fails
because a peer exited is an error, not an interrupt.

It does not: checkpoint (r3/checkpoint.py), pick devices for you beyond "cuda:<local_rank> if CUDA else
cpu", or recover a broken process group (a stopped run resumes from its newest checkpoint instead).
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


_group = {"started": False, "timeout_s": 0.0}  # set by init(): a process group was started here (exit_now), its timeout


class CollectiveTimeout(RuntimeError):
    """A collective waited past the process-group timeout for a rank that never joined it."""


def init(timeout_s: float = 600) -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; return (rank, world_size, device). A collective
    that waits `timeout_s` seconds for a missing rank fails (gloo raises; NCCL's watchdog aborts)."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _group.update(started=True, timeout_s=timeout_s)
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
    What the handshake does not cover, `exit_now` does: a script that ran a process group ends with
    `shutdown()` then `exit_now(0)`, so Python's teardown never runs beside gloo's threads (the rare abort
    at the end of a torchrun run; see exit_now).
    """
    if not dist.is_initialized():
        return
    if is_distributed():
        dist.barrier()
        # NOTE: private API (there since torch 1.x): the store this process group was built on
        store = dist.distributed_c10d._get_default_store()
        arrived, deadline = store.add("r3/shutdown", 1), time.monotonic() + 60
        try:
            while arrived < dist.get_world_size() and time.monotonic() < deadline:
                time.sleep(0.01)
                arrived = store.add("r3/shutdown", 0)
        except RuntimeError:  # a store served by rank 0 itself (not torchrun) left: rank 0 saw everyone arrive
            pass
    dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only (also before init and after shutdown, from torchrun's RANK)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- stopping

_stop = {"signal": None}  # the stop signal this process got, if any (install_stop_handlers resets it)


def _on_stop_signal(signum, frame) -> None:
    # a later signal must not cut short the ending: test_a_stop_signal_raises_once_and_later_signals_are_ignored
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    # for `stopping`, needed by test_signal_mid_run_stops_all_ranks_and_the_same_command_resumes
    _stop["signal"] = signal.Signals(signum).name
    raise KeyboardInterrupt(_stop["signal"])


def install_stop_handlers() -> None:
    """Make SIGTERM, like Ctrl-C's SIGINT, raise KeyboardInterrupt in the main thread, once; later
    signals are ignored. Call from the main thread (Python's rule).

    torchrun starts each worker in a session of its own, so Ctrl-C (SIGINT to the terminal's process
    group) or a SIGTERM reaches only the launcher, which forwards it to every worker once and SIGKILLs
    those still alive 30 s later. The script catches the KeyboardInterrupt, prints one line and leaves
    through `exit_now`, with no teardown collectives with ranks that may already be gone.

    NOTE: Python runs the handler between bytecodes of the main thread. A KeyboardInterrupt that lands
    in a __del__ or a garbage-collector callback is swallowed by Python, and then the run goes on until
    torchrun's SIGKILL. A rank whose peer exits before its own signal arrives sees a collective fail
    (gloo: "Connection closed by peer"): an error, not an interrupt.
    """
    _stop["signal"] = None
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _on_stop_signal)


def stopping() -> bool:
    """Whether this process got a stop signal. Then any exception that ends the run is the stop's: the
    KeyboardInterrupt may reach the caller only wrapped or replaced. DCP's save turns it, on any rank, into
    one CheckpointException on every rank; a torch.save it cut fails in its own __exit__ ("inline_container");
    a rank whose KeyboardInterrupt DCP caught then finds its peer gone ("Connection reset by peer")."""
    return _stop["signal"] is not None


def exit_now(code: int) -> None:
    """End this process with `code`. Where init() started a process group: at once, stdout and stderr
    flushed, then os._exit, skipping the interpreter's teardown; without one, a plain SystemExit (which a
    caller, or a test, can catch).

    Why skip the teardown. After an interrupt the group may be half broken (a peer gone mid-collective), and
    its destructors could block or abort. And even after a clean `shutdown()` one of gloo's worker threads
    (pt_gloo_runloop) may still be releasing the last collective's work when the main thread reaches
    Python's finalization. If Python has already let go of a tensor that work holds, the release drops the
    tensor's Python object and needs the GIL; a thread that takes the GIL while Python finalizes is ended
    with pthread_exit, whose unwinding runs into the work's noexcept destructor, and C++ calls
    std::terminate: "terminate called without an active exception", SIGABRT (exit code -6), the rare abort
    of one rank at the end of a torchrun run. A core dump of it shows exactly that (main thread in
    Py_FinalizeEx; the worker in ~AsyncWork -> decref_pyobject -> take_gil -> pthread_exit ->
    std::terminate); it came 4 times in 180 runs of barrier + destroy with the CPU oversubscribed
    (bench/RESULTS.md). With os._exit no Python teardown runs, so no thread can be ended inside C++. Files
    written with `with open(...)` and DCP's files are closed by then, so nothing on disk is lost.
    """
    if not (dist.is_initialized() or _group["started"]):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _is_timeout(exc: BaseException) -> bool:
    """gloo: "Timed out waiting Nms for recv operation to complete"; NCCL: "... timed out ..."."""
    return isinstance(exc, (RuntimeError, dist.DistError)) and "timed out" in str(exc).lower()


def _timeout(op: str) -> CollectiveTimeout:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return CollectiveTimeout(f"rank {rank} waited {_group['timeout_s']:g} s in {op} for a rank that never joined "
                             "(it hung or died)")


@contextlib.contextmanager
def collective(op: str):
    """Name the collective(s) inside: a timeout there becomes a CollectiveTimeout that says `op` and this rank."""
    try:
        yield
    except Exception as e:
        if not _is_timeout(e) or isinstance(e, CollectiveTimeout):
            raise
        raise _timeout(op) from e


def _causes(exc: BaseException) -> list[BaseException]:
    """exc, the exceptions chained to it, and those it carries from each rank: DCP's save and load turn
    any rank's exception into one CheckpointException on every rank."""
    out, todo = [], [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return out


def timeout_error(exc: BaseException) -> CollectiveTimeout | None:
    """The CollectiveTimeout behind `exc`, if a collective timed out (FSDP's own collectives, in the update
    and the checkpoint, are not named: they are "a collective of FSDP or the checkpoint")."""
    causes = _causes(exc)
    named = [e for e in causes if isinstance(e, CollectiveTimeout)]
    if named:
        return named[0]
    return _timeout("a collective of FSDP or the checkpoint") if any(_is_timeout(e) for e in causes) else None


def shard(model: torch.nn.Module, mixed_bf16: bool, min_world: int = 2) -> torch.nn.Module:
    """FSDP2 as in torchtitan's apply_fsdp: `fully_shard` each decoder block, then the root (which owns
    the embeddings, final norm and the possibly tied lm_head). With `mixed_bf16` parameters are cast to
    bf16 for compute and gradients reduced in fp32. No-op without a process group or with fewer than
    `min_world` ranks (so at world size 1 by default; min_world=1 shards in a 1-rank group, which
    bench/gpu.py uses to time FSDP2 itself on one GPU)."""
    if not dist.is_initialized() or dist.get_world_size() < min_world:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)  # reshard_after_forward=True: ZeRO-3-like memory
    fully_shard(model, mp_policy=mp)
    return model


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather the full weights once for a whole stretch of sampling (a failure build, a step's rollout, an
    evaluation): inside, forwards issue no collective, so ranks may run different numbers of them.

    A collective itself: every rank must enter and leave it at the same point. Nested blocks on the same
    model are no-ops. Memory: while inside, every rank holds the full parameters (in the mixed-precision
    param dtype) on top of its shards, about 1x the model size extra. Without FSDP it does nothing.
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules or getattr(model, "_r3_gathered", False):
        yield model
        return
    with collective("unsharded: all-gather of the full weights"):
        for m in fsdp_modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
    model._r3_gathered = True
    try:
        yield model
    finally:
        model._r3_gathered = False
        for m in fsdp_modules:
            m.reshard()
            # Back to fully_shard's defaults: blocks reshard after forward; the root does not (its
            # parameters, e.g. the LM head used right after the forward, stay gathered until backward).
            m.set_reshard_after_forward(m is not model, recurse=False)


def require_gathered(model: torch.nn.Module) -> None:
    """Raise unless forwards of `model` issue no collective: it is not FSDP-sharded, or it is inside
    `unsharded(model)`. The sampler calls this: sampling on a sharded model would all-gather per forward,
    and ranks sample different numbers of tokens (a hang)."""
    if isinstance(model, FSDPModule) and not getattr(model, "_r3_gathered", False):
        raise RuntimeError("sampling an FSDP-sharded model needs `with r3.dist.unsharded(model):` around it, "
                           "entered by every rank at the same point")


def all_reduce_sum(x: torch.Tensor, what: str = "") -> torch.Tensor:
    """Sum a tensor over ranks (in place and returned); identity at world size 1. A CPU tensor (the
    loop's statistics) goes through the GPU and back under NCCL, which reduces CUDA tensors only. `what`
    names the sum in a timeout's message."""
    if is_distributed():
        on_gpu = x.cuda() if x.device.type == "cpu" and dist.get_backend() == "nccl" else x
        with collective(f"all_reduce_sum ({what})" if what else "all_reduce_sum"):
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        if on_gpu is not x:
            x.copy_(on_gpu)
    return x


def barrier() -> None:
    if is_distributed():
        with collective("barrier"):
            dist.barrier()


def gather_lists(items: list) -> list:
    """Concatenate each rank's list of picklable items, in rank order, on every rank."""
    if not is_distributed():
        return list(items)
    out = [None] * dist.get_world_size()
    with collective("gather_lists: all_gather_object"):
        dist.all_gather_object(out, items)
    return [x for part in out for x in part]
