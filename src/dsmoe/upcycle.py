"""Upcycling: a dense model turned into a DeepSeekMoE model that computes the same function at initialization.

Shapes: D model dim, W dense FFN width, m granularity (slices of W), f = W/m slice width, S shared slices,
K = m - S routed slices (= top-k), R = E/K replicas of them, E = R*K routed experts.

Fine-grained (granular) upcycling, as Megatron-core's `upcycling_utils` and "Upcycling Large Language Models into
Mixture of Experts" (He et al. 2024, arXiv 2410.07524) build it, in DeepSeek-V3's MoE (sigmoid gate, normalized
top-k weights, routed_scaling_factor, balancing bias):

- each dense FFN down(silu(gate(x)) * up(x)) is cut along its hidden width into m slices of width f (gate and up
  rows, down columns); since the FFN is a sum over its hidden units, it is the sum of its m slices exactly;
- slices 0..S-1 become the shared experts (one SwiGLU of width S*f, always active); slices S..m-1 are the K routed
  ones, copied R times: expert r*K + j holds routed slice j (replica r);
- the router's rows are tied within a replica (one random row u_r per replica, std `router_std`, repeated K
  times: Megatron's repetition of router rows), so a token's K slices of its best replica score exactly alike and
  top-K takes that whole replica: one copy of each routed slice;
- their K equal sigmoid scores, normalized (norm_topk_prob), are 1/K each; routed_scaling_factor = K makes each
  weight 1 (the paper's weight scaling, done by the gate's own scale rather than by rescaling expert weights);
- the balancing bias (selection only) is -1e-6 * r for replica r: it breaks exact ties between replicas towards
  the lower one, which with router_std = 0 (a zero router, every score 0.5) sends every token to replica 0.

Invariant (drop = 0): every MoE block computes shared(x) + sum_j 1 * slice_j(x) = the dense FFN, so the upcycled
model's logits equal the dense model's up to the order of float additions (~1e-6 in fp32; tests/test_upcycle.py
holds them to 1e-5, in dsmoe and in transformers' Glm4MoeForCausalLM against LlamaForCausalLM & co). Exact in every
case with router_std = 0 (the logits are exactly 0). With random rows the tie within a replica is exact where the
router's matmul gives identical rows identical results: always in batched forwards here; a one-token forward (a
decoding step: gemv) may round tied rows differently by an ulp, which matters only for a token whose two best
replicas score within that ulp (~1e-7), where top-K could take two copies of one slice.

Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261), drop = r > 0: in every routed expert, floor(r*f) of its
hidden units, drawn at random per expert, get gate and up rows and down columns drawn anew from N(mean, std) of
the values they replace (their code's statistics). The routing invariant still holds (one copy of each routed
slice, weight 1), and the shared experts and every non-FFN weight are the dense model's; what changes is the
re-drawn units, so the model no longer equals the dense one: the kept units are the dense model's bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dsmoe.config import MAX_ROUTE_SCALE, ModelConfig, MoEConfig, _check, _integer, _is_number
from dsmoe.experts import GroupedExperts, SwiGLU
from dsmoe.memory import available_memory, size_text
from dsmoe.model import Block, MoETransformer
from dsmoe.moe import MoE
from dsmoe.pretrained import init_buffers

# the dense HuggingFace families an upcycled model is exported from, and the family it is exported as: GLM-4.5's
# glm4_moe is DeepSeek-V3's MoE (sigmoid gate, e_score_correction_bias, shared experts) with GQA attention, qkv bias
# (Qwen2's) and per-head q/k norm (Qwen3's) as options; a dsmoe-native model ("") stays dsmoe-native
DENSE_FAMILIES = ("llama", "qwen2", "qwen3")
MOE_FAMILY = {"llama": "glm4_moe", "qwen2": "glm4_moe", "qwen3": "glm4_moe", "": ""}
TIE_BREAK = 1e-6  # the balancing bias steps between replicas: far below the loss-free step (1e-3), above fp32's
#                   resolution at a score of 0.5 (6e-8)


@dataclass
class UpcycleConfig:
    """How a dense model becomes an MoE (`dsmoe upcycle`); validated at construction, naming the field."""

    experts: int                # E, routed experts: a multiple of granularity - shared (R = E/K copies of each slice)
    top_k: int                  # K, routed experts per token: granularity - shared (one copy of each routed slice)
    granularity: int = 1        # m, slices of each dense FFN along its hidden width (each expert's width W/m)
    shared: int = 0             # S, of those slices, the ones that become the shared experts (always active)
    drop: float = 0.0           # r, Drop-Upcycling: share of each routed expert's hidden units drawn anew (0.5 best)
    seed: int = 0               # the router rows' and the re-drawn units' random numbers
    router_std: float = 0.02    # std of the router rows (one per replica); 0: a zero router (every score 0.5)
    first_k_dense: int = 0      # the first blocks keep their dense FFN (DeepSeekMoE: 1, DeepSeek-V3: 3)

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "granularity"):
            _integer(self, name, 1)
        for name in ("shared", "seed", "first_k_dense"):
            _integer(self, name, 0)
        m, S = self.granularity, self.shared
        _check(S < m, "shared", S, f"must be < granularity={m}: at least one slice of the FFN must be routed")
        K = m - S
        _check(self.experts % K == 0 and self.experts >= 2, "experts", self.experts,
               f"must be a multiple of granularity - shared = {m} - {S} = {K} (each of the {K} routed slices is "
               f"copied experts/{K} times), and >= 2 (the format's router scores groups by their top 2)")
        _check(self.top_k == K, "top_k", self.top_k,
               f"does not fit: each token takes one copy of each of the granularity - shared = {K} routed slices, "
               f"so top_k must be {K}")
        _check(K <= MAX_ROUTE_SCALE, "top_k", self.top_k, f"must be <= {MAX_ROUTE_SCALE:g} (routed_scaling_factor = "
               "top_k gives each chosen slice weight 1)")
        _check(_is_number(self.drop) and 0 <= self.drop < 1, "drop", self.drop,
               "must be a number in [0, 1) (Drop-Upcycling re-draws that share of each routed expert; 0.5 is its best)")
        _check(_is_number(self.router_std) and self.router_std >= 0, "router_std", self.router_std,
               "must be a finite number >= 0")

    @property
    def replicas(self) -> int:
        """R: the copies of each routed slice."""
        return self.experts // self.top_k


def upcycled_config(dense: ModelConfig, spec: UpcycleConfig) -> ModelConfig:
    """The MoE model's config: the dense model's, every block from first_k_dense on an MoE of spec's shape with
    DeepSeek-V3's gate set to compute the dense FFN (see the module docstring)."""
    if dense.moe is not None:
        raise ValueError(f"the model already has MoE blocks (moe.n_routed_experts={dense.moe.n_routed_experts}, "
                         f"family {dense.family or 'dsmoe'!r}): upcycling takes a dense model (moe=None)")
    if dense.family not in MOE_FAMILY:
        raise ValueError(f"family={dense.family!r} cannot be upcycled; choose a dense {', '.join(DENSE_FAMILIES)} "
                         "model (or a dsmoe-native one)")
    W, m = dense.dense_hidden, spec.granularity
    _check(W % m == 0, "granularity", m, f"must divide the dense FFN width intermediate_size={W} (dense_hidden)")
    _check(spec.first_k_dense < dense.n_layers, "first_k_dense", spec.first_k_dense,
           f"must be < n_layers={dense.n_layers}: at least one block must become an MoE")
    moe = MoEConfig(dim=dense.dim, n_routed_experts=spec.experts, n_shared_experts=spec.shared, top_k=spec.top_k,
                    expert_dim=W // m, score_func="sigmoid", norm_topk_prob=True, route_scale=float(spec.top_k),
                    n_groups=1, topk_groups=1, group_score="top2", bias_update_speed=0.0)
    return dataclasses.replace(dense, moe=moe, first_k_dense=spec.first_k_dense, dense_layers=[], dense_hidden=W,
                               family=MOE_FAMILY[dense.family])


