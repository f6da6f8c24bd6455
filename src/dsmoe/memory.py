"""The memory a training step needs, estimated from the configs, against what the device has: a batch that
cannot fit is refused at the start instead of being killed by the OOM killer in the middle."""

from __future__ import annotations

import os
from pathlib import Path

from dsmoe.config import ModelConfig, TrainConfig

ACTIVATION_OVERHEAD = 1.15  # backward's temporaries beyond the ones counted (fitted: see step_memory)


def step_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, *, world: int = 1, ep: int = 1) -> tuple[int, int]:
    """(fixed, per_sequence): an estimate of the bytes one training step needs on each of `world` ranks (expert
    parallel over `ep` of them), from the configs alone.

    fixed: the weights, their gradients and AdamW's two moments, 16 bytes per parameter (fp32), MTP modules
    included. Under a layout of world = dp x ep ranks (dsmoe.parallel: routed experts split over ep and FSDP2-
    sharded over dp, everything else FSDP2-sharded over all ranks) every parameter lives on exactly one rank, so
    a rank holds 16/world bytes per parameter, plus the full-size copies FSDP2 gathers to compute with
    (`gathered_bytes`).
    per_sequence: the activations one sequence of a micro-batch keeps for backward, seq_len tokens of
      attention ~10*D numbers per block (norm input and output, q, k, v before and after rotary, the
      attention output and its reshaped copy), a dense FFN 3*D + 4*H (norm, gate, up, silu, hidden), an MoE
      FFN 3*D + 2*E (logits, scores) + K*(2*F + 3) (the routed experts keep only their two pre-activations,
      plus weight, id and token index) + 4*N_s*F (the shared experts), and the output layer 2*D + 4*V
      (final norm; logits, their log-softmax, and in backward the gradients of both); each MTP depth adds a
      block, 6*D (enorm and hnorm outputs, their concatenation, eh_proj's output, the shifted tokens' embedding)
      and an output layer; times ACTIVATION_OVERHEAD for backward's other temporaries, at 4 bytes a number
      (2 on cuda, under bf16 autocast). With ep > 1 an MoE layer also keeps the hidden states it received, a
      token's once for each rank it reaches (at most min(K, ep)). Each rank trains on batch_size / world of the
      sequences, and under balanced routing its experts compute as many assignments as its own tokens make.
    With activation checkpointing a block keeps only its input (D) and recomputes the rest in backward,
    where one block's activations live at a time.
    Micro-batches run one after the other, so grad_accum does not add; attention is the fused kernel, whose
    memory is linear in seq_len (with doc_mask its block-causal mask adds seq_len^2 bytes a sequence). Against
    the peak RSS of CPU training steps (debug and tiny presets, vocabularies of 260 and 2048, batch 4 to 68) the
    activation estimate is within 10%: good enough to refuse a batch that cannot fit, not to predict the peak to
    the byte.
    """
    state, gathered = _fixed(model_cfg, train_cfg, world, ep)
    return state + gathered, _per_sequence(model_cfg, train_cfg, ep)


