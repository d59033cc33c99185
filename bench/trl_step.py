"""Benchmark: one R3 optimizer step in r3 (shared-prefix update, and per-row) against the same step in TRL's
GRPOTrainer, the paper's setup.

All sides get the same model (default SmolLM2-135M-Instruct, fp32, CPU), the same failures in the same
order, and the same group size, temperatures, top-p, reflection and retry lengths, learning rate (constant),
beta, clip, micro-batch and gradient clipping. Gradient checkpointing is off on every side.

  r3:  train.py's steps 1-9 at world size 1: `rollout` (G reflections per failure, prefix-shared; one retry
       after each, continuing its reflection's KV cache; task.verify), `group_advantages`, `update` (reference
       log-probs, micro-batched loss, clip, AdamW) with shared_prefix on, as train.py runs it (each group's
       context encoded once per forward), and glibc's malloc set to reuse freed memory as train.py sets it
       (r3/cpu.py; the TRL process keeps glibc's defaults).
       The update always runs; train.py skips it when every group has zero reward variance.
  r3_per_row: the same with shared_prefix off (every row forwarded whole): what the shared-prefix update saves.
  TRL: GRPOTrainer as the paper extended it (docs/method.md section 3): the dataset prompt is the reflection
       context user(task) / assistant(failed attempt) / user(reflection prompt), so the GRPO completion is
       the reflection and the loss covers only its tokens (TRL's completion mask); the reward function
       runs the retry with transformers' `generate` on the trainer's current policy (the conversation plus
       assistant(reflection) plus the task's last prompt turn, rendered by the chat template) and calls
       r3's task.verify. GRPOConfig is matched field by field in `trl_config`.

Each side runs in its own process, one after the other (r3, r3_per_row, TRL; TRL's with --trl_python, so
it may live in its own venv; see bench/setup_trl.sh), one warm-up step and then --steps timed steps. Per
optimizer step it reports wall seconds, split into generation (time inside the generate calls: reflections
and retries, each side's own sampler; r3 reports its own in `Rollout.sampling`, TRL's calls are timed
here) and the rest ("update": reference log-probs, TRL's tokenising/padding, forward/backward, optimizer;
r3's rendering of the rollout too); and the process's peak RSS (model,
reference model, optimizer state and everything else the process ever held). Memory of the update itself:
`update_peak_rss_mib`, the peak RSS of the step outside its generation (Linux's high-water mark VmHWM,
reset through /proc/self/clear_refs when generation ends, read when it next starts and at the step's end;
the maximum over the timed steps; r3's generation is its `rollout` call, TRL's each generate call), and
`update_rss_growth_mib`, that minus the RSS at the step's start.
Without --failures, the failures are built first by a separate process with r3's code (first attempts of
the default model).

    bash bench/setup_trl.sh                          # once: .venv-trl with trl 1.16.0
    python bench/trl_step.py [--failures=F.jsonl] [--steps=3] [--trl_python=.venv-trl/bin/python] [--json]

NOTE: TRL's fused LM head (trl/kernels/chunked_logprob.py) scores only the completion positions on CUDA/XPU
(Triton); on any other device, this CPU included, it projects every position of prompt + completion through
the LM head and masks afterwards, for the policy and the reference alike. That is part of what its "update"
time measures here; r3 selects the reflection positions before the LM head on every device.

NOTE: RSS counts what the allocator keeps, not what tensors hold: memory freed by generation stays resident
and the update reuses it, so `update_rss_growth_mib` is a lower bound of the update's activations (the same
on every side); without a writable /proc/self/clear_refs the update figures are null.

With --json the last line of stdout is one JSON object with the raw figures of each side,
`step_time_ratio` (TRL / r3, goal >= 3), `peak_rss_ratio` (r3 / TRL, goal <= 0.6), `update_speedup`
(r3_per_row update seconds / r3 update seconds, goal >= 2.5) and `update_rss_growth_ratio` (r3 /
r3_per_row, goal <= 1). The loss itself is cross-checked against TRL's in tests/test_trl_crosscheck.py.
Sampling differs between r3 and TRL (different samplers and RNG streams), so reflection and retry lengths
differ too: the generated tokens per step are reported next to the times. r3 and r3_per_row sample with
the same seeds; after the first update their policies differ by round-off, so their samples may too.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder is sys.path[0]; import r3 (and train.py's defaults) from the repository root instead.
sys.path[0] = str(ROOT)

from r3.errors import UserError  # noqa: E402
from r3.jsonl import read_failures, read_jsonl, write_jsonl_atomic  # noqa: E402
from r3.tasks import task_from_flags  # noqa: E402
from train import TrainConfig  # noqa: E402  (its defaults only: the training defaults are the benchmark's)

D = TrainConfig()
SIDES = ("r3", "r3_per_row", "trl")
GOALS = {"step_time_ratio": (">=", 3.0), "peak_rss_ratio": ("<=", 0.6), "update_speedup": (">=", 2.5),
         "update_rss_growth_ratio": ("<=", 1.0)}


# ----------------------------------------------------------------------------- shared by both sides

class Rss:
    """Peak resident memory of this process: whole, and per step outside the generate calls.

    Linux keeps one high-water mark (VmHWM, which getrusage's ru_maxrss reports too); writing 5 to
    /proc/self/clear_refs resets it to the current RSS. Every reading folds the mark into `peak` first, so
    the process peak survives the resets. Without a writable clear_refs, the step figures are None."""

    def __init__(self):
        self.peak, self.ok = 0.0, True
        self.reset()

    @staticmethod
    def status() -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) / 1024  # kB -> MiB
        return out

    def hwm(self) -> float:
        h = self.status()["VmHWM"]
        self.peak = max(self.peak, h)
        return h

    def reset(self) -> None:
        self.hwm()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.ok = False

    def step_begin(self) -> None:
        self.reset()
        self.base = self.step_peak = self.status()["VmRSS"]

    def generate_begin(self) -> None:  # the step's non-generate peak so far
        self.step_peak = max(self.step_peak, self.hwm())

    def generate_end(self) -> None:
        self.reset()

    def step_end(self) -> dict:
        self.step_peak = max(self.step_peak, self.hwm())
        ok = self.ok
        return {"update_peak_rss_mib": round(self.step_peak, 1) if ok else None,
                "update_rss_growth_mib": round(self.step_peak - self.base, 1) if ok else None}

    def peak_mib(self) -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        return round(max(self.peak, self.hwm(), ru), 1)


def summary(steps: list[dict]) -> dict:
    """Over the timed steps (the first step is the warm-up and is left out): means, and the maximum of the
    memory figures (*_mib)."""
    timed = steps[1:] or steps
    out = {}
    for k in timed[0]:
        vals = [s[k] for s in timed if isinstance(s[k], (int, float)) and not isinstance(s[k], bool)]
        if vals and len(vals) == len(timed):
            out[k] = round(max(vals), 1) if k.endswith("_mib") else round(sum(vals) / len(vals), 4)
    return out


def step_record(step_s: float, gen: list[tuple[str, float, int]], rewards: list[float]) -> dict:
    """One optimizer step: wall time, the generate calls it made [(kind, seconds, new tokens)], rewards."""
    rec = {"step_s": step_s}
    for kind in ("reflection", "retry"):
        rec[f"{kind}_gen_s"] = sum(s for k, s, _ in gen if k == kind)
        rec[f"{kind}_tokens"] = sum(n for k, _, n in gen if k == kind)
    rec["generation_s"] = rec["reflection_gen_s"] + rec["retry_gen_s"]
    rec["update_s"] = step_s - rec["generation_s"]
    rec["reward"] = sum(rewards) / max(1, len(rewards))
    return rec


def log_step(side: str, step: int, rec: dict) -> None:
    print(f"[{side}] step {step}{' (warm-up)' if step == 0 else ''}: {rec['step_s']:.1f} s (generation "
          f"{rec['generation_s']:.1f} s, update {rec['update_s']:.1f} s), reward {rec['reward']:.2f}",
          file=sys.stderr, flush=True)


def load_side(spec: dict, with_failures: bool = True):
    import torch
    from transformers import AutoTokenizer

    from r3.checkpoint import resolve_model

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model_dir = resolve_model(spec["model"])
    task = task_from_flags(spec["task"], spec["task_data"], spec["task_options"])
    failures = read_jsonl(spec["failures_path"]) if with_failures else []
    return model_dir, AutoTokenizer.from_pretrained(model_dir), task, failures


# ----------------------------------------------------------------------------- the r3 side

def run_r3(spec: dict, shared_prefix: bool = True) -> dict:
    """The r3 side; `shared_prefix` is update's switch (False: the "r3_per_row" side)."""
    import torch

    from r3.checkpoint import load_hf
    from r3.cpu import keep_freed_memory
    from r3.grpo import group_advantages, update
    from r3.rollout import rollout
    from r3.seeds import derive_seed

    keep_freed_memory()  # as train.py does at start (r3/cpu.py); TRL's side keeps glibc's defaults
    model_dir, tok, task, failures = load_side(spec)
    cfg = TrainConfig(**{k: spec[k] for k in TRAIN_FIELDS})
    policy = load_hf(model_dir, "cpu", torch.float32)
    ref = load_hf(model_dir, "cpu", torch.float32).requires_grad_(False) if cfg.beta > 0 else None
    # Constant learning rate: TRL's side runs lr_scheduler_type="constant" (train.py warms up linearly).
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    side, rss = "r3" if shared_prefix else "r3_per_row", Rss()
    steps, F = [], cfg.failures_per_step
    for step in range(spec["steps"] + 1):
        rss.step_begin()
        t0 = time.perf_counter()
        rss.generate_begin()
        with torch.no_grad():
            ro = rollout(policy, tok, task, failures[step * F:(step + 1) * F], group_size=cfg.group_size,
                         max_reflection_tokens=cfg.max_reflection_tokens, max_retry_tokens=cfg.max_attempt_tokens,
                         temperature=cfg.temperature, retry_temperature=cfg.retry_temperature, top_p=cfg.top_p,
                         seed=derive_seed(cfg.seed, "rollout", step + 1))
        rss.generate_end()
        t_rollout = time.perf_counter() - t0
        adv = group_advantages(ro.rewards, cfg.group_size, cfg.adv_scale)
        stats = update(policy, ref, ro.batch(adv), opt, micro_batch=cfg.micro_batch, ppo_epochs=cfg.ppo_epochs,
                       temperature=cfg.temperature, beta=cfg.beta, clip_eps=cfg.clip_eps, grad_clip=cfg.grad_clip,
                       group_size=cfg.group_size, shared_prefix=shared_prefix)
        gen = [(kind, ro.sampling[f"{kind}_s"], ro.sampling[f"{kind}_tokens"]) for kind in ("reflection", "retry")]
        rec = step_record(time.perf_counter() - t0, gen, ro.rewards.tolist())
        rec.update(rss.step_end(), rollout_s=t_rollout, loss=stats["loss"], grad_norm=stats["grad_norm"])
        steps.append(rec)
        log_step(side, step, rec)
    return {"steps": steps, **summary(steps), "peak_rss_mib": rss.peak_mib(), "shared_prefix": shared_prefix}


# ----------------------------------------------------------------------------- the TRL side

def trl_config(spec: dict, output_dir: str):
    """GRPOConfig matched to r3's TrainConfig, field by field."""
    from trl import GRPOConfig

    G, F, micro = spec["group_size"], spec["failures_per_step"], spec["micro_batch"]
    return GRPOConfig(
        output_dir=output_dir,
        model_init_kwargs={"dtype": "float32"},
        # one optimizer step = F failures x G reflections, in micro-batches of r3's size; steps_per_generation
        # defaults to gradient_accumulation_steps, so each step samples once, like r3
        per_device_train_batch_size=micro, gradient_accumulation_steps=F * G // micro, num_generations=G,
        max_steps=spec["steps"] + 1, shuffle_dataset=False,  # failures in file order, as r3 takes them
        # sampling of reflections (the retry is the reward function's, below)
        max_completion_length=spec["max_reflection_tokens"], temperature=spec["temperature"], top_p=spec["top_p"],
        top_k=0, use_vllm=False,
        # the objective: r3's grpo_loss (tests/test_trl_crosscheck.py proves the match)
        loss_type="dapo",  # token-level, normalised by the reflection tokens of the whole step (r3's num_tokens)
        scale_rewards="group", beta=spec["beta"], epsilon=spec["clip_eps"], num_iterations=1,
        use_bias_correction_kl=False,  # TRL >= 1.x default multiplies KL by the ratio; r3 and the paper's TRL do not
        mask_truncated_completions=False,  # r3 trains on reflections cut at max_reflection_tokens too
        # optimisation: torch AdamW like r3, constant lr, same clipping
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=spec["weight_decay"],
        optim="adamw_torch", max_grad_norm=spec["grad_clip"], seed=spec["seed"],
        # precision and memory: fp32 (GRPOConfig's default turns bf16 on: several times slower on this CPU), no
        # gradient checkpointing (TRL's default turns it on)
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0,
    )


def new_tokens(out, prompt_len: int, eos_ids: list[int]) -> int:
    """Tokens generated per row up to and including the first end-of-turn (the rest is padding)."""
    import torch

    gen = out[:, prompt_len:]
    is_eos = torch.isin(gen, torch.tensor(eos_ids))
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, gen.shape[1])
    return int(lengths.sum())


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from r3.rollout import reflection_context, render_prompt

    model_dir, tok, task, failures = load_side(spec)
    rows = [{"prompt": reflection_context(task, f["example"], f["attempt"]), "example": json.dumps(f["example"])}
            for f in failures]
    gen, rewards, box = [], [], {}  # generate calls of this step, rewards of this step, the trainer
    rss = Rss()

    def retry_reward(prompts, completions, example, **kwargs):
        """The paper's reward: retry after the reflection, verify. One batched generate for all retries."""
        model = box["trainer"].model
        convs = [p + c + task.prompt(json.loads(e))[-1:] for p, c, e in zip(prompts, completions, example)]
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        sampling = dict(do_sample=True, temperature=spec["retry_temperature"], top_p=spec["top_p"], top_k=0) \
            if spec["retry_temperature"] > 0 else dict(do_sample=False)
        box["kind"] = "retry"
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=spec["max_attempt_tokens"], pad_token_id=tok.pad_token_id,
                                 eos_token_id=box["trainer"].eos_token_ids, **sampling)
        box["kind"] = "reflection"
        retries = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        r = [float(task.verify(json.loads(e), y)) for e, y in zip(example, retries)]
        rewards.extend(r)
        return r

    trainer = GRPOTrainer(model=model_dir, reward_funcs=retry_reward, args=trl_config(spec, spec["work_dir"] + "/trl"),
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    box.update(trainer=trainer, kind="reflection")
    hf_generate = trainer.model.generate  # TRL samples reflections with this same bound method: time every call

    def timed_generate(*args, **kwargs):
        rss.generate_begin()
        t = time.perf_counter()
        out = hf_generate(*args, **kwargs)
        n = new_tokens(out, kwargs["input_ids"].shape[1], trainer.eos_token_ids)
        gen.append((box["kind"], time.perf_counter() - t, n))
        rss.generate_end()
        return out

    trainer.model.generate = timed_generate
    steps = []

    class StepTimer(TrainerCallback):  # on_step_begin .. on_step_end spans one optimizer step, generation included
        def on_step_begin(self, args, state, control, **kwargs):
            gen.clear()
            rewards.clear()
            rss.step_begin()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(step_record(time.perf_counter() - self.t0, gen, rewards) | rss.step_end())
            log_step("trl", len(steps) - 1, steps[-1])

    trainer.add_callback(StepTimer())
    # TRL renders conversational prompts itself: check its token ids equal r3's rendering of the same contexts
    trl_ids = trainer._tokenize_prompts([r["prompt"] for r in rows[: spec["failures_per_step"]]])[0]
    template_match = all(list(a) == render_prompt(tok, r["prompt"]) for a, r in zip(trl_ids, rows))
    trainer.train()
    return {"steps": steps, **summary(steps), "peak_rss_mib": rss.peak_mib(),
            "chat_template_match": template_match, "trl_version": __import__("trl").__version__,
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


# ----------------------------------------------------------------------------- failures

def build_failures(spec: dict) -> dict:
    """First attempts of the policy on training queries; keep one failure per query (r3's own code)."""
    import torch

    from r3.checkpoint import load_hf
    from r3.rollout import collect_failures
    from r3.seeds import derive_seed

    model_dir, tok, task, _ = load_side(spec, with_failures=False)
    model = load_hf(model_dir, "cpu", torch.float32)
    need = (spec["steps"] + 1) * spec["failures_per_step"]
    with torch.no_grad():
        fails, ok = collect_failures(model, tok, task, task.examples("train")[: need + 8], attempts=4,
                                     max_per_example=1, max_new_tokens=spec["max_attempt_tokens"], temperature=spec["temperature"],
                                     top_p=spec["top_p"], seed=derive_seed(spec["seed"], "failures", 0))
    write_jsonl_atomic(spec["failures_path"], fails)
    return {"failures": len(fails), "successes": ok}


# ----------------------------------------------------------------------------- the parent

TRAIN_FIELDS = ("group_size", "failures_per_step", "temperature", "retry_temperature", "top_p", "max_attempt_tokens",
                "max_reflection_tokens", "lr", "weight_decay", "grad_clip", "micro_batch", "beta", "clip_eps", "seed")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=D.model, help="'default' or an HF model directory")
    ap.add_argument("--task", default=D.task)
    ap.add_argument("--task_data", default=D.task_data)
    ap.add_argument("--task_options", default=D.task_options)
    ap.add_argument("--failures", default="", help="failures JSONL from `sample.py failures`; empty: build them")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    for f in TRAIN_FIELDS:
        ap.add_argument(f"--{f}", type=type(getattr(D, f)), default=getattr(D, f), help="as in train.py")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    ap.add_argument("--trl_python", default="", help="interpreter with trl (default: this one if it has trl, "
                    "else .venv-trl/bin/python)")
    ap.add_argument("--only", choices=SIDES, default=None, help="run one side only")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--side", choices=SIDES + ("failures",), default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def trl_interpreter(args) -> str:
    if args.trl_python:
        return args.trl_python
    if importlib.util.find_spec("trl") is not None:
        return sys.executable
    venv = ROOT / ".venv-trl" / "bin" / "python"
    if venv.exists():
        return str(venv)
    sys.exit("error: trl is not importable here and .venv-trl does not exist: run `bash bench/setup_trl.sh` "
             "(or pass --trl_python=PATH to an interpreter with trl)")


def select_failures(path: str, spec: dict) -> list[dict]:
    """The failures both sides use, in order: (steps + 1) x failures_per_step rows, the file cycled if short."""
    if not Path(path).is_file():
        sys.exit(f"error: failures file {path} not found (make one with `python sample.py failures --out=FILE`, "
                 "or leave --failures out to build them here)")
    try:  # each row checked: {example, attempt}, this task, an example the task can prompt; errors name the line
        rows = read_failures(path, task_from_flags(spec["task"], spec["task_data"], spec["task_options"]))
    except UserError as e:
        sys.exit(f"error: {e}")
    if not rows:
        sys.exit(f"error: {path} holds no failures")
    need = (spec["steps"] + 1) * spec["failures_per_step"]
    return [rows[i % len(rows)] for i in range(need)]


def run_child(python: str, side: str, spec_path: Path, work: Path) -> dict:
    result = work / f"{side}.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, str(Path(__file__).resolve()), f"--side={side}", f"--spec={spec_path}", f"--result={result}"]
    t = time.time()
    # The children's output goes to stderr: stdout stays the report (and the JSON line).
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=sys.stderr)
    if proc.returncode != 0 or not result.exists():
        sys.exit(f"error: the {side} side failed (exit {proc.returncode}); its output is above. "
                 f"Command: {' '.join(cmd)}")
    out = json.loads(result.read_text())
    out["process_s"] = round(time.time() - t, 1)
    return out


