"""r3.sampler.generate samples what the model says, whatever the batch around a prompt looks like.

Proves, on tiny random Llama and Qwen2 models (fp32, CPU) against a per-token Python loop that recomputes
a full forward (no cache) at every step:
- greedy decoding with the KV cache equals the argmax of the full forward, token for token;
- mixed-length (right-padded) batches, prompts sharing a prefix (prefilled once, min_shared), the n
  samples of one prompt (prefilled once, rows copied) and finished rows dropped from the batch all give,
  greedily, exactly what each prompt gives alone; moving cache rows copies one layer at a time;
- sampling is reproducible from the seed, and another seed gives other samples;
- stops and finish reasons are right, and the returned log-probs are the log-softmax of the
  temperature-scaled full-forward logits at the sampled tokens; top-p samples only from the nucleus;
- a call that resumes another call's kept KV cache (keep= / resume=: rollout's retry after each
  reflection) samples what a fresh call on the same prompts samples (greedy: the full forward's tokens;
  sampled: the same ids and log-probs within 1e-5), whether the kept buffer had room (grown in place) or
  not (rows copied), with rows that finished early and were moved behind the live ones; it prefills only
  the new tokens, and refuses prompts that do not continue their sample and a second resume;
- (slow) the compiled decode step (compile=True: torch.compile, fixed batch, static cache) gives greedily
  exactly the eager sampler's tokens and stops, on mixed lengths, n > 1 and rows that finish early;
- (slow) a policy sharded with FSDP2 over 2 processes samples exactly what the unsharded model samples,
  inside r3.dist.unsharded (nested blocks too), and refuses to sample outside it;
and on the real default model (slow): greedy output equals transformers' generate(do_sample=False).
"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ours_from_hf, tiny_hf_model
import r3.sampler
from r3.sampler import KeptCache, _share_plan, generate, sample
from r3.seeds import derive_seed


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    return ours_from_hf(tiny_hf_model(request.param, tied=request.param == "llama", vocab=128))


def _prompts(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _reference_greedy(model, prompt, steps):
    """No cache: recompute the full forward over prompt + generated tokens at every step."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _diff(got, ref):
    return f"\n ours {got}\n ref  {ref}"


def test_kv_cache_greedy_equals_full_forward(tiny):
    prompt = _prompts([11])[0]
    got = generate(tiny, [prompt], max_new_tokens=40, temperature=0)[0]
    ref = _reference_greedy(tiny, prompt, 40)
    assert got.ids == ref, _diff(got.ids, ref)
    assert got.finish_reason == "length" and got.prompt_index == 0


def test_mixed_length_batch_equals_each_prompt_alone(tiny):
    prompts = _prompts([1, 17, 5, 33, 2], seed=1)
    batch = generate(tiny, prompts, max_new_tokens=24, temperature=0)
    for i, p in enumerate(prompts):
        alone = generate(tiny, [p], max_new_tokens=24, temperature=0)[0].ids
        assert batch[i].ids == alone == _reference_greedy(tiny, p, 24), f"prompt {i}" + _diff(batch[i].ids, alone)


def test_shared_prefix_prefilled_once_gives_the_same_tokens(tiny):
    ctx = _prompts([40], seed=2)[0]
    tails = _prompts([3, 9, 1, 6], seed=3)
    prompts = [ctx + t for t in tails] + _prompts([8], seed=4)  # 4 share the context, 1 does not
    plan = _share_plan(prompts, min_shared=16)
    assert sorted((s, sorted(m)) for s, m in plan) == [(0, [4]), (40, [0, 1, 2, 3])]
    shared = generate(tiny, prompts, max_new_tokens=20, temperature=0, min_shared=16)
    for i, p in enumerate(prompts):
        ref = _reference_greedy(tiny, p, 20)
        assert shared[i].ids == ref, f"prompt {i}" + _diff(shared[i].ids, ref)