@torch.no_grad()
def upcycle(dense: MoETransformer, spec: UpcycleConfig) -> MoETransformer:
    """The upcycled MoE model (eval mode, the dense model's dtype and device); the dense model is not changed."""
    cfg = upcycled_config(dense.cfg, spec)
    weight = dense.embed.weight
    _check_memory(cfg, weight.dtype, weight.device)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to(weight.dtype).to_empty(device=weight.device)
    init_buffers(model)  # the rotary table, balancing biases and statistics that to_empty leaves undefined
    own = dict(model.named_parameters())
    for name, t in dense.named_parameters():  # embedding, attention, norms, head and the dense blocks' FFNs
        if name in own:
            own.pop(name).copy_(t)
    generator = torch.Generator().manual_seed(spec.seed)
    for i, (block, dense_block) in enumerate(zip(model.layers, dense.layers)):
        assert isinstance(block, Block) and isinstance(dense_block, Block)
        if isinstance(block.ffn, MoE):
            assert isinstance(dense_block.ffn, SwiGLU)
            _fill_moe(block.ffn, dense_block.ffn, spec, generator)
            for name, _ in block.ffn.named_parameters(prefix=f"layers.{i}.ffn"):
                own.pop(name)
    assert not own, f"upcycle left parameters unfilled: {sorted(own)}"
    return model.eval()


