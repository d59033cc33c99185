"""Benchmark: the whole GPU path in one command, one JSON object and one markdown table.

Runs from a plain checkout (`PYTHONPATH=. python bench/gpu.py --json --out gpu.json`) on one CUDA GPU
with torch >= 2.6, triton and transformers and nothing else: no weights are fetched, both models are
random-initialised at their real shapes (SmolLM2-135M-Instruct's and Qwen2.5-1.5B-Instruct's config.json
values are written below). Parts, in the order they run (the sampler last: its compiles are the slowest):

  a. kernel:  r3.kernels.logprobs.token_logprobs (Triton) against the naive path (full logits, log_softmax,
              gather: the library's logprobs_reference) and TRL's selective path (full logits, per-row
              logsumexp: trl_selective_log_softmax), forward + backward of sum(masked log-probs), V = 151,936,
              H = 1,536, N = 16 x 1,024 rows, fp32 and bf16, 25% and 100% of rows masked in. Values and
              gradients vs the naive path (the torch reference, on the same logits); peak memory above the
              inputs and their gradients, median time of 3 calls.
              Goals: memory <= 0.1x naive, time <= 1x naive.
  b. model:   our Transformer vs transformers' model with the same weights: logits in bf16 (SDPA; also
              flash-attn where installed), the per-position max |difference| over the vocabulary; in
              fp32, the same errors and greedy 32 tokens from r3.sampler.generate vs HF generate
              (SmolLM2 shape).
  d. train:   one GRPO update (r3.grpo.update) of the Qwen2.5-1.5B shape under FSDP2 at world size 1
              (a 1-rank process group, fully_shard per block and root, bf16 MixedPrecisionPolicy, fp32
              master weights, AdamW), 16 groups x G 8 = 128 rows of 512 tokens, the last 128 of each row
              the reflection (masked in), beta 0.001 (the reference model's forward included), micro-batch
              16. tokens/s, peak memory, MFU against a bf16 matmul peak measured in this run.
              MFU flops: 6 x (decoder-layer parameters x all tokens + V x H x masked tokens) for the policy
              (the LM head only sees masked rows) plus 2 x the same for the reference forward; attention's
              T^2 terms and the embedding lookup are not counted (MFU is slightly understated). Goal >= 30%.
  c. sampler: r3.sampler.generate (eager, and compile=True) vs transformers' generate, bf16, same weights:
              batch 1 (greedy, 64-token prompt, 128 new tokens) and the rollout shape (8 prompts of ~250
              tokens, n = 8, 128 new tokens, temperature 0.9, no top-k / top-p), tokens/s including prefill.
              Batch 1 also as a fraction of the bandwidth limit: weight bytes read per token (every matrix;
              the embedding only when tied, since the LM head reads it) / the device copy bandwidth measured
              here (KV-cache reads ignored). Compile time = first call - a steady call.
              Goals: rollout >= 3x HF; batch 1 >= 0.5 of the limit on the 1.5B shape.

Each part runs inside try/except: a failure is recorded (its type and message) and the next part runs. The
JSON is rewritten to --out after every part (and sub-step of c), so a timeout leaves the parts done so far.
A part that would start after --budget_s seconds is skipped. `--smoke` runs every part on the CPU at tiny
shapes (the kernel through the Triton interpreter, the compiled decode through inductor's CPU backend,
batch 1 only) and is a test (tests/test_gpu_bench.py); smoke numbers are not speed results.

Usage: PYTHONPATH=. python bench/gpu.py [--smoke] [--json] [--out gpu.json] [--parts a,b,c,d] [--budget_s 420]

It does not: load real weights, measure quality, run on more than one GPU, or time flash-attn in the
sampler (decode always uses SDPA over the cache).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
import traceback

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not bench/
if "--smoke" in sys.argv:  # before triton is first imported: the kernel then runs on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from r3.timing import timed  # noqa: E402

# config.json values (shape-relevant keys) of the two models; no token ids: generation never stops early.
SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
QWEN25_15B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=1536,
                  intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                  tie_word_embeddings=True, use_sliding_window=False)
SHAPES = {"smollm2_135m": SMOLLM2_135M, "qwen25_1.5b": QWEN25_15B}
# log-probs vs the naive path: max |value difference| and max |grad difference| / max |grad| (bf16: two ulps
# of a logit near 4, since the chunked LM head may round a logit differently from the full matmul).
KERNEL_TOL = {"float32": (1e-4, 1e-4), "bfloat16": (6.25e-2, 5e-2)}


def tiny(hf: dict) -> dict:
    """The same family at smoke size."""
    small = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
    return {**hf, **small, **({"head_dim": 16} if "head_dim" in hf else {})}


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def free(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ device peaks
def matmul_peak_tflops(dev, smoke: bool) -> float:
    """bf16 (n x n) @ (n x n), median of 3 timings of `reps` back-to-back matmuls."""
    n, reps = (256, 2) if smoke else (8192, 50)
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    (a @ b).sum().item()
    secs = statistics.median(timed(lambda: [a @ b for _ in range(reps)], dev)[0] for _ in range(3))
    return 2 * n**3 * reps / secs / 1e12


def copy_bandwidth_gbs(dev, smoke: bool) -> float:
    """Device-to-device copy: 2 x bytes (read + write) per copy_, median of 3 timings of 10 copies."""
    x = torch.empty((16 if smoke else 1024) * 2**20, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    secs = statistics.median(timed(lambda: [y.copy_(x) for _ in range(10)], dev)[0] for _ in range(3))
    return 2 * x.numel() * 10 / secs / 1e9


# ------------------------------------------------------------------------------------------ a. kernel
def lp_naive(hidden, weight, targets, mask):
    from r3.kernels.logprobs import logprobs_reference
    logits = (hidden @ weight.T).flatten(0, 1)  # (B * T, V); the reference keeps its fp32 log_softmax
    return logprobs_reference(logits, targets.flatten(), mask.flatten()).view_as(targets)


def lp_selective(hidden, weight, targets, mask):
    from r3.kernels.logprobs import trl_selective_log_softmax

    return trl_selective_log_softmax(hidden @ weight.T, targets) * mask  # (B, T)


def lp_ours(hidden, weight, targets, mask):
    from r3.kernels.logprobs import token_logprobs
    return token_logprobs(hidden, weight, targets, mask, 1.0, 1024, backend="triton", keep_bytes=0)  # bounded memory


def kernel_case(dev, smoke, dtype, frac) -> dict:
    B, T, V, H = (4, 16, 1000, 32) if smoke else (16, 1024, 151936, 1536)
    reps = 1 if smoke else 3
    g = torch.Generator(dev).manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, device=dev, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, device=dev, dtype=dtype).mul_(H**-0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g, device=dev)
    mask = torch.rand(B, T, generator=g, device=dev) < frac

    def step(fn):
        hidden.grad = weight.grad = None
        logp = fn(hidden, weight, targets, mask)
        logp.sum().backward()
        return logp.detach()

    out, ref = dict(dtype=str(dtype).split(".")[-1], frac=frac, rows=B * T, V=V, H=H), None
    for name, fn in (("naive", lp_naive), ("selective", lp_selective), ("ours", lp_ours)):
        step(fn)  # warm-up: Triton compiles, cuBLAS picks its kernels
        sync(dev)
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            secs, logp = timed(lambda: step(fn), dev)
            times.append(secs)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else None
        got = (logp, hidden.grad.detach().clone(), weight.grad.detach().clone())
        out[name] = dict(time_ms=statistics.median(times) * 1e3, peak_mib=peak)
        if ref is None:
            ref = got
        else:
            out[name].update(logp_max_abs_err=(got[0] - ref[0]).abs().max().item(),
                             grad_hidden_rel_err=rel_err(got[1], ref[1]), grad_weight_rel_err=rel_err(got[2], ref[2]))
        log(f"a. {out['dtype']:8s} frac {frac:4.2f} {name:9s} {out[name]['time_ms']:9.1f} ms  peak "
            f"{'-' if peak is None else f'{peak:8.0f} MiB'}")
    tol_v, tol_g = KERNEL_TOL[out["dtype"]]
    o = out["ours"]
    grad_err = max(o["grad_hidden_rel_err"], o["grad_weight_rel_err"])
    out["agree"] = bool(o["logp_max_abs_err"] <= tol_v and grad_err <= tol_g)
    out["memory_ratio_vs_naive"] = o["peak_mib"] / out["naive"]["peak_mib"] if o["peak_mib"] is not None else None
    out["time_ratio_vs_naive"] = o["time_ms"] / out["naive"]["time_ms"]
    return out


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def part_kernel(dev, smoke, save, res: dict) -> None:
    res["cases"] = []
    for dtype in (torch.float32, torch.bfloat16):
        for frac in (0.25, 1.0):
            res["cases"].append(kernel_case(dev, smoke, dtype, frac))
            free(dev)
            save()
    res["checks"] = {f"{c['dtype']}_frac{c['frac']}_values_and_grads_agree": c["agree"] for c in res["cases"]}


# ------------------------------------------------------------------------------------------ b. model
def model_pair(hf_cfg: dict, dev, dtype, seed=0):
    """transformers' model (SDPA, random init, random biases) and ours with the same weights, eval."""
    import transformers

    from r3.model import ModelConfig, Transformer
    conf = transformers.AutoConfig.for_model(**hf_cfg)
    torch.manual_seed(seed)
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa").float().eval()
    with torch.no_grad():  # random biases, so a bias wired wrongly cannot hide behind zeros
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    with torch.device("meta"):
        ours = Transformer(ModelConfig.from_hf(conf.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=False, assign=True)  # shares HF's tensors until .to(dtype)
    if ours.config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    missing = [n for n, p in ours.named_parameters() if p.is_meta]
    assert not missing, f"parameters not loaded from the transformers model: {missing[:4]}"
    return hf.to(dtype), ours.to(dtype).eval()


@torch.no_grad()
def logits_error(hf, ours, ids, flash: bool) -> dict:
    """Per position: max over V of |ours - HF|; then max / mean / median over the positions."""
    import r3.model
    saved = r3.model.flash_attn_func
    r3.model.flash_attn_func = saved if flash else None
    try:
        a = ours(ids).float()  # (B, T, V)
    finally:
        r3.model.flash_attn_func = saved
    b = hf(input_ids=ids).logits.float()
    err = (a - b).abs().amax(-1).flatten()  # (B * T,)
    return dict(max=err.max().item(), mean=err.mean().item(), median=err.median().item(),
                logits_absmax=b.abs().max().item())


def part_model(dev, smoke, save, res: dict) -> None:
    import r3.model
    from r3.sampler import generate
    res["checks"] = checks = {}
    B, T = (2, 16) if smoke else (2, 256)
    attns = ["sdpa"] + (["flash_attn"] if r3.model.flash_attn_func is not None and dev.type == "cuda" else [])
    for shape, hf_cfg in SHAPES.items():
        cfg = tiny(hf_cfg) if smoke else hf_cfg
        ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1)).to(dev)
        for dtype in (torch.bfloat16, torch.float32):
            hf, ours = model_pair(cfg, dev, dtype)
            for attn in attns if dtype == torch.bfloat16 else ["sdpa"]:
                key = f"{shape}_{str(dtype).split('.')[-1]}_{attn}"
                res[key] = logits_error(hf, ours, ids, flash=attn == "flash_attn")
                log(f"b. {key}: per-position max |logit diff| max {res[key]['max']:.3g} mean {res[key]['mean']:.3g}")
            if dtype == torch.float32:
                e = res[f"{shape}_float32_sdpa"]
                checks[f"{shape}_fp32_logits_close"] = e["max"] <= 1e-3 * max(1.0, e["logits_absmax"])
            if dtype == torch.float32 and shape == "smollm2_135m":  # greedy parity on the small config
                prompt = ids[0, :16].tolist()
                got = generate(ours, [prompt], max_new_tokens=32, temperature=0, stop_ids=())[0].ids
                with torch.no_grad():
                    out = hf.generate(input_ids=torch.tensor([prompt], device=dev), attention_mask=None,
                                      max_new_tokens=32, do_sample=False, pad_token_id=0)
                want = out[0, len(prompt):].tolist()
                first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
                res["greedy32_fp32"] = dict(equal=got == want, first_difference=first, ours=got, hf=want)
                checks["greedy32_fp32_equals_hf_generate"] = got == want
                log(f"b. greedy 32 tokens fp32, ours == HF generate: {got == want}")
            del hf, ours
            free(dev)
            save()