def test_share_plan_never_shares_a_prompts_last_token_and_respects_min_shared():
    a = list(range(10, 50))
    plan = _share_plan([a, a + [7, 8], a[:10] + [1]], min_shared=16)  # a is a prefix of the second
    assert sorted((s, sorted(m)) for s, m in plan) == [(0, [2]), (39, [0, 1])]
    # sharing 20 tokens among all three prefills fewer tokens (63) than sharing 39 between two (64)
    plan = _share_plan([a, a + [7, 8], a[:20] + [1]], min_shared=16)
    assert [(s, sorted(m)) for s, m in plan] == [(20, [0, 1, 2])]
    assert all(s == 0 for s, _ in _share_plan([a, a[:15] + [1, 2, 3]], min_shared=16))


def test_n_samples_greedy_equal_copies_of_the_prompt(tiny):
    p, q = _prompts([9, 4], seed=5)
    shared = generate(tiny, [p, q], n=4, max_new_tokens=16, temperature=0)
    assert [s.prompt_index for s in shared] == [0, 0, 0, 0, 1, 1, 1, 1]
    copies = generate(tiny, [p, p, p, p, q], max_new_tokens=16, temperature=0)
    for s in shared[:4]:
        assert s.ids == copies[0].ids == _reference_greedy(tiny, p, 16)
    assert all(s.ids == copies[4].ids for s in shared[4:])


def test_same_seed_reproduces_and_another_seed_differs(tiny):
    prompts = _prompts([7, 12], seed=6)
    kw = dict(n=4, max_new_tokens=20, temperature=1.0, top_p=0.95)
    a = [s.ids for s in generate(tiny, prompts, seed=123, **kw)]
    b = [s.ids for s in generate(tiny, prompts, seed=123, **kw)]
    c = [s.ids for s in generate(tiny, prompts, seed=124, **kw)]
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a[:4]}) > 1, "the n samples of one prompt should differ at temperature 1"


def test_a_prompt_with_its_own_seed_samples_the_same_whatever_else_is_in_the_call(tiny):
    """What makes one process and N ranks sample alike: with per-prompt seeds, a prompt's samples do not
    depend on the other prompts of the call, their order, or rows that stop early and leave the batch."""
    p, q, r = _prompts([7, 12, 30], seed=11)
    kw = dict(n=3, max_new_tokens=16, temperature=0.9, top_p=0.95)
    alone = [s.ids for s in generate(tiny, [q], seed=[42], **kw)]
    first = generate(tiny, [p, q, r], seed=[5, 42, 6], **kw)
    stops = {first[0].ids[1], first[6].ids[3]}  # rows of p and r finish early and are compacted away
    for prompts, seeds, at in (([q, p], [42, 5], 0), ([p, r, q], [5, 6, 42], 2)):
        got = generate(tiny, prompts, seed=seeds, **kw)
        assert [s.ids for s in got[3 * at:3 * at + 3]] == alone
    cut = generate(tiny, [p, q, r], seed=[5, 42, 6], stop_ids=stops, compact_every=1, **kw)
    for s, a in zip(cut[3:6], alone):
        n = next((j + 1 for j, t in enumerate(a) if t in stops), len(a))
        assert s.ids == a[:n]
    # one int seed is one seed per prompt position: prompt i gets derive_seed(seed, i)
    assert [s.ids for s in generate(tiny, [p, q], seed=9, **kw)] == \
        [s.ids for s in generate(tiny, [p, q], seed=[derive_seed(9, 0), derive_seed(9, 1)], **kw)]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate(tiny, [p, q, r], seed=[1, 2], **kw)


def test_stops_at_stop_token_and_at_max_new_tokens(tiny):
    prompts = _prompts([6, 15, 3], seed=7)
    free = generate(tiny, prompts, max_new_tokens=30, temperature=0)
    stop = free[1].ids[4]  # prompt 1 stops at its first occurrence of this token, at index <= 4
    cut = free[1].ids.index(stop) + 1
    got = generate(tiny, prompts, max_new_tokens=30, temperature=0, stop_ids=[stop], compact_every=2)
    assert got[1].ids == free[1].ids[:cut] and got[1].finish_reason == "stop"
    for g, f in zip(got, free):  # the others are cut at their own first `stop`, or run to the length limit
        n = f.ids.index(stop) + 1 if stop in f.ids else 30
        assert g.ids == f.ids[:n] and g.finish_reason == ("stop" if stop in f.ids else "length")
    short = generate(tiny, prompts, max_new_tokens=3, temperature=0)
    assert all(len(s.ids) == 3 and s.finish_reason == "length" for s in short)


