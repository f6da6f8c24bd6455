"""The language model: a DeepSeek-V2/V3-style decoder (nanoGPT-style, one file for the model itself).

Shapes: B batch, S sequence, D model dim, V vocab, R rotary dims per head.
Blocks are pre-norm: x = x + attn(norm(x)); x = x + ffn(norm(x)). Attention is rotary MHA/GQA or
Multi-head Latent Attention (dsmoe.attention). The first `first_k_dense` blocks use a dense SwiGLU FFN,
the rest a dsmoe.MoE (DeepSeekMoE §4.1: the first layer stays dense because its load balance converges
slowly). Optional multi-token prediction modules (DeepSeek-V3 §2.2) train on later tokens and are skipped
at inference. Document masking (`docs_BS`) lets a row pack several documents: each token attends only to its
own document, whose rotary positions start at 0, so each computes as if alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.attention import Attention, KVCache, MLAttention, rotary_table
from dsmoe.config import ModelConfig, _is_number
from dsmoe.experts import SwiGLU
from dsmoe.moe import MoE, moe_layers, update_biases


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn: Attention | MLAttention = MLAttention(cfg, layer) if cfg.mla else Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MoE(cfg.moe) if cfg.is_moe(layer) and cfg.moe is not None else SwiGLU(cfg.dim, cfg.dense_hidden)

    def forward(self, x_BSD: torch.Tensor, rot_SR: torch.Tensor, cache: KVCache | None = None,
                mask_B1ST: torch.Tensor | None = None) -> torch.Tensor:
        """rot_SR: the tokens' rotary table, [S, R/2, 2] or per row [B, S, R/2, 2]; mask_B1ST: None is causal."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rot_SR, cache, mask_B1ST)
        x_BSD = x_BSD + self.ffn(self.ffn_norm(x_BSD))
        return x_BSD


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 §2.2): the previous depth's hidden state and the
    embedding of the token k positions ahead, each RMSNormed, concatenated [embedding; hidden] (the order
    of the released weights, as vLLM's deepseek_mtp loads them), projected by eh_proj, then a full block;
    its own final norm before the model's shared output head. Layer index n_layers + depth."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.enorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.hnorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, cfg.n_layers + depth)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, emb_BSD: torch.Tensor, h_BSD: torch.Tensor, rot_SR: torch.Tensor,
                mask_B1SS: torch.Tensor | None = None) -> torch.Tensor:
        x_BSD = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        y_BSD: torch.Tensor = self.norm(self.block(x_BSD, rot_SR, None, mask_B1SS))
        return y_BSD


