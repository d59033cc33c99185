"""Batched sampling from our Transformer: a static KV cache, prefix sharing, greedy / temperature / top-p.

`generate(model, prompts, n, ...)` samples n continuations of each prompt (token-id lists of any
lengths) and returns one `Sample` per continuation, prompt-major: prompt 0's n samples, then prompt 1's.
The pieces follow gpt-fast's generate.py: `prefill`, `decode_one_token`, `decode`, `sample`, `generate`.

How a call runs:
1. Prefill: equal prompts (and the n samples of one) are prefilled once; `prefill_shared` groups the
   unique prompts by shared token prefix (`_share_plan`), prefills each group's common prefix of at least
   `min_shared` tokens once, copies its cache rows to the group's members, then prefills every unique
   prompt's own suffix (one right-padded batch per level). With `resume=` (below) `prefill_resumed` takes
   the rows of the samples the prompts continue instead, and prefills only new tokens. The unique prompts'
   cache rows and last-token logits are then copied to the N = len(prompts) * n samples (repeat_interleave).
2. Decode (`decode`): the first tokens are sampled from those logits, then one token per live row per step.
   Every `compact_every` steps the rows that have sampled a stop token are dropped from the batch (their
   cache rows compacted in place, only the live slots copied), so finished samples stop costing compute
   after at most `compact_every` - 1 wasted steps; that check (`done.any()`) is the loop's only host sync.
3. Samples (`_collect`): each row is cut after its first stop token; `keep=` keeps the cache (`fill_kept`).

Compiled decode (`compile=True`, off by default): the decode step is `torch.compile`d with static shapes
(`compiled_decode`), as gpt-fast does: fullgraph, `dynamic=False`, and on CUDA mode "reduce-overhead" (CUDA
graphs: one graph launch per token instead of ~1,500 kernel launches); plain inductor on CPU. To keep shapes
static the batch is fixed (no compaction: finished rows keep decoding, their tokens discarded; the loop
still ends early once every row has stopped, checked every `compact_every` steps), attention spans the
whole cache, and the cache length is rounded up to a multiple of 256 and the buffer reused across calls
of the same shape (`STATIC_CACHES`; CUDA graphs need its address fixed). Each new (N, length bucket)
compiles again (tens of seconds), which is why it is off by default: a training run's rollout shapes
change every step. Greedy output is token-exact with eager (tests/test_sampler.py). Prefill stays eager.

The KV cache is one buffer (layers, 2, N, Hkv, S, D), allocated once per call (or taken over, below),
S = longest prompt + max_new_tokens (a little more when groups share prefixes; plus a KeptCache's
reserve). Slot s of a row holds the key/value of that row's token at position s; a query at position p
sees slots <= p. Right-padded prefill writes garbage keys/values of the pad tokens into slots beyond a
row's length; they stay masked until decode overwrites them, so padding never changes a row's tokens.
Attention only spans the slots live so far (`span`).

What is reused, and what is not: within one call, every distinct prompt prefix that >= 2 unique prompts
share (>= min_shared tokens) is prefilled once. Across two calls, only what the caller asks for: a call
given `keep=KeptCache(reserve=r)` moves finished rows behind the live ones instead of dropping them (one
copy of each finished row, once) and leaves its cache, r slots longer than it needs, in the KeptCache; a
call given `resume=` that KeptCache continues its samples: prompt i must begin with sample i's prompt
and sampled ids, whose keys/values are already in the cache, so only the rest is prefilled (rollout.py:
the retry after each reflection prefills the end-of-turn and the re-asked question, not the context and
the reflection again). The kept keys/values of sampled tokens come from decode steps rather than from a
prefill: equal up to the last bits of differently shaped matmuls. Nothing else is kept (no prefix cache
across calls as nano-vllm's block table has).

Reproducibility: every sample draws from a random stream of its own, one uniform per token, seeded by
its prompt's seed and its index among that prompt's n samples (r3/seeds.py: derive_seed). `seed` is one
int (prompt p gets derive_seed(seed, p)) or one int per prompt. With per-prompt seeds that the caller keys
by something other than the position in the call (train.py: the failure's index in the step's global
batch), a sample does not depend on the other prompts of the call, their order or the batch size, so one
process and N ranks splitting the same prompts draw the same samples (tests/test_torchrun.py), up to
last-bit differences of differently shaped matmuls (greedy output is checked exactly in tests/test_sampler.py).

FSDP2: the call runs under torch.no_grad() (not inference_mode: parameters FSDP gathers there would
become inference tensors that the next training step cannot use), and a sharded model only inside the
caller's `r3.dist.unsharded(model)`, which gathers the full weights once for a whole stretch of calls:
the call itself issues no collective, so ranks may make different numbers of calls (r3/dist.py). Memory
while sampling, per rank: the full parameters in the compute dtype (about 1x the model) on top of the
shards, plus the KV cache, 2 * layers * N * S * Hkv * D elements (default 135M model, N=64, S=384: 1.1 GB
in fp32), plus a transient copy of one layer's live part when rows are copied or compacted, plus a few
(N, V) fp32 tensors per step (logits, probabilities, their cumsum) and the activations of one prefill batch.

NOTE: compile=True is untested with an FSDP-wrapped policy (train.py never sets it), and the
static caches stay allocated for the life of the process (STATIC_CACHES.clear() frees them).

It does not: do beam search, repetition penalties, top-k, or stop on strings; keep a cache across calls
unless asked (keep= / resume=); split large N or long prompts into chunks (memory grows with N * S: the
caller bounds the batch).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from r3.dist import require_gathered
from r3.model import ModelConfig, Transformer
from r3.seeds import derive_seed, item_seeds


@dataclass
class Sample:
    ids: list[int]  # generated token ids, up to and including the stop token; no padding
    finish_reason: str  # "stop" (a stop id was sampled) or "length" (max_new_tokens reached)
    logprobs: list[float] | None  # per id: log-prob under the sampling distribution (see `sample`)
    prompt_index: int  # which prompt this sample continues


class KVCache:
    """Static cache, slot == position per row (see the module docstring); implements model.KVCache.

    The sampler sets `span` (how many slots are live) before each forward; attention spans those only.
    """

    def __init__(self, cfg: ModelConfig, batch: int, length: int, device, dtype):
        shape = (cfg.num_hidden_layers, 2, batch, cfg.num_key_value_heads, length, cfg.head_dim)
        # zeros, not empty: masked slots get softmax weight 0, and 0 * NaN garbage would still be NaN.
        self.kv = torch.zeros(shape, device=device, dtype=dtype)  # (L, 2, B, Hkv, S, D)
        self.span = length

    @classmethod
    def static(cls, cfg: ModelConfig, batch: int, length: int, device, dtype) -> "KVCache":
        """The compiled path's cache: `length` rounded up to STATIC_MULTIPLE, one zeroed buffer per shape reused
        across calls, its address marked static so CUDA graphs need not copy it (compile guards on that address)."""
        length = -(-length // STATIC_MULTIPLE) * STATIC_MULTIPLE
        key = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim, str(device), dtype)
        if key not in STATIC_CACHES:
            STATIC_CACHES[key] = cache = cls(cfg, batch, length, device, dtype)
            if cache.kv.is_cuda:
                torch._dynamo.mark_static_address(cache.kv)
        cache = STATIC_CACHES[key]
        cache.kv.zero_()
        cache.span = length
        return cache

    def attn_mask(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, T) positions -> (B, 1, T, span) bool: a query sees the slots at or before its position."""
        return (torch.arange(self.span, device=pos.device) <= pos[..., None])[:, None]

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B, H, T, D = k.shape  # k, v: (B, Hkv, T, D), written at slots pos (B, T)
        idx = pos[:, None, :, None].expand(B, H, T, D)
        kb, vb = self.kv[layer, 0, :B], self.kv[layer, 1, :B]  # (B, Hkv, S, D) views
        kb.scatter_(2, idx, k)
        vb.scatter_(2, idx, v)
        return kb[:, :, : self.span], vb[:, :, : self.span]  # (B, Hkv, span, D)

    def select(self, rows: torch.Tensor, source: "KVCache | None" = None) -> None:
        """Make rows `rows` (in that order; repeats allowed) of `source` (default: this cache, in place)
        this cache's rows 0..len(rows)-1. Copies only the live slots (this cache's span), one layer at a
        time (so the temporary is 1/layers of them); slots beyond them are garbage, masked."""
        n, span = len(rows), self.span
        for kv, src in zip(self.kv, (self if source is None else source).kv):  # (2, B, Hkv, S, D) per layer
            kv[:, :n, :, :span] = src[:, rows, :, :span]