# ------------------------------------------------------------------------------------------ c. sampler
def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token: every parameter once; an untied embedding only as a row."""
    emb = model.model.embed_tokens.weight
    tied = model.lm_head.weight is emb
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not emb)


def hf_generate(hf, prompts, n, new_tokens, temperature, dev):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature else dict(do_sample=False)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, num_return_sequences=n,
                          pad_token_id=0, **kw)
    return (out.shape[1] - width) * out.shape[0]


def ours_generate(model, prompts, n, new_tokens, temperature, compile=False):
    from r3.sampler import generate
    out = generate(model, prompts, n=n, max_new_tokens=new_tokens, temperature=temperature, stop_ids=(), seed=0,
                   compile=compile)
    return sum(len(s.ids) for s in out), out


def sampler_cases(cfg, smoke):
    g = torch.Generator().manual_seed(2)
    V, new = cfg["vocab_size"], 8 if smoke else 128
    one = [torch.randint(0, V, (12 if smoke else 64,), generator=g).tolist()]
    rollout = [torch.randint(0, V, ((20 if smoke else 250) - 4 * (i % 3),), generator=g).tolist()
               for i in range(2 if smoke else 8)]
    return {"batch1": (one, 1, 0.0, new), "rollout": (rollout, 2 if smoke else 8, 0.9, new)}


def part_sampler(dev, smoke, save, budget_left, res: dict) -> None:
    res["copy_bandwidth_GBs"] = copy_bandwidth_gbs(dev, smoke)
    res["checks"] = checks = {}
    dtype = torch.float32 if smoke else torch.bfloat16  # NOTE: bf16 on this kind of CPU is 3-10x slower
    res["dtype"] = str(dtype).split(".")[-1]
    log(f"c. device copy bandwidth {res['copy_bandwidth_GBs']:.1f} GB/s")
    models = {}
    for shape, hf_cfg in SHAPES.items():  # eager and HF first, for both shapes
        cfg = tiny(hf_cfg) if smoke else hf_cfg
        hf, ours = model_pair(cfg, dev, dtype)
        models[shape] = ours
        r = res[shape] = dict(weight_bytes=weight_bytes(ours))
        r["bandwidth_limit_tok_s"] = res["copy_bandwidth_GBs"] * 1e9 / r["weight_bytes"]
        ours_generate(ours, [[1, 2, 3]], 1, 4, 0.0)  # warm-up: allocator, cuBLAS, lazy init
        hf_generate(hf, [[1, 2, 3]], 1, 4, 0.0, dev)
        for case, (prompts, n, temp, new) in sampler_cases(cfg, smoke).items():
            secs, (ntok, out) = timed(lambda: ours_generate(ours, prompts, n, new, temp), dev)
            r[f"{case}_eager_tok_s"] = ntok / secs
            if case == "batch1":
                r["batch1_eager_ids"] = out[0].ids
            secs, ntok = timed(lambda: hf_generate(hf, prompts, n, new, temp, dev), dev)
            r[f"{case}_hf_tok_s"] = ntok / secs
            r[f"{case}_eager_vs_hf"] = r[f"{case}_eager_tok_s"] / r[f"{case}_hf_tok_s"]
            log(f"c. {shape} {case}: ours eager {r[f'{case}_eager_tok_s']:.1f} tok/s, HF {r[f'{case}_hf_tok_s']:.1f}")
        r["batch1_eager_frac_of_limit"] = r["batch1_eager_tok_s"] / r["bandwidth_limit_tok_s"]
        del hf
        free(dev)
        save()
    for shape in ("qwen25_1.5b", "smollm2_135m"):  # compiled decode: the 1.5B shape first (its goal)
        cfg, r, ours = tiny(SHAPES[shape]) if smoke else SHAPES[shape], res[shape], models[shape]
        for case, (prompts, n, temp, new) in sampler_cases(cfg, smoke).items():
            if smoke and (case == "rollout" or shape != "qwen25_1.5b"):
                r[f"{case}_compiled"] = "skipped: the smoke compiles one case (about a minute of CPU each)"
                continue
            if budget_left() < 90:  # a compile and two calls take about a minute on the H200 (estimate)
                r[f"{case}_compiled"] = "skipped: time budget"
                continue
            first, _ = timed(lambda: ours_generate(ours, prompts, n, new, temp, compile=True), dev)
            secs, (ntok, out) = timed(lambda: ours_generate(ours, prompts, n, new, temp, compile=True), dev)
            r[f"{case}_compiled_tok_s"], r[f"{case}_compile_s"] = ntok / secs, first - secs
            r[f"{case}_compiled_vs_hf"] = r[f"{case}_compiled_tok_s"] / r[f"{case}_hf_tok_s"]
            if case == "batch1":
                r["batch1_compiled_frac_of_limit"] = r["batch1_compiled_tok_s"] / r["bandwidth_limit_tok_s"]
                checks[f"{shape}_compiled_greedy_equals_eager"] = out[0].ids == r["batch1_eager_ids"]
            log(f"c. {shape} {case}: compiled {r[f'{case}_compiled_tok_s']:.1f} tok/s (compile "
                f"{r[f'{case}_compile_s']:.1f} s)")
            save()


# ------------------------------------------------------------------------------------------ d. train
def init_one_rank_group():
    """A 1-rank process group (nccl on CUDA, gloo on CPU) so FSDP2 really shards at world size 1."""
    import r3.dist
    if not r3.dist.dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return r3.dist.init()


def part_train(dev, smoke, save, peak_tflops, res: dict) -> None:
    import r3.grpo
    if not hasattr(r3.grpo, "update"):
        res["status"] = "skipped: r3.grpo.update not found"
        return
    import r3.dist
    from r3.model import ModelConfig, Transformer
    _, world, dev = init_one_rank_group()
    groups, G, T, R, micro = (2, 4, 24, 8, 4) if smoke else (16, 8, 512, 128, 16)
    hp = dict(micro_batch=micro, ppo_epochs=1, temperature=0.9, beta=0.001, clip_eps=0.2, grad_clip=1.0)
    mc = ModelConfig.from_hf(tiny(QWEN25_15B) if smoke else QWEN25_15B)
    torch.manual_seed(0)
    with torch.device(dev):
        policy = Transformer(mc)
        ref = Transformer(mc).requires_grad_(False)
    ref.load_state_dict(policy.state_dict())
    # min_world=1: FSDP2 really shards in the 1-rank group (train.py leaves world size 1 unwrapped)
    policy, ref = r3.dist.shard(policy, True, min_world=1), r3.dist.shard(ref, True, min_world=1).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    rows, g = groups * G, torch.Generator().manual_seed(3)
    ids = torch.randint(0, mc.vocab_size, (rows, T), generator=g)
    mask = torch.zeros(rows, T, dtype=torch.bool)
    mask[:, T - R:] = True  # the reflection: the last R tokens of every row
    rewards = torch.randn(rows, generator=g)  # group-major, as rollout returns them
    batch = dict(ids=ids.to(dev), pos=torch.arange(T).expand(rows, T).contiguous().to(dev), mask=mask.to(dev),
                 advantages=r3.grpo.group_advantages(rewards, G).to(dev))
    step = lambda: r3.grpo.update(policy, ref, batch, opt, world=world, **hp)  # noqa: E731
    first, stats = timed(step, dev)
    log(f"d. warm-up update {first:.2f} s: {stats}")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs = statistics.median(timed(step, dev)[0] for _ in range(1 if smoke else 2))
    body = sum(p.numel() for p in ref.model.layers.parameters())  # decoder layers (sharded: full at world 1)
    tokens, masked = rows * T, rows * R
    per_pass = 2 * (body * tokens + mc.vocab_size * mc.hidden_size * masked)  # one forward's matmul flops
    flops = 3 * per_pass * hp["ppo_epochs"] + per_pass * (hp["beta"] > 0)
    res.update(rows=rows, seq_len=T, reflection_tokens=R, **hp, warmup_s=first, step_s=secs,
               tokens_per_s=tokens * hp["ppo_epochs"] / secs, decoder_params=body,
               peak_mib=torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
               flops_per_step=flops, mfu=flops / secs / (peak_tflops * 1e12),
               update_stats=stats if isinstance(stats, dict) else repr(stats))
    loss = stats.get("loss") if isinstance(stats, dict) else None
    res["checks"] = {"update_loss_finite": loss is not None and bool(torch.isfinite(torch.tensor(float(loss)))),
                     "policy_sharded_by_fsdp2": isinstance(policy, r3.dist.FSDPModule)}
    log(f"d. update {secs:.2f} s, {res['tokens_per_s']:.0f} tok/s, MFU {res['mfu']:.1%}")
    del policy, ref, opt
    r3.dist.shutdown()


# ------------------------------------------------------------------------------------------ report
def table(results: dict) -> str:
    """The markdown table: one row per measured thing, with its goal and the part's status."""
    P = results["parts"]
    rows = ["| part | case | measured | goal |", "|---|---|---|---|"]
    f = lambda x, spec=".3g": "-" if x is None else format(x, spec)  # noqa: E731
    for key, part in P.items():
        if part.get("status") != "ok":
            rows.append(f"| {key} | - | {part.get('status')} | - |")
    a = P.get("a_kernel", {})
    for c in a.get("cases", []):
        o = c["ours"]
        rows.append(f"| a. kernel | {c['dtype']}, {c['frac']:.0%} masked, {c['rows']} x {c['V']} | memory "
                    f"{f(c['memory_ratio_vs_naive'])}x naive ({f(o['peak_mib'], '.0f')} vs "
                    f"{f(c['naive']['peak_mib'], '.0f')} MiB), time {f(c['time_ratio_vs_naive'])}x naive "
                    f"({o['time_ms']:.1f} vs {c['naive']['time_ms']:.1f} ms; selective "
                    f"{c['selective']['time_ms']:.1f} ms), max |dlogp| {f(o['logp_max_abs_err'])}, grad rel "
                    f"{f(max(o['grad_hidden_rel_err'], o['grad_weight_rel_err']))}, agree {c['agree']} "
                    f"| <= 0.1x memory, <= 1x time |")
    b = P.get("b_model", {})
    for k, e in b.items():
        if isinstance(e, dict) and "max" in e:
            rows.append(f"| b. model | {k} | per-position max abs logit error: max {f(e['max'])}, mean "
                        f"{f(e['mean'])} (logits up to {f(e['logits_absmax'])}) | reported |")
    if "greedy32_fp32" in b:
        rows.append(f"| b. model | smollm2_135m fp32 greedy 32 | equal to HF generate: {b['greedy32_fp32']['equal']} "
                    f"| equal |")
    c = P.get("c_sampler", {})
    for shape in SHAPES:
        r = c.get(shape)
        if not r:
            continue
        for case in ("batch1", "rollout"):
            comp = (f"compiled {f(r.get(f'{case}_compiled_tok_s'), '.1f')} tok/s (compile "
                    f"{f(r.get(f'{case}_compile_s'), '.0f')} s)" if f"{case}_compiled_tok_s" in r
                    else r.get(f"{case}_compiled", "compiled: not run"))
            extra = (f"; of bandwidth limit {f(r['bandwidth_limit_tok_s'], '.0f')} tok/s: eager "
                     f"{f(r.get('batch1_eager_frac_of_limit'), '.2f')}, compiled "
                     f"{f(r.get('batch1_compiled_frac_of_limit'), '.2f')}" if case == "batch1" else "")
            goal = ">= 0.5 of limit (1.5B)" if case == "batch1" else ">= 3x HF"
            rows.append(f"| c. sampler {c.get('dtype')} | {shape} {case} | eager "
                        f"{f(r.get(f'{case}_eager_tok_s'), '.1f')} tok/s, HF {f(r.get(f'{case}_hf_tok_s'), '.1f')}, {comp}; eager/HF "
                        f"{f(r.get(f'{case}_eager_vs_hf'), '.2f')}, compiled/HF "
                        f"{f(r.get(f'{case}_compiled_vs_hf'), '.2f')}{extra} | {goal} |")
    d = P.get("d_train", {})
    if "mfu" in d:
        rows.append(f"| d. train | {d['rows']} x {d['seq_len']} tokens, FSDP2 world 1, bf16 | {d['tokens_per_s']:.0f}"
                    f" tok/s, step {d['step_s']:.2f} s, peak {f(d['peak_mib'], '.0f')} MiB, MFU {d['mfu']:.1%} of "
                    f"{f(results.get('matmul_peak_tflops'))} TFLOP/s | MFU >= 30% |")
    failed = [f"{k}: {n}" for k, p in P.items() for n, ok in p.get("checks", {}).items() if not ok]
    rows.append(f"\nchecks failed: {', '.join(failed) if failed else 'none'}")
    return "\n".join(rows)


