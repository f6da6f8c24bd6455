"""Sampling text from a trained model (KV cache, temperature, top-k / top-p)."""

from __future__ import annotations

import torch

from dsmoe.model import MoETransformer
from dsmoe.tokenizer import Tokenizer


def generate_text(model: MoETransformer, tokenizer: Tokenizer, prompt: str, max_tokens: int = 200,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0,
                  device: str = "cpu") -> str:
    """The prompt's continuation (without the prompt)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty: give at least one character to continue")
    if len(ids) >= model.cfg.max_seq_len:
        ids = ids[-(model.cfg.max_seq_len - 1):]  # keep the end: the model sees at most max_seq_len tokens
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], device=device)
    out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return tokenizer.decode(out[0, len(ids):].tolist())