def _fill_moe(moe: MoE, ffn: SwiGLU, spec: UpcycleConfig, generator: torch.Generator) -> None:
    """One MoE block from its dense FFN: shared slices, routed slices copied per replica, tied router rows."""
    S, K, R, f = spec.shared, spec.top_k, spec.replicas, moe.cfg.expert_dim
    gate_WD, up_WD, down_DW = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    if moe.shared_experts is not None:  # slices 0..S-1, side by side: one SwiGLU of width S*f
        moe.shared_experts.gate_proj.weight.copy_(gate_WD[:S * f])
        moe.shared_experts.up_proj.weight.copy_(up_WD[:S * f])
        moe.shared_experts.down_proj.weight.copy_(down_DW[:, :S * f])
    experts = moe.experts
    assert isinstance(experts, GroupedExperts)
    # routed slice j = dense slice S + j; expert r*K + j holds it (replica r)
    experts.w_gate.copy_(gate_WD[S * f:].unflatten(0, (K, f)).repeat(R, 1, 1))   # [E, f, D]
    experts.w_up.copy_(up_WD[S * f:].unflatten(0, (K, f)).repeat(R, 1, 1))       # [E, f, D]
    experts.w_down.copy_(down_DW[:, S * f:].unflatten(1, (K, f)).transpose(0, 1).repeat(R, 1, 1))  # [E, D, f]
    rows_RD = torch.randn(R, moe.cfg.dim, generator=generator) * spec.router_std
    moe.gate.weight.copy_(rows_RD.repeat_interleave(K, dim=0))  # [E, D]: a replica's K rows alike
    moe.gate.bias.copy_(-TIE_BREAK * torch.arange(R, dtype=torch.float32).repeat_interleave(K))
    if spec.drop > 0:
        _drop_units(experts, spec.drop, generator)


def _drop_units(experts: GroupedExperts, drop: float, generator: torch.Generator) -> None:
    """Drop-Upcycling's diversity re-initialization: in each expert, floor(drop * f) hidden units drawn at random
    get gate/up rows and down columns from N(mean, std) of the values they replace."""
    E, f, _ = experts.w_gate.shape
    n = int(drop * f)
    if n == 0:
        return
    for e in range(E):
        units = torch.randperm(f, generator=generator)[:n].to(experts.w_gate.device)
        for w, dim in ((experts.w_gate[e], 0), (experts.w_up[e], 0), (experts.w_down[e], 1)):
            old = w.index_select(dim, units).float()
            new = torch.randn(old.shape, generator=generator) * old.std(correction=0).cpu() + old.mean().cpu()
            w.index_copy_(dim, units, new.to(w.device, w.dtype))


def _check_memory(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """The upcycled model's weights against the device's available memory, before anything is allocated."""
    need = cfg.num_params() * dtype.itemsize
    available = available_memory("cuda" if device.type == "cuda" else "cpu")
    if available is not None and need > available:
        assert cfg.moe is not None
        raise ValueError(f"the upcycled model has {cfg.num_params():,} parameters (experts="
                         f"{cfg.moe.n_routed_experts} of width {cfg.moe.expert_dim} in {cfg.n_moe_layers} blocks), "
                         f"about {size_text(need)} in {str(dtype).removeprefix('torch.')}, and {device.type} has "
                         f"{size_text(available)} available: choose fewer experts")


def max_logit_difference(a: MoETransformer, b: MoETransformer, seed: int = 0, batch: int = 2,
                         length: int = 32) -> float:
    """max |logits_a - logits_b| on the same random token ids (the invariant's check)."""
    length = min(length, a.cfg.max_seq_len, b.cfg.max_seq_len)
    device = a.embed.weight.device
    ids = torch.randint(0, min(a.cfg.vocab_size, b.cfg.vocab_size), (batch, length),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        return float((a(ids)[0].float() - b(ids)[0].float()).abs().max())

