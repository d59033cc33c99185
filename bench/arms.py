"""The arms experiment: R3 against the untrained model, plain GRPO, and R3 crediting reflection + retry.

    python bench/arms.py run                       # every missing run of the grid, one after another (hours on a CPU)
    python bench/arms.py run --only r3-s0          # one run
    python bench/arms.py report                    # the table (markdown) and the plot, from the committed files alone
    python bench/arms.py run --task=countdown2 --nproc=1 -- --lr=1e-5 --eval_every=7 --eval_examples=128
                                                   # the countdown2 grid's flags (each run.json holds its commands)

Every trained arm is train.py at the same budget: the same steps, G, learning rate and groups per step
(train.py's defaults, plus any flags given after `--`), on --task (the main job's unless given);
only `--method` and `--seed` differ, so the r3 arm at seed 0 is README's main job. Each trained model is then
scored by `sample.py eval` on the whole held-out split (greedy: a first try, and on failure one reflection and
one retry, docs/method.md section 7), and on the first --transfer_examples problems of --transfer's held-out
split (countdown2 by default: the clean two-number prompt), which tells whether a model learned to fix its
error or only its training prompt. The arms:
    untrained   the default model, eval only
    r3          --method=r3        the paper: GRPO on the reflection tokens only
    grpo        --method=grpo      plain GRPO: G first attempts per training query, loss on the attempt tokens
    r3_retry    --method=r3_retry  R3 whose loss also credits the retry tokens
What each run leaves under bench/arms/<task>/<arm>-s<seed>/ (small, committed): eval.jsonl (one row per
held-out problem: index, first, second, reflection length), transfer.jsonl (the same rows on --transfer),
metrics.jsonl (train.py's rows: per-step statistics and the periodic held-out evaluations that the plot
draws), run.json (commands, wall time, sampled tokens, machine). A run whose eval.jsonl exists is done and is
skipped; models and checkpoints stay under runs/arms/<task>/ (not committed). `--trained=DIR` takes a run
that train.py already made in DIR (e.g. README's main job) instead of training one anew: the run's train.py
command is given --out_dir=DIR, so train.py resumes there: it refuses a run made with other settings (its
own resume check, exit 2), finishes one that stopped early, and of a finished one only exports final/ again.

It does not: run arms in parallel (two CPU jobs on two cores distort both), or tune anything per arm.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r3.checkpoint import latest_checkpoint  # noqa: E402
from r3.evaluate import wilson  # noqa: E402
from r3.jsonl import read_jsonl, write_jsonl_atomic  # noqa: E402
from r3.tasks import DEFAULT_TASK  # noqa: E402

ARMS = ROOT / "bench" / "arms"  # one folder per task: bench/arms/<task>/<run>/
SEEDS = {"r3": [0, 1, 2], "grpo": [0, 1, 2], "r3_retry": [0, 1]}
GOAL_POINTS, GOAL_P = 15, 0.01  # what R3 should show over the untrained model on a task it can learn


def runs() -> list[tuple[str, str, int | None]]:
    """(name, arm, seed) of every run of the grid, untrained first."""
    return [("untrained", "untrained", None)] + [(f"{a}-s{s}", a, s) for a, seeds in SEEDS.items() for s in seeds]


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def sh(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        last = log.read_text(errors="replace").strip().splitlines()[-1:]  # e.g. train.py's one-line error
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {r.returncode}: {''.join(last)} (see {log})")


def train_command(arm: str, seed: int, work: Path, args) -> tuple[list[str], Path]:
    """The arm's train.py command and its output folder: `work`, or with --trained that run's folder (resumed in
    place: the module docstring)."""
    out = work
    if args.trained:
        out = Path(args.trained).resolve()
        if latest_checkpoint(out) is None:  # train.py would start a new run there
            sys.exit(f"error: --trained={out}: no train.py checkpoint there")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "train.py",
           f"--method={arm}", f"--seed={seed}", f"--out_dir={out}", f"--task={args.task}"] + args.extra
    return cmd, out


def scored(model: str, task: str, n: int, work: Path, name: str, args, commands: list) -> list[dict]:
    """`sample.py eval` of `model` on the first n problems of `task`'s held-out split -> per-problem rows."""
    out = work / f"{name}.json"
    ev = [sys.executable, "sample.py", "eval", f"--model={model}", f"--task={task}", f"--num_examples={n}",
          f"--out={out}", f"--threads={args.threads}"]
    sh(ev, work / "log.txt")
    commands.append(ev)
    return [{"i": i, "first": bool(r["first"]), "second": bool(r["second"]),
             "reflection_chars": len(r.get("reflection", ""))} for i, r in enumerate(json.loads(out.read_text())["rows"])]


