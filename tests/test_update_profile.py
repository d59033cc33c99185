"""bench/update_profile.py's FLOP count (`counted_flops`): the ceiling the shared-prefix update's speedup is
judged against, so it must count every matmul the update runs, and nothing twice.

Proves, on a tiny random Llama (fp32, CPU) against closed forms from its config (P = weights in the
decoder's linear layers, L layers, Hq heads of size D, vocab V, hidden H):
- a forward counts 2 FLOPs per linear weight per token plus causal attention's lower triangle;
- `sequence_logprobs` forward + backward counts 3x that (input and weight gradients: attention's backward
  is 2x its forward) plus three LM-head matmuls on the M masked tokens, the in-place addmm_ of the tied
  weight's gradient included (torch's own table leaves it out);
- an attention call with an explicit mask (the shared path's rows) counts every (query, key) pair.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ours_from_hf, tiny_hf_model
from r3.grpo import sequence_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from update_profile import counted_flops  # noqa: E402

B, T = 2, 10


@pytest.fixture()
def model():
    return ours_from_hf(tiny_hf_model("llama", tied=True, gqa=True, layers=2))


def shapes(m):
    c = m.config
    per_layer = sum(p.numel() for n, p in m.named_parameters() if n.startswith("model.layers.0.") and
                    n.endswith("proj.weight"))
    return c.num_hidden_layers * per_layer, c.num_hidden_layers, c.num_attention_heads, c.head_dim


def test_forward_counts_two_flops_per_weight_per_token_plus_the_causal_triangle(model):
    P, L, Hq, D = shapes(model)
    ids = torch.randint(3, 128, (B, T))
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        got = counted_flops(lambda: model(ids, pos, return_hidden=True))
    attention = L * 4 * B * Hq * (T * (T + 1) // 2) * D  # q k^T and p v over the lower triangle
    assert got * 1e9 == pytest.approx(2 * P * B * T + attention, rel=1e-12)


def test_logprobs_forward_and_backward_count_three_passes_and_three_lm_head_matmuls(model):
    P, L, Hq, D = shapes(model)
    V, H = model.lm_head.weight.shape
    ids = torch.randint(3, 128, (B, T))
    pos = torch.arange(T).expand(B, T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 7:9] = True
    M = int(mask[:, 1:].sum())  # 8 scored tokens

    got = counted_flops(lambda: sequence_logprobs(model, ids, pos, mask).sum().backward())
    attention = L * 4 * B * Hq * (T * (T + 1) // 2) * D
    want = 3 * (2 * P * B * T + attention) + 3 * 2 * M * H * V  # LM head: logits, grad_h, grad_W (addmm_)
    assert got * 1e9 == pytest.approx(want, rel=1e-12)


def test_attention_with_an_explicit_mask_counts_every_pair():
    q, k, v = torch.randn(3, 4, 5, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    mask = torch.rand(3, 1, 5, 9) > 0.5
    mask[..., 0] = True
    got = counted_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    assert got * 1e9 == pytest.approx(4 * 3 * 4 * 5 * 9 * 16, rel=1e-12)
