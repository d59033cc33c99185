"""JSONL files of the scripts: read, atomic write, append, truncate to a step; the failure-set reader.

- `read_jsonl(path)`: one JSON object per line; a malformed line is a `UserError` naming file and line.
  With `allow_truncated_tail`, an unterminated last line (a write cut short by a kill) is dropped first.
- `write_jsonl_atomic(path, rows)`: temp file, fsync, rename: a reader never sees half a file.
- `append_jsonl(path, row)` and `truncate_jsonl(path, last_step)`: the per-step outputs of train.py
  (metrics.jsonl, samples.jsonl), cut back to a checkpoint's step on resume.
- `can_write(path, directory)`: whether a job's output path can be written, checked before the work.
- `read_failures(path, task)`: a failure set ({task, example, attempt} rows, as `sample.py failures`
  writes them), each row checked against the task before any model is loaded.

It does not: read task data files (r3.tasks.read_rows), or lock files against concurrent writers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from r3.errors import UserError


def read_jsonl(path: str | Path, allow_truncated_tail: bool = False) -> list[dict]:
    from r3.tasks import read_jsonl as read_lines  # the line parser tasks use too: errors name file and line

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if allow_truncated_tail and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return read_lines(path, text)


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def can_write(path: str | Path, directory: bool = False) -> bool:
    """Whether `path` can be written as a directory (an existing one, or made with its parents) or as a
    file in an existing directory (an existing file is replaced). False for a path under a regular file."""
    p = Path(path).absolute()
    if p.exists():
        return p.is_dir() == directory and os.access(p if directory else p.parent, os.W_OK)
    parent = p if directory else p.parent
    while directory and not parent.exists():  # a directory is made with its parents (mkdir -p)
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK)


def append_jsonl(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Keep the rows whose `step` is <= last_step (on resume: the rest will be written again, identically)."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_jsonl(path, allow_truncated_tail=True) if r.get("step", 0) <= last_step]
        write_jsonl_atomic(path, rows)


def read_failures(path: str | Path, task) -> list[dict]:
    """The rows of a failure-set file, each checked: it has `example` and `attempt`, its `task` (if any) is
    this task's name, and the task can build a prompt from its example. A bad row names file and line."""
    rows = read_jsonl(path)
    lines = [n for n, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if text.strip()]
    for line, row in zip(lines, rows):  # read_jsonl skips blank lines: name the row by its line in the file
        where = f"{path}:{line}"
        if "example" not in row or "attempt" not in row:
            raise UserError(f"{where}: expected a row {{task, example, attempt}} as `sample.py failures` writes, "
                            f"got keys {sorted(row)}")
        if row.get("task", task.name) != task.name:
            raise UserError(f"{where}: a failure of task {row['task']!r}, but --task is {task.name!r}")
        if not isinstance(row["attempt"], str):
            raise UserError(f"{where}: `attempt` must be a string, got {type(row['attempt']).__name__}")
        try:
            task.prompt(row["example"])
        except Exception as e:  # a task's prompt() raises whatever its example lacks (KeyError, TypeError, ...)
            raise UserError(f"{where}: task {task.name!r} cannot build a prompt from this example "
                            f"({type(e).__name__}: {e})") from None
    return rows
