"""The learnability check: can this model learn a task from its own reflections? Minutes, before a long run.

For each candidate (task, options), on N failures of the training split, with the model as it is (step 0):
  (a) the learning signal R3 would get: the failed attempts taken greedily (T=0, what the evaluation sees)
      and sampled at --temperature (what train.py's failure set holds); for each failure G reflections at
      --temperature, then the retry after each, sampled at --temperature exactly as train.py's rollout does
      (r3.rollout.reflect_and_retry) and greedily as the evaluation does (r3.rollout.retry_after on the
      reflection's text). Reported: retry success, and the share of groups of G with reward variance (the
      only groups that carry a gradient).
  (b) whether the retry follows a reflection at all: on the greedy failures, a greedy retry after a
      reflection written for it: a generic one, a hint that names the fix without the answer
      (task.hint: Countdown names the numbers and the reference solution's operations, BFCL the functions
      and their arguments) and the answer itself (task.answer).
How to read it (bench/RESULTS.md: settings that did and did not learn): R3 needs groups with reward
variance; (a) says how many there are at step 0. (b) says why: if even the answer in the reflection is
not copied into the retry, nothing written in a reflection reaches the retry; if the hint does not help
but sampled reflections sometimes do, learning rests on lucky samples.

    python bench/step0_signal.py --candidates "countdown2:;countdown_sum3shot:" --json --out check.json
    python bench/step0_signal.py --candidates "bfcl:" --max_attempt_tokens 96 --failures 8

It does not train, and its numbers are for one seed: with N=16 failures a rate is +-12 points or so.
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
from r3.cpu import setup_cpu  # noqa: E402
from r3.grpo import rollout_stats  # noqa: E402
from r3.rollout import collect_failures, reflect_and_retry, retry_after  # noqa: E402
from r3.seeds import derive_seed  # noqa: E402
from r3.tasks import task_from_flags  # noqa: E402

GENERIC = "I made a mistake. I will be more careful next time."


def find_failures(model, tok, task, queries, n, temperature, a, chunk):
    """Up to n failures, one per query, in query order; and the first-try success rate over the queries tried."""
    fails, ok, tried = [], 0, 0
    attempts = 1 if temperature == 0 else a.attempts  # greedy attempts are all the same
    bar = tqdm(total=n, desc=f"failures T={temperature:g}", unit="failure")
    for c in range(0, len(queries), chunk):
        f, k = collect_failures(model, tok, task, queries[c:c + chunk], attempts=attempts, max_per_example=1,
                                max_new_tokens=a.max_attempt_tokens, temperature=temperature, top_p=a.top_p,
                                seed=derive_seed(a.seed, "failures", 0), first=c)
        fails, ok, tried = fails + f, ok + k, tried + attempts * len(queries[c:c + chunk])
        bar.update(min(len(f), n - bar.n))
        if len(fails) >= n:
            break
    bar.close()
    return fails[:n], ok / max(1, tried)


def group_stats(rewards: list[bool], G: int) -> dict:
    """train.py's batch statistics (r3.grpo.rollout_stats) of G-row groups, under this report's names."""
    s = rollout_stats(torch.tensor(rewards, dtype=torch.float32), G, torch.zeros(len(rewards), 1))
    return {"retry_success": s["reward"], "fixed_by_any_of_G": s["second_try_success"],
            "groups_with_variance": 1 - s["zero_variance_frac"]}


def greedy_retries(model, tok, task, fails, reflections, a) -> list[bool]:
    """The evaluation's greedy retry after each failure's reflection text: its verdict."""
    ys = retry_after(model, tok, task, fails, reflections, max_new_tokens=a.max_attempt_tokens)
    return [bool(task.verify(f["example"], y)) for f, y in zip(fails, ys)]


def signal(model, tok, task, fails, a) -> dict:
    """(a): G sampled reflections per failure, then a sampled retry (train.py's) and a greedy one (eval's)."""
    G, sampled, greedy, lens = a.group_size, [], [], []
    for c in tqdm(range(0, len(fails), a.chunk), desc="reflect + retry", unit="chunk"):
        part = fails[c:c + a.chunk]
        rows = reflect_and_retry(model, tok, task, part, group_size=G, max_reflection_tokens=a.max_reflection_tokens,
                                 max_retry_tokens=a.max_attempt_tokens, temperature=a.temperature,
                                 retry_temperature=a.temperature, top_p=a.top_p,
                                 seed=derive_seed(a.seed, "rollout", 1), first=c)
        sampled += [bool(r.reward) for r in rows]
        lens += [len(r.reflection) for r in rows]
        greedy += greedy_retries(model, tok, task, [part[r.failure] for r in rows], [r.reflection_text for r in rows],
                                 a)
    return {"sampled_retry": group_stats(sampled, G), "greedy_retry": group_stats(greedy, G),
            "reflection_tokens": sum(lens) / max(1, len(lens))}


def follows(model, tok, task, fails, a) -> dict:
    """(b): the greedy retry after a written reflection; None where the task offers no such reflection."""
    out = {}
    for kind in ("generic", "hint", "answer"):
        write = (lambda ex: GENERIC) if kind == "generic" else getattr(task, kind, lambda ex: None)
        written = [write(f["example"]) for f in fails]
        have = [(f, r) for f, r in zip(fails, written) if r]
        ok = greedy_retries(model, tok, task, [f for f, _ in have], [r for _, r in have], a) if have else []
        out[kind] = {"n": len(have), "retry_success": sum(ok) / len(ok) if ok else None}
    return out


def check(model, tok, task, name, opts, a) -> dict:
    t0 = time.time()
    queries = task.examples(a.split)[: a.queries]
    row = {"task": name, "options": opts, "split": a.split}
    with torch.no_grad():
        for mode, temperature in (("greedy_failures", 0.0), ("sampled_failures", a.temperature)):
            fails, first_try = find_failures(model, tok, task, queries, a.failures, temperature, a, 4 * a.chunk)
            row[mode] = {"first_try": first_try, "failures": len(fails)}
            if fails:
                row[mode] |= signal(model, tok, task, fails, a)
                if temperature == 0:
                    row["written_reflection"] = follows(model, tok, task, fails, a)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    head = ("| task | failures | first try | retry greedy / sampled | groups with variance greedy / sampled "
            "| written reflection: generic / hint / answer |\n|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        w = r.get("written_reflection", {})
        for mode in ("greedy_failures", "sampled_failures"):
            m = r[mode]
            g, s = m.get("greedy_retry", {}), m.get("sampled_retry", {})
            written = " / ".join(pct(w.get(k, {}).get("retry_success")) for k in ("generic", "hint", "answer"))
            lines.append(f"| {r['task']}{':' + r['options'] if r['options'] else ''} | {m['failures']} "
                         f"{mode.split('_')[0]} | {pct(m['first_try'])} | {pct(g.get('retry_success'))} / "
                         f"{pct(s.get('retry_success'))} | {pct(g.get('groups_with_variance'))} / "
                         f"{pct(s.get('groups_with_variance'))} | {written if mode == 'greedy_failures' else ''} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", default="countdown_sum3shot", help="';'-separated task[:options]")
    ap.add_argument("--model", default="default", help="'default' or an HF model directory")
    ap.add_argument("--queries", type=int, default=128, help="training queries searched for failures")
    ap.add_argument("--attempts", type=int, default=2, help="sampled first attempts per query")
    ap.add_argument("--failures", type=int, default=16, help="N: failures per mode")
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_attempt_tokens", type=int, default=32)
    ap.add_argument("--max_reflection_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--split", default="train", help="split the queries come from (BFCL: also a category)")
    ap.add_argument("--chunk", type=int, default=4, help="failures per rollout call (queries per call: 4x)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--json", action="store_true", help="print the whole result as one JSON line at the end")
    ap.add_argument("--out", default="", help="write the JSON here too")
    a = ap.parse_args(argv)
    setup_cpu(a.threads, 1)
    _, model, tok = load_model(a.model)
    rows = []
    for cand in a.candidates.split(";"):
        name, sep, opts = cand.rpartition(":")  # "task:options", "task:" or "module:Class[:options]"
        if not sep or (opts and "=" not in opts):
            name, opts = cand.rstrip(":"), ""
        rows.append(check(model, tok, task_from_flags(name, "", opts), name, opts, a))
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": a.model, "threads": torch.get_num_threads(), "args": vars(a), "results": rows}
    print(table(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    if a.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
