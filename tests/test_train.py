"""train.py end to end on tiny models: it learns only through the policy, splits over ranks, resumes exactly.

Proves: two training steps give a finite loss, change the policy's weights and leave the reference's
untouched; `torchrun --nproc_per_node=2` computes the same loss and gradient norm as one process on
the same global batch (fp32, within 1e-5); 4 steps straight equal 2 steps + stop + resume + 2 steps
(losses within 1e-6); a checkpoint save killed midway leaves the previous checkpoint loadable and
resumable; an empty failure set and an incompatible resume end with one clear message. Every config
field is checked, and each bad value (and each bad failure row) ends with one `error:` line, exit 2,
before any model loads; an interrupt ends with one line naming the step and the newest checkpoint
(exit 130) and the same command resumes; a resume cuts samples.jsonl back to the checkpoint like
metrics.jsonl, and a run without a checkpoint starts every output anew; the end-of-run evaluation gives
the numbers `sample.py eval` gives on the exported model; the code one training step runs lives in at most 7
files (model and task aside), none calling back into its caller's file. A toy task (reward = the retry's length is
even) gives a tiny random model reward variance to learn from.
"""
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3 import checkpoint as r3_checkpoint
import train
from conftest import ParityTask
from r3.tasks import get_task as real_get_task

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def toy(monkeypatch, tmp_path):
    import r3.tasks

    monkeypatch.setattr(r3.tasks, "get_task", lambda name, **kw: ParityTask())
    fails = tmp_path / "failures.jsonl"
    fails.write_text("".join(json.dumps({"task": "parity", "example": {"q": f"Say something, {i}."},
                                         "attempt": "abc"}) + "\n" for i in range(4)))
    return fails


def _cfg(tiny_dir, fails, out, **kw):
    base = dict(model=str(tiny_dir), task="parity", failures=str(fails), out_dir=str(out), steps=2, group_size=4,
                failures_per_step=2, max_reflection_tokens=8, max_attempt_tokens=5, micro_batch=4, lr=1e-3,
                beta=0.1, save_every=1, warmup_steps=1, threads=1, seed=3)
    return train.TrainConfig(**(base | kw))


def _metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _steps(out):
    """The training steps' rows (metrics.jsonl also has step 0's evaluation of the untrained model)."""
    return [r for r in _metrics(out) if "reward" in r]


