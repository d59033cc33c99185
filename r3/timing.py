"""Wall-clock timing of one call, with CUDA's queue drained before and after: what the benchmarks time with.

It does not: warm up, repeat, or take a median or mean (each benchmark says how it aggregates), nor time
anything but wall seconds.
"""
from __future__ import annotations

import time

import torch


def timed(fn, device=None) -> tuple[float, object]:
    """(seconds, fn()) for one call. On a CUDA device (a torch.device or a string such as "cuda") the
    queue is synchronized before and after, so the seconds cover the kernels fn launched, not the launches."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, out
