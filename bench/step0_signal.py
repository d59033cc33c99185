"""How much GRPO learning signal does a task configuration give the default model at step 0?

For each candidate (task, options), on the default model (fp32, CPU): sample first attempts for N
training queries (temperature 0.9), keep one failure per query, then run exactly train.py's step-0
rollout on F failures (G reflections each, one retry after each) and report the first-try success rate,
the retry success rate, the fraction of failures that at least one of the G reflection+retry pairs fixes,
and the fraction of groups with non-zero reward variance (the groups that carry a gradient). train.py's
default task was chosen with this script (bench/RESULTS.md). Work runs in chunks of `--chunk` queries /
failures so that memory stays bounded (BFCL prompts are long) and a progress bar moves.

    python bench/step0_signal.py --candidates "countdown_easy:;countdown_easy:n_numbers=2" --failures 16
    python bench/step0_signal.py --candidates "bfcl:" --split simple_python --max_attempt_tokens 96
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from r3.checkpoint import load_model  # noqa: E402
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
    ap.add_argument("--split", default="train", help="split the queries come from (BFCL: also a category)")
    ap.add_argument("--chunk", type=int, default=4, help="failures per rollout call (queries per call: 4x)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, model, tok = load_model("default")
    results = []
    for cand in args.candidates.split(";"):
        name, _, opts = cand.partition(":")
        task = task_from_flags(name, "", opts)
        queries = task.examples(args.split)[: args.queries]
        t0 = time.time()
        fails, ok = [], 0
        with torch.no_grad():
            step = 4 * args.chunk
            for c in tqdm(range(0, len(queries), step), desc=f"{name} first tries", unit="chunk"):
                f, k = collect_failures(model, tok, task, queries[c:c + step], args.attempts, 1,
                                        args.max_attempt_tokens, args.temperature, args.top_p, seed=c)
                fails, ok = fails + f, ok + k
            fails = fails[: args.failures]
            rewards, lens = [], []
            for c in tqdm(range(0, len(fails), args.chunk), desc=f"{name} rollouts", unit="chunk"):
                ro = rollout(model, tok, task, fails[c:c + args.chunk], args.group_size, args.max_reflection_tokens,
                             args.max_attempt_tokens, args.temperature, args.temperature, args.top_p, seed=1 + c)
                rewards.append(ro.rewards)
                lens.append(ro.mask.sum(dim=1))
        if not fails:
            print(json.dumps({"task": name, "options": opts, "split": args.split, "failures": 0}), flush=True)
            continue
        # rollout_stats reads reflection lengths as mask row sums; (N, 1) lengths give the same sums.
        stats = rollout_stats(torch.cat(rewards), args.group_size, torch.cat(lens)[:, None])
        row = {"task": name, "options": opts, "split": args.split, "first_try": ok / (len(queries) * args.attempts),
               "failures": len(fails), "retry_success": stats["reward"],
               "fixed_by_any_of_G": stats["second_try_success"],
               "nonzero_variance_groups": 1 - stats["zero_variance_frac"],
               "reflection_len": stats["reflection_len"], "seconds": round(time.time() - t0, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
