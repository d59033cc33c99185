"""Where the time of one GRPO update goes, with the shared prefix and without (its goal: 2.5x).

On the default model (fp32, CPU) and one synthetic R3 batch shaped like train.py's (4 groups of G=8
rows; every row of a group holds the same `--context` tokens, then its own `--reflection` tokens, all of
them masked), or with `--real` one real batch (failed first attempts at countdown_easy's training queries,
4 of them x G=8 reflections and retries, rolled out by r3's own code at train.py's defaults), it times
each part of `r3.grpo.update` on its own, then `update` itself, for both paths:

  reference    the reference model's log-probs (no grad), every micro-batch
  policy       the policy's log-probs, forward + backward, every micro-batch
  lm_head      the LM head + log-softmax alone (r3.kernels.token_logprobs, forward + backward) on the masked
               rows: the same tokens on both paths, so the same work
  optimizer    gradient clipping + AdamW step + zero_grad, with real gradients in place
  update       r3.grpo.update (all of the above, plus the loss)

and prints one JSON line per path plus `bound`: the update speedup the shared path would reach if
everything but the LM head and the optimizer shrank by the token ratio (rows x (context + reflection)
against contexts + rows x reflection). It then counts the floating-point operations of one `update` per
path (`torch.utils.flop_counter`: every matmul, forward and backward; attention by the kernel's shapes,
see `attention_flops`) and prints their ratio, `flop_ratio`: the speedup the shared path would have if
both ran at the same FLOP rate, a ceiling that does not depend on how fast this machine is today.
It does not measure memory or generation (bench/trl_step.py does, on the same real batches).

With `--flops_only` it skips the timings and prints only the counts (a few minutes instead of ten or more),
for asking how the ceiling moves with the shape, e.g. the context length.

    python bench/update_profile.py [--real] [--flops_only] [--threads 2] [--context 190] [--reflection 65]
                                   [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from r3.kernels.logprobs import token_logprobs  # noqa: E402
from r3.checkpoint import load_hf, load_model  # noqa: E402
from r3.cpu import setup_cpu  # noqa: E402
from r3.grpo import group_advantages, micro_batches, shared_prefix_pack, update  # noqa: E402
from r3.rollout import collect_failures, rollout  # noqa: E402
from r3.seeds import derive_seed  # noqa: E402
from r3.tasks import task_from_flags  # noqa: E402
from r3.timing import timed  # noqa: E402

GROUPS, G, MICRO = 4, 8, 8  # train.py's defaults: failures_per_step, group_size, micro_batch


def mean_seconds(fn, repeats: int) -> float:
    """One warm-up call, then the mean of `repeats` timed calls."""
    fn()
    return sum(timed(fn)[0] for _ in range(repeats)) / repeats


def attention_flops(q, k, is_causal: bool, masked: bool, backward: bool) -> int:
    """FLOPs of one CPU flash-attention call from its shapes: q (B, Hq, Tq, D), k (B, Hkv, Tk, D).
    Forward: two matmuls per (query, key) pair (q k^T, p v); backward: four (dV, dP, dQ, dK; torch's own
    formula for the CUDA kernels counts the same). Pairs computed: all Tq * Tk under an explicit mask
    (the kernel skips none), the lower triangle Tq * (Tk + 1) / 2 with is_causal (it skips key blocks
    past the diagonal)."""
    B, Hq, Tq, D = q
    Tk = k[2]
    pairs = Tq * (Tk + 1) // 2 if is_causal and not masked else Tq * Tk
    return (8 if backward else 4) * B * Hq * pairs * D


def _sdpa_forward(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, out_shape=None, **_):
    return attention_flops(q, k, is_causal, attn_mask is not None, backward=False)


def _sdpa_backward(grad_out, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *, attn_mask=None, out_shape=None,
                   **_):
    return attention_flops(q, k, is_causal, attn_mask is not None, backward=True)


def _addmm_inplace(c, a, b, *_, out_shape=None, **__):  # c += a @ b, a (M, K), b (K, N)
    return 2 * a[0] * a[1] * b[1]


def counted_flops(fn) -> float:
    """GFLOPs that torch counts while `fn()` runs: its matmuls, plus the in-place addmm_ (the LM head's
    weight gradient) and the CPU attention kernels, which its table leaves out."""
    ops = torch.ops.aten
    mode = FlopCounterMode(display=False, custom_mapping={
        ops.addmm_: _addmm_inplace,
        ops._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
        ops._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward})
    with mode:
        fn()
    return mode.get_total_flops() / 1e9


def batch(context: int, reflection: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(GROUPS):
        ctx = torch.randint(100, vocab, (context,), generator=g)
        rows += [torch.cat([ctx, torch.randint(100, vocab, (reflection,), generator=g)]) for _ in range(G)]
    ids = torch.stack(rows)  # (GROUPS * G, context + reflection)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, context:] = True
    return {"ids": ids, "pos": torch.arange(ids.shape[1]).expand_as(ids).contiguous(), "mask": mask,
            "context_lens": torch.full((ids.shape[0],), context), "advantages": torch.randn(ids.shape[0], generator=g)}


def row_tokens(b: dict) -> int:
    """Tokens the per-row path runs: its micro-batches as r3.grpo.update cuts them."""
    return sum(mb.ids.numel() for mb in micro_batches(b, MICRO, G, shared_prefix=False))


def packed_tokens(b: dict) -> int:
    """Tokens the shared path runs: r3.grpo's pack of each micro-batch (contexts once, then the suffixes),
    or the micro-batch's rows where the pack would be larger (the function then runs per row)."""
    total = 0
    for mb in micro_batches(b, MICRO, G, shared_prefix=True):
        pack = shared_prefix_pack(mb.ids, mb.pos, mb.mask, mb.context_lens, mb.group_size)
        total += pack.tokens() if pack is not None else mb.ids.numel()
    return total


