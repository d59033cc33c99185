"""Rollouts: sampled token ids -> training rows (ids, pos, mask), binary rewards and group ids.

`rollout(..., method="r3")`, the paper (docs/method.md section 3); for each failure (example x, failed attempt y1):
    1. context   user(x) / assistant(y1) / user(reflection prompt), the task's one-shot pair first if it has one
    2. sample G reflections s_1..s_G (one prefill of the shared context, G samples: prefix sharing)
    3. extend    ... / assistant(s_i) / user(x asked again: the prompt's last turn), sample one retry y2_i each
    4. reward    r_i = task.verify(x, y2_i) in {0, 1}
    row i = the context's prompt ids (ending with the assistant header) + s_i's sampled ids + end-of-turn;
    mask  = 1 exactly on s_i's sampled ids and that end-of-turn token.
`rollout(..., method="r3_retry")` (our variant, credits the retry too): the same samples; row i goes on
    with the re-asked question turn + the assistant header + y2_i's sampled ids + end-of-turn, and the
    mask also covers y2_i's ids and its end-of-turn (never the re-asked question or a role header).
`grpo_rollout` (plain GRPO, no reflection): G first attempts per query, r_i = task.verify(x, y_i);
    row i = the task prompt's ids + y_i's sampled ids + end-of-turn; mask on y_i's ids + end-of-turn.
In all three, group g is rows g*G .. g*G+G-1, and its rows share exactly the same tokens before their
first masked token (the rendered context or prompt), which a shared-prefix update may rely on.

Exact tokens: what is trained is the ids the sampler returned, never a re-tokenisation of their decoded
text (BPE has several spellings of many strings, so the two can differ); TRL trains on the sampled ids
too. Only the prompt parts are rendered by the chat template (r3/chat.py). The retry is sampled after
context ids + s_i's ids + end-of-turn + the rendered re-asked turn, the very ids "r3_retry" trains on;
it continues the reflection call's KV cache (r3/sampler.py, keep= / resume=), so only the end-of-turn
and the re-asked turn are prefilled for it.
A sample's stop token is dropped and one end-of-turn id appended: for a sample that stopped that is the
token it sampled. NOTE: a sample cut off at its max_new_tokens also gets an end-of-turn it never
sampled, and it is trained (TRL leaves a truncated completion without one).

Seeds: item i of a call (a failure, a query) draws from streams derived from (seed, first + i) alone
(r3/sampler.py); train.py passes `first` = the index of its first item in the step's global batch, so
N ranks, each with a slice, sample what one process does with the whole batch.

`two_tries` (the paper's evaluation) and `collect_failures` work on text and are unchanged: the
evaluation's retry prompt is rendered from the decoded reflection, so its numbers stay comparable.

It does not: compute log-probs or losses (grpo.py), or pick which failures or queries to use (train.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r3.chat import end_of_turn_id, render_chat, render_prompt
from r3.sampler import KeptCache, Sample, derive_seed, generate

METHODS = ("r3", "r3_retry")  # rollout's methods; plain GRPO is grpo_rollout (it starts from queries, not failures)


@dataclass
class Rollout:
    ids: torch.Tensor  # (N, T) int64, right-padded with the end-of-turn id
    pos: torch.Tensor  # (N, T) int64 positions 0..T-1
    mask: torch.Tensor  # (N, T) bool: 1 exactly on the trained sampled tokens (+ their end-of-turn ids)
    rewards: torch.Tensor  # (N,) float32 in {0, 1}
    group_ids: torch.Tensor  # (N,) int64: which failure (or query) each row belongs to
    texts: list[dict]  # per row, for logging: reflection, retry, reward (grpo_rollout: attempt, reward)
    sampled_tokens: int = 0  # tokens the sampler generated for this batch (reflections + retries, or attempts)


def reflection_context(task, example: dict, attempt: str) -> list[dict]:
    """user(task) / assistant(failed attempt) / user(reflection prompt)."""
    return task.prompt(example) + [{"role": "assistant", "content": attempt},
                                   {"role": "user", "content": task.reflection_prompt}]


def _texts(tok, samples) -> list[str]:
    return [tok.decode(s.ids, skip_special_tokens=True) for s in samples]


def _turn(s: Sample, eot: int) -> list[int]:
    """A sampled assistant turn as trained: its ids without the stop token, then end-of-turn."""
    return (s.ids[:-1] if s.finish_reason == "stop" else s.ids) + [eot]


def _text_retry_prompt(tok, context: list[dict], reflection: str, question: dict) -> list[int]:
    """The retry's prompt rendered from a reflection's text: context / assistant(reflection) / the question."""
    return render_prompt(tok, context + [{"role": "assistant", "content": reflection}, question])


def _reask_ids(tok, context: list[dict], question: dict) -> list[int]:
    """The ids the template puts after the reflection's end-of-turn: the question asked again as a user
    turn, then the assistant header. Rendered once per failure around a placeholder reflection: special
    tokens split the text before BPE, so these ids do not depend on the reflection's content."""
    r = render_chat(tok, context + [{"role": "assistant", "content": "."}, question], add_generation_prompt=True)
    return r.ids[r.spans[-2][1]:]