def test_finished_rows_dropped_from_the_batch_do_not_change_the_others(tiny):
    prompts = _prompts([5, 8, 13, 21, 2, 9], seed=8)
    free = generate(tiny, prompts, max_new_tokens=30, temperature=0)
    stops = {f.ids[k] for f, k in zip(free[:3], (2, 6, 11))}  # some rows stop early, some late or never
    for every in (1, 3, 8):
        got = generate(tiny, prompts, max_new_tokens=30, temperature=0, stop_ids=stops, compact_every=every)
        for g, f in zip(got, free):
            n = next((j + 1 for j, t in enumerate(f.ids) if t in stops), 30)
            assert g.ids == f.ids[:n], f"compact_every={every}" + _diff(g.ids, f.ids[:n])


def test_cache_select_moves_rows_in_place_through_one_layer_at_a_time(tiny):
    cfg = tiny.config
    cache = r3.sampler.KVCache(cfg, batch=6, length=40, device="cpu", dtype=torch.float32)
    cache.kv.normal_()
    cache.span = 25
    before = cache.kv.clone()
    rows = torch.tensor([4, 4, 0, 5, 2])  # reordered, one repeated, one dropped
    with torch.profiler.profile(profile_memory=True) as prof:
        cache.select(rows)
    assert torch.equal(cache.kv[:, :, :5, :, :25], before[:, :, rows, :, :25])  # the live slots, moved
    assert torch.equal(cache.kv[:, :, :, :, 25:], before[:, :, :, :, 25:])  # slots beyond the span untouched
    assert torch.equal(cache.kv[:, :, 5:], before[:, :, 5:])  # rows beyond the selection untouched
    one_layer = 2 * len(rows) * cfg.num_key_value_heads * 25 * cfg.head_dim * 4  # bytes of one layer's live rows
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert one_layer <= biggest < 2 * one_layer, f"largest temporary {biggest} B, one layer's live rows {one_layer} B"
    other = r3.sampler.KVCache(cfg, batch=5, length=30, device="cpu", dtype=torch.float32)  # resume's copy
    other.span = 25
    other.select(rows, source=cache)
    assert torch.equal(other.kv[:, :, :, :, :25], cache.kv[:, :, rows, :, :25])


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_logprobs_equal_log_softmax_of_full_forward(tiny, temperature):
    prompts = _prompts([4, 10], seed=9)
    out = generate(tiny, prompts, n=2, max_new_tokens=12, temperature=temperature, seed=0, return_logprobs=True)
    for s in out:
        p = prompts[s.prompt_index]
        with torch.no_grad():
            logits = tiny(torch.tensor([p + s.ids]))[0, len(p) - 1:-1]  # (T, V): the logits each id was drawn from
        ref = torch.log_softmax(logits / (temperature or 1.0), -1).gather(-1, torch.tensor(s.ids)[:, None])[:, 0]
        diff = (torch.tensor(s.logprobs) - ref).abs()
        assert len(s.logprobs) == len(s.ids) and diff.max() < 1e-5, f"max {diff.max():.3g} mean {diff.mean():.3g}"


def _continued(prompts, first, extra_seed):
    """Second-call prompts: prompt + sample i's ids (its stop token dropped, as rollout's _turn) + new tokens."""
    tails = _prompts([3 + i % 4 for i in range(len(first))], seed=extra_seed)
    return [prompts[s.prompt_index] + (s.ids[:-1] if s.finish_reason == "stop" else s.ids) + t
            for s, t in zip(first, tails)]