def real_batch(policy, tok) -> dict:
    """A batch built as train.py builds one at its defaults (seed 1234): failed first attempts at
    countdown_easy's first 20 training queries (4 attempts each, one failure kept per query), then 4 of them
    x G reflections and retries. Not necessarily train.py's own first batch: the same kind of batch."""
    task = task_from_flags("countdown_easy", "", "")
    with torch.no_grad():
        fails, _ = collect_failures(policy, tok, task, task.examples("train")[:20], attempts=4, max_per_example=1,
                                    max_new_tokens=32, temperature=0.9, seed=derive_seed(1234, "failures", 0))
        ro = rollout(policy, tok, task, fails[:GROUPS], group_size=G, max_reflection_tokens=64, max_retry_tokens=32,
                     temperature=0.9, retry_temperature=0.9, seed=derive_seed(1234, "rollout", 1))
    return ro.batch(group_advantages(ro.rewards, G))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=190, help="shared tokens per group (countdown_easy: about 190)")
    ap.add_argument("--reflection", type=int, default=65, help="masked tokens per row (64 + end-of-turn)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--real", action="store_true", help="a real batch of countdown_easy instead (see above)")
    ap.add_argument("--flops_only", action="store_true", help="count FLOPs only, no timings")
    args = ap.parse_args()
    setup_cpu(args.threads)  # as train.py: the threads, and freed memory reused (r3/cpu.py)
    model_dir, policy, tok = load_model("default")
    ref = load_hf(model_dir, "cpu", torch.float32).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    b = real_batch(policy, tok) if args.real else batch(args.context, args.reflection, 40_000)
    H = policy.config.hidden_size
    hidden = torch.randn(int(b["mask"].sum()), H, requires_grad=True)  # the masked rows' hidden states
    targets = torch.randint(0, policy.config.vocab_size, (1, hidden.shape[0]))

    def lm_head():
        token_logprobs(hidden[None], policy.lm_head.weight, targets, torch.ones_like(targets, dtype=torch.bool),
                       0.9).sum().backward()

    out = {}
    for shared in (True, False):
        micro = micro_batches(b, MICRO, G, shared_prefix=shared)  # as r3.grpo.update splits the batch

        def reference():
            with torch.no_grad():
                for mb in micro:
                    mb.logprobs(ref, 0.9)

        def policy_fb():
            for mb in micro:
                (mb.logprobs(policy, 0.9).sum() * 1e-9).backward()

        def optimizer():
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()

        def full_update():
            update(policy, ref, b, opt, micro_batch=MICRO, ppo_epochs=1, temperature=0.9, beta=0.001, clip_eps=0.2,
                   grad_clip=1.0, group_size=G, shared_prefix=shared)

        row = {}
        if not args.flops_only:
            row = {"reference_s": mean_seconds(reference, args.repeats),
                   "policy_s": mean_seconds(policy_fb, args.repeats)}
            row["optimizer_s"] = mean_seconds(optimizer, args.repeats)  # gradients from policy_fb are in place
            opt.zero_grad(set_to_none=True)
            row["lm_head_s"] = mean_seconds(lm_head, args.repeats) if shared else out["shared"]["lm_head_s"]
            opt.zero_grad(set_to_none=True)
            row["update_s"] = mean_seconds(full_update, args.repeats)
        row["update_gflop"] = counted_flops(full_update)
        out["shared" if shared else "per_row"] = {k: round(v, 2) for k, v in row.items()}
        print(json.dumps({"path": "shared" if shared else "per_row", **out["shared" if shared else "per_row"]}),
              flush=True)
    s, r = out["shared"], out["per_row"]
    rows, packed = row_tokens(b), packed_tokens(b)
    token_ratio = rows / packed
    counts = {"row_tokens": rows, "packed_tokens": packed, "token_ratio": round(token_ratio, 2),
              "flop_ratio": round(r["update_gflop"] / s["update_gflop"], 2), "threads": args.threads}
    if args.flops_only:
        print(json.dumps(counts))
        return
    # LM head: lm_head_s is the policy's forward + backward (3 matmul units: forward, grad_h, grad_w; the logits
    # are kept for backward at this size); the reference's forward adds one more unit
    fixed = s["lm_head_s"] * 4 / 3 + s["optimizer_s"]
    bound = r["update_s"] / (fixed + (r["update_s"] - fixed) / token_ratio)
    print(json.dumps({"update_speedup": round(r["update_s"] / s["update_s"], 2), **counts,
                      "same_on_both_s": round(fixed, 2), "bound": round(bound, 2)}))


if __name__ == "__main__":
    main()