def pack_rows(rows: list[list[tuple[list[int], bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows given as segments [(token ids, trained?), ...] -> ids, pos, mask, each (N, T): the segments
    concatenated and right-padded with pad_id; mask 1 on the tokens of trained segments, 0 elsewhere."""
    flat = [[t for seg, _ in row for t in seg] for row in rows]
    T = max(map(len, flat))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (row, f) in enumerate(zip(rows, flat)):
        ids[i, :len(f)] = torch.tensor(f, dtype=torch.long)
        at = 0
        for seg, trained in row:
            mask[i, at:at + len(seg)] = trained
            at += len(seg)
    pos = torch.arange(T).expand(len(rows), T).contiguous()
    return ids, pos, mask


def build_batch(tok, convs: list[list[dict]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows for reflections given as text rather than sampled (tests, benches), in `rollout`'s layout: the
    last message of each conversation is the reflection; row = the conversation before it rendered with
    the assistant header + the reflection's text tokenised on its own + end-of-turn, mask on the last two.
    -> ids, pos, mask, each (N, T)."""
    eot = end_of_turn_id(tok)
    return pack_rows([[(render_prompt(tok, c[:-1]), False),
                       (tok.encode(c[-1]["content"], add_special_tokens=False) + [eot], True)] for c in convs], pad_id)


def _first_samples(model, tok, task, examples: list[dict], n: int, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, first: int = 0) -> tuple[list[list[int]], list[Sample]]:
    """The task prompts' ids and n first attempts per example (prefix-shared), example-major."""
    prompts = [render_prompt(tok, task.prompt(ex)) for ex in examples]
    return prompts, generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, stop_ids=[end_of_turn_id(tok)], seed=item_seeds(seed, first, len(prompts)))


def item_seeds(seed: int, first: int, count: int) -> list[int]:
    """The seeds of items first .. first + count - 1 of a batch seeded by `seed` (see the module docstring)."""
    return [derive_seed(seed, first + i) for i in range(count)]


def first_attempts(model, tok, task, examples: list[dict], n: int, max_new_tokens: int, temperature: float,
                   top_p: float = 1.0, seed: int = 0, first: int = 0) -> list[str]:
    """n first attempts per example (prefix-shared), example-major, as text."""
    return _texts(tok, _first_samples(model, tok, task, examples, n, max_new_tokens, temperature, top_p, seed,
                                      first)[1])


def reflect_and_retry(model, tok, task, failures: list[dict], group_size: int, max_reflection_tokens: int,
                      max_retry_tokens: int, temperature: float, retry_temperature: float, top_p: float = 1.0,
                      seed: int = 0, retry_from_text: bool = False, first: int = 0) -> list[dict]:
    """Steps 1-4 for failures [{example, attempt}, ...]. One dict per row (failure-major, G per failure):
    context (the reflection prompt's ids, the same for the whole group), reflection and retry (sampled ids
    as trained: stop token dropped, end-of-turn appended), retry_prompt (the ids the retry was sampled
    after), reflection_text, retry_text (decoded, special tokens skipped) and reward (task.verify).
    retry_from_text renders the retry prompt from the decoded reflection instead (what two_tries does)."""
    G, eot = group_size, end_of_turn_id(tok)
    contexts = [reflection_context(task, f["example"], f["attempt"]) for f in failures]
    prompts = [render_prompt(tok, c) for c in contexts]
    questions = [task.prompt(f["example"])[-1] for f in failures]  # the question asked again: the last turn only
    reask = [_reask_ids(tok, c, q) for c, q in zip(contexts, questions)]
    seeds = item_seeds(seed, first, len(failures))  # failure f's reflections use seeds[f]; its retries derive from it
    # Retry i continues reflection i's KV cache (kept, with room for the re-asked turn and the retry): only
    # the end-of-turn and the re-asked question are prefilled. A retry rendered from text may differ: no reuse.
    kept = None if retry_from_text else KeptCache(reserve=1 + max(map(len, reask)) + max_retry_tokens)
    reflections = generate(model, prompts, n=G, max_new_tokens=max_reflection_tokens, temperature=temperature,
                           top_p=top_p, stop_ids=[eot], seed=seeds, keep=kept)
    refl_texts = _texts(tok, reflections)
    if retry_from_text:
        retry_prompts = [_text_retry_prompt(tok, contexts[i // G], s, questions[i // G])
                         for i, s in enumerate(refl_texts)]
    else:
        retry_prompts = [prompts[i // G] + _turn(s, eot) + reask[i // G] for i, s in enumerate(reflections)]
    retries = generate(model, retry_prompts, n=1, max_new_tokens=max_retry_tokens, temperature=retry_temperature,
                       top_p=top_p, stop_ids=[eot], seed=[derive_seed(seeds[i // G], "retry", i % G)
                                                          for i in range(len(retry_prompts))], resume=kept)
    retry_texts = _texts(tok, retries)
    return [{"context": prompts[i // G], "reflection": _turn(reflections[i], eot), "retry_prompt": retry_prompts[i],
             "retry": _turn(retries[i], eot), "reflection_text": refl_texts[i], "retry_text": retry_texts[i],
             "reward": task.verify(failures[i // G]["example"], retry_texts[i])} for i in range(len(reflections))]


def rollout(model, tok, task, failures: list[dict], group_size: int, max_reflection_tokens: int, max_retry_tokens: int,
            temperature: float, retry_temperature: float, top_p: float = 1.0, seed: int = 0,
            method: str = "r3", first: int = 0) -> Rollout:
    """Reflect -> retry -> reward for a batch of failures; `method` "r3" trains the reflections, "r3_retry"
    the reflections and the retries (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown rollout method {method!r}; known: {', '.join(METHODS)}")
    rows = reflect_and_retry(model, tok, task, failures, group_size, max_reflection_tokens, max_retry_tokens,
                             temperature, retry_temperature, top_p, seed, first=first)
    segments = []
    for r in rows:
        seg = [(r["context"], False), (r["reflection"], True)]
        if method == "r3_retry":  # the re-asked turn exactly as the retry saw it, then the retry
            seg += [(r["retry_prompt"][len(r["context"]) + len(r["reflection"]):], False), (r["retry"], True)]
        segments.append(seg)
    ids, pos, mask = pack_rows(segments, pad_id=end_of_turn_id(tok))
    texts = [{"reflection": r["reflection_text"], "retry": r["retry_text"], "reward": float(r["reward"])} for r in rows]
    return Rollout(ids=ids, pos=pos, mask=mask, rewards=torch.tensor([float(r["reward"]) for r in rows]),
                   group_ids=torch.arange(len(failures)).repeat_interleave(group_size), texts=texts,
                   sampled_tokens=sum(len(r["reflection"]) + len(r["retry"]) for r in rows))


def grpo_rollout(model, tok, task, examples: list[dict], group_size: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int = 0, first: int = 0) -> Rollout:
    """Plain GRPO, no reflection: G first attempts per query (one prefill each), reward task.verify, the
    mask on the attempts' sampled ids + end-of-turn (see the module docstring)."""
    G, eot = group_size, end_of_turn_id(tok)
    prompts, samples = _first_samples(model, tok, task, examples, G, max_new_tokens, temperature, top_p, seed, first)
    attempts = _texts(tok, samples)
    rewards = [float(task.verify(examples[i // G], y)) for i, y in enumerate(attempts)]
    ids, pos, mask = pack_rows([[(prompts[i // G], False), (_turn(s, eot), True)] for i, s in enumerate(samples)], eot)
    return Rollout(ids=ids, pos=pos, mask=mask, rewards=torch.tensor(rewards),
                   group_ids=torch.arange(len(examples)).repeat_interleave(G),
                   texts=[{"attempt": y, "reward": r} for y, r in zip(attempts, rewards)],
                   sampled_tokens=sum(len(s.ids) for s in samples))


def collect_failures(model, tok, task, examples: list[dict], attempts: int, max_per_example: int, max_new_tokens: int,
                     temperature: float, top_p: float = 1.0, seed: int = 0, first: int = 0) -> tuple[list[dict], int]:
    """Sample `attempts` first attempts per example and keep the failed ones (at most `max_per_example`
    per example; 0 keeps all). Returns ([{task, example, attempt}], number of successful attempts)."""
    texts = first_attempts(model, tok, task, examples, attempts, max_new_tokens, temperature, top_p, seed, first)
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


def retry_after(model, tok, task, failures: list[dict], reflections: list[str], max_new_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[bool]:
    """One retry per failure after a reflection given as text (one per failure), in two_tries' layout:
    context / assistant(reflection) / the question again. Returns each retry's verdict (task.verify)."""
    prompts = [_text_retry_prompt(tok, reflection_context(task, f["example"], f["attempt"]), r,
                                  task.prompt(f["example"])[-1]) for f, r in zip(failures, reflections)]
    retries = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=[end_of_turn_id(tok)], seed=item_seeds(seed, 0, len(prompts)))
    return [task.verify(f["example"], y) for f, y in zip(failures, _texts(tok, retries))]


def two_tries(model, tok, task, examples: list[dict], max_new_tokens: int, max_reflection_tokens: int,
              temperature: float, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """The paper's evaluation protocol (docs/method.md section 7) per example: a first try; on failure, one
    reflection and one retry (its prompt rendered from the reflection's text). temperature 0 is greedy.
    Returns per example {first, second, ...} where `second` is True when either try succeeded."""
    firsts = first_attempts(model, tok, task, examples, 1, max_new_tokens, temperature, top_p, seed)
    ok1 = [task.verify(ex, y) for ex, y in zip(examples, firsts)]
    failed = [{"example": ex, "attempt": y} for ex, y, ok in zip(examples, firsts, ok1) if not ok]
    retried = iter([])
    if failed:
        retried = iter(reflect_and_retry(model, tok, task, failed, 1, max_reflection_tokens, max_new_tokens,
                                         temperature, temperature, top_p, seed + 7, retry_from_text=True))
    out = []
    for y, ok in zip(firsts, ok1):
        row = {"first": ok, "second": ok, "attempt": y}
        if not ok:
            r = next(retried)
            row.update(second=bool(r["reward"]), reflection=r["reflection_text"], retry=r["retry_text"])
        out.append(row)
    return out
