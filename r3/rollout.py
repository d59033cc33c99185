"""Reflect -> retry: from failed first attempts to token ids, a reflection mask, rewards and group ids.

For each failure (example x, failed attempt y1), PAPER.md section 3:
    1. context   user(x) / assistant(y1) / user(reflection prompt)
    2. sample G reflections s_1..s_G (one prefill of the shared context, G samples: prefix sharing)
    3. extend    ... / assistant(s_i) / user(x asked again: the prompt's last turn), sample one retry y2_i each
    4. reward    r_i = task.verify(x, y2_i) in {0, 1}
The training sequence of sample i is the conversation up to and including assistant(s_i); its
reflection mask is 1 exactly on the span of that turn (content + end-of-turn token) as `render_chat`
reports it. Group g holds rows g*G .. g*G+G-1.

NOTE: the reflection is re-rendered from its decoded text, so its training tokens are the tokenizer's
canonical tokens for that text, which can differ from the sampled ids when BPE has several spellings
of a string. Old, reference and current log-probs are all computed on these same re-rendered tokens,
so the ratio and KL stay consistent; TRL instead keeps the sampled ids. A reflection cut off at
`max_reflection_tokens` still ends with the end-of-turn token the template adds.

It does not: compute log-probs or losses (grpo.py), or pick which failures to use (train.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r3.chat import end_of_turn_id, render_chat, render_prompt
from r3.sampler import generate


@dataclass
class Rollout:
    ids: torch.Tensor  # (N, T) int64, right-padded with the end-of-turn id
    pos: torch.Tensor  # (N, T) int64 positions 0..T-1
    mask: torch.Tensor  # (N, T) bool: 1 exactly on the reflection turn's tokens
    rewards: torch.Tensor  # (N,) float32 in {0, 1}
    group_ids: torch.Tensor  # (N,) int64: which failure each row reflects on
    texts: list[dict]  # per row: reflection, retry, reward (for logging)


def reflection_context(task, example: dict, attempt: str) -> list[dict]:
    """user(task) / assistant(failed attempt) / user(reflection prompt)."""
    return task.prompt(example) + [{"role": "assistant", "content": attempt},
                                   {"role": "user", "content": task.reflection_prompt}]


def _texts(tok, samples) -> list[str]:
    return [tok.decode(s.ids, skip_special_tokens=True) for s in samples]


def first_attempts(model, tok, task, examples: list[dict], n: int, max_new_tokens: int, temperature: float,
                   top_p: float = 1.0, seed: int = 0) -> list[str]:
    """n first attempts per example (prefix-shared), example-major."""
    prompts = [render_prompt(tok, task.prompt(ex)) for ex in examples]
    samples = generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=[end_of_turn_id(tok)], seed=seed)
    return _texts(tok, samples)


def reflect_and_retry(model, tok, task, failures: list[dict], group_size: int, max_reflection_tokens: int,
                      max_retry_tokens: int, temperature: float, retry_temperature: float, top_p: float = 1.0,
                      seed: int = 0) -> tuple[list[list[dict]], list[str], list[str], list[bool]]:
    """Steps 1-4 for failures [{example, attempt}, ...]. Returns per row (failure-major, G per failure):
    the conversation up to and including assistant(reflection), the reflection, the retry, and its reward."""
    stop = [end_of_turn_id(tok)]
    contexts = [reflection_context(task, f["example"], f["attempt"]) for f in failures]
    prompts = [render_prompt(tok, c) for c in contexts]
    reflections = _texts(tok, generate(model, prompts, n=group_size, max_new_tokens=max_reflection_tokens,
                                       temperature=temperature, top_p=top_p, stop_ids=stop, seed=seed))
    convs, retry_prompts = [], []
    for i, refl in enumerate(reflections):
        f = failures[i // group_size]
        conv = contexts[i // group_size] + [{"role": "assistant", "content": refl}]
        convs.append(conv)
        retry_prompts.append(render_prompt(tok, conv + task.prompt(f["example"])[-1:]))  # the question asked again
    retries = _texts(tok, generate(model, retry_prompts, n=1, max_new_tokens=max_retry_tokens,
                                   temperature=retry_temperature, top_p=top_p, stop_ids=stop, seed=seed + 1))
    rewards = [task.verify(failures[i // group_size]["example"], y2) for i, y2 in enumerate(retries)]
    return convs, reflections, retries, rewards


def build_batch(tok, convs: list[list[dict]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render each conversation; the last message is the reflection. -> ids, pos, mask, each (N, T)."""
    rendered = [render_chat(tok, c) for c in convs]
    T = max(r.spans[-1][1] for r in rendered)
    ids = torch.full((len(convs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(convs), T), dtype=torch.bool)
    for i, r in enumerate(rendered):
        start, end = r.spans[-1]  # the reflection turn: content + end-of-turn token
        ids[i, :end] = torch.tensor(r.ids[:end])
        mask[i, start:end] = True
    pos = torch.arange(T).expand(len(convs), T).contiguous()
    return ids, pos, mask


def rollout(model, tok, task, failures: list[dict], group_size: int, max_reflection_tokens: int, max_retry_tokens: int,
            temperature: float, retry_temperature: float, top_p: float = 1.0, seed: int = 0) -> Rollout:
    """Reflect -> retry -> reward for a batch of failures; see the module docstring."""
    convs, reflections, retries, rewards = reflect_and_retry(
        model, tok, task, failures, group_size, max_reflection_tokens, max_retry_tokens, temperature,
        retry_temperature, top_p, seed)
    ids, pos, mask = build_batch(tok, convs, pad_id=end_of_turn_id(tok))
    texts = [{"reflection": s, "retry": y, "reward": float(r)} for s, y, r in zip(reflections, retries, rewards)]
    return Rollout(ids=ids, pos=pos, mask=mask, rewards=torch.tensor(rewards, dtype=torch.float32),
                   group_ids=torch.arange(len(failures)).repeat_interleave(group_size), texts=texts)


def collect_failures(model, tok, task, examples: list[dict], attempts: int, max_per_example: int, max_new_tokens: int,
                     temperature: float, top_p: float = 1.0, seed: int = 0) -> tuple[list[dict], int]:
    """Sample `attempts` first attempts per example and keep the failed ones (at most `max_per_example`
    per example; 0 keeps all). Returns ([{task, example, attempt}], number of successful attempts)."""
    texts = first_attempts(model, tok, task, examples, attempts, max_new_tokens, temperature, top_p, seed)
    failures, successes = [], 0
    for j, ex in enumerate(examples):
        kept = 0
        for text in texts[j * attempts:(j + 1) * attempts]:
            if task.verify(ex, text):
                successes += 1
            elif max_per_example <= 0 or kept < max_per_example:
                failures.append({"task": task.name, "example": ex, "attempt": text})
                kept += 1
    return failures, successes


def two_tries(model, tok, task, examples: list[dict], max_new_tokens: int, max_reflection_tokens: int,
              temperature: float, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """The paper's evaluation protocol (PAPER.md section 7) per example: a first try; on failure, one
    reflection and one retry. temperature 0 is greedy. Returns per example {first, second, ...} where
    `second` is True when either try succeeded."""
    firsts = first_attempts(model, tok, task, examples, 1, max_new_tokens, temperature, top_p, seed)
    ok1 = [task.verify(ex, y) for ex, y in zip(examples, firsts)]
    failed = [{"example": ex, "attempt": y} for ex, y, ok in zip(examples, firsts, ok1) if not ok]
    retried = iter([])
    if failed:
        _, reflections, retries, rewards = reflect_and_retry(
            model, tok, task, failed, 1, max_reflection_tokens, max_new_tokens, temperature, temperature, top_p, seed + 7)
        retried = iter(zip(reflections, retries, rewards))
    out = []
    for y, ok in zip(firsts, ok1):
        row = {"first": ok, "second": ok, "attempt": y}
        if not ok:
            s, y2, r = next(retried)
            row.update(second=bool(r), reflection=s, retry=y2)
        out.append(row)
    return out
