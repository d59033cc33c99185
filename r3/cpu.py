"""CPU process settings: torch threads per rank, and freed memory kept for the next tensor instead of handed
back to the kernel.

`setup_cpu(threads, ranks_here)` does both (train.py); `keep_freed_memory()` only the second (sample.py).
Threads: `threads`, or this machine's cores divided among the ranks that share them (two ranks on two cores
get one thread each; more threads than cores only make them wait for each other).

PyTorch's CPU tensors come from plain malloc. glibc serves every block above its mmap threshold (128 KiB,
adapting up to 32 MiB) with a fresh mmap and unmaps it on free, so each new activation, gradient or
logits tensor of that size is faulted in again page by page, and the kernel zeroes every page first. An
R3 update allocates thousands of them; on the default model a (49152, 576) fp32 gradient of the tied
embedding alone costs 27.6k page faults and about 170 ms each time it is allocated. `keep_freed_memory`
raises glibc's mmap threshold to 1 GiB and its trim threshold to 2 GiB (mallopt), so blocks below 1 GiB
come from the heap and freed ones are reused without faults (tests/test_cpu.py counts them;
bench/RESULTS.md has what it saves per step).

What changes: only where memory comes from. Every number computed is the same. The process keeps what it
freed: resident memory does not shrink after a peak, and the peak grows by what the heap cannot reuse
(an R3 step of the default model in bench/trl_step.py: 4,865 MiB before, 5,218-5,442 after, the KV cache
kept for the retries included; RESULTS.md). train.py and sample.py set it at start, bench/trl_step.py's
r3 sides too (TRL's side runs with glibc's defaults).

It does not: do anything without glibc (macOS, musl: returns False), touch GPU memory (the CUDA caching
allocator already keeps its blocks), or replace the allocator (jemalloc or tcmalloc via LD_PRELOAD do
this and more, but need to be installed and set before Python starts).
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1) -> bool:
    """Ask glibc to serve blocks below `mmap_threshold` bytes from its heap and to return free heap memory
    to the kernel only above `trim_threshold` bytes. True when glibc took both settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def setup_cpu(threads: int = 0, ranks_here: int = 1) -> None:
    """`threads` torch threads (0: os.cpu_count() // ranks_here, at least 1), and `keep_freed_memory()`."""
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // ranks_here))
    keep_freed_memory()
