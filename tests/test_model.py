"""r3.model.Transformer computes what transformers' LlamaForCausalLM / Qwen2ForCausalLM compute.

Tiny random models of both families (tied and untied embeddings, grouped-query attention, Llama 3.1's
"llama3" rope_scaling, random q/k/v biases for Qwen2) are compared against transformers itself on the
same weights: logits within 1e-5 (fp32, CPU) and 20 greedy tokens identical. Also: hidden states feed
the LM head, explicit positions matter, and unsupported configs fail with one clear message.
"""
import pytest
import torch

from conftest import ours_from_hf, tiny_hf_model
from r3.model import ModelConfig

CASES = [
    dict(family="llama", tied=True, gqa=True),
    dict(family="llama", tied=False, gqa=False),
    dict(family="llama", tied=False, gqa=True, llama3_rope=True),
    dict(family="qwen2", tied=True, gqa=True),
    dict(family="qwen2", tied=False, gqa=True),
]


def _greedy(forward, ids, steps):
    for _ in range(steps):
        nxt = forward(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logits_match_transformers(case):
    hf = tiny_hf_model(**case)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (3, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    diff = (ref - got).abs()
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_greedy_20_tokens_identical_to_transformers(case):
    hf = tiny_hf_model(**case)
    ours = ours_from_hf(hf)
    prompt = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _greedy(lambda x: hf(x).logits, prompt, 20)
        got = _greedy(ours, prompt, 20)
    assert torch.equal(ref, got), f"transformers {ref[:, 7:].tolist()} vs ours {got[:, 7:].tolist()}"


def test_hidden_states_feed_lm_head():
    ours = ours_from_hf(tiny_hf_model("qwen2", tied=False))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        h = ours(ids, return_hidden=True)
        assert h.shape == (2, 9, 64)
        torch.testing.assert_close(ours.lm_head(h), ours(ids), rtol=0, atol=0)


def test_explicit_positions_shift_rope():
    """Positions are an input: positions 0..T-1 equal the default, and a gap in them changes the logits
    (a uniform shift would not: RoPE scores depend only on relative positions)."""
    ours = ours_from_hf(tiny_hf_model("llama"))
    ids = torch.randint(0, 128, (1, 6))
    pos = torch.arange(6)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pos), ours(ids), rtol=0, atol=0)
        gap = torch.tensor([[0, 1, 2, 9, 10, 11]])
        assert (ours(ids, gap) - ours(ids, pos))[:, 3:].abs().max() > 1e-4


def test_old_and_new_rope_spellings_agree():
    old = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 123.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16}}
    new = {k: v for k, v in old.items() if not k.startswith("rope")}
    new["rope_parameters"] = dict(old["rope_scaling"], rope_theta=123.0)
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(new)
    assert ModelConfig.from_hf(new).rope_theta == 123.0 and ModelConfig.from_hf(new).head_dim == 4


@pytest.mark.parametrize("hf", [
    {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
    {"model_type": "gpt2"},
])
def test_unsupported_architecture_names_what_is_supported(hf):
    with pytest.raises(ValueError, match=r"unsupported model.*LlamaForCausalLM, Qwen2ForCausalLM"):
        ModelConfig.from_hf(hf)