@pytest.mark.parametrize("reserve", [40, 0], ids=["in-place", "copied"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_resumed_call_samples_what_a_fresh_call_samples(tiny, reserve, temperature, monkeypatch):
    prompts = _prompts([6, 14], seed=12)
    kw = dict(max_new_tokens=12, temperature=temperature, return_logprobs=True)
    free = generate(tiny, prompts, n=3, seed=[1, 2], **kw)
    # prompt 0's rows stop early and move behind the live ones; prompt 1's (never sampling it) run to the end
    stops = {next(t for t in free[0].ids[2:] + free[0].ids[:2] if t not in free[3].ids)}
    kept = KeptCache(reserve=reserve)
    first = generate(tiny, prompts, n=3, seed=[1, 2], stop_ids=stops, compact_every=2, keep=kept, **kw)
    assert any(s.finish_reason == "stop" and len(s.ids) < 8 for s in first) and any(len(s.ids) == 12 for s in first)
    assert [len(t) for t in kept.tokens] == [len(prompts[s.prompt_index]) + len(s.ids) - 1 for s in first]
    second = _continued(prompts, first, extra_seed=13)
    seeds = list(range(20, 20 + len(second)))
    fresh = generate(tiny, second, seed=seeds, **kw)

    fed, allocated = [], []  # the resumed call: the tokens of each forward, and the caches it allocates
    forward, init = type(tiny).forward, r3.sampler.KVCache.__init__
    monkeypatch.setattr(type(tiny), "forward",
                        lambda m, ids, *a, **k: fed.append(ids.shape) or forward(m, ids, *a, **k))
    monkeypatch.setattr(r3.sampler.KVCache, "__init__", lambda c, *a: allocated.append(a) or init(c, *a))
    resumed = generate(tiny, second, seed=seeds, resume=kept, **kw)
    monkeypatch.undo()

    new = [len(p) - len(t) for p, t in zip(second, kept.tokens)]  # tokens the resumed call has to prefill
    assert fed[0][1] == max(new) <= 7, f"prefill of {fed[0]}: more than the new tokens {new}"
    assert len(allocated) == (0 if reserve else 1), "in place when the kept buffer has room, else one new cache"
    worst = 0.0
    for i, (r, f) in enumerate(zip(resumed, fresh)):
        assert r.ids == f.ids, f"sample {i}" + _diff(r.ids, f.ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(r.logprobs, f.logprobs)))
        if temperature == 0:
            assert r.ids == _reference_greedy(tiny, second[i], 12), f"sample {i}"
    assert worst < 1e-5, f"log-probs differ by {worst:.3g}"


def test_resume_refuses_a_prompt_that_does_not_continue_its_sample_and_a_second_resume(tiny):
    prompts = _prompts([5, 9], seed=14)
    kept = KeptCache(reserve=8)
    first = generate(tiny, prompts, max_new_tokens=4, temperature=0, keep=kept)
    second = _continued(prompts, first, extra_seed=15)
    with pytest.raises(ValueError, match="1 prompts for 2 kept samples"):
        generate(tiny, second[:1], max_new_tokens=4, temperature=0, resume=kept)
    wrong = [second[0], [second[1][0] + 1] + second[1][1:]]
    with pytest.raises(ValueError, match="prompt 1 does not continue kept sample 1"):
        generate(tiny, wrong, max_new_tokens=4, temperature=0, resume=kept)
    generate(tiny, second, max_new_tokens=4, temperature=0, resume=kept)
    with pytest.raises(ValueError, match="empty .* or already resumed"):
        generate(tiny, second, max_new_tokens=4, temperature=0, resume=kept)
    with pytest.raises(ValueError, match="need compile=False"):
        generate(tiny, prompts, max_new_tokens=4, keep=KeptCache(), compile=True)


def test_top_p_samples_only_from_the_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    tok, lp = sample(logits, 1.0, 0.8, torch.rand(2000, generator=torch.Generator().manual_seed(0)))
    assert set(tok.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are outside
    torch.testing.assert_close(lp.exp(), torch.tensor([0.5 / 0.8, 0.3 / 0.8])[tok])
    assert abs((tok == 0).float().mean().item() - 0.625) < 0.05
    tok, _ = sample(logits[:5], 1.0, 1e-6, torch.rand(5, generator=torch.Generator().manual_seed(0)))
    assert tok.tolist() == [0] * 5  # a tiny nucleus is the argmax


@pytest.mark.slow  # one inductor compile: about a minute on 2 CPU cores
def test_compiled_decode_is_token_exact_with_eager_in_greedy():
    model = ours_from_hf(tiny_hf_model("qwen2", tied=False, vocab=128, seed=1))  # biases, untied head
    prompts = _prompts([5, 17, 9], seed=10)
    free = generate(model, prompts, n=2, max_new_tokens=30, temperature=0)
    stops = {free[0].ids[3], free[2].ids[12]}  # some rows stop early, others late or never
    eager = generate(model, prompts, n=2, max_new_tokens=30, temperature=0, stop_ids=stops)
    assert any(s.finish_reason == "stop" for s in eager) and any(len(s.ids) > 8 for s in eager)
    for _ in range(2):  # the second call reuses the compiled graph and the static cache
        compiled = generate(model, prompts, n=2, max_new_tokens=30, temperature=0, stop_ids=stops, compile=True)
        for i, (c, e) in enumerate(zip(compiled, eager)):
            assert (c.ids, c.finish_reason) == (e.ids, e.finish_reason), f"sample {i}" + _diff(c.ids, e.ids)
    for s in eager:
        ref = _reference_greedy(model, prompts[s.prompt_index], 30)
        n = next((j + 1 for j, t in enumerate(ref) if t in stops), 30)
        assert s.ids == ref[:n], _diff(s.ids, ref[:n])


@pytest.mark.slow
def test_greedy_matches_transformers_generate_on_default_model(default_dir, default_tok):
    from transformers import AutoModelForCausalLM

    from r3.rollout import end_of_turn_id, render_prompt
    from r3.checkpoint import load_hf

    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain recursion in one paragraph.", "List three prime numbers and say why they are prime.",
                 "How many legs does a spider have?", "Translate 'good morning' into Spanish and German."]
    prompts = [render_prompt(default_tok, [{"role": "user", "content": q}]) for q in questions]
    stop = end_of_turn_id(default_tok)
    ours = generate(load_hf(default_dir, "cpu", torch.float32), prompts, max_new_tokens=40, temperature=0,
                    stop_ids=[stop])  # one batch: mixed lengths, a shared system-prompt prefix
    hf = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=40, eos_token_id=stop, pad_token_id=stop)[0, len(p):].tolist()
        assert ours[i].ids == ref, f"prompt {i}: {default_tok.decode(ref)!r}" + _diff(ours[i].ids, ref)
        assert ours[i].finish_reason == ("stop" if ref[-1] == stop else "length")


