"""bench/arms.py (the arms experiment): the report is rebuilt from the committed per-run files alone.

Proves: the exact McNemar p-value equals a brute-force sum over all outcomes of the discordant pairs; the
report reads synthetic runs (eval.jsonl, metrics.jsonl, run.json) from a folder, names the runs that are
missing, pairs each r3 seed with the same GRPO seed, states the paper's claims with their numbers, and
writes table.md and the accuracy-against-step plot; it counts right answers per kind of problem (the
operators of the reference solution) as the task's held-out examples say; it pairs each run's transfer rows
with the untrained model's; `--trained` accepts a finished train.py run only when its saved config is the
run's own.
"""
import itertools
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import arms  # noqa: E402


@pytest.mark.parametrize("n10, n01", [(0, 0), (3, 0), (5, 2), (7, 7), (1, 12)])
def test_mcnemar_equals_brute_force_over_discordant_outcomes(n10, n01):
    a = [True] * n10 + [False] * n01 + [True, False]  # one concordant pair of each kind
    b = [False] * n10 + [True] * n01 + [True, False]
    got10, got01, p = arms.mcnemar(a, b)
    n = n10 + n01
    # two-sided: the probability, under a fair coin per discordant pair, of a split at least as uneven
    outcomes = list(itertools.product([0, 1], repeat=n))
    extreme = sum(1 for o in outcomes if min(sum(o), n - sum(o)) <= min(n10, n01))
    assert (got10, got01) == (n10, n01)
    assert p == pytest.approx(min(1.0, extreme / 2**n) if n else 1.0)


def _run(root: Path, name: str, firsts: list[bool], seconds: list[bool], steps=(7, 14)):
    d = root / name
    d.mkdir(parents=True)
    d.joinpath("eval.jsonl").write_text("".join(json.dumps({"i": i, "first": f, "second": s, "reflection_chars": 5})
                                                + "\n" for i, (f, s) in enumerate(zip(firsts, seconds))))
    rows = [{"step": s, "reflection_len": 60 - s, "eval_first": 0.1 * k, "eval_second": 0.1 * k + 0.05}
            for k, s in enumerate(steps, 1)]
    d.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d.joinpath("run.json").write_text(json.dumps({"sampled_tokens": 1000, "wall_s": 600.0}))


def test_report_rebuilds_table_claims_and_plot_from_the_run_files(tmp_path, monkeypatch, capsys):
    n = 20
    _run(tmp_path, "untrained", [i < 2 for i in range(n)], [i < 3 for i in range(n)])
    for seed in (0, 1):
        _run(tmp_path, f"r3-s{seed}", [i < 8 + seed for i in range(n)], [i < 10 for i in range(n)])
    _run(tmp_path, "grpo-s0", [i < 6 for i in range(n)], [i < 6 for i in range(n)])
    arms.report(tmp_path)
    out = capsys.readouterr().out
    assert "runs in: 4 of 9; missing: r3-s2, grpo-s1, grpo-s2, r3_retry-s0, r3_retry-s1" in out
    assert "| r3-s0 vs grpo-s0 | first | 2 | 0 |" in out  # r3-s0 right on problems 6-7, grpo-s0 wrong there
    assert "| r3-s1 vs untrained | first | 7 | 0 |" in out
    assert "r3-s1 vs grpo" not in out  # no grpo-s1 yet: no pairing across seeds
    assert "the first try improves although only reflections are rewarded: seen" in out
    assert "reflections get shorter: seen" in out
    # 7 of 7 discordant pairs one way: p = 2 / 2**7 = 0.016, above the goal's 0.01 although 35 points higher
    assert ("goal, R3's second try >= untrained + 15 points at paired p < 0.01 in every seed: NOT met "
            "(+35.0 points, p=0.016, +35.0 points, p=0.016; 2 of 3 seeds in)") in out
    assert (tmp_path / "table.md").read_text().startswith("| run |")
    # three more right answers out of 20 is higher, but a paired test cannot tell it from chance
    for seed in (0, 1):
        _run(tmp_path / "weak", f"r3-s{seed}", [i < 5 for i in range(n)], [i < 6 for i in range(n)])
    _run(tmp_path / "weak", "untrained", [i < 2 for i in range(n)], [i < 3 for i in range(n)])
    arms.report(tmp_path / "weak")
    assert "the first try improves although only reflections are rewarded: higher in every seed, but not " \
        "significant (paired p >= 0.05) (untrained 10.0%, r3 seeds 25.0% (p=0.25), 25.0% (p=0.25))" in \
        capsys.readouterr().out
    assert (tmp_path / "accuracy_vs_step.png").stat().st_size > 0