def _check_layout(world: int, ep: int) -> None:
    """world = dp x ep processes, as dsmoe.parallel.init_context lays them out."""
    for name, value in (("world", world), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
    if world % ep:
        raise ValueError(f"ep={ep} is invalid: must divide world={world} (the ranks are dp x ep)")


def _vocab(model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """The vocabulary the run trains with: a BPE tokenizer trained for the run sets it, else model_cfg's."""
    trains_bpe = train_cfg.tokenizer == "bpe" and not (train_cfg.resume or train_cfg.init)
    return train_cfg.bpe_vocab_size if trains_bpe else model_cfg.vocab_size


def _fixed(model_cfg: ModelConfig, train_cfg: TrainConfig, world: int, ep: int) -> tuple[int, int]:
    """(this rank's shard of the weights, gradients and AdamW state, what FSDP2 gathers on it), in bytes."""
    _check_layout(world, ep)
    V = _vocab(model_cfg, train_cfg)
    embeddings = 1 if model_cfg.tie_embeddings else 2
    params = model_cfg.num_params() + (V - model_cfg.vocab_size) * model_cfg.dim * embeddings
    return -(-16 * params // world), gathered_bytes(model_cfg, V, ep) if world > 1 else 0


def gathered_bytes(model_cfg: ModelConfig, vocab_size: int, ep: int = 1) -> int:
    """The full-size copies FSDP2 makes on each rank of a run over several, in fp32 (no mixed-precision policy:
    autocast casts after the gather). The root module (embedding, head, final norm, the MTP modules' own norms
    and projection) keeps its weights gathered from the first forward to the end of backward, and its gradients
    from the head's backward on: 8 bytes a parameter. A block is gathered when it runs (its routed experts on
    this rank: 1/ep of the layer's); in backward the block running holds its weights and its full gradient
    until the reduce-scatter, while the next block's weights are prefetched: 12 bytes a parameter of the
    largest block."""
    cfg, D = model_cfg, model_cfg.dim
    root = vocab_size * D * (1 if cfg.tie_embeddings else 2) + D + cfg.mtp_layers * cfg.mtp_own_params()
    blocks = [cfg.block_params(3 * D * cfg.dense_hidden)] if cfg.n_moe_layers < cfg.n_layers else []
    moe = cfg.moe
    if moe is not None and (cfg.n_moe_layers or cfg.mtp_layers):  # an MTP block is MoE when the model has MoE
        routed = 3 * D * moe.expert_dim * -(-moe.n_routed_experts // ep)
        blocks.append(cfg.block_params(D * moe.n_routed_experts + 3 * D * moe.expert_dim * moe.n_shared_experts
                                       + routed))
    return 8 * root + 12 * max(blocks)


def _per_sequence(model_cfg: ModelConfig, train_cfg: TrainConfig, ep: int) -> int:
    """The activations of one sequence (see step_memory), in bytes."""
    D, L, S = model_cfg.dim, model_cfg.n_layers, train_cfg.seq_len or model_cfg.max_seq_len
    V, M = _vocab(model_cfg, train_cfg), model_cfg.mtp_layers
    attn, dense = 10 * D, 3 * D + 4 * model_cfg.dense_hidden
    moe, n_moe = model_cfg.moe, model_cfg.n_moe_layers
    blocks = [attn + dense] * (L - n_moe)
    mtp_block = attn + dense
    if moe is not None:
        received = min(moe.top_k, ep) * D if ep > 1 else 0  # the hidden states sent here by the dispatch
        moe_block = (attn + 3 * D + 2 * moe.n_routed_experts + moe.top_k * (2 * moe.expert_dim + 3)
                     + 4 * moe.n_shared_experts * moe.expert_dim + received)
        blocks += [moe_block] * n_moe
        mtp_block = moe_block  # an MTP module's block is MoE whenever the model has MoE
    blocks += [mtp_block] * M
    # activation checkpointing keeps each block's input, and one block's activations at a time in backward
    kept = (L + M) * D + max(blocks, default=0) if train_cfg.activation_checkpointing else sum(blocks)
    output = 2 * D + 4 * V
    per_token = kept + output + D + M * (6 * D + output)  # + the embedding's output, and each MTP depth's own
    number = 2 if train_cfg.device == "cuda" else 4
    mask = S * S if train_cfg.doc_mask else 0  # the block-causal mask, one bool per query and key, kept once
    return int(ACTIVATION_OVERHEAD * per_token * S * number) + mask


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


def rank_memory(device: str) -> int | None:
    """What one rank may use: on cuda its own GPU's free memory; on cpu the ranks torchrun starts on one host
    (LOCAL_WORLD_SIZE) share its memory."""
    available = available_memory(device)
    if available is None or device == "cuda":
        return available
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def size_text(n: int) -> str:
    """Bytes for a message: GiB, or MiB below one."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_step_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, available: int | None = None, *,
                      world: int = 1, ep: int = 1) -> None:
    """Refuse, naming batch_size, a run whose training step would not fit in the memory available on its
    device (`step_memory`'s estimate against `available_memory`, unless `available` is given): a clear error
    at the start instead of the kernel's OOM killer in the middle. Over `world` ranks (expert parallel over
    `ep`), each rank's share: its shards, what FSDP2 gathers, and its batch_size / world sequences."""
    available = available_memory(train_cfg.device) if available is None else available
    state, gathered = _fixed(model_cfg, train_cfg, world, ep)
    per_sequence = _per_sequence(model_cfg, train_cfg, ep)
    B = train_cfg.batch_size
    local = -(-B // world)  # the sequences each rank trains on
    need = state + gathered + local * per_sequence
    if available is None or need <= available:
        return
    fits = (available - state - gathered) // per_sequence  # sequences per rank
    if fits > 0:
        per_rank = f" ({fits} per rank)" if world > 1 else ""
        advice = (f"lower batch_size to at most {fits * world}{per_rank} (or seq_len), and raise grad_accum to keep "
                  "the tokens per step")
    elif world == 1:
        advice = "even batch_size=1 does not fit: choose a smaller model or seq_len"
    else:
        advice = (f"even batch_size={world} (one sequence per rank) does not fit: choose a smaller model or seq_len, "
                  "or more ranks")
    layout = f" per rank of {world} (dp {world // ep} x ep {ep}, {local} sequences each)" if world > 1 else ""
    fixed = (f"{size_text(state)} of weights, gradients and AdamW state" if world == 1 else
             f"{size_text(state)} of this rank's shards of the weights, gradients and AdamW state + "
             f"{size_text(gathered)} of weights and gradients FSDP2 gathers")
    where = "this machine" if world == 1 else "this layout"
    raise ValueError(f"batch_size={B} is too large for {where}: with seq_len="
                     f"{train_cfg.seq_len or model_cfg.max_seq_len} a training step needs about "
                     f"{size_text(need)}{layout} (estimated: {fixed} + {per_sequence / 2**20:.1f} MiB of activations "
                     f"per sequence), but {train_cfg.device} has {size_text(available)} available; {advice}")