def _fsdp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from r3 import dist

    dist.init()
    torch.set_num_threads(1)
    model = ours_from_hf(tiny_hf_model("qwen2", tied=True, vocab=128))
    kw = dict(n=2, max_new_tokens=12, temperature=0.8, seed=3, return_logprobs=True)
    prompts = _prompts([4, 2, 40], seed=10)
    want = generate(model, prompts, **kw)  # before sharding: the full model
    dist.shard(model, mixed_bf16=False)
    try:
        generate(model, prompts, **kw)  # sharded, outside unsharded(): refused (it would all-gather per forward)
        refused = False
    except RuntimeError as e:
        refused = "unsharded" in str(e)
    with dist.unsharded(model):
        got = generate(model, prompts, **kw)
        with dist.unsharded(model):  # nested: a no-op, the weights stay gathered
            again = generate(model, prompts, **kw)
    model(torch.tensor([prompts[0]])).sum().backward()  # still a trainable sharded model afterwards
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"want": [s.ids for s in want], "got": [s.ids for s in got],
                   "lp_diff": max(abs(a - b) for s, t in zip(want, got) for a, b in zip(s.logprobs, t.logprobs)),
                   "sharded": type(model.lm_head.weight).__name__, "refused": refused,
                   "nested": [s.ids for s in again]}, f)
    dist.shutdown()
    dist.exit_now(0)  # past Python's teardown, which can race gloo's threads (r3/dist.py)


@pytest.mark.slow
def test_fsdp2_sharded_policy_samples_like_the_unsharded_model_only_inside_unsharded(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["sharded"] == "DTensor", "the model was not sharded"
        assert r["got"] == r["want"] and r["lp_diff"] < 1e-5, f"rank {rank}: {r}"
        assert r["refused"] and r["nested"] == r["got"], f"rank {rank}: {r}"
