"""r3/kernels/logprobs.py against its torch reference, on CPU.

Proves that the Triton kernels (run by the Triton interpreter, TRITON_INTERPRET=1 from conftest.py) and
the chunked torch twin give the same masked log-probs and logit gradients as
log_softmax(logits / T).gather(target) * mask, on odd shapes (423 rows, V = 1,000 and 49,152, a padded
row stride), in fp32 and bf16, at T = 0.7 and 1; that masked rows give exactly 0 and a 0 gradient, also
when every row or no row is masked; and that `token_logprobs` (select rows before the LM head, chunked
logits) equals the naive full-logits path in value and in its gradients w.r.t. the hidden states and the
LM-head weight, also through a GRPO-like loss, with the masked rows' logits kept for backward (one LM-head
matmul fewer) or recomputed there (never more than one chunk of logits alive). Speed belongs to
bench/logprobs.py.
"""
import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from r3.kernels import logprobs as K
from r3.kernels.logprobs import logprobs_reference, masked_logprobs, token_logprobs

BACKENDS = ["torch", "triton"]
# Tolerance table. fwd: absolute, on log-probs (both paths compute in fp32 from the same logits, so only
# summation order differs). grad: relative to the gradient's largest magnitude; bf16 gradients are rounded
# to bf16 (8 significant bits) and the interpreter's fp32 -> bf16 cast truncates, so 1 ulp = 2^-7.
TOL = {torch.float32: dict(fwd=2e-5, grad=1e-5), torch.bfloat16: dict(fwd=2e-5, grad=1.6e-2)}


def assert_close(actual, expected, tol, what, relative=False):
    """max |actual - expected| <= tol (times max |expected| when relative); prints the differences."""
    diff = (actual.float() - expected.float()).abs()
    bound = tol * (expected.float().abs().max().item() if relative else 1.0)
    assert diff.max().item() <= bound, (
        f"{what}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, bound {bound:.3e}")


