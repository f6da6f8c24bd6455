"""The memory a training step needs, estimated from the configs, against what the device has: a batch that
cannot fit is refused at the start instead of being killed by the OOM killer in the middle."""

from __future__ import annotations

import os
from pathlib import Path

from dsmoe.config import ModelConfig, TrainConfig

ACTIVATION_OVERHEAD = 1.15  # backward's temporaries beyond the ones counted (fitted: see step_memory)


def step_memory(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[int, int]:
    """(fixed, per_sequence): an estimate of the bytes one training step needs, from the configs alone.

    fixed: the weights, their gradients and AdamW's two moments, 16 bytes per parameter (fp32).
    per_sequence: the activations one sequence of a micro-batch keeps for backward, seq_len tokens of
      attention ~10*D numbers per block (norm input and output, q, k, v before and after rotary, the
      attention output and its reshaped copy), a dense FFN 3*D + 4*H (norm, gate, up, silu, hidden), an MoE
      FFN 3*D + 2*E (logits, scores) + K*(2*F + 3) (the routed experts keep only their two pre-activations,
      plus weight, id and token index) + 4*N_s*F (the shared experts), and the output layer 2*D + 4*V
      (final norm; logits, their log-softmax, and in backward the gradients of both); times
      ACTIVATION_OVERHEAD for backward's other temporaries, at 4 bytes a number (2 on cuda, under bf16 autocast).
    With activation checkpointing a block keeps only its input (D) and recomputes the rest in backward,
    where one block's activations live at a time.
    Micro-batches run one after the other, so grad_accum does not add; attention is the fused kernel, whose
    memory is linear in seq_len. Against the peak RSS of CPU training steps (debug and tiny presets, vocabularies
    of 260 and 2048, batch 4 to 68) the activation estimate is within 10%: good enough to refuse a batch that
    cannot fit, not to predict the peak to the byte.
    """
    D, L, S = model_cfg.dim, model_cfg.n_layers, train_cfg.seq_len or model_cfg.max_seq_len
    trains_bpe = train_cfg.tokenizer == "bpe" and not (train_cfg.resume or train_cfg.init)  # else model_cfg's is right
    V = train_cfg.bpe_vocab_size if trains_bpe else model_cfg.vocab_size
    attn, dense = 10 * D, 3 * D + 4 * model_cfg.dense_hidden
    moe, n_moe = model_cfg.moe, model_cfg.n_moe_layers
    blocks = [attn + dense] * (L - n_moe)
    if moe is not None:
        blocks += [attn + 3 * D + 2 * moe.n_routed_experts + moe.top_k * (2 * moe.expert_dim + 3)
                   + 4 * moe.n_shared_experts * moe.expert_dim] * n_moe
    # activation checkpointing keeps each block's input, and one block's activations at a time in backward
    kept = L * D + max(blocks, default=0) if train_cfg.activation_checkpointing else sum(blocks)
    per_token = kept + 2 * D + 4 * V + D  # + the output layer and the embedding's output
    number = 2 if train_cfg.device == "cuda" else 4
    params = model_cfg.num_params() + (V - model_cfg.vocab_size) * D * (1 if model_cfg.tie_embeddings else 2)
    return 16 * params, int(ACTIVATION_OVERHEAD * per_token * S * number)


def available_memory(device: str) -> int | None:
    """Bytes a run can still use: free GPU memory on cuda; on cpu the kernel's MemAvailable, or less where a
    cgroup (a container's limit) allows less. None where neither can be read."""
    if device == "cuda":
        import torch  # config.py stays importable without touching CUDA; only this asks it
        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    limits: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
            if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
                limits.append(int(limit) - int(usage))
        except (OSError, ValueError):
            pass
    if not limits and hasattr(os, "sysconf"):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_step_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, available: int | None = None) -> None:
    """Refuse, naming batch_size, a run whose training step would not fit in the memory available on its
    device (`step_memory`'s estimate against `available_memory`, unless `available` is given): a clear error
    at the start instead of the kernel's OOM killer in the middle."""
    available = available_memory(train_cfg.device) if available is None else available
    fixed, per_sequence = step_memory(model_cfg, train_cfg)
    B = train_cfg.batch_size
    if available is None or fixed + B * per_sequence <= available:
        return
    fits = (available - fixed) // per_sequence
    advice = (f"lower batch_size to at most {fits} (or seq_len), and raise grad_accum to keep the tokens per step"
              if fits > 0 else "even batch_size=1 does not fit: choose a smaller model or seq_len")
    raise ValueError(f"batch_size={B} is too large for this machine: with seq_len="
                     f"{train_cfg.seq_len or model_cfg.max_seq_len} a training step needs about "
                     f"{_size(fixed + B * per_sequence)} (estimated: {_size(fixed)} of weights, gradients and AdamW "
                     f"state + {per_sequence / 2**20:.1f} MiB of activations per sequence), but "
                     f"{train_cfg.device} has {_size(available)} available; {advice}")
