"""Attention: rotary causal MHA/GQA, and DeepSeek's Multi-head Latent Attention (DeepSeek-V2 §2.1).

Shapes: B batch, S new tokens, T cached + new tokens, D model dim, H query heads, Hkv key/value heads,
hd head dim; MLA: Cq q_lora_rank, C kv_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, Vd v_head_dim.

MLA compresses keys and values into one latent c_kv [C] per token plus one rotary key k_pe [R] shared
by every head; per-head keys and values come from c_kv through kv_b_proj. The KV cache holds only c_kv
and k_pe (C + R numbers per token, not 2*H*hd): the point of MLA. Rotary dimensions are rotated in
(x0, x1) pairs, the layout DeepSeek's checkpoints store (`rope_interleave`); a config that stores
halves instead (x_i, x_{i+R/2}) is rearranged into pairs first. Yarn (the releases' long-context rope
scaling) changes the frequencies, scales the rotation by an attention factor and the softmax by mscale^2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotary_table(head_dim: int, max_len: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """(max_len, head_dim/2, 2) rotations (m cos, m sin)(pos * freq_j) (RoFormer; m = 1), with yarn's frequencies
    and attention factor m (YaRN, arXiv 2309.00071) when `scaling` says rope_type yarn. Real numbers, not
    complex ones: torch.compile's inductor generates code for the real rotation, not the complex product."""
    freqs = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    magnitude = 1.0
    if scaling is not None:
        factor, original = float(scaling["factor"]), int(scaling["original_max_position_embeddings"])
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        keep = 1 - ramp  # 1: high frequencies kept (extrapolated), 0: low ones interpolated by `factor`
        freqs = freqs / factor * (1 - keep) + freqs * keep
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        magnitude = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    angles = torch.outer(torch.arange(max_len).float(), freqs)
    return magnitude * torch.stack([angles.cos(), angles.sin()], dim=-1)


def softmax_scale(head_dim: int, scaling: dict[str, Any] | None) -> float:
    """head_dim^-0.5, times mscale^2 under yarn with mscale_all_dim (DeepSeek-V2's long-context scale)."""
    scale: float = head_dim**-0.5  # typeshed: int ** float is Any
    if scaling is not None and scaling.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2
    return scale


def apply_rotary(x_SR: torch.Tensor, rot_SR2: torch.Tensor) -> torch.Tensor:
    """Rotate (x0, x1) pairs of the last dim by the table's (cos, sin) (broadcast over leading dims): the complex
    product (x0 + i x1)(cos + i sin), in real arithmetic."""
    x0, x1 = x_SR.float().reshape(*x_SR.shape[:-1], -1, 2).unbind(-1)
    cos, sin = rot_SR2.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x_SR)


def halves_to_pairs(x_SR: torch.Tensor) -> torch.Tensor:
    """Rotary dims stored as halves (x_i, x_{i+R/2}) (Llama-style `rotate_half`) rearranged into (x0, x1) pairs. The
    same permutation of queries and keys leaves their dot products, and so attention, unchanged."""
    # torch's Tensor.unflatten is an untyped def (the C function it wraps is typed)
    pairs_SR: torch.Tensor = x_SR.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)  # type: ignore[no-untyped-call]
    return pairs_SR


def _per_head(rot_SR: torch.Tensor) -> torch.Tensor:
    """A rotary table for [B, H, S, ...] tensors: a shared one [S, R/2, 2] as it is, a per-row one [B, S, R/2, 2]
    (document masking: positions restart at each document) with the head dim added, [B, 1, S, R/2, 2]."""
    return rot_SR[:, None] if rot_SR.dim() == 4 else rot_SR


def _causal_mask(start: int, S: int, T: int, device: torch.device) -> torch.Tensor | None:
    """None for plain causal attention from position 0; else query i (at start+i) sees keys 0..start+i."""
    if start == 0:
        return None
    key_pos, query_pos = torch.arange(T, device=device), torch.arange(start, start + S, device=device)
    return key_pos <= query_pos[:, None]


class KVCache:
    """Per-layer buffers for incremental decoding, [B, max_len, ...] each: what each attention caches
    (keys and values, or MLA's latent and rotary key). Generation cost grows linearly with length."""

    def __init__(self, n_layers: int, batch: int, max_len: int, shapes: list[tuple[int, ...]],
                 device: torch.device, dtype: torch.dtype):
        self.buffers = [[torch.zeros(batch, max_len, *shape, device=device, dtype=dtype) for shape in shapes]
                        for _ in range(n_layers)]
        self.pos = 0  # tokens already cached

    def update(self, layer: int, *new_BS: torch.Tensor) -> list[torch.Tensor]:
        """Write this step's tensors after the cached ones; returns every tensor up to this step."""
        end = self.pos + new_BS[0].shape[1]
        for buffer, new in zip(self.buffers[layer], new_BS):
            buffer[:, self.pos:end] = new
        return [buffer[:, :end] for buffer in self.buffers[layer]]


