"""GRPO on the reflection tokens: group advantages, masked log-probs, the clipped loss with KL, statistics.

docs/method.md section 3, steps 5-9:
    A_i     = (r_i - mean(r_group)) / (std(r_group) + eps)          scale="group"  (or r_i - mean: "none")
    rho_t   = exp(logp_t - logp_old_t)
    loss_t  = -min(rho_t * A, clip(rho_t, 1 - clip_eps, 1 + clip_eps) * A) + beta * k3_t
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss    = sum over reflection tokens of loss_t / (number of reflection tokens in the global batch)
The reflection mask is the only thing that decides which tokens learn (rollout.py builds it).

Log-probs come from `r3.kernels.logprobs.token_logprobs`: the model returns hidden states, only the masked
positions go through the LM head (in row chunks), so no [B, T, V] tensor is ever built.

`update` minimises this loss over micro-batches (gradient accumulation, the global token count reduced
over ranks, clip, one optimizer step per PPO epoch): what train.py, the benches and the distributed test share.

It does not: sample (rollout.py), schedule the learning rate or decide when to skip a step (train.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r3.kernels.logprobs import token_logprobs
from r3.model import SharedPrefix


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) ordered group-major (N = groups * G) -> advantages (N,). A group whose rewards are
    all equal gets exactly 0, so it contributes no gradient."""
    if scale not in ("group", "none"):
        raise ValueError(f"advantage scale must be 'group' or 'none', got {scale!r}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # (groups, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def sequence_logprobs(model, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) at every position where mask[t] (0 elsewhere), under `model` with logits
    divided by `temperature` (the distribution the reflections were sampled from, as TRL does).

    ids, pos, mask: (B, T) -> (B, T) float32. Token t is predicted by the hidden state at t-1.
    """
    hidden = model(ids, pos, return_hidden=True)  # (B, T, H)
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    lp = token_logprobs(hidden[:, :-1], model.lm_head.weight, ids[:, 1:], mask[:, 1:].bool(), temperature)
    out[:, 1:] = lp  # (B, T-1) -> aligned with the token it scores
    return out


@dataclass
class SharedPack:
    """A batch split for the shared-prefix forward: each group's context once, each row's suffix after it."""
    prefix: SharedPrefix  # ids, pos (Gn, Tc) and lengths (Gn,) of the contexts, G rows per group
    ids: torch.Tensor  # (B, Ts) each row's suffix: from its context's last token to its last masked token
    pos: torch.Tensor  # (B, Ts)
    mask: torch.Tensor  # (B, Ts) the masked tokens of the suffix
    cols: torch.Tensor  # (B, Ts) the column of the row each suffix token came from

    def tokens(self) -> int:
        """Token slots the forward runs: contexts + suffixes, both padded."""
        return self.prefix.ids.numel() + self.ids.numel()


def shared_prefix_pack(ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, context_lens: torch.Tensor,
                       group_size: int) -> SharedPack | None:
    """Split rows for `shared_prefix_logprobs`, or None when the padded pack would hold more tokens than
    the B * T of the rows (very uneven groups, or G = 1). See that function for the rules."""
    B, T = ids.shape
    G, Gn = group_size, B // group_size
    if B % G:
        raise ValueError(f"shared-prefix log-probs: {B} rows is not a whole number of groups of {G}")
    col = torch.arange(T, device=ids.device)
    L = context_lens.to(ids.device).view(Gn, G)
    if (L != L[:, :1]).any():
        g = int((L != L[:, :1]).any(dim=1).nonzero()[0])
        raise ValueError(f"shared-prefix log-probs: group {g}'s rows have context lengths {L[g].tolist()}; rows must "
                         f"be group-major with group_size={G} (or turn shared_prefix off)")
    s = torch.clamp(L[:, 0], min=1)  # (Gn,) each group's first trained position (token 0 has no predictor)
    before = col < s.repeat_interleave(G)[:, None]  # (B, T) positions before the group's first trained one
    differs = (ids != ids[::G].repeat_interleave(G, 0)) | (pos != pos[::G].repeat_interleave(G, 0))
    bad = ((differs | mask.bool()) & before).nonzero()
    if len(bad):
        r, t = (int(x) for x in bad[0])
        raise ValueError(f"shared-prefix log-probs: row {r} differs from row {r - r % G} (the first of its group of "
                         f"{G}) at position {t}, before the group's first trained position {int(s[r // G])}, or is "
                         f"masked there; rows must share their context and be trained only after it (or turn "
                         f"shared_prefix off)")
    ctx_len = s - 1  # (Gn,) tokens shared by the whole group before its suffixes
    Tc = int(ctx_len.max())
    last = torch.where(mask.bool(), col, -1).max(dim=1).values  # (B,) last masked position, -1 if none
    start = s.repeat_interleave(G) - 1  # (B,) each suffix starts at its context's last token
    n = torch.clamp(last + 1 - start, min=1)  # (B,) suffix lengths
    Ts = int(n.max())
    if Gn * Tc + B * Ts > B * T:
        return None
    cols = torch.clamp(start[:, None] + col[:Ts], max=T - 1)  # (B, Ts)
    suf_mask = mask.bool().gather(1, cols) & (col[:Ts] < n[:, None])  # (B, Ts)
    prefix = SharedPrefix(ids[::G, :Tc], pos[::G, :Tc], ctx_len, G)
    return SharedPack(prefix, ids.gather(1, cols), pos.gather(1, cols), suf_mask, cols)


def shared_prefix_logprobs(model, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                           context_lens: torch.Tensor, group_size: int, temperature: float = 1.0) -> torch.Tensor:
    """`sequence_logprobs` with each group's context encoded once: the same (B, T) float32 result (0 where
    mask is 0) and the same gradients, from about a third of the tokens on R3's batches.

    ids, pos, mask: (B, T), rows group-major (group g = rows g*G .. g*G+G-1), right padded; context_lens
    (B,): the tokens before each row's first trained one (r3.rollout.Rollout.context_lens). A group's rows
    must have the same context length L, hold the same tokens and positions before it, and have no masked
    token there (ValueError otherwise). The group's context ids[g*G, :L-1] is encoded once; row r's
    suffix is ids[r, L-1 : e_r] with e_r its last masked position + 1: it starts with the context's last
    token, whose hidden state predicts the first trained token, so the usual shift by one works inside the
    suffix. Tokens after e_r cannot change a masked log-prob (attention is causal) and are not computed.
    When the packed tokens (Gn * Tc contexts + B * Ts suffixes, both padded) would outnumber the B * T of
    the rows, it runs `sequence_logprobs` instead, so it never processes more tokens than the per-row path.
    """
    pack = shared_prefix_pack(ids, pos, mask, context_lens, group_size)
    if pack is None:
        return sequence_logprobs(model, ids, pos, mask, temperature)
    hidden = model(pack.ids, pack.pos, return_hidden=True, prefix=pack.prefix)  # (B, Ts, H)
    sel = pack.mask[:, 1:]  # (B, Ts-1) the masked tokens, each once (padding repeats column T-1: not selected)
    lp = token_logprobs(hidden[:, :-1], model.lm_head.weight, pack.ids[:, 1:], sel, temperature)
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(sel)
    out[rows[sel], pack.cols[:, 1:][sel]] = lp[sel]
    return out


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float, clip_eps: float, num_tokens: float) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO loss over masked tokens, normalised by `num_tokens` (the count of reflection
    tokens in the whole global batch: all micro-batches, all ranks), plus per-micro-batch sums for logging.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). Returns (loss, sums) where `sums` holds
    token sums (kl, clipped) that the caller adds up and divides by `num_tokens` too.
    """
    m = mask.float()
    ratio = torch.exp(logp - old_logp)  # (B, T); exactly 1 on the first pass over a batch
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if beta > 0 and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    loss = (per_token * m).sum() / num_tokens
    clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))  # where the clip binds
    sums = {"kl": float((kl.detach() * m).sum()), "clipped": float((clipped.float() * m).sum())}
    return loss, sums


