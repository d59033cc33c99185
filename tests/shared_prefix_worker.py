"""Shared-prefix vs per-row GRPO update, under torchrun or as a plain process (run by tests/test_shared_prefix.py).

Also the home of two helpers that test file imports: `group_batch` (a random group-major R3-like batch)
and `local_update` (the GRPO update loop of train.py, with the log-prob function as a switch).

As a script: every rank builds the same tiny random Qwen2 and the same global batch (seeded), takes its
contiguous share of whole groups, shards the model with FSDP2 (a no-op at world size 1), runs two PPO
epochs with the per-row log-probs and then, from the same start, with the shared-prefix log-probs, and
prints on rank 0 one JSON line: loss and gradient norm of each.

NOTE: `local_update` stands in for `r3.grpo.update` until that takes a `shared_prefix` switch; the
math is train.py's (old = stored or detached log-probs, reference log-probs from a frozen model, the
loss normalised by the global count of masked tokens, x world because FSDP averages gradients).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from r3 import dist  # noqa: E402
from r3.grpo import grpo_loss, sequence_logprobs, shared_prefix_logprobs  # noqa: E402
from r3.model import ModelConfig, Transformer  # noqa: E402

HF = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def group_batch(groups: int, G: int, T: int, vocab: int, seed: int) -> dict:
    """A random R3-like batch (ids, pos, mask, advantages), rows group-major and right padded.

    Group g has a context of its own length (shared by its G rows); each row continues with a masked
    reflection of its own length (1 to 9 tokens, different within a group), then unmasked retry tokens,
    then padding id 0. Different rows differ from the first reflection token on."""
    g = torch.Generator().manual_seed(seed)
    N = groups * G
    ids = torch.randint(1, vocab, (N, T), generator=g)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for k in range(groups):
        c = 3 + 5 * k % (T // 2)  # context length of group k
        ids[k * G:(k + 1) * G, :c] = ids[k * G, :c].clone()
        for j in range(G):
            r = k * G + j
            n_ref = 1 + (3 * j + k) % 9
            mask[r, c:c + n_ref] = True
            end = min(T, c + n_ref + int(torch.randint(0, 6, (1,), generator=g)))
            ids[r, end:] = 0  # right padding
    return {"ids": ids, "pos": torch.arange(T).expand(N, T).clone(), "mask": mask,
            "advantages": torch.randn(N, generator=g)}


def local_update(policy, ref, batch: dict, opt, *, micro_batch: int, ppo_epochs: int, temperature: float, beta: float,
                 clip_eps: float, grad_clip: float, world: int = 1, group_size: int = 1, shared: bool = False,
                 keep_grads: bool = False) -> list[dict]:
    """train.py's update on this rank's rows; micro-batches of whole groups (micro_batch a multiple of G).
    Returns one dict per epoch: loss, grad_norm, the log-probs of each micro-batch and, with `keep_grads`,
    every parameter's gradient (before clipping and the step)."""
    def logprobs(model, i, p, m):
        return shared_prefix_logprobs(model, i, p, m, group_size, temperature) if shared else \
            sequence_logprobs(model, i, p, m, temperature)

    assert micro_batch % group_size == 0
    ids, pos, mask, adv = batch["ids"], batch["pos"], batch["mask"], batch["advantages"]
    chunks = [slice(i, min(i + micro_batch, ids.shape[0])) for i in range(0, ids.shape[0], micro_batch)]

    def trimmed(s):  # as train.update: cut each micro-batch to its longest masked row
        T = int(mask[s].nonzero()[:, 1].max()) + 1 if mask[s].any() else 1
        return ids[s, :T], pos[s, :T], mask[s, :T]

    micro = [trimmed(s) for s in chunks]
    with torch.no_grad():
        old = [logprobs(policy, *mb) for mb in micro] if ppo_epochs > 1 else [None] * len(micro)
        refs = [logprobs(ref, *mb) for mb in micro] if beta > 0 else [None] * len(micro)
    num_tokens = float(dist.all_reduce_sum(mask.sum().float().clone()))
    epochs = []
    for _ in range(ppo_epochs):
        total, lps = 0.0, []
        for s, (i, p, m), o, r in zip(chunks, micro, old, refs):
            logp = logprobs(policy, i, p, m)
            loss, _ = grpo_loss(logp, o if o is not None else logp.detach(), r, adv[s], m, beta, clip_eps, num_tokens)
            (loss * world).backward()
            total += float(loss.detach())
            lps.append(logp.detach())
        grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()} if keep_grads else None
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(dist.all_reduce_sum(torch.tensor([total]))[0])
        epochs.append({"loss": loss, "grad_norm": float(grad_norm), "logp": lps, "grads": grads})
    return epochs


def main():
    rank, world, device = dist.init()
    torch.set_num_threads(1)
    G, groups, T = 2, 4, 24
    batch = group_batch(groups, G, T, HF["vocab_size"], seed=1)
    rows = slice(rank * groups // world * G, (rank + 1) * groups // world * G)  # whole groups per rank
    mine = {k: v[rows] for k, v in batch.items()}
    out = {}
    for shared in (False, True):
        torch.manual_seed(0)
        policy, ref = Transformer(ModelConfig.from_hf(HF)), Transformer(ModelConfig.from_hf(HF))
        ref.load_state_dict(policy.state_dict())
        with torch.no_grad():  # make the reference differ so the KL term is not zero
            for p in ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
        policy, ref = dist.shard(policy, mixed_bf16=False), dist.shard(ref, mixed_bf16=False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        ep = local_update(policy, ref, mine, opt, micro_batch=G, ppo_epochs=2, temperature=0.7, beta=0.05,
                          clip_eps=0.2, grad_clip=1.0, world=world, group_size=G, shared=shared)
        out["shared" if shared else "rows"] = [{"loss": e["loss"], "grad_norm": e["grad_norm"]} for e in ep]
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