class Attention(nn.Module):
    """Rotary causal attention, MHA or GQA (n_kv_heads < n_heads), with the options of the HuggingFace MoE families:
    a head dim of its own, query/key/value biases, RMSNorm on queries and keys (per head or over the whole
    projection), rotary on the first rope_dim dims of each head, stored as pairs or as halves."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim, self.rope_dim, self.interleaved = cfg.attn_head_dim, cfg.rope_dims, cfg.rope_interleave
        q, kv = cfg.n_heads * self.head_dim, cfg.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.dim, q, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else q, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else kv, eps=cfg.norm_eps)

    def cache_shapes(self) -> list[tuple[int, ...]]:
        return [(self.n_kv_heads, self.head_dim)] * 2

    def _rotate(self, x_BHSd: torch.Tensor, rot_Sd: torch.Tensor) -> torch.Tensor:
        """Rotary on the first rope_dim dims of each head (as pairs), the rest as they are."""
        R = self.rope_dim
        x_rot = x_BHSd[..., :R] if R < self.head_dim else x_BHSd
        if not self.interleaved:
            x_rot = halves_to_pairs(x_rot)
        x_rot = apply_rotary(x_rot, _per_head(rot_Sd))
        return torch.cat([x_rot, x_BHSd[..., R:]], dim=-1) if R < self.head_dim else x_rot

    def forward(self, x_BSD: torch.Tensor, rot_Sd: torch.Tensor, cache: KVCache | None = None,
                mask_B1ST: torch.Tensor | None = None) -> torch.Tensor:
        """rot_Sd: these tokens' rotary table, [S, R/2, 2] or per row [B, S, R/2, 2]; mask_B1ST: which keys each
        query sees (True = attend), replacing the causal mask (document masking); None is causal."""
        B, S, _ = x_BSD.shape
        q_BSX, k_BSX = self.wq(x_BSD), self.wk(x_BSD)
        if self.qk_norm == "all":
            q_BSX, k_BSX = self.q_norm(q_BSX), self.k_norm(k_BSX)
        q_BSHd = q_BSX.view(B, S, self.n_heads, self.head_dim)
        k_BSHd = k_BSX.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHd, k_BSHd = self.q_norm(q_BSHd), self.k_norm(k_BSHd)
        v_BHSd = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSd, k_BHSd = self._rotate(q_BSHd.transpose(1, 2), rot_Sd), self._rotate(k_BSHd.transpose(1, 2), rot_Sd)
        start = 0
        if cache is not None:  # cached as [B, T, Hkv, hd]
            start = cache.pos
            k_BTHd, v_BTHd = cache.update(self.layer, k_BHSd.transpose(1, 2), v_BHSd.transpose(1, 2))
            k_BHSd, v_BHSd = k_BTHd.transpose(1, 2), v_BTHd.transpose(1, 2)
        mask = _causal_mask(start, S, k_BHSd.shape[2], x_BSD.device) if mask_B1ST is None else mask_B1ST
        y_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask, is_causal=mask is None,
                                                enable_gqa=self.n_kv_heads != self.n_heads)
        y_BSD: torch.Tensor = self.wo(y_BHSd.transpose(1, 2).reshape(B, S, -1))
        return y_BSD


class MLAttention(nn.Module):
    """Multi-head Latent Attention, with DeepSeek's parameter names (q_proj or q_a_proj/q_a_layernorm/
    q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; o_proj)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.H = layer, cfg.n_heads
        self.N, self.R, self.Vd, self.C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        qk = self.H * (self.N + self.R)
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=1e-6)  # the releases' latent norms: eps 1e-6
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.C + self.R, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.C, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.C, self.H * (self.N + self.Vd), bias=False)
        self.o_proj = nn.Linear(self.H * self.Vd, cfg.dim, bias=False)
        self.interleaved = cfg.rope_interleave
        self.scale = softmax_scale(self.N + self.R, cfg.rope_scaling)

    def cache_shapes(self) -> list[tuple[int, ...]]:
        return [(self.C,), (self.R,)]

    def _pairs(self, x_SR: torch.Tensor) -> torch.Tensor:
        """Rotary dims in (x0, x1) pairs: as stored, or from halves (x_i, x_{i+R/2})."""
        return x_SR if self.interleaved else halves_to_pairs(x_SR)

    def forward(self, x_BSD: torch.Tensor, rot_SR: torch.Tensor, cache: KVCache | None = None,
                mask_B1ST: torch.Tensor | None = None) -> torch.Tensor:
        """rot_SR: these tokens' rotary table, [S, R/2, 2] or per row [B, S, R/2, 2]; mask_B1ST: which keys each
        query sees (True = attend), replacing the causal mask (document masking); None is causal."""
        B, S, _ = x_BSD.shape
        H, N, R, Vd = self.H, self.N, self.R, self.Vd
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope_BHSN, q_pe_BHSR = q.view(B, S, H, N + R).transpose(1, 2).split([N, R], dim=-1)
        c_kv_BSC, k_pe_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.C, R], dim=-1)
        c_kv_BSC = self.kv_a_layernorm(c_kv_BSC)
        q_pe_BHSR = apply_rotary(self._pairs(q_pe_BHSR), _per_head(rot_SR))
        k_pe_BSR = apply_rotary(self._pairs(k_pe_BSR), rot_SR)  # [B, S, R]: no head dim
        start = 0
        if cache is not None:  # the latent is cached, not the per-head keys and values
            start = cache.pos
            c_kv_BSC, k_pe_BSR = cache.update(self.layer, c_kv_BSC, k_pe_BSR)
        T = c_kv_BSC.shape[1]
        k_nope_BHTN, v_BHTV = self.kv_b_proj(c_kv_BSC).view(B, T, H, N + Vd).transpose(1, 2).split([N, Vd], dim=-1)
        k_BHTQ = torch.cat([k_nope_BHTN, k_pe_BSR[:, None].expand(B, H, T, R)], dim=-1)
        q_BHSQ = torch.cat([q_nope_BHSN, q_pe_BHSR], dim=-1)
        mask = _causal_mask(start, S, T, x_BSD.device) if mask_B1ST is None else mask_B1ST
        y_BHSV = F.scaled_dot_product_attention(q_BHSQ, k_BHTQ, v_BHTV, attn_mask=mask, is_causal=mask is None,
                                                scale=self.scale)
        y_BSD: torch.Tensor = self.o_proj(y_BHSV.transpose(1, 2).reshape(B, S, H * Vd))
        return y_BSD
