"""Benchmark: masked log-probs through the LM head, forward + backward, three ways.

All variants start from the same hidden states (B, T, H) (requires_grad), LM-head weight (V, H)
(requires_grad), targets (B, T) and mask (B, T) (`frac` of positions kept), and end with the gradients of
sum(masked log-probs) w.r.t. hidden and weight:

  (a) naive:     logits = hidden @ W^T (B, T, V) -> log_softmax(fp32) -> gather -> * mask (the library's
                 torch reference, r3.kernels.logprobs.logprobs_reference, on the full logits)
  (b) selective: TRL's way (trl/trainer/utils.py selective_log_softmax, as GRPOTrainer calls it; restated as
                 r3.kernels.logprobs.trl_selective_log_softmax): full logits, `logits / temperature`, then for
                 fp32 gather + a Python loop of logsumexp over the batch rows; for bf16 a loop of per-row log_softmax +
                 gather. Then * mask.
  (c) ours:      r3.kernels.logprobs.token_logprobs (masked rows selected before the LM head, chunked
                 logits recomputed in backward: keep_bytes=0, its bounded-memory mode; `update` keeps
                 the masked rows' logits for backward up to 512 MiB instead, one LM-head matmul fewer);
                 the chunked torch path on CPU, Triton on CUDA.

Memory. CPU: each variant runs in its own fresh subprocess; peak = ru_maxrss (the process's RSS
high-water mark) at the end minus the RSS just before the first call, after the inputs are built (input
construction makes no transient buffers; the JSON keeps rss_before_mib and maxrss_before_mib to show it).
It counts everything the variant touches: its tensors, allocator slack, and the gradients (the same for
all three). CUDA: one process, torch.cuda.max_memory_allocated minus memory_allocated before the call.
Time: wall seconds of forward + backward, median over --repeats (CUDA: after one warm-up call).
On CUDA a second configuration runs as well: V = 151,936 (Qwen2) in bf16, with ours on both backends.

Usage: python bench/logprobs.py [--B 16 --T 512 --V 49152 --H 576 --frac 0.25 --repeats 3] [--json]
With --json the last line is one JSON object: the raw figures, memory_ratio_vs_naive ((c)/(a) peak) and
time_ratio_vs_selective ((c)/(b) time). Goals: memory_ratio_vs_naive <= 0.25, time_ratio_vs_selective <= 1.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from r3.timing import timed  # noqa: E402
from r3.kernels.logprobs import logprobs_reference, token_logprobs, trl_selective_log_softmax  # noqa: E402


def naive(hidden, weight, targets, mask, temperature):
    logits = (hidden @ weight.T).flatten(0, 1)  # (B * T, V)
    # the library's torch reference: log_softmax(logits / T) in fp32 (B * T, V), kept for backward
    return logprobs_reference(logits, targets.flatten(), mask.flatten(), temperature).view_as(targets)


def selective(hidden, weight, targets, mask, temperature):
    logits = (hidden @ weight.T) / temperature  # (B, T, V): TRL divides by the temperature in place of T
    return trl_selective_log_softmax(logits, targets) * mask


def ours(backend):
    def run(hidden, weight, targets, mask, temperature, chunk_rows=1024):
        return token_logprobs(hidden, weight, targets, mask, temperature, chunk_rows, backend=backend, keep_bytes=0)
    return run


VARIANTS = {"naive": naive, "selective": selective, "ours": ours("auto"), "ours_torch": ours("torch"),
            "ours_triton": ours("triton")}


def make_inputs(B, T, V, H, frac, dtype, device, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, device=device, dtype=dtype).mul_(H**-0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = torch.rand(B, T, generator=g, device=device) < frac
    return hidden, weight, targets, mask


def step(fn, hidden, weight, targets, mask, temperature):
    """Forward + backward of sum(masked log-probs); returns checksums to confirm the variants agree."""
    hidden.grad = weight.grad = None
    logp = fn(hidden, weight, targets, mask, temperature)
    logp.sum().backward()
    return dict(logp_sum=logp.sum().item(), grad_hidden_norm=hidden.grad.float().norm().item(),
                grad_weight_norm=weight.grad.float().norm().item())


def rss_kib():
    """Current resident set size in KiB (Linux /proc), to compare with ru_maxrss (also KiB)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024


