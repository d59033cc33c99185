"""Rollouts: chat turns rendered with their token spans; reflect -> retry -> binary reward; training rows.

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
In all three, group g is rows g*G .. g*G+G-1; its rows share exactly the same tokens before their first
masked token (the rendered context or prompt), and `Rollout.context_lens` says how many, which is what
the shared-prefix update (r3/grpo.py) encodes once per group.

Exact tokens: what is trained is the ids the sampler returned, never a re-tokenisation of their decoded
text (BPE has several spellings of many strings, so the two can differ); TRL trains on the sampled ids
too. Only the prompt parts are rendered by the chat template (`render_chat`, below). The retry is sampled
after context ids + s_i's ids + end-of-turn + the rendered re-asked turn (`Retry.reask`), the very ids
"r3_retry" trains on; it continues the reflection call's KV cache (r3/sampler.py, keep= / resume=), so
only the end-of-turn and the re-asked turn are prefilled for it.
A sample's stop token is dropped and one end-of-turn id appended: for a sample that stopped that is the
token it sampled. NOTE: a sample cut off at its max_new_tokens also gets an end-of-turn it never
sampled, and it is trained (TRL leaves a truncated completion without one).

Seeds (r3/seeds.py): item i of a call (a failure, a query) draws from derive_seed(seed, first + i) alone;
train.py passes `first` = the index of its first item in the step's global batch, so N ranks, each with
a slice, sample what one process does with the whole batch.

`two_tries` (the paper's evaluation) and `retry_after` work on text: the retry prompt is rendered from
the decoded reflection, so the evaluation's numbers stay comparable with any tool that works on text.

Chat rendering: `render_chat(tok, messages)` returns the ids `tok.apply_chat_template(messages)` gives, token
for token, and each message's token span [start, end): its content and the end-of-turn special token that
closes it (e.g. `<|im_end|>`), none of the template around it. The template is rendered to text once; each
message's content is found in it left to right (as given, or stripped when the template trims it); the text
is tokenized with character offsets and the content's characters map to the tokens that overlap them. The
token right after the content must be a special token (the end-of-turn); it closes the span. The spans cut
the re-asked turn out of a rendering (`_reask_ids`); a row is packed from segments known by construction
(`pack_rows`), so no mask ever comes from searching token ids. Templates that rewrite content beyond
trimming are refused (a clear error names the turn); tool-call and multimodal message formats are not handled.

It does not: compute log-probs or losses (grpo.py), or pick which failures or queries to use (train.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from r3.sampler import KeptCache, Sample, generate
from r3.seeds import derive_seed, item_seeds

METHODS = ("r3", "r3_retry")  # rollout's methods; plain GRPO is grpo_rollout (it starts from queries, not failures)


@dataclass
class Rollout:
    ids: torch.Tensor  # (N, T) int64, right-padded with the end-of-turn id
    pos: torch.Tensor  # (N, T) int64 positions 0..T-1
    mask: torch.Tensor  # (N, T) bool: 1 exactly on the trained sampled tokens (+ their end-of-turn ids)
    context_lens: torch.Tensor  # (N,) int64: tokens before the row's first trained one, equal within a group
    rewards: torch.Tensor  # (N,) float32 in {0, 1}
    texts: list[dict]  # per row, for logging: reflection, retry, reward (grpo_rollout: attempt, reward)
    sampling: dict = field(default_factory=dict)  # per generate call kind: {kind}_s seconds and {kind}_tokens sampled

    @property
    def sampled_tokens(self) -> int:
        """Tokens the sampler generated for this batch (reflections + retries, or attempts)."""
        return sum(v for k, v in self.sampling.items() if k.endswith("_tokens"))

    def batch(self, advantages: torch.Tensor, device=None) -> dict:
        """What r3.grpo.update takes: ids, pos, mask, context_lens and the rows' advantages, on `device`."""
        b = dict(ids=self.ids, pos=self.pos, mask=self.mask, context_lens=self.context_lens, advantages=advantages)
        return {k: v.to(device) for k, v in b.items()} if device is not None else b


@dataclass
class Retry:
    """One reflection and the retry sampled after it: ids as trained (stop token dropped, end-of-turn
    appended) and as text (special tokens skipped), with the verifier's verdict on the retry."""
    failure: int  # index of its failure in the call: the group
    context: list[int]  # the reflection prompt's ids, ending with the assistant header (the group's shared context)
    reflection: list[int]
    reask: list[int]  # the question asked again + the assistant header: the retry's prompt after the reflection
    retry: list[int]
    reflection_text: str
    retry_text: str
    reward: float


