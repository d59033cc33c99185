"""sample.py end to end on a tiny model: the failure set survives interruption, eval fills the four-column row.

Proves: `failures` writes {task, example, attempt} rows for exactly the failed attempts, and a run
killed after its first chunk resumes from <out>.partial to the same file an uninterrupted run writes;
`eval` reports first-try and +reflection second-try accuracy with 95% intervals (second >= first) and
writes its full config; `demo` prints the task's problem, the attempt, the reflection and the retry with
their verdicts; each job's --help lists exactly its flags; bad input (a malformed line, a bad flag value)
ends with one `error:` line, exit 2, before any model loads.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import r3.checkpoint
import r3.rollout
import sample
from r3.errors import UserError
from r3.jsonl import read_jsonl
from conftest import ParityTask

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def toy(monkeypatch):
    import r3.tasks

    monkeypatch.setattr(r3.tasks, "get_task", lambda name, **kw: ParityTask())


def _cfg(tiny_dir, out, **kw):
    return sample.SampleConfig(**(dict(model=str(tiny_dir), task="parity", num_examples=6, attempts=3, max_per_query=0,
                                       max_attempt_tokens=5, max_reflection_tokens=6, chunk=2, out=str(out), seed=1)
                                  | kw))


def test_failures_are_exactly_the_failed_attempts(tiny_dir, toy, tmp_path, capsys):
    sample.failures(_cfg(tiny_dir, tmp_path / "f.jsonl"))
    rows = read_jsonl(tmp_path / "f.jsonl")
    task = ParityTask()
    assert rows and all(not task.verify(r["example"], r["attempt"]) and r["task"] == "parity" for r in rows)
    ok = int(capsys.readouterr().out.split("(")[1].split("/")[0])
    assert ok + len(rows) == 6 * 3  # every attempt is either a success or a written failure
    assert not (tmp_path / "f.jsonl.partial").exists()


def test_failures_resume_after_interruption(tiny_dir, toy, tmp_path, monkeypatch):
    sample.failures(_cfg(tiny_dir, tmp_path / "straight.jsonl"))
    real, calls = r3.rollout.collect_failures, []

    def dies_on_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(r3.rollout, "collect_failures", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        sample.failures(_cfg(tiny_dir, tmp_path / "resumed.jsonl"))
    assert not (tmp_path / "resumed.jsonl").exists()
    assert len(read_jsonl(tmp_path / "resumed.jsonl.partial")) == 1  # the first chunk was kept
    monkeypatch.setattr(r3.rollout, "collect_failures", real)
    sample.failures(_cfg(tiny_dir, tmp_path / "resumed.jsonl"))
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()


def test_failures_resume_twice_after_a_kill_mid_write(tiny_dir, toy, tmp_path, monkeypatch):
    """A kill during a write leaves an unterminated last line; resuming drops it and must not append the next
    row onto it, or the run after a second interruption finds a malformed line mid-file."""
    sample.failures(_cfg(tiny_dir, tmp_path / "straight.jsonl"))
    real, calls = r3.rollout.collect_failures, []

    def dies_on_chunks_2_and_4(*a, **k):
        calls.append(1)
        if len(calls) in (2, 4):
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(r3.rollout, "collect_failures", dies_on_chunks_2_and_4)
    out, partial = tmp_path / "resumed.jsonl", tmp_path / "resumed.jsonl.partial"
    with pytest.raises(KeyboardInterrupt):
        sample.failures(_cfg(tiny_dir, out))
    with open(partial, "a") as f:
        f.write('{"config": {"mod')  # the kill cut the second chunk's row short
    with pytest.raises(KeyboardInterrupt):
        sample.failures(_cfg(tiny_dir, out))  # resumes at chunk 2, dies on chunk 3
    assert len(read_jsonl(partial)) == 2
    monkeypatch.setattr(r3.rollout, "collect_failures", real)
    sample.failures(_cfg(tiny_dir, out))
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()


def test_eval_end_to_end(tiny_dir, toy, tmp_path):
    result = sample.evaluate(_cfg(tiny_dir, tmp_path / "eval.json", greedy=False, temperature=1.0))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["n"] == 6 and saved["config"]["model"] == str(tiny_dir)
    assert result["second"]["correct"] >= result["first"]["correct"]
    for key in ("first", "second"):
        lo, hi = saved[key]["ci95"]
        assert 0 <= lo <= saved[key]["accuracy"] <= hi <= 1
    failed_first = [r for r in saved["rows"] if not r["first"]]
    assert all("reflection" in r and "retry" in r for r in failed_first)


def test_wilson_interval_matches_known_values():
    lo, hi = sample.wilson(10, 100)
    assert abs(lo - 0.0552) < 1e-3 and abs(hi - 0.1744) < 1e-3
    # the closed forms at the ends (z^2 / (n + z^2) from 0 or 1), inside [0, 1] so never printed as "-0.0"
    z2 = 1.96 ** 2
    for n in (5, 10, 64, 128, 506):
        assert sample.wilson(0, n)[0] == 0.0 and abs(sample.wilson(0, n)[1] - z2 / (n + z2)) < 1e-12
        assert sample.wilson(n, n)[1] == 1.0 and abs(sample.wilson(n, n)[0] - n / (n + z2)) < 1e-12


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON line"):
        read_jsonl(f)


def test_unknown_task_is_one_line_error():
    r = subprocess.run([sys.executable, "sample.py", "eval", "--task=nope"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown task 'nope'"), r.stderr[-500:]


def test_demo_shows_the_whole_cycle_on_the_tasks_first_problem(tiny_dir, toy, capsys):
    row = sample.demo(_cfg(tiny_dir, ""))
    out = capsys.readouterr().out
    task = ParityTask()
    first = task.examples("test")[0]
    assert first["q"] in out and task.reflection_prompt in out  # --task's problem and reflection request
    for part in (f"[attempt: {'correct' if row['first'] else 'wrong'}]\n{row['attempt']}\n",
                 f"[reflection]\n{row['reflection']}\n",
                 f"[retry: {'correct' if row['second'] else 'wrong'}]\n{row['retry']}"):
        assert part in out, part
    assert row["first"] == task.verify(first, row["attempt"]) and row["second"] == task.verify(first, row["retry"])


def _run(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_each_jobs_help_lists_only_its_flags():
    flags = {job: set(re.findall(r"^  (--\w+)", _run(job, "--help").stdout, re.M)) - {"--help"}
             for job in ("failures", "eval", "demo")}
    assert {job: {f[2:] for f in fl} for job, fl in flags.items()} == sample.JOB_FLAGS
    assert "--attempts" in flags["failures"] and "--attempts" not in flags["eval"] | flags["demo"]
    assert "--greedy" in flags["eval"] and "--greedy" not in flags["failures"] | flags["demo"]
    assert "--max_reflection_tokens" in flags["demo"] and "--max_reflection_tokens" not in flags["failures"]
    assert all("--max_new_tokens" not in f and "--max_attempt_tokens" in f for f in flags.values())


@pytest.mark.parametrize("job, flag, message", [
    ("eval", "--top_p=0", "--top_p=0.0: must be in (0, 1]"),
    ("eval", "--max_reflection_tokens=0", "--max_reflection_tokens=0: must be >= 1"),
    ("failures", "--temperature=-1", "--temperature=-1.0: must be >= 0"),
    ("failures", "--chunk=0", "--chunk=0: must be >= 1"),
    ("failures", "--num_examples=0", "--num_examples=0: must be >= 1"),
    ("failures", "--out=",
     "--out='': must be a file in an existing directory (sample.py failures needs --out=FILE.jsonl)"),
    ("failures", f"--out={__file__}/x.jsonl", f"--out='{__file__}/x.jsonl': must be a file in an existing directory"),
    ("eval", "--out=/no/such/dir/x.json", "--out='/no/such/dir/x.json': must be a file in an existing directory"),
    ("demo", "--max_attempt_tokens=0", "--max_attempt_tokens=0: must be >= 1"),
])
def test_bad_flag_values_end_before_the_model_loads(tiny_dir, toy, monkeypatch, capsys, job, flag, message):
    monkeypatch.setattr(r3.checkpoint, "load_hf", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        sample.main([job, f"--model={tiny_dir}", "--task=parity", *(["--out=x.jsonl"] if job != "demo" else []), flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
