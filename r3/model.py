"""One decoder-only Transformer for the Llama and Qwen2 families, shaped by a Hugging Face config.json.

Covers Llama-3.x (including the "llama3" rope_scaling of 3.1/3.2), SmolLM2 (a Llama) and Qwen2 /
Qwen2.5 (q/k/v biases): grouped-query attention, RoPE with HF's rotate_half convention, RMSNorm in
fp32, SwiGLU MLP, tied or untied embeddings. Parameter names are Hugging Face's, so loading a
checkpoint is an identity map (see checkpoint.py).

The forward takes token ids and explicit positions (B, T); positions only feed RoPE. Without a KV
cache attention is causal over the T tokens given (right padding is therefore harmless to the real
tokens). With a cache, every layer writes its keys/values into the cache and attends over the cache
slots the cache says are visible (see `KVCache` below; the sampler owns the concrete cache).
With a `SharedPrefix` (GRPO's update: G rows that continue one context) each context is encoded once
and every row attends to its group's context keys/values (see `shared_prefix_attention`).

It does not: sample (sampler.py), compute log-probs (grpo.py / r3/kernels/), load weights (checkpoint.py),
or implement sliding-window attention, MoE or any other family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

try:  # flash-attn is an optional CUDA-only extra (pip install -e ".[gpu]")
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class KVCache(Protocol):
    """What the model needs from a KV cache; sampler.py implements it.

    `attn_mask(pos)` is called once per forward with the positions (B, T) being written and returns the
    boolean mask (B, 1, T, S) of cache slots each query may attend to. `update(layer, pos, k, v)` stores
    this step's keys/values (B, Hkv, T, D) and returns the full buffers (B, Hkv, S, D) to attend over.
    """

    def attn_mask(self, pos: torch.Tensor) -> torch.Tensor: ...

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class SharedPrefix:
    """Contexts that groups of rows continue: `forward(ids, pos, prefix=SharedPrefix(...))` with ids, pos
    (N, Ts) the rows, group-major (rows g*G .. g*G+G-1 continue context g, N = Gn * G).

    ids, pos: (Gn, Tc) the contexts, right padded; lengths: (Gn,) real tokens of each (0 is allowed).
    The rows' positions should continue their context's (pos[g, lengths[g] - 1] + 1 onwards).
    """
    ids: torch.Tensor  # (Gn, Tc) int64
    pos: torch.Tensor  # (Gn, Tc) int64
    lengths: torch.Tensor  # (Gn,) int64
    group_size: int  # G rows per context


@dataclass
class ModelConfig:
    family: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None or HF's dict with rope_type "llama3" (others rejected)
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v (and for Llama also o) carry a bias
    mlp_bias: bool

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read an HF config.json dict; old (`rope_theta`, `rope_scaling`) and new (`rope_parameters`)
        RoPE spellings are both understood. Unsupported models end with one ValueError."""
        archs = hf.get("architectures") or []
        family = SUPPORTED.get(archs[0]) if archs else {"llama": "llama", "qwen2": "qwen2"}.get(hf.get("model_type"))
        if family is None:
            raise ValueError(f"unsupported model: architectures={archs} model_type={hf.get('model_type')!r}; "
                             f"r3 supports {', '.join(SUPPORTED)} (model_type llama or qwen2)")
        if hf.get("use_sliding_window") and family == "qwen2":
            raise ValueError("Qwen2 with use_sliding_window=true is not supported by r3")
        rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 spelling
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"unsupported rope_scaling type {kind!r}; r3 supports 'llama3' or none")
            else:
                scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        heads = hf["num_attention_heads"]
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies (D/2,) in fp32, with Llama 3.1's piecewise "llama3" scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in fp32, scale in the input dtype (HF's order of operations)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def shared_prefix_attention(q, k, v, prefix: SharedPrefix, gqa: bool) -> torch.Tensor:
    """Attention over a packed stream: the Gn contexts (Gn * Tc tokens), then the N rows (N * Ts tokens).

    q: (1, Hq, L, D), k, v: (1, Hkv, L, D) with L = Gn*Tc + N*Ts -> (1, Hq, L, D).
    Shared: each context's keys/values are computed once (one projection per context token) and every row
    of its group attends to them; gradients from the G rows are summed back into them by autograd (the
    backward of `index_select`). Not shared: each row's own tokens (its queries, keys, values, MLP).
    Contexts attend causally to themselves; a row's query at step j attends to [its context's real
    tokens (not the padding beyond `lengths`), the row's tokens 0..j]: exactly what the full row
    (context + row tokens) sees under causal attention, so outputs equal the per-row forward's.

    NOTE: for the one SDPA call each row gets its own copy of its context's keys/values (the same
    (N, Hkv, Tc + Ts, D) a per-row forward holds), and that call takes an explicit mask, so it runs SDPA's
    masked kernels rather than the causal fast path; a variable-length kernel that reads one context
    from G rows in place (as Prefix Grouper does) would save both.
    """
    Gn, Tc = prefix.ids.shape
    N = Gn * prefix.group_size
    Ts = (q.shape[2] - Gn * Tc) // N

    def split(x):  # (1, h, L, D) -> contexts (Gn, h, Tc, D), rows (N, h, Ts, D)
        c, r = x[0].split([Gn * Tc, N * Ts], dim=1)
        return c.unflatten(1, (Gn, Tc)).transpose(0, 1), r.unflatten(1, (N, Ts)).transpose(0, 1)

    (qc, qr), (kc, kr), (vc, vr) = split(q), split(k), split(v)
    yc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=gqa)  # (Gn, Hq, Tc, D)
    group = torch.arange(N, device=q.device) // prefix.group_size  # (N,) the context of each row
    k_all = torch.cat([kc.index_select(0, group), kr], dim=2)  # (N, Hkv, Tc + Ts, D)
    v_all = torch.cat([vc.index_select(0, group), vr], dim=2)
    sees_ctx = torch.arange(Tc, device=q.device) < prefix.lengths.index_select(0, group)[:, None]  # (N, Tc)
    causal = torch.ones(Ts, Ts, dtype=torch.bool, device=q.device).tril()  # (Ts, Ts)
    mask = torch.cat([sees_ctx[:, None].expand(N, Ts, Tc), causal.expand(N, Ts, Ts)], dim=2)  # (N, Ts, Tc + Ts)
    mask = mask[:, None]  # (N, 1, Ts, Tc + Ts): the same for every head
    yr = F.scaled_dot_product_attention(qr, k_all, v_all, attn_mask=mask, enable_gqa=gqa)  # (N, Hq, Ts, D)
    return torch.cat([yc.transpose(0, 1).flatten(1, 2), yr.transpose(0, 1).flatten(1, 2)], dim=1)[None]  # (1, Hq, L, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too.
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias and cfg.family == "llama")

    def forward(self, x, cos, sin, pos, kv_cache=None, mask=None, prefix=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if prefix is not None:  # x is the packed stream of contexts and rows (see Transformer.forward)
            y = shared_prefix_attention(q, k, v, prefix, self.nkv != self.nh)
        elif kv_cache is not None:
            k, v = kv_cache.update(self.layer, pos, k, v)  # (B, Hkv, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        elif flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i, bias=b), nn.Linear(h, i, bias=b), nn.Linear(i, h, bias=b)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos, kv_cache=None, mask=None, prefix=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, kv_cache, mask, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids: torch.Tensor, pos: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False, prefix: SharedPrefix | None = None) -> torch.Tensor:
        """ids, pos: (B, T) int64 -> logits (B, T, V) in the model dtype, or the final-normed hidden
        states (B, T, H) when `return_hidden` (the input of `lm_head`, for log-probs without [B, T, V]).

        With `prefix`, the B rows continue the prefix's contexts (B = Gn * G, group-major) and the output
        is that of the full rows (context + row) at the row tokens only; the contexts are encoded once.
        """
        B, T = ids.shape
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        if prefix is not None:  # one packed stream (1, L): the contexts' tokens, then the rows' tokens
            Gn, Tc = prefix.ids.shape
            if kv_cache is not None:
                raise ValueError("forward: a shared prefix and a KV cache cannot be combined")
            if B != Gn * prefix.group_size:
                raise ValueError(f"forward: {B} rows do not continue {Gn} contexts in groups of {prefix.group_size}")
            ids = torch.cat([prefix.ids.reshape(-1), ids.reshape(-1)])[None]  # (1, L), L = Gn*Tc + B*T
            pos = torch.cat([prefix.pos.reshape(-1), pos.reshape(-1)])[None]
        x = self.model.embed_tokens(ids)  # (B, T, H)
        inv_freq = rope_inv_freq(self.config, ids.device)
        freqs = pos.float()[..., None] * inv_freq  # (B, T, D/2), fp32 as in HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = kv_cache.attn_mask(pos) if kv_cache is not None else None
        for layer in self.model.layers:
            x = layer(x, cos, sin, pos, kv_cache, mask, prefix)
        if prefix is not None:
            x = x[:, Gn * Tc:].view(B, T, -1)  # (B, T, H): the rows only
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)
