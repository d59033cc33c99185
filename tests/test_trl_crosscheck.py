"""r3's GRPO step equals TRL's: on one fixed batch of rollouts, loss and every gradient match GRPOTrainer._compute_loss.

Proves: r3.grpo (`group_advantages`, `sequence_logprobs`, `grpo_loss`, accumulated over micro-batches as
train.update does) computes the same objective as TRL 1.16's `GRPOTrainer` configured as the paper ran it
(docs/method.md section 3: the GRPO "completion" is the reflection; loss_type="dapo", i.e. token-level
normalisation over the whole accumulated batch; scale_rewards="group"; the same beta, epsilon, temperature).
TRL is driven through its own `_compute_loss` with the inputs dict that its `_generate_and_score_completions`
builds, in its layout (left-padded prompt, right-padded completion, `num_items_in_batch`), split into two
micro-batches of gradient accumulation exactly as the trainer splits a generation batch.

The batch is r3's: conversations user(task) / assistant(failed attempt) / user(reflection prompt) /
assistant(reflection), rendered by `build_batch`; the reflection mask becomes TRL's completion mask.
Each side computes the policy's log-probs on its own model (r3's Transformer and masked log-prob kernel;
transformers' Llama with TRL's fused LM head) and the reference log-probs on its own frozen copy. Old
log-probs are a shared input: absent (the first pass, ratio 1, as in training) or shifted so that the ratio
is not 1 and the clip binds (a second pass). Compared: advantages, per-token log-probs, loss, gradient norm
and every parameter's gradient.

One difference is real and is checked as such: transformers builds `nn.Embedding(..., padding_idx=pad_token_id)`,
so the input-embedding row of the pad token gets no gradient from its lookups. SmolLM2's pad token is its
end-of-turn token `<|im_end|>` (id 2), which closes every turn, so under TRL that row learns only through the
tied LM head; r3's embedding has no padding_idx and also trains it through its lookups. The test subtracts
exactly that lookup gradient from r3's row and then requires equality everywhere.

Skipped when trl is not importable: it is a test-only dependency (`pip install trl==1.16.0`, or
`bash bench/setup_trl.sh`).
"""
import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed: pip install trl==1.16.0 (see bench/setup_trl.sh)")

from conftest import ParityTask, ours_from_hf  # noqa: E402
from r3.checkpoint import load_hf  # noqa: E402
from r3.grpo import group_advantages, grpo_loss, sequence_logprobs  # noqa: E402
from r3.rollout import build_batch, end_of_turn_id, reflection_context  # noqa: E402

G = 4  # reflections per failure
MICRO = 4  # sequences per micro-batch: two micro-batches of gradient accumulation, as TRL splits them
TEMPERATURE = 0.9
EPS = 0.2
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # two groups of G, neither of zero variance
FAILURES = [({"q": "Say something, 0."}, "Something."),
            ({"q": "Name three prime numbers and explain briefly why each one is prime."}, "4, 6 and 8 are prime.")]
REFLECTIONS = ["I said one word; the length was odd.", "", "Be longer next time, and check the parity of the length.",
               "Odd.", "4, 6 and 8 are even, so none is prime. Use 2, 3, 5: divisible only by 1 and themselves.",
               "Primes!", "List 2, 3 and 5.", "I should have checked each number for divisors other than 1 and itself."]


def trl_layout(ids: torch.Tensor, mask: torch.Tensor, pad_id: int):
    """r3's rows (N, T) -> TRL's prompt (N, P) left-padded and completion (N, C) right-padded; the
    completion is exactly the masked span (the reflection + its end-of-turn token)."""
    starts, lengths = mask.int().argmax(1), mask.sum(1)
    P, C = int(starts.max()), int(lengths.max())
    N = ids.shape[0]
    prompt_ids, prompt_mask = torch.full((N, P), pad_id), torch.zeros(N, P, dtype=torch.long)
    completion_ids, completion_mask = torch.full((N, C), pad_id), torch.zeros(N, C, dtype=torch.long)
    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        prompt_ids[i, P - s:], prompt_mask[i, P - s:] = ids[i, :s], 1
        completion_ids[i, :n], completion_mask[i, :n] = ids[i, s:s + n], 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def to_completion(x: torch.Tensor, mask: torch.Tensor, C: int) -> torch.Tensor:
    """Per-token values in r3's layout (N, T) -> TRL's completion layout (N, C), 0 on padding."""
    out = torch.zeros(x.shape[0], C, dtype=x.dtype)
    for i in range(x.shape[0]):
        v = x[i][mask[i]]
        out[i, :len(v)] = v
    return out


