"""How much GRPO learning signal does a task configuration give the default model at step 0?

For each candidate (task, options), on the default model (fp32, CPU): sample first attempts for N
training queries (temperature 0.9), keep one failure per query, then run exactly train.py's step-0
rollout on F failures (G reflections each, one retry after each) and report the first-try success rate,
the retry success rate and the fraction of groups with non-zero reward variance (the groups that carry
a gradient). train.py's default task was chosen with this script (bench/RESULTS.md).

    python bench/step0_signal.py --candidates "countdown_easy:;countdown_easy:n_numbers=2" --failures 16
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from r3.checkpoint import load_hf, resolve_model  # noqa: E402
from r3.grpo import rollout_stats  # noqa: E402
from r3.rollout import collect_failures, rollout  # noqa: E402
from r3.tasks import task_from_flags  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", default="countdown_easy:", help="';'-separated task:options")
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--attempts", type=int, default=2)
    ap.add_argument("--failures", type=int, default=16)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_attempt_tokens", type=int, default=48)
    ap.add_argument("--max_reflection_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    path = resolve_model("default")
    model, tok = load_hf(path), AutoTokenizer.from_pretrained(path)
    results = []
    for cand in args.candidates.split(";"):
        name, _, opts = cand.partition(":")
        task = task_from_flags(name, "", opts)
        t0 = time.time()
        with torch.no_grad():
            fails, ok = collect_failures(model, tok, task, task.examples("train")[: args.queries], args.attempts, 1,
                                         args.max_attempt_tokens, args.temperature, args.top_p, seed=0)
            ro = rollout(model, tok, task, fails[: args.failures], args.group_size, args.max_reflection_tokens,
                         args.max_attempt_tokens, args.temperature, args.temperature, args.top_p, seed=1)
        stats = rollout_stats(ro.rewards, args.group_size, ro.mask)
        row = {"task": name, "options": opts, "first_try": ok / (args.queries * args.attempts),
               "failures": len(fails[: args.failures]), "retry_success": stats["reward"],
               "nonzero_variance_groups": 1 - stats["zero_variance_frac"],
               "reflection_len": stats["reflection_len"], "seconds": round(time.time() - t0, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
