"""r3.grpo: the GRPO loss equals an independent float64 per-token loop, and only reflection tokens learn.

Proves: `group_advantages` and `grpo_loss` equal a plain-Python per-token reference on random inputs
(several groups, ragged masks, beta and clip active, ratio != 1 as in a second optimisation pass);
the gradient w.r.t. the hidden states is exactly zero at every position outside the reflection mask
(one position earlier, since hidden t predicts token t+1); a zero-variance group contributes exactly
zero gradient; on real rendered conversations the masked tokens decode to the reflection plus its
end-of-turn token.
"""
import math

import pytest
import torch

from conftest import ours_from_hf, tiny_hf_model
from r3.grpo import group_advantages, grpo_loss, rollout_stats, sequence_logprobs


def reference_loss(logp, old, ref, rewards, mask, G, beta, eps, scale):
    """Per-token loop in float64 Python floats: docs/method.md section 3 steps 5-9 written out."""
    N, T = len(logp), len(logp[0])
    adv = []
    for g in range(N // G):
        r = rewards[g * G:(g + 1) * G]
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        adv += [(x - mean) / (std + 1e-4) if scale == "group" else x - mean for x in r]
    total, count = 0.0, 0
    for i in range(N):
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - eps), 1 + eps)
            term = -min(rho * adv[i], clipped * adv[i])
            d = ref[i][t] - logp[i][t]
            total += term + beta * (math.exp(d) - d - 1)
            count += 1
    return total / count, adv


@pytest.mark.parametrize("scale", ["group", "none"])
def test_grpo_loss_equals_per_token_float64_loop(scale):
    g = torch.Generator().manual_seed(0)
    G, groups, T = 4, 3, 11
    N = G * groups
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3  # second pass: ratio != 1, clip binds
    ref = logp + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    rewards = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float64)  # incl. a zero-variance group
    lengths = torch.randint(1, T, (N,), generator=g)
    starts = torch.randint(0, 3, (N,), generator=g)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i in range(N):  # ragged spans
        mask[i, starts[i]:min(T, starts[i] + lengths[i])] = True
    adv = group_advantages(rewards, G, scale).double()
    loss, sums = grpo_loss(logp, old, ref, adv, mask, beta=0.04, clip_eps=0.2, num_tokens=float(mask.sum()))
    want, want_adv = reference_loss(logp.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), mask.tolist(),
                                    G, 0.04, 0.2, scale)
    assert torch.allclose(adv, torch.tensor(want_adv, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(float(loss) - want) < 1e-9, f"loss {float(loss)!r} vs reference {want!r}"
    assert 0 < sums["clipped"] < mask.sum()  # the clip was active somewhere, not everywhere


def test_zero_variance_group_has_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1]), 4)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].abs().min() > 0.5


def _tiny_batch():
    model = ours_from_hf(tiny_hf_model("qwen2", tied=True, vocab=96))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (4, 14), generator=g)
    pos = torch.arange(14).expand(4, 14)
    mask = torch.zeros(4, 14, dtype=torch.bool)
    mask[0, 5:9] = mask[1, 3:12] = mask[2, 7:8] = mask[3, 2:6] = True
    return model, ids, pos, mask


def test_gradient_is_zero_outside_reflection_positions():
    model, ids, pos, mask = _tiny_batch()
    hidden = {}

    def keep(module, inputs, output):
        output.retain_grad()
        hidden["h"] = output

    model.model.norm.register_forward_hook(keep)
    logp = sequence_logprobs(model, ids, pos, mask, temperature=0.9)
    assert torch.equal(logp != 0, mask.clone().index_fill_(1, torch.tensor([0]), False))  # token 0 has no log-prob
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, clip_eps=0.2, num_tokens=float(mask.sum()))
    loss.backward()
    grad = hidden["h"].grad.abs().sum(-1)  # (B, T): hidden t scores token t+1
    scoring = torch.zeros_like(mask)
    scoring[:, :-1] = mask[:, 1:]
    assert torch.all(grad[~scoring] == 0), f"non-zero grad outside the mask: {grad[~scoring].max():.3g}"
    assert torch.all(grad[scoring] > 0)


def test_zero_variance_group_gives_zero_grad():
    model, ids, pos, mask = _tiny_batch()
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # G=2: group 0 all-equal, group 1 mixed
    adv = group_advantages(rewards, 2)
    grads = []
    for rows in ([0, 1], [2, 3]):
        model.zero_grad()
        logp = sequence_logprobs(model, ids[rows], pos[rows], mask[rows])
        loss, _ = grpo_loss(logp, logp.detach(), None, adv[rows], mask[rows], 0.0, 0.2, float(mask.sum()))
        loss.backward()
        grads.append(sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None))
    assert grads[0] == 0.0 and grads[1] > 0


def test_rollout_stats():
    s = rollout_stats(torch.tensor([0.0, 0, 1, 0, 1, 1]), 2, torch.ones(6, 5))
    assert s == pytest.approx({"reward": 0.5, "second_try_success": 2 / 3, "zero_variance_frac": 2 / 3, "reflection_len": 5.0})


def test_mask_covers_only_reflection_tokens(default_tok):
    """On real rendered conversations the masked tokens decode to exactly reflection + <|im_end|>."""
    from r3.rollout import build_batch

    base = [{"role": "user", "content": "Using the numbers [2, 3, 4], create an equation that equals 14."},
            {"role": "assistant", "content": "2 * 3 * 4"},
            {"role": "user", "content": "You tried solving the problem and got the wrong answer. Reflect."}]
    reflections = ["I multiplied all three; 2*3*4 is 24, not 14. Try 2 + 3 * 4.",
                   "\nCheck:  the sum first, then multiply. ",
                   "🙂 Use (4 - 2) * 7? No: 7 is not given."]
    ids, pos, mask, _ = build_batch(default_tok, [base + [{"role": "assistant", "content": r}] for r in reflections],
                                 pad_id=2)
    for i, r in enumerate(reflections):
        assert default_tok.decode(ids[i][mask[i]].tolist()) == r + "<|im_end|>"
        assert not mask[i, : int(mask[i].nonzero()[0])].any()