def next_token_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -1; 0 (not NaN) when a batch has none, as a fine-tuning
    batch of prompt tokens only can."""
    total = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=-1, reduction="sum")
    return total / (targets_BS != -1).sum().clamp(min=1)


class MoETransformer(nn.Module):
    rot: torch.Tensor  # [max_seq_len, R/2, 2] rotary table (cos, sin), a non-persistent buffer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, d) for d in range(cfg.mtp_layers))
        self.mtp_loss = torch.zeros(())  # the weighted MTP loss of the last training forward with targets
        self.register_buffer("rot", self.rotary(), persistent=False)
        self.reset_parameters()

    def rotary(self) -> torch.Tensor:
        """The rotary table [max_seq_len, R/2, 2] (cos, sin), yarn-scaled when the config says so."""
        cfg = self.cfg
        return rotary_table(cfg.rope_dims, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoETransformer:
        """.to(dtype) and friends cast the weights; the rotary table stays fp32 (bf16 angles would blur positions)."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch: Module._apply is untyped
        self.rot = self.rotary().to(self.rot.device)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layers)."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones
            is_output = name.endswith(("wo.weight", "o_proj.weight", "down_proj.weight", "w_down"))
            nn.init.normal_(p, std=resid_std if is_output else 0.02)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, cache: KVCache | None = None,
                docs_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits_BSV, loss); loss is the mean next-token cross-entropy (None without targets).

        docs_BS (integers, idx_BS's shape, non-decreasing along each row, e.g. 0 0 0 1 1 2) numbers the documents
        packed in a row: each token attends only to earlier tokens of its own document and its rotary position
        restarts at 0 there, so each document computes as if alone (not with a KV cache). Targets are the
        caller's: a target that crosses into the next document is trained on unless it is -1. The MTP modules
        leave out their predictions that would join two documents.

        The MoE layers' auxiliary losses of this forward are in `self.aux_loss()`; in training with targets
        the multi-token-prediction loss (weighted) is in `self.mtp_loss`.

        Bad arguments are a ValueError or TypeError naming them: types, shapes and devices always (no cost),
        the values (ids in [0, vocab_size), targets there or -1) with one host sync for their min and max. That
        sync is skipped under torch.compile, with a KV cache (generate checks its prompt once; the ids it feeds
        back are sampled from the vocabulary) and in training unless the MoE layers sync anyway to check their
        inputs (MoEConfig.check_inputs). dsmoe's training loop turns those off: its ids come from a tokenizer
        checked against vocab_size at the start, and it checks the loss at its log points instead.
        """
        B, S = self._check_ids(idx_BS, targets_BS, cache, docs_BS)
        start = cache.pos if cache is not None else 0
        x_BSD = self.embed(idx_BS)
        rot_SR, mask_B1SS = self._rotary_and_mask(start, S, docs_BS)
        for block in self.layers:
            x_BSD = block(x_BSD, rot_SR, cache, mask_B1SS)
        if cache is not None:
            cache.pos += S
        h_BSD = self.norm(x_BSD)
        logits_BSV = self.head(h_BSD)
        loss = None
        if targets_BS is not None:
            loss = next_token_loss(logits_BSV, targets_BS)
            if self.mtp and self.training:
                self.mtp_loss = self._mtp_loss(idx_BS, targets_BS, h_BSD, docs_BS)
        return logits_BSV, loss

    def _rotary_and_mask(self, start: int, S: int, docs_BS: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rotary table of tokens start..start+S and their attention mask: [S, R/2, 2] and None (causal)
        without documents; with them the table per row [B, S, R/2, 2] and the block-causal mask [B, 1, S, S]."""
        if docs_BS is None:
            return self.rot[start:start + S], None
        mask_B1SS, pos_BS = doc_mask(docs_BS)
        return self.rot[pos_BS], mask_B1SS

    def _mtp_loss(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor, h_BSD: torch.Tensor,
                  docs_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Depth k predicts token i+k+1 from depth k-1's state at i and the embedding of token i+k; the
        cross-entropies are averaged over depths and weighted (DeepSeek-V3 eq. 21-25).

        With documents, position i keeps the document of its state (token i's): attention and rotary positions
        follow it, and a position whose token i+k lies in a later document is left out of the loss. The others
        then see only their own document, as if it ran alone."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            S = idx_BS.shape[1] - k
            if S <= 0:
                break
            tgt_BS, docs_k_BS = targets_BS[:, k:], None
            if docs_BS is not None:
                docs_k_BS = docs_BS[:, :S]
                tgt_BS = tgt_BS.masked_fill(docs_k_BS != docs_BS[:, k:], -1)
            rot_SR, mask_B1SS = self._rotary_and_mask(0, S, docs_k_BS)
            h_BSD = module(self.embed(idx_BS[:, k:]), h_BSD[:, :S], rot_SR, mask_B1SS)
            logits_BSV = self.head(h_BSD)
            losses.append(next_token_loss(logits_BSV, tgt_BS))
        if not losses:
            return h_BSD.new_zeros(())
        return self.cfg.mtp_loss_weight * torch.stack(losses).mean()

    # ---- argument checks --------------------------------------------------------------------------

    def _check_ids(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None, cache: KVCache | None,
                   docs_BS: torch.Tensor | None = None) -> tuple[int, int]:
        """forward's arguments (see its docstring); returns (B, S)."""
        _check_tokens("idx_BS", idx_BS, (torch.long, torch.int32), self.embed.weight.device)
        B, S = idx_BS.shape
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a dsmoe KVCache or None, got {type(cache).__name__}")
        start, room = (cache.pos, cache.buffers[0][0].shape[1]) if cache is not None else (0, self.cfg.max_seq_len)
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + S} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if cache is not None and (start + S > room or cache.buffers[0][0].shape[0] != B):
            raise ValueError(f"cache holds {cache.buffers[0][0].shape[0]} sequences of {room} positions ({start} "
                             f"used): it cannot take idx_BS of shape {(B, S)}")
        if targets_BS is not None:
            _check_tokens("targets_BS", targets_BS, (torch.long,), idx_BS.device)
            if targets_BS.shape != idx_BS.shape:
                raise ValueError(f"targets_BS has shape {tuple(targets_BS.shape)}, idx_BS {(B, S)}: they must be equal")
        if docs_BS is not None:
            _check_docs(docs_BS, idx_BS, cache)
        checks_values = not self.training or (self.cfg.moe is not None and self.cfg.moe.check_inputs)
        if cache is None and checks_values and not torch.compiler.is_compiling():
            self._check_id_values(idx_BS, targets_BS, docs_BS)
        return B, S

    def _check_id_values(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
                         docs_BS: torch.Tensor | None = None) -> None:
        """Ids in [0, vocab_size), targets there or -1 (ignored), document numbers non-decreasing along each row:
        one host sync for the four extremes and the count of rows whose numbers decrease."""
        if idx_BS.is_meta:
            return  # no values to check
        tensors = [idx_BS] if targets_BS is None else [idx_BS, targets_BS]
        checks = [e.long() for t in tensors for e in torch.aminmax(t)]
        if docs_BS is not None:
            checks.append((docs_BS[:, 1:] < docs_BS[:, :-1]).any(dim=1).sum())
        extremes = torch.stack(checks).tolist()
        V = self.cfg.vocab_size
        if extremes[0] < 0 or extremes[1] >= V:
            raise ValueError(f"idx_BS holds token ids from {extremes[0]} to {extremes[1]}: they must be in "
                             f"[0, vocab_size={V})")
        if targets_BS is not None and (extremes[2] < -1 or extremes[3] >= V):
            raise ValueError(f"targets_BS holds ids from {extremes[2]} to {extremes[3]}: they must be in "
                             f"[0, vocab_size={V}), or -1 (ignored)")
        if docs_BS is not None and extremes[-1]:
            raise ValueError(f"docs_BS decreases along {extremes[-1]} row(s): document numbers must be "
                             f"non-decreasing along each row (e.g. 0, 0, 0, 1, 1, 2: one run per document)")

    # ---- MoE bookkeeping --------------------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        """The MoE layers of the model's own blocks (what routes at inference; the MTP modules' are left out:
        they run only in training). `dsmoe.moe.moe_layers(model)` lists every one."""
        return moe_layers(self.layers)

    def aux_loss(self) -> torch.Tensor:
        """The weighted auxiliary losses of the last forward: the MoE layers' balance losses, plus in training
        the multi-token-prediction modules' balance losses and the MTP loss."""
        if self.mtp and self.training:
            total = sum((m.aux_loss for m in moe_layers(self)), self.mtp_loss)
        else:
            total = sum((m.aux_loss for m in self.moe_layers()), torch.zeros((), device=self.embed.weight.device))
        return total

    def routing_stats(self) -> dict[str, torch.Tensor]:
        """Last forward's per-layer load [L, E] and MaxVio [L] (tensors: no host sync here)."""
        layers = self.moe_layers()
        if not layers:
            return {}
        return {"tokens_per_expert": torch.stack([m.tokens_per_expert for m in layers]),
                "maxvio": torch.stack([m.maxvio for m in layers])}

    def update_biases(self, all_reduce_: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Loss-free balancing step on every MoE layer: once per optimizer step (see dsmoe.moe.update_biases)."""
        update_biases(self, all_reduce_)

    def set_top_k(self, k: int) -> None:
        for m in moe_layers(self):
            m.set_top_k(k)

    # ---- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx_BS: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations with a KV cache, up to max_seq_len tokens in all. temperature 0 is greedy; top_k
        (>= 1) and top_p (in (0, 1]) limit the choice, None leaves it whole."""
        _check_tokens("idx_BS", idx_BS, (torch.long, torch.int32), self.embed.weight.device)
        B, S = idx_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"prompt of {S} tokens exceeds max_seq_len={self.cfg.max_seq_len}; shorten it "
                             f"(e.g. keep its last {self.cfg.max_seq_len - 1} tokens)")
        _check_sampling(max_new_tokens, temperature, top_k, top_p, generator, idx_BS.device)
        self._check_id_values(idx_BS)  # once: forward does not check the cached steps, whose ids are sampled
        total = min(S + max_new_tokens, self.cfg.max_seq_len)
        first = self.layers[0]
        assert isinstance(first, Block)
        cache = KVCache(self.cfg.n_layers, B, total, first.attn.cache_shapes(), idx_BS.device, self.embed.weight.dtype)
        out, step_in = idx_BS, idx_BS
        while out.shape[1] < total:
            logits_BV = self(step_in, cache=cache)[0][:, -1].float()
            step_in = sample(logits_BV, temperature, top_k, top_p, generator)
            out = torch.cat([out, step_in], dim=1)
        return out


def doc_mask(docs_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Document masking of packed rows: (mask_B1SS, pos_BS). Token i attends to tokens j <= i of its own
    document (True = attend); its rotary position is its index in that document, the count of the earlier
    tokens it sees. For non-decreasing numbers: i minus the index of its document's first token."""
    S = docs_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=docs_BS.device).tril()
    mask_BSS = (docs_BS[:, :, None] == docs_BS[:, None, :]) & causal_SS
    pos_BS = mask_BSS.sum(dim=-1) - 1
    return mask_BSS[:, None], pos_BS


def _check_docs(docs_BS: torch.Tensor, idx_BS: torch.Tensor, cache: KVCache | None) -> None:
    """forward's document numbers: type, shape and device (their order is checked with the ids' values)."""
    if cache is not None:
        raise ValueError("docs_BS cannot be used with a KV cache: document masking is for whole packed rows "
                         "(training, evaluation); decode each document with its own cache")
    _check_tokens("docs_BS", docs_BS, (torch.long, torch.int32), idx_BS.device, what="document numbers")
    if docs_BS.shape != idx_BS.shape:
        raise ValueError(f"docs_BS has shape {tuple(docs_BS.shape)}, idx_BS {tuple(idx_BS.shape)}: they must be "
                         f"equal (one document number per token)")


def _check_tokens(name: str, t: object, dtypes: tuple[torch.dtype, ...], device: torch.device,
                  what: str = "token ids") -> None:
    """A (B, S) tensor of token ids (or `what`) on `device`, with B, S >= 1 (its values are checked apart: a
    host sync)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {what}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must hold integer {what} ({allowed}), got dtype {t.dtype}")
    if t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"{name} must have shape (batch, sequence), both >= 1, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the model on {device}: move it ({name}.to({str(device)!r}))")


def _check_sampling(max_new_tokens: object, temperature: object, top_k: object, top_p: object, generator: object,
                    device: torch.device) -> None:
    """generate's sampling arguments."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 0")
    if not _is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer >= 1, or None (no limit)")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is invalid: must be a number in (0, 1], or None (no limit)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the ids on {device}: make it there "
                         f"(torch.Generator(device={str(device)!r}))")


def sample(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
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