def test_two_steps_change_policy_not_reference(tiny_dir, toy, tmp_path, monkeypatch):
    loaded = []
    real = r3_checkpoint.load_hf
    for module in (train, r3_checkpoint):  # the policy loads through r3.checkpoint.load_model, the reference here
        monkeypatch.setattr(module, "load_hf", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    train.main(_cfg(tiny_dir, toy, tmp_path / "run"))
    rows = _steps(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert any(not r.get("skipped") for r in rows), "every step skipped: no reward variance"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    start = real(tiny_dir).state_dict()
    final = real(tmp_path / "run" / "final").state_dict()
    policy, ref = loaded[0].state_dict(), loaded[1].state_dict()
    assert any(not torch.equal(start[k], final[k]) for k in start), "exported policy equals the initial weights"
    assert all(torch.equal(start[k], ref[k]) for k in start), "the reference model changed"
    assert all(torch.equal(policy[k].full_tensor() if hasattr(policy[k], "full_tensor") else policy[k], final[k])
               for k in final)
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0


def test_resume_equals_straight_run(tiny_dir, toy, tmp_path):
    train.main(_cfg(tiny_dir, toy, tmp_path / "a", steps=4))
    train.main(_cfg(tiny_dir, toy, tmp_path / "b", steps=2))
    train.main(_cfg(tiny_dir, toy, tmp_path / "b", steps=4))
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["reward"] == rb["reward"], (ra, rb)
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra["loss"], rb["loss"])


def test_killed_save_leaves_previous_checkpoint(tiny_dir, toy, tmp_path, monkeypatch):
    import r3.checkpoint

    real_save, calls = r3.checkpoint.dcp.save, []

    def dying_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the second save dies after writing part of its files
            Path(checkpoint_id, "garbage").write_text("half")
            raise KeyboardInterrupt("killed during save")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(r3.checkpoint.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(_cfg(tiny_dir, toy, tmp_path / "run", steps=3))
    assert train.latest_checkpoint(tmp_path / "run").name == "step_000001"
    monkeypatch.setattr(r3.checkpoint.dcp, "save", real_save)
    train.main(_cfg(tiny_dir, toy, tmp_path / "run", steps=3))
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [0, 1, 2, 3]  # step 0: the untrained model's eval


def test_incompatible_resume_is_refused(tiny_dir, toy, tmp_path):
    train.main(_cfg(tiny_dir, toy, tmp_path / "run", steps=1))
    with pytest.raises(train.UserError, match=r"cannot resume.*group_size: 4 -> 2"):
        train.main(_cfg(tiny_dir, toy, tmp_path / "run", steps=2, group_size=2))


def test_empty_failure_set_is_a_clear_error(tiny_dir, toy, tmp_path):
    toy.write_text("")
    with pytest.raises(train.UserError, match="failure set is empty"):
        train.main(_cfg(tiny_dir, toy, tmp_path / "run"))


def test_bad_flags_end_with_usage_message():
    r = subprocess.run([sys.executable, "train.py", "--group_size=eight"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "argument --group_size: invalid int value: 'eight'" in r.stderr
    r = subprocess.run([sys.executable, "train.py", "--model=/no/such/dir"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "error: model directory /no/such/dir does not exist" in r.stderr


def _worker(nproc, env=None):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + [str(ROOT / "tests" / "dist_worker.py")]
    env = os.environ | {"PYTHONFAULTHANDLER": "1"} | (env or {})  # a hang or crash shows its stack
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process():
    one, two = _worker(1), _worker(2)
    for k in ("loss", "grad_norm", "kl", "clip_frac", "tokens"):
        assert abs(one[k] - two[k]) <= 1e-5, f"{k}: 1 process {one[k]!r} vs 2 ranks {two[k]!r}"
    assert one["clip_frac"] > 0  # the second pass really moved the ratio


def test_all_zero_variance_batch_skips_the_update(tiny_dir, toy, tmp_path, monkeypatch):
    """A step where every group has equal rewards takes no update, says so, and produces no NaN."""
    monkeypatch.setattr(ParityTask, "verify", lambda self, ex, text: False)
    train.main(_cfg(tiny_dir, toy, tmp_path / "run"))
    rows = _steps(tmp_path / "run")
    assert all(r["skipped"] and r["loss"] == 0.0 and r["zero_variance_frac"] == 1.0 for r in rows)
    start, final = train_load(tiny_dir), train_load(tmp_path / "run" / "final")
    assert all(torch.equal(start[k], final[k]) for k in start)


def train_load(path):
    from r3.checkpoint import load_hf

    return load_hf(path).state_dict()


def _cli_flags(tiny_dir, fails, out, **kw):
    cfg = _cfg(tiny_dir, fails, out, **kw)
    return [f"--{k}={v}" for k, v in vars(cfg).items()]


def test_eval_split_is_checked_with_the_task():
    with pytest.raises(train.UserError, match="unknown split 'nope'"):
        train.check_config(train.TrainConfig(task="countdown2", eval_split="nope"), 1)
    with pytest.raises(train.UserError, match="split 'val' of task 'countdown2' is empty"):
        train.check_config(train.TrainConfig(task="countdown2", eval_split="val"), 1)  # countdown2 holds none back
    train.check_config(train.TrainConfig(task="countdown_sum3shot", eval_split="val"), 1)


def test_every_field_is_checked():
    cfg = train.TrainConfig()
    # config.json read, task built and its eval split read, in check_config
    checked_by_loading = {"model", "task", "task_data", "task_options", "eval_split"}
    assert set(train.config_rules(cfg, 1)) | checked_by_loading == set(vars(cfg))
    assert all(ok for ok, _ in train.config_rules(cfg, 1).values()), "a default value is refused"


@pytest.mark.parametrize("flag, message", [
    ("group_size=1", "--group_size=1: must be >= 2"),
    ("ppo_epochs=0", "--ppo_epochs=0: must be >= 1"),
    ("adv_scale=std", "--adv_scale='std': must be 'group' or 'none'"),
    ("failures_per_step=3", "--failures_per_step=3: must be >= 1 and divisible by the 2 ranks"),
    ("micro_batch=0", "--micro_batch=0: must be >= 1"),
    ("temperature=-0.5", "--temperature=-0.5: must be >= 0"),
    ("retry_temperature=-1", "--retry_temperature=-1.0: must be >= 0"),
    ("top_p=0", "--top_p=0.0: must be in (0, 1]"),
    ("top_p=1.5", "--top_p=1.5: must be in (0, 1]"),
    ("max_attempt_tokens=0", "--max_attempt_tokens=0: must be >= 1"),
    ("max_reflection_tokens=0", "--max_reflection_tokens=0: must be >= 1"),
    ("lr=0", "--lr=0.0: must be > 0"),
    ("steps=0", "--steps=0: must be >= 1"),
    ("keep_checkpoints=0", "--keep_checkpoints=0: must be >= 1"),
    (f"out_dir={__file__}/run", f"--out_dir='{__file__}/run': must be a directory that exists or can be made"),
    ("failures=/no/such.jsonl", "--failures='/no/such.jsonl': must be an existing failures JSONL file"),
    ("task=nope", "unknown task 'nope'"),
])
def test_bad_config_value_is_one_line_before_the_model_loads(tiny_dir, toy, tmp_path, monkeypatch, capsys, flag,
                                                             message):
    for module in (train, r3_checkpoint):
        monkeypatch.setattr(module, "load_hf", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(train.dist, "init", lambda *a: (0, 2, torch.device("cpu")))  # as under torchrun with 2 ranks
    import r3.tasks

    monkeypatch.setattr(r3.tasks, "get_task", lambda name, **kw: ParityTask() if name == "parity" else
                        real_get_task(name))
    with pytest.raises(SystemExit) as e:
        train.cli(_cli_flags(tiny_dir, toy, tmp_path / "run", failures_per_step=2) + [f"--{flag}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("row, message", [
    ({"task": "parity", "attempt": "abc"}, r"failures\.jsonl:2: expected a row \{task, example, attempt\}"),
    ({"task": "countdown", "example": {"q": "x"}, "attempt": "abc"},
     r"failures\.jsonl:2: a failure of task 'countdown'"),
    ({"task": "parity", "example": {"x": 1}, "attempt": "abc"},
     r"failures\.jsonl:2: task 'parity' cannot build a prompt"),
])
def test_bad_failure_row_is_one_line_before_the_model_loads(tiny_dir, toy, tmp_path, monkeypatch, capsys, row, message):
    for module in (train, r3_checkpoint):
        monkeypatch.setattr(module, "load_hf", lambda *a, **k: pytest.fail("a model was loaded"))
    toy.write_text(toy.read_text().splitlines()[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as e:
        train.cli(_cli_flags(tiny_dir, toy, tmp_path / "run"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and re.match(f"error: .*{message}", err), err


def test_interrupt_is_one_line_naming_step_and_checkpoint(tiny_dir, toy, tmp_path, monkeypatch, capsys):
    real, calls = train.rollout, []

    def interrupted_on_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C, or SIGTERM through r3.dist, raises in the main thread
        return real(*a, **k)

    monkeypatch.setattr(train, "rollout", interrupted_on_step_2)
    with pytest.raises(SystemExit) as e:
        train.cli(_cli_flags(tiny_dir, toy, tmp_path / "run", steps=3))
    err = capsys.readouterr().err
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    assert e.value.code == 130  # below the progress bar's lines (closed, so the message starts a line), one line:
    assert err.endswith(f"\ninterrupted after step 1; newest complete checkpoint: {ckpt}; run the same command to "
                        "resume\n"), err[-500:]
    monkeypatch.setattr(train, "rollout", real)
    train.main(_cfg(tiny_dir, toy, tmp_path / "run", steps=3))  # the same command resumes
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [0, 1, 2, 3]  # step 0: the untrained model's eval


def _samples(out):
    return [json.loads(ln) for ln in (Path(out) / "samples.jsonl").read_text().splitlines()]


def test_resume_cuts_samples_back_and_a_fresh_run_starts_anew(tiny_dir, toy, tmp_path):
    train.main(_cfg(tiny_dir, toy, tmp_path / "a", steps=3))
    run = tmp_path / "b"
    train.main(_cfg(tiny_dir, toy, run, steps=2))
    for name in ("metrics.jsonl", "samples.jsonl"):  # rows of a step 3 whose checkpoint was never written
        with open(run / name, "a") as f:
            f.write(json.dumps({"step": 3, "stale": True}) + "\n")
    train.main(_cfg(tiny_dir, toy, run, steps=3))
    assert _samples(run) == _samples(tmp_path / "a") and [r["step"] for r in _samples(run)] == [1, 2, 3]
    assert not any(r.get("stale") for r in _metrics(run))
    import shutil

    shutil.rmtree(run / "checkpoints")  # no checkpoint: the next run starts every output anew
    train.main(_cfg(tiny_dir, toy, run, steps=1))
    assert [r["step"] for r in _metrics(run)] == [0, 1] and [r["step"] for r in _samples(run)] == [1]
    assert toy.exists()  # the given failures file is the user's: never removed


def test_step0_and_final_evaluations_equal_sample_eval_on_the_untrained_and_exported_models(tiny_dir, toy, tmp_path,
                                                                                            capsys):
    """Part of one protocol: the same budgets and rows from train.py's evaluations (step 0: the untrained model;
    the end of the run: the exported one) and `sample.py eval`; the last line says before -> after."""
    cfg = _cfg(tiny_dir, toy, tmp_path / "run", steps=1, eval_examples=6)
    train.main(cfg)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1] and "eval_n" in rows[0] and "reward" not in rows[0]
    env = os.environ | {"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"}
    for model, row in ((tiny_dir, rows[0]), (tmp_path / "run" / "final", rows[-1])):
        r = subprocess.run([sys.executable, "sample.py", "eval", f"--model={model}",
                            "--task=conftest:ParityTask", "--num_examples=6",
                            f"--max_attempt_tokens={cfg.max_attempt_tokens}",
                            f"--max_reflection_tokens={cfg.max_reflection_tokens}", f"--out={tmp_path / 'eval.json'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        ev = json.loads((tmp_path / "eval.json").read_text())
        assert (ev["n"], ev["first"]["accuracy"], ev["second"]["accuracy"]) == (row["eval_n"], row["eval_first"],
                                                                             row["eval_second"]), model
    lo, hi = train.wilson(round(rows[0]["eval_first"] * 6), 6)
    first = f"{100 * rows[0]['eval_first']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    assert f"held-out, n=6, step 0 -> 1: first try {first}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["grpo", "r3_retry"])
def test_each_method_trains_and_reports_its_sampled_tokens(tiny_dir, toy, tmp_path, method):
    """--method=grpo trains on the training queries (no failure set is built or read); r3_retry on the same
    failures as r3. Both update the policy through the same GRPO step and log the tokens they sampled."""
    kw = {"failures": ""} if method == "grpo" else {}
    train.main(_cfg(tiny_dir, toy, tmp_path / method, method=method, train_examples=6, **kw))
    rows = _steps(tmp_path / method)
    assert [r["step"] for r in rows] == [1, 2] and any(not r.get("skipped") for r in rows)
    assert all(r["sampled_tokens"] > 0 for r in rows)
    if method == "grpo":
        assert not (tmp_path / method / "failures.jsonl").exists(), "grpo built a failure set"
    start, final = train_load(tiny_dir), train_load(tmp_path / method / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start)


def test_grpo_method_refuses_a_failures_file(tiny_dir, toy, tmp_path):
    with pytest.raises(train.UserError, match="--failures=.*grpo trains on the queries"):
        train.main(_cfg(tiny_dir, toy, tmp_path / "run", method="grpo"))


def test_one_training_step_reads_in_seven_files_none_calling_back(tiny_dir, toy, tmp_path):
    """Every function of the repository that the loop body of train.main reaches in one R3 step, recorded by a
    profile hook (the model's forward and the task's methods are the interfaces a reader takes as given: not
    counted): they live in train.py and at most 6 library files, and no file calls back into a file that calls it."""
    src = Path(train.__file__).read_text().splitlines()
    lo = next(i for i, s in enumerate(src) if "while step < cfg.steps:" in s) + 1
    hi = next(i for i, s in enumerate(src) if "step += 1" in s) + 1
    edges, roots = {}, set()

    @functools.cache  # the hook runs on every Python call: resolve each code object's file once
    def where(code):  # (file, function) of ours; None for comprehensions, lambdas, dependencies, model, tasks
        path = Path(code.co_filename)
        if "<" in code.co_name or not path.is_absolute() or not path.resolve().is_relative_to(ROOT):
            return None
        rel = path.resolve().relative_to(ROOT).as_posix()
        return None if rel.startswith(("tests/", ".venv/", "r3/model.py", "r3/tasks/")) else (rel, code.co_qualname)

    def hook(frame, event, arg):
        callee = where(frame.f_code) if event == "call" else None
        caller, ours = frame.f_back, None
        while callee is not None and caller is not None and (ours := where(caller.f_code)) is None:
            caller = caller.f_back
        if ours is None:
            return
        if ours == ("train.py", "main"):
            if lo <= caller.f_lineno <= hi:
                roots.add(callee)
        else:
            edges.setdefault(ours, set()).add(callee)

    sys.setprofile(hook)
    try:
        train.main(_cfg(tiny_dir, toy, tmp_path / "run", steps=1, save_every=0, eval_examples=0))
    finally:
        sys.setprofile(None)
    reached, todo = set(), list(roots)
    while todo:
        f = todo.pop()
        if f not in reached:
            reached.add(f)
            todo += edges.get(f, ())
    files = {f for f, _ in reached} | {"train.py"}
    calls = {(a[0], b[0]) for a in reached for b in edges.get(a, ()) if a[0] != b[0]}
    print(f"{len(reached)} functions over {len(files)} files: {sorted(files)}")
    assert {"r3/rollout.py", "r3/sampler.py", "r3/grpo.py"} <= files  # the hook saw the step
    assert len(files) <= 7, sorted(files)
    assert not [(a, b) for a, b in calls if (b, a) in calls], sorted(calls)