def rollout_stats(rewards: torch.Tensor, group_size: int, mask: torch.Tensor) -> dict:
    """Logging statistics of one batch of rollouts (rewards (N,), mask (N, T))."""
    r = rewards.float().view(-1, group_size)
    return {
        "reward": float(r.mean()),  # mean reward = success rate of the retries
        "second_try_success": float((r.max(dim=1).values > 0).float().mean()),  # failures fixed by >= 1 of G retries
        "zero_variance_frac": float((r.max(dim=1).values == r.min(dim=1).values).float().mean()),
        # credited tokens per row incl. end-of-turn: the reflection under --method=r3, reflection + retry under
        # r3_retry, the attempt under grpo (the key keeps the paper's name)
        "reflection_len": float(mask.float().sum(dim=1).mean()),
    }


@dataclass
class MicroBatch:
    """One micro-batch of `update`: its rows of the rank's batch, cut after their last masked column."""
    rows: slice
    ids: torch.Tensor  # (b, t)
    pos: torch.Tensor  # (b, t)
    mask: torch.Tensor  # (b, t)
    context_lens: torch.Tensor | None  # (b,) on the shared-prefix path (groups of group_size rows); None: per row
    group_size: int

    def logprobs(self, model, temperature: float) -> torch.Tensor:
        """(b, t) log-probs of the masked tokens under `model` (shared-prefix or per-row path)."""
        if self.context_lens is None:
            return sequence_logprobs(model, self.ids, self.pos, self.mask, temperature)
        return shared_prefix_logprobs(model, self.ids, self.pos, self.mask, self.context_lens, self.group_size,
                                      temperature)