PARTS = {"a": "a_kernel", "b": "b_model", "d": "d_train", "c": "c_sampler"}  # run order: sampler last


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny shapes (a test)")
    ap.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    ap.add_argument("--out", default="", help="write the JSON here after every part")
    ap.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--budget_s", type=float, default=420.0, help="start no part (or compile) after this")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.smoke:
        sys.exit("bench/gpu.py: no CUDA device; run with --smoke for the CPU check")
    import transformers
    import triton
    results = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} "
                   f"threads)", smoke=args.smoke, torch=torch.__version__, triton=triton.__version__,
                   transformers=transformers.__version__, parts={})

    def save():
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(results, fh, indent=1)
            os.replace(tmp, args.out)

    budget_left = lambda: args.budget_s - (time.perf_counter() - T0)  # noqa: E731
    results["matmul_peak_tflops"] = matmul_peak_tflops(dev, args.smoke)
    log(f"device {results['device']}: bf16 matmul peak {results['matmul_peak_tflops']:.1f} TFLOP/s")
    runs = {"a_kernel": lambda res: part_kernel(dev, args.smoke, save, res),
            "b_model": lambda res: part_model(dev, args.smoke, save, res),
            "d_train": lambda res: part_train(dev, args.smoke, save, results["matmul_peak_tflops"], res),
            "c_sampler": lambda res: part_sampler(dev, args.smoke, save, budget_left, res)}
    wanted = {PARTS[p.strip()] for p in args.parts.split(",") if p.strip()}
    for name in [n for n in PARTS.values() if n in wanted]:
        t = time.perf_counter()
        if budget_left() <= 0:
            results["parts"][name] = {"status": "skipped: time budget"}
            continue
        log(f"== {name}")
        results["parts"][name] = part = {"status": "running"}
        try:
            runs[name](part)  # fills `part` as it goes, so a save mid-part keeps what is done
            if part["status"] == "running":
                part["status"] = "ok"
        except Exception as e:  # record and go on: the other parts still run
            traceback.print_exc()
            part["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        part["seconds"] = time.perf_counter() - t
        free(dev)
        save()
    print(table(results), flush=True)
    if args.json:
        print(json.dumps(results))
    import r3.dist
    r3.dist.exit_now(0)  # where part d started a process group: past Python's teardown (r3/dist.py)


if __name__ == "__main__":
    main()