@pytest.fixture(scope="module")
def batch(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    task = ParityTask()
    convs = [reflection_context(task, ex, attempt) + [{"role": "assistant", "content": REFLECTIONS[i]}]
             for i, (ex, attempt) in enumerate(f for f in FAILURES for _ in range(G))]
    ids, pos, mask, _ = build_batch(tok, convs, pad_id=end_of_turn_id(tok))
    return tok, ids, pos, mask, torch.tensor(REWARDS)


def make_trainer(tiny_dir, tok, beta, tmp_path):
    """A GRPOTrainer configured like bench/trl_step.py: one generation batch of 2 failures x G, split into
    micro-batches of MICRO, fp32, no gradient checkpointing. Its policy is then moved away from the
    reference (seeded noise) so that the KL term and its gradient are not zero."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=MICRO,
                      gradient_accumulation_steps=len(REWARDS) // MICRO, num_generations=G, max_completion_length=32,
                      temperature=TEMPERATURE, beta=beta, epsilon=EPS, loss_type="dapo", scale_rewards="group",
                      num_iterations=1, bf16=False, activation_checkpointing=False, use_cpu=True, report_to="none",
                      logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0,
                      # TRL >= 1.x multiplies the KL term by the (differentiable) ratio by default, which
                      # changes the KL gradient even on-policy; the paper's TRL and r3 use plain k3
                      use_bias_correction_kl=False)

    def unused_reward(completions, **kwargs):
        return [0.0] * len(completions)

    dataset = Dataset.from_list([{"prompt": reflection_context(ParityTask(), ex, a)} for ex, a in FAILURES])
    trainer = GRPOTrainer(model=str(tiny_dir), reward_funcs=unused_reward, args=args, train_dataset=dataset,
                          processing_class=tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return trainer


def embedding_lookup_recorder(model) -> list:
    """Keep every (ids, embedding output) of `model`'s forwards, with the output's gradient retained."""
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append((inputs[0], out))

    model.model.embed_tokens.register_forward_hook(keep)
    return seen


def grad_dict(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case,beta", [("first_pass", 0.001), ("second_pass", 0.04)])
def test_loss_and_grads_match_trl_compute_loss(batch, tiny_dir, tmp_path, case, beta):
    from trl.trainer.utils import nanstd

    tok, ids, pos, mask, rewards = batch
    trainer = make_trainer(tiny_dir, tok, beta, tmp_path)
    policy, N = trainer.model, ids.shape[0]

    # 1. advantages: r3's against TRL's formula (its nanstd, eps 1e-4)
    adv = group_advantages(rewards, G, "group")
    r = rewards.view(-1, G)
    trl_adv = ((r - r.mean(1, keepdim=True)) / (nanstd(r, dim=1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(adv, trl_adv, atol=1e-6), (adv, trl_adv)

    # 2. r3: the same weights in our Transformer; reference = the unperturbed checkpoint, loaded by r3
    ours, ours_ref = ours_from_hf(policy), load_hf(tiny_dir).requires_grad_(False)
    pad_id = policy.model.embed_tokens.padding_idx
    assert pad_id == end_of_turn_id(tok)  # transformers' padding_idx is the end-of-turn token here (see docstring)
    lookups = embedding_lookup_recorder(ours)
    with torch.no_grad():
        ref_r3 = sequence_logprobs(ours_ref, ids, pos, mask, TEMPERATURE)
    old_r3 = None
    if case == "second_pass":  # a shared old policy: the ratio is not 1 and the clip binds on some tokens
        g = torch.Generator().manual_seed(2)
        old_r3 = (ref_r3 + torch.randn(ids.shape, generator=g) * 0.3) * mask

    # 3. TRL: the inputs dict of _generate_and_score_completions, reference log-probs from its own ref_model
    prompt_ids, prompt_mask, completion_ids, completion_mask = trl_layout(ids, mask, pad_id)
    C = completion_ids.shape[1]
    full_ids, full_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        ref_trl, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, full_ids, full_mask, C)
    diff = (ref_trl * completion_mask - to_completion(ref_r3, mask, C)).abs().max()
    assert diff < 1e-4, f"reference log-probs differ by {diff:.3g}"
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv, "ref_per_token_logps": ref_trl,
              "num_items_in_batch": completion_mask.sum()}
    if old_r3 is not None:
        inputs["old_per_token_logps"] = to_completion(old_r3, mask, C)

    # 4. two micro-batches, gradients accumulated. TRL in train mode ("dapo" divides by the tokens of the whole
    # generation batch); r3 as train.update does (num_tokens = the whole batch's reflection tokens)
    policy.train()
    trainer.current_gradient_accumulation_steps = N // MICRO
    num_tokens, loss_trl, loss_r3, clipped = float(mask.sum()), 0.0, 0.0, 0.0
    for s in (slice(i, i + MICRO) for i in range(0, N, MICRO)):
        lt = trainer._compute_loss(policy, {k: (v[s] if v.ndim else v) for k, v in inputs.items()})
        lt.backward()
        loss_trl += float(lt.detach())
        logp = sequence_logprobs(ours, ids[s], pos[s], mask[s], TEMPERATURE)
        lr, sums = grpo_loss(logp, old_r3[s] if old_r3 is not None else logp.detach(), ref_r3[s], adv[s], mask[s],
                             beta, EPS, num_tokens)
        lr.backward()
        loss_r3 += float(lr.detach())
        clipped += sums["clipped"]
        with torch.no_grad():
            trl_logp, _, _ = trainer._get_per_token_logps_and_entropies(policy, full_ids[s], full_mask[s], C)
        diff = (trl_logp * completion_mask[s] - to_completion(logp.detach(), mask[s], C)).abs().max()
        assert diff < 1e-4, f"policy log-probs differ by {diff:.3g}"
    if case == "second_pass":
        assert clipped > 0, "the clip never bound: the second-pass case tests nothing beyond the first"

    # 5. loss and gradients; r3's pad row minus its lookup gradient (what transformers' padding_idx drops)
    assert abs(loss_trl - loss_r3) < 1e-5 * max(1.0, abs(loss_r3)), f"loss TRL {loss_trl!r} vs r3 {loss_r3!r}"
    trl_grads, r3_grads = grad_dict(policy), grad_dict(ours)
    raw_norm_r3 = torch.sqrt(sum((g ** 2).sum() for g in r3_grads.values()))
    pad_lookup = sum(out.grad[i == pad_id].sum(0) for i, out in lookups)  # (H,)
    assert float(pad_lookup.norm()) > 0
    r3_grads["model.embed_tokens.weight"][pad_id] -= pad_lookup
    assert trl_grads.keys() == r3_grads.keys()
    norm_trl = torch.sqrt(sum((g ** 2).sum() for g in trl_grads.values()))
    norm_r3 = torch.sqrt(sum((g ** 2).sum() for g in r3_grads.values()))
    assert norm_r3 > 0
    assert abs(norm_trl - norm_r3) < 1e-4 * norm_r3, f"grad norm TRL {float(norm_trl):.6g} vs r3 {float(norm_r3):.6g}"
    worst = max(trl_grads, key=lambda n: float((trl_grads[n] - r3_grads[n]).abs().max()))
    err = float((trl_grads[worst] - r3_grads[worst]).abs().max())
    assert err < 1e-4 * float(norm_r3), f"{worst}: gradients differ by {err:.3g} (grad norm {float(norm_r3):.3g})"
    print(f"{case}: loss TRL {loss_trl:.8f} r3 {loss_r3:.8f}; grad norm TRL {float(norm_trl):.6f} r3 "
          f"{float(norm_r3):.6f} (raw {float(raw_norm_r3):.6f}, pad-row lookup grad {float(pad_lookup.norm()):.4f}); "
          f"max |grad diff| {err:.2e} ({worst})")
