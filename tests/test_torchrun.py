"""train.py under torchrun, run as users run it (subprocesses): clean exits, stopping by signal, two launchers.

Proves: the tiny 2-rank job (tests/toy_task.py's parity task, 4 steps) exits 0 ten times in a row with
no traceback, no gloo "Connection closed by peer" and no abort, and gives the same metrics every time;
SIGTERM to torchrun, or SIGINT to its process group (what Ctrl-C sends), in the middle of a run ends
every process within 30 s with one line from us on stderr, leaves the newest complete checkpoint
loadable, and the same command then resumes from it and finishes with the metrics of the uninterrupted
run (losses within 1e-6, rewards equal); two launchers `--nnodes=2 --nproc_per_node=1` with c10d
rendezvous (multi-node on one machine: both ranks have LOCAL_RANK 0) give the same rewards and losses
(within 1e-5) as one process (`python train.py`) and as the single-node 2-rank run, and write metrics once.
In-process and fast: r3.dist's stop handlers turn the first SIGTERM (or SIGINT) into a KeyboardInterrupt
and ignore later signals; train.py shows a collective broken by a peer's exit, with no stop signal, as the
error it is, and after a stop signal any error (DCP caught the KeyboardInterrupt, a peer is gone) as the
one-line interrupt; a process that started a process group ends through r3.dist.exit_now
without Python's teardown (where the rare SIGABRT at the end of a run came from: a gloo worker thread
ended inside C++ while the interpreter finalized; r3/dist.py).

One process is a reference because sampling does not depend on the world size: each failure's samples are
seeded by its index in the step's global batch (r3/rollout.py, r3/sampler.py), not by the rank.

torchrun starts each worker in its own session, so a process group signal reaches only the launcher,
which forwards it to the workers (and SIGKILLs any still alive 30 s later). What torchrun itself prints
then (a warning per worker and its own SignalException traceback) is not ours and not counted.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STANDALONE = ["--standalone", "--nproc_per_node=2"]
STEPS = 4
JOB = ["--task=toy_task:ParityTask", "--group_size=4", "--failures_per_step=2", "--max_reflection_tokens=8",
       "--max_attempt_tokens=5", "--micro_batch=4", "--lr=1e-3", "--beta=0.1", "--save_every=1", "--warmup_steps=1",
       "--threads=1", "--seed=3", f"--steps={STEPS}"]
# tests/ on the path for toy_task; a hang or a crash of a worker prints its Python stack
ENV = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PYTHONFAULTHANDLER": "1"}
BAD = ("Traceback", "terminate called", "Connection closed by peer", "Connection reset by peer", "Aborted",
       "Fatal Python error", "exitcode")

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc")


# ----------------------------------------------------------------------------- processes

def _start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _tree(pid: int) -> set[int]:
    """pid and all its live descendants (from /proc: torchrun's workers are in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _kill(pids: set[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a launcher; on timeout kill it and every worker, and fail with its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(_tree(proc.pid))
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not end within {timeout} s; stderr:\n{err[-4000:]}")
    return proc.returncode, out, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 300, env: dict | None = None) -> tuple[int, str, str]:
    return _finish(_start(cmd, env), timeout)


def _metrics(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


def _assert_same_metrics(ref: list[dict], got: list[dict], loss_tol: float) -> None:
    assert [r["step"] for r in got if "reward" not in r] == [r["step"] for r in ref if "reward" not in r] == [0]
    ref, got = ([r for r in rows if "reward" in r] for rows in (ref, got))  # the training steps
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1)), (ref, got)
    for a, b in zip(ref, got):
        assert a["reward"] == b["reward"], f"step {a['step']}: reward {a['reward']} vs {b['reward']}"
        assert abs(a["loss"] - b["loss"]) <= loss_tol, f"step {a['step']}: loss {a['loss']!r} vs {b['loss']!r}"


def _assert_clean(rc: int, err: str, what: str) -> None:
    assert rc == 0, f"{what}: exit code {rc}; stderr:\n{err[-4000:]}"
    for bad in BAD:
        assert bad not in err, f"{what}: {bad!r} on stderr:\n{err[-4000:]}"


# ----------------------------------------------------------------------------- the job