def run_one(name: str, arm: str, seed: int | None, args) -> None:
    dest, work = ARMS / args.task / name, ROOT / "runs" / "arms" / args.task / name
    if (dest / "eval.jsonl").exists():
        print(f"{name}: done, skipped")
        return
    work.mkdir(parents=True, exist_ok=True)
    t0, commands, metrics, model, trained_in = time.time(), [], [], "default", None
    if arm != "untrained":
        train, out = train_command(arm, seed, work, args)
        sh(train, work / "log.txt")  # resumes by itself when a checkpoint is there
        commands.append(train)
        metrics, model = read_jsonl(out / "metrics.jsonl"), str(out / "final")
        trained_in = out if args.trained else None
    # the training's wall time; of a --trained run, train.py's own step and evaluation seconds (a lower bound)
    t_train = sum(m.get("step_s", 0) + m.get("eval_s", 0) for m in metrics) if trained_in else time.time() - t0
    t0 = time.time()
    rows = scored(model, args.task, 1_000_000, work, "eval", args, commands)
    transfer = args.transfer if args.transfer not in ("", args.task) else ""
    if transfer:
        transfer_rows = scored(model, transfer, args.transfer_examples, work, "transfer", args, commands)
    dest.mkdir(parents=True, exist_ok=True)
    if metrics:
        write_jsonl_atomic(dest / "metrics.jsonl", metrics)
    if transfer:
        write_jsonl_atomic(dest / "transfer.jsonl", transfer_rows)
    (dest / "run.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "task": args.task, "commands": [" ".join(c[1:]) for c in commands],
        "trained_in": str(trained_in) if trained_in else None, "train_s": round(t_train, 1),
        "wall_s": round(t_train + time.time() - t0, 1),
        "sampled_tokens": int(sum(m.get("sampled_tokens", 0) for m in metrics)),
        "transfer": {"task": transfer, "n": len(transfer_rows)} if transfer else None,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "n": len(rows)}, indent=1) + "\n")
    write_jsonl_atomic(dest / "eval.jsonl", rows)  # last: its presence marks the run done
    print(f"{name}: first {sum(r['first'] for r in rows)}/{len(rows)}, second {sum(r['second'] for r in rows)}/{len(rows)}")


# ----------------------------------------------------------------------------- report

def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired outcomes: (a right b wrong, a wrong b right, p)."""
    n10 = sum(x and not y for x, y in zip(a, b))
    n01 = sum(y and not x for x, y in zip(a, b))
    n, k = n10 + n01, min(n10, n01)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return n10, n01, p


def load(out: Path) -> dict:
    done = {}
    for name, arm, seed in runs():
        d = out / name
        if (d / "eval.jsonl").exists():
            done[name] = {"arm": arm, "seed": seed, "rows": read_jsonl(d / "eval.jsonl"),
                          "run": json.loads((d / "run.json").read_text()),
                          "metrics": read_jsonl(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else [],
                          "transfer": read_jsonl(d / "transfer.jsonl") if (d / "transfer.jsonl").exists() else []}
    return done


def pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def report(out: Path) -> None:
    """bench/arms/<task>/: its runs' files -> table.md and accuracy_vs_step.png there."""
    done = load(out)
    missing = [n for n, _, _ in runs() if n not in done]
    print(f"runs in: {len(done)} of {len(runs())}" + (f"; missing: {', '.join(missing)}" if missing else " (complete)"))
    lines = ["| run | n | 1st try % [95% CI] | +reflection 2nd try % [95% CI] | sampled tokens | wall |",
             "|---|---|---|---|---|---|"]
    for name, r in done.items():
        n = len(r["rows"])
        k1, k2 = sum(x["first"] for x in r["rows"]), sum(x["second"] for x in r["rows"])
        lines.append(f"| {name} | {n} | {pct(k1, n)} | {pct(k2, n)} | {r['run']['sampled_tokens']:,} | "
                     f"{r['run']['wall_s'] / 60:.0f} min |")
    lines += ["", "| arm | seeds | 1st try mean ± sd | 2nd try mean ± sd |", "|---|---|---|---|"]
    by_arm: dict[str, list] = {}
    for r in done.values():
        by_arm.setdefault(r["arm"], []).append(r)
    for arm, rs in by_arm.items():
        cells = []
        for key in ("first", "second"):
            acc = [100 * sum(x[key] for x in r["rows"]) / len(r["rows"]) for r in rs]
            mean = sum(acc) / len(acc)
            if len(acc) == 1:  # no spread to show from one run (the untrained model is deterministic)
                cells.append(f"{mean:.1f}")
                continue
            sd = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1))
            cells.append(f"{mean:.1f} ± {sd:.1f}")
        lines.append(f"| {arm} | {len(rs)} | {cells[0]} | {cells[1]} |")
    lines += ["", "Paired exact McNemar tests on the same problems (seed-matched; the untrained model against each seed):",
              "", "| comparison | try | A right, B wrong | A wrong, B right | p |", "|---|---|---|---|---|"]
    for a_arm, b_arm in (("r3", "untrained"), ("r3", "grpo"), ("r3", "r3_retry")):
        for ra in by_arm.get(a_arm, []):
            partners = by_arm.get(b_arm, [])
            rb = partners[0] if b_arm == "untrained" else next((r for r in partners if r["seed"] == ra["seed"]), None)
            if rb is None:
                continue
            for key in ("first", "second"):
                n10, n01, p = mcnemar([x[key] for x in ra["rows"]], [x[key] for x in rb["rows"]])
                b_name = b_arm if b_arm == "untrained" else f"{b_arm}-s{rb['seed']}"
                lines.append(f"| {a_arm}-s{ra['seed']} vs {b_name} "
                             f"| {key} | {n10} | {n01} | {p:.3g} |")
    lines += by_solution_ops(done)
    lines += transfer_table(done)
    lines += ["", "The paper's claims, at this scale (docs/method.md section 8):"] + claims(by_arm)
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    plot(by_arm, out / "accuracy_vs_step.png")


