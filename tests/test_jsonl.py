"""r3/jsonl.py: failure-set rows are checked on read, and per-step files are cut back to a step.

Proves: `read_failures` names the file and line of a row without `example` or `attempt`, of a row of another
task, and of an example the task cannot prompt, and returns well-formed rows unchanged; `truncate_jsonl`
keeps exactly the rows up to a step (and drops a line cut short by a kill); `write_jsonl_atomic` round-trips.
"""
import json

import pytest

from r3.errors import UserError
from r3.jsonl import read_failures, read_jsonl, truncate_jsonl, write_jsonl_atomic


class Echo:
    name = "echo"
    reflection_prompt = "Reflect."

    def prompt(self, ex):
        return [{"role": "user", "content": ex["q"]}]  # KeyError on an example without "q"


def _file(tmp_path, rows, blank_line=False):
    f = tmp_path / "failures.jsonl"
    lines = [json.dumps(r) for r in rows]
    if blank_line:
        lines.insert(1, "")
    f.write_text("".join(ln + "\n" for ln in lines))
    return f


GOOD = {"task": "echo", "example": {"q": "hi"}, "attempt": "ho"}


def test_good_failure_rows_are_returned_unchanged(tmp_path):
    rows = [GOOD, GOOD | {"attempt": "x"}, {"example": {"q": "no task field"}, "attempt": ""}]
    assert read_failures(_file(tmp_path, rows), Echo()) == rows


@pytest.mark.parametrize("bad, message", [
    ({"task": "echo", "attempt": "ho"},
     r"failures\.jsonl:3: expected a row \{task, example, attempt\}.*\['attempt', 'task'\]"),
    ({"task": "echo", "example": {"q": "hi"}}, r"failures\.jsonl:3: expected a row \{task, example, attempt\}"),
    (GOOD | {"task": "countdown"}, r"failures\.jsonl:3: a failure of task 'countdown', but --task is 'echo'"),
    (GOOD | {"example": {"question": "hi"}}, r"failures\.jsonl:3: task 'echo' cannot build a prompt .*KeyError"),
    (GOOD | {"attempt": 3}, r"failures\.jsonl:3: `attempt` must be a string"),
])
def test_bad_failure_row_names_file_and_line(tmp_path, bad, message):
    f = _file(tmp_path, [GOOD, bad], blank_line=True)  # the bad row is on line 3: line 2 is blank
    with pytest.raises(UserError, match=message):
        read_failures(f, Echo())


def test_truncate_keeps_rows_up_to_the_step(tmp_path):
    f = tmp_path / "metrics.jsonl"
    write_jsonl_atomic(f, [{"step": s, "v": s * 10} for s in (1, 2, 3, 4)])
    with open(f, "a") as fh:
        fh.write('{"step": 5, "v"')  # a row cut short by a kill
    truncate_jsonl(f, 2)
    assert read_jsonl(f) == [{"step": 1, "v": 10}, {"step": 2, "v": 20}]
    truncate_jsonl(tmp_path / "absent.jsonl", 2)  # nothing to cut: no file appears
    assert not (tmp_path / "absent.jsonl").exists()
