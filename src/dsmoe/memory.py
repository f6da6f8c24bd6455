"""The memory a training step needs, estimated from the configs, against what the device has: a batch that
cannot fit is refused at the start instead of being killed by the OOM killer in the middle. The same estimate,
per pipeline stage and rank, ranks the pp x dp x ep layouts a model can train in (`plan`, `dsmoe plan`).

One estimator: the model is a list of units in pipeline order (the embedding, each block, the head, each MTP
module's own layers and its block), each with its parameters and the numbers per token it keeps for backward. A
rank holds some of them (all of them without pipeline parallelism), and every figure is a sum over its units.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from dsmoe.config import ModelConfig, MoEConfig, TrainConfig

STATE_BYTES = 16  # a parameter's fp32 weight (the master copy: bf16 autocast casts per op), fp32 gradient and
#                   AdamW's two fp32 moments (exp_avg, exp_avg_sq): 4 + 4 + 8
HIDDEN_BYTES = 4  # the residual stream (between blocks and between pipeline stages) and the hidden states the
#                   all-to-alls carry stay fp32 under bf16 autocast: RMSNorm's output, and the routed-expert op
#                   (dsmoe::routed_swiglu) is not autocast


@dataclass(frozen=True)
class Unit:
    """A piece of the model in pipeline order: the embedding, a block, the head, an MTP module's own layers."""

    name: str
    params: int            # its parameters
    acts: int              # numbers per token it keeps for backward
    block: bool = False    # a block: activation checkpointing keeps only its input (D numbers) and recomputes
    #                        `acts` in backward, one block at a time
    expert: int = 0        # the parameters of one routed expert (3*D*F) ...
    experts: int = 0       # ... and how many the unit has (split over the ep ranks, reached by all-to-alls)
    transient: int = 0     # numbers per token its backward alone adds, one micro-batch at a time
    weight_grads: int = 0  # numbers per token a split backward (zb, dualpipev) keeps from the input pass to the
    #                        weight pass: the output gradients its weights' gradients are computed from (dsmoe's
    #                        routed experts compute theirs in the input pass: one autograd node)

    def local(self, ep: int) -> int:
        """Parameters one rank of an expert-parallel group of ep computes with: its 1/ep of the routed experts."""
        return self.params - self.expert * (self.experts - -(-self.experts // ep))


def model_units(model_cfg: ModelConfig, vocab_size: int, ep: int = 1) -> list[Unit]:
    """The model's units in pipeline order with the activations step_memory describes (an MoE block under ep > 1
    also keeps the hidden states the dispatch sent it). Their parameters sum to num_params() at vocab_size."""
    cfg, D, V, moe = model_cfg, model_cfg.dim, vocab_size, model_cfg.moe
    attn = 8 * D  # its norm's input and output, the projections' input, q, k, v, the attention output and its copy
    ffn_norm = 3 * D  # the FFN's norm: input, output, and the output the FFN's first projections keep
    attn_dys = 6 * D  # the output gradients of q, k, v, o and of the two norms' weights
    H = cfg.dense_hidden
    dense = Unit("dense block", cfg.block_params(3 * D * H), attn + ffn_norm + 4 * H, block=True,
                 weight_grads=attn_dys + 2 * H + D)
    routed = dense
    if moe is not None:
        received = min(moe.top_k, ep) * D if ep > 1 else 0
        shared = 2 * moe.shared_width + D if moe.shared_width else 0
        routed = Unit("MoE block", cfg.block_params(moe.num_params()),
                      attn + ffn_norm + D + 2 * moe.n_routed_experts + moe.top_k * (2 * moe.expert_dim + 3)
                      + 4 * moe.shared_width + received, block=True, expert=3 * D * moe.expert_dim,
                      experts=moe.n_routed_experts, weight_grads=attn_dys + moe.n_routed_experts + shared)
    output = 3 * D + V  # the final norm and the head's input, the log-softmax of the logits; in backward the
    #                     gradients of the log-softmax and the logits
    units = [Unit("embedding", V * D, 0)]  # its output is the first block's input, which the block counts
    units += [dataclasses.replace(routed if cfg.is_moe(i) else dense, name=f"block {i}") for i in range(cfg.n_layers)]
    units.append(Unit("head", D + (0 if cfg.tie_embeddings else V * D), output, transient=2 * V, weight_grads=V + D))
    for d in range(cfg.mtp_layers):  # enorm and hnorm outputs, their concatenation, eh_proj's output, the
        units.append(Unit(f"mtp {d}", cfg.mtp_own_params(), 6 * D + output, transient=2 * V,  # shifted
                          weight_grads=4 * D + V))                                           # tokens' embedding
        units.append(dataclasses.replace(routed, name=f"mtp {d} block"))  # MoE whenever the model has MoE
    return units


@dataclass(frozen=True)
class _Run:
    """What sizes the activations of a sequence."""

    dim: int
    seq_len: int
    number: int    # bytes per activation: 4 on cpu (fp32), 2 on cuda (bf16 autocast)
    ac: bool       # activation checkpointing
    mask: int      # bytes of doc_mask's block-causal mask, one bool per query and key, kept once per forward
    split_backward: bool = False  # the schedule runs a stage's input and weight backward apart (zb, dualpipev)


def _run(model_cfg: ModelConfig, train_cfg: TrainConfig) -> _Run:
    S = train_cfg.seq_len or model_cfg.max_seq_len
    return _Run(model_cfg.dim, S, 2 if train_cfg.device == "cuda" else 4, train_cfg.activation_checkpointing,
                S * S if train_cfg.doc_mask else 0)


def _activations(run: _Run, chunks: list[tuple[list[Unit], int, int]]) -> int:
    """Bytes one sequence of each micro-batch in flight keeps on a rank. chunks: (its units, its hidden states
    between stages, micro-batches in flight): the output it sends a next stage, kept until that micro-batch's
    backward (+1), and the input it receives (-1: its first block keeps the receive buffer, counted apart, not a
    copy). Each keeps its units' activations per micro-batch (a block only its input under activation
    checkpointing); under activation checkpointing one block's activations are recomputed at a time."""
    def kept(u: Unit) -> int:
        return run.dim if run.ac and u.block else u.acts

    per_token = sum(n * (sum(map(kept, units)) + edges * run.dim) for units, edges, n in chunks)
    per_token += _transient(run, [u for units, _, _ in chunks for u in units])
    if run.split_backward:  # a chunk's input pass keeps what its weight pass needs: one chunk's at a time
        per_token += max(sum(u.weight_grads for u in units) for units, _, _ in chunks)
    return per_token * run.seq_len * run.number + sum(n for *_, n in chunks) * run.mask


def _transient(run: _Run, units: list[Unit]) -> int:
    """Numbers per token the backward of one of `units` adds for one micro-batch at a time, at most (under
    activation checkpointing a block's backward recomputes its activations)."""
    return max((u.acts if run.ac and u.block else u.transient for u in units), default=0)


def _state(params: int, ranks: int) -> int:
    """A rank's shard of the weights, gradients and AdamW state of `params` spread over `ranks` (each parameter on
    exactly one of them: see step_memory)."""
    return -(-STATE_BYTES * params // ranks)


def _gathered(units: list[Unit], ep: int) -> int:
    """What FSDP2 gathers on one rank of several: see gathered_bytes (pipelined: see layout_plan)."""
    root = sum(u.local(ep) for u in units if not u.block)
    return 8 * root + 12 * max((u.local(ep) for u in units if u.block), default=0)


def step_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, *, world: int = 1, ep: int = 1) -> tuple[int, int]:
    """(fixed, per_sequence): an estimate of the bytes one training step needs on each of `world` ranks (expert
    parallel over `ep` of them), from the configs alone.

    fixed: the weights, their gradients and AdamW's two moments, 16 bytes per parameter (fp32), MTP modules
    included. Under a layout of world = dp x ep ranks (dsmoe.parallel: routed experts split over ep and FSDP2-
    sharded over dp, everything else FSDP2-sharded over all ranks) every parameter lives on exactly one rank, so
    a rank holds 16/world bytes per parameter, plus the full-size copies FSDP2 gathers to compute with
    (`gathered_bytes`).
    per_sequence: the activations one sequence of a micro-batch keeps for backward, seq_len tokens of, per
      block: attention 8*D (its norm's input and output, the projections' input, q, k, v, the attention output
      and its reshaped copy), the FFN's norm 3*D (input, output and the copy its first projections keep), then a
      dense FFN 4*H (gate, up, silu, hidden) or an MoE FFN D + 2*E (the router's input, logits, scores) +
      K*(2*F + 3) (the routed experts keep only their two pre-activations, plus weight, id and token index) +
      4*N_s*F (the shared experts); the output layer 3*D + V (the final norm, the head's input, the logits'
      log-softmax), and in its backward 2*V more for one micro-batch (the gradients of the log-softmax and the
      logits); each MTP depth adds a block, 6*D (enorm and hnorm outputs, their concatenation, eh_proj's output,
      the shifted tokens' embedding) and an output layer. 4 bytes a number (2 on cuda, under bf16 autocast).
      With ep > 1 an MoE layer also keeps the hidden states it received, a token's once for each rank it reaches
      (at most min(K, ep)). Each rank trains on batch_size / world of the sequences, and under balanced routing
      its experts compute as many assignments as its own tokens make.
    With activation checkpointing a block keeps only its input (D) and recomputes the rest in backward,
    where one block's activations live at a time.
    Micro-batches run one after the other, so grad_accum does not add; attention is the fused kernel, whose
    memory is linear in seq_len (with doc_mask its block-causal mask adds seq_len^2 bytes a sequence). The
    counts are what torch's autograd saves in dsmoe's model (read with saved-tensor hooks), nothing fitted.
    Against the bytes allocated at the peak of CPU training steps (malloc's count, sampled after every op: the
    nearest CPU measure to torch.cuda.max_memory_allocated) the activations per sequence are within 10% (tiny
    1.04, debug 0.95: tests/test_bad_inputs.py), and `plan`'s per-rank figures for pipelined runs within 15%
    (tests/test_plan.py).
    The peak RSS is higher: glibc keeps freed heap memory, and MKL caches its buffers. `plan` is this estimate
    per pipeline stage.
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
    units = model_units(model_cfg, _vocab(model_cfg, train_cfg), ep)
    return _state(sum(u.params for u in units), world), _gathered(units, ep) if world > 1 else 0


def gathered_bytes(model_cfg: ModelConfig, vocab_size: int, ep: int = 1) -> int:
    """The full-size copies FSDP2 makes on each rank of a run over several, in fp32 (no mixed-precision policy:
    autocast casts after the gather). The root module (embedding, head, final norm, the MTP modules' own norms
    and projection) keeps its weights gathered from the first forward to the end of backward, and its gradients
    from the head's backward on: 8 bytes a parameter. A block is gathered when it runs (its routed experts on
    this rank: 1/ep of the layer's); in backward the block running holds its weights and its full gradient
    until the reduce-scatter, while the next block's weights are prefetched: 12 bytes a parameter of the
    largest block."""
    return _gathered(model_units(model_cfg, vocab_size, ep), ep)


def _per_sequence(model_cfg: ModelConfig, train_cfg: TrainConfig, ep: int) -> int:
    """The activations of one sequence (see step_memory), in bytes: the whole model as one stage."""
    units = model_units(model_cfg, _vocab(model_cfg, train_cfg), ep)
    return _activations(_run(model_cfg, train_cfg), [(units, 0, 1)])


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


# ----------------------------------------------------------------------------- layouts: pp x dp x ep
# gpus = pp x dp x ep. Each pipeline stage is the model trimmed to its units and laid out as dsmoe.parallel lays
# out a whole model: its routed experts split over ep and FSDP2-sharded over dp, everything else FSDP2-sharded over
# its dp x ep ranks, which all train on their own share of the batch. Stages and schedules are
# torch.distributed.pipelining's (dsmoe.parallel.pipeline trains with each): what follows models torch's pieces as
# they are (torch/distributed/pipelining/stage.py and schedules.py, read at torch 2.13).

SCHEDULES = {  # --schedule -> the torch.distributed.pipelining schedule class name (get_schedule_class)
    "gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zb": "ZBVZeroBubble",
    "dualpipev": "DualPipeV"}
SPLIT_BACKWARD = ("zb", "dualpipev")  # schedules that run a stage's input and weight backward apart
GB = 10**9  # plans speak of GB, as GPU memory is sold


def stage_chunks(schedule: str, pp: int, v: int = 2) -> list[list[int]]:
    """The chunks of the model (virtual stages, numbered in pipeline order) each of the pp ranks runs, as torch's
    schedules place them: one each (GPipe, 1F1B); v each, round robin (Interleaved1F1B); two in a V, the first and
    the last on rank 0 (ZB-V, DualPipeV), so the embedding and the head share a rank."""
    if pp == 1 or schedule in ("gpipe", "1f1b"):
        return [[r] for r in range(pp)]
    if schedule == "interleaved":
        return [[r + k * pp for k in range(v)] for r in range(pp)]
    return [[r, 2 * pp - 1 - r] for r in range(pp)]


def in_flight(schedule: str, pp: int, microbatches: int, v: int = 2) -> list[list[int]]:
    """The micro-batches whose activations each rank's chunks hold at that rank's peak (ordered as stage_chunks),
    as torch's schedules order their work: GPipe all M; 1F1B pp - r (rank r); Interleaved1F1B its warm-up
    forwards, (v-1)*M/rounds + 2*(pp-1-r), and the first steady one, dealt to the rank's chunks M/rounds at a time
    (Narayanan et al. 2021's schedule: rank 0 holds pp + (pp-1)/v stages' worth); ZB-V 2pp-1-r and r+1 (pp on
    every rank, like 1F1B's first: Qi et al. 2024 §6); DualPipeV one more (2pp-r and r+1, DualPipe's PP+1).
    tests/test_plan.py holds these to torch's own schedules."""
    M, ranks = microbatches, range(pp)
    if pp == 1:
        return [[1]]
    if schedule == "gpipe":
        return [[M] for _ in ranks]
    if schedule == "1f1b":
        return [[min(M, pp - r)] for r in ranks]
    if schedule == "interleaved":
        per_round = M // max(1, M // pp)
        out = []
        for r in ranks:
            counts = [0] * v
            for f in range(min((v - 1) * per_round + 2 * (pp - 1 - r) + 1, M * v)):
                counts[(f // per_round) % v] += 1
            out.append(counts)
        return out
    extra = 1 if schedule == "dualpipev" else 0
    return [[min(M, 2 * pp - 1 - r + extra), min(M, r + 1)] for r in ranks]


def bubble(schedule: str, pp: int, microbatches: int, v: int = 2) -> float:
    """The pipeline's idle share of a step, bubble / (bubble + compute), with forward, input-backward and
    weight-backward of a chunk taking equal times (F = B = W, a full backward 2F), as the schedules' papers
    compare them: GPipe and 1F1B a bubble of (pp-1)/M of the compute; interleaved 1/v of that (Narayanan et al.
    2021); ZB-V none (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", §6); DualPipeV (pp-1)(F&B + B - 3W)
    against 2M(F + B) per rank (DualPipe's README, 2pp stages), with the overlapped F&B = F + B: (pp-1)/(3M)."""
    M = microbatches
    if pp == 1:
        return 0.0
    ratio = {"gpipe": (pp - 1) / M, "1f1b": (pp - 1) / M, "interleaved": (pp - 1) / (v * M), "zb": 0.0,
             "dualpipev": (pp - 1) / (3 * M)}[schedule]
    return ratio / (1 + ratio)


def a2a_copies(moe: MoEConfig | None, ep: int, limited: bool = True) -> int:
    """At most how many ranks one token's hidden state goes to in an MoE layer: dsmoe's dispatch sends it once to
    each rank holding one of its top_k experts (self included), so min(top_k, ep); with group-limited routing
    (n_groups > 1, `limited`) only to the ranks of its topk_groups groups (a group is a rank, V2's device limit,
    or ep / n_groups ranks, V3's node limit). 0 without expert parallelism."""
    if moe is None or ep == 1:
        return 0
    n = min(moe.top_k, ep)
    if limited and moe.n_groups > 1:
        n = min(n, moe.topk_groups * max(1, ep // moe.n_groups))
    return n


@functools.lru_cache(maxsize=64)
def split_blocks(weights: tuple[int, ...], chunks: int) -> tuple[int, ...]:
    """Blocks in each of `chunks` contiguous chunks (each at least one) whose largest sum of weights is the
    smallest possible, the most even such split among ties (dynamic programming over chunks and blocks)."""
    L = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    best: dict[tuple[int, int], tuple[int, int, int]] = {(0, 0): (0, 0, 0)}  # (chunks, blocks) -> (largest,
    for k in range(1, chunks + 1):                                          # sum of squares, previous blocks)
        for i in range(k, L - (chunks - k) + 1):
            best[k, i] = min((max(best[k - 1, j][0], w := prefix[i] - prefix[j]), best[k - 1, j][1] + w * w, j)
                             for j in range(k - 1, i) if (k - 1, j) in best)
    sizes, i = [], L
    for k in range(chunks, 0, -1):
        j = best[k, i][2]
        sizes.append(i - j)
        i = j
    return tuple(reversed(sizes))


@dataclass(frozen=True)
class MemorySplit:
    """One GPU's memory at its peak, in bytes, by what holds it."""

    params: int              # its shard of the fp32 weights (4 of the 16 bytes a parameter)
    grads: int               # its shard of the fp32 gradients (4) it holds at its peak (see layout_plan; under a
    #                          pipeline with FSDP2 on the stage module they are unsharded, in `gathered`)
    adamw: int               # its shard of AdamW's two fp32 moments (8)
    gathered: int            # the full-size weights (and gradients) FSDP2 gathers on it
    activations: int         # one micro-batch's activations, with activation checkpointing as the run sets it
    activations_no_ac: int   # the same without activation checkpointing
    activations_ac: int      # and with it
    pipeline: int            # the schedule's other micro-batches in flight, and the stage's receive buffers

    @property
    def total(self) -> int:
        return self.params + self.grads + self.adamw + self.gathered + self.activations + self.pipeline


@dataclass(frozen=True)
class LayoutPlan:
    """One pp x dp x ep layout of a run: its busiest GPU's memory, its all-to-alls and its pipeline bubble."""

    pp: int
    dp: int
    ep: int
    schedule: str                  # a SCHEDULES key
    microbatches: int              # M per optimizer step
    micro_batch: int               # sequences per rank in one micro-batch
    stage_blocks: tuple[int, ...]  # blocks of each chunk (virtual stage) in pipeline order; the first has the
    #                                embedding, the last the head and the MTP modules
    peak_stage: int                # the pipeline rank whose memory `memory` is (the highest)
    memory: MemorySplit
    ranks: tuple[MemorySplit, ...]  # each pipeline rank's memory (a rank of each stage: the dp x ep ranks of one
    #                                 stage hold the same)
    a2a_token: tuple[int, int]     # bytes one token's dispatch sends in one MoE layer: (group-limited, unlimited)
    a2a_step: int                  # bytes the busiest GPU sends in all-to-alls in a step (group-limited): dispatch
    #                                and combine, forward, backward, and the recomputed forward under AC
    bubble: float                  # the pipeline's idle share of a step
    problem: str = ""              # why torch or dsmoe would refuse this layout; "" when it runs

    @property
    def uneven(self) -> bool:
        return len(set(self.stage_blocks)) > 1


def layout_plan(model_cfg: ModelConfig, train_cfg: TrainConfig, pp: int, dp: int, ep: int, schedule: str = "1f1b",
                microbatches: int | None = None, stages_per_rank: int = 2, accumulate: bool = False) -> LayoutPlan:
    """Memory, communication and bubble of one layout (see plan). The global batch is train_cfg's batch_size x
    grad_accum sequences; each of a stage's dp x ep ranks trains on its share, in `microbatches` micro-batches
    (default: one sequence per rank in each). accumulate: the step runs the schedule more than once, so the
    gradients of the first run are held through the next ones' peaks."""
    v, stage_ranks, moe = stages_per_rank, dp * ep, model_cfg.moe
    batch = train_cfg.batch_size * train_cfg.grad_accum
    M = microbatches or -(-batch // stage_ranks)
    mb = -(-batch // (stage_ranks * M))
    placement = stage_chunks(schedule, pp, v)
    n_chunks = sum(map(len, placement))
    if n_chunks > model_cfg.n_layers:
        raise ValueError(f"pp={pp} is invalid: {n_chunks} pipeline stages for {model_cfg.n_layers} blocks")
    units = model_units(model_cfg, _vocab(model_cfg, train_cfg), ep)
    chunks, blocks = _chunks(model_cfg, units, n_chunks, placement)
    run = dataclasses.replace(_run(model_cfg, train_cfg), split_backward=pp > 1 and schedule in SPLIT_BACKWARD)
    flights = in_flight(schedule, pp, M, v)
    D, S = model_cfg.dim, run.seq_len
    splits, sent = [], []
    for r, own in enumerate(placement):
        held = [u for c in own for u in chunks[c]]
        params = sum(u.params for u in held)
        state, shard = _state(params, stage_ranks), -(-4 * params // stage_ranks)
        stage_fsdp = stage_ranks > 1 and pp > 1 and len(own) == 1  # torch drives FSDP2 on the stage module
        if pp == 1 or accumulate:
            with_grads = held
        else:
            again = M * len(own) > sum(flights[r])
            with_grads = _grads_at_peak([chunks[c] for c in own], again,
                                        mb * S * run.number, ep, made=stage_ranks == 1 or stage_fsdp)
        # under torch's FSDP2 the gradients stay unsharded (in what it gathers) until the last backward
        grads = 0 if stage_fsdp and not accumulate else -(-4 * sum(u.params for u in with_grads) // stage_ranks)
        if stage_ranks == 1:
            gathered = 0
        elif stage_fsdp:  # unsharded until the last backward
            gathered = 4 * sum(u.local(ep) for u in [*held, *with_grads])
        else:  # one process, or two stages a rank (dsmoe's views of one model): FSDP2 block by block
            gathered = _gathered(held, ep)
        flying = [(chunks[c], (c < n_chunks - 1) - (c > 0), n) for c, n in zip(own, flights[r])]
        one = [(units_c, edges, 1) for units_c, edges, _ in flying]
        with_ac, without = (mb * _activations(dataclasses.replace(run, ac=ac), one) for ac in (True, False))
        activations = with_ac if run.ac else without
        buffers = sum((c > 0) + (c < n_chunks - 1) for c in own) * M * mb * S * D * HIDDEN_BYTES
        pipeline = mb * _activations(run, flying) - activations + buffers
        splits.append(MemorySplit(shard, grads, state - 2 * shard, gathered, activations, without, with_ac, pipeline))
        moe_layers = sum(u.experts > 0 for u in held)
        passes = 2 * (3 if run.ac else 2)  # dispatch and combine; forward, backward (and the recomputed forward)
        sent.append(M * mb * S * moe_layers * a2a_copies(moe, ep) * D * HIDDEN_BYTES * passes)
    peak = max(range(pp), key=lambda r: splits[r].total)
    per_token = tuple(a2a_copies(moe, ep, limited) * D * HIDDEN_BYTES for limited in (True, False))
    return LayoutPlan(pp, dp, ep, schedule, M, mb, blocks, peak, splits[peak], tuple(splits),
                      (per_token[0], per_token[1]), max(sent), bubble(schedule, pp, M, v),
                      _problem(model_cfg, batch, pp, ep, stage_ranks, M, microbatches is not None, schedule, v,
                               run.ac))


def _grads_at_peak(chunks: list[list[Unit]], again: bool, tokens_bytes: int, ep: int, made: bool) -> list[Unit]:
    """The units whose gradients a pipeline rank holds at its peak (its chunks in order). again: the rank runs
    more forwards than it holds at once, so its peak comes back after its first backward, which is its last
    chunk's: that chunk's gradients; else (GPipe, the first ranks of 1F1B at M = pp) the peak is in its first
    backward, before any. made: the block whose backward runs then also counts its new gradient (autograd makes
    it before adding it into one held; with two stages a rank FSDP2's block-by-block gathering counts it
    already), where it outweighs what that backward freed first: the last chunk's head, its activations and the
    transient of its backward (tokens_bytes: a micro-batch's tokens times bytes a number)."""
    last = chunks[-1]
    held = list(last) if again else []
    blocks = [u for u in last if u.block]
    if made and blocks:
        block = max(blocks, key=lambda u: u.local(ep))
        freed = max((u.transient for u in last if not u.block), default=0) + sum(u.acts for u in last if not u.block)
        if 4 * block.local(ep) > tokens_bytes * freed:
            held.append(block)
    return held


def check_layout_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, available: int | None, *, pp: int, dp: int,
                        ep: int) -> None:
    """check_step_memory under pipeline parallelism: the busiest pipeline rank of the layout (layout_plan, one
    micro-batch's schedule at a time: grad_accum steps run one after another) against the memory available."""
    if available is None:
        return
    M = train_cfg.microbatches or pp
    p = layout_plan(model_cfg, dataclasses.replace(train_cfg, grad_accum=1), pp, dp, ep, train_cfg.schedule, M,
                    accumulate=train_cfg.grad_accum > 1)
    need = p.memory.total
    if need <= available:
        return
    m = p.memory
    state = size_text(m.params + m.grads + m.adamw)
    raise ValueError(f"pp {pp} x dp {dp} x ep {ep} does not fit: its busiest rank (pipeline rank {p.peak_stage}, "
                     f"blocks {p.stage_blocks}) needs about {size_text(need)} ({state} of weights, gradients and "
                     f"AdamW state, {size_text(m.gathered)} FSDP2 gathers, "
                     f"{size_text(m.activations + m.pipeline)} of activations and pipeline buffers with "
                     f"{M} micro-batches of {p.micro_batch}), but {train_cfg.device} has {size_text(available)} "
                     "available; lower batch_size or seq_len, or see `dsmoe plan` for layouts that fit")


def _chunks(model_cfg: ModelConfig, units: list[Unit], n: int, placement: list[list[int]]
            ) -> tuple[list[list[Unit]], tuple[int, ...]]:
    """The model's units cut into n chunks in pipeline order, and the blocks of each: the embedding on the first
    chunk, the head and the MTP modules on the last, the blocks split to balance the chunks' parameters (as
    dsmoe.parallel.pipeline splits them). A last chunk on another rank than the first also holds a copy of the
    embedding when the head shares it (tied) or the MTP modules embed the shifted tokens with it: a replica whose
    gradient is summed with the first's, as Megatron-LM does for tied embeddings."""
    L = model_cfg.n_layers
    if n == 1:
        return [units], (L,)
    embedding, blocks, tail = units[0], units[1:L + 1], units[L + 1:]
    weights = [u.params for u in blocks]
    weights[0] += embedding.params
    weights[-1] += sum(u.params for u in tail)
    sizes = split_blocks(tuple(weights), n)
    if (model_cfg.tie_embeddings or model_cfg.mtp_layers) and n - 1 not in placement[0]:
        tail = [*tail, Unit("embedding copy", embedding.params, 0)]
    bounds = [sum(sizes[:k]) for k in range(n + 1)]
    chunks = [blocks[bounds[k]:bounds[k + 1]] for k in range(n)]
    return [[embedding, *chunks[0]], *chunks[1:-1], [*chunks[-1], *tail]], sizes


def _problem(model_cfg: ModelConfig, batch: int, pp: int, ep: int, ranks: int, M: int, explicit: bool,
             schedule: str, v: int, ac: bool = False) -> str:
    """Why torch's schedule or dsmoe's expert parallelism would refuse a layout ("" when neither would); a rank
    without a sequence in a micro-batch (of `explicit` micro-batches, else of one) too."""
    moe = model_cfg.moe
    if moe is not None and moe.n_groups > 1 and moe.n_groups % ep and ep % moe.n_groups:
        return (f"n_groups={moe.n_groups} must be a multiple or a divisor of ep={ep} "
                "(dsmoe.parallel.expert_parallel)")
    if batch < ranks * (M if explicit else 1):
        return (f"{batch} sequences do not make {M if explicit else 1} micro-batch(es) on each of the {ranks} ranks "
                "of a stage")
    if pp > 1 and schedule == "1f1b" and M < pp:
        return f"1F1B needs at least pp={pp} micro-batches, got {M}"
    if pp > 1 and schedule == "interleaved" and M % max(1, M // pp):
        return f"Interleaved1F1B needs micro-batches ({M}) to be a multiple of their rounds ({max(1, M // pp)})"
    if pp > 1 and schedule in SPLIT_BACKWARD and ranks > 1:
        return f"{SCHEDULES[schedule]} runs on one process a stage: torch's weight pass does not find FSDP2's weights"
    if pp > 1 and schedule in SPLIT_BACKWARD and ac:  # measured at pp 2 (tiny): 2.2x the memory planned for it
        return (f"{SCHEDULES[schedule]} with activation checkpointing holds more than without it (measured: 2.2x "
                "this plan at pp 2; not modeled): plan it with --ac none")
    if pp > 1 and schedule == "dualpipev" and M < 2 * pp:
        return f"DualPipeV needs at least 2 x pp={2 * pp} micro-batches, got {M}"
    return ""


def chunks_per_rank(schedule: str, stages_per_rank: int = 2) -> int:
    return {"interleaved": stages_per_rank, "zb": 2, "dualpipev": 2}.get(schedule, 1)


def layouts(model_cfg: ModelConfig, train_cfg: TrainConfig, gpus: int, schedule: str = "1f1b",
            microbatches: int | None = None, stages_per_rank: int = 2) -> list[LayoutPlan]:
    """Every layout gpus = pp x dp x ep (ep dividing the routed experts, at least one block per chunk), each with
    its problem if it has one."""
    _check_plan(gpus, schedule, microbatches, stages_per_rank)
    moe, per_rank = model_cfg.moe, chunks_per_rank(schedule, stages_per_rank)
    out = []
    for pp in _divisors(gpus):
        if pp > 1 and pp * per_rank > model_cfg.n_layers:
            continue
        for ep in _divisors(gpus // pp):
            if ep == 1 or (moe is not None and moe.n_routed_experts % ep == 0):
                out.append(layout_plan(model_cfg, train_cfg, pp, gpus // pp // ep, ep, schedule, microbatches,
                                       stages_per_rank))
    return out


def plan(model_cfg: ModelConfig, train_cfg: TrainConfig, gpus: int, gpu_memory: int, *, schedule: str = "1f1b",
         microbatches: int | None = None, stages_per_rank: int = 2) -> list[LayoutPlan]:
    """The layouts of `gpus` GPUs of `gpu_memory` bytes each that train the model, best first: by the memory the
    busiest GPU leaves free, in whole GB, then by the bytes it sends in all-to-alls per step, then by bubble.

    Per rank of a stage (step_memory's estimate over the stage's units): its 1/(dp x ep) share of the stage's
    weights and AdamW moments, and of the gradients it holds at its peak; what FSDP2 gathers: without a pipeline, or
    with two stages a rank (dsmoe's views of one model), as step_memory says, block by block; with one stage a rank
    the whole stage's weights unsharded, and the gradients it holds at its peak unsharded in place of its shard of
    them, at 4 bytes a parameter each (routed experts 1/ep), because torch's PipelineStage leaves every
    micro-batch's backward but the last unresharded and unreduced (stage.py, backward_maybe_with_nosync); its
    micro-batches' activations, as many as the schedule holds in flight on that rank (in_flight), and under a split
    backward (zb, dualpipev) the output gradients one chunk's input pass keeps for its weight pass; and the stage's
    receive buffers, which torch allocates once per micro-batch: the input activations of a stage after the first
    and the output gradients of one before the last (_setup_forward_recv_info, _setup_backward_recv_info), fp32
    [micro_batch, seq_len, D] each. The gradients at a rank's peak: all of them without a pipeline, or where the
    step runs the schedule more than once (check_layout_memory under grad_accum); with a pipeline, those of the
    rank's last chunk where the rank runs more forwards than it holds at once, and none before its first backward
    otherwise (GPipe, the first ranks of 1F1B at M = pp), plus the gradient the running block's backward makes
    (_grads_at_peak). Against real CPU runs (tests/test_plan.py) every rank within 15%. Not counted: the CUDA
    context and allocator fragmentation (leave a few GB), routing imbalance (a rank's experts may receive more than
    their share), and the FSDP2 and pipeline traffic.
    A ValueError when no layout can run, or none fits, naming the smallest memory any layout needs."""
    candidates = layouts(model_cfg, train_cfg, gpus, schedule, microbatches, stages_per_rank)
    runnable = [p for p in candidates if not p.problem]
    if not runnable:
        problems = sorted({p.problem for p in candidates})
        raise ValueError(f"no pp x dp x ep layout of {gpus} GPU(s) can run this model and batch: "
                         + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
    fits = [p for p in runnable if p.memory.total <= gpu_memory]
    if not fits:
        least = min(runnable, key=lambda p: p.memory.total)
        ac = train_cfg.activation_checkpointing
        params = sum(u.params for u in model_units(model_cfg, _vocab(model_cfg, train_cfg)))
        least_gpus = -(-STATE_BYTES * params // gpu_memory)
        advice = (f"the training state alone ({STATE_BYTES} B a parameter) needs at least {least_gpus} such GPUs"
                  if least_gpus > gpus else "use more GPUs or a shorter seq_len"
                  + ("" if ac else ", or activation checkpointing"))
        raise ValueError(
            f"no pp x dp x ep layout of {gpus} GPU(s) fits in {_gb(gpu_memory)} per GPU: the smallest needs "
            f"{_gb(least.memory.total)} per GPU (pp {least.pp} x dp {least.dp} x ep {least.ep}, "
            f"micro-batches of {least.micro_batch} x {_run(model_cfg, train_cfg).seq_len} tokens, "
            f"{'with' if ac else 'without'} activation checkpointing); {advice}")
    return sorted(fits, key=lambda p: (-((gpu_memory - p.memory.total) // GB), p.a2a_step, p.bubble, p.pp, p.ep))


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 10**6:.1f} MB"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_plan(gpus: int, schedule: str, microbatches: int | None, stages_per_rank: int) -> None:
    for name, value in (("gpus", gpus), ("microbatches", microbatches), ("stages_per_rank", stages_per_rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
    if schedule == "interleaved" and stages_per_rank < 2:
        raise ValueError(f"stages_per_rank={stages_per_rank} is invalid for the interleaved schedule: must be >= 2")
