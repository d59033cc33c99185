"""What r3.rollout samples from and what it trains on, on a tiny random Llama with the default tokenizer.

Proves, with every `generate` call intercepted (the real sampler runs; the wrapper records its prompts
and samples) and every prompt decoded and compared with the tokenizer's own chat template:
- the conversation the paper prescribes (docs/method.md section 3): the reflection context is the task's
  one-shot pair, user(question) / assistant(failed attempt) / user(reflection prompt); the retry prompt
  is that conversation + assistant(reflection) + user(the question re-asked: only the prompt's last turn);
  G reflections per failure, one retry each (continuing its reflection's KV cache), group g = rows
  g*G .. g*G+G-1; rewards are the verifier's verdicts on the retries;
- exact tokens: a training row holds the ids the sampler returned, also where decoding and
  re-encoding them gives other ids, and the policy's log-probs of the masked tokens equal those the
  sampler reported for them (1e-4) at the sampling temperature;
- what each method's mask covers: "r3" the reflection + its end-of-turn; "r3_retry" also the retry + its
  end-of-turn, never the re-asked question or a role header; `grpo_rollout` the first attempt + its
  end-of-turn; never padding; rows of one group share every token before their first masked one;
- the evaluation's `two_tries` still renders its retry prompt from the decoded reflection (unchanged).
"""
import pytest
import torch
from conftest import ours_from_hf, tiny_hf_model

import r3.rollout
from r3.grpo import sequence_logprobs
from r3.rollout import end_of_turn_id
from r3.sampler import Sample
from r3.tasks import question_turns

G = 3
T_REFLECT, T_RETRY = 0.9, 0.7
SOLVED = ("Say two words.", "Two words.")
FAILURES = [{"example": {"q": "Say something short."}, "attempt": "Something."},
            {"example": {"q": "Name a prime number."}, "attempt": "Four is prime."}]


class EvenTask:
    """Fake task with a one-shot pair; the verifier is known: a text of even length is correct."""
    name = "even"
    reflection_prompt = "You got it wrong. Reflect on what went wrong."

    def examples(self, split):
        return [f["example"] for f in FAILURES]

    def prompt(self, ex):
        return question_turns(ex["q"], solved=SOLVED)

    def verify(self, ex, text):
        return len(text) % 2 == 0


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama", tied=True, vocab=49152, layers=2))


@pytest.fixture
def calls(monkeypatch):
    """Every generate call of r3.rollout: its prompts, n, keyword arguments and samples (with log-probs)."""
    real, seen = r3.rollout.generate, []

    def recording(model, prompts, n=1, **kw):
        out = real(model, prompts, n=n, **{**kw, "return_logprobs": True})  # log-probs do not change sampling
        seen.append({"prompts": [list(p) for p in prompts], "n": n, "kw": kw, "samples": out})
        return out

    monkeypatch.setattr(r3.rollout, "generate", recording)
    return seen


def template(tok, messages) -> str:
    """The reference: the tokenizer's own chat template, as text, with the assistant header."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def context_messages(f) -> list[dict]:
    """The reflection context written out by hand (not through r3.rollout.reflection_context)."""
    return [{"role": "user", "content": SOLVED[0]}, {"role": "assistant", "content": SOLVED[1]},
            {"role": "user", "content": f["example"]["q"]}, {"role": "assistant", "content": f["attempt"]},
            {"role": "user", "content": EvenTask.reflection_prompt}]


def sampled(s: Sample) -> list[int]:
    """A sample's ids without its stop token."""
    return s.ids[:-1] if s.finish_reason == "stop" else s.ids