def micro_batches(batch: dict, micro_batch: int, group_size: int = 1, shared_prefix: bool = False) -> list[MicroBatch]:
    """`update`'s split of a batch (ids, pos, mask (N, T); context_lens (N,) for shared_prefix) into chunks
    of micro_batch rows. With shared_prefix, a chunk that splits a group treats its part of the group
    (gcd(micro_batch, G) rows; chunks start at multiples of it) as a group; gcd 1 is the per-row path."""
    ids, pos, mask = batch["ids"], batch["pos"], batch["mask"]
    sub = math.gcd(micro_batch, group_size) if shared_prefix else 1
    out = []
    for i in range(0, ids.shape[0], micro_batch):
        s = slice(i, min(i + micro_batch, ids.shape[0]))
        T = int(mask[s].nonzero()[:, 1].max()) + 1 if mask[s].any() else 1  # right padding: cut to the longest row
        out.append(MicroBatch(s, ids[s, :T], pos[s, :T], mask[s, :T],
                              batch["context_lens"][s] if sub > 1 else None, sub))
    return out


def update(policy, ref, batch: dict, opt, *, micro_batch: int, ppo_epochs: int, temperature: float, beta: float,
           clip_eps: float, grad_clip: float, world: int = 1, group_size: int = 1, shared_prefix: bool = False) -> dict:
    """The GRPO update (docs/method.md section 3, steps 6-9) on this rank's share of the batch: ppo_epochs
    passes over it, one optimizer step each (the default 1: one step). batch: ids, pos, mask (N, T),
    advantages (N,) and, for `shared_prefix`, context_lens (N,) (`Rollout.batch`); rows group-major
    (group_size rows per group), split by `micro_batches`. All ranks take part with the same number of
    micro-batches (FSDP collectives must match). With `shared_prefix`, every forward (old, reference,
    policy) encodes each group's context once (`shared_prefix_logprobs`). Returns loss, kl, clip_frac,
    grad_norm, tokens (global figures)."""
    from r3 import dist

    micro = micro_batches(batch, micro_batch, group_size, shared_prefix)
    # a. log-probs that do not change during the update: old policy (the ratio, step 8) and reference (KL, step 7)
    with torch.no_grad():
        old = [mb.logprobs(policy, temperature) if ppo_epochs > 1 else None for mb in micro]
        refs = [mb.logprobs(ref, temperature) if ref is not None else None for mb in micro]
    mask, adv = batch["mask"], batch["advantages"]
    num_tokens = float(dist.all_reduce_sum(mask.sum().float().clone()))  # reflection tokens, all ranks (step 9)
    # b. loss over micro-batches, gradients accumulated; x world because FSDP averages gradients over ranks
    sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    for epoch in range(ppo_epochs):
        for mb, o, r in zip(micro, old, refs):
            logp = mb.logprobs(policy, temperature)
            loss, st = grpo_loss(logp, o if o is not None else logp.detach(), r, adv[mb.rows], mb.mask, beta, clip_eps,
                                 num_tokens)
            (loss * world).backward()
            if epoch == ppo_epochs - 1:
                sums["loss"] += float(loss.detach())
                sums["kl"] += st["kl"]
                sums["clipped"] += st["clipped"]
        # c. clip the global gradient norm and step
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
    totals = dist.all_reduce_sum(torch.tensor([sums["loss"], sums["kl"], sums["clipped"]]))
    return {"loss": float(totals[0]), "kl": float(totals[1]) / num_tokens, "clip_frac": float(totals[2]) / num_tokens,
            "grad_norm": float(grad_norm), "tokens": num_tokens}