def ratios(res: dict) -> dict:
    """The headline ratios of the sides that ran (see the module docstring), rounded."""
    r3, per_row, trl = res.get("r3"), res.get("r3_per_row"), res.get("trl")
    out = {}
    if r3 and trl:
        out.update(step_time_ratio=trl["step_s"] / r3["step_s"], generation_time_ratio=trl["generation_s"] /
                   r3["generation_s"], update_time_ratio=trl["update_s"] / r3["update_s"],
                   peak_rss_ratio=r3["peak_rss_mib"] / trl["peak_rss_mib"])
    if r3 and per_row:
        out.update(update_speedup=per_row["update_s"] / r3["update_s"],
                   step_time_ratio_per_row=per_row["step_s"] / r3["step_s"])
        if r3.get("update_rss_growth_mib") is not None and per_row.get("update_rss_growth_mib"):
            out["update_rss_growth_ratio"] = r3["update_rss_growth_mib"] / per_row["update_rss_growth_mib"]
    return {k: round(v, 3) for k, v in out.items()}


def report(res: dict, spec: dict) -> dict:
    rows = [("step (s)", "step_s"), ("  generation (s)", "generation_s"), ("    reflections (s)", "reflection_gen_s"),
            ("    retries (s)", "retry_gen_s"), ("  update and rest (s)", "update_s"),
            ("reflection tokens / step", "reflection_tokens"), ("retry tokens / step", "retry_tokens"),
            ("mean reward", "reward"), ("peak RSS (MiB)", "peak_rss_mib"),
            ("update peak RSS (MiB)", "update_peak_rss_mib"), ("update RSS growth (MiB)", "update_rss_growth_mib")]
    print(f"\n{spec['failures_per_step']} failures x G={spec['group_size']} per optimizer step, micro-batch "
          f"{spec['micro_batch']}, fp32, CPU; means over {spec['steps']} steps after 1 warm-up (memory: maximum); "
          f"gradient checkpointing off on every side; r3: shared-prefix update, r3_per_row: per-row update")
    print(f"{'':26s}{'r3':>10s}{'r3_per_row':>12s}{'TRL':>10s}{'TRL / r3':>10s}")
    r3, trl = res.get("r3") or {}, res.get("trl") or {}
    for label, k in rows:
        a, m, b = r3.get(k), (res.get("r3_per_row") or {}).get(k), trl.get(k)
        ratio = f"{b / a:10.2f}" if a and b else ""
        print(f"{label:26s}{a if a is not None else '':>10}{m if m is not None else '':>12}"
              f"{b if b is not None else '':>10}{ratio}")
    out = {"config": spec, **{side: res.get(side) for side in SIDES}, **ratios(res),
           "goals": {k: f"{op} {v}" for k, (op, v) in GOALS.items()}}
    for k, (op, goal) in GOALS.items():
        if k in out:
            met = out[k] >= goal if op == ">=" else out[k] <= goal
            print(f"{k} {out[k]} (goal {op} {goal}: {'met' if met else 'NOT met'})")
    if trl:
        print(f"TRL {trl['trl_version']}: its chat-template rendering of the prompts equals r3's: "
              f"{trl['chat_template_match']}")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side:  # a child process: run one side, write its JSON
        spec = json.loads(Path(args.spec).read_text())
        fn = {"r3": run_r3, "r3_per_row": lambda spec: run_r3(spec, shared_prefix=False), "trl": run_trl,
              "failures": build_failures}[args.side]
        Path(args.result).write_text(json.dumps(fn(spec)))
        return
    if (args.failures_per_step * args.group_size) % args.micro_batch:
        sys.exit(f"error: --micro_batch={args.micro_batch} must divide failures_per_step x group_size "
                 f"({args.failures_per_step * args.group_size}): TRL accumulates whole micro-batches")
    spec = {k: v for k, v in vars(args).items() if k not in ("side", "spec", "result", "json", "only", "trl_python")}
    with tempfile.TemporaryDirectory(prefix="r3-trl-bench-") as work:
        work = Path(work)
        spec.update(work_dir=str(work), failures_path=str(work / "failures.jsonl"))
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        if not args.failures:
            print("building failures with r3 (first attempts of the model) ...", file=sys.stderr, flush=True)
            built = run_child(sys.executable, "failures", spec_path, work)
            print(f"  {built['failures']} failures ({built['successes']} successful attempts) in "
                  f"{built['process_s']} s", file=sys.stderr, flush=True)
        rows = select_failures(args.failures or spec["failures_path"], spec)
        write_jsonl_atomic(spec["failures_path"], rows)
        pythons = {"r3": sys.executable, "r3_per_row": sys.executable,
                   "trl": trl_interpreter(args) if args.only in (None, "trl") else ""}
        res = {side: run_child(pythons[side], side, spec_path, work) for side in SIDES if args.only in (None, side)}
    out = report(res, spec | {"work_dir": None, "failures_path": args.failures or None})
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