@dataclass
class KeptCache:
    """A call's KV cache kept for a later call that continues its samples (rollout: each retry continues
    its reflection). `generate(..., keep=k)` fills it; `generate(..., resume=k)` uses it up.

    Sample i's keys/values sit in cache row rows[i], slots 0..len(tokens[i]) - 1, where tokens[i] is its
    prompt + its sampled ids but the last (a sampled token is fed only when the next one is sampled).
    `reserve`: slots the keeping call allocates beyond its own need, so that the resuming call's longest
    prompt + max_new_tokens fits and it continues in the same buffer (otherwise the rows are copied)."""
    reserve: int = 0
    cache: KVCache | None = None
    rows: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


STATIC_CACHES: dict[tuple, KVCache] = {}  # compile=True: (L, N, Hkv, length, D, device, dtype) -> cache
STATIC_MULTIPLE = 256  # compile=True: cache lengths are rounded up to this, so near shapes share a graph


def sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor):
    """logits (B, V) -> tokens (B,), their log-probs (B,) under the distribution sampled from:
    softmax(logits / temperature) restricted to the top-p nucleus and renormalised. Greedy
    (temperature 0) takes the argmax (first on ties) and reports log_softmax(logits), i.e. temperature 1.
    u (B,) holds each row's uniform in [0, 1) for this token (unused when greedy)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before a token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    logp = F.log_softmax(logits, -1)
    # Inverse-CDF sampling: one uniform per row. torch.multinomial draws V exponentials per row
    # (about 10x slower here for V = 49k). right=True never picks a zero-probability token; if rounding
    # makes u reach the total (p ~ 1e-7) the index is V, and the argmax, always in the nucleus, is taken.
    cdf = logp.exp().cumsum(-1)  # (B, V)
    u = u[:, None].to(cdf.dtype) * cdf[:, -1:]  # (B, 1)
    tok = torch.searchsorted(cdf, u, right=True)[:, 0]
    tok = torch.where(tok < cdf.shape[-1], tok, logits.argmax(-1))
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def prefill(model: Transformer, cache: KVCache, seqs: list[list[int]], starts: list[int]) -> torch.Tensor:
    """Write the tokens seqs[b] of cache row b at positions starts[b], starts[b] + 1, ... (one
    right-padded batch) and return the logits (B, V) after each row's last token (lm_head only there)."""
    dev, B, T = cache.kv.device, len(seqs), max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=dev)  # (B, T)
    pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
    cache.span = max(starts) + T
    h = model(ids, pos, cache, return_hidden=True)  # (B, T, H)
    last = torch.tensor([len(s) - 1 for s in seqs], device=dev)
    return model.lm_head(h[torch.arange(B, device=dev), last]).float()  # (B, V)