def test_report_pairs_each_runs_transfer_rows_with_the_untrained_models(tmp_path, capsys):
    n = 10
    for name, seconds in (("untrained", [i < 2 for i in range(n)]), ("r3-s0", [i < 7 for i in range(n)])):
        _run(tmp_path, name, [False] * n, [False] * n)
        rows = [{"i": i, "first": False, "second": s, "reflection_chars": 5} for i, s in enumerate(seconds)]
        (tmp_path / name / "transfer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / name / "run.json").write_text(json.dumps({"sampled_tokens": 0, "wall_s": 1.0,
                                                              "transfer": {"task": "countdown2", "n": n}}))
    arms.report(tmp_path)
    out = capsys.readouterr().out
    assert "On `countdown2`" in out
    p = arms.mcnemar([i < 7 for i in range(n)], [i < 2 for i in range(n)])[2]
    assert f"| r3-s0 | 10 | 0.0 [0.0, 27.8] | 70.0 [39.7, 89.2] | 5 / 0, p={p:.3g} |" in out


def test_trained_run_is_resumed_in_place_by_train_py_with_the_arms_own_flags(tmp_path):
    """--trained=DIR runs the arm's own train.py command with --out_dir=DIR (train.py's resume check then refuses
    other settings: tests/test_train.py); a DIR without a checkpoint is refused before anything runs."""
    class Args:
        task, extra, nproc, trained = "countdown_easy_sum3shot", ["--lr=1e-5"], 2, ""

    cmd, out = arms.train_command("r3", 1, tmp_path / "work", Args)
    assert out == tmp_path / "work" and cmd[-6:] == ["train.py", "--method=r3", "--seed=1", f"--out_dir={out}",
                                                     "--task=countdown_easy_sum3shot", "--lr=1e-5"]
    assert "--nproc_per_node=2" in cmd
    run = tmp_path / "main_job"
    Args.trained = str(run)
    with pytest.raises(SystemExit, match="no train.py checkpoint"):
        arms.train_command("r3", 1, tmp_path / "work", Args)
    ckpt = run / "checkpoints" / "step_000028"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "done").write_text("")
    cmd, out = arms.train_command("r3", 1, tmp_path / "work", Args)
    assert out == run.resolve() and f"--out_dir={run.resolve()}" in cmd and "--seed=1" in cmd


def test_a_failed_command_ends_with_its_last_line(tmp_path):
    """What train.py prints when it refuses (one `error:` line) reaches the user, not only the log."""
    with pytest.raises(SystemExit, match="exited 2: error: cannot resume from the checkpoint"):
        arms.sh([sys.executable, "-c", "print('error: cannot resume from the checkpoint'); raise SystemExit(2)"],
                tmp_path / "log.txt")


def test_report_counts_right_answers_per_kind_of_problem_as_the_task_says(tmp_path, monkeypatch, capsys):
    from r3.tasks import get_task

    examples = get_task("countdown2").examples("test")
    is_sum = ["+" in e["solution"] for e in examples]
    n_sum = sum(is_sum)  # counted here from the examples, independently of the report
    # a model that always answers the sum: right on every sum problem, never on a difference one
    _run(tmp_path, "untrained", is_sum, is_sum)
    _run(tmp_path, "r3-s0", is_sum, [True] * len(examples))  # and its second try fixes everything
    for name in ("untrained", "r3-s0"):
        (tmp_path / name / "run.json").write_text(json.dumps({"sampled_tokens": 0, "wall_s": 1.0, "task": "countdown2"}))
    arms.report(tmp_path)
    out = capsys.readouterr().out
    assert f"| run | `+` ({n_sum}) | `-` ({len(examples) - n_sum}) |" in out
    assert f"| untrained | {n_sum} / {n_sum} | 0 / 0 |" in out
    assert f"| r3-s0 | {n_sum} / {n_sum} | 0 / {len(examples) - n_sum} |" in out
