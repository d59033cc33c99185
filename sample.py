"""Sampling jobs: the failure set for training, the paper's evaluation, the R3 cycle on one problem.

    python sample.py failures --task=countdown_easy_sum3shot --num_examples=128 --attempts=4 --out=failures.jsonl
    python sample.py eval --task=countdown3 --num_examples=200 --out=eval.json [--model=runs/r3/final]
    python sample.py demo [--task=countdown3] [--model=runs/r3/final]    # attempt, reflection, retry

`failures` samples K first attempts per training query (prefix-shared) and writes the failed ones as
JSONL rows {task, example, attempt}; it works in chunks of queries, appends each finished chunk to
<out>.partial, resumes from there after an interruption, and renames the finished file into place.
`eval` runs docs/method.md section 7 on held-out examples (r3.evaluate, the protocol of train.py's evaluation:
same budgets, same rows): a first try, and on failure one reflection and one retry (success on either
counts); it prints both accuracies with 95% Wilson intervals and writes JSON with the full config.
`demo` runs that protocol on the first problem of the split and prints every turn, even when the first
try succeeds, so the same command with --model=runs/r3/final shows what training changed.

It does not: train (train.py), or sample anything but first attempts, reflections and retries.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from r3.checkpoint import load_model, read_config, resolve_model
from r3.cli import parse_flags
from r3.cpu import keep_freed_memory
from r3.errors import UserError
from r3.evaluate import two_try_eval, wilson
from r3.jsonl import can_write, read_jsonl, write_jsonl_atomic
from r3.seeds import derive_seed
from r3.tasks import DEFAULT_TASK, task_from_flags


@dataclass
class SampleConfig:
    model: str = "default"  # "default" (SmolLM2-135M-Instruct from PyPI) or an HF model directory
    task: str = DEFAULT_TASK  # countdown_easy_sum3shot (the main job's); a preset (r3/tasks) or module:Class
    task_data: str = ""  # data file for tasks that read one (xlam, countdown from a file)
    task_options: str = ""  # task options overriding its preset, e.g. "n_numbers=2,max_number=10"
    split: str = ""  # split to sample ("" : train for failures, test otherwise; BFCL also takes a category name)
    num_examples: int = 200  # queries to use (the first N of the split)
    attempts: int = 4  # failures: first attempts per query (K)
    max_per_query: int = 1  # failures: failed attempts kept per query (0: all)
    max_attempt_tokens: int = 32  # max new tokens of a first attempt / retry (train.py's default too)
    max_reflection_tokens: int = 64  # max new tokens of a reflection (train.py's default too)
    temperature: float = 0.9  # sampling temperature (failures; eval when --greedy=false)
    top_p: float = 1.0  # nucleus sampling threshold
    greedy: bool = True  # eval: greedy decoding (the paper's pass@1)
    chunk: int = 16  # failures: queries per resumable chunk
    out: str = ""  # output file (failures: JSONL, required; eval: JSON); "" prints only
    seed: int = 0  # sampling seed
    threads: int = 0  # torch CPU threads (0: torch's default)


COMMON = {"model", "task", "task_data", "task_options", "split", "threads"}
JOB_FLAGS = {  # the flags each job reads; --help lists only these
    "failures": COMMON | {"num_examples", "attempts", "max_per_query", "max_attempt_tokens", "temperature", "top_p",
                          "chunk", "out", "seed"},
    "eval": COMMON | {"num_examples", "max_attempt_tokens", "max_reflection_tokens", "temperature", "top_p", "greedy",
                      "out", "seed"},
    "demo": COMMON | {"max_attempt_tokens", "max_reflection_tokens"},
}


def check_config(cfg: SampleConfig, job: str):
    """Every flag of the job before the model loads; the first bad value is a UserError naming it. Returns
    the task and the examples (a task, split or data file that cannot be read fails here too)."""
    rules = {"num_examples": (cfg.num_examples >= 1, ">= 1"), "attempts": (cfg.attempts >= 1, ">= 1"),
             "max_per_query": (cfg.max_per_query >= 0, ">= 0 (0: all)"), "chunk": (cfg.chunk >= 1, ">= 1"),
             "max_attempt_tokens": (cfg.max_attempt_tokens >= 1, ">= 1"), "seed": (cfg.seed >= 0, ">= 0"),
             "max_reflection_tokens": (cfg.max_reflection_tokens >= 1, ">= 1"), "threads": (cfg.threads >= 0, ">= 0"),
             "temperature": (cfg.temperature >= 0, ">= 0"), "top_p": (0 < cfg.top_p <= 1, "in (0, 1]"),
             "out": ((bool(cfg.out) or job != "failures") and (not cfg.out or can_write(cfg.out)),
                     "a file in an existing directory (sample.py failures needs --out=FILE.jsonl)")}
    for name, (ok, what) in rules.items():
        if name in JOB_FLAGS[job] and not ok:
            raise UserError(f"--{name}={getattr(cfg, name)!r}: must be {what}")
    if cfg.model != "default":
        read_config(cfg.model)  # names a missing directory or config.json
    task = task_from_flags(cfg.task, cfg.task_data, cfg.task_options)
    split = cfg.split or ("train" if job == "failures" else "test")
    examples = task.examples(split)[: cfg.num_examples if job != "demo" else 1]
    if not examples:
        raise UserError(f"split {split!r} of task {cfg.task!r} is empty")
    return task, examples


def _load(cfg: SampleConfig):
    return load_model(cfg.model)[1:]


# ----------------------------------------------------------------------------- jobs

def failures(cfg: SampleConfig) -> None:
    from tqdm import tqdm

    from r3.rollout import collect_failures

    task, examples = check_config(cfg, "failures")
    model, tok = _load(cfg)
    out, partial = Path(cfg.out), Path(cfg.out + ".partial")
    done = read_jsonl(partial, allow_truncated_tail=True) if partial.exists() else []
    done = [d for d in done if d.get("config") == _fingerprint(cfg)]  # a partial file of other settings is ignored
    # Rewrite what is kept, so that a line cut short by a kill (dropped above) or rows of other settings
    # are gone before the next row is appended.
    write_jsonl_atomic(partial, done)
    chunks = range(0, len(examples), cfg.chunk)
    with open(partial, "a") as f, torch.no_grad():
        for c in tqdm(chunks, initial=len(done), total=len(chunks), desc="first attempts", unit="chunk"):
            if c // cfg.chunk < len(done):
                continue
            # Query i draws from item i of the failure-build stream (r3/seeds.py), the one train.py's build uses,
            # so a resumed run samples exactly what an uninterrupted one would.
            fails, ok = collect_failures(model, tok, task, examples[c:c + cfg.chunk], attempts=cfg.attempts,
                                         max_per_example=cfg.max_per_query, max_new_tokens=cfg.max_attempt_tokens,
                                         temperature=cfg.temperature, top_p=cfg.top_p,
                                         seed=derive_seed(cfg.seed, "failures", 0), first=c)
            row = {"config": _fingerprint(cfg), "chunk": c, "failures": fails, "successes": ok}
            f.write(json.dumps(row) + "\n")
            f.flush()
            done.append(row)
    rows = [x for d in done for x in d["failures"]]
    successes = sum(d["successes"] for d in done)
    write_jsonl_atomic(out, rows)
    partial.unlink()
    rate = successes / (len(examples) * cfg.attempts)
    print(f"first-try success {rate:.1%} ({successes}/{len(examples) * cfg.attempts} attempts); "
          f"{len(rows)} failures written to {out}")


def _fingerprint(cfg: SampleConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in JOB_FLAGS["failures"] - {"threads", "out"}}


def evaluate(cfg: SampleConfig) -> dict:
    task, examples = check_config(cfg, "eval")
    model, tok = _load(cfg)
    rows, counts = two_try_eval(model, tok, task, examples, max_attempt_tokens=cfg.max_attempt_tokens,
                                max_reflection_tokens=cfg.max_reflection_tokens,
                                temperature=0.0 if cfg.greedy else cfg.temperature, top_p=cfg.top_p,
                                seed=derive_seed(cfg.seed, "eval"), progress=True)
    n = counts["n"]
    result = {"config": dataclasses.asdict(cfg), "model_dir": resolve_model(cfg.model), "n": n}
    print(f"{'task':<16}{'model':<40}{'n':>5}  {'1st try':>22}  {'+reflection 2nd try':>22}")
    cells = []
    for key in ("first", "second"):
        k = counts[key]
        lo, hi = wilson(k, n)
        result[key] = {"correct": k, "accuracy": k / n, "ci95": [lo, hi]}
        cells.append(f"{100 * k / n:5.1f}% [{100 * lo:4.1f}, {100 * hi:4.1f}]")
    print(f"{cfg.task[-15:]:<16}{cfg.model[-39:]:<40}{n:>5}  {cells[0]:>22}  {cells[1]:>22}")
    result["rows"] = rows
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=1))
        print(f"written to {cfg.out}")
    return result


def demo(cfg: SampleConfig) -> dict:
    """The R3 cycle, greedy, on the split's first problem: attempt and verdict, reflection, retry and verdict."""
    from r3.rollout import reflect_and_retry

    task, examples = check_config(cfg, "demo")
    model, tok = _load(cfg)
    ex = examples[0]
    with torch.no_grad():
        (row,), _ = two_try_eval(model, tok, task, [ex], max_attempt_tokens=cfg.max_attempt_tokens,
                                 max_reflection_tokens=cfg.max_reflection_tokens)
        if row["first"]:  # the protocol stops here; reflect anyway, to show the whole cycle
            (r,) = reflect_and_retry(model, tok, task, [{"example": ex, "attempt": row["attempt"]}], group_size=1,
                                     max_reflection_tokens=cfg.max_reflection_tokens,
                                     max_retry_tokens=cfg.max_attempt_tokens, temperature=0.0, retry_temperature=0.0)
            row.update(reflection=r.reflection_text, retry=r.retry_text, second=bool(r.reward))
    verdict = {True: "correct", False: "wrong"}
    print(f"model: {resolve_model(cfg.model)}\ntask:  {cfg.task}\n")
    for turn in task.prompt(ex):
        print(f"[{turn['role']}]\n{turn['content']}\n")
    print(f"[attempt: {verdict[row['first']]}]\n{row['attempt']}\n\n[user]\n{task.reflection_prompt}\n\n"
          f"[reflection]\n{row['reflection']}\n\n[user]\n(the question again)\n\n"
          f"[retry: {verdict[row['second']]}]\n{row['retry']}")
    return row


def main(argv: list[str]) -> None:
    """The one place sample.py turns a user error into one line on stderr (exit 2)."""
    jobs = {"failures": failures, "eval": evaluate, "demo": demo}
    if not argv or argv[0] not in jobs:
        print(f"usage: python sample.py {{{','.join(jobs)}}} [--flag=value ...]  (--help after the job lists "
              "its flags)", file=sys.stderr)
        sys.exit(2)
    cfg = parse_flags(SampleConfig, argv[1:], prog=f"sample.py {argv[0]}", fields=JOB_FLAGS[argv[0]])
    if cfg.threads > 0:  # a negative value is refused by check_config
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # freed CPU memory is reused, not faulted in again (r3/cpu.py)
    try:
        jobs[argv[0]](cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
