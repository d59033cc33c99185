"""Masked per-token log-probs: the one place r3 touches the vocabulary dimension.

GRPO in R3 needs log p(target) only at the reflection tokens (the mask). The naive path builds logits
(B, T, V) and log_softmax (B, T, V) and keeps both for backward: 3.2 GB in fp32 for B=16, T=512, V=49,152
before any gradient. This file, in the order of the Triton fused-softmax tutorial and Liger's first
cross-entropy kernel:

1. `logprobs_reference`: the torch definition every other path is tested against; beside it
   `trl_selective_log_softmax`, TRL's way, which the benches compare with.
2. `_logprobs_fwd_kernel`: one Triton program per row; online max / sum-exp over V in blocks; writes
   log p(target) and the row's log-sum-exp (lse); masked rows return at once.
3. `_logprobs_bwd_kernel`: grad_logits = mask * g * (onehot(target) - softmax(logits / T)) / T from the
   saved lse in one pass over V, optionally in place over the logits.
4. `_MaskedLogprobs`: the autograd.Function around the kernels, or around their chunked torch twin.
5. `masked_logprobs`: the public (N, V) entry; Triton on CUDA, chunked torch on CPU.
6. `token_logprobs`: what r3/grpo.py calls. hidden (B, T, H) and the LM-head weight (V, H) in, (B, T) out;
   masked positions are selected BEFORE the LM head, so no (B, T, V) tensor ever exists; their logits
   (M, V) are kept for backward when they fit in `keep_bytes` (512 MiB by default), else made in row
   chunks and recomputed in backward.

NOTE: the LM-head matmul is not fused into the kernel: each chunk's logits (rows, V) are written by the
matmul and read back by the kernel, in forward and again in backward (after a recompute when not kept).
A fused linear + online-softmax kernel (the next step, cf. Liger's fused-linear cross-entropy or a matmul
with an lse epilogue) would save that traffic.
Over `keep_bytes` the backward recomputes each chunk's logits (one extra LM-head matmul). Targets are
not range-checked on the Triton path (an id outside [0, V) reads out of bounds); logits must be finite.
There is no vocabulary-parallel (tensor-parallel) variant and no autotuning of BLOCK_V / num_warps.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# triton.jit picks the interpreter at decoration time, from TRITON_INTERPRET as read when triton was first
# imported; it is the only way the kernels run on CPU tensors (that is how the tests run them).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TORCH_CHUNK_ELEMS = 2**24  # torch twin: rows per chunk so that each fp32 temporary is ~64 MB
KEEP_LOGITS_BYTES = 512 * 2**20  # token_logprobs keeps the masked rows' logits for backward up to this size


# ---------------------------------------------------------------------------------------- 1. reference
def logprobs_reference(logits, targets, mask, temperature=1.0):
    """log_softmax(logits / T)[target] * mask in fp32: logits (N, V), targets (N,), mask (N,) -> (N,)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask


def trl_selective_log_softmax(logits, index):
    """TRL's `selective_log_softmax` (trl/trainer/utils.py, as GRPOTrainer calls it), restated so the benches
    compare against it without installing TRL: logits (B, T, V), index (B, T) -> log_softmax(logits)[index]
    (B, T), full logits in, a loop over rows to bound the peak. It neither divides by a temperature nor masks."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # loop to cut peak memory
        return selected - lse
    rows = []  # TRL: logsumexp is unstable in bf16, so a per-row log_softmax instead
    for row_logits, row_index in zip(logits, index):
        rows.append(F.log_softmax(row_logits, dim=-1).gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------- 2. forward
@triton.jit
def _logprobs_fwd_kernel(logits_ptr, targets_ptr, mask_ptr, out_ptr, lse_ptr,
                         stride_logits, V, temperature, BLOCK_V: tl.constexpr):
    """One program per row n of the logits; all arithmetic in fp32 whatever the logits' dtype.

    logits_ptr:    (N, V) logits, fp32 / bf16 / fp16, unit stride along V
    targets_ptr:   (N,) int64 target ids in [0, V)
    mask_ptr:      (N,) int8, 0 = masked out (skip the row)
    out_ptr:       (N,) fp32 output: log_softmax(logits[n] / T)[targets[n]], 0 for masked rows
    lse_ptr:       (N,) fp32 output: logsumexp(logits[n] / T), saved for backward, 0 for masked rows
    stride_logits: elements between consecutive rows of logits
    V:             row length (vocabulary size); temperature: T > 0; BLOCK_V: columns per step (power of 2)
    """
    # 1. int64 row offset: row * stride overflows int32 once N * V > 2^31 (16k rows x 152k vocab).
    row = tl.program_id(0).to(tl.int64)
    # 2. masked rows read nothing: their log-prob is defined as 0.
    if tl.load(mask_ptr + row) == 0:
        tl.store(out_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_logits
    # 3. online max / sum-exp (Milakov & Gimelshein 2018): one read of the row, no (V,) buffer.
    m = float("-inf")  # running max of logits / T
    d = 0.0  # running sum of exp(logits / T - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)  # rescale the old sum to the new max
        m = m_new
    lse = m + tl.log(d)
    # 4. log p(target) = logits[target] / T - lse.
    x_target = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32) / temperature
    tl.store(out_ptr + row, x_target - lse)
    tl.store(lse_ptr + row, lse)


# ---------------------------------------------------------------------------------------- 3. backward
@triton.jit
def _logprobs_bwd_kernel(logits_ptr, targets_ptr, mask_ptr, lse_ptr, grad_out_ptr, grad_logits_ptr,
                         stride_logits, stride_grad, V, temperature, BLOCK_V: tl.constexpr):
    """One program per row n: grad_logits[n] = mask * g * (onehot(target) - softmax(logits[n] / T)) / T.

    logits_ptr, targets_ptr, mask_ptr: as in the forward kernel
    lse_ptr:         (N,) fp32 logsumexp(logits / T) saved by the forward
    grad_out_ptr:    (N,) fp32 upstream gradient g = dLoss / dlogprob
    grad_logits_ptr: (N, V) output in the logits' dtype, unit stride along V. It may BE logits_ptr (in
                     place): a program reads each block before writing it and touches only its own row.
                     Safe only when nothing else needs those logits afterwards (token_logprobs' recomputed
                     chunks); never for a caller's tensor.
    stride_logits, stride_grad: elements between consecutive rows
    """
    row = tl.program_id(0).to(tl.int64)  # 1. int64 offsets, as in the forward
    grad_row_ptr = grad_logits_ptr + row * stride_grad
    # 2. masked rows: the log-prob was the constant 0, so the gradient is 0 (written: the buffer is not
    #    zeroed and may hold logits).
    if tl.load(mask_ptr + row) == 0:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row_ptr + cols, 0.0, mask=cols < V)
        return
    row_ptr = logits_ptr + row * stride_logits
    scale = tl.load(grad_out_ptr + row) / temperature  # d(x / T) / dx = 1 / T
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    # 3. one pass over V: softmax from the saved lse, minus it from the one-hot, scaled, cast, stored.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32) / temperature
        grad = scale * (tl.where(cols == target, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=cols < V)


def _launch_args(V):
    """BLOCK_V and num_warps: one block per row up to 8k columns, then loop (the tutorial's one-block
    rows would spill registers at V = 152k)."""
    block_v = min(8192, triton.next_power_of_2(V))
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


def _forward_triton(logits, targets, mask, temperature):
    """logits (N, V), targets (N,) int64, mask (N,) bool -> (logprob, lse), both (N,) fp32."""
    N, V = logits.shape
    out = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(out)
    if N:
        _logprobs_fwd_kernel[(N,)](logits, targets, mask.view(torch.int8), out, lse,
                                   logits.stride(0), V, temperature, **_launch_args(V))
    return out, lse


def _backward_triton(logits, targets, mask, lse, grad_out, temperature, grad_logits):
    """Writes dLoss/dlogits into grad_logits (N, V) (which may be logits itself) and returns it."""
    N, V = logits.shape
    if N:
        _logprobs_bwd_kernel[(N,)](logits, targets, mask.view(torch.int8), lse, grad_out, grad_logits,
                                   logits.stride(0), grad_logits.stride(0), V, temperature,
                                   **_launch_args(V))
    return grad_logits


def _forward_torch(logits, targets, mask, temperature):
    """The forward kernel's contract in torch: rows in chunks through one reused fp32 buffer, every step in
    place (a fresh (rows, V) tensor per op would cost a page-faulted allocation each on CPU)."""
    N, V = logits.shape
    out = torch.zeros(N, dtype=torch.float32, device=logits.device)
    lse = torch.zeros_like(out)
    rows = max(1, _TORCH_CHUNK_ELEMS // V)
    buf = torch.empty(min(rows, N), V, dtype=torch.float32, device=logits.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        x = buf[:e - s].copy_(logits[s:e]).div_(temperature)  # (rows, V) fp32 logits / T
        target = x.gather(1, targets[s:e, None]).squeeze(1)
        peak = x.amax(dim=1, keepdim=True)
        lse[s:e] = peak.squeeze(1) + x.sub_(peak).exp_().sum(dim=1).log()  # stable log-sum-exp
        out[s:e] = target - lse[s:e]
    return torch.where(mask, out, 0.0), lse


def _backward_torch(logits, targets, mask, lse, grad_out, temperature, grad_logits):
    """The backward kernel's contract in torch, chunked, in place; grad_logits may be logits itself."""
    N, V = logits.shape
    scale = torch.where(mask, grad_out / temperature, 0.0)  # (N,): 0 zeroes masked rows
    rows = max(1, _TORCH_CHUNK_ELEMS // V)
    fp32 = grad_logits.dtype == torch.float32  # then work in grad_logits itself, else in an fp32 buffer
    buf = None if fp32 else torch.empty(min(rows, N), V, dtype=torch.float32, device=logits.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        g = grad_logits[s:e] if fp32 else buf[:e - s]
        g.copy_(logits[s:e]).div_(temperature)  # a no-op copy when grad_logits is logits
        g.sub_(lse[s:e, None]).exp_().mul_(-scale[s:e, None])  # -g * softmax (rows, V)
        g[torch.arange(e - s, device=g.device), targets[s:e]] += scale[s:e]  # + g * onehot(target)
        if not fp32:
            grad_logits[s:e] = g  # cast to the logits' dtype on copy
    return grad_logits


_KERNELS = {"triton": (_forward_triton, _backward_triton), "torch": (_forward_torch, _backward_torch)}


# ---------------------------------------------------------------------------------------- 4. autograd
class _MaskedLogprobs(torch.autograd.Function):
    """(N, V) logits -> (N,) fp32 masked log-probs; saves logits, targets, mask and the (N,) lse."""

    @staticmethod
    def forward(ctx, logits, targets, mask, temperature, backend):
        out, lse = _KERNELS[backend][0](logits, targets, mask, temperature)
        ctx.save_for_backward(logits, targets, mask, lse)
        ctx.temperature, ctx.backend = temperature, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, mask, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # not in place: the logits belong to the caller
        _KERNELS[ctx.backend][1](logits, targets, mask, lse, grad_out.float().contiguous(),
                                 ctx.temperature, grad_logits)
        return grad_logits, None, None, None, None


# ---------------------------------------------------------------------------------------- 5. dispatch
def _pick_backend(backend, device):
    """'auto' -> $R3_LOGPROBS_BACKEND if set, else Triton on CUDA and torch elsewhere."""
    if backend == "auto":
        backend = os.environ.get("R3_LOGPROBS_BACKEND", "auto")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in _KERNELS:
        raise ValueError(f"backend={backend!r}: use 'auto', 'triton' or 'torch' (R3_LOGPROBS_BACKEND too)")
    if backend == "triton" and device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("backend='triton' on CPU needs TRITON_INTERPRET=1 set before triton is first "
                           "imported (tests/conftest.py does this); or use backend='torch'")
    return backend


def masked_logprobs(logits, targets, mask, temperature=1.0, backend="auto"):
    """log_softmax(logits / T)[target] where mask is set, else 0; float32, differentiable w.r.t. logits.

    logits (N, V) in any float dtype, targets (N,) int in [0, V), mask (N,) bool (nonzero = keep) -> (N,).
    backend: 'auto' (Triton on CUDA, chunked torch on CPU, or $R3_LOGPROBS_BACKEND), 'triton', 'torch'.
    """
    backend = _pick_backend(backend, logits.device)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _MaskedLogprobs.apply(logits, targets.long().contiguous(), mask.ne(0).contiguous(),
                                 float(temperature), backend)


# ---------------------------------------------------------------------------------------- 6. LM head
class _LinearLogprobs(torch.autograd.Function):
    """h (M, H) rows through the LM head W (V, H) -> (M,) fp32 log p(target), (rows, V) logits at a time.

    Saves h, W, targets and the (M,) lse, and with `keep` the logits of all M rows too; backward turns the
    kept logits (or each chunk's recomputed logits) into grad_logits in place, then grad_h = grad_logits @ W
    and grad_W += grad_logits^T @ h. Kept: three LM-head matmuls in all (forward, grad_h, grad_W) and an
    (M, V) tensor alive from forward to backward. Recomputed: one matmul more (+1/3 of the LM head's
    FLOPs) and one (rows, V) chunk alive at a time. Liger's fused-linear cross-entropy gets three matmuls
    and one chunk by computing the gradients inside the forward; that needs dLoss/dlogprob before the
    forward ends, which a scalar loss gives Liger but GRPO's ratio / clip / KL on top of the log-probs do
    not, and it would waste the work when log-probs are only read (old / reference policy under no_grad).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_rows, backend, keep):
        fwd = _KERNELS[backend][0]
        M, V = h.shape[0], weight.shape[0]
        keep_rows = torch.ones(M, dtype=torch.bool, device=h.device)
        out = torch.empty(M, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        # kept: one (M, V) tensor; else one (rows, V) buffer reused by every chunk (no allocation per chunk)
        buf = torch.empty(M if keep else min(chunk_rows, M), V, dtype=h.dtype, device=h.device)
        for s in range(0, M, chunk_rows):
            e = min(M, s + chunk_rows)
            logits = torch.mm(h[s:e], weight.T, out=buf[s:e] if keep else buf[:e - s])  # (rows, V)
            out[s:e], lse[s:e] = fwd(logits, targets[s:e], keep_rows[s:e], temperature)
        ctx.save_for_backward(h, weight, targets, lse, *([buf] if keep else []))
        ctx.temperature, ctx.chunk_rows, ctx.backend = temperature, chunk_rows, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # the kept logits become gradients in place: a second backward (retain_graph=True) is refused by
        # autograd's version check on saved tensors, not computed from them
        h, weight, targets, lse, *kept = ctx.saved_tensors
        bwd, n = _KERNELS[ctx.backend][1], ctx.chunk_rows
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_out = grad_out.float().contiguous()
        M = h.shape[0]
        keep_rows = torch.ones(M, dtype=torch.bool, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        # fp32 accumulator across chunks: summing many bf16 partial products in bf16 would lose bits.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        buf = None if kept else torch.empty(min(n, M), weight.shape[0], dtype=h.dtype, device=h.device)
        for s in range(0, M, n):
            e = min(M, s + n)
            h_c = h[s:e]  # (rows, H)
            # 1. the chunk's logits (rows, V): kept by the forward, or recomputed into the reused buffer
            logits = kept[0][s:e] if kept else torch.mm(h_c, weight.T, out=buf[:e - s])
            g = bwd(logits, targets[s:e], keep_rows[s:e], lse[s:e], grad_out[s:e],
                    ctx.temperature, logits)  # 2. dLoss/dlogits, in place: these logits are ours alone
            if need_h:
                grad_h[s:e] = g @ weight  # 3. (rows, V) x (V, H)
            if need_w:  # 4. (V, rows) x (rows, H), accumulated
                grad_w.addmm_(g.T, h_c) if g.dtype == torch.float32 else grad_w.add_(g.T @ h_c)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def token_logprobs(hidden, weight, targets, mask, temperature=1.0, chunk_rows=1024, backend="auto",
                   keep_bytes=KEEP_LOGITS_BYTES):
    """log p(targets) under softmax(hidden @ weight^T / T) at the masked positions, 0 elsewhere.

    hidden (B, T, H) fp32 or bf16, the final-norm output; weight (V, H) the LM head (a tied embedding or
    an FSDP-unsharded parameter is fine: it is used as a plain tensor), same dtype as hidden;
    targets (B, T) int, already shifted (targets[:, t] is the token that hidden[:, t] predicts);
    mask (B, T) bool -> (B, T) float32, differentiable w.r.t. hidden and weight.
    When a backward can follow and the M masked rows' logits fit in `keep_bytes` (M * V * element size),
    they are kept for it instead of recomputed (one LM-head matmul fewer); otherwise, and with
    keep_bytes=0, peak extra memory is one (chunk_rows, V) logits chunk (plus the torch twin's ~64 MB buffer).
    """
    B, T, H = hidden.shape
    mask = mask.bool()
    h = hidden[mask]  # (M, H): only the M reflection tokens ever reach the LM head
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep = grad and h.shape[0] * weight.shape[0] * weight.element_size() <= keep_bytes
    lp = _LinearLogprobs.apply(h, weight, targets[mask].long(), float(temperature), int(chunk_rows),
                               _pick_backend(backend, hidden.device), keep)  # (M,)
    out = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)
    out[mask] = lp  # scatter back; gradients flow to lp through the index_put
    return out