def decode_one_token(model: Transformer, cache: KVCache, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """tok, pos (B,): feed each row's last token at its position -> next-token logits (B, V)."""
    return model(tok[:, None], pos[:, None], cache)[:, -1].float()


_COMPILED: dict[str, object] = {}  # device type -> compiled decode_one_token (dynamo caches per shape)


def compiled_decode(model: Transformer, cache: KVCache, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """decode_one_token under torch.compile (static shapes, one graph; CUDA graphs on CUDA), attending to the whole
    cache (slots beyond a row's position masked)."""
    dev = cache.kv.device.type
    if dev not in _COMPILED:
        mode = "reduce-overhead" if dev == "cuda" else None
        _COMPILED[dev] = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)
    cache.span = cache.kv.shape[4]
    if dev == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
    return _COMPILED[dev](model, cache, tok, pos)


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _share_plan(prompts: list[list[int]], min_shared: int) -> list[tuple[int, list[int]]]:
    """Group distinct prompts into [(shared prefix length, member indices)]; length 0 = not shared.

    Sorted lexicographically, prompts with a common prefix are neighbours; a dynamic programme over
    runs of neighbours minimises the tokens prefilled (a run of m prompts sharing s tokens saves
    (m - 1) * s). A run shares only >= min_shared tokens and never a member's last token (its logits
    are needed), so every member keeps a non-empty suffix."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    seq = [prompts[i] for i in order]
    lcp = [_lcp(a, b) for a, b in zip(seq, seq[1:])]
    best, choice = [0] * (len(seq) + 1), [(0, 0)] * (len(seq) + 1)  # best[j]: min cost of seq[:j]
    for j in range(1, len(seq) + 1):
        best[j], choice[j] = best[j - 1] + len(seq[j - 1]), (j - 1, 0)  # seq[j-1] alone
        share, total = len(seq[j - 1]) - 1, len(seq[j - 1])
        for i in range(j - 2, -1, -1):  # the run seq[i:j]
            share, total = min(share, lcp[i], len(seq[i]) - 1), total + len(seq[i])
            if share < min_shared:
                break
            if best[i] + total - (j - i - 1) * share < best[j]:
                best[j], choice[j] = best[i] + total - (j - i - 1) * share, (i, share)
    groups, j = [], len(seq)
    while j > 0:
        i, share = choice[j]
        groups.append((share, order[i:j]))
        j = i
    return groups[::-1]


def prefill_shared(model: Transformer, prompts: list[list[int]], batch: int, max_new_tokens: int,
                   min_shared: int, static: bool = False, reserve: int = 0) -> tuple[KVCache, torch.Tensor]:
    """Allocate the cache (`batch` rows) and prefill distinct `prompts` into rows 0..U-1, each shared
    prefix once (see `_share_plan`). Returns the cache and the last-token logits (U, V).
    static: the compiled path's reused cache (`KVCache.static`); reserve: extra slots."""
    w = model.model.embed_tokens.weight  # under unsharded(): the full weight in the compute dtype
    shared = [(s, m) for s, m in _share_plan(prompts, min_shared) if s > 0]
    start, parent = [0] * len(prompts), [0] * len(prompts)
    for row, (s, members) in enumerate(shared):
        for i in members:
            start[i], parent[i] = s, row
    suffixes = [p[s:] for p, s in zip(prompts, start)]
    longest = max(max(start) + max(map(len, suffixes)), max((s for s, _ in shared), default=0))
    alloc = KVCache.static if static else KVCache
    cache = alloc(model.config, batch, longest + max_new_tokens + reserve, w.device, w.dtype)
    if shared:  # level 1: each group's prefix once, then copy the rows to the group's members
        prefill(model, cache, [prompts[m[0]][:s] for s, m in shared], [0] * len(shared))
        cache.select(torch.tensor(parent, device=w.device))
    return cache, prefill(model, cache, suffixes, start)  # level 2: every prompt's own suffix


def prefill_resumed(model: Transformer, kept: KeptCache, prompts: list[list[int]], parents: list[int], batch: int,
                    max_new_tokens: int) -> tuple[KVCache, torch.Tensor]:
    """Distinct `prompts` into cache rows 0..U-1, prompt u continuing kept sample parents[u]: its cached
    keys/values are moved (in place when the kept buffer is large enough, else copied into a new one) and
    only the rest of the prompt is prefilled. Returns the cache and the last-token logits (U, V)."""
    if kept.cache is None:
        raise ValueError("resume: this KeptCache is empty (pass it as keep= to a call first) or already resumed")
    have = []  # slots of each prompt that are cached; its last token is always fed again (its logits start sampling)
    for u, (p, j) in enumerate(zip(prompts, parents)):
        t = kept.tokens[j]
        if p[:len(t)] != t:
            raise ValueError(f"resume: prompt {u} does not continue kept sample {j} (its prompt + sampled ids)")
        have.append(min(len(t), len(p) - 1))
    old, kept.cache = kept.cache, None  # used up: its buffer is now this call's
    src = torch.tensor([kept.rows[j] for j in parents], device=old.kv.device)
    length, span = max(map(len, prompts)) + max_new_tokens, max(have)
    room = old.kv.shape[2] >= batch and old.kv.shape[4] >= length  # the keeping call reserved room: grow in place
    cache = old if room else KVCache(model.config, batch, length, old.kv.device, old.kv.dtype)
    cache.span = span
    cache.select(src, source=old)
    return cache, prefill(model, cache, [p[h:] for p, h in zip(prompts, have)], have)


def fill_kept(kept: KeptCache, cache: KVCache, order: torch.Tensor, prompts: list[list[int]], samples: list[Sample]):
    """keep=: leave this call's cache in `kept`; cache row r holds sample order[r] (see KeptCache)."""
    kept.cache, kept.rows = cache, order.argsort().tolist()  # the inverse permutation: each sample's row
    kept.tokens = [prompts[s.prompt_index] + s.ids[:-1] for s in samples]


def prompt_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per item: `seed` as given when it is a sequence of `count` ints, else derive_seed(seed, i)."""
    if isinstance(seed, int):
        return item_seeds(seed, 0, count)
    seeds = [int(x) for x in seed]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prompts: give one int, or one seed per prompt")
    return seeds


def uniforms(seeds: list[int], n: int, steps: int) -> torch.Tensor:
    """(len(seeds) * n, steps) uniforms, prompt-major: row p * n + j is the stream of sample j of prompt p,
    drawn on the CPU (the same numbers on every device)."""
    g = torch.Generator()
    rows = []
    for s in seeds:
        for j in range(n):
            g.manual_seed(derive_seed(s, j))
            rows.append(torch.rand(steps, generator=g))
    return torch.stack(rows)


def decode(model: Transformer, cache: KVCache, logits: torch.Tensor, pos: list[int], u: torch.Tensor | None, *,
           temperature: float, top_p: float, stop_ids: Sequence[int], max_new_tokens: int, compact_every: int,
           compile: bool, keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a token for every live row from its logits (N, V), feed it at its position, repeat (module docstring).
    Returns tokens, log-probs (N, max_new_tokens; garbage after a stop) and the sample in each cache row (N,)."""
    dev, N, longest = logits.device, len(pos), max(pos)
    pos = torch.tensor(pos, device=dev)  # (N,) next position per row
    stops = torch.tensor(list(stop_ids) or [-1], device=dev)
    out = torch.full((N, max_new_tokens), -1, dtype=torch.long, device=dev)
    lps = torch.zeros((N, max_new_tokens), device=dev)
    order = alive = torch.arange(N, device=dev)  # the sample in each cache row; alive: the live rows' (a prefix)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        tok, lp = sample(logits, temperature, top_p, u[alive, step] if u is not None else None)
        out[alive, step], lps[alive, step] = tok, lp
        done |= torch.isin(tok, stops)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % compact_every == 0 and bool(done.any()):
            if bool(done.all()):
                break
            if not compile:  # compiled: the batch stays fixed (static shapes); done rows are ignored
                live = (~done).nonzero()[:, 0]
                # keep: finished rows go behind the live ones, where decode leaves them be; else dropped
                moved = torch.cat([live, done.nonzero()[:, 0]]) if keep else live
                cache.select(moved)
                order[: len(moved)] = order[moved]
                alive, tok, pos, done = order[: len(live)], tok[live], pos[live], done[live]
        if compile:
            logits = compiled_decode(model, cache, tok, pos)
        else:
            cache.span = longest + step + 1  # every live row's position is < this
            logits = decode_one_token(model, cache, tok, pos)
        pos = pos + 1
    return out, lps, order


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             seed: int | Sequence[int] | None = None, return_logprobs: bool = False, min_shared: int = 32,
             compact_every: int = 8, compile: bool = False, keep: KeptCache | None = None,
             resume: KeptCache | None = None) -> list[Sample]:
    """Sample n continuations of every prompt (see the module docstring); len(prompts) * n Samples, prompt-major.
    temperature 0 is greedy (top_p then unused). A sample ends after the first of `stop_ids` it samples, or after
    max_new_tokens. `seed`: one int, one per prompt (a prompt's samples then do not depend on the rest of the call),
    or None (a fresh one). min_shared: the shortest common prefix prefilled once for several prompts; compact_every:
    steps between drops of finished rows (with `compile`: steps between checks that all rows have stopped).
    return_logprobs fills Sample.logprobs. compile: decode with the compiled static-shape step (module docstring).
    keep: a KeptCache this call fills with its KV cache (finished rows are then moved behind the live ones instead
    of dropped); resume: a filled KeptCache whose sample i prompt i continues (one prompt per kept sample), so only
    the prompts' new tokens are prefilled. Neither works with `compile`."""
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or min(map(len, prompts)) == 0 or n < 1 or max_new_tokens < 1:
        raise ValueError("generate needs non-empty prompts, n >= 1 and max_new_tokens >= 1")
    if compile and (keep is not None or resume is not None):
        raise ValueError("generate: keep= and resume= need compile=False (the compiled path reuses its cache buffer)")
    if resume is not None and len(resume.tokens) != len(prompts):
        raise ValueError(f"resume: {len(prompts)} prompts for {len(resume.tokens)} kept samples (one prompt each)")
    require_gathered(model)  # sharded: only inside r3.dist.unsharded, so no forward here issues a collective
    index: dict[tuple, int] = {}
    unique_of = [index.setdefault(tuple(p), len(index)) for p in prompts]
    uniq = [list(k) for k in index]
    rows = [u for u in unique_of for _ in range(n)]  # unique prompt per sample
    N = len(rows)
    if resume is not None:  # unique prompt u continues the kept sample of its first prompt
        parents = [unique_of.index(u) for u in range(len(uniq))]
        cache, logits = prefill_resumed(model, resume, uniq, parents, N, max_new_tokens)
    else:
        reserve = keep.reserve if keep is not None else 0
        cache, logits = prefill_shared(model, uniq, N, max_new_tokens, min_shared, static=compile, reserve=reserve)
    dev = cache.kv.device
    if seed is None:
        seed = torch.Generator().seed()  # a fresh one; never the global RNG
    # every sample's own stream, one uniform per step (greedy draws none)
    u = uniforms(prompt_seeds(seed, len(prompts)), n, max_new_tokens).to(dev) if temperature > 0 else None
    if rows != list(range(N)):  # copy each unique prompt's rows to its samples
        rows_t = torch.tensor(rows, device=dev)
        cache.select(rows_t)
        logits = logits[rows_t]  # (N, V)
    out, lps, order = decode(model, cache, logits, [len(uniq[r]) for r in rows], u, temperature=temperature,
                             top_p=top_p, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                             compact_every=compact_every, compile=compile, keep=keep is not None)
    samples = _collect(out.tolist(), lps.tolist() if return_logprobs else None, set(stop_ids), n)
    if keep is not None:
        fill_kept(keep, cache, order, prompts, samples)
    return samples


def _collect(out: list[list[int]], lps: list[list[float]] | None, stops: set[int], n: int) -> list[Sample]:
    """Cut each row after its first stop token (later columns are unwritten or garbage)."""
    samples = []
    for i, ids in enumerate(out):
        end = next((j + 1 for j, t in enumerate(ids) if t in stops), None)
        reason, end = ("stop", end) if end else ("length", len(ids))
        samples.append(Sample(ids[:end], reason, lps[i][:end] if lps is not None else None, i // n))
    return samples
