"""Run by tests/test_train.py, under torchrun or as a plain process: one `r3.grpo.update` on a fixed batch.

Every rank builds the same tiny random model and the same global batch (seeded), takes its contiguous
share of the rows, shards the model with FSDP2 (a no-op at world size 1) and prints, on rank 0, the
loss and gradient norm of one optimizer step as a JSON line.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from r3 import dist  # noqa: E402
from r3.grpo import update  # noqa: E402
from r3.model import ModelConfig, Transformer  # noqa: E402

HF = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def policy_and_reference():
    """The same tiny random Qwen2 policy on every rank, and a reference 1% away (so the KL term is not zero)."""
    torch.manual_seed(0)
    policy, ref = Transformer(ModelConfig.from_hf(HF)), Transformer(ModelConfig.from_hf(HF))
    ref.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return policy, ref


def main():
    rank, world, device = dist.init()
    torch.set_num_threads(1)
    policy, ref = policy_and_reference()
    g = torch.Generator().manual_seed(1)
    N, T = 8, 20
    ids = torch.randint(0, 97, (N, T), generator=g)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i in range(N):
        s = int(torch.randint(2, 8, (1,), generator=g))
        mask[i, s:s + int(torch.randint(1, 12, (1,), generator=g))] = True
    adv = torch.randn(N, generator=g)
    knobs = dict(micro_batch=2, beta=0.05, clip_eps=0.2, ppo_epochs=2, temperature=0.9, grad_clip=1.0)
    policy, ref = dist.shard(policy, mixed_bf16=False), dist.shard(ref, mixed_bf16=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    batch = {"ids": ids[rows], "pos": torch.arange(T).expand(N, T)[rows], "mask": mask[rows], "advantages": adv[rows]}
    with dist.unsharded(policy), torch.no_grad():  # as train.py: sample with gathered weights, then update
        policy(batch["ids"][:1])
    out = update(policy, ref, batch, opt, **knobs, world=world)
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.shutdown()
    dist.exit_now(0)  # past Python's teardown, which can race gloo's threads (r3/dist.py)


if __name__ == "__main__":
    main()