def worker(args):
    """CPU: one variant in this fresh process; prints one JSON line."""
    inputs = make_inputs(args.B, args.T, args.V, args.H, args.frac, torch.float32, "cpu")
    base = rss_kib()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):
        secs, check = timed(lambda: step(VARIANTS[args.worker], *inputs, args.temperature))
        times.append(secs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(peak_mib=(peak - base) / 1024, times_s=times, time_s=statistics.median(times),
                          rss_before_mib=base / 1024, maxrss_before_mib=maxrss_before / 1024, **check)))


def run_cpu(args):
    flags = [f"--{k}={getattr(args, k)}" for k in ("B", "T", "V", "H", "frac", "repeats", "temperature")]
    results = {}
    for name in ("naive", "selective", "ours"):
        proc = subprocess.run([sys.executable, __file__, f"--worker={name}", *flags], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"bench/logprobs.py: the {name} worker failed:\n{proc.stderr[-2000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:10s} peak {results[name]['peak_mib']:8.0f} MiB   time {results[name]['time_s']:7.2f} s",
              flush=True)
    return results


def run_cuda(B, T, V, H, frac, dtype, repeats, temperature, names):
    results = {}
    for name in names:
        inputs = make_inputs(B, T, V, H, frac, dtype, "cuda")
        step(VARIANTS[name], *inputs, temperature)  # warm-up: Triton compiles, cuBLAS picks kernels
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            secs, check = timed(lambda: step(VARIANTS[name], *inputs, temperature), "cuda")
            times.append(secs)
        results[name] = dict(peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20, times_s=times,
                             time_s=statistics.median(times), **check)
        print(f"V={V} {str(dtype):15s} {name:12s} peak {results[name]['peak_mib']:8.0f} MiB   "
              f"time {results[name]['time_s'] * 1e3:8.1f} ms", flush=True)
        del inputs
        torch.cuda.empty_cache()
    return results


def agree(results, tol=1e-3):
    """The variants compute the same thing: checksums within `tol` relative of the naive path's."""
    ref = results["naive"]
    return all(abs(r[k] - ref[k]) <= tol * max(1.0, abs(ref[k])) for r in results.values()
               for k in ("logp_sum", "grad_hidden_norm", "grad_weight_norm"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=16, help="sequences")
    ap.add_argument("--T", type=int, default=512, help="positions per sequence")
    ap.add_argument("--V", type=int, default=49152, help="vocabulary (SmolLM2: 49,152)")
    ap.add_argument("--H", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    ap.add_argument("--frac", type=float, default=0.25, help="fraction of positions masked in")
    ap.add_argument("--repeats", type=int, default=3, help="timed forward+backward calls per variant")
    ap.add_argument("--temperature", type=float, default=1.0, help="T in log_softmax(logits / T)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one CPU variant
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    shape = dict(B=args.B, T=args.T, V=args.V, H=args.H, frac=args.frac, temperature=args.temperature)
    if torch.cuda.is_available():
        device, dtype = torch.cuda.get_device_name(), "float32"
        common = (args.B, args.T, args.V, args.H, args.frac, torch.float32, args.repeats, args.temperature)
        results = run_cuda(*common, ["naive", "selective", "ours", "ours_torch"])
        big = run_cuda(args.B, args.T, 151936, args.H, args.frac, torch.bfloat16, args.repeats,
                       args.temperature, ["naive", "selective", "ours_triton", "ours_torch"])
        mem = big["ours_triton"]["peak_mib"] / big["naive"]["peak_mib"]
        speed = big["ours_triton"]["time_s"] / big["selective"]["time_s"]
        extra = dict(V151936_bf16=dict(results=big, variants_agree=agree(big, tol=2e-2),
                                       memory_ratio_vs_naive=mem, time_ratio_vs_selective=speed))
    else:
        device, dtype, extra = f"cpu ({torch.get_num_threads()} threads)", "float32", {}
        results = run_cpu(args)
    summary = dict(device=device, dtype=dtype, shape=shape, results=results, variants_agree=agree(results),
                   memory_ratio_vs_naive=results["ours"]["peak_mib"] / results["naive"]["peak_mib"],
                   time_ratio_vs_selective=results["ours"]["time_s"] / results["selective"]["time_s"], **extra)
    print(f"memory (c)/(a) = {summary['memory_ratio_vs_naive']:.3f} (goal <= 0.25)   "
          f"time (c)/(b) = {summary['time_ratio_vs_selective']:.3f} (goal <= 1)   "
          f"variants agree: {summary['variants_agree']}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
