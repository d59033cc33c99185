"""Shared-prefix vs per-row GRPO update, under torchrun or as a plain process (run by tests/test_shared_prefix.py).

Also the home of the helpers that test file imports: `group_batch` (a random group-major R3-like batch),
`traced` (records what `r3.grpo.update` gets from its log-prob functions and `grpo_loss`, passing every call
through unchanged) and `recording` (an optimizer class whose step() first keeps each parameter's gradient).
They observe `r3.grpo.update`, the loop train.py runs; they do not copy it.

As a script: every rank builds the same tiny random Qwen2 and the same global batch (seeded), takes its
contiguous share of whole groups, shards the model with FSDP2 (a no-op at world size 1), runs
`r3.grpo.update` (two PPO epochs) with shared_prefix off and then, from the same start, on, and prints
on rank 0 one JSON line: for each, the loss and gradient norm of each epoch and update's returned dict.
"""
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import r3.grpo  # noqa: E402
from r3 import dist  # noqa: E402
from dist_worker import HF, policy_and_reference  # noqa: E402

NO_CLIP = 1e30  # grad_clip: clip_grad_norm_ then multiplies every gradient by exactly 1.0


def group_batch(groups: int, G: int, T: int, vocab: int, seed: int) -> dict:
    """A random R3-like batch (ids, pos, mask, context_lens, advantages), rows group-major and right padded.

    Group g has a context of its own length (shared by its G rows); each row continues with a masked
    reflection of its own length (1 to 9 tokens, different within a group), then unmasked retry tokens,
    then padding id 0. Different rows differ from the first reflection token on."""
    g = torch.Generator().manual_seed(seed)
    N = groups * G
    ids = torch.randint(1, vocab, (N, T), generator=g)
    mask = torch.zeros(N, T, dtype=torch.bool)
    context_lens = torch.zeros(N, dtype=torch.long)
    for k in range(groups):
        c = 3 + 5 * k % (T // 2)  # context length of group k
        context_lens[k * G:(k + 1) * G] = c
        ids[k * G:(k + 1) * G, :c] = ids[k * G, :c].clone()
        for j in range(G):
            r = k * G + j
            n_ref = 1 + (3 * j + k) % 9
            mask[r, c:c + n_ref] = True
            end = min(T, c + n_ref + int(torch.randint(0, 6, (1,), generator=g)))
            ids[r, end:] = 0  # right padding
    return {"ids": ids, "pos": torch.arange(T).expand(N, T).clone(), "mask": mask, "context_lens": context_lens,
            "advantages": torch.randn(N, generator=g)}


@contextlib.contextmanager
def traced():
    """Within the block, r3.grpo's `sequence_logprobs`, `shared_prefix_logprobs` and `grpo_loss` (the names
    `update` looks up when it calls them) record their results; each call passes through unchanged.
    Yields {"logp": [(path, group_size, (B, T) log-probs)], "loss": [micro-batch loss]}, in call order:
    the old and reference log-probs of every micro-batch, then each epoch's micro-batches. `path` is
    "shared" or "rows"; a call made inside another (shared_prefix_logprobs falling back to
    sequence_logprobs) is not recorded on its own."""
    names = ("sequence_logprobs", "shared_prefix_logprobs", "grpo_loss")
    orig = {n: getattr(r3.grpo, n) for n in names}
    trace, depth = {"logp": [], "loss": []}, [0]

    def wrap(name):
        def call(*args, **kwargs):
            depth[0] += 1
            try:
                out = orig[name](*args, **kwargs)
            finally:
                depth[0] -= 1
            if name == "grpo_loss":
                trace["loss"].append(float(out[0].detach()))
            elif depth[0] == 0:
                G = args[5] if name == "shared_prefix_logprobs" else 1
                trace["logp"].append(("shared" if G > 1 else "rows", G, out.detach().clone()))
            return out
        return call

    for n in names:
        setattr(r3.grpo, n, wrap(n))
    try:
        yield trace
    finally:
        for n in names:
            setattr(r3.grpo, n, orig[n])


def recording(opt_cls):
    """`opt_cls` (a torch optimizer taking named parameters here) whose step() first keeps, per step, a
    clone of every parameter's gradient as `update` leaves it (after clip_grad_norm_) in `grads` and their
    global L2 norm in `norms` (DTensor gradients of FSDP2 reduced to the full norm)."""
    class Recording(opt_cls):
        def __init__(self, named_params, **kwargs):
            named = list(named_params)
            super().__init__([p for _, p in named], **kwargs)
            self.names, self.grads, self.norms = [n for n, _ in named], [], []

        def step(self, closure=None):
            params = self.param_groups[0]["params"]
            self.grads.append({n: p.grad.detach().clone() for n, p in zip(self.names, params)})
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            self.norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            return super().step(closure)
    return Recording


def main():
    rank, world, device = dist.init()
    torch.set_num_threads(1)
    G, groups, T = 2, 4, 24
    batch = group_batch(groups, G, T, HF["vocab_size"], seed=1)
    rows = slice(rank * groups // world * G, (rank + 1) * groups // world * G)  # whole groups per rank
    mine = {k: v[rows] for k, v in batch.items()}
    out = {}
    for shared in (False, True):
        policy, ref = policy_and_reference()  # the same tiny Qwen2 as tests/dist_worker.py
        policy, ref = dist.shard(policy, mixed_bf16=False), dist.shard(ref, mixed_bf16=False)
        # AdamW (nearly scale-free) with clipping off, so the recorded norms are update's unclipped ones
        opt = recording(torch.optim.AdamW)(policy.named_parameters(), lr=1e-3)
        with traced() as trace:
            stats = r3.grpo.update(policy, ref, mine, opt, micro_batch=G, ppo_epochs=2, temperature=0.7, beta=0.05,
                                   clip_eps=0.2, grad_clip=NO_CLIP, world=world, group_size=G, shared_prefix=shared)
        paths = sorted({p for p, _, _ in trace["logp"]})
        n = len(trace["loss"]) // 2  # micro-batches per epoch
        losses = dist.all_reduce_sum(torch.tensor([sum(trace["loss"][:n]), sum(trace["loss"][n:])]))
        out["shared" if shared else "rows"] = {
            "epochs": [{"loss": float(losses[e]), "grad_norm": opt.norms[e]} for e in range(2)],
            "update": stats, "paths": paths}
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.shutdown()
    dist.exit_now(0)  # past Python's teardown, which can race gloo's threads (r3/dist.py)


if __name__ == "__main__":
    main()
