"""One decoder-only Transformer for the Llama and Qwen2 families, shaped by a Hugging Face config.json.

Covers Llama-3.x (including the "llama3" rope_scaling of 3.1/3.2), SmolLM2 (a Llama) and Qwen2 /
Qwen2.5 (q/k/v biases): grouped-query attention, RoPE with HF's rotate_half convention, RMSNorm in
fp32, SwiGLU MLP, tied or untied embeddings. Parameter names are Hugging Face's, so loading a
checkpoint is an identity map (see checkpoint.py).

The forward takes token ids and explicit positions (B, T); positions only feed RoPE. Without a KV
cache attention is causal over the T tokens given (right padding is therefore harmless to the real
tokens). With a cache, every layer writes its keys/values into the cache and attends over the cache
slots the cache says are visible (see `KVCache` below; the sampler owns the concrete cache).

It does not: sample (sampler.py), compute log-probs (grpo.py / kernels/), load weights (checkpoint.py),
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too.
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias and cfg.family == "llama")

    def forward(self, x, cos, sin, pos, kv_cache=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if kv_cache is not None:
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

    def forward(self, x, cos, sin, pos, kv_cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, kv_cache, mask)
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
                return_hidden: bool = False) -> torch.Tensor:
        """ids, pos: (B, T) int64 -> logits (B, T, V) in the model dtype, or the final-normed hidden
        states (B, T, H) when `return_hidden` (the input of `lm_head`, for log-probs without [B, T, V])."""
        B, T = ids.shape
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        x = self.model.embed_tokens(ids)  # (B, T, H)
        inv_freq = rope_inv_freq(self.config, ids.device)
        freqs = pos.float()[..., None] * inv_freq  # (B, T, D/2), fp32 as in HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = kv_cache.attn_mask(pos) if kv_cache is not None else None
        for layer in self.model.layers:
            x = layer(x, cos, sin, pos, kv_cache, mask)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)