def check_groups_share_prefix(ro, group_size):
    """Group g is rows g*G..; within it every row has the same tokens before its first masked token, and
    context_lens says where that is."""
    for g in range(len(ro.rewards) // group_size):
        rows = range(g * group_size, (g + 1) * group_size)
        starts = [int(ro.mask[i].nonzero()[0]) for i in rows]
        assert len(set(starts)) == 1, starts
        assert [int(ro.context_lens[i]) for i in rows] == starts
        prefixes = {tuple(ro.ids[i, :starts[0]].tolist()) for i in rows}
        assert len(prefixes) == 1, f"group {g}: rows differ before their first masked token"


def check_padding(ro, lengths, eot):
    """Each row is `lengths[i]` tokens, then end-of-turn padding that is never masked."""
    for i, n in enumerate(lengths):
        assert ro.ids[i, n:].eq(eot).all() and not ro.mask[i, n:].any()
    assert ro.ids.shape[1] == max(lengths)
    assert ro.pos.tolist() == [list(range(ro.ids.shape[1]))] * len(lengths)


def check_prompt_plus_sample_rows(ro, prompts, samples, eot):
    """Row i = its group's prompt ids + sample i's sampled ids + end-of-turn, the mask on exactly the last two,
    end-of-turn padding after it, and the rows of a group identical before their first masked token."""
    lengths = []
    for i, s in enumerate(samples):
        row = prompts[i // G] + sampled(s) + [eot]
        assert ro.ids[i, :len(row)].tolist() == row
        assert ro.ids[i][ro.mask[i]].tolist() == sampled(s) + [eot]
        lengths.append(len(row))
    check_padding(ro, lengths, eot)
    check_groups_share_prefix(ro, G)


def rollout(model, tok, method="r3", seed=5):
    return r3.rollout.rollout(model, tok, EvenTask(), FAILURES, group_size=G, max_reflection_tokens=8, max_retry_tokens=6,
                              temperature=T_REFLECT, retry_temperature=T_RETRY, seed=seed, method=method)


def test_rollout_follows_the_papers_conversation(model, default_tok, calls):
    tok, eot = default_tok, end_of_turn_id(default_tok)
    ro = rollout(model, tok)
    assert len(calls) == 2, "one call for the reflections, one for the retries"
    refl, retry = calls

    # 1. reflections: G per failure, from the reflection context (one-shot pair first), at the reflection temperature
    assert refl["n"] == G and refl["kw"]["temperature"] == T_REFLECT and refl["kw"]["stop_ids"] == [eot]
    assert [tok.decode(p) for p in refl["prompts"]] == [template(tok, context_messages(f)) for f in FAILURES]
    # 2. retries: one per reflection, after context + assistant(reflection) + user(the question only, re-asked)
    assert retry["n"] == 1 and retry["kw"]["temperature"] == T_RETRY and len(retry["prompts"]) == G * len(FAILURES)
    assert retry["kw"]["resume"] is refl["kw"]["keep"] is not None  # the retries continue the reflections' KV cache
    for i, (p, s) in enumerate(zip(retry["prompts"], refl["samples"])):
        f = FAILURES[i // G]
        said = {"role": "assistant", "content": tok.decode(sampled(s))}
        reasked = {"role": "user", "content": f["example"]["q"]}
        assert tok.decode(p) == template(tok, context_messages(f) + [said, reasked])
        assert p[:len(refl["prompts"][i // G])] == refl["prompts"][i // G]  # the context's ids, as sampled from
    # 3. rewards: the known verifier on the decoded retries, in group order
    retries = [tok.decode(s.ids, skip_special_tokens=True) for s in retry["samples"]]
    assert ro.rewards.tolist() == [float(len(y) % 2 == 0) for y in retries]
    assert 0 < ro.rewards.sum() < len(ro.rewards), "all rewards equal: pick another seed, this checks nothing"
    assert [t["retry"] for t in ro.texts] == retries
    # 4. rows: context ids + the sampled reflection ids + end-of-turn; the mask on exactly the last two
    check_prompt_plus_sample_rows(ro, refl["prompts"], refl["samples"], eot)


def test_training_rows_hold_the_sampled_ids_and_their_sampled_logprobs(model, default_tok, calls):
    tok, eot = default_tok, end_of_turn_id(default_tok)
    ro = rollout(model, tok, seed=11)
    samples = calls[0]["samples"]
    respelled = sum(tok.encode(tok.decode(s.ids), add_special_tokens=False) != s.ids for s in samples)
    assert respelled > 0, "no reflection re-tokenises differently: this test would check nothing"
    with torch.no_grad():
        logp = sequence_logprobs(model, ro.ids, ro.pos, ro.mask, T_REFLECT)  # (N, T)
    worst = 0.0
    for i, s in enumerate(samples):
        assert ro.ids[i][ro.mask[i]].tolist() == sampled(s) + [eot]
        ours = logp[i][ro.mask[i]][:len(s.logprobs)]  # a cut-off sample's appended end-of-turn was not sampled
        worst = max(worst, float((ours - torch.tensor(s.logprobs)).abs().max()))
    assert worst < 1e-4, f"log-probs differ from the sampler's by up to {worst:.3g} ({respelled} rows re-spelled)"


def test_a_reflection_spelled_apart_from_bpe_is_trained_as_sampled(model, default_tok, monkeypatch):
    """' ans' + 'wer' decodes to ' answer', which re-encodes as one token: the row keeps the two."""
    tok, eot = default_tok, end_of_turn_id(default_tok)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    split = enc(" ans") + enc("wer")
    assert len(split) == 2 and len(enc(" answer")) == 1 and enc(tok.decode(split)) == enc(" answer")
    real, seen = r3.rollout.generate, []

    def forced(model, prompts, n=1, **kw):  # the first call (reflections): the split spelling; then the real sampler
        seen.append(prompts)
        if len(seen) == 1:
            return [Sample(split + [eot], "stop", None, i // n) for i in range(len(prompts) * n)]
        return real(model, prompts, n=n, **{**kw, "resume": None})  # the fake kept no KV cache: prefill it all

    monkeypatch.setattr(r3.rollout, "generate", forced)
    ro = rollout(model, tok)
    as_text = [context_messages(f) + [{"role": "assistant", "content": " answer"}] for f in FAILURES for _ in range(G)]
    text_rows, _, text_mask, _ = r3.rollout.build_batch(tok, as_text, eot)
    for i in range(len(ro.rewards)):
        assert ro.ids[i][ro.mask[i]].tolist() == split + [eot]
        assert text_rows[i][text_mask[i]].tolist() != split + [eot]  # a re-render would train other tokens
    # the log-probs of those tokens, against a per-token loop over full forwards of each row's prefix
    with torch.no_grad():
        logp = sequence_logprobs(model, ro.ids, ro.pos, ro.mask, T_REFLECT)
    start = int(ro.mask[0].nonzero()[0])
    with torch.no_grad():
        for t in range(start, start + 3):
            logits = model(ro.ids[:1, :t], ro.pos[:1, :t])[0, -1] / T_REFLECT
            ref = torch.log_softmax(logits.float(), -1)[ro.ids[0, t]]
            assert abs(float(logp[0, t]) - float(ref)) < 1e-4, (t, float(logp[0, t]), float(ref))


def test_r3_retry_mask_covers_the_reflection_and_the_retry_not_the_question(model, default_tok, calls):
    tok, eot = default_tok, end_of_turn_id(default_tok)
    ro = rollout(model, tok, method="r3_retry", seed=11)
    refl, retry = calls
    assert any(tok.encode(tok.decode(s.ids), add_special_tokens=False) != s.ids for s in refl["samples"]), \
        "no reflection re-tokenises differently: the retry prompt's ids are not put to the test"
    lengths = []
    for i, (s, y, p) in enumerate(zip(refl["samples"], retry["samples"], retry["prompts"])):
        row = p + sampled(y) + [eot]  # the retry prompt exactly as the retry was sampled after it
        assert ro.ids[i, :len(row)].tolist() == row
        assert ro.ids[i][ro.mask[i]].tolist() == sampled(s) + [eot] + sampled(y) + [eot]
        context = refl["prompts"][i // G]
        assert p[len(context):len(context) + len(sampled(s)) + 1] == sampled(s) + [eot]
        # unmasked between the two: exactly the re-asked question turn and the assistant header
        between = ro.ids[i, len(context) + len(sampled(s)) + 1:len(p)]
        assert not ro.mask[i, len(context) + len(sampled(s)) + 1:len(p)].any()
        question = FAILURES[i // G]["example"]["q"]
        reask = f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        assert between.tolist() == tok.encode(reask, add_special_tokens=False), tok.decode(between)
        lengths.append(len(row))
    check_padding(ro, lengths, eot)
    check_groups_share_prefix(ro, G)
    # the same samples and rewards as method "r3" with the same seed; only the rows and masks differ
    assert ro.rewards.tolist() == rollout(model, tok, method="r3", seed=11).rewards.tolist()


def test_grpo_mask_covers_the_first_attempts_only(model, default_tok, calls):
    tok, eot = default_tok, end_of_turn_id(default_tok)
    task, examples = EvenTask(), [f["example"] for f in FAILURES]
    ro = r3.rollout.grpo_rollout(model, tok, task, examples, group_size=G, max_new_tokens=7, temperature=T_REFLECT, seed=3)
    (call,) = calls
    assert call["n"] == G and call["kw"]["temperature"] == T_REFLECT
    assert [tok.decode(p) for p in call["prompts"]] == [
        template(tok, [{"role": "user", "content": SOLVED[0]}, {"role": "assistant", "content": SOLVED[1]},
                       {"role": "user", "content": ex["q"]}]) for ex in examples]
    attempts = [tok.decode(s.ids, skip_special_tokens=True) for s in call["samples"]]
    assert ro.rewards.tolist() == [float(len(y) % 2 == 0) for y in attempts]
    assert [t["attempt"] for t in ro.texts] == attempts
    check_prompt_plus_sample_rows(ro, call["prompts"], call["samples"], eot)


def test_two_tries_renders_the_retry_prompt_from_the_reflection_text(model, default_tok, calls):
    """The evaluation (sample.py eval) keeps its text-level retry prompt, so its numbers stay comparable."""
    class Unsolvable(EvenTask):  # every try fails, so every example gets a reflection and a retry
        def verify(self, ex, text):
            return False

    tok, task = default_tok, Unsolvable()
    rows = r3.rollout.two_tries(model, tok, task, [f["example"] for f in FAILURES], max_new_tokens=6,
                                max_reflection_tokens=8, temperature=0.0)
    first, refl, retry = calls
    for f, p, s, r in zip(FAILURES, retry["prompts"], refl["samples"], rows):
        said = {"role": "assistant", "content": tok.decode(s.ids, skip_special_tokens=True)}
        conv = task.prompt(f["example"]) + [{"role": "assistant", "content": r["attempt"]},
                                           {"role": "user", "content": task.reflection_prompt}, said]
        reasked = {"role": "user", "content": f["example"]["q"]}
        assert p == tok.encode(template(tok, conv + [reasked]), add_special_tokens=False)
        assert r["reflection"] == said["content"]


def test_unknown_method_is_refused(model, default_tok):
    with pytest.raises(ValueError, match="r3_retry"):
        rollout(model, default_tok, method="grpo")