@dataclass
class Rendered:
    ids: list[int]  # the conversation's token ids, equal to apply_chat_template's
    spans: list[tuple[int, int]]  # per message: [start, end) of its content + end-of-turn token
    text: str  # the rendered template text


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
    """Token ids of the rendered conversation and the token span of every message (module docstring)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        a = text.find(content, cursor) if content else -1
        if a < 0 and content.strip():
            content = content.strip()
            a = text.find(content, cursor)
        if a < 0:
            if content.strip():
                raise ValueError(f"message {i} ({m['role']}): its content does not appear in the rendered template")
            a = _header_end(text, cursor, tok)  # empty content: the span is only the end-of-turn token
        b = a + len(content)
        start = next(t for t, (s, e) in enumerate(offsets) if e > a or (a == b and s >= a))
        end = next((t for t in range(start, len(ids)) if offsets[t][0] >= b), len(ids))
        if end >= len(ids) or ids[end] not in special:
            raise ValueError(f"message {i} ({m['role']}): no end-of-turn special token right after its content")
        spans.append((start, end + 1))
        cursor = offsets[end][1]
    return Rendered(ids=list(ids), spans=spans, text=text)


def _header_end(text: str, cursor: int, tok) -> int:
    """For an empty message: the character where its content would start, i.e. just before the next
    end-of-turn marker after `cursor`."""
    eot = tok.convert_ids_to_tokens(end_of_turn_id(tok))
    return text.find(eot, cursor)


def render_prompt(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant header, ready for sampling."""
    return render_chat(tok, messages, add_generation_prompt=True).ids


def end_of_turn_id(tok) -> int:
    """The token that ends an assistant turn (the sampler's stop token): `<|im_end|>` for SmolLM2 and
    Qwen, `<|eot_id|>` for Llama 3; falls back to eos."""
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            return tid
    return tok.eos_token_id


def reflection_context(task, example: dict, attempt: str) -> list[dict]:
    """user(task) / assistant(failed attempt) / user(reflection prompt)."""
    return task.prompt(example) + [{"role": "assistant", "content": attempt},
                                   {"role": "user", "content": task.reflection_prompt}]


def _texts(tok, samples) -> list[str]:
    return [tok.decode(s.ids, skip_special_tokens=True) for s in samples]


def _turn(s: Sample, eot: int) -> list[int]:
    """A sampled assistant turn as trained: its ids without the stop token, then end-of-turn."""
    return (s.ids[:-1] if s.finish_reason == "stop" else s.ids) + [eot]


def _reask_ids(tok, context: list[dict], question: dict) -> list[int]:
    """The ids the template puts after the reflection's end-of-turn: the question asked again as a user
    turn, then the assistant header. Rendered once per failure around a placeholder reflection: special
    tokens split the text before BPE, so these ids do not depend on the reflection's content."""
    r = render_chat(tok, context + [{"role": "assistant", "content": "."}, question], add_generation_prompt=True)
    return r.ids[r.spans[-2][1]:]