@pytest.fixture(scope="module")
def job(tiny_dir, tmp_path_factory):
    """train.py's argv for an out_dir: the tiny toy-task job that has reward variance."""
    fails = tmp_path_factory.mktemp("torchrun") / "failures.jsonl"
    fails.write_text("".join(json.dumps({"task": "parity", "example": {"q": f"Say something, {i}."},
                                         "attempt": "abc"}) + "\n" for i in range(4)))
    return lambda out: [str(ROOT / "train.py"), f"--model={tiny_dir}", f"--failures={fails}", f"--out_dir={out}", *JOB]


@pytest.fixture(scope="module")
def straight(job, tmp_path_factory):
    """One uninterrupted 2-rank run: (exit code, stderr, metrics rows)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, _, err = _run(TORCHRUN + STANDALONE + job(out))
    _assert_clean(rc, err, "the uninterrupted 2-rank run")
    steps = [r for r in _metrics(out) if "reward" in r]  # the training steps (not step 0's evaluation)
    assert any(not r.get("skipped") for r in steps), "every step skipped: no reward variance"
    return rc, err, _metrics(out)


@pytest.mark.slow
@needs_proc
def test_ten_two_rank_runs_in_a_row_all_exit_0_with_equal_metrics(job, straight, tmp_path):
    for i in range(1, 10):  # the fixture's run is the first of ten
        rc, _, err = _run(TORCHRUN + STANDALONE + job(tmp_path / f"run{i}"))
        _assert_clean(rc, err, f"run {i + 1} of 10")
        _assert_same_metrics(straight[2], _metrics(tmp_path / f"run{i}"), loss_tol=0.0)


END_OF_A_RUN = """
import atexit, torch
from r3 import dist
dist.init()
t = torch.ones(1)
if torch.distributed.is_initialized():
    torch.distributed.all_reduce(t)