def transfer_table(done: dict) -> list[str]:
    """Each run on the transfer task (the first n problems of its held-out split), paired with the untrained
    model on the same problems. Empty where no run has transfer rows."""
    have = {name: r for name, r in done.items() if r["transfer"]}
    if not have:
        return []
    task = next(iter(have.values()))["run"]["transfer"]["task"]
    base = have.get("untrained")
    lines = ["", f"On `{task}` (the first problems of its held-out split; paired with the untrained model there):", "",
             "| run | n | 1st try % | 2nd try % | 2nd try vs untrained: A right B wrong / A wrong B right, p |",
             "|---|---|---|---|---|"]
    for name, r in have.items():
        t, n = r["transfer"], len(r["transfer"])
        cell = "-"
        if base is not None and name != "untrained" and len(base["transfer"]) == n:
            n10, n01, p = mcnemar([x["second"] for x in t], [x["second"] for x in base["transfer"]])
            cell = f"{n10} / {n01}, p={p:.3g}"
        lines.append(f"| {name} | {n} | {pct(sum(x['first'] for x in t), n)} | {pct(sum(x['second'] for x in t), n)} "
                     f"| {cell} |")
    return lines + by_solution_ops(done, "transfer", task)


def by_solution_ops(done: dict, rows: str = "rows", task: str | None = None) -> list[str]:
    """Right answers per kind of held-out problem, the kind being the operators of its reference solution
    (countdown2: sums and differences): what a run learned, beyond how much. `rows`: "rows" (the runs' own
    task, which they must all name) or "transfer" (`task`'s first problems). Empty where the task's held-out
    examples carry no `solution`, or a run's rows do not match them in number (row i = example i)."""
    if task is None:
        tasks = {r["run"].get("task") for r in done.values()}
        if len(tasks) != 1 or None in tasks:
            return []
        task = tasks.pop()
    from r3.tasks import get_task

    have = {name: r[rows] for name, r in done.items() if r[rows]}
    n = {len(x) for x in have.values()}
    examples = get_task(task).examples("test")[: max(n, default=0)]
    if len(n) != 1 or not all("solution" in e for e in examples) or len(examples) != n.pop():
        return []
    kind = [" ".join(sorted({c for c in e["solution"] if c in "+-*/"})) for e in examples]
    kinds = sorted(set(kind))
    lines = ["", f"Right answers on `{task}` by the operators of the reference solution (first try / second try, "
             "of the problems of that kind):",
             "", "| run | " + " | ".join(f"`{k}` ({kind.count(k)})" for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, r in have.items():
        cells = [f"{sum(x['first'] for x, c in zip(r, kind) if c == k)} / "
                 f"{sum(x['second'] for x, c in zip(r, kind) if c == k)}" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def claims(by_arm: dict) -> list[str]:
    """Each claim stated with the numbers that decide it, seen or not."""
    base, r3 = by_arm.get("untrained", []), by_arm.get("r3", [])
    if not base or not r3:
        return ["- not checked: the untrained run and at least one r3 run are needed"]

    def acc(r, key):
        return 100 * sum(x[key] for x in r["rows"]) / len(r["rows"])

    out, versus = [], {}  # key -> (untrained %, r3 seeds' %, their paired p-values against the untrained model)
    for key, what in (("first", "the first try improves although only reflections are rewarded"),
                      ("second", "the trained model's second try beats the untrained model's")):
        b, t = acc(base[0], key), [acc(r, key) for r in r3]
        p = [mcnemar([x[key] for x in r["rows"]], [x[key] for x in base[0]["rows"]])[2] for r in r3]
        versus[key] = b, t, p
        # "seen": every seed higher, each by a paired test at p < 0.05; higher without that is said as such
        verdict = ("NOT seen" if not all(x > b for x in t) else "seen" if all(q < 0.05 for q in p)
                   else "higher in every seed, but not significant (paired p >= 0.05)")
        out.append(f"- {what}: {verdict} (untrained {b:.1f}%, r3 seeds "
                   + ", ".join(f"{x:.1f}% (p={q:.2g})" for x, q in zip(t, p)) + ")")
    b2, t2, p2 = versus["second"]
    met = all(x >= b2 + GOAL_POINTS and q < GOAL_P for x, q in zip(t2, p2))
    out.append(f"- goal, R3's second try >= untrained + {GOAL_POINTS} points at paired p < {GOAL_P} in every seed: "
               f"{'met' if met else 'NOT met'} (" + ", ".join(f"{x - b2:+.1f} points, p={q:.2g}" for x, q in zip(t2, p2))
               + f"; {len(r3)} of {len(SEEDS['r3'])} seeds in)")
    lens = []
    for r in r3:
        rows = [m for m in r["metrics"] if "reflection_len" in m]
        k = max(1, len(rows) // 5)
        if rows:
            lens.append((sum(m["reflection_len"] for m in rows[:k]) / k, sum(m["reflection_len"] for m in rows[-k:]) / k))
    if lens:
        seen = all(b < a for a, b in lens)
        out.append(f"- reflections get shorter: {'seen' if seen else 'NOT seen'} (mean tokens, first vs last fifth of "
                   "the steps: " + ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in lens) + ")")
    return out


def plot(by_arm: dict, png: Path) -> None:
    """Held-out first- and second-try accuracy against training step: mean over seeds, seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = by_arm.get("untrained", [None])[0]
    # the periodic evaluations' size (train.py's --eval_examples; step 0 of a run, when it has one, is skipped)
    n_periodic = next((m["eval_n"] for rs in by_arm.values() for r in rs for m in r["metrics"] if "eval_n" in m),
                      len(base["rows"]) if base else 0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("eval_first", "eval_second"), ("1st try", "+reflection 2nd try")):
        for arm, rs in by_arm.items():
            if arm == "untrained":
                continue
            steps = sorted({m["step"] for r in rs for m in r["metrics"] if key in m and m["step"] > 0})
            per_step = [[m[key] for r in rs for m in r["metrics"] if m.get("step") == s and key in m] for s in steps]
            if base is not None:  # step 0: the untrained model on the same first n problems
                rows = base["rows"][:n_periodic]
                steps, per_step = [0] + steps, [[sum(x[key[5:]] for x in rows) / len(rows)]] + per_step
            mean = [100 * sum(v) / len(v) for v in per_step]
            style = ("-", "--", ":")[len(ax.lines) % 3]  # arms that reach the same points stay visible
            ax.plot(steps, mean, marker=".", linestyle=style, linewidth=2.5 - 0.5 * (len(ax.lines) % 3),
                    label=f"{arm} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
            ax.fill_between(steps, [100 * min(v) for v in per_step], [100 * max(v) for v in per_step], alpha=0.2)
        ax.set_title(f"held-out {title} (first {n_periodic} problems)")
        ax.set_xlabel("training step")
    lo, hi = axes[0].get_ylim()  # at least 10 points of axis: a 1-point change should look like one
    if hi - lo < 10:
        mid = (lo + hi) / 2
        axes[0].set_ylim(mid - 5, mid + 5)
    axes[0].set_ylabel("accuracy %")
    axes[0].legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    print(f"plot: {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", choices=["run", "report"])
    ap.add_argument("--only", default="", help="comma-separated run names (e.g. r3-s0,grpo-s0); default: all missing")
    ap.add_argument("--task", default=DEFAULT_TASK, help="the task every arm trains and is scored on "
                    "(default: README's main job's)")
    ap.add_argument("--transfer", default="countdown2", help="a second task every model is scored on, untrained "
                    "(\"\": none; skipped when it is --task)")
    ap.add_argument("--transfer_examples", type=int, default=128, help="problems of --transfer's held-out split")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun ranks per training run (2: README's main job; "
                    "the countdown2 grid ran with 1, one rank of 2 threads: 40.8 vs 61.0 s per step there)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the final evaluation")
    ap.add_argument("--trained", default="", help="with --only=ONE_RUN: the train.py run in this folder is this "
                    "run (train.py resumes it: its settings must be this run's)")
    ap.add_argument("extra", nargs="*", help="more train.py flags, the same for every arm (after --)")
    args = ap.parse_args()
    out = ARMS / args.task
    if args.job == "report":
        return report(out)
    only = set(filter(None, args.only.split(",")))
    if args.trained and len(only) != 1:
        sys.exit("error: --trained needs --only with one run name")
    for name, arm, seed in runs():
        if not only or name in only:
            run_one(name, arm, seed, args)
    report(out)


if __name__ == "__main__":
    main()
