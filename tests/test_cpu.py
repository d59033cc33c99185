"""r3.cpu: what keep_freed_memory changes (where memory comes from) and what it does not (the numbers).

Proves, each case in a fresh process (the setting lasts for the life of a process), with the kernel's own
count of minor page faults (getrusage) as the reference:
- with glibc's defaults, allocating a (49152, 576) fp32 tensor again after freeing it (the default model's
  embedding gradient, 113 MB) faults in every one of its 4 KiB pages again, every time;
- after keep_freed_memory() most of the same allocations (the median of 16) fault in (almost) none, once
  the heap has grown to hold the tensor, and compute the same values;
- setup_cpu sets the torch threads it is given, or the cores divided among the ranks.
"""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOC = """
import resource, statistics, sys, torch
from r3.cpu import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "kept" else None
def once():  # faults while a (49152, 576) tensor is allocated, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    g = torch.zeros(49152, 576)
    g[::7] += 1.0
    value = float(g.sum())
    del g
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, value
runs = [once() for _ in range(16)]  # the first few (3-4 here) grow the heap to hold it
print(ok, min(f for f, _ in runs), statistics.median(f for f, _ in runs), runs[-1][1])
"""
PAGES = 49152 * 576 * 4 // 4096  # 27,648 pages of 4 KiB


def run(script: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_a_freed_tensor_comes_back_without_page_faults_only_after_keep_freed_memory():
    _, fewest_default, _, value_default = run(ALLOC, "default")
    ok, _, median_kept, value_kept = run(ALLOC, "kept")
    assert ok == "True", "glibc refused the settings"
    assert float(fewest_default) >= 0.9 * PAGES, f"glibc's defaults: as few as {fewest_default} faults per allocation"
    assert float(median_kept) < 0.01 * PAGES, f"kept: a median of {median_kept} faults per allocation"
    assert value_kept == value_default


def test_setup_cpu_sets_the_threads_given_or_the_cores_per_rank():
    script = ("import os, torch; from r3.cpu import setup_cpu; setup_cpu(3); a = torch.get_num_threads(); "
              "setup_cpu(0, os.cpu_count()); print(a, torch.get_num_threads())")
    assert run(script) == ["3", "1"]
