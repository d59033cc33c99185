"""The shared-prefix forward computes what the per-row forward computes.

Claims, each against the per-row path (`Transformer.forward` on whole rows, `sequence_logprobs`) as the
independent reference, in fp32 within 1e-5 relative:
- rows that continue a shared context give the full rows' logits (tiny Llama with GQA, tiny Qwen2 with
  q/k/v biases; contexts of different lengths, one of them empty);
- `r3.grpo.update(..., shared_prefix=True)`, the update train.py runs, gives the same log-probs (every
  forward: old, reference, policy), losses, every parameter's gradient and returned figures as
  `update(..., shared_prefix=False)`, for G in {1, 2, 8}, beta > 0 and beta = 0, over two PPO epochs
  (the second after an optimizer step), and with micro-batches that are not a multiple of G (groups of
  gcd(micro_batch, G) rows); with G = 1 (nothing to share) update keeps the per-row forward;
- the same under FSDP2 with 2 ranks (torchrun) and in 1 process (slow);
- on the default model, a real countdown_easy batch gives equal losses (slow).
"""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ours_from_hf, tiny_hf_model
from r3.grpo import grpo_loss, sequence_logprobs, shared_prefix_logprobs, update
from r3.model import SharedPrefix
from shared_prefix_worker import NO_CLIP, group_batch, recording, traced

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (b the reference)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rows_continuing_a_shared_context_equal_full_rows(family):
    torch.manual_seed(0)
    model = ours_from_hf(tiny_hf_model(family, tied=family == "llama", gqa=family == "llama"))
    G, lengths, Ts = 3, [5, 0, 11], 7
    Tc = max(lengths)
    ctx = torch.randint(0, 128, (len(lengths), Tc))
    rows = torch.randint(0, 128, (len(lengths) * G, Ts))
    full = [torch.cat([ctx[r // G, :lengths[r // G]], rows[r]]) for r in range(len(rows))]  # each row as one sequence
    suf_pos = torch.tensor([[lengths[r // G] + j for j in range(Ts)] for r in range(len(rows))])
    prefix = SharedPrefix(ctx, torch.arange(Tc).expand(len(lengths), Tc), torch.tensor(lengths), G)
    with torch.no_grad():
        got = model(rows, suf_pos, prefix=prefix)  # (N, Ts, V)
        for r, seq in enumerate(full):
            want = model(seq[None])[0, -Ts:]  # (Ts, V): the full row's logits at the row tokens
            assert rel(got[r], want) <= TOL, f"row {r}: rel diff {rel(got[r], want):.2e}"


def run_update(policy, ref, batch, *, G: int, micro_batch: int, beta: float, shared: bool):
    """`r3.grpo.update` (two PPO epochs, clipping off) on a copy of `policy`, observed: returns update's
    dict, the trace of its log-prob and loss calls (`traced`) and each step's gradients (`recording`)."""
    pol = copy.deepcopy(policy)
    # SGD, not Adam: Adam turns round-off in ~0 gradients into +-lr steps. lr 0.01 unclipped: the second
    # epoch still has unclipped tokens (0.05 clipped every token of the G = 1 batch: zero gradient).
    opt = recording(torch.optim.SGD)(pol.named_parameters(), lr=0.01)
    with traced() as trace:
        stats = update(pol, ref, batch, opt, micro_batch=micro_batch, ppo_epochs=2, temperature=0.7, beta=beta,
                       clip_eps=0.2, grad_clip=NO_CLIP, group_size=G, shared_prefix=shared)
    return stats, trace, opt.grads


def assert_update_equals_per_row(policy, ref, batch, G, micro_batch, beta):
    """update with shared_prefix on vs off, same micro-batches: every log-prob call (old, reference, each
    epoch's policy), each epoch's loss and every parameter's gradient, and update's returned loss, kl,
    clip_frac and grad_norm, within TOL relative; and the shared run really took the shared path."""
    (want, want_tr, want_g), (got, got_tr, got_g) = (
        run_update(policy, ref, batch, G=G, micro_batch=micro_batch, beta=beta, shared=s) for s in (False, True))
    sub = math.gcd(micro_batch, G)
    assert {(p, g) for p, g, _ in want_tr["logp"]} == {("rows", 1)}
    assert {(p, g) for p, g, _ in got_tr["logp"]} == ({("shared", sub)} if sub > 1 else {("rows", 1)})
    assert len(got_tr["logp"]) == len(want_tr["logp"]) and len(got_tr["loss"]) == len(want_tr["loss"])
    lp = max(rel(a, b) for (_, _, a), (_, _, b) in zip(got_tr["logp"], want_tr["logp"]))
    n = len(want_tr["loss"]) // 2  # micro-batches per epoch
    losses = [[sum(t["loss"][e * n:(e + 1) * n]) for e in range(2)] for t in (want_tr, got_tr)]
    for epoch in range(2):
        loss = abs(losses[1][epoch] - losses[0][epoch]) / abs(losses[0][epoch])
        grad, name = max((rel(got_g[epoch][k], g), k) for k, g in want_g[epoch].items())
        print(f"epoch {epoch}: rel diff log-probs (all calls) {lp:.1e}, loss {loss:.1e}, worst gradient {grad:.1e} "
              f"({name})")
        assert lp <= TOL and loss <= TOL and grad <= TOL
    print(f"update per-row {want}\nupdate shared  {got}")
    for k in ("loss", "kl", "clip_frac", "grad_norm"):
        assert abs(got[k] - want[k]) <= TOL * abs(want[k]), (k, got[k], want[k])
    assert got["tokens"] == want["tokens"]
    assert losses[0][1] != losses[0][0] and want["grad_norm"] > 0  # the second epoch: a changed policy, still learning


def policy_and_ref(family: str):
    hf = tiny_hf_model(family, tied=family == "llama", gqa=True, seed=1)
    policy = ours_from_hf(hf).train()
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs, so the KL term is not zero
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, ref


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("G", [1, 2, 8])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_shared_prefix_update_equals_per_row(family, G, beta):
    """r3.grpo.update with shared_prefix on equals it with shared_prefix off over two PPO epochs
    (micro-batches of two whole groups; the second epoch after an optimizer step): log-probs, losses,
    every parameter's gradient, the returned figures. G = 1 has nothing to share: update keeps the per-row
    forward (checked). Worst differences are printed."""
    policy, ref = policy_and_ref(family)
    groups = 3 if G < 8 else 2
    assert_update_equals_per_row(policy, ref, group_batch(groups, G, T=32, vocab=128, seed=G), G, 2 * G, beta)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("micro_batch", [4, 12])
def test_micro_batch_not_a_multiple_of_G_shares_within_gcd_rows(family, micro_batch):
    """G = 8 with micro-batches of 4 (two per group) or 12 (one and a half groups: a micro-batch ends
    inside a group): update treats each gcd(micro_batch, G) = 4 rows as a group (checked) and still
    equals the per-row update with the same micro-batches."""
    policy, ref = policy_and_ref(family)
    assert_update_equals_per_row(policy, ref, group_batch(3, 8, T=32, vocab=128, seed=11), 8, micro_batch, 0.05)


def test_rows_that_differ_before_the_mask_are_refused():
    model = ours_from_hf(tiny_hf_model("llama"))
    batch = group_batch(2, 2, T=20, vocab=128, seed=0)
    ids = batch["ids"].clone()
    ids[3, 2] = (ids[3, 2] + 1) % 128  # row 3 (group 1) leaves its context before the reflection
    with pytest.raises(ValueError, match="row 3 differs from row 2 .* at position 2"):
        shared_prefix_logprobs(model, ids, batch["pos"], batch["mask"], batch["context_lens"], 2)


def test_context_lengths_that_differ_in_a_group_or_a_mask_inside_the_context_are_refused():
    model = ours_from_hf(tiny_hf_model("llama"))
    batch = group_batch(2, 2, T=20, vocab=128, seed=0)
    lens = batch["context_lens"].clone()
    lens[3] += 1
    with pytest.raises(ValueError, match="group 1's rows have context lengths"):
        shared_prefix_logprobs(model, batch["ids"], batch["pos"], batch["mask"], lens, 2)
    mask = batch["mask"].clone()
    mask[1, 1] = True  # row 1 trains a token of its group's context
    with pytest.raises(ValueError, match="row 1 differs from row 0 .* at position 1"):
        shared_prefix_logprobs(model, batch["ids"], batch["pos"], mask, batch["context_lens"], 2)


def test_mask_on_attempt_and_retry_takes_the_prefix_before_the_first_masked_token():
    """The same function serves a plain-GRPO batch (mask on the attempt) and a mask over reflection + retry
    with a gap: the prefix ends before the FIRST masked token, gaps inside the suffix are just unscored."""
    model = ours_from_hf(tiny_hf_model("qwen2"))
    batch = group_batch(3, 4, T=32, vocab=128, seed=5)
    mask = batch["mask"].clone()
    for r in range(mask.shape[0]):
        last = int(mask[r].nonzero().max())
        mask[r, last + 2:last + 5] = True  # a second masked span after an unmasked gap
    with torch.no_grad():
        want = sequence_logprobs(model, batch["ids"], batch["pos"], mask)
        got = shared_prefix_logprobs(model, batch["ids"], batch["pos"], mask, batch["context_lens"], 4)
    assert (got[~mask] == 0).all() and rel(got, want) <= TOL, f"rel diff {rel(got, want):.2e}"


def _worker(nproc):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + [str(ROOT / "tests" / "shared_prefix_worker.py")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"PYTHONFAULTHANDLER": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow
def test_fsdp2_two_ranks_shared_equals_per_row_and_one_process():
    """r3.grpo.update under FSDP2 (1 process, 2 ranks), shared_prefix off and on: each epoch's loss and
    gradient norm and update's returned figures equal the 1-process per-row run's."""
    one, two = _worker(1), _worker(2)
    print(f"1 process {one}\n2 ranks {two}")
    want = one["rows"]
    assert want["paths"] == ["rows"] and one["shared"]["paths"] == two["shared"]["paths"] == ["shared"]
    for name, run in (("1 process shared", one["shared"]), ("2 ranks per-row", two["rows"]),
                      ("2 ranks shared", two["shared"])):
        for epoch, (a, b) in enumerate(zip(run["epochs"], want["epochs"], strict=True)):
            for k in ("loss", "grad_norm"):
                assert abs(a[k] - b[k]) <= TOL * abs(b[k]), f"{name} epoch {epoch} {k}: {a[k]!r} vs per-row {b[k]!r}"
        for k in ("loss", "kl", "clip_frac", "grad_norm", "tokens"):
            a, b = run["update"][k], want["update"][k]
            assert abs(a - b) <= TOL * abs(b), f"{name} update()['{k}']: {a!r} vs per-row {b!r}"
    assert want["epochs"][1]["loss"] != want["epochs"][0]["loss"] and want["update"]["grad_norm"] > 0


@pytest.mark.slow
def test_default_model_equal_losses_on_a_countdown_batch(default_dir, default_tok):
    """SmolLM2-135M on a real R3 batch (countdown_easy, rendered as the main job renders it): two groups
    of 4 reflections of different lengths; shared-prefix and per-row give the same log-probs and loss."""
    from r3.checkpoint import load_hf
    from r3.rollout import build_batch, reflection_context
    from r3.tasks import get_task

    task = get_task("countdown_easy")
    examples = task.examples("train")[:2]
    reflections = ["I added instead of subtracting.", "Wrong.", "The answer must use each number once, so I should "
                   "check which operation reaches the target before writing the equation.", "Use 7 + 13."]
    convs = [reflection_context(task, ex, "<answer>1 + 2</answer>") + [{"role": "assistant", "content": r}]
             for ex in examples for r in reflections]
    ids, pos, mask, context_lens = build_batch(default_tok, convs, default_tok.pad_token_id)
    model = load_hf(default_dir)
    adv = torch.randn(len(convs), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = sequence_logprobs(model, ids, pos, mask)
        got = shared_prefix_logprobs(model, ids, pos, mask, context_lens, len(reflections))
    loss = [float(grpo_loss(lp, lp + 0.1, None, adv, mask, 0.0, 0.2, float(mask.sum()))[0]) for lp in (want, got)]
    print(f"{tuple(ids.shape)} batch, {int(mask.sum())} masked tokens: log-probs rel diff {rel(got, want):.1e}, "
          f"loss per-row {loss[0]:.8f} shared {loss[1]:.8f}")
    assert rel(got, want) <= TOL and abs(loss[1] - loss[0]) <= TOL * abs(loss[0]), (rel(got, want), loss)