atexit.register(lambda: print("python teardown ran", flush=True))
print("sum", int(t))  # not flushed here: exit_now must flush it
dist.shutdown()
dist.exit_now(7)
"""


def test_exit_now_after_a_process_group_skips_python_teardown_and_keeps_code_and_output(tmp_path):
    # how every torchrun script here ends (r3/dist.py, exit_now): no interpreter teardown runs, so no gloo
    # worker thread can be ended inside C++ while it still releases the last collective's work
    script = tmp_path / "end.py"
    script.write_text(END_OF_A_RUN)
    group = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(_free_port())}
    env = {k: v for k, v in ENV.items() if k not in group}
    with_group = subprocess.run([sys.executable, str(script)], env=env | group, capture_output=True, text=True,
                                timeout=120)
    assert (with_group.returncode, with_group.stdout) == (7, "sum 1\n"), with_group.stderr[-2000:]
    # without a process group it is a plain SystemExit: Python's teardown (the atexit handler) runs
    without = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert (without.returncode, without.stdout) == (7, "sum 1\npython teardown ran\n"), without.stderr[-2000:]


# ----------------------------------------------------------------------------- stopping

def test_a_stop_signal_raises_once_and_later_signals_are_ignored():
    from r3 import dist

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        dist.install_stop_handlers()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)  # what torchrun forwards to each worker
            time.sleep(10)
        assert time.monotonic() - t0 < 5
        # a second Ctrl-C, or torchrun's copy of a `kill` sent to one worker: the run is already ending, and
        # the `except` that prints its one line and exits must not be cut short
        try:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt as e:
            pytest.fail(f"a later signal raised KeyboardInterrupt({e}): it would cut short the run's ending")
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


PEER_GONE = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:58068: Connection reset "
             "by peer")


def _cli_ending_with(main, job, out: Path, monkeypatch):
    """train.cli with `main` replaced: what it raises, or the SystemExit it ends with (no process group here)."""
    import train

    monkeypatch.setattr(train, "main", main)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        train.cli(job(out)[1:])
    except BaseException as e:
        return e
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    pytest.fail("train.cli returned")


def test_a_peer_gone_without_a_stop_signal_is_not_an_interrupt(job, tmp_path, monkeypatch, capsys):
    # a rank whose peer crashed (or was killed alone) sees a collective fail: train.py must show that error,
    # not say "interrupted ... run the same command to resume" and exit 130
    def peer_gone(cfg):
        raise RuntimeError(PEER_GONE)

    e = _cli_ending_with(peer_gone, job, tmp_path / "run", monkeypatch)
    assert isinstance(e, RuntimeError) and str(e) == PEER_GONE, repr(e)
    assert "interrupted" not in capsys.readouterr().err


def test_an_error_after_a_stop_signal_is_the_interrupt(job, tmp_path, monkeypatch, capsys):
    # a signal that lands in a checkpoint save: DCP catches the KeyboardInterrupt (to hand it to every rank as a
    # CheckpointException), and a rank may then find its peer gone; the run still ends as interrupted
    def stopped_in_a_save(cfg):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except KeyboardInterrupt:
            pass
        raise RuntimeError(PEER_GONE)

    e = _cli_ending_with(stopped_in_a_save, job, tmp_path / "run", monkeypatch)
    err = capsys.readouterr().err
    assert isinstance(e, SystemExit) and e.code == 130, repr(e)
    assert err.startswith("interrupted after step 0; newest complete checkpoint: none;") and err.count("\n") == 1, err


def _newest_complete_checkpoint(out: Path) -> Path | None:
    done = sorted(p.parent for p in (out / "checkpoints").glob("step_*/done") if not p.parent.name.endswith(".tmp"))
    return done[-1] if done else None


def _load_checkpoint_without_train(ckpt: Path, tmp_path: Path) -> dict:
    """Read every tensor of a DCP checkpoint into one plain state dict (independent of train.py)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp_path / "ckpt.pt")
    return torch.load(tmp_path / "ckpt.pt", weights_only=False)


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "SIGINT to its process group"])
def test_signal_mid_run_stops_all_ranks_and_the_same_command_resumes(job, straight, tmp_path, how):
    out = tmp_path / "run"
    cmd = TORCHRUN + STANDALONE + job(out)
    proc = _start(cmd)
    deadline = time.monotonic() + 240
    # three rows (step 0's evaluation, steps 1 and 2): step 2 is done, so checkpoint 1 is complete; the signal
    # lands in step 3 or checkpoint 2
    while len(_metrics(out)) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(_tree(proc.pid))
            pytest.fail(f"no second metrics row (exit {proc.poll()}); stderr:\n{proc.communicate()[1][-4000:]}")
        time.sleep(0.05)
    pids = _tree(proc.pid)
    assert len(pids) >= 3, f"expected torchrun and 2 workers, found {sorted(pids)}"
    t0 = time.monotonic()
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # start_new_session: the group of torchrun, as a terminal's Ctrl-C
    rc, _, err = _finish(proc, timeout=60)
    while any(_alive(p) for p in pids) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    _kill(set(left))
    took = time.monotonic() - t0
    assert not left and took < 30, f"processes {left} still alive {took:.1f} s after {how}; stderr:\n{err[-4000:]}"
    assert rc != 0, "the run finished before the signal arrived: the test did not interrupt anything"

    ours = [ln for ln in err.splitlines() if "interrupted" in ln.lower()]
    assert len(ours) == 1, f"expected one line from train.py, got {ours}; stderr:\n{err[-4000:]}"
    for bad in ("KeyboardInterrupt", "terminate called", "Connection closed by peer", "Fatal Python error"):
        assert bad not in err, f"{bad!r} on stderr after {how}:\n{err[-4000:]}"
    # tracebacks: only torchrun's own (it re-raises the signal as SignalException), none from a worker
    assert err.count("Traceback (most recent call last)") == err.count("SignalException: Process"), err[-4000:]

    ckpt = _newest_complete_checkpoint(out)
    assert ckpt is not None and ckpt.name in ours[0], (ckpt, ours)
    state = _load_checkpoint_without_train(ckpt, tmp_path)
    tensors = [v for v in state["model"].values() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
    key = lambda rows: [(r["step"], r["reward"], r["loss"]) for r in rows if "reward" in r]  # noqa: E731
    done_rows = [r for r in _metrics(out) if "reward" in r]  # the training steps (not step 0's evaluation)
    assert 2 <= len(done_rows) < STEPS and key(done_rows) == key(straight[2][1: len(done_rows) + 1])

    rc, stdout, err = _run(cmd)  # the same command again
    _assert_clean(rc, err, f"the run resumed after {how}")
    assert ckpt.name in stdout + err, f"the second run did not say it resumed from {ckpt.name}"
    _assert_same_metrics(straight[2], _metrics(out), loss_tol=1e-6)


# ----------------------------------------------------------------------------- multi-node

@pytest.mark.slow
@needs_proc
def test_two_launchers_multi_node_give_the_losses_of_one_process(job, straight, tmp_path):
    out, port = tmp_path / "run", _free_port()
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id=r3-test-{port}"]
    node = lambda r: TORCHRUN + rdzv + [f"--node_rank={r}"] + job(out)  # noqa: E731
    procs = [_start(node(0)), _start(node(1))]  # started together, as on two machines
    try:
        results = [_finish(p, timeout=300) for p in procs]
    finally:
        for p in procs:
            _kill(_tree(p.pid))
    for r, (rc, _, err) in enumerate(results):
        _assert_clean(rc, err, f"launcher {r}")
    one = tmp_path / "one_process"
    rc, _, err = _run([sys.executable] + job(one))
    _assert_clean(rc, err, "one process")
    # global rank 0 alone writes files, though both ranks are local rank 0: metrics rows are not doubled
    _assert_same_metrics(_metrics(one), _metrics(out), loss_tol=1e-5)
    _assert_same_metrics(_metrics(one), straight[2], loss_tol=1e-5)
    assert (out / "final").is_dir()


# ----------------------------------------------------------------------------- ranks with different data

SKEWED = ["--task=toy_task:SkewedTask", "--train_examples=8", "--attempts=2", "--group_size=2", "--failures_per_step=2",
          "--eval_examples=8", "--eval_every=1", "--refresh_failures_every=1", "--max_reflection_tokens=4",
          "--max_attempt_tokens=4", "--threads=1", "--beta=0", "--save_every=1", "--steps=3"]


def _skewed(tiny_dir, out: Path) -> list[str]:
    return [str(ROOT / "train.py"), f"--model={tiny_dir}", f"--out_dir={out}", *SKEWED]


@pytest.mark.slow
def test_one_rank_all_right_the_other_all_wrong_finishes_with_the_counts_of_one_process(tiny_dir, tmp_path):
    # rank 0's queries and held-out examples all succeed, rank 1's all fail: only rank 1 reflects, in the
    # failure build, the online refresh and every evaluation; neither may wait for the other there
    rc, _, err = _run(TORCHRUN + STANDALONE + _skewed(tiny_dir, tmp_path / "two"), timeout=300)
    _assert_clean(rc, err, "the skewed 2-rank run")
    rc, _, err = _run([sys.executable, *_skewed(tiny_dir, tmp_path / "one")], timeout=300)
    _assert_clean(rc, err, "the skewed run in one process")
    keys = ("step", "eval_n", "eval_first", "eval_second", "refreshed_failures", "first_try", "reward")
    two, one = ([{k: r.get(k) for k in keys} for r in _metrics(tmp_path / d)] for d in ("two", "one"))
    assert two == one, (two, one)
    assert two[2] == {"step": 2, "eval_n": 8, "eval_first": 0.5, "eval_second": 0.5, "refreshed_failures": 4,
                               "first_try": 0.5, "reward": 0.0}, two
    assert (tmp_path / "two" / "failures.jsonl").read_text() == (tmp_path / "one" / "failures.jsonl").read_text()
    assert (tmp_path / "two" / "final" / "config.json").exists()


@pytest.mark.slow
@needs_proc
def test_a_rank_that_never_comes_ends_the_run_in_one_line_and_the_same_command_resumes(tiny_dir, tmp_path):
    # rank 1 hangs in the step-2 evaluation (toy_task.SkewedTask: TOY_HANG_RANK, after the 8 verdicts of its
    # step-0 evaluation): rank 0 waits in the evaluation's all-reduce until the process-group timeout, says
    # so in one line and ends the run
    cmd = TORCHRUN + STANDALONE + _skewed(tiny_dir, tmp_path / "run") + ["--eval_every=2", "--collective_timeout=20"]
    t0 = time.monotonic()
    rc, _, err = _run(cmd, timeout=240, env={"TOY_HANG_RANK": "1", "TOY_HANG_AFTER": "8"})
    ours = [ln for ln in err.splitlines() if ln.startswith(("error:", "interrupted"))]
    want = "error: rank 0 waited 20 s in all_reduce_sum (the evaluation's counts) for a rank that never joined"
    assert rc != 0 and ours == [ours[0]] and ours[0].startswith(want), err[-4000:]
    assert "newest complete checkpoint:" in ours[0] and "step_000001" in ours[0], ours
    assert time.monotonic() - t0 < 180
    rc, _, err = _run(cmd, timeout=300)  # the same command, nothing hangs now
    _assert_clean(rc, err, "the resumed run")
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [0, 1, 2, 3]