def pack_rows(rows: list[list[tuple[list[int], bool]]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows given as segments [(token ids, trained?), ...] -> ids, pos, mask, each (N, T): the segments
    concatenated and right-padded with pad_id; mask 1 on the tokens of trained segments, 0 elsewhere;
    and context_lens (N,): the tokens before each row's first trained segment."""
    flat = [[t for seg, _ in row for t in seg] for row in rows]
    T = max(map(len, flat))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    context_lens = torch.zeros(len(rows), dtype=torch.long)
    for i, (row, f) in enumerate(zip(rows, flat)):
        ids[i, :len(f)] = torch.tensor(f, dtype=torch.long)
        at = 0
        for seg, trained in row:
            mask[i, at:at + len(seg)] = trained
            at += len(seg)
        before = next((k for k, (_, trained) in enumerate(row) if trained), len(row))
        context_lens[i] = sum(len(seg) for seg, _ in row[:before])
    pos = torch.arange(T).expand(len(rows), T).contiguous()
    return ids, pos, mask, context_lens


def build_batch(tok, convs: list[list[dict]], pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows for reflections given as text rather than sampled (tests, benches), in `rollout`'s layout: the
    last message of each conversation is the reflection; row = the conversation before it rendered with
    the assistant header + the reflection's text tokenised on its own + end-of-turn, mask on the last two.
    -> ids, pos, mask (N, T) and context_lens (N,), as `pack_rows`."""
    eot = end_of_turn_id(tok)
    return pack_rows([[(render_prompt(tok, c[:-1]), False),
                       (tok.encode(c[-1]["content"], add_special_tokens=False) + [eot], True)] for c in convs], pad_id)


def _first_samples(model, tok, task, examples: list[dict], *, n: int, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, first: int) -> tuple[list[list[int]], list[Sample]]:
    """The task prompts' ids and n first attempts per example (prefix-shared), example-major."""
    prompts = [render_prompt(tok, task.prompt(ex)) for ex in examples]
    return prompts, generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, stop_ids=[end_of_turn_id(tok)], seed=item_seeds(seed, first, len(prompts)))


def first_attempts(model, tok, task, examples: list[dict], *, n: int, max_new_tokens: int, temperature: float,
                   top_p: float = 1.0, seed: int = 0, first: int = 0) -> list[str]:
    """n first attempts per example (prefix-shared), example-major, as text."""
    return _texts(tok, _first_samples(model, tok, task, examples, n=n, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed, first=first)[1])


def reflect_and_retry(model, tok, task, failures: list[dict], *, group_size: int, max_reflection_tokens: int,
                      max_retry_tokens: int, temperature: float, retry_temperature: float, top_p: float = 1.0,
                      seed: int = 0, first: int = 0, sampling: dict | None = None) -> list[Retry]:
    """Steps 1-4 for failures [{example, attempt}, ...]: G = group_size `Retry` rows per failure,
    failure-major. Failure f's reflections draw from item seed derive_seed(seed, first + f), the retry
    after its reflection j from derive_seed(that seed, "retry", j). `sampling`, if given, receives each
    generate call's seconds and sampled tokens (reflection_s, reflection_tokens, retry_s, retry_tokens)."""
    G, eot = group_size, end_of_turn_id(tok)
    contexts = [reflection_context(task, f["example"], f["attempt"]) for f in failures]
    prompts = [render_prompt(tok, c) for c in contexts]
    reask = [_reask_ids(tok, c, task.prompt(f["example"])[-1]) for c, f in zip(contexts, failures)]
    seeds = item_seeds(seed, first, len(failures))
    # Retry i continues reflection i's KV cache (kept, with room for the re-asked turn and the retry): only
    # the end-of-turn and the re-asked question are prefilled.
    kept = KeptCache(reserve=1 + max(map(len, reask)) + max_retry_tokens)
    t0 = time.perf_counter()
    reflections = generate(model, prompts, n=G, max_new_tokens=max_reflection_tokens, temperature=temperature,
                           top_p=top_p, stop_ids=[eot], seed=seeds, keep=kept)
    t1 = time.perf_counter()
    groups = [i // G for i in range(len(reflections))]  # the failure of each reflection
    retries = generate(model, [prompts[f] + _turn(s, eot) + reask[f] for f, s in zip(groups, reflections)], n=1,
                       max_new_tokens=max_retry_tokens, temperature=retry_temperature, top_p=top_p, stop_ids=[eot],
                       seed=[derive_seed(seeds[f], "retry", i % G) for i, f in enumerate(groups)], resume=kept)
    if sampling is not None:
        sampling.update(reflection_s=t1 - t0, reflection_tokens=sum(len(s.ids) for s in reflections),
                        retry_s=time.perf_counter() - t1, retry_tokens=sum(len(s.ids) for s in retries))
    retry_texts = _texts(tok, retries)
    return [Retry(failure=f, context=prompts[f], reflection=_turn(s, eot), reask=reask[f], retry=_turn(y, eot),
                  reflection_text=st, retry_text=yt, reward=float(task.verify(failures[f]["example"], yt)))
            for f, s, y, st, yt in zip(groups, reflections, retries, _texts(tok, reflections), retry_texts)]


def rollout(model, tok, task, failures: list[dict], *, group_size: int, max_reflection_tokens: int,
            max_retry_tokens: int, temperature: float, retry_temperature: float, top_p: float = 1.0, seed: int = 0,
            method: str = "r3", first: int = 0) -> Rollout:
    """Reflect -> retry -> reward for a batch of failures; `method` "r3" trains the reflections, "r3_retry"
    the reflections and the retries (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown rollout method {method!r}; known: {', '.join(METHODS)}")
    sampling = {}
    rows = reflect_and_retry(model, tok, task, failures, group_size=group_size,
                             max_reflection_tokens=max_reflection_tokens, max_retry_tokens=max_retry_tokens,
                             temperature=temperature, retry_temperature=retry_temperature, top_p=top_p, seed=seed,
                             first=first, sampling=sampling)
    segments = [[(r.context, False), (r.reflection, True)] for r in rows]
    if method == "r3_retry":  # the re-asked turn exactly as the retry saw it, then the retry
        segments = [s + [(r.reask, False), (r.retry, True)] for s, r in zip(segments, rows)]
    ids, pos, mask, context_lens = pack_rows(segments, pad_id=end_of_turn_id(tok))
    return Rollout(ids=ids, pos=pos, mask=mask, context_lens=context_lens,
                   rewards=torch.tensor([r.reward for r in rows]),
                   texts=[{"reflection": r.reflection_text, "retry": r.retry_text, "reward": r.reward} for r in rows],
                   sampling=sampling)


def grpo_rollout(model, tok, task, examples: list[dict], *, group_size: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int = 0, first: int = 0) -> Rollout:
    """Plain GRPO, no reflection: G first attempts per query (one prefill each), reward task.verify, the
    mask on the attempts' sampled ids + end-of-turn (see the module docstring)."""
    G, eot = group_size, end_of_turn_id(tok)
    t0 = time.perf_counter()
    prompts, samples = _first_samples(model, tok, task, examples, n=G, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed, first=first)
    sampling = {"attempt_s": time.perf_counter() - t0, "attempt_tokens": sum(len(s.ids) for s in samples)}
    attempts = _texts(tok, samples)
    rewards = [float(task.verify(examples[i // G], y)) for i, y in enumerate(attempts)]
    ids, pos, mask, context_lens = pack_rows([[(prompts[i // G], False), (_turn(s, eot), True)]
                                              for i, s in enumerate(samples)], eot)
    return Rollout(ids=ids, pos=pos, mask=mask, context_lens=context_lens, rewards=torch.tensor(rewards),
                   texts=[{"attempt": y, "reward": r} for y, r in zip(attempts, rewards)], sampling=sampling)


def collect_failures(model, tok, task, examples: list[dict], *, attempts: int, max_per_example: int,
                     max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0,
                     first: int = 0) -> tuple[list[dict], int]:
    """Sample `attempts` first attempts per example and keep the failed ones (at most `max_per_example`
    per example; 0 keeps all). Returns ([{task, example, attempt}], number of successful attempts)."""
    texts = first_attempts(model, tok, task, examples, n=attempts, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, first=first)
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


def retry_after(model, tok, task, failures: list[dict], reflections: list[str], *, max_new_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, seeds: list[int] | None = None) -> list[str]:
    """One retry per failure after a reflection given as text (one per failure), rendered as text:
    context / assistant(reflection) / the question again. Returns the retries' texts; `seeds`: one per
    failure (default: derive_seed(0, i))."""
    prompts = [render_prompt(tok, reflection_context(task, f["example"], f["attempt"])
                             + [{"role": "assistant", "content": r}, task.prompt(f["example"])[-1]])
               for f, r in zip(failures, reflections)]
    retries = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=[end_of_turn_id(tok)], seed=seeds if seeds is not None else 0)
    return _texts(tok, retries)


def two_tries(model, tok, task, examples: list[dict], *, max_new_tokens: int, max_reflection_tokens: int,
              temperature: float, top_p: float = 1.0, seed: int = 0, first: int = 0) -> list[dict]:
    """The paper's evaluation protocol (docs/method.md section 7) per example: a first try; on failure, one
    reflection and one retry (its prompt rendered from the reflection's text). temperature 0 is greedy.
    Example i draws from derive_seed(seed, first + i) and its "reflection" and "retry" streams.
    Returns per example {first, second, attempt[, reflection, retry]}: `second` is True when either try succeeded."""
    seeds = item_seeds(seed, first, len(examples))
    firsts = first_attempts(model, tok, task, examples, n=1, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, first=first)
    rows = [{"first": task.verify(ex, y), "attempt": y} for ex, y in zip(examples, firsts)]
    failed = [i for i, r in enumerate(rows) if not r["first"]]
    fails = [{"example": examples[i], "attempt": firsts[i]} for i in failed]
    if fails:
        contexts = [render_prompt(tok, reflection_context(task, f["example"], f["attempt"])) for f in fails]
        reflections = _texts(tok, generate(model, contexts, max_new_tokens=max_reflection_tokens,
                                           temperature=temperature, top_p=top_p, stop_ids=[end_of_turn_id(tok)],
                                           seed=[derive_seed(seeds[i], "reflection") for i in failed]))
        retries = retry_after(model, tok, task, fails, reflections, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p,
                              seeds=[derive_seed(seeds[i], "retry") for i in failed])
        for i, s, y in zip(failed, reflections, retries):
            rows[i].update(reflection=s, retry=y)
    for ex, r in zip(examples, rows):
        r["second"] = r["first"] or bool(task.verify(ex, r["retry"]))
    return rows
