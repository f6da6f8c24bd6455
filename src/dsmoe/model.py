"""A small DeepSeekMoE language model (nanoGPT-style, one file).

Shapes: B batch, S sequence, D model dim, H query heads, Hkv key/value heads, hd head dim, V vocab.
Blocks are pre-norm: x = x + attn(norm(x)); x = x + ffn(norm(x)). The first `first_k_dense` blocks use a
dense SwiGLU FFN, the rest a dsmoe.MoE (DeepSeekMoE §4.1: the first layer stays dense because its load
balance converges slowly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelConfig
from dsmoe.experts import SwiGLU
from dsmoe.moe import MoE, moe_layers, update_biases


def rotary_table(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    """(max_len, head_dim/2) complex rotations e^{i * pos * theta^(-2j/hd)} (RoFormer)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x_BHSd: torch.Tensor, rot_Sd: torch.Tensor) -> torch.Tensor:
    x = torch.view_as_complex(x_BHSd.float().reshape(*x_BHSd.shape[:-1], -1, 2))
    return torch.view_as_real(x * rot_Sd).flatten(-2).type_as(x_BHSd)


class KVCache:
    """Per-layer key/value buffers for incremental decoding: generation cost grows linearly with length."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, device, dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.pos = 0  # tokens already cached

    def update(self, layer: int, k_BHSd, v_BHSd):
        S = k_BHSd.shape[2]
        self.k[layer][:, :, self.pos:self.pos + S] = k_BHSd
        self.v[layer][:, :, self.pos:self.pos + S] = v_BHSd
        end = self.pos + S
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x_BSD, rot_Sd, cache: KVCache | None = None):
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, rot_Sd), apply_rotary(k, rot_Sd)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
        if start == 0:
            mask = None  # plain causal attention
        else:  # query i sits at position start+i and sees keys 0..start+i
            key_pos = torch.arange(k.shape[2], device=x_BSD.device)
            query_pos = torch.arange(start, start + S, device=x_BSD.device)
            mask = key_pos <= query_pos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.dense_hidden) if cfg.moe is None or layer < cfg.first_k_dense else MoE(cfg.moe)

    def forward(self, x_BSD, rot_Sd, cache=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rot_Sd, cache)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class MoETransformer(nn.Module):
    rot: torch.Tensor  # [max_seq_len, head_dim] rotary table, a non-persistent buffer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("rot", rotary_table(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layers)."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones
            is_output = name.endswith(("wo.weight", "down_proj.weight", "w_down"))
            nn.init.normal_(p, std=resid_std if is_output else 0.02)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, cache: KVCache | None = None):
        """Returns (logits_BSV, loss); loss is the mean next-token cross-entropy (None without targets).

        The MoE layers' auxiliary losses of this forward are in `self.aux_loss()`.
        """
        B, S = idx_BS.shape
        start = cache.pos if cache is not None else 0
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + S} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x_BSD = self.embed(idx_BS)
        rot_Sd = self.rot[start:start + S]
        for block in self.layers:
            x_BSD = block(x_BSD, rot_Sd, cache)
        if cache is not None:
            cache.pos += S
        logits_BSV = self.head(self.norm(x_BSD))
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=-1)
        return logits_BSV, loss

    # ---- MoE bookkeeping --------------------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        return moe_layers(self)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' weighted auxiliary losses from the last forward."""
        return sum((m.aux_loss for m in self.moe_layers()), torch.zeros((), device=self.embed.weight.device))

    def routing_stats(self) -> dict[str, torch.Tensor]:
        """Last forward's per-layer load [L, E] and MaxVio [L] (tensors: no host sync here)."""
        layers = self.moe_layers()
        if not layers:
            return {}
        return {"tokens_per_expert": torch.stack([m.tokens_per_expert for m in layers]),
                "maxvio": torch.stack([m.maxvio for m in layers])}

    def update_biases(self, all_reduce_=None) -> None:
        """Loss-free balancing step on every MoE layer: once per optimizer step (see dsmoe.moe.update_biases)."""
        update_biases(self, all_reduce_)

    def set_top_k(self, k: int) -> None:
        for m in self.moe_layers():
            m.set_top_k(k)

    # ---- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx_BS: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator=None) -> torch.Tensor:
        """Sample continuations with a KV cache. temperature 0 is greedy."""
        B, S = idx_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"prompt of {S} tokens exceeds max_seq_len={self.cfg.max_seq_len}; shorten it "
                             f"(e.g. keep its last {self.cfg.max_seq_len - 1} tokens)")
        total = min(S + max_new_tokens, self.cfg.max_seq_len)
        head_dim = self.cfg.dim // self.cfg.n_heads
        cache = KVCache(self.cfg.n_layers, B, self.cfg.n_kv_heads, total, head_dim,
                        idx_BS.device, self.embed.weight.dtype)
        out, step_in = idx_BS, idx_BS
        while out.shape[1] < total:
            logits_BV = self(step_in, cache=cache)[0][:, -1].float()
            step_in = sample(logits_BV, temperature, top_k, top_p, generator)
            out = torch.cat([out, step_in], dim=1)
        return out


def sample(logits_BV, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else top-k / nucleus (top-p) sampling. Returns (B, 1)."""
    if temperature <= 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = cum_BV - sorted_BV.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits_BV = logits_BV.scatter(1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)