def make_rows(N, V, dtype, frac=0.7, seed=0):
    """Logits (N, V) with a realistic spread (std 3), targets (N,), mask (N,) with ~frac rows kept."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) < frac
    return logits, targets, mask


def check_against_reference(logits, targets, mask, temperature, backend, dtype):
    """Forward and logit gradient (random upstream gradient) of masked_logprobs vs the reference."""
    grad_out = torch.randn(logits.shape[0], generator=torch.Generator().manual_seed(1))
    x_ref = logits.detach().clone().requires_grad_()
    ref = logprobs_reference(x_ref, targets, mask, temperature)
    (grad_ref,) = torch.autograd.grad(ref, x_ref, grad_out)
    x = logits.detach().clone().requires_grad_()
    out = masked_logprobs(x, targets, mask, temperature, backend=backend)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_close(out, ref, TOL[dtype]["fwd"], "log-probs")
    assert_close(grad, grad_ref, TOL[dtype]["grad"], "grad logits", relative=True)
    return out, grad


# (rows, V, temperature): 423 rows is not a multiple of any block; V = 1,000 is one partial block of
# 1,024, V = 10,007 (prime) is a full block of 8,192 and a partial one, V = 49,152 six full blocks.
CASES = [(423, 1000, 0.7), (423, 1000, 1.0), (423, 10007, 0.7), (423, 49152, 0.7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,V,temperature", CASES, ids=[f"{n}x{v}-T{t}" for n, v, t in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_and_grads_match_reference(backend, N, V, temperature, dtype):
    logits, targets, mask = make_rows(N, V, dtype)
    check_against_reference(logits, targets, mask, temperature, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stride_is_respected(backend):
    wide, targets, mask = make_rows(97, 1000 + 24, torch.float32)
    logits = wide[:, :1000]  # stride(0) = 1024, stride(1) = 1: no copy is made
    targets = targets % 1000
    check_against_reference(logits, targets, mask, 0.7, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_give_zero_logprob_and_zero_grad(backend):
    logits, targets, mask = make_rows(423, 1000, torch.float32, frac=0.5)
    out, grad = check_against_reference(logits, targets, mask, 0.7, backend, torch.float32)
    assert (out[~mask] == 0).all() and (grad[~mask] == 0).all()
    assert (out[mask] < 0).all() and (grad[mask] != 0).any()


@pytest.mark.parametrize("kept", ["none", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked_and_no_row_masked(backend, kept):
    logits, targets, _ = make_rows(129, 1000, torch.float32)
    mask = torch.full((129,), kept == "all")
    out, grad = check_against_reference(logits, targets, mask, 1.0, backend, torch.float32)
    if kept == "none":
        assert (out == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_overwrites_logits_with_their_gradient(backend):
    logits, targets, mask = make_rows(211, 1000, torch.float32, frac=0.5)
    grad_out = torch.randn(211)
    fwd, bwd = K._KERNELS[backend]
    _, lse = fwd(logits, targets, mask, 0.7)
    expected = bwd(logits, targets, mask, lse, grad_out, 0.7, torch.empty_like(logits))
    buffer = logits.clone()
    bwd(buffer, targets, mask, lse, grad_out, 0.7, buffer)  # grad_logits is the logits buffer itself
    assert_close(buffer, expected, 0.0, "in-place vs out-of-place")
    assert (buffer[~mask] == 0).all()  # masked rows: the logits they held are overwritten with zeros


def make_lm_head(B, T, H, V, dtype, frac=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < frac
    return hidden, weight, targets, mask


def naive_token_logprobs(hidden, weight, targets, mask, temperature):
    """The path token_logprobs replaces: full logits (B, T, V) -> log_softmax -> gather -> mask."""
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask


def grads_of(fn, hidden, weight, loss_of):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fn(h, w)
    return (out, *torch.autograd.grad(loss_of(out), (h, w)))


@pytest.mark.parametrize("keep_bytes", [K.KEEP_LOGITS_BYTES, 0], ids=["kept", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_and_grads_equal_full_logits_path(backend, dtype, keep_bytes):
    hidden, weight, targets, mask = make_lm_head(3, 41, 32, 1000, dtype)
    weights = torch.randn(3, 41)  # random upstream gradient
    args = (targets, mask, 0.7)
    ours = grads_of(lambda h, w: token_logprobs(h, w, *args, chunk_rows=17, backend=backend, keep_bytes=keep_bytes),
                    hidden, weight, lambda o: (weights * o).sum())
    ref = grads_of(lambda h, w: naive_token_logprobs(h, w, *args), hidden, weight,
                   lambda o: (weights * o).sum())
    assert ours[0].dtype == torch.float32 and (ours[0][~mask] == 0).all()
    # bf16: logits are rounded to bf16 by the matmul on both paths; our weight gradient sums chunks in fp32.
    fwd_tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(ours[0], ref[0], fwd_tol, "log-probs")
    assert_close(ours[1], ref[1], TOL[dtype]["grad"] * 3, "grad hidden", relative=True)
    assert_close(ours[2], ref[2], TOL[dtype]["grad"] * 3, "grad weight", relative=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_with_empty_mask_gives_zeros_and_zero_grads(backend):
    hidden, weight, targets, _ = make_lm_head(2, 9, 8, 100, torch.float32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    out, gh, gw = grads_of(lambda h, w: token_logprobs(h, w, targets, mask, backend=backend),
                           hidden, weight, lambda o: o.sum())
    assert (out == 0).all() and (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_like_loss_has_equal_grads_via_kernel_and_reference(backend):
    """loss = -sum(A * exp(logp - logp_old)) / count over masked tokens (GRPO's unclipped surrogate)."""
    hidden, weight, targets, mask = make_lm_head(4, 33, 24, 1000, torch.float32, seed=3)
    advantages = torch.randn(4, 1).expand(4, 33)  # one advantage per sequence, as GRPO gives
    old = naive_token_logprobs(hidden, weight, targets, mask, 0.7).detach() - 0.05 * torch.rand(4, 33)

    def loss_of(logp):
        return -(advantages * torch.exp(logp - old) * mask).sum() / mask.sum()

    ours = grads_of(lambda h, w: token_logprobs(h, w, targets, mask, 0.7, chunk_rows=19, backend=backend),
                    hidden, weight, loss_of)
    ref = grads_of(lambda h, w: naive_token_logprobs(h, w, targets, mask, 0.7), hidden, weight, loss_of)
    assert_close(ours[1], ref[1], 3e-5, "grad hidden", relative=True)
    assert_close(ours[2], ref[2], 3e-5, "grad weight", relative=True)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def test_token_logprobs_never_allocates_more_than_one_chunk_of_logits():
    """With keep_bytes=0, and whenever no backward can follow (no_grad: old / reference log-probs)."""
    B, T, H, V, chunk = 4, 64, 8, 1000, 16
    hidden, weight, targets, mask = make_lm_head(B, T, H, V, torch.float32, frac=0.5)
    for fn, limit in [(lambda h, w: token_logprobs(h, w, targets, mask, chunk_rows=chunk, backend="torch",
                                                   keep_bytes=0), chunk * V),
                      (lambda h, w: naive_token_logprobs(h, w, targets, mask, 1.0), None)]:
        with LargestTensor() as seen:
            grads_of(fn, hidden, weight, lambda o: o.sum())
        if limit is None:  # the naive path does build (B, T, V): the probe can see it
            assert seen.numel >= B * T * V
        else:
            assert seen.numel <= limit, f"largest tensor {seen.numel} > one chunk {limit} (B*T*V={B*T*V})"
    with LargestTensor() as seen, torch.no_grad():
        token_logprobs(hidden.requires_grad_(), weight, targets, mask, chunk_rows=chunk, backend="torch")
    assert seen.numel <= chunk * V


class CountMatmuls(TorchDispatchMode):
    """Counts aten.mm / addmm calls whose output has `cols` columns or whose inner dimension is `cols`
    (the LM head's: logits (rows, V), grad_h = g (rows, V) x W (V, H), grad_W = g^T (V, rows) x h)."""

    def __init__(self, cols):
        super().__init__()
        self.cols, self.n = cols, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default):
            a, b = args[-2], args[-1]
            self.n += self.cols in (a.shape[0], a.shape[1], b.shape[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_logits_save_one_lm_head_matmul_per_chunk_and_give_the_same_grads(backend):
    B, T, H, V, chunk = 4, 64, 8, 1000, 40
    hidden, weight, targets, mask = make_lm_head(B, T, H, V, torch.float32, frac=0.5, seed=5)
    chunks = -(-int(mask.sum()) // chunk)
    got = {}
    for keep_bytes in (K.KEEP_LOGITS_BYTES, 0):
        with CountMatmuls(V) as mm:
            got[keep_bytes] = grads_of(lambda h, w: token_logprobs(h, w, targets, mask, 0.7, chunk, backend,
                                                                   keep_bytes), hidden, weight, lambda o: o.sum())
        assert mm.n == chunks * (3 if keep_bytes else 4), (keep_bytes, mm.n, chunks)
    for kept, recomputed in zip(got[K.KEEP_LOGITS_BYTES], got[0]):
        assert_close(kept, recomputed, 1e-6, "kept vs recomputed", relative=True)


def test_second_backward_through_kept_logits_is_an_error_not_a_wrong_gradient():
    hidden, weight, targets, mask = make_lm_head(2, 9, 8, 100, torch.float32)
    h = hidden.clone().requires_grad_()
    out = token_logprobs(h, weight, targets, mask, backend="torch").sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    h.grad = None
    out = token_logprobs(h, weight, targets, mask, backend="torch", keep_bytes=0).sum()
    out.backward(retain_graph=True)
    first = h.grad.clone()
    out.backward()
    assert torch.allclose(h.grad, 2 * first)


def test_backend_choice_follows_argument_then_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("R3_LOGPROBS_BACKEND", raising=False)
    assert K._pick_backend("auto", cpu) == "torch" and K._pick_backend("triton", cpu) == "triton"
    monkeypatch.setenv("R3_LOGPROBS_BACKEND", "triton")
    assert K._pick_backend("auto", cpu) == "triton" and K._pick_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend"):
        K._pick_backend("cuda", cpu)
