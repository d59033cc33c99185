"""Where the time of one GRPO update goes, with the shared prefix and without (issue 13's 2.5x goal).

On the default model (fp32, CPU) and one synthetic R3 batch shaped like the main job's (4 groups of G=8
rows; every row of a group holds the same `--context` tokens, then its own `--reflection` tokens, all of
them masked), it times each part of `r3.grpo.update` on its own, then `update` itself, for both paths:

  reference    the reference model's log-probs (no grad), every micro-batch
  policy       the policy's log-probs, forward + backward, every micro-batch
  lm_head      the LM head + log-softmax alone (kernels.token_logprobs, forward + backward) on the masked
               rows: the same tokens on both paths, so the same work
  optimizer    gradient clipping + AdamW step + zero_grad, with real gradients in place
  update       r3.grpo.update (all of the above, plus the loss)

and prints one JSON line per path plus `bound`: the update speedup the shared path would reach if
everything but the LM head and the optimizer shrank by the token ratio (rows x (context + reflection)
against contexts + rows x reflection). It does not sample, build a rollout, or measure memory
(bench/trl_step.py does those on real batches).

    python bench/update_profile.py [--threads 2] [--context 190] [--reflection 65] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kernels.logprobs import token_logprobs  # noqa: E402
from r3.checkpoint import load_hf, load_model  # noqa: E402
from r3.cpu import setup_cpu  # noqa: E402
from r3.grpo import sequence_logprobs, shared_prefix_logprobs, update  # noqa: E402

GROUPS, G, MICRO = 4, 8, 8  # train.py's defaults: failures_per_step, group_size, micro_batch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


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
            "advantages": torch.randn(ids.shape[0], generator=g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=190, help="shared tokens per group (the main job: about 190)")
    ap.add_argument("--reflection", type=int, default=65, help="masked tokens per row (64 + end-of-turn)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    setup_cpu(args.threads)  # as train.py: the threads, and freed memory reused (r3/cpu.py)
    model_dir, policy, _ = load_model("default")
    ref = load_hf(model_dir, "cpu", torch.float32).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    b = batch(args.context, args.reflection, 40_000)
    micro = [tuple(b[k][s:s + MICRO] for k in ("ids", "pos", "mask")) for s in range(0, GROUPS * G, MICRO)]
    H = policy.config.hidden_size
    hidden = torch.randn(GROUPS * G * args.reflection, H, requires_grad=True)  # the masked rows' hidden states
    targets = torch.randint(0, policy.config.vocab_size, (1, hidden.shape[0]))

    def lm_head():
        token_logprobs(hidden[None], policy.lm_head.weight, targets, torch.ones_like(targets, dtype=torch.bool),
                       0.9).sum().backward()

    out = {}
    for shared in (True, False):
        def lp(model, i, p, m):
            return shared_prefix_logprobs(model, i, p, m, G, 0.9) if shared else sequence_logprobs(model, i, p, m, 0.9)

        def reference():
            with torch.no_grad():
                for mb in micro:
                    lp(ref, *mb)

        def policy_fb():
            for mb in micro:
                (lp(policy, *mb).sum() * 1e-9).backward()

        def optimizer():
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()

        def full_update():
            update(policy, ref, b, opt, micro_batch=MICRO, ppo_epochs=1, temperature=0.9, beta=0.001, clip_eps=0.2,
                   grad_clip=1.0, group_size=G, shared_prefix=shared)

        row = {"reference_s": timed(reference, args.repeats), "policy_s": timed(policy_fb, args.repeats)}
        row["optimizer_s"] = timed(optimizer, args.repeats)  # gradients from policy_fb are in place
        opt.zero_grad(set_to_none=True)
        row["lm_head_s"] = timed(lm_head, args.repeats) if shared else out["shared"]["lm_head_s"]
        opt.zero_grad(set_to_none=True)
        row["update_s"] = timed(full_update, args.repeats)
        out["shared" if shared else "per_row"] = {k: round(v, 2) for k, v in row.items()}
        print(json.dumps({"path": "shared" if shared else "per_row", **out["shared" if shared else "per_row"]}),
              flush=True)
    s, r = out["shared"], out["per_row"]
    T = args.context + args.reflection
    token_ratio = (G * T) / (args.context + G * (args.reflection + 1))  # per group: rows whole / packed stream
    # LM head: lm_head_s is the policy's forward + backward (3 matmul units: forward, grad_h, grad_w; the logits
    # are kept for backward at this size); the reference's forward adds one more unit
    fixed = s["lm_head_s"] * 4 / 3 + s["optimizer_s"]
    bound = r["update_s"] / (fixed + (r["update_s"] - fixed) / token_ratio)
    print(json.dumps({"update_speedup": round(r["update_s"] / s["update_s"], 2), "token_ratio": round(token_ratio, 2),
                      "same_on_both_s": round(fixed, 2), "bound": round(bound, 2), "threads": args.threads}))


if __name__ == "__main__":
    main()
